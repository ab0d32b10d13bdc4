//! The reliability checker (issue #5): a writer that records the outcome of every
//! transaction it attempts, and a checker that reads every topic back and says what a
//! consumer would notice: events lost, per-key order broken, duplicates, and records of
//! transactions that never committed.
//!
//! The writer's ledger has three kinds of events:
//! - *committed*: COMMIT returned success;
//! - *maybe*: COMMIT itself failed (the connection went away), so the transaction may or may
//!   not have committed; the checker resolves each against the outbox table afterwards;
//! - *never committed*: rolled back on purpose, or failed before COMMIT.
//!
//! A record whose `id` is not a committed event is a *phantom*.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::{
    basic_config, check_delivery, connect, lsn_text, try_insert_outbox, wait_until, Broker, Event,
    NewEvent, Pg, Rec, Seqs, OUTBOX_DDL, QUIET, SLOT,
};

/// The topics of the two aggregate types the writer uses.
pub const TOPICS: [&str; 2] = ["outbox.event.order", "outbox.event.customer"];

/// How long the checker waits for the relay to drain after the faults (a generous bound on a
/// small loaded machine, not a performance assertion); `RELIABILITY_DRAIN_SECS` overrides.
pub fn drain_timeout() -> Duration {
    Duration::from_secs(env_number("RELIABILITY_DRAIN_SECS", 300))
}

/// `var` parsed as a number, else `default`.
pub fn env_number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The number of fault injections of a test: `RELIABILITY_RUNS` if set, else `default`.
pub fn runs(default: u64) -> usize {
    env_number("RELIABILITY_RUNS", default) as usize
}

/// The random seed of a test: `RELIABILITY_SEED` if set, else the clock. Printed, so a
/// failing run can be replayed.
pub fn seed() -> u64 {
    let seed = env_number("RELIABILITY_SEED", 0);
    let seed = if seed != 0 {
        seed
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    };
    println!("seed: RELIABILITY_SEED={seed}");
    seed
}

/// splitmix64: small, deterministic, good enough to pick sleeps and keys.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// A duration of `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// PostgreSQL with the outbox table and Kafka with `topics` of `partitions` partitions.
pub async fn setup(topics: &[&str], partitions: i32) -> (Pg, Broker) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    for topic in topics {
        broker.create_topic(topic, partitions).await;
    }
    (pg, broker)
}

/// The basic config with metrics on `metrics_port` and a short reconnect backoff, so the
/// relay comes back quickly after each fault.
pub fn relay_config(pg_url: &str, bootstrap: &str, metrics_port: u16) -> String {
    format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [relay]\nreconnect_max_backoff_secs = 2\n",
        basic_config(pg_url, bootstrap)
    )
}

/// `n` events over `keys` keys named `{aggregate}-{k}` (even `k`: the `order` aggregate,
/// odd: `customer`), unless `aggregate` fixes it; `note` goes into each payload.
pub fn events(
    rng: &mut Rng,
    seqs: &mut Seqs,
    n: u64,
    keys: u64,
    aggregate: Option<&str>,
    note: &str,
) -> Vec<NewEvent> {
    (0..n)
        .map(|_| {
            let k = rng.range(0, keys - 1);
            let agg = aggregate.unwrap_or(if k.is_multiple_of(2) {
                "order"
            } else {
                "customer"
            });
            seqs.event(agg, &format!("{agg}-{k}"), "Changed", note)
        })
        .collect()
}

/// A writer for tests without database faults: commits transactions of 1..=`max_rows`
/// events over 12 keys, pausing up to `max_pause_ms` between them, until `stop` is set.
/// Returns every committed event in commit order, and how many were committed before `mark`
/// was set (all of them if it never was).
pub async fn commit_until(
    url: String,
    mut rng: Rng,
    mut seqs: Seqs,
    max_rows: u64,
    max_pause_ms: u64,
    stop: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
) -> (Vec<Event>, usize) {
    let mut client = connect(&url).await.expect("writer connects");
    let mut committed = Vec::new();
    let mut before_mark = 0;
    let mut txn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        txn += 1;
        let n = rng.range(1, max_rows);
        let rows = events(&mut rng, &mut seqs, n, 12, None, &format!("txn-{txn}"));
        let tx = client.transaction().await.expect("begin");
        let events = super::insert_outbox(&tx, &rows).await;
        tx.commit().await.expect("commit");
        committed.extend(events);
        if !mark.load(Ordering::Relaxed) {
            before_mark = committed.len();
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, max_pause_ms))).await;
    }
    (committed, before_mark)
}

