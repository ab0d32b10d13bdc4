//! Broker failures on a real three-node Apache Kafka cluster (issue #12, item 5): replication
//! factor 3 and `min.insync.replicas=2` (`scripts/kafka.sh run --voters …`), the relay's
//! idempotent `acks=all` producer, and a writer committing outbox transactions throughout.
//! Each test proves that what a consumer reads at the end has every committed event (0 lost),
//! in per-key order (0 reordered), and nothing that was never committed; duplicates are
//! counted and printed, and the slot must catch up with `pg_current_wal_lsn()`:
//! - the leader of busy partitions is killed (`kill -9`) five times, restarted each time;
//! - all three nodes are stopped (SIGTERM: controlled shutdown) and restarted one by one;
//! - every node is down for `OUTBOX_TEST_BROKER_OUTAGE_SECS` (30 s by default), then back;
//!   `/readyz` says Kafka is unreachable meanwhile;
//! - one node (the leader of busy partitions) is frozen (SIGSTOP) for 20 s;
//! - two nodes are stopped, so the partitions' ISR is below `min.insync.replicas`: the relay
//!   waits without confirming the slot past what Kafka did not take, `/readyz` answers 503
//!   with the reason, and nothing is lost when the nodes are back.
//!
//! The last test replays the loss seen once on librdkafka's mock cluster on the real one:
//! 30,000 events in transactions of 100 (written over about 30 s) while one node (a leader)
//! is killed for 10 s; when it is back and in sync, leadership moves back to it (a preferred
//! leader election), so the producer meets NOT_LEADER_OR_FOLLOWER from the old leaders too. It runs `OUTBOX_TEST_CLUSTER_ROUNDS`
//! rounds (2 by default; the full count is 20:
//! `OUTBOX_TEST_CLUSTER_ROUNDS=20 cargo test --test cluster_faults -- --nocapture mock_loss`),
//! `OUTBOX_TEST_CLUSTER_EVENTS` events each (30,000). A lost event is kept as evidence: the
//! relay's log (with librdkafka's message-set debug lines) is written to a file named in the
//! failure.
//!
//! The tests of this file run one at a time (each starts three JVMs; two clusters at once on a
//! two-core CI machine mostly measure the machine). Timeouts are generous bounds, never
//! performance assertions.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::checker::{
    env_number, events, outbox_ids, seed, tally, Ledger, Outcome, Report, Resolved, Rng, Writer,
    TOPICS,
};
use common::{
    basic_config, check_delivery, connect, free_port, http_get, insert_outbox, lsn_text, scrape,
    Cluster, Pg, Relay, Seqs, OUTBOX_DDL, QUIET, SLOT,
};

const NODES: i32 = 3;
const PARTITIONS: i32 = 4;
/// `[relay] stall_timeout_secs`: how long records may wait before `/readyz` says so.
const STALL_SECS: u64 = 10;

const STARTUP: Duration = Duration::from_secs(60);
/// For "within seconds" behaviours: readiness changes, a node rejoining the ISR.
const SECONDS: Duration = Duration::from_secs(90);
/// For every record to be in Kafka, and the slot to catch up, once the faults are over.
const DRAIN: Duration = Duration::from_secs(180);

/// One test at a time (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

/// How long every node stays down in [`every_node_down_for_a_while_loses_nothing`].
fn outage() -> Duration {
    Duration::from_secs(env_number("OUTBOX_TEST_BROKER_OUTAGE_SECS", 30))
}

/// PostgreSQL with the outbox table, three Kafka nodes with both topics, and a streaming,
/// ready relay with `/metrics` and `/readyz` on `port`.
struct Rig {
    pg: Pg,
    cluster: Cluster,
    relay: Relay,
    port: u16,
    seed: u64,
}

/// Starts the rig; `extra` is appended to the relay's config, `env` given to its process.
async fn rig(extra: &str, env: &[(&str, &str)]) -> Rig {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let cluster = Cluster::start(NODES).await;
    for topic in TOPICS {
        cluster.create_topic(topic, PARTITIONS).await;
    }
    let port = free_port();
    let config = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [relay]\nreconnect_max_backoff_secs = 2\nstall_timeout_secs = {STALL_SECS}\n{extra}",
        basic_config(&pg.url(), &cluster.bootstrap())
    );
    let mut relay = Relay::start_with_env(&config, env);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    let mut rig = Rig {
        pg,
        cluster,
        relay,
        port,
        seed: seed(),
    };
    rig.readyz(SECONDS, "at start", |s, _| s == 200).await;
    rig
}

