//! Lifecycle: the relay as an operator runs it. Metrics and probes on `[metrics] listen`,
//! SIGTERM and restart, PostgreSQL restarts under a writer, two replicas on one slot, a broker
//! that dies, and a slot that disappears. Each test starts its own PostgreSQL and Kafka and
//! judges the relay by what `/metrics`, `/readyz`, `pg_replication_slots`, the exit status
//! and a Kafka consumer show.
//!
//! Timeouts are generous bounds for "within seconds" behaviours on a small shared machine,
//! never performance assertions.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::checker::{events, Rng};
use common::{
    aggregate_of, basic_config, free_port, http_get, insert_outbox, last_line, lsn_text, scrape,
    try_insert_outbox, wait_until, Broker, Delivery, Event, Expect, Patience, Pg, Rec, Relay,
    Scrape, Seqs, OUTBOX_DDL, SLOT,
};

const PARTITIONS: i32 = 4;
const ORDER_TOPIC: &str = "outbox.event.order";
const CUSTOMER_TOPIC: &str = "outbox.event.customer";
const TOPICS: [&str; 2] = [ORDER_TOPIC, CUSTOMER_TOPIC];
const TABLE: &str = "public.outbox";

/// `[relay] shutdown_timeout_secs` in every config here.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of the shutdown timeout for the process to send its last status and exit.
const EXIT_SLACK: Duration = Duration::from_secs(5);
const STARTUP: Duration = Duration::from_secs(30);
/// For "within seconds" behaviours: readiness changes, failover, reconnects.
const SECONDS: Duration = Duration::from_secs(30);
const PATIENCE: Patience = Patience {
    delivery: Duration::from_secs(90),
    confirm: Duration::from_secs(30),
};

/// The basic config plus `[metrics]` on `port` and `[relay]` timings.
fn config(pg: &Pg, broker: &Broker, port: u16) -> String {
    format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [relay]\nshutdown_timeout_secs = {}\nreconnect_max_backoff_secs = 5\nstall_timeout_secs = 60\n",
        basic_config(&pg.url(), &broker.bootstrap()),
        SHUTDOWN_TIMEOUT.as_secs()
    )
}

/// PostgreSQL with the outbox table, Kafka with both topics.
async fn setup() -> (Pg, Broker) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    (pg, broker)
}

/// A relay with a fresh metrics port; returns it and the port.
fn start_relay(pg: &Pg, broker: &Broker) -> (Relay, u16) {
    let port = free_port();
    (Relay::start(&config(pg, broker, port)), port)
}

/// A relay whose producer queue holds only `records`, so a frozen broker keeps it waiting for
/// room; started and ready. Returns it, its config and its metrics port.
async fn start_with_small_queue(pg: &Pg, broker: &Broker, records: u32) -> (Relay, String, u16) {
    let port = free_port();
    let small = format!(
        "{}\n[kafka.properties]\n\"queue.buffering.max.messages\" = \"{records}\"\n",
        config(pg, broker, port)
    );
    let mut relay = Relay::start(&small);
    relay.wait_for_slot(pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "at start").await;
    (relay, small, port)
}

