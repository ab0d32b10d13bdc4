//! Reliability suite (issue #5): process-level faults while a writer commits outbox events,
//! each test ending with the checker of `tests/common/checker.rs`, which reads every topic
//! back and requires lost=0, reordered=0 (per key, after dedup by `id`) and phantoms=0
//! (records of transactions that never committed); duplicates are allowed and counted.
//!
//! Every test prints one summary line (`fault=… runs=… events=… lost=0 …`; run with
//! `-- --nocapture` to see it) and its seed. Knobs, all optional:
//! - `RELIABILITY_RUNS=N`: fault injections per test (defaults: 20 kills, 3 restarts per
//!   mode, 3 cuts, 6 leader kills), e.g. `RELIABILITY_RUNS=100` for a long run;
//! - `RELIABILITY_SEED=S`: replay a run's random choices;
//! - `RELIABILITY_BIG_ROWS=N`: rows of the large transaction the cut test streams (50 000);
//! - `RELIABILITY_DRAIN_SECS=S`: how long the checker waits for the relay to catch up (300).
//!
//! Slot dropped or invalidated under the relay is covered by tests/lifecycle.rs
//! (`a_slot_dropped_at_runtime_stops_the_relay`,
//! `a_slot_dropped_while_stopped_is_refused_until_the_marker_is_cleared`,
//! `an_invalidated_slot_is_refused_with_the_lsn_and_a_working_recovery`).

mod common;

use std::time::{Duration, Instant};

use common::checker::{
    env_number, events, relay_config, runs, seed, setup, Check, Ledger, Outcome, Rng, Writer,
    TOPICS,
};
use common::{free_port, scrape, Broker, Pg, Relay, Seqs, SLOT};

const PARTITIONS: i32 = 4;
/// Bound for "within seconds" behaviours (start-up, reconnects, takeover) on a loaded box.
const SECONDS: Duration = Duration::from_secs(60);

/// A relay for `pg_url` with metrics on a fresh port; returns it and the port.
fn start_relay(pg_url: &str, bootstrap: &str) -> (Relay, u16) {
    let port = free_port();
    (Relay::start(&relay_config(pg_url, bootstrap, port)), port)
}

/// The relay's `outbox_relay_leader` (1 while it streams from the slot); `None` if its
/// endpoint does not answer (yet).
fn leader(port: u16) -> Option<bool> {
    scrape(port)
        .ok()?
        .get("outbox_relay_leader", &[])
        .map(|v| v == 1.0)
}

