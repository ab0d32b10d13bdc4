//! Broker faults (issue #5, fault 2), injected with librdkafka's mock cluster
//! (`rdkafka::mocking::MockCluster`, three brokers): Produce requests that fail with retriable
//! errors or a dropped connection, every broker down for a while, one broker down (its
//! partitions wait, the others flow), and added round-trip latency. Both outages last
//! `OUTBOX_TEST_BROKER_OUTAGE_SECS` (30 s by default). The mock brokers listen on loopback
//! ports inside this test process, so the relay binary connects to them as to any Kafka while
//! the test injects faults and reads the records back.
//!
//! Each test ends with the checker: every committed event arrived, nothing else did, per-key
//! order holds after dedup by the `id` header, duplicates are counted, the slot catches up
//! with `pg_current_wal_lsn()`, and the slot was never confirmed early. "Early" is judged
//! from samples taken while events are written: the slot's `confirmed_flush_lsn`, then every
//! partition's high watermark. A transaction whose commit lies wholly before the confirmed
//! LSN must already have all its records below those watermarks (the broker appended them
//! before it acknowledged), so a relay that confirms before Kafka's acknowledgement shows up
//! as a record appended after the sample.
//!
//! Mock cluster caveat: its Produce handler checks idempotent-producer sequence numbers only
//! for transactional producers, so a retried batch that had in fact been appended would be
//! appended twice, and a batch that follows a failed one would not be refused (see
//! [`IN_FLIGHT`] for what that does to the request-error test). The injected request errors
//! refuse a request before anything is appended, so they cannot duplicate; the outages may.
//!
//! Timeouts are generous bounds for "within seconds" behaviours on a small shared machine,
//! never performance assertions.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::checker::{tally, Report};
use common::{
    basic_config, check_delivery, free_port, http_get, insert_outbox, java_murmur2_partition,
    last_line, lsn_text, scrape, wait_until, Event, NewEvent, Pg, Reader, Rec, Relay, Seqs,
    OUTBOX_DDL, QUIET, SLOT,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const BROKERS: i32 = 3;
const PARTITIONS: i32 = 4;
const TOPICS: [&str; 2] = ["outbox.event.order", "outbox.event.customer"];
/// Keys written to, alternately of the `order` and the `customer` aggregate.
const KEYS: u64 = 8;

const STARTUP: Duration = Duration::from_secs(30);
/// For "within seconds" behaviours: readiness changes, reconnects.
const SECONDS: Duration = Duration::from_secs(60);
/// For every record to be in Kafka once the fault is over.
const DELIVERY: Duration = Duration::from_secs(120);
/// After that, for the slot to catch up with the WAL end.
const CONFIRM: Duration = Duration::from_secs(60);

/// How long every broker stays down in [`every_broker_down_holds_the_slot_then_catches_up`].
fn outage() -> Duration {
    let secs = std::env::var("OUTBOX_TEST_BROKER_OUTAGE_SECS")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("OUTBOX_TEST_BROKER_OUTAGE_SECS: whole seconds")
        })
        .unwrap_or(30);
    Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------------------------
// The rig: PostgreSQL, a mock cluster with the outbox topics, the relay with /metrics
// ---------------------------------------------------------------------------------------------

type Cluster = MockCluster<'static, DefaultProducerContext>;

struct Rig {
    /// The relay's configuration, for a restart.
    config: String,
    pg: Pg,
    cluster: Cluster,
    relay: Relay,
    /// The relay's `[metrics] listen` port.
    port: u16,
    client: tokio_postgres::Client,
}

/// The broker (ids from 1) that leads `partition` of each topic: set so, not left to the mock.
fn leader(partition: i32) -> i32 {
    partition % BROKERS + 1
}

