//! Surviving a PostgreSQL failover (issue #14), on PostgreSQL 17: a primary and a physical
//! standby with streaming replication, synchronous commit, a physical slot,
//! `sync_replication_slots = on`, `hot_standby_feedback = on` and the primary's
//! `synchronized_standby_slots` naming the standby's slot. The relay runs with a two-host URL
//! while a writer commits; then the primary is killed (`kill -9` of the postmaster, or
//! `pg_ctl stop -m immediate`), the standby promoted, the writer moves to it and the relay must
//! follow on its own: the failover slot it made is there, synced, and it resumes from it. A
//! checker then reads every topic: nothing lost, reordered or invented; duplicates counted.
//! Each round after the first makes a new standby of the new primary on the dead one's port,
//! so the same URL names both throughout.
//!
//! `RELIABILITY_RUNS` sets the number of failovers (default 2: kill -9 and immediate stop alternate);
//! `OUTBOX_TEST_PG17_BIN` the server (scripts/test.sh sets it).

mod common;

use std::time::{Duration, Instant};

use common::checker::{relay_config, runs, seed, Check, Rng, Writer, TOPICS};
use common::{free_port, scrape, Broker, Pg, Relay, OUTBOX_DDL, SLOT};

const PARTITIONS: i32 = 4;
const STANDBY_SLOT: &str = "standby1";
const SECONDS: Duration = Duration::from_secs(60);

/// What a standby needs to keep failover slots, and what it must not inherit from the
/// primary's postgresql.conf: a promoted standby waiting for a synchronous standby or a
/// standby slot it does not have yet would stop every commit and the relay's decoding until
/// the next standby is made (the primary gets them again then, as a cluster manager would).
const STANDBY_SETTINGS: &str = "sync_replication_slots = on\n\
     hot_standby_feedback = on\n\
     synchronous_standby_names = ''\n\
     synchronized_standby_slots = ''";

/// On the primary once its standby runs: commits wait for the standby, and the relay's slot
/// never gets ahead of it.
async fn protect(primary: &Pg) {
    // One statement each: ALTER SYSTEM refuses the implicit transaction of a batch.
    for sql in [
        format!("ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"),
        "ALTER SYSTEM SET synchronous_standby_names = '*'".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        primary.sql(&sql).await;
    }
}

fn leader(port: u16) -> Option<bool> {
    scrape(port)
        .ok()?
        .get("outbox_relay_leader", &[])
        .map(|v| v == 1.0)
}

/// Whether the standby holds a synchronised copy of the relay's slot that survives a
/// promotion: a copy still `temporary` (the standby has not yet received the WAL the slot
/// needs) is dropped when the standby is promoted.
async fn synced(standby: &Pg) -> bool {
    standby
        .client()
        .await
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced \
             AND NOT temporary AND confirmed_flush_lsn IS NOT NULL",
            &[&SLOT],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Whether the relay's walsender streams from its slot there (on a standby the slot sync
/// worker holds the synced slot now and then, so `active` alone does not say it).
async fn relay_streams(pg: &Pg) -> bool {
    let Ok(client) = common::connect(&pg.url()).await else {
        return false;
    };
    client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1 AND r.application_name = 'outbox-relay'",
            &[&SLOT],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn wait_for(what: &str, relay: &mut Relay, mut ready: impl AsyncFnMut() -> bool) -> f64 {
    let started = Instant::now();
    loop {
        if ready().await {
            return started.elapsed().as_secs_f64();
        }
        relay.assert_running();
        assert!(
            started.elapsed() < SECONDS,
            "{what} not within {SECONDS:?}; relay stderr:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_relay_follows_a_promoted_standby_and_loses_nothing() {
    let report = failovers(true, runs(2)).await;
    report.assert_ok();
}

/// Without `synchronized_standby_slots` (and with asynchronous replication) the relay may
/// publish a transaction the standby never received: after the failover it is a *phantom*, an
/// event the new primary does not have (the writer was told its COMMIT failed, or the commit
/// was lost with the old primary as any asynchronous setup loses it). What the relay must
/// still guarantee: every event the new primary has reaches Kafka, in order.
#[tokio::test]
async fn without_synchronized_standby_slots_nothing_the_new_primary_has_is_lost() {
    let report = failovers(false, 1).await;
    println!("unprotected: {report}");
    assert_eq!(
        (report.lost, report.reordered),
        (0, 0),
        "{report}\n{:?}",
        report.problems
    );
}

async fn failovers(protected: bool, failovers: usize) -> common::checker::Report {
    let mut rng = Rng::new(seed());
    let mut primary = Pg::start_major(17);
    primary.sql(OUTBOX_DDL).await;
    let broker = Broker::start();
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let mut standby = primary
        .start_standby(STANDBY_SLOT, free_port(), STANDBY_SETTINGS)
        .await;
    if protected {
        protect(&primary).await;
    }
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        primary.port(),
        standby.port()
    );
    let metrics = free_port();
    let mut relay = Relay::start(&relay_config(&url, &broker.bootstrap(), metrics));
    relay.wait_for_slot(&primary, SLOT, SECONDS).await;
    let writer = Writer::spawn(
        format!("{url}?target_session_attrs=read-write"),
        rng.next(),
        20,
    );

    let mut resumed = Vec::new();
    for round in 1..=failovers {
        wait_for("streaming", &mut relay, async || {
            leader(metrics) == Some(true)
        })
        .await;
        let slot_is_failover = primary
            .client()
            .await
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await
            .expect("read the relay's slot")
            .get::<_, bool>(0);
        assert!(
            slot_is_failover,
            "round {round}: the relay's slot is not a failover slot"
        );
        wait_for("the slot synced to the standby", &mut relay, async || {
            synced(&standby).await
        })
        .await;
        tokio::time::sleep(rng.millis(1000, 3000)).await;

        let how = if round % 2 == 1 {
            "kill -9"
        } else {
            "pg_ctl stop -m immediate"
        };
        if round % 2 == 1 {
            primary.kill9();
        } else {
            primary.stop("immediate").await;
        }
        standby.promote().await;
        let promoted = Instant::now();
        let seconds = wait_for(
            "the relay on the promoted standby",
            &mut relay,
            async || relay_streams(&standby).await,
        )
        .await;
        println!("failover {round} ({how}): the relay streamed from the new primary {seconds:.1} s after the promotion");
        resumed.push(promoted.elapsed().as_secs_f64().min(seconds));

        // The old primary is gone for good; a new standby takes its port.
        let port = primary.port();
        drop(std::mem::replace(&mut primary, standby));
        standby = primary
            .start_standby(STANDBY_SLOT, port, STANDBY_SETTINGS)
            .await;
        if protected {
            protect(&primary).await;
        }
    }
    wait_for(
        "streaming after the last failover",
        &mut relay,
        async || leader(metrics) == Some(true),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    let check = Check {
        pg: &primary,
        broker: &broker,
        topics: &TOPICS,
        partitions: PARTITIONS,
        fault: if protected {
            "failover"
        } else {
            "failover, unprotected"
        },
        runs: failovers,
    };
    let report = check.run(&ledger, || relay.assert_running()).await;
    println!(
        "failover: seconds from promotion to streaming: {:?}",
        resumed
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
    );
    let stderr = relay.stderr();
    println!(
        "failover: the relay resumed behind what it had confirmed {} time(s)",
        stderr
            .matches("the server lost the slot's latest position")
            .count()
    );
    report
}