/// How a transaction ended, as the writer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    /// Rolled back on purpose.
    RolledBack,
    /// Failed before COMMIT: never committed. The connection should be replaced.
    Failed,
    /// COMMIT failed: unknown. The connection should be replaced.
    Maybe,
}

/// What a writer attempted and how each transaction ended.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub committed: Vec<Event>,
    pub maybe: Vec<Event>,
    pub never_committed: Vec<Event>,
    pub txns_committed: usize,
    pub txns_rolled_back: usize,
    pub txns_failed: usize,
    pub txns_maybe: usize,
    pub failed_connects: usize,
}

/// A ledger with its events in doubt looked up in the outbox table.
pub struct Resolved<'a> {
    /// Committed events, the in-doubt ones found in the table after them.
    pub committed: Vec<Event>,
    /// The ids of events that never committed, the in-doubt ones not in the table included.
    pub never: HashSet<&'a str>,
    /// How many in-doubt events had in fact committed.
    pub maybe_committed: usize,
}

impl Ledger {
    /// Sorts the events whose COMMIT was in doubt by whether `in_table` (see [`outbox_ids`])
    /// holds them.
    pub fn resolve(&self, in_table: &HashSet<String>) -> Resolved<'_> {
        let mut resolved = Resolved {
            committed: self.committed.clone(),
            never: self.never_committed.iter().map(|e| e.id.as_str()).collect(),
            maybe_committed: 0,
        };
        for e in &self.maybe {
            if in_table.contains(&e.id) {
                resolved.committed.push(e.clone());
                resolved.maybe_committed += 1;
            } else {
                resolved.never.insert(&e.id);
            }
        }
        resolved
    }

    /// Inserts `rows` in one transaction on `client` and commits it (or rolls it back if
    /// `rollback`); records and returns the outcome. Never panics on database errors.
    pub async fn transact(
        &mut self,
        client: &mut Client,
        rows: &[NewEvent],
        rollback: bool,
    ) -> Outcome {
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(_) => return self.record(Outcome::Failed, Vec::new()),
        };
        let events = match try_insert_outbox(&tx, rows).await {
            Ok(events) => events,
            Err(_) => return self.record(Outcome::Failed, Vec::new()),
        };
        if rollback {
            return match tx.rollback().await {
                Ok(()) => self.record(Outcome::RolledBack, events),
                // The server dropped the transaction with the connection: never committed.
                Err(_) => self.record(Outcome::Failed, events),
            };
        }
        match tx.commit().await {
            Ok(()) => self.record(Outcome::Committed, events),
            Err(_) => self.record(Outcome::Maybe, events),
        }
    }

    fn record(&mut self, outcome: Outcome, events: Vec<Event>) -> Outcome {
        match outcome {
            Outcome::Committed => {
                self.txns_committed += 1;
                self.committed.extend(events);
            }
            Outcome::Maybe => {
                self.txns_maybe += 1;
                self.maybe.extend(events);
            }
            Outcome::RolledBack => {
                self.txns_rolled_back += 1;
                self.never_committed.extend(events);
            }
            Outcome::Failed => {
                self.txns_failed += 1;
                self.never_committed.extend(events);
            }
        }
        outcome
    }

    /// Adds another ledger's entries (e.g. of a second writer).
    pub fn merge(&mut self, other: Ledger) {
        self.committed.extend(other.committed);
        self.maybe.extend(other.maybe);
        self.never_committed.extend(other.never_committed);
        self.txns_committed += other.txns_committed;
        self.txns_rolled_back += other.txns_rolled_back;
        self.txns_failed += other.txns_failed;
        self.txns_maybe += other.txns_maybe;
        self.failed_connects += other.failed_connects;
    }
}

/// A background writer on the test's runtime: transactions of 1..=`max_rows` events over 12
/// keys, one in ten rolled back on purpose, reconnecting after any error.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Ledger>,
}