/// PostgreSQL with the outbox table, a mock cluster of [`BROKERS`] with both topics (leaders
/// by [`leader`]), and a streaming, ready relay whose `[kafka.properties]` get `properties`
/// (TOML lines), whose `[relay] stall_timeout_secs` is `stall_secs` and whose environment
/// gets `env`.
async fn rig(properties: &str, stall_secs: u64, env: &[(&str, &str)]) -> Rig {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let cluster = MockCluster::new(BROKERS).expect("start librdkafka's mock cluster");
    for topic in TOPICS {
        cluster
            .create_topic(topic, PARTITIONS, BROKERS)
            .unwrap_or_else(|e| panic!("create {topic} on the mock cluster: {e}"));
        for p in 0..PARTITIONS {
            cluster
                .partition_leader(topic, p, Some(leader(p)))
                .unwrap_or_else(|e| panic!("set the leader of {topic}[{p}]: {e}"));
        }
    }
    let port = free_port();
    let config = format!(
        "{}\n[kafka.properties]\n{properties}\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [relay]\nreconnect_max_backoff_secs = 5\nstall_timeout_secs = {stall_secs}\n",
        basic_config(&pg.url(), &cluster.bootstrap_servers())
    );
    let mut relay = Relay::start_with_env(&config, env);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    let mut rig = Rig {
        config,
        client: pg.client().await,
        pg,
        cluster,
        relay,
        port,
    };
    rig.wait_readyz(200, SECONDS, "at start").await;
    rig
}