impl Rig {
    /// The checker's writer on both topics: transactions of 1..=10 events over 12 keys, one
    /// in ten rolled back.
    fn writer(&self) -> Writer {
        Writer::spawn(self.pg.url(), self.seed, 10)
    }

    /// Polls `/readyz` until `want(status, body)`, failing fast if the relay exits; returns
    /// the body.
    async fn readyz(
        &mut self,
        timeout: Duration,
        what: &str,
        want: impl Fn(u16, &str) -> bool,
    ) -> String {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            self.relay.assert_running();
            match http_get(self.port, "/readyz") {
                Ok((status, body)) if want(status, &body) => {
                    eprintln!(
                        "{what}: /readyz {status} {:?} after {:?}",
                        body.trim(),
                        started.elapsed()
                    );
                    return body;
                }
                Ok((status, body)) => last = format!("{status} {body:?}"),
                Err(e) => last = format!("GET /readyz: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{what}: /readyz not as expected within {timeout:?}; last answer: {last}");
    }

    /// Waits until every node is in sync for every partition, so each fault starts from a
    /// whole cluster.
    async fn in_sync(&mut self, topics: &[&str], what: &str) {
        self.relay.assert_running();
        let whole = self.cluster.wait_in_sync(topics, SECONDS).await;
        assert!(
            whole,
            "{what}: not every node in sync within {SECONDS:?}: {:?}",
            self.cluster.isr(topics)
        );
    }

    /// The node leading `topic`'s `partition` (waits for one to be elected).
    async fn leader(&mut self, topic: &str, partition: i32) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(id) = self.cluster.leader_of(topic, partition) {
                return id;
            }
            assert!(
                started.elapsed() < SECONDS,
                "{topic}[{partition}] has no leader"
            );
            self.relay.assert_running();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Lets the writer and the relay work for `d`, failing fast if the relay exits.
    async fn run_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.relay.assert_running();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The checker: resolves the ledger's events in doubt against the table, waits for the
    /// slot to reach the WAL end and for every committed event to be readable from `topics`,
    /// then counts lost, reordered, duplicate and phantom records and checks every record's
    /// content and partition. A lost event while the slot is confirmed past it is a real loss:
    /// the relay's log is kept in a file named in the report.
    async fn check(
        &mut self,
        fault: &str,
        runs: usize,
        ledger: &Ledger,
        topics: &[&str],
    ) -> Report {
        let Resolved {
            committed,
            never,
            maybe_committed,
        } = ledger.resolve(&outbox_ids(&self.pg).await);
        let mut report = Report {
            fault: fault.to_owned(),
            runs,
            committed: committed.len(),
            maybe: ledger.maybe.len(),
            maybe_committed,
            never_committed: never.len(),
            ..Report::default()
        };

        let target = self.pg.current_wal_lsn().await;
        let started = Instant::now();
        let confirmed = loop {
            self.relay.assert_running();
            let slot = self.pg.confirmed_flush_lsn(SLOT).await;
            if slot.is_some_and(|l| l >= target) || started.elapsed() >= DRAIN {
                break slot;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let caught_up = confirmed.is_some_and(|l| l >= target);
        if !caught_up {
            report.problems.push(format!(
                "the slot's confirmed_flush_lsn {} did not reach {} (the WAL end after the last \
                 write) within {DRAIN:?}",
                confirmed.map_or("NULL".into(), lsn_text),
                lsn_text(target)
            ));
        }

        let mut reader = self.cluster.reader(topics);
        let relay = &mut self.relay;
        reader
            .wait_for(committed.len(), DRAIN, || relay.assert_running())
            .await;
        // The count includes duplicates: read on (a while) until every committed id showed.
        let more = Instant::now() + Duration::from_secs(30);
        let recs = loop {
            reader.settle(QUIET).await;
            let recs = reader.records();
            let ids: HashSet<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
            if committed.iter().all(|e| ids.contains(&e.id)) || Instant::now() >= more {
                break recs;
            }
        };
        tally(&mut report, &recs, &committed, &never);
        let delivery = check_delivery(&recs, &committed, PARTITIONS);
        if !report.ok() || !delivery.problems.is_empty() {
            report.problems.extend(delivery.problems);
        }
        if report.lost > 0 && caught_up {
            let path = std::env::temp_dir().join(format!(
                "outbox-relay-loss-{}-{}.log",
                std::process::id(),
                fault.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            ));
            let kept = std::fs::write(&path, self.relay.stderr()).map_or_else(
                |e| format!("not kept: {e}"),
                |()| format!("kept in {}", path.display()),
            );
            report.problems.insert(
                0,
                format!(
                    "REAL LOSS: {} events missing while the slot is confirmed at {} past them; \
                     relay log {kept}",
                    report.lost,
                    lsn_text(target)
                ),
            );
        }
        println!("{report}");
        report
    }
}

/// A partition of each topic in turn: the writer's busiest (all are about as busy).
fn busy(turn: usize) -> (&'static str, i32) {
    (
        TOPICS[turn % TOPICS.len()],
        (turn / TOPICS.len()) as i32 % PARTITIONS,
    )
}

/// The one-at-a-time guard of this file (see the module docs); a test that failed before
/// does not poison it.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[tokio::test]
#[allow(clippy::await_holding_lock)] // each test has its own runtime and thread
async fn killing_the_leader_of_busy_partitions_five_times_loses_nothing() {
    const FAULT: &str = "kill -9 of a leader, x5";
    const KILLS: usize = 5;
    let _serial = serial();
    let mut rig = rig("", &[]).await;
    let writer = rig.writer();
    for turn in 0..KILLS {
        rig.in_sync(&TOPICS, FAULT).await;
        rig.run_for(Duration::from_secs(1)).await;
        let (topic, partition) = busy(turn);
        let leader = rig.leader(topic, partition).await;
        eprintln!("{FAULT}: kill -9 of node {leader}, leader of {topic}[{partition}]");
        rig.cluster.kill9(leader);
        rig.run_for(Duration::from_secs(3)).await;
        rig.cluster.start_again(leader).await;
    }
    rig.in_sync(&TOPICS, FAULT).await;
    rig.run_for(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    rig.check(FAULT, KILLS, &ledger, &TOPICS).await.assert_ok();
}

#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn a_rolling_restart_with_controlled_shutdowns_loses_nothing() {
    const FAULT: &str = "rolling restart (SIGTERM)";
    let _serial = serial();
    let mut rig = rig("", &[]).await;
    let writer = rig.writer();
    for id in rig.cluster.ids() {
        rig.in_sync(&TOPICS, FAULT).await;
        rig.run_for(Duration::from_secs(1)).await;
        eprintln!("{FAULT}: controlled shutdown of node {id}");
        rig.cluster.stop(id).await;
        rig.run_for(Duration::from_secs(2)).await;
        rig.cluster.start_again(id).await;
    }
    rig.in_sync(&TOPICS, FAULT).await;
    rig.run_for(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    rig.check(FAULT, NODES as usize, &ledger, &TOPICS)
        .await
        .assert_ok();
}

#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn every_node_down_for_a_while_loses_nothing() {
    const FAULT: &str = "every node down";
    let _serial = serial();
    let outage = outage();
    let mut rig = rig("", &[]).await;
    let writer = rig.writer();
    rig.run_for(Duration::from_secs(2)).await;
    let ids = rig.cluster.ids();
    for &id in &ids {
        rig.cluster.kill9(id);
    }
    eprintln!("{FAULT}: every node killed for {outage:?}");
    let down = Instant::now();
    // Down for the outage, and longer until /readyz says so (at most SECONDS more).
    let unready = rig
        .readyz(outage.max(SECONDS), FAULT, |s, b| {
            s == 503 && b.contains("Kafka")
        })
        .await;
    assert_eq!(
        unready.trim().lines().count(),
        1,
        "{FAULT}: /readyz reason is not one line: {unready:?}"
    );
    if let Some(rest) = outage.checked_sub(down.elapsed()) {
        rig.run_for(rest).await;
    }
    rig.cluster.start_all_again(&ids).await;
    eprintln!("{FAULT}: back after {:?}", down.elapsed());
    rig.readyz(SECONDS, &format!("{FAULT}, after"), |s, _| s == 200)
        .await;
    rig.in_sync(&TOPICS, FAULT).await;
    rig.run_for(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    rig.check(FAULT, 1, &ledger, &TOPICS).await.assert_ok();
}

#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn a_leader_frozen_for_20_s_loses_nothing() {
    const FAULT: &str = "leader frozen (SIGSTOP) 20 s";
    const FROZEN: Duration = Duration::from_secs(20);
    let _serial = serial();
    let mut rig = rig("", &[]).await;
    let writer = rig.writer();
    rig.in_sync(&TOPICS, FAULT).await;
    rig.run_for(Duration::from_secs(1)).await;
    let (topic, partition) = busy(0);
    let leader = rig.leader(topic, partition).await;
    eprintln!("{FAULT}: node {leader}, leader of {topic}[{partition}], frozen");
    rig.cluster.freeze(leader);
    rig.run_for(FROZEN).await;
    rig.cluster.thaw(leader);
    rig.in_sync(&TOPICS, FAULT).await;
    rig.readyz(SECONDS, &format!("{FAULT}, after"), |s, _| s == 200)
        .await;
    let ledger = writer.finish().await;
    rig.check(FAULT, 1, &ledger, &TOPICS).await.assert_ok();
}

#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn isr_below_min_insync_replicas_waits_says_why_and_loses_nothing() {
    const FAULT: &str = "ISR below min.insync.replicas";
    let _serial = serial();
    let mut rig = rig("", &[]).await;
    let writer = rig.writer();
    rig.in_sync(&TOPICS, FAULT).await;
    rig.run_for(Duration::from_secs(1)).await;
    let stopped = [2, 3];
    for id in stopped {
        eprintln!("{FAULT}: controlled shutdown of node {id}");
        rig.cluster.stop(id).await;
    }
    eprintln!("{FAULT}: ISR now {:?}", rig.cluster.isr(&TOPICS));

    // One transaction of our own on a key of its own: the slot must stay before its commit
    // while Kafka cannot take it.
    let mut probe = Ledger::default();
    let mut seqs = Seqs::default();
    let mut client = rig.pg.client().await;
    let rows = [seqs.event("order", "order-probe", "Changed", "isr")];
    let tx = client.transaction().await.expect("BEGIN");
    probe.committed = insert_outbox(&tx, &rows).await;
    let before_commit: u64 = tx
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
            &[],
        )
        .await
        .expect("pg_current_wal_insert_lsn()")
        .get::<_, String>(0)
        .parse()
        .expect("numeric LSN");
    tx.commit().await.expect("COMMIT");
    probe.txns_committed = 1;

    let held = Instant::now();
    let mut unready = None;
    let mut last = String::new();
    while unready.is_none() || held.elapsed() < Duration::from_secs(STALL_SECS + 5) {
        rig.relay.assert_running();
        let slot = rig.pg.confirmed_flush_lsn(SLOT).await.expect("slot");
        assert!(
            slot <= before_commit,
            "{FAULT}: the slot moved to {} past a commit Kafka could not take (after {})",
            lsn_text(slot),
            lsn_text(before_commit)
        );
        if unready.is_none() {
            match http_get(rig.port, "/readyz") {
                // The stall is seen first; the reason follows with the monitor's next look.
                Ok((503, body)) if body.contains("min.insync.replicas") => {
                    eprintln!(
                        "{FAULT}: /readyz 503 {:?} after {:?}",
                        body.trim(),
                        held.elapsed()
                    );
                    unready = Some(body);
                }
                answer => last = format!("{answer:?}"),
            }
        }
        assert!(
            held.elapsed() < SECONDS,
            "{FAULT}: /readyz did not answer 503 naming min.insync.replicas within {SECONDS:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let unready = unready.expect("seen");
    assert!(
        unready.contains("Kafka")
            && unready.contains("in-sync replica but min.insync.replicas=2")
            && unready.trim().lines().count() == 1,
        "{FAULT}: /readyz 503 without a one-line reason naming the short ISR: {unready:?}"
    );
    // No acknowledgement while the ISR is short: the relay lets go of the replication session
    // so that PostgreSQL can shut down meanwhile (tests/never_block.rs); the slot stays.
    let released = scrape(rig.port)
        .ok()
        .and_then(|s| s.get("outbox_relay_sessions_released_total", &[]))
        .unwrap_or(0.0);
    assert!(
        rig.pg.slot_active(SLOT).await || released >= 1.0,
        "{FAULT}: the relay let go of the slot without releasing its session"
    );

    rig.cluster.start_all_again(&stopped).await;
    rig.readyz(SECONDS, &format!("{FAULT}, after"), |s, _| s == 200)
        .await;
    rig.in_sync(&TOPICS, FAULT).await;
    let mut ledger = writer.finish().await;
    ledger.merge(probe);
    rig.check(FAULT, 1, &ledger, &TOPICS).await.assert_ok();
}

/// The errors librdkafka's message-set debug lines (`debug = msg`) report, with how often each
/// was met: proof of which faults the producer saw.
fn produce_errors(stderr: &str) -> Vec<(String, usize)> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for line in stderr.lines() {
        let Some((_, error)) = line.split_once("encountered error: ") else {
            continue;
        };
        let error = error.split(" (").next().unwrap_or(error).trim().to_owned();
        match seen.iter_mut().find(|(e, _)| *e == error) {
            Some((_, n)) => *n += 1,
            None => seen.push((error, 1)),
        }
    }
    seen
}

/// Writes `n` events of aggregate `aggregate` in transactions of 100 (over 12 keys), pausing
/// `pause` between transactions; returns the ledger.
async fn write_in_hundreds(
    url: String,
    seed: u64,
    aggregate: &'static str,
    n: u64,
    pause: Duration,
) -> Ledger {
    let mut rng = Rng::new(seed);
    let mut seqs = Seqs::default();
    let mut ledger = Ledger::default();
    let mut client = connect(&url).await.expect("writer connects");
    for txn in 0..n.div_ceil(100) {
        let rows = events(
            &mut rng,
            &mut seqs,
            100,
            12,
            Some(aggregate),
            &format!("txn-{txn}"),
        );
        let outcome = ledger.transact(&mut client, &rows, false).await;
        assert_eq!(
            outcome,
            Outcome::Committed,
            "PostgreSQL stays up in this test"
        );
        tokio::time::sleep(pause).await;
    }
    ledger
}

#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn mock_loss_replayed_one_node_down_under_transactions_of_100_loses_nothing() {
    const FAULT: &str = "one node down 10 s, txns of 100";
    const DOWN: Duration = Duration::from_secs(10);
    let _serial = serial();
    let rounds = env_number("OUTBOX_TEST_CLUSTER_ROUNDS", 2) as usize;
    let n = env_number("OUTBOX_TEST_CLUSTER_EVENTS", 30_000);
    // librdkafka's message-set lines (retries, NOT_LEADER, implicit acks) in the relay's log.
    let mut rig = rig(
        "\n[kafka.properties]\n\"debug\" = \"msg\"\n",
        &[("RUST_LOG", "info,librdkafka=debug")],
    )
    .await;
    let mut total = Report {
        fault: FAULT.to_owned(),
        runs: rounds,
        ..Report::default()
    };
    for round in 0..rounds {
        // A topic per round, so each round's check reads only its own records.
        let aggregate: &'static str = format!("r{round}").leak();
        let topic = format!("outbox.event.{aggregate}");
        rig.cluster.create_topic(&topic, PARTITIONS).await;
        rig.in_sync(&[&topic], FAULT).await;
        let writer = tokio::spawn(write_in_hundreds(
            rig.pg.url(),
            rig.seed + round as u64,
            aggregate,
            n,
            Duration::from_millis(100),
        ));
        rig.run_for(Duration::from_secs(2)).await;
        let leader = rig.leader(&topic, round as i32 % PARTITIONS).await;
        eprintln!("{FAULT}: round {round}: node {leader} (a leader of {topic}) down for {DOWN:?}");
        rig.cluster.kill9(leader);
        rig.run_for(DOWN).await;
        rig.cluster.start_again(leader).await;
        rig.in_sync(&[&topic], FAULT).await;
        // Leadership goes back to the restarted node while the writer still writes.
        rig.cluster.elect_preferred_leaders().await;
        let ledger = writer.await.expect("writer task");
        let report = rig
            .check(&format!("{FAULT}, round {round}"), 1, &ledger, &[&topic])
            .await;
        eprintln!(
            "{FAULT}: round {round}: message sets that met errors so far: {:?}",
            produce_errors(&rig.relay.stderr())
        );
        report.assert_ok();
        total.committed += report.committed;
        total.records += report.records;
        total.delivered += report.delivered;
        total.duplicates += report.duplicates;
    }
    println!("{total}");
    let met = produce_errors(&rig.relay.stderr());
    assert!(
        !met.is_empty(),
        "{FAULT}: no message set met an error: the faults never hit records in flight"
    );
}