impl Writer {
    pub fn spawn(url: String, seed: u64, max_rows: u64) -> Writer {
        Writer::spawn_for(url, seed, max_rows, None)
    }

    /// Like [`Writer::spawn`], every event of `aggregate` if given (so of one topic).
    pub fn spawn_for(
        url: String,
        seed: u64,
        max_rows: u64,
        aggregate: Option<&'static str>,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_until(url, seed, max_rows, aggregate, stop.clone()));
        Writer { stop, task }
    }

    /// Stops writing and returns the ledger.
    pub async fn finish(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task")
    }
}

async fn write_until(
    url: String,
    seed: u64,
    max_rows: u64,
    aggregate: Option<&str>,
    stop: Arc<AtomicBool>,
) -> Ledger {
    let mut rng = Rng::new(seed);
    let mut seqs = Seqs::default();
    let mut ledger = Ledger::default();
    let mut client: Option<Client> = None;
    let mut txn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            match connect(&url).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    ledger.failed_connects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        };
        txn += 1;
        let n = rng.range(1, max_rows);
        let rows = events(&mut rng, &mut seqs, n, 12, aggregate, &format!("txn-{txn}"));
        let rollback = rng.chance(10);
        if matches!(
            ledger.transact(c, &rows, rollback).await,
            Outcome::Failed | Outcome::Maybe
        ) {
            client = None;
        }
        tokio::time::sleep(rng.millis(5, 40)).await;
    }
    ledger
}

/// What the checker found. `lost`, `reordered` and `phantoms` must be 0; duplicates are
/// allowed after a fault (at-least-once) and counted.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub fault: String,
    pub runs: usize,
    /// Committed events (including those in doubt that the table shows committed).
    pub committed: usize,
    /// Events whose COMMIT failed, and how many of them turned out committed.
    pub maybe: usize,
    pub maybe_committed: usize,
    /// Events of transactions that never committed (rolled back or failed).
    pub never_committed: usize,
    /// Records read from Kafka, and distinct committed events among them.
    pub records: usize,
    pub delivered: usize,
    pub lost: usize,
    pub reordered: usize,
    pub duplicates: usize,
    pub phantoms: usize,
    /// Details, for the failure message: what `check_delivery` found (content, partition,
    /// headers) and whether the slot caught up.
    pub problems: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fault={} runs={} events={} maybe={}/{} never_committed={} records={} \
             lost={} reordered={} duplicates={} phantoms={}",
            self.fault,
            self.runs,
            self.committed,
            self.maybe_committed,
            self.maybe,
            self.never_committed,
            self.records,
            self.lost,
            self.reordered,
            self.duplicates,
            self.phantoms
        )
    }
}

impl Report {
    /// Whether nothing was lost, reordered or invented and every record is right.
    pub fn ok(&self) -> bool {
        self.lost + self.reordered + self.phantoms == 0 && self.problems.is_empty()
    }

    /// Panics with the summary and the first problems unless [`Report::ok`].
    pub fn assert_ok(&self) {
        if !self.ok() {
            let shown: Vec<&str> = self.problems.iter().take(25).map(String::as_str).collect();
            panic!(
                "{self}\n{} problem line(s):\n  {}",
                self.problems.len(),
                shown.join("\n  ")
            );
        }
    }
}

/// What the checker needs to know about the test.
pub struct Check<'a> {
    pub pg: &'a Pg,
    pub broker: &'a Broker,
    pub topics: &'a [&'a str],
    pub partitions: i32,
    pub fault: &'a str,
    pub runs: usize,
}