/// Waits until the relay streams from the slot, failing fast if it exits.
async fn wait_leader(relay: &mut Relay, port: u16, what: &str) {
    let deadline = Instant::now() + SECONDS;
    while leader(port) != Some(true) {
        relay.assert_running();
        assert!(
            Instant::now() < deadline,
            "{what}: the relay did not start streaming within {SECONDS:?}; stderr:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The checker at the end of every test (`alive` is called while it waits, to fail fast if
/// a relay died): panics unless lost = reordered = phantoms = 0.
async fn check(
    pg: &Pg,
    broker: &Broker,
    topics: &[&str],
    fault: &str,
    runs: usize,
    ledger: &Ledger,
    alive: impl FnMut(),
) {
    let check = Check {
        pg,
        broker,
        topics,
        partitions: PARTITIONS,
        fault,
        runs,
    };
    check.run(ledger, alive).await.assert_ok();
}

/// Keeps at most the last few dead relays (their stderr is printed if the test fails).
fn keep_dead(dead: &mut Vec<Relay>, relay: Relay) {
    dead.push(relay);
    if dead.len() > 3 {
        dead.remove(0);
    }
}

// ---------------------------------------------------------------------------------------------
// a. kill -9 at random points
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn kill_9_at_random_points_loses_nothing() {
    let kills = runs(20);
    let mut rng = Rng::new(seed());
    let (pg, broker) = setup(&TOPICS, PARTITIONS).await;
    let (mut relay, mut port) = start_relay(&pg.url(), &broker.bootstrap());
    relay.wait_for_slot(&pg, SLOT, SECONDS).await;
    let writer = Writer::spawn(pg.url(), rng.next(), 30);

    let mut dead = Vec::new();
    let mut streaming_at_kill = 0;
    for round in 1..=kills {
        // Half the time wait until the relay streams, so that many kills land mid-stream;
        // otherwise kill it wherever it is (connecting, standby behind the dead walsender…).
        let pause = if rng.chance(50) {
            wait_leader(&mut relay, port, &format!("kill {round}")).await;
            rng.millis(100, 1500)
        } else {
            rng.millis(0, 400)
        };
        tokio::time::sleep(pause).await;
        relay.assert_running();
        if leader(port) == Some(true) {
            streaming_at_kill += 1;
        }
        relay.kill9();
        // Restart at once: the slot may still be held by the dead relay's walsender.
        tokio::time::sleep(rng.millis(0, 300)).await;
        let (next, next_port) = start_relay(&pg.url(), &broker.bootstrap());
        keep_dead(&mut dead, std::mem::replace(&mut relay, next));
        port = next_port;
    }
    println!("kill -9: {streaming_at_kill} of {kills} kills hit a streaming relay");
    wait_leader(&mut relay, port, "after the last kill").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;

    let alive = || relay.assert_running();
    check(&pg, &broker, &TOPICS, "kill9", kills, &ledger, alive).await;
}

// ---------------------------------------------------------------------------------------------
// b. PostgreSQL restarted under a writer
// ---------------------------------------------------------------------------------------------

/// `restarts` times `pg_ctl restart -m <mode>` while the writer commits; the relay must keep
/// running and reconnect. Many duplicates are expected on PostgreSQL 15 (and before 17): a
/// slot is written to disk only when its `restart_lsn` moves (at a running-xacts record,
/// every 15 s or at a checkpoint), not when only `confirmed_flush_lsn` does, even at the
/// shutdown checkpoint; after a restart the server resends from the position saved then.
async fn postgres_restarts(mode: &str) {
    let restarts = runs(3);
    let mut rng = Rng::new(seed());
    let (pg, broker) = setup(&TOPICS, PARTITIONS).await;
    let (mut relay, port) = start_relay(&pg.url(), &broker.bootstrap());
    relay.wait_for_slot(&pg, SLOT, SECONDS).await;
    let writer = Writer::spawn(pg.url(), rng.next(), 20);

    for round in 1..=restarts {
        wait_leader(&mut relay, port, &format!("before restart {round}")).await;
        tokio::time::sleep(rng.millis(500, 2500)).await;
        pg.restart(mode).await;
        relay.assert_running();
    }
    wait_leader(&mut relay, port, "after the last restart").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    println!(
        "writer: {} transactions committed, {} rolled back, {} failed, {} in doubt, \
         {} failed connects",
        ledger.txns_committed,
        ledger.txns_rolled_back,
        ledger.txns_failed,
        ledger.txns_maybe,
        ledger.failed_connects
    );

    let alive = || relay.assert_running();
    check(
        &pg,
        &broker,
        &TOPICS,
        &format!("pg-restart-{mode}"),
        restarts,
        &ledger,
        alive,
    )
    .await;
}

#[tokio::test]
async fn postgres_restart_fast_repeatedly_loses_nothing() {
    postgres_restarts("fast").await;
}

#[tokio::test]
async fn postgres_restart_immediate_repeatedly_loses_nothing() {
    postgres_restarts("immediate").await;
}

// ---------------------------------------------------------------------------------------------
// c. The replication connection cut in the middle of a large transaction
// ---------------------------------------------------------------------------------------------

const BULK_TOPIC: &str = "outbox.event.bulk";

/// Records of the `bulk` aggregate Kafka acknowledged to this relay process.
fn bulk_published(port: u16) -> Option<f64> {
    let s = scrape(port).ok()?;
    Some(s.sum(
        "outbox_relay_events_published_total",
        &[("topic", BULK_TOPIC)],
    ))
}

#[tokio::test]
async fn connection_cut_mid_transaction_loses_nothing() {
    let cuts = runs(3);
    let big = env_number("RELIABILITY_BIG_ROWS", 50_000);
    let mut rng = Rng::new(seed());
    let topics = [TOPICS[0], TOPICS[1], BULK_TOPIC];
    let (pg, broker) = setup(&topics, PARTITIONS).await;
    // Only the relay goes through the proxy; the writers connect directly.
    let proxy = common::CutProxy::start(pg.port());
    let relay_url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let (mut relay, port) = start_relay(&relay_url, &broker.bootstrap());
    relay.wait_for_slot(&pg, SLOT, SECONDS).await;
    let writer = Writer::spawn(pg.url(), rng.next(), 10);

    let mut bulk = Ledger::default();
    let mut seqs = Seqs::default();
    let mut client = pg.client().await;
    let mut cut_at = Vec::new();
    let mut mid = 0;
    for round in 1..=cuts {
        wait_leader(&mut relay, port, &format!("before cut {round}")).await;
        let before = bulk_published(port).unwrap_or(0.0);
        let rows = events(
            &mut rng,
            &mut seqs,
            big,
            8,
            Some("bulk"),
            &format!("big-{round}"),
        );
        let outcome = bulk.transact(&mut client, &rows, false).await;
        assert_eq!(outcome, Outcome::Committed, "the large transaction");
        // Cut once Kafka acknowledged part of the transaction, not all of it.
        let deadline = Instant::now() + SECONDS;
        let acked = loop {
            relay.assert_running();
            let now = bulk_published(port).unwrap_or(before);
            if now > before || Instant::now() >= deadline {
                break now - before;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        proxy.cut();
        cut_at.push(format!("{acked}/{big}"));
        if acked > 0.0 && acked < big as f64 {
            mid += 1;
        }
        let end = pg.current_wal_lsn().await;
        tokio::time::sleep(rng.millis(200, 2000)).await;
        proxy.restore();
        // The relay reconnects and sends the transaction again; wait until it is confirmed.
        let (done, last) = pg.wait_confirmed(SLOT, end, Duration::from_secs(180)).await;
        relay.assert_running();
        assert!(
            done,
            "cut {round}: the slot did not get past the large transaction (at {:?})",
            last.map(common::lsn_text)
        );
    }
    println!(
        "connection cut after N of {big} rows were acknowledged: {cut_at:?} \
         ({mid} of {cuts} in the middle of the transaction)"
    );
    let mut ledger = writer.finish().await;
    ledger.merge(bulk);

    let alive = || relay.assert_running();
    check(&pg, &broker, &topics, "cut-mid-txn", cuts, &ledger, alive).await;
}

// ---------------------------------------------------------------------------------------------
// d. Two replicas racing for one slot while the leader is killed repeatedly
// ---------------------------------------------------------------------------------------------

/// Running replicas, each `(relay, metrics port)`.
struct Replicas(Vec<(Relay, u16)>);

impl Replicas {
    /// Samples every replica's leader gauge; returns which ones lead.
    fn leaders(&mut self) -> Vec<usize> {
        (0..self.0.len())
            .filter(|&i| {
                let (relay, port) = &mut self.0[i];
                relay.assert_running();
                leader(*port) == Some(true)
            })
            .collect()
    }

    /// Waits until exactly one replica leads and the slot is active; meanwhile counts samples
    /// in which two claimed to lead. Returns the leader's index.
    async fn wait_one_leader(&mut self, pg: &Pg, what: &str, both: &mut usize) -> usize {
        let deadline = Instant::now() + SECONDS;
        loop {
            let leaders = self.leaders();
            if leaders.len() > 1 {
                *both += 1;
            }
            if leaders.len() == 1 && pg.slot_active_pid(SLOT).await.is_some() {
                return leaders[0];
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no single leader within {SECONDS:?} (leaders {leaders:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Watches them for `time`, counting samples in which two claimed to lead.
    async fn watch(&mut self, time: Duration, both: &mut usize) {
        let until = Instant::now() + time;
        while Instant::now() < until {
            if self.leaders().len() > 1 {
                *both += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn two_replicas_with_the_leader_killed_repeatedly_lose_nothing() {
    let kills = runs(6);
    let mut rng = Rng::new(seed());
    let (pg, broker) = setup(&TOPICS, PARTITIONS).await;
    let mut first = start_relay(&pg.url(), &broker.bootstrap());
    // The second starts once the slot exists: two replicas started together on a fresh
    // database race to create it, and the loser exits (see the ignored test below).
    first.0.wait_for_slot(&pg, SLOT, SECONDS).await;
    let mut pair = Replicas(vec![first, start_relay(&pg.url(), &broker.bootstrap())]);
    let writer = Writer::spawn(pg.url(), rng.next(), 20);

    let mut both = 0usize;
    let mut dead = Vec::new();
    let mut takeovers = Vec::new();
    for round in 1..=kills {
        let lead = pair
            .wait_one_leader(&pg, &format!("before kill {round}"), &mut both)
            .await;
        pair.watch(rng.millis(500, 2500), &mut both).await;
        let (mut old, _) = pair.0.remove(lead);
        old.kill9();
        let killed = Instant::now();
        keep_dead(&mut dead, old);
        // The killed one comes back as a new replica: half the time at once, racing the
        // standby for the slot, otherwise once the standby took over.
        let race = rng.chance(50);
        if race {
            pair.0.push(start_relay(&pg.url(), &broker.bootstrap()));
        }
        let new_lead = pair
            .wait_one_leader(&pg, &format!("after kill {round}"), &mut both)
            .await;
        takeovers.push(format!(
            "{:.1}s by the {}",
            killed.elapsed().as_secs_f64(),
            if new_lead == 0 {
                "standby"
            } else {
                "restarted one"
            }
        ));
        if !race {
            pair.0.push(start_relay(&pg.url(), &broker.bootstrap()));
        }
    }
    pair.watch(Duration::from_secs(1), &mut both).await;
    println!("takeovers after each leader kill: {takeovers:?}");
    assert_eq!(
        both, 0,
        "two replicas reported outbox_relay_leader 1 at the same time in {both} samples"
    );
    let ledger = writer.finish().await;

    let alive = || {
        pair.leaders();
    };
    check(
        &pg,
        &broker,
        &TOPICS,
        "two-replicas-leader-kill9",
        kills,
        &ledger,
        alive,
    )
    .await;
}

/// Two replicas started at the same time on a database without the slot both try to create
/// it; the one that gets "already exists" reads the slot while the other's
/// `pg_create_logical_replication_slot` is still looking for a consistent point
/// (`confirmed_flush_lsn` NULL). It must wait and become a standby, not exit.
#[tokio::test]
async fn two_replicas_started_together_on_a_fresh_database_both_keep_running() {
    let attempts = runs(5);
    let (pg, broker) = setup(&TOPICS, PARTITIONS).await;
    for attempt in 1..=attempts {
        let mut pair = Replicas(vec![
            start_relay(&pg.url(), &broker.bootstrap()),
            start_relay(&pg.url(), &broker.bootstrap()),
        ]);
        let mut both = 0;
        pair.wait_one_leader(&pg, &format!("attempt {attempt}"), &mut both)
            .await;
        pair.watch(Duration::from_secs(3), &mut both).await;
        assert_eq!(both, 0, "attempt {attempt}: two leaders at once");
        drop(pair);
        let pg_ref = &pg;
        let released =
            common::wait_until(SECONDS, || async move { !pg_ref.slot_active(SLOT).await }).await;
        assert!(
            released,
            "slot still active after both replicas were killed"
        );
        // A fresh database again: no slot, and no marker of a slot that existed.
        pg.sql(&format!(
            "SELECT pg_drop_replication_slot('{SLOT}'); COMMENT ON PUBLICATION outbox_relay IS NULL"
        ))
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The checker itself: it must see what it is there to see
// ---------------------------------------------------------------------------------------------

#[test]
fn the_checker_counts_loss_reordering_duplicates_and_phantoms() {
    use common::checker::{tally, Report};
    use common::{Event, Rec};
    let event = |id: &str, key: &str, seq: i64| Event {
        id: id.into(),
        aggregatetype: "order".into(),
        key: key.into(),
        event_type: "Changed".into(),
        seq,
        payload: None,
    };
    let rec = |offset: i64, id: &str| Rec {
        topic: "outbox.event.order".into(),
        partition: 0,
        offset,
        key: None,
        value: None,
        headers: vec![("id".into(), Some(id.as_bytes().to_vec()))],
    };
    let committed = [
        event("a1", "a", 1),
        event("a2", "a", 2),
        event("a3", "a", 3),
        event("b1", "b", 1),
        event("b2", "b", 2),
    ];
    // a1 a3 a2 (a2 after a3: reordered), a1 again (duplicate), b2 only (b1 lost),
    // r1 (rolled back) and x (unknown): phantoms.
    let recs = [
        rec(0, "a1"),
        rec(1, "a3"),
        rec(2, "a2"),
        rec(3, "a1"),
        rec(4, "b2"),
        rec(5, "r1"),
        rec(6, "x"),
    ];
    let never = ["r1"].into_iter().collect();
    let mut report = Report::default();
    tally(&mut report, &recs, &committed, &never);
    assert_eq!(
        (
            report.records,
            report.delivered,
            report.lost,
            report.reordered,
            report.duplicates,
            report.phantoms
        ),
        (7, 4, 1, 1, 1, 2),
        "{report}"
    );
    assert!(
        report.problems[0].contains("never committed") && report.problems[1].contains("no writer"),
        "{:?}",
        report.problems
    );
    // A redelivery of a whole earlier range (a1 a2 a3 a1 a2 a3) is duplicates, not disorder.
    let recs = [
        rec(0, "a1"),
        rec(1, "a2"),
        rec(2, "a3"),
        rec(3, "a1"),
        rec(4, "a2"),
        rec(5, "a3"),
    ];
    let mut report = Report::default();
    tally(&mut report, &recs, &committed[..3], &never);
    assert_eq!(
        (report.lost, report.reordered, report.duplicates),
        (0, 0, 3)
    );
    assert!(report.ok(), "{report}");
    report.duplicates = 0;
    report.phantoms = 1;
    assert!(!report.ok(), "a phantom must fail the check");
}