/// Polls `GET path` until `want(status, body)` or `timeout`, failing fast if the relay exits.
/// `Ok` with the matching answer, or `Err` with the last answer (or connection error).
async fn wait_http(
    relay: &mut Relay,
    port: u16,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> Result<(u16, String), String> {
    let deadline = Instant::now() + timeout;
    loop {
        relay.assert_running();
        let last = match http_get(port, path) {
            Ok((status, body)) if want(status, &body) => return Ok((status, body)),
            Ok((status, body)) => format!("{status} {body:?}"),
            Err(e) => format!("GET {path}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for `/readyz` 200 "ready".
async fn wait_ready(relay: &mut Relay, port: u16, timeout: Duration, what: &str) {
    let r = wait_http(relay, port, "/readyz", timeout, |s, b| {
        s == 200 && b.trim() == "ready"
    })
    .await;
    if let Err(last) = r {
        panic!("{what}: /readyz not 200 \"ready\" within {timeout:?}; last answer: {last}");
    }
}

/// Polls `/metrics` until `check` returns no problems or `timeout`; on timeout, panics with
/// the problems and the page.
async fn wait_metrics(
    relay: &mut Relay,
    port: u16,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&Scrape) -> Vec<String>,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        relay.assert_running();
        let (problems, page) = match scrape(port) {
            Ok(s) => {
                let problems = check(&s);
                if problems.is_empty() {
                    return s;
                }
                (problems, s.text)
            }
            Err(e) => (vec![format!("GET /metrics: {e}")], String::new()),
        };
        if Instant::now() >= deadline {
            panic!(
                "{what}: after {timeout:?}:\n  {}\n--- /metrics ---\n{page}",
                problems.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `metric == want`, or a line saying otherwise.
fn expect(s: &Scrape, name: &str, labels: &[(&str, &str)], want: f64) -> Option<String> {
    match s.get(name, labels) {
        Some(v) if v == want => None,
        got => Some(format!("{name}{labels:?} = {got:?}, expected {want}")),
    }
}

fn metric(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.get(name, labels).unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// A writer that survives the server going away
// ---------------------------------------------------------------------------------------------

/// What a [`writer`] did.
#[derive(Default)]
struct Written {
    /// Events whose COMMIT returned success.
    committed: Vec<Event>,
    /// Events whose COMMIT failed with a connection error: they may or may not be committed
    /// (the reply can be lost after the commit); the outbox table tells afterwards.
    in_doubt: Vec<Event>,
    /// Transactions that failed (before or at COMMIT).
    failed_txns: usize,
    /// Connection attempts that failed.
    failed_connects: usize,
}

/// Commits transactions of 1..=`max_rows` events over 12 keys until `stop`, reconnecting
/// after any error (a transaction that failed is not retried: its events never existed,
/// or are in doubt if COMMIT itself failed).
async fn writer(url: String, seed: u64, max_rows: u64, stop: Arc<AtomicBool>) -> Written {
    let mut rng = Rng::new(seed);
    let mut seqs = Seqs::default();
    let mut out = Written::default();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut txn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            match common::connect(&url).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    out.failed_connects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        };
        txn += 1;
        let n = rng.range(1, max_rows);
        let rows = events(&mut rng, &mut seqs, n, 12, None, &format!("txn-{txn}"));
        let outcome: Result<Vec<Event>, (Vec<Event>, tokio_postgres::Error)> = async {
            let tx = c.transaction().await.map_err(|e| (Vec::new(), e))?;
            let events = try_insert_outbox(&tx, &rows)
                .await
                .map_err(|e| (Vec::new(), e))?;
            match tx.commit().await {
                Ok(()) => Ok(events),
                Err(e) => Err((events, e)),
            }
        }
        .await;
        match outcome {
            Ok(events) => out.committed.extend(events),
            Err((events, _)) => {
                out.in_doubt.extend(events);
                out.failed_txns += 1;
                client = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(10, 50))).await;
    }
    out
}

/// The events that really are committed: everything whose COMMIT succeeded (checked to be in
/// the table) plus those in doubt that the table holds. In commit order per key.
async fn committed_events(pg: &Pg, written: &Written) -> Vec<Event> {
    let ids: HashSet<String> = pg
        .client()
        .await
        .query("SELECT id::text FROM public.outbox", &[])
        .await
        .expect("read outbox ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&Event> = written
        .committed
        .iter()
        .filter(|e| !ids.contains(&e.id))
        .collect();
    assert!(
        lost.is_empty(),
        "PostgreSQL lost {} events whose COMMIT succeeded (harness problem), e.g. {:?}",
        lost.len(),
        lost.first()
    );
    let in_doubt: Vec<Event> = written
        .in_doubt
        .iter()
        .filter(|e| ids.contains(&e.id))
        .cloned()
        .collect();
    if !in_doubt.is_empty() {
        eprintln!(
            "{} events whose COMMIT reported an error were committed after all",
            in_doubt.len()
        );
    }
    let mut all = written.committed.clone();
    all.extend(in_doubt);
    all
}

/// Waits until every event of `expected` is in Kafka and the slot is confirmed past the WAL
/// position now, then checks the records against `expected` (`what` names the moment in a
/// failure). Returns how many records were read and the delivery, for further checks.
async fn assert_delivered(
    pg: &Pg,
    broker: &Broker,
    relay: &mut Relay,
    expected: &[Event],
    what: &str,
) -> (usize, Delivery) {
    let to = Expect {
        topics: &TOPICS,
        partitions: PARTITIONS,
        patience: PATIENCE,
    };
    common::assert_delivered(pg, broker, relay, to, expected, what).await
}

// ---------------------------------------------------------------------------------------------
// 1. Metrics after N events
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_and_probes_after_n_events() {
    let (pg, broker) = setup().await;
    let (mut relay, port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "after start").await;

    let mut client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected: Vec<Event> = Vec::new();
    let mut txns = 0;
    // Ten single-row transactions, then three multi-row ones across both topics.
    for i in 0..10 {
        let key = format!("order-{}", i % 3);
        expected
            .extend(insert_outbox(&client, &[seqs.event("order", &key, "Placed", "one")]).await);
        txns += 1;
    }
    for size in [20, 15, 5] {
        let rows: Vec<_> = (0..size)
            .map(|i| {
                let key = if i % 2 == 0 {
                    format!("order-{}", i % 3)
                } else {
                    format!("customer-{}", i % 4)
                };
                seqs.event(aggregate_of(&key), &key, "Batched", "multi")
            })
            .collect();
        let tx = client.transaction().await.unwrap();
        expected.extend(insert_outbox(&tx, &rows).await);
        tx.commit().await.unwrap();
        txns += 1;
    }
    let n = expected.len();
    let orders = expected
        .iter()
        .filter(|e| e.aggregatetype == "order")
        .count();
    let customers = n - orders;

    let (_, delivery) =
        assert_delivered(&pg, &broker, &mut relay, &expected, "relayed records").await;
    assert_eq!(delivery.duplicates, 0, "duplicates without any restart");

    // Idle now: the counters must add up and the gauges must show a settled pipeline. The
    // slot may still move (idle confirmation of a new WAL end), so it is read on either side
    // of each scrape and the metric must equal one of the two.
    let started = Instant::now();
    let deadline = started + SECONDS;
    loop {
        relay.assert_running();
        let before = pg.confirmed_flush_lsn(SLOT).await;
        let s = scrape(port).expect("GET /metrics");
        let after = pg.confirmed_flush_lsn(SLOT).await;
        let p = idle_metric_problems(&s, n, orders, customers, txns, [before, after]);
        if p.is_empty() {
            eprintln!(
                "metrics settled {:?} after delivery; confirmed_flush_lsn {}",
                started.elapsed(),
                lsn_text(metric(&s, "outbox_relay_confirmed_flush_lsn", &[]) as u64)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics once idle, after {SECONDS:?}:\n  {}\n--- /metrics ---\n{}",
            p.join("\n  "),
            s.text
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let (status, body) = http_get(port, "/healthz").expect("GET /healthz");
    assert_eq!(status, 200, "/healthz: {body:?}");
    let (status, body) = http_get(port, "/readyz").expect("GET /readyz");
    assert_eq!((status, body.trim()), (200, "ready"), "/readyz");
    let (status, _) = http_get(port, "/nope").expect("GET /nope");
    assert_eq!(status, 404, "unknown path");
}

/// What is wrong with the metrics of an idle relay that relayed `n` events (`orders` +
/// `customers`) in at least `txns` transactions; `slot` is the slot's confirmed_flush_lsn read
/// just before and just after the scrape.
fn idle_metric_problems(
    s: &Scrape,
    n: usize,
    orders: usize,
    customers: usize,
    txns: usize,
    slot: [Option<u64>; 2],
) -> Vec<String> {
    let mut p = Vec::new();
    let published = s.sum("outbox_relay_events_published_total", &[("table", TABLE)]);
    if published != n as f64 {
        p.push(format!(
            "events_published_total{{table=\"{TABLE}\"}} sums to {published}, expected {n}"
        ));
    }
    for (topic, count) in [(ORDER_TOPIC, orders), (CUSTOMER_TOPIC, customers)] {
        p.extend(expect(
            s,
            "outbox_relay_events_published_total",
            &[("table", TABLE), ("topic", topic)],
            count as f64,
        ));
    }
    let t = metric(s, "outbox_relay_transactions_total", &[]);
    if t.is_nan() || t < txns as f64 {
        p.push(format!(
            "transactions_total = {t}, expected >= {txns} committed transactions"
        ));
    }
    let received = metric(s, "outbox_relay_commit_to_receive_seconds_count", &[]);
    if received.is_nan() || received < txns as f64 {
        p.push(format!(
            "commit_to_receive_seconds_count = {received}, expected >= {txns} transactions"
        ));
    }
    p.extend(expect(s, "outbox_relay_leader", &[], 1.0));
    p.extend(expect(s, "outbox_relay_up", &[], 1.0));
    p.extend(expect(s, "outbox_relay_inflight_events", &[], 0.0));
    p.extend(expect(
        s,
        "outbox_relay_commit_to_ack_seconds_count",
        &[],
        n as f64,
    ));
    p.extend(expect(
        s,
        "outbox_relay_slot_wal_status",
        &[("status", "reserved")],
        1.0,
    ));
    let ones = s.sum("outbox_relay_slot_wal_status", &[]);
    if ones != 1.0 {
        p.push(format!(
            "slot_wal_status sums to {ones}: exactly one status should be 1"
        ));
    }
    // (publish_errors_total{topic,reason} has no series before the first error: the
    // Prometheus client only exports label sets that were used.)
    for name in [
        "outbox_relay_replication_lag_bytes",
        "outbox_relay_reconnects_total",
    ] {
        if !s.text.contains(name) {
            p.push(format!("{name} is not exported"));
        }
    }
    let confirmed = metric(s, "outbox_relay_confirmed_flush_lsn", &[]);
    let received = metric(s, "outbox_relay_received_lsn", &[]);
    if received.is_nan() || confirmed.is_nan() || received < confirmed {
        p.push(format!(
            "received_lsn {received} is below confirmed_flush_lsn {confirmed}"
        ));
    }
    if !slot.iter().flatten().any(|&lsn| lsn as f64 == confirmed) {
        p.push(format!(
            "confirmed_flush_lsn metric {confirmed} ({}) differs from the slot's \
             confirmed_flush_lsn (read before/after the scrape: {:?})",
            lsn_text(confirmed as u64),
            slot.map(|l| l.map(lsn_text))
        ));
    }
    p
}

// ---------------------------------------------------------------------------------------------
// 2. SIGTERM: exit 0, and a restart re-sends nothing
// ---------------------------------------------------------------------------------------------

/// SIGTERM; asserts exit 0 within the shutdown timeout (plus slack for the final status) and
/// that PostgreSQL released the slot. Returns how long the stop took.
async fn stop_gracefully(pg: &Pg, relay: &mut Relay, what: &str) -> Duration {
    relay.assert_running();
    let asked = Instant::now();
    relay.sigterm();
    let status = relay.wait_exit(SHUTDOWN_TIMEOUT + EXIT_SLACK).await;
    let took = asked.elapsed();
    let stderr = relay.stderr();
    let status = status.unwrap_or_else(|| {
        panic!(
            "{what}: still running {:?} after SIGTERM (shutdown_timeout_secs = {}); stderr:\n{stderr}",
            SHUTDOWN_TIMEOUT + EXIT_SLACK,
            SHUTDOWN_TIMEOUT.as_secs()
        )
    });
    assert!(
        status.success(),
        "{what}: exit {status} after SIGTERM, expected 0; stderr:\n{stderr}"
    );
    let released = wait_until(Duration::from_secs(10), || async {
        !pg.slot_active(SLOT).await
    })
    .await;
    assert!(released, "{what}: slot still active after a graceful stop");
    took
}

/// The records whose `id` header is in `ids`, for messages.
fn count_ids(recs: &[Rec], ids: &HashSet<&str>) -> usize {
    recs.iter()
        .filter(|r| {
            r.header_str("id")
                .is_some_and(|id| ids.contains(id.as_str()))
        })
        .count()
}

#[tokio::test]
async fn sigterm_while_writing_exits_0_and_a_restart_resends_nothing() {
    let (pg, broker) = setup().await;
    let (mut relay, mut port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "first relay").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(pg.url(), 0x5eed_0001, 40, stop.clone()));
    let mut stopped: Vec<Relay> = Vec::new();
    for (round, pause_ms) in [(1, 2500u64), (2, 1700), (3, 3100)] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let took = stop_gracefully(&pg, &mut relay, &format!("round {round}")).await;
        let stderr = relay.stderr();
        eprintln!(
            "round {round}: SIGTERM -> exit 0 in {took:?}; slot at {:?}; last line: {}",
            pg.confirmed_flush_lsn(SLOT).await.map(lsn_text),
            last_line(&stderr)
        );
        let (next, next_port) = start_relay(&pg, &broker);
        stopped.push(std::mem::replace(&mut relay, next));
        port = next_port;
        wait_ready(
            &mut relay,
            port,
            SECONDS,
            &format!("relay after round {round}"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.expect("writer task");
    assert_eq!(
        written.failed_txns, 0,
        "the writer failed without any fault"
    );
    let expected = written.committed;
    let (records, delivery) = assert_delivered(
        &pg,
        &broker,
        &mut relay,
        &expected,
        "after SIGTERM/restarts",
    )
    .await;
    eprintln!(
        "{} events, {records} records, {} duplicate(s) after 3 SIGTERM/restarts",
        expected.len(),
        delivery.duplicates
    );
    assert_eq!(
        delivery.duplicates, 0,
        "a restart after a graceful stop re-sent {} record(s)",
        delivery.duplicates
    );
    drop(stopped);
}

/// The hard case of a graceful stop: SIGTERM arrives while the relay is in the middle of one
/// large transaction (more records than the producer queue holds, so part of it is in Kafka
/// and the rest not yet read). Stopping there and confirming only up to the previous
/// transaction means the restart sends the whole transaction again.
#[tokio::test]
async fn sigterm_in_the_middle_of_a_large_transaction_resends_nothing() {
    const BIG: usize = 50_000;
    let (pg, broker) = setup().await;
    // A small producer queue makes the relay take the transaction in many rounds of
    // acknowledgements, so SIGTERM reliably lands inside it.
    let port = free_port();
    let slow = format!(
        "{}\n[kafka.properties]\n\"queue.buffering.max.messages\" = \"1000\"\n\"linger.ms\" = \"20\"\n",
        config(&pg, &broker, port)
    );
    let mut relay = Relay::start(&slow);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "first relay").await;

    let mut client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    expected.extend(
        insert_outbox(
            &client,
            &[seqs.event("order", "order-0", "Before", "small")],
        )
        .await,
    );
    wait_metrics(&mut relay, port, SECONDS, "the small event", |s| {
        expect(s, "outbox_relay_transactions_total", &[], 1.0)
            .into_iter()
            .collect()
    })
    .await;
    let rows: Vec<_> = (0..BIG)
        .map(|i| {
            let key = format!("order-{}", i % 16);
            seqs.event("order", &key, "Bulk", "big")
        })
        .collect();
    let tx = client.transaction().await.unwrap();
    let big = insert_outbox(&tx, &rows).await;
    tx.commit().await.unwrap();
    let big_ids: HashSet<&str> = big.iter().map(|e| e.id.as_str()).collect();

    // SIGTERM as soon as the relay is inside the big transaction: records in flight or
    // acknowledged (the first event of the run is the small one).
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_sigterm = loop {
        relay.assert_running();
        let (published, inflight) = scrape(port)
            .map(|s| {
                (
                    s.sum("outbox_relay_events_published_total", &[]),
                    metric(&s, "outbox_relay_inflight_events", &[]),
                )
            })
            .unwrap_or((0.0, 0.0));
        if published >= 2.0 || inflight > 0.0 {
            break (published as usize).saturating_sub(1);
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not start on the big transaction within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let took = stop_gracefully(&pg, &mut relay, "SIGTERM mid-transaction").await;
    let mut reader = broker.reader(&TOPICS);
    reader.settle(common::QUIET).await;
    let at_exit = count_ids(&reader.records(), &big_ids);
    let first_stderr = relay.stderr();
    // With at most 1,000 records queued in the producer, the relay had not read the whole
    // transaction when SIGTERM came unless nearly all of it was acknowledged by then.
    if at_sigterm + 1_000 >= BIG {
        eprintln!(
            "NOTE: SIGTERM came after nearly all of the transaction was acknowledged; the \
             mid-transaction stop was not exercised this time"
        );
    }
    eprintln!(
        "SIGTERM with {at_sigterm} of {BIG} records of the big transaction acknowledged; exit 0 in \
         {took:?} with {at_exit} in Kafka; slot at {:?}; last line: {}",
        pg.confirmed_flush_lsn(SLOT).await.map(lsn_text),
        last_line(&first_stderr)
    );
    for line in first_stderr
        .lines()
        .filter(|l| l.contains("SIGTERM") || l.contains("stopping") || l.contains("stopped"))
    {
        eprintln!("  first relay: {line}");
    }
    expected.extend(big.iter().cloned());

    let mut relay = Relay::start(&slow);
    tokio::time::sleep(Duration::from_millis(500)).await;
    expected
        .extend(insert_outbox(&client, &[seqs.event("order", "order-0", "After", "small")]).await);
    let (_, delivery) = assert_delivered(
        &pg,
        &broker,
        &mut relay,
        &expected,
        "after SIGTERM mid-transaction and restart",
    )
    .await;
    assert_eq!(
        delivery.duplicates,
        0,
        "a restart after a graceful stop re-sent {} record(s): SIGTERM came with {at_sigterm} \
         of the {BIG}-row transaction acknowledged and {at_exit} were there when the relay exited 0; \
         the first relay's last lines:\n{}",
        delivery.duplicates,
        first_stderr
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Kubernetes kills a pod 30 s after SIGTERM. With the broker frozen while records are in
/// flight and the producer queue full, the relay must still exit within shutdown_timeout_secs,
/// confirm nothing Kafka did not acknowledge, and deliver everything after a restart.
#[tokio::test]
async fn sigterm_with_the_broker_frozen_exits_within_the_shutdown_timeout() {
    let (pg, broker) = setup().await;
    let (mut relay, small, port) = start_with_small_queue(&pg, &broker, 100).await;
    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = insert_outbox(
        &client,
        &[seqs.event("order", "order-0", "Before", "small")],
    )
    .await;
    wait_metrics(&mut relay, port, SECONDS, "the first event", |s| {
        expect(s, "outbox_relay_transactions_total", &[], 1.0)
            .into_iter()
            .collect()
    })
    .await;

    broker.freeze();
    let before_backlog = pg.current_wal_lsn().await;
    for round in 0..10 {
        let rows: Vec<_> = (0..100)
            .map(|i| {
                seqs.event(
                    "order",
                    &format!("order-{}", (round + i) % 8),
                    "Frozen",
                    "x",
                )
            })
            .collect();
        expected.extend(insert_outbox(&client, &rows).await);
    }
    // Let the relay fill its queue and block on it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let took = stop_gracefully(&pg, &mut relay, "SIGTERM with the broker frozen").await;
    let confirmed = pg.confirmed_flush_lsn(SLOT).await.unwrap_or(0);
    assert!(
        confirmed <= before_backlog,
        "the slot was confirmed to {} past the backlog's start {} while Kafka acknowledged none of it",
        lsn_text(confirmed),
        lsn_text(before_backlog)
    );
    eprintln!("SIGTERM with the broker frozen: exit 0 in {took:?}");

    broker.thaw();
    let mut relay = Relay::start(&small);
    assert_delivered(
        &pg,
        &broker,
        &mut relay,
        &expected,
        "after a stop with the broker frozen and a restart",
    )
    .await;
}

/// Regression: a record waiting for room in a full producer queue was counted in flight; when
/// the PostgreSQL session failed during that wait, the count was never given back, so the
/// drain before the reconnect waited forever and nothing more reached Kafka. A frozen broker
/// keeps the relay in that wait; the walsender is killed under it, again and again.
#[tokio::test]
async fn a_session_lost_while_the_producer_queue_is_full_reconnects_and_delivers() {
    let (pg, broker) = setup().await;
    let (mut relay, _, _) = start_with_small_queue(&pg, &broker, 20).await;
    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    for round in 0..2 {
        broker.freeze();
        let rows: Vec<_> = (0..300)
            .map(|i| seqs.event("order", &format!("order-{}", i % 8), "Backlog", "x"))
            .collect();
        expected.extend(insert_outbox(&client, &rows).await);
        // The relay fills its 20-record queue and waits for room.
        tokio::time::sleep(Duration::from_secs(2)).await;
        client
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = '{SLOT}' AND active_pid IS NOT NULL"
            ))
            .await
            .expect("terminate the walsender");
        // The relay notices while still waiting on the queue: its status updates (every 10 s
        // while nothing is confirmed) fail once the kernel has seen the peer's reset, which
        // takes the second write after the kill.
        tokio::time::sleep(Duration::from_secs(25)).await;
        broker.thaw();
        assert_delivered(
            &pg,
            &broker,
            &mut relay,
            &expected,
            &format!("round {round}: walsender killed during a full-queue wait"),
        )
        .await;
        relay.assert_running();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL restarted (or down for a while) under a writer
// ---------------------------------------------------------------------------------------------

fn reconnects(s: &Scrape) -> f64 {
    metric(
        s,
        "outbox_relay_reconnects_total",
        &[("target", "postgres")],
    )
}

/// What happens to PostgreSQL mid-stream.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `pg_ctl restart -m <mode>`.
    Restart(&'static str),
    /// `pg_ctl stop -m immediate`, a few seconds down, then started again.
    Down,
}

/// A writer commits throughout; PostgreSQL suffers `fault`; the relay must keep running,
/// reconnect, become ready again, and deliver every committed event (duplicates allowed and
/// counted, per-key order after dedup).
async fn postgres_fault_under_a_writer(fault: Fault) {
    let (pg, broker) = setup().await;
    let (mut relay, port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "at start").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(pg.url(), 0x5eed_0003, 20, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = reconnects(&scrape(port).expect("GET /metrics"));
    let t = Instant::now();
    match fault {
        Fault::Restart(mode) => {
            pg.restart(mode).await;
            relay.assert_running();
        }
        Fault::Down => {
            pg.stop("immediate").await;
            let (status, body) = wait_http(&mut relay, port, "/readyz", SECONDS, |s, b| {
                s == 503 && b.contains("PostgreSQL")
            })
            .await
            .unwrap_or_else(|last| {
                panic!("PostgreSQL down: /readyz not 503 naming PostgreSQL; last answer: {last}")
            });
            eprintln!("PostgreSQL down: /readyz {status} {:?}", body.trim());
            assert_eq!(
                body.trim().lines().count(),
                1,
                "/readyz reason is not one line: {body:?}"
            );
            let (status, _) = http_get(port, "/healthz").expect("GET /healthz");
            assert_eq!(status, 200, "/healthz while PostgreSQL is down");
            wait_metrics(&mut relay, port, SECONDS, "PostgreSQL down", |s| {
                expect(s, "outbox_relay_leader", &[], 0.0)
                    .into_iter()
                    .collect()
            })
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            relay.assert_running();
            pg.start_again().await;
        }
    }
    let s = wait_metrics(
        &mut relay,
        port,
        SECONDS,
        &format!("after {fault:?}"),
        |s| {
            let mut p = Vec::new();
            if reconnects(s).is_nan() || reconnects(s) <= before {
                p.push(format!(
                    "reconnects_total{{target=\"postgres\"}} = {}, expected > {before}",
                    reconnects(s)
                ));
            }
            p.extend(expect(s, "outbox_relay_leader", &[], 1.0));
            p
        },
    )
    .await;
    wait_ready(&mut relay, port, SECONDS, &format!("after {fault:?}")).await;
    eprintln!(
        "{fault:?}: streaming again {:?} after the fault began; reconnects_total{{postgres}} {}",
        t.elapsed(),
        reconnects(&s)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::Relaxed);
    let written = writing.await.expect("writer task");
    relay.assert_running();
    let expected = committed_events(&pg, &written).await;
    eprintln!(
        "writer: {} events committed, {} transactions failed, {} failed connects",
        expected.len(),
        written.failed_txns,
        written.failed_connects
    );
    let (records, delivery) = assert_delivered(
        &pg,
        &broker,
        &mut relay,
        &expected,
        &format!("after {fault:?}"),
    )
    .await;
    eprintln!(
        "{fault:?}: {records} records for {} events, {} duplicate(s)",
        expected.len(),
        delivery.duplicates
    );
    relay.assert_running();
}

#[tokio::test]
async fn postgres_restart_fast_under_a_writer_loses_nothing() {
    postgres_fault_under_a_writer(Fault::Restart("fast")).await;
}

#[tokio::test]
async fn postgres_restart_immediate_under_a_writer_loses_nothing() {
    postgres_fault_under_a_writer(Fault::Restart("immediate")).await;
}

#[tokio::test]
async fn postgres_down_for_seconds_fails_readiness_then_recovers() {
    postgres_fault_under_a_writer(Fault::Down).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Two replicas on one slot
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let (pg, broker) = setup().await;
    let (mut first, first_port) = start_relay(&pg, &broker);
    first.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut first, first_port, SECONDS, "first replica").await;
    let (mut second, second_port) = start_relay(&pg, &broker);

    let standby = wait_http(&mut second, second_port, "/readyz", SECONDS, |s, b| {
        s == 503 && (b.contains("standby") || b.contains("in use"))
    })
    .await
    .unwrap_or_else(|last| {
        panic!("second replica: /readyz not 503 standby/in use; last answer: {last}")
    });
    eprintln!(
        "second replica: /readyz {} {:?}",
        standby.0,
        standby.1.trim()
    );
    wait_metrics(&mut second, second_port, SECONDS, "second replica", |s| {
        expect(s, "outbox_relay_leader", &[], 0.0)
            .into_iter()
            .chain(expect(s, "outbox_relay_up", &[], 1.0))
            .collect()
    })
    .await;
    wait_metrics(&mut first, first_port, SECONDS, "first replica", |s| {
        expect(s, "outbox_relay_leader", &[], 1.0)
            .into_iter()
            .collect()
    })
    .await;
    // Still standby a few retries later, and the first still leads.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, body) = http_get(second_port, "/readyz").expect("GET /readyz");
    assert_eq!(
        status, 503,
        "second replica became ready while the first streams: {body:?}"
    );
    wait_ready(
        &mut first,
        first_port,
        SECONDS,
        "first replica with a standby",
    )
    .await;

    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    for i in 0..20 {
        let key = format!("order-{}", i % 5);
        expected
            .extend(insert_outbox(&client, &[seqs.event("order", &key, "Early", "first")]).await);
    }
    let mut reader = broker.reader(&TOPICS);
    let early = expected.len();
    assert!(
        reader
            .wait_for(early, Duration::from_secs(60), || first.assert_running())
            .await,
        "the leader did not relay the first {early} events"
    );

    first.kill9();
    let killed = Instant::now();
    for i in 0..20 {
        let key = format!("customer-{}", i % 5);
        expected.extend(
            insert_outbox(
                &client,
                &[seqs.event("customer", &key, "Late", "after-kill")],
            )
            .await,
        );
    }
    wait_metrics(
        &mut second,
        second_port,
        SECONDS,
        "second replica after the kill",
        |s| {
            expect(s, "outbox_relay_leader", &[], 1.0)
                .into_iter()
                .collect()
        },
    )
    .await;
    wait_ready(
        &mut second,
        second_port,
        SECONDS,
        "second replica after the kill",
    )
    .await;
    eprintln!(
        "second replica leads {:?} after kill -9 of the first",
        killed.elapsed()
    );

    let (records, delivery) =
        assert_delivered(&pg, &broker, &mut second, &expected, "after failover").await;
    eprintln!(
        "{records} records for {} events: {} duplicate(s) after failover",
        expected.len(),
        delivery.duplicates
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Kafka unreachable
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unreachable_broker_keeps_the_slot_and_fails_readiness() {
    let (pg, mut broker) = setup().await;
    let (mut relay, port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let mut client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    for i in 0..10 {
        let key = format!("order-{}", i % 3);
        expected.extend(insert_outbox(&client, &[seqs.event("order", &key, "Acked", "")]).await);
    }
    assert_delivered(
        &pg,
        &broker,
        &mut relay,
        &expected,
        "before the broker died",
    )
    .await;
    wait_ready(&mut relay, port, SECONDS, "before the broker died").await;

    broker.kill();
    let killed = Instant::now();
    let (status, body) = wait_http(&mut relay, port, "/readyz", SECONDS, |s, b| {
        s == 503 && b.to_lowercase().contains("kafka")
    })
    .await
    .unwrap_or_else(|last| {
        panic!(
            "broker killed: /readyz not 503 naming Kafka within {SECONDS:?}; last answer: {last}"
        )
    });
    eprintln!(
        "broker killed: /readyz {status} {:?} after {:?}",
        body.trim(),
        killed.elapsed()
    );
    assert_eq!(
        body.trim().lines().count(),
        1,
        "reason is not one line: {body:?}"
    );

    // Writes while Kafka is gone. The bound for each transaction is the WAL insert position
    // just before its COMMIT: the slot may legitimately be confirmed up to where a commit
    // record starts (an idle keepalive), never past a commit whose records Kafka has not
    // acknowledged.
    let slot_before = pg.confirmed_flush_lsn(SLOT).await.expect("slot");
    let wal_before = pg.current_wal_lsn().await;
    let mut first_commit_bound = None;
    let mut unacked = 0;
    for i in 0..5 {
        let rows: Vec<_> = (0..5)
            .map(|j| {
                let key = format!("customer-{}", (i + j) % 4);
                seqs.event("customer", &key, "Unacked", "broker-down")
            })
            .collect();
        let tx = client.transaction().await.unwrap();
        unacked += insert_outbox(&tx, &rows).await.len();
        let bound: String = tx
            .query_one(
                "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        first_commit_bound.get_or_insert(bound.parse::<u64>().unwrap());
    }
    let first_commit_bound = first_commit_bound.unwrap();

    // Give it time to (wrongly) confirm: status updates go out at least every 10 s.
    let mut slot_now = slot_before;
    let watch_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch_until {
        relay.assert_running();
        slot_now = pg.confirmed_flush_lsn(SLOT).await.expect("slot");
        assert!(
            slot_now <= first_commit_bound,
            "with Kafka down the slot moved to {} past the first unacknowledged commit \
             (which starts after {}); before the writes it was at {} (WAL end {})",
            lsn_text(slot_now),
            lsn_text(first_commit_bound),
            lsn_text(slot_before),
            lsn_text(wal_before)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "slot {} -> {} while {unacked} events wait for Kafka (WAL end before the writes {}, \
         first commit after {})",
        lsn_text(slot_before),
        lsn_text(slot_now),
        lsn_text(wal_before),
        lsn_text(first_commit_bound)
    );
    // The relay still reads the stream and PostgreSQL is not waiting for it: it keeps its
    // session (a shutdown would make it let go, tests/never_block.rs).
    assert!(pg.slot_active(SLOT).await, "the relay let go of the slot");
    let s = scrape(port).expect("GET /metrics");
    let inflight = metric(&s, "outbox_relay_inflight_events", &[]);
    assert_eq!(
        inflight, unacked as f64,
        "inflight_events while Kafka is down"
    );
    let confirmed_metric = metric(&s, "outbox_relay_confirmed_flush_lsn", &[]) as u64;
    assert!(
        confirmed_metric <= first_commit_bound,
        "confirmed_flush_lsn metric {} past the first unacknowledged commit (after {})",
        lsn_text(confirmed_metric),
        lsn_text(first_commit_bound)
    );
    let (status, body) = http_get(port, "/readyz").expect("GET /readyz");
    assert!(
        status == 503 && body.to_lowercase().contains("kafka"),
        "/readyz while Kafka is still down: {status} {body:?}"
    );
    relay.assert_running();
}

/// PostgreSQL with the outbox table; Kafka behind a proxy that can cut it off.
async fn setup_behind_proxy() -> (Pg, Broker, common::CutProxy) {
    let pg = Pg::start();
    let (broker, proxy) = Broker::start_behind_proxy();
    pg.sql(OUTBOX_DDL).await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    (pg, broker, proxy)
}

/// Kafka cut off (network partition, broker state kept) while events are committed: they
/// are held, the slot stays; when Kafka is reachable again they are delivered, the slot moves
/// on and `/readyz` is 200 again.
#[tokio::test]
async fn events_held_while_kafka_is_cut_off_are_delivered_when_it_returns() {
    let (pg, broker, proxy) = setup_behind_proxy().await;
    let (mut relay, port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "at start").await;
    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    for i in 0..5 {
        let key = format!("order-{}", i % 4);
        expected.extend(insert_outbox(&client, &[seqs.event("order", &key, "Before", "up")]).await);
    }
    let mut reader = broker.reader(&TOPICS);
    assert!(
        reader
            .wait_for(5, Duration::from_secs(60), || relay.assert_running())
            .await,
        "the first 5 events were not relayed"
    );
    drop(reader);

    proxy.cut();
    let cut = Instant::now();
    let (status, body) = wait_http(&mut relay, port, "/readyz", SECONDS, |s, b| {
        s == 503 && b.to_lowercase().contains("kafka")
    })
    .await
    .unwrap_or_else(|last| panic!("Kafka cut off: /readyz not 503 naming Kafka; last: {last}"));
    eprintln!(
        "Kafka cut off: /readyz {status} {:?} after {:?}",
        body.trim(),
        cut.elapsed()
    );
    let held_at = pg.confirmed_flush_lsn(SLOT).await.expect("slot");
    let bound = pg.current_wal_lsn().await;
    for i in 0..20 {
        let key = format!("customer-{}", i % 4);
        expected
            .extend(insert_outbox(&client, &[seqs.event("customer", &key, "Held", "cut")]).await);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.assert_running();
    let slot_cut = pg.confirmed_flush_lsn(SLOT).await.expect("slot");
    assert!(
        slot_cut <= bound.max(held_at),
        "with Kafka cut off the slot moved from {} to {} past the WAL end before the held \
         writes ({})",
        lsn_text(held_at),
        lsn_text(slot_cut),
        lsn_text(bound)
    );

    proxy.restore();
    let back = Instant::now();
    let (records, delivery) = assert_delivered(
        &pg,
        &broker,
        &mut relay,
        &expected,
        "events held while Kafka was cut off",
    )
    .await;
    eprintln!(
        "Kafka back: {records} records for {} events ({} duplicates) {:?} after it returned; slot \
         {} -> {}",
        expected.len(),
        delivery.duplicates,
        back.elapsed(),
        lsn_text(slot_cut),
        pg.confirmed_flush_lsn(SLOT)
            .await
            .map_or("NULL".into(), lsn_text)
    );
    wait_ready(&mut relay, port, SECONDS, "after Kafka returned").await;
}

/// Kafka cut off while nothing is written, then reachable again: `/readyz` must return to 200
/// by itself (the monitor probes the broker every 5 s), not only once a record is delivered.
#[tokio::test]
async fn readiness_recovers_after_an_idle_kafka_outage() {
    let (pg, broker, proxy) = setup_behind_proxy().await;
    let (mut relay, port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "at start").await;

    proxy.cut();
    let (status, body) = wait_http(&mut relay, port, "/readyz", SECONDS, |s, b| {
        s == 503 && b.to_lowercase().contains("kafka")
    })
    .await
    .unwrap_or_else(|last| panic!("Kafka cut off: /readyz not 503 naming Kafka; last: {last}"));
    eprintln!("Kafka cut off: /readyz {status} {:?}", body.trim());
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    let back = Instant::now();
    // Kafka answers again (the harness' own client proves it) ...
    let mut reader = broker.reader(&TOPICS);
    reader.poll();
    drop(reader);
    // ... so within a few monitor rounds the relay must be ready again.
    let r = wait_http(&mut relay, port, "/readyz", SECONDS, |s, b| {
        s == 200 && b.trim() == "ready"
    })
    .await;
    match r {
        Ok(_) => eprintln!("ready again {:?} after Kafka returned", back.elapsed()),
        Err(last) => panic!(
            "Kafka reachable again for {SECONDS:?} (no events written meanwhile), but /readyz \
             still answers {last}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A lost slot
// ---------------------------------------------------------------------------------------------

async fn publication_comment(pg: &Pg) -> Option<String> {
    pg.client()
        .await
        .query_one(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication \
             WHERE pubname = 'outbox_relay'",
            &[],
        )
        .await
        .expect("read the publication comment")
        .get(0)
}

/// Does what a fatal slot message tells the operator (drop the slot, clear the creation
/// marker: whichever it names), restarts, and asserts that the relay comes up with a fresh
/// slot; otherwise panics with both messages.
async fn follow_recovery(pg: &Pg, broker: &Broker, message: &str, what: &str) {
    if message.contains("pg_drop_replication_slot") && pg.confirmed_flush_lsn(SLOT).await.is_some()
    {
        pg.sql(&format!("SELECT pg_drop_replication_slot('{SLOT}')"))
            .await;
    }
    if message.contains("COMMENT ON PUBLICATION") {
        pg.sql("COMMENT ON PUBLICATION outbox_relay IS NULL").await;
    }
    let (mut relay, _) = start_relay(pg, broker);
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(status) = relay.wait_exit(Duration::from_millis(200)).await {
            panic!(
                "following {what} does not recover: the restart exits ({status}) with:\n  {}\n\
                 {what}:\n  {message}",
                last_line(&relay.stderr())
            );
        }
        if pg.confirmed_flush_lsn(SLOT).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "following {what}: no fresh slot within {STARTUP:?}"
        );
    }
    eprintln!("following {what} recovered: a fresh slot was created");
}

#[tokio::test]
async fn a_slot_dropped_while_stopped_is_refused_until_the_marker_is_cleared() {
    let (pg, broker) = setup().await;
    let (mut relay, _) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_until(STARTUP, || async {
        publication_comment(&pg).await.is_some()
    })
    .await;
    let marker = publication_comment(&pg).await;
    assert!(
        marker
            .as_deref()
            .is_some_and(|m| m.contains("outbox-relay") && m.contains(SLOT)),
        "no creation marker on the publication: {marker:?}"
    );
    stop_gracefully(&pg, &mut relay, "first relay").await;
    pg.sql(&format!("SELECT pg_drop_replication_slot('{SLOT}')"))
        .await;

    let (mut relay, _) = start_relay(&pg, &broker);
    let line = relay
        .expect_fatal_exit(Duration::from_secs(30), "slot dropped")
        .await;
    let lower = line.to_lowercase();
    for (what, ok) in [
        (
            "the slot's name",
            line.contains(SLOT) && lower.contains("slot"),
        ),
        (
            "that events may have been lost",
            lower.contains("events") && lower.contains("may"),
        ),
        (
            "the recovery (COMMENT ON PUBLICATION)",
            line.contains("COMMENT ON PUBLICATION"),
        ),
    ] {
        assert!(ok, "the fatal line does not mention {what}: {line:?}");
    }
    assert_eq!(
        pg.confirmed_flush_lsn(SLOT).await,
        None,
        "a fresh slot was created over the lost one"
    );

    pg.sql("COMMENT ON PUBLICATION outbox_relay IS NULL").await;
    let (mut relay, _) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    // The marker follows the slot's creation by a statement.
    assert!(
        wait_until(STARTUP, || async {
            publication_comment(&pg).await.is_some()
        })
        .await,
        "the fresh slot's creation was not marked"
    );
    let client = pg.client().await;
    let expected = insert_outbox(
        &client,
        &[Seqs::default().event("order", "order-1", "Fresh", "new-slot")],
    )
    .await;
    assert_delivered(&pg, &broker, &mut relay, &expected, "on the fresh slot").await;
}

#[tokio::test]
async fn a_slot_dropped_at_runtime_stops_the_relay() {
    let (pg, broker) = setup().await;
    let (mut relay, port) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    wait_ready(&mut relay, port, SECONDS, "at start").await;

    // Terminate the walsender and drop the slot before the relay reconnects; if it got the
    // slot back first, do it again.
    let admin = pg.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        relay.assert_running();
        if let Some(pid) = pg.slot_active_pid(SLOT).await {
            let _ = admin
                .batch_execute(&format!("SELECT pg_terminate_backend({pid}, 5000)"))
                .await;
        }
        match admin
            .batch_execute(&format!("SELECT pg_drop_replication_slot('{SLOT}')"))
            .await
        {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "could not drop the slot within 20 s ({attempts} attempts): {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("slot dropped after {attempts} attempt(s)");

    let line = relay
        .expect_fatal_exit(SECONDS, "slot dropped at runtime")
        .await;
    assert!(
        line.contains(SLOT) && line.to_lowercase().contains("slot"),
        "the fatal line does not name the slot: {line:?}"
    );
    assert!(
        line.to_lowercase().contains("may"),
        "the fatal line does not say events may have been lost: {line:?}"
    );
    assert_eq!(
        pg.confirmed_flush_lsn(SLOT).await,
        None,
        "a fresh slot was created"
    );
    // The recovery it describes must work when followed: clear the marker if it says so,
    // restart, and a fresh slot must be created.
    follow_recovery(&pg, &broker, &line, "the runtime slot-loss message").await;
}

/// A slot invalidated while the relay was stopped (`max_slot_wal_keep_size` exceeded, so
/// `wal_status = lost`): the relay must refuse to start, say events may have been lost since
/// which LSN, and give a recovery that works when followed.
#[tokio::test]
async fn an_invalidated_slot_is_refused_with_the_lsn_and_a_working_recovery() {
    let (pg, broker) = setup().await;
    let (mut relay, _) = start_relay(&pg, &broker);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    stop_gracefully(&pg, &mut relay, "first relay").await;
    let confirmed = pg.confirmed_flush_lsn(SLOT).await.expect("slot");

    // Keep at most 1 MB of WAL for slots, write past a few segment switches, checkpoint.
    // (ALTER SYSTEM cannot share a multi-statement batch: it is one implicit transaction.)
    pg.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await;
    pg.sql("SELECT pg_reload_conf()").await;
    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let lost = wait_until(Duration::from_secs(30), || {
        let (client, pg) = (&client, &pg);
        let ev = seqs.event("order", "order-1", "Lost", "while-stopped");
        async move {
            insert_outbox(client, &[ev]).await;
            client
                .batch_execute("SELECT pg_switch_wal(); CHECKPOINT;")
                .await
                .expect("switch WAL and checkpoint");
            let status: Option<String> = client
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&SLOT],
                )
                .await
                .expect("read wal_status")
                .get(0);
            let _ = pg;
            status.as_deref() == Some("lost")
        }
    })
    .await;
    assert!(lost, "could not get the slot to wal_status = lost");

    let (mut relay, _) = start_relay(&pg, &broker);
    let line = relay.expect_fatal_exit(SECONDS, "slot lost").await;
    let lower = line.to_lowercase();
    for (what, ok) in [
        ("the slot's name", line.contains(SLOT)),
        ("that it is lost", lower.contains("lost")),
        ("that events may have been lost", lower.contains("may")),
        (
            "the LSN events may have been lost since",
            line.contains(&lsn_text(confirmed)),
        ),
    ] {
        assert!(ok, "the fatal line does not mention {what}: {line:?}");
    }

    follow_recovery(&pg, &broker, &line, "the lost-slot message").await;
}

/// A slot created before the publication (as when taking over another tool's slot with a
/// publication made at the switch) cannot decode through it: PostgreSQL says the publication
/// "does not exist". The relay must say that, and not that the slot is gone, since the slot is
/// there and its fix (re-publishing lost events) would be the wrong one.
#[tokio::test]
async fn a_slot_older_than_its_publication_stops_naming_the_publication() {
    let (pg, broker) = setup().await;
    pg.sql(&format!(
        "SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"
    ))
    .await;
    let before = pg.confirmed_flush_lsn(SLOT).await;
    assert!(before.is_some(), "the slot was not created");
    let client = pg.client().await;
    insert_outbox(
        &client,
        &[Seqs::default().event("order", "order-1", "Early", "before-publication")],
    )
    .await;
    pg.sql(&format!(
        "CREATE PUBLICATION outbox_relay FOR TABLE {TABLE}"
    ))
    .await;

    let (mut relay, _) = start_relay(&pg, &broker);
    let line = relay
        .expect_fatal_exit(SECONDS, "a slot older than its publication")
        .await;
    assert!(
        line.contains("publication outbox_relay") && line.contains(SLOT),
        "the fatal line does not name the publication and the slot: {line:?}"
    );
    assert!(
        !line.contains("no longer exists"),
        "the fatal line says the slot is gone, but it exists: {line:?}"
    );
    assert!(
        line.contains("new slot") && line.contains("before the slot"),
        "the fatal line does not give the fix: {line:?}"
    );
    assert_eq!(
        pg.confirmed_flush_lsn(SLOT).await,
        before,
        "the slot moved, though nothing was published"
    );
}