impl Rig {
    /// Polls `/readyz` until it answers `status`, failing fast if the relay exits; returns the
    /// body.
    async fn wait_readyz(&mut self, status: u16, timeout: Duration, what: &str) -> String {
        let started = Instant::now();
        loop {
            self.relay.assert_running();
            let last = match http_get(self.port, "/readyz") {
                Ok((s, body)) if s == status => {
                    eprintln!(
                        "{what}: /readyz {s} {:?} after {:?}",
                        body.trim(),
                        started.elapsed()
                    );
                    return body;
                }
                Ok((s, body)) => format!("{s} {body:?}"),
                Err(e) => format!("GET /readyz: {e}"),
            };
            assert!(
                started.elapsed() < timeout,
                "{what}: /readyz not {status} within {timeout:?}; last answer: {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A reader of both topics from the beginning.
    fn reader(&self) -> Reader {
        Reader::at(&self.cluster.bootstrap_servers(), &TOPICS)
    }

    /// Waits for all of `log`'s events in Kafka and then for the slot to reach the WAL end,
    /// and checks what arrived (see [`judge`]).
    async fn settle(&mut self, fault: &str, log: &Log) -> Report {
        let n = log.events().count();
        let mut reader = self.reader();
        let relay = &mut self.relay;
        if !reader
            .wait_for(n, DELIVERY, || relay.assert_running())
            .await
        {
            // Judged below, where the missing events are named.
            eprintln!(
                "{fault}: {} of {n} records in Kafka after {DELIVERY:?}",
                reader.len()
            );
        }
        let target = self.pg.current_wal_lsn().await;
        let (reached, last) = self.pg.wait_confirmed(SLOT, target, CONFIRM).await;
        assert!(
            reached,
            "{fault}: confirmed_flush_lsn {} did not reach pg_current_wal_lsn() {} within \
             {CONFIRM:?} of every record being in Kafka",
            last.map_or("NULL".into(), lsn_text),
            lsn_text(target)
        );
        reader.settle(QUIET).await;
        self.relay.assert_running();
        let recs = reader.records();
        // What the broker holds against what was read, partition by partition.
        let watermarks = watermark_client(&self.cluster.bootstrap_servers());
        for topic in TOPICS {
            for p in 0..PARTITIONS {
                let read = recs
                    .iter()
                    .filter(|r| r.topic == topic && r.partition == p)
                    .count();
                let marks = watermarks.fetch_watermarks(topic, p, Duration::from_secs(10));
                if marks
                    .as_ref()
                    .map_or(true, |(low, high)| high - low != read as i64)
                {
                    eprintln!("{fault}: {topic}[{p}]: read {read}, watermarks {marks:?}");
                }
            }
        }
        judge(fault, log, &recs)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing transactions, sampling the slot and the high watermarks
// ---------------------------------------------------------------------------------------------

/// One committed transaction with the WAL positions around its COMMIT.
struct Txn {
    events: Vec<Event>,
    /// WAL insert position just before COMMIT: the commit record starts at or after it.
    before_commit: u64,
    /// WAL insert position just after COMMIT returned: the commit record ends at or before it.
    after_commit: u64,
}

/// The slot's confirmed LSN and, read after it, the high watermark of every partition.
struct Sample {
    confirmed: u64,
    high: HashMap<(String, i32), i64>,
}

/// Everything written and sampled during a test.
#[derive(Default)]
struct Log {
    seqs: Seqs,
    txns: Vec<Txn>,
    samples: Vec<Sample>,
}

impl Log {
    fn events(&self) -> impl Iterator<Item = &Event> {
        self.txns.iter().flat_map(|t| &t.events)
    }

    /// Commits the test's next transaction: 1 to 5 rows over [`KEYS`] keys of both
    /// aggregates, chosen deterministically from the transaction's number.
    async fn commit(&mut self, client: &mut tokio_postgres::Client, note: &str) -> &Txn {
        let t = self.txns.len() as u64;
        let rows: Vec<NewEvent> = (0..1 + t % 5)
            .map(|j| {
                let k = (t * 5 + j * 3) % KEYS;
                let (aggregate, key) = if k.is_multiple_of(2) {
                    ("order", format!("order-{k}"))
                } else {
                    ("customer", format!("customer-{k}"))
                };
                self.seqs.event(aggregate, &key, "Changed", note)
            })
            .collect();
        let tx = client.transaction().await.expect("BEGIN");
        let events = insert_outbox(&tx, &rows).await;
        let before_commit = insert_lsn(&tx).await;
        tx.commit().await.expect("COMMIT");
        let after_commit = insert_lsn(client).await;
        self.txns.push(Txn {
            events,
            before_commit,
            after_commit,
        });
        self.txns.last().expect("just pushed")
    }

    /// Takes a [`Sample`]; skipped when a watermark cannot be read (Kafka unreachable).
    async fn sample(&mut self, pg: &Pg, watermarks: &BaseConsumer) {
        let Some(confirmed) = pg.confirmed_flush_lsn(SLOT).await else {
            return;
        };
        let mut high = HashMap::new();
        for topic in TOPICS {
            for p in 0..PARTITIONS {
                match watermarks.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                    Ok((_, h)) => high.insert((topic.to_owned(), p), h),
                    Err(_) => return,
                };
            }
        }
        self.samples.push(Sample { confirmed, high });
    }
}

/// `pg_current_wal_insert_lsn()` as a byte position.
async fn insert_lsn(client: &impl tokio_postgres::GenericClient) -> u64 {
    let lsn: String = client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
            &[],
        )
        .await
        .expect("pg_current_wal_insert_lsn()")
        .get(0);
    lsn.parse().expect("numeric LSN")
}

/// A client that only reads high watermarks.
fn watermark_client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-test-watermarks")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create the watermark client")
}

// ---------------------------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------------------------

/// Compares what arrived with what was committed (the reliability suite's counts: lost,
/// reordered, duplicates, phantoms; and `check_delivery`'s record-by-record findings) and
/// adds the early confirmations; prints the summary line.
fn judge(fault: &str, log: &Log, recs: &[Rec]) -> Report {
    let committed: Vec<Event> = log.events().cloned().collect();
    let mut report = Report {
        fault: fault.to_owned(),
        runs: 1,
        committed: committed.len(),
        ..Report::default()
    };
    tally(&mut report, recs, &committed, &HashSet::new());
    report
        .problems
        .extend(check_delivery(recs, &committed, PARTITIONS).problems);
    let early = early_confirmations(log, recs);
    println!(
        "{report} early_confirms={} slot_samples={}",
        early.len(),
        log.samples.len()
    );
    report.problems.extend(early);
    report
}

/// Panics unless nothing was lost, reordered, invented or confirmed early and every record
/// is right; duplicates count as a failure unless `duplicates_allowed`.
fn assert_delivered(report: &Report, duplicates_allowed: bool) {
    report.assert_ok();
    assert!(
        duplicates_allowed || report.duplicates == 0,
        "{report}: duplicates where none are expected"
    );
}

/// Every sampled confirmed LSN against the watermarks read after it: a transaction committed
/// wholly before the confirmed LSN must have every record below the watermarks.
fn early_confirmations(log: &Log, recs: &[Rec]) -> Vec<String> {
    // The first delivery of each id.
    let mut arrived: HashMap<String, &Rec> = HashMap::new();
    for r in recs {
        if let Some(id) = r.header_str("id") {
            arrived
                .entry(id)
                .and_modify(|first| {
                    if r.offset < first.offset {
                        *first = r
                    }
                })
                .or_insert(r);
        }
    }
    let mut early = Vec::new();
    for (i, s) in log.samples.iter().enumerate() {
        for txn in log.txns.iter().filter(|t| t.after_commit <= s.confirmed) {
            for e in &txn.events {
                let Some(r) = arrived.get(&e.id) else {
                    continue; // lost: reported as such
                };
                let high = s.high[&(r.topic.clone(), r.partition)];
                if r.offset >= high {
                    early.push(format!(
                        "early confirmation: sample {i}: slot confirmed at {} but id={} \
                         ({}[{}]@{}) was appended later (high watermark then {high}); its \
                         commit ended by {}",
                        lsn_text(s.confirmed),
                        e.id,
                        r.topic,
                        r.partition,
                        r.offset,
                        lsn_text(txn.after_commit)
                    ));
                }
            }
        }
    }
    early
}

fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(port)
        .expect("GET /metrics")
        .get(name, labels)
        .unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// 1. Produce requests fail with retriable errors
// ---------------------------------------------------------------------------------------------

/// Injected errors, each with the text librdkafka logs for it. `__TRANSPORT` is not a broker
/// error: the mock broker closes the connection instead of answering.
const INJECTED: [(RDKafkaRespErr, &str); 5] = [
    (
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        "Broker: Not leader for partition",
    ),
    (
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        "Broker: Request timed out",
    ),
    (
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        "Broker: Not enough in-sync replicas",
    ),
    (
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        "Broker: Leader not available",
    ),
    (
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
        "Local: Broker transport failure",
    ),
];
const ROUNDS: usize = 6;
const TXNS_PER_ROUND: usize = 12;

/// Requests per broker connection in this test (the relay's default is librdkafka's 5).
///
/// Why 1: with several Produce requests of a partition in flight, correctness rests on the
/// broker checking the idempotent producer's sequence numbers, and the mock broker checks them
/// only for transactional producers. When a batch fails and the next one of that partition is
/// already in flight, the mock appends the next one although the failed one is missing, and
/// librdkafka then reports the missing messages as delivered ("implicitly acked by subsequent
/// batch success"). With the default of 5 this test saw 2 or 3 of 213 events lost in 3 of 4
/// runs; in the run examined, each lost event was an IMPLICITACK after REQUEST_TIMED_OUT. A
/// real broker refuses the next batch (OUT_OF_ORDER_SEQUENCE_NUMBER) and both are retried.
const IN_FLIGHT: &str = "1";

#[tokio::test]
async fn produce_request_errors_are_retried_without_loss_or_reordering() {
    const FAULT: &str = "Produce request errors";
    // librdkafka logs each failed message set at debug level (`debug = msg`); the relay
    // forwards its log under the `librdkafka` target. This proves the errors were hit.
    let mut rig = rig(
        &format!(
            "\"debug\" = \"msg\"\n\"max.in.flight.requests.per.connection\" = \"{IN_FLIGHT}\""
        ),
        60,
        &[("RUST_LOG", "info,librdkafka=debug")],
    )
    .await;
    let watermarks = watermark_client(&rig.cluster.bootstrap_servers());
    let mut log = Log::default();
    let mut injected = 0;
    for round in 0..ROUNDS {
        // A few of each, in a different order every round, then a burst of transactions.
        let errors: Vec<RDKafkaRespErr> = (0..2 * INJECTED.len())
            .map(|i| INJECTED[(i + round) % INJECTED.len()].0)
            .collect();
        injected += errors.len();
        rig.cluster.request_errors(RDKafkaApiKey::Produce, &errors);
        for _ in 0..TXNS_PER_ROUND {
            log.commit(&mut rig.client, "errors").await;
            log.sample(&rig.pg, &watermarks).await;
        }
        rig.relay.assert_running();
    }
    let report = rig.settle(FAULT, &log).await;

    let stderr = rig.relay.stderr();
    let hits: Vec<(&str, usize)> = INJECTED
        .iter()
        .map(|(_, text)| {
            let pattern = format!("encountered error: {text}");
            (
                *text,
                stderr.lines().filter(|l| l.contains(&pattern)).count(),
            )
        })
        .collect();
    let implicit = stderr.lines().filter(|l| l.contains("IMPLICITACK")).count();
    eprintln!(
        "{FAULT}: {injected} errors injected; message sets that met them: {hits:?}; \
         implicit acks (see IN_FLIGHT): {implicit}"
    );
    for (text, n) in &hits {
        assert!(
            *n > 0,
            "{FAULT}: no message set met {text:?}: the injection did not work"
        );
    }
    let errors = scrape(rig.port)
        .expect("GET /metrics")
        .sum("outbox_relay_publish_errors_total", &[]);
    assert_eq!(errors, 0.0, "{FAULT}: records refused for good");
    assert_delivered(&report, false);
}

// ---------------------------------------------------------------------------------------------
// 2. Every broker down for a while
// ---------------------------------------------------------------------------------------------

/// What [`Rig::ride_out`] saw.
struct Held {
    /// The first transaction committed during the fault.
    first: usize,
    /// Where the first transaction that must wait starts its commit: the slot may be confirmed
    /// up to there (an idle keepalive), never past it.
    bound: u64,
    slot_before: u64,
    /// The first 503 answer of `/readyz`.
    unready: String,
}

impl Rig {
    /// Commits `n` transactions with samples, then waits until all of `log` is in Kafka.
    async fn warm_up(&mut self, log: &mut Log, watermarks: &BaseConsumer, n: usize) {
        for _ in 0..n {
            log.commit(&mut self.client, "before").await;
            log.sample(&self.pg, watermarks).await;
        }
        let all = log.events().count();
        self.wait_records(all, DELIVERY, "before any fault").await;
    }

