//! Crash safety: while a writer commits outbox events continuously, the relay is killed with
//! SIGKILL and restarted five times. Afterwards every committed event must be in Kafka, in
//! per-key order once repeated ids are skipped. Duplicates are allowed (at-least-once) and
//! reported.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::checker::{commit_until, Rng};
use common::{
    basic_config, check_delivery, lsn_text, settle, wait_until, Broker, Patience, Pg, Relay, Seqs,
    OUTBOX_DDL, SLOT,
};

const PARTITIONS: i32 = 8;
const TOPICS: [&str; 2] = ["outbox.event.order", "outbox.event.customer"];
const KILLS: usize = 5;

#[tokio::test]
async fn kill_9_and_restart_loses_nothing_and_keeps_per_key_order() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed: CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);

    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let config = basic_config(&pg.url(), &broker.bootstrap());
    let mut relay = Relay::start(&config);
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(60))
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(commit_until(
        pg.url(),
        Rng::new(rng.next() | 1),
        Seqs::default(),
        50,
        30,
        stop.clone(),
        Arc::new(AtomicBool::new(false)),
    ));

    // Killed relays are kept (dead) so that a failure prints each one's stderr.
    let mut killed: Vec<Relay> = Vec::new();
    for round in 1..=KILLS {
        tokio::time::sleep(Duration::from_millis(rng.range(500, 3000))).await;
        relay.assert_running();
        relay.kill9();
        eprintln!(
            "round {round}: killed relay pid {}, slot at {:?}",
            relay.pid(),
            pg.confirmed_flush_lsn(SLOT).await.map(lsn_text)
        );
        // As a supervisor would: start again once PostgreSQL noticed the old walsender died
        // (otherwise the slot is still "active for PID …").
        let pg_ref = &pg;
        let released = wait_until(Duration::from_secs(30), || async move {
            !pg_ref.slot_active(SLOT).await
        })
        .await;
        assert!(
            released,
            "slot still active 30 s after the relay was killed"
        );
        tokio::time::sleep(Duration::from_millis(rng.range(0, 500))).await;
        killed.push(std::mem::replace(&mut relay, Relay::start(&config)));
    }
    // Let the last relay work alongside the writer for a while, then stop writing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (expected, _) = writing.await.expect("writer task");
    let target = pg.current_wal_lsn().await;
    eprintln!("{} events committed in total", expected.len());

    // Catch up: all records delivered and the slot confirmed up to the last write.
    let (recs, confirmed) = settle(
        &pg,
        &broker,
        &mut relay,
        &TOPICS,
        expected.len(),
        target,
        Patience {
            delivery: Duration::from_secs(180),
            confirm: Duration::from_secs(30),
        },
    )
    .await;

    let delivery = check_delivery(&recs, &expected, PARTITIONS);
    eprintln!(
        "{} records read for {} events: {} duplicate(s) after {KILLS} kill -9s",
        recs.len(),
        expected.len(),
        delivery.duplicates
    );
    delivery.assert_ok("after kill -9 / restart");
    confirmed.unwrap_or_else(|e| panic!("after the writer stopped: {e}"));
    drop(killed);
}