impl Check<'_> {
    /// Resolves the ledger's events in doubt, waits (up to [`drain_timeout`], calling `alive`
    /// in between so a dead relay fails fast) for the slot to be confirmed up to the WAL
    /// position after the last write, reads every topic back and compares. Prints the
    /// one-line summary.
    pub async fn run(&self, ledger: &Ledger, mut alive: impl FnMut()) -> Report {
        let mut report = Report {
            fault: self.fault.to_owned(),
            runs: self.runs,
            maybe: ledger.maybe.len(),
            ..Report::default()
        };
        let in_table = self.outbox_ids().await;
        let missing_in_table = ledger
            .committed
            .iter()
            .filter(|e| !in_table.contains(&e.id))
            .count();
        if missing_in_table > 0 {
            report.problems.push(format!(
                "{missing_in_table} events whose COMMIT succeeded are not in the outbox table \
                 (a harness problem, not the relay's)"
            ));
        }
        let Resolved {
            committed,
            never,
            maybe_committed,
        } = ledger.resolve(&in_table);
        report.maybe_committed = maybe_committed;
        report.committed = committed.len();
        report.never_committed = never.len();

        let target = self.pg.current_wal_lsn().await;
        let pg = self.pg;
        let confirmed = wait_until(drain_timeout(), || {
            alive();
            async move {
                pg.confirmed_flush_lsn(SLOT)
                    .await
                    .is_some_and(|l| l >= target)
            }
        })
        .await;
        if !confirmed {
            report.problems.push(format!(
                "the slot's confirmed_flush_lsn {} did not reach {} (the WAL end after the \
                 last write) within {:?}",
                pg.confirmed_flush_lsn(SLOT)
                    .await
                    .map_or("NULL".into(), lsn_text),
                lsn_text(target),
                drain_timeout()
            ));
        }
        let mut reader = self.broker.reader(self.topics);
        reader
            .wait_for(committed.len(), drain_timeout(), &mut alive)
            .await;
        // The count above includes duplicates: keep reading (up to a while) until every
        // committed id showed up, so a slow fetch is not mistaken for a loss.
        let more = std::time::Instant::now() + Duration::from_secs(30);
        let recs = loop {
            reader.settle(QUIET).await;
            let recs = reader.records();
            let ids: HashSet<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
            if committed.iter().all(|e| ids.contains(&e.id)) || std::time::Instant::now() >= more {
                break recs;
            }
            alive();
        };

        tally(&mut report, &recs, &committed, &never);
        // Content, headers and partitioning of every record (and the same loss/order
        // findings again, as lines naming the records).
        let delivery = check_delivery(&recs, &committed, self.partitions);
        if report.lost + report.reordered + report.phantoms > 0 || !delivery.problems.is_empty() {
            report.problems.extend(delivery.problems);
        }
        println!("{report}");
        report
    }

    async fn outbox_ids(&self) -> HashSet<String> {
        outbox_ids(self.pg).await
    }
}

/// The ids in `public.outbox` now: resolves events whose COMMIT was in doubt.
pub async fn outbox_ids(pg: &Pg) -> HashSet<String> {
    pg.client()
        .await
        .query("SELECT id::text FROM public.outbox", &[])
        .await
        .expect("read the outbox table's ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Counts records, distinct deliveries, duplicates, phantoms, per-key order violations (over
/// first deliveries in offset order) and lost events; `recs` in (topic, partition, offset)
/// order, `never` the ids of events that never committed (to explain phantoms).
pub fn tally(report: &mut Report, recs: &[Rec], committed: &[Event], never: &HashSet<&str>) {
    let seq_of: HashMap<&str, (&str, i64)> = committed
        .iter()
        .map(|e| (e.id.as_str(), (e.key.as_str(), e.seq)))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last: HashMap<(&str, &str), i64> = HashMap::new();
    report.records = recs.len();
    for r in recs {
        let id = r.header_str("id").unwrap_or_default();
        let Some(&(key, seq)) = seq_of.get(id.as_str()) else {
            report.phantoms += 1;
            if report.phantoms <= 5 {
                let why = if never.contains(id.as_str()) {
                    "its transaction never committed"
                } else {
                    "no writer wrote it"
                };
                report.problems.push(format!(
                    "phantom {}[{}]@{} id={id:?}: {why}",
                    r.topic, r.partition, r.offset
                ));
            }
            continue;
        };
        if !seen.insert(id) {
            report.duplicates += 1;
            continue;
        }
        let prev = last.entry((r.topic.as_str(), key)).or_insert(0);
        if seq <= *prev {
            report.reordered += 1;
        } else {
            *prev = seq;
        }
    }
    report.delivered = seen.len();
    report.lost = committed.len() - seen.len();
}