    /// Waits until `n` records can be read, failing fast if the relay exits.
    async fn wait_records(&mut self, n: usize, timeout: Duration, what: &str) {
        let mut reader = self.reader();
        let relay = &mut self.relay;
        let enough = reader.wait_for(n, timeout, || relay.assert_running()).await;
        assert!(
            enough,
            "{what}: {} records in Kafka after {timeout:?}, expected {n}",
            reader.len()
        );
    }

    /// While a fault lasts (`outage`, and longer until `/readyz` answers 503, at most
    /// [`SECONDS`] more): commits a transaction every 1.5 s (at most 20) and checks every
    /// 0.5 s that the relay runs and that the slot stays before the commit of the first
    /// transaction with an event for which `waits` holds (one must exist).
    async fn ride_out(
        &mut self,
        fault: &str,
        log: &mut Log,
        outage: Duration,
        waits: impl Fn(&Event) -> bool,
    ) -> Held {
        let start = Instant::now();
        let first = log.txns.len();
        let slot_before = self.pg.confirmed_flush_lsn(SLOT).await.expect("slot");
        let mut bound: Option<u64> = None;
        let mut unready: Option<String> = None;
        for turn in 0.. {
            let over = start.elapsed() >= outage;
            if over && (unready.is_some() || start.elapsed() >= outage + SECONDS) {
                break;
            }
            self.relay.assert_running();
            if turn % 3 == 0 && log.txns.len() - first < 20 {
                let txn = log.commit(&mut self.client, "fault").await;
                if bound.is_none() && txn.events.iter().any(&waits) {
                    bound = Some(txn.before_commit);
                }
            }
            let slot = self.pg.confirmed_flush_lsn(SLOT).await.expect("slot");
            if let Some(bound) = bound {
                assert!(
                    slot <= bound,
                    "{fault}: the slot moved to {} past the first commit that waits for Kafka \
                     (which starts after {}); before the fault it was at {}",
                    lsn_text(slot),
                    lsn_text(bound),
                    lsn_text(slot_before)
                );
            }
            if unready.is_none() {
                if let Ok((503, body)) = http_get(self.port, "/readyz") {
                    eprintln!(
                        "{fault}: /readyz 503 {:?} after {:?}",
                        body.trim(),
                        start.elapsed()
                    );
                    unready = Some(body);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Held {
            first,
            bound: bound.unwrap_or_else(|| panic!("{fault}: no transaction had to wait")),
            slot_before,
            unready: unready.unwrap_or_else(|| {
                panic!("{fault}: /readyz never answered 503 within {outage:?} + {SECONDS:?}")
            }),
        }
    }

    /// After the fault: a few more commits with samples, everything delivered and confirmed
    /// (see [`Rig::settle`]), `/readyz` 200 again.
    async fn recover(&mut self, fault: &str, log: &mut Log, watermarks: &BaseConsumer) -> Report {
        let back = Instant::now();
        for _ in 0..5 {
            log.commit(&mut self.client, "after").await;
            log.sample(&self.pg, watermarks).await;
        }
        let report = self.settle(fault, log).await;
        eprintln!(
            "{fault}: delivered and confirmed {:?} after the fault ended",
            back.elapsed()
        );
        self.wait_readyz(200, SECONDS, &format!("{fault}, after"))
            .await;
        report
    }

    /// Checks the slot against `held` once more, now that the fault has lasted.
    async fn assert_held(&self, fault: &str, held: &Held) {
        let slot = self.pg.confirmed_flush_lsn(SLOT).await.expect("slot");
        eprintln!(
            "{fault}: slot {} -> {} (first waiting commit after {})",
            lsn_text(held.slot_before),
            lsn_text(slot),
            lsn_text(held.bound)
        );
        assert!(
            slot <= held.bound,
            "{fault}: the slot moved to {} past the first waiting commit (after {})",
            lsn_text(slot),
            lsn_text(held.bound)
        );
        // With every broker silent the relay lets go of the replication session so that
        // PostgreSQL can shut down meanwhile (tests/never_block.rs); otherwise it holds it.
        let released = metric(self.port, "outbox_relay_sessions_released_total", &[]);
        assert!(
            self.pg.slot_active(SLOT).await || released >= 1.0,
            "{fault}: the relay let go of the slot without releasing its session"
        );
    }
}

/// Every broker of the cluster goes down while transactions are committed: the slot stays
/// before the first unacknowledged commit, `/readyz` says Kafka is unreachable, the relay
/// keeps running and counts the waiting records; when the brokers are back everything
/// arrives, the slot catches up, `/readyz` is 200 again and the Kafka reconnect is counted.
#[tokio::test]
async fn every_broker_down_holds_the_slot_then_catches_up() {
    const FAULT: &str = "every broker down";
    let outage = outage();
    let mut rig = rig("", 60, &[]).await;
    let watermarks = watermark_client(&rig.cluster.bootstrap_servers());
    let mut log = Log::default();
    rig.warm_up(&mut log, &watermarks, 10).await;
    let port = rig.port;
    let reconnects = || {
        metric(
            port,
            "outbox_relay_reconnects_total",
            &[("target", "kafka")],
        )
    };
    let reconnects_before = reconnects();

    rig.cluster.broker_down(-1).expect("set every broker down");
    eprintln!("{FAULT}: every broker down for {outage:?}");
    let held = rig.ride_out(FAULT, &mut log, outage, |_| true).await;
    assert!(
        held.unready.to_lowercase().contains("kafka"),
        "{FAULT}: /readyz 503 without naming Kafka: {:?}",
        held.unready
    );
    let waiting: usize = log.txns[held.first..].iter().map(|t| t.events.len()).sum();
    // The last commit may still be on its way to the producer. Once the relay released its
    // replication session (Kafka silent, see tests/never_block.rs) it reads no more, so only
    // what it read before counts.
    let inflight = || metric(port, "outbox_relay_inflight_events", &[]);
    let released = || metric(port, "outbox_relay_sessions_released_total", &[]) >= 1.0;
    let counted = wait_until(SECONDS, || async {
        let n = inflight();
        n == waiting as f64 || (released() && n >= 1.0 && n <= waiting as f64)
    })
    .await;
    assert!(
        counted,
        "{FAULT}: inflight_events {} while {waiting} events wait for Kafka (released: {})",
        inflight(),
        released()
    );
    rig.assert_held(FAULT, &held).await;

    rig.cluster.broker_up(-1).expect("set every broker up");
    let report = rig.recover(FAULT, &mut log, &watermarks).await;
    let reconnects_after = reconnects();
    eprintln!(
        "{FAULT}: reconnects_total{{target=\"kafka\"}} {reconnects_before} -> {reconnects_after}"
    );
    assert!(
        reconnects_after > reconnects_before,
        "{FAULT}: the Kafka reconnect was not counted"
    );
    // A request whose response the outage cut off is sent again; a real broker drops the
    // repeat by its sequence number, the mock broker (no sequence checks for a producer
    // without transactions) appends it again. So duplicates are allowed and counted here.
    assert_delivered(&report, true);
}

// ---------------------------------------------------------------------------------------------
// 3. Added latency
// ---------------------------------------------------------------------------------------------

/// Every broker answers each request 200 ms late: everything arrives in order, and the
/// commit-to-acknowledgement histogram shows the delay.
#[tokio::test]
async fn added_broker_latency_delays_but_loses_nothing() {
    const FAULT: &str = "200 ms broker round trip";
    const RTT: Duration = Duration::from_millis(200);
    let mut rig = rig("", 60, &[]).await;
    let watermarks = watermark_client(&rig.cluster.bootstrap_servers());
    rig.cluster
        .broker_round_trip_time(-1, RTT)
        .expect("set the round-trip time");
    let mut log = Log::default();
    for t in 0..60 {
        log.commit(&mut rig.client, "slow").await;
        // Each watermark read takes a round trip too: sample every few transactions.
        if t % 6 == 5 {
            log.sample(&rig.pg, &watermarks).await;
        }
    }
    let report = rig.settle(FAULT, &log).await;

    let s = scrape(rig.port).expect("GET /metrics");
    let name = "outbox_relay_commit_to_ack_seconds";
    let buckets: Vec<String> = s
        .matching(&format!("{name}_bucket"), &[])
        .map(|b| {
            let le = b
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .map_or("?", |(_, v)| v);
            format!("le={le}: {}", b.value)
        })
        .collect();
    let count = s.get(&format!("{name}_count"), &[]).unwrap_or(f64::NAN);
    let sum = s.get(&format!("{name}_sum"), &[]).unwrap_or(f64::NAN);
    eprintln!(
        "{FAULT}: {name}: count {count}, sum {sum:.3} s, mean {:.3} s\n  {}",
        sum / count,
        buckets.join("\n  ")
    );
    assert!(
        count >= log.txns.len() as f64,
        "{FAULT}: {count} observations for {} transactions",
        log.txns.len()
    );
    // Every acknowledgement came at least one round trip after its commit.
    let fast = s
        .get(&format!("{name}_bucket"), &[("le", "0.1")])
        .unwrap_or(f64::NAN);
    assert_eq!(
        fast, 0.0,
        "{FAULT}: acknowledged within 100 ms of the commit despite a {RTT:?} round trip"
    );
    assert_delivered(&report, false);
}

// ---------------------------------------------------------------------------------------------
// 4. One broker down: its partitions wait, the others flow
// ---------------------------------------------------------------------------------------------

/// The leader of partitions 0 and 3 goes down (the mock moves no leadership): records for
/// the other partitions keep arriving, but the slot stays before the first transaction with a
/// record for a dead partition, and `/readyz` reports the stall after `stall_timeout_secs`.
/// When the broker is back everything arrives and the slot catches up.
#[tokio::test]
async fn one_broker_down_holds_the_slot_at_the_first_transaction_it_owes() {
    const FAULT: &str = "one broker down";
    const DOWN: i32 = 1;
    const STALL_SECS: u64 = 10;
    let outage = outage();
    let mut rig = rig("", STALL_SECS, &[]).await;
    let watermarks = watermark_client(&rig.cluster.bootstrap_servers());
    let mut log = Log::default();
    rig.warm_up(&mut log, &watermarks, 5).await;

    rig.cluster.broker_down(DOWN).expect("set one broker down");
    eprintln!("{FAULT}: broker {DOWN} down for {outage:?}");
    let on_down = |e: &Event| leader(java_murmur2_partition(e.key.as_bytes(), PARTITIONS)) == DOWN;
    let held = rig.ride_out(FAULT, &mut log, outage, on_down).await;
    assert!(
        held.unready.starts_with("stalled"),
        "{FAULT}: /readyz 503 but not for a stall: {:?}",
        held.unready
    );
    // Records for the live brokers' partitions were not held back by the dead one. (Only
    // those can be read: the dead broker's partitions cannot be fetched either.)
    let live = log.events().filter(|e| !on_down(e)).count();
    let what = format!("{FAULT}: the live brokers' partitions");
    rig.wait_records(live, SECONDS, &what).await;
    rig.assert_held(FAULT, &held).await;

    rig.cluster.broker_up(DOWN).expect("set the broker up");
    let report = rig.recover(FAULT, &mut log, &watermarks).await;
    // As with every broker down: a cut-off request sent again may be appended twice here.
    assert_delivered(&report, true);
}

// ---------------------------------------------------------------------------------------------
// 5. A record the broker refuses for good
// ---------------------------------------------------------------------------------------------

/// The broker refuses one Produce request for good (MSG_SIZE_TOO_LARGE: a broker whose
/// `message.max.bytes` is below the producer's) while `txns` transactions are committed, the
/// broker answering after `rtt`. The relay must stop naming a refused event, the slot must stay
/// before its transaction; after a restart (the broker accepting everything again, more
/// transactions committed meanwhile) every event must arrive in per-key order after dedup.
async fn refused_for_good(fault: &str, rtt: Duration, txns: u64) {
    let mut rig = rig("", 60, &[]).await;
    let watermarks = watermark_client(&rig.cluster.bootstrap_servers());
    let mut log = Log::default();
    rig.warm_up(&mut log, &watermarks, 5).await;

    rig.cluster
        .broker_round_trip_time(-1, rtt)
        .expect("set the round-trip time");
    rig.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let first = log.txns.len();
    for _ in 0..txns {
        log.commit(&mut rig.client, "refused").await;
    }
    let status = rig.relay.wait_exit(SECONDS).await.unwrap_or_else(|| {
        panic!(
            "{fault}: the relay still runs {SECONDS:?} after the refusal; stderr:\n{}",
            rig.relay.stderr()
        )
    });
    let stderr = rig.relay.stderr();
    let last = last_line(&stderr);
    eprintln!("{fault}: relay exited ({status}): {last}");
    assert!(!status.success(), "{fault}: exit status {status}");
    let (refused, txn) = log.txns[first..]
        .iter()
        .flat_map(|t| t.events.iter().map(move |e| (e, t)))
        .find(|(e, _)| last.contains(&format!("refused event {}", e.id)))
        .unwrap_or_else(|| panic!("{fault}: the last line names no event written: {last}"));
    let slot = rig.pg.confirmed_flush_lsn(SLOT).await.expect("slot");
    eprintln!(
        "{fault}: refused id={} key={} seq={}; slot {} (its commit after {})",
        refused.id,
        refused.key,
        refused.seq,
        lsn_text(slot),
        lsn_text(txn.before_commit)
    );
    assert!(
        slot <= txn.before_commit,
        "{fault}: the slot is at {}, past the commit of the refused event's transaction \
         (after {})",
        lsn_text(slot),
        lsn_text(txn.before_commit)
    );

    // The cause is fixed: the broker takes everything at full speed; events are committed
    // while the relay is down, then it starts again.
    rig.cluster
        .broker_round_trip_time(-1, Duration::ZERO)
        .expect("reset the round-trip time");
    for _ in 0..3 {
        log.commit(&mut rig.client, "stopped").await;
    }
    rig.relay = Relay::start(&rig.config);
    rig.relay.wait_for_slot(&rig.pg, SLOT, STARTUP).await;
    let report = rig.recover(fault, &mut log, &watermarks).await;
    // Records sent before the relay stopped are sent again: duplicates are allowed.
    assert_delivered(&report, true);
}

/// One transaction, answered at once: the refusal stops the relay before anything after it
/// is sent.
#[tokio::test]
async fn a_record_refused_for_good_stops_the_relay_and_a_restart_delivers_the_rest() {
    refused_for_good("record refused for good", Duration::ZERO, 1).await;
}

/// Several transactions while the broker answers 300 ms late: records of the transactions
/// after the refused one are already sent when the refusal arrives. The mock broker appends
/// them (no sequence checks without transactions), so after the restart the refused event
/// lands behind a later event of its key: per-key order broken after dedup. A real broker
/// refuses them (OUT_OF_ORDER_SEQUENCE_NUMBER); librdkafka's default would then bump the
/// epoch, renumber and send them again, so the relay sets `enable.gapless.guarantee = true`,
/// which makes that a fatal producer error instead. The mock cannot show that (it never
/// refuses out-of-order batches), so this stays ignored: on the mock it fails every time.
#[tokio::test]
#[ignore = "the mock broker skips idempotent sequence checks; the fix (enable.gapless.guarantee) needs a real broker"]
async fn a_record_refused_for_good_with_later_records_in_flight_keeps_key_order() {
    refused_for_good(
        "record refused, later ones in flight",
        Duration::from_millis(300),
        KEYS,
    )
    .await;
}
