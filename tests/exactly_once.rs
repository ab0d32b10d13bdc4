//! Exactly-once mode (`[kafka] delivery = "exactly-once"`, issue #6 item 1), on librdkafka's
//! mock cluster (`rdkafka::mocking::MockCluster`, three brokers in the test process): Tansu,
//! the real broker of the other tests, has no transactions.
//!
//! **What the mock lacks, and how these tests make up for it.** The mock cluster implements
//! the transactional *protocol* (InitProducerId with epoch bumps, so fencing works; producer
//! epochs checked on every transactional Produce; AddPartitionsToTxn, EndTxn) but not its
//! *effect on readers*: EndTxn writes no commit or abort markers, the last stable offset it
//! reports is the high watermark and it returns no aborted-transaction list, so a consumer
//! with `isolation.level=read_committed` sees every record ever appended, aborted ones
//! included (librdkafka 2.12, `rdkafka_mock_handlers.c`). The tests therefore read with
//! `read_committed` (as a real consumer would) and then apply read_committed themselves:
//!
//! - Each relay process is one producer; the test notes both topics' end offsets when it
//!   kills one (and at the end), so it knows which offsets each process wrote.
//! - A Kafka transaction's last record is its position record, which says how many records
//!   the transaction wrote (`records`), and the relay writes it only once all of them were
//!   acknowledged. Within one process the transactions run one after another, so the
//!   records of a process's n-th committed transaction are the `records` ones after those of
//!   its earlier transactions, in the one partition the events go to.
//! - What a process appended after its last position record is its transaction that never
//!   committed (a real broker aborts it when the next process calls `init_transactions`);
//!   those records are counted as `aborted` and left out.
//!
//! So the events go to one topic with one partition (`outbox.event.order`), and a position
//! record that claims records the process did not write, or a committed transaction in the
//! middle of a process's range that the count does not explain, shows up as lost, duplicated
//! or reordered events in the checker of `tests/common/checker.rs`. A relay that confirmed the
//! slot past events of a transaction that never committed shows up as lost events: the next
//! process starts after them, and their only copies are aborted.
//!
//! Timeouts are generous bounds on a small shared machine, never performance assertions.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::checker::{outbox_ids, runs, seed, tally, Ledger, Report, Rng, Writer};
use common::{
    basic_config, check_delivery, insert_outbox, last_line, lsn_text, Event, Pg, Reader, Rec,
    Relay, Seqs, OUTBOX_DDL, SLOT,
};
use outbox_relay::config::DEFAULT_OFFSETS_TOPIC;
use outbox_relay::kafka::position::{Position, FIRST_WINDOW};
use outbox_relay::lsn::Lsn;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const TOPIC: &str = "outbox.event.order";
const OFFSETS: &str = DEFAULT_OFFSETS_TOPIC;
/// The position records' key: the default transactional id, `outbox-relay-{slot}`.
const KEY: &str = "outbox-relay-outbox_relay";
/// The key of another relay's position records, in a test where two share the offsets topic.
const OTHER_RELAY: &str = "outbox-relay-elsewhere";
const STARTUP: Duration = Duration::from_secs(60);
/// For everything written to be committed and confirmed.
const SETTLE: Duration = Duration::from_secs(180);

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// Where both topics ended when a relay process stopped writing.
#[derive(Clone, Copy, Debug, Default)]
struct Mark {
    data: i64,
    offsets: i64,
}

struct Rig {
    pg: Pg,
    cluster: Cluster,
    config: String,
    /// One per relay process that is done writing, in order.
    marks: Vec<Mark>,
    watermarks: BaseConsumer,
}

/// PostgreSQL with the outbox table, a mock cluster of three brokers with the events topic
/// and the offsets topic (one partition each), and the relay's config in exactly-once mode
/// with `kafka_lines` added to `[kafka]`.
async fn rig(kafka_lines: &str) -> Rig {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let cluster = MockCluster::new(3).expect("start librdkafka's mock cluster");
    for topic in [TOPIC, OFFSETS] {
        cluster
            .create_topic(topic, 1, 3)
            .unwrap_or_else(|e| panic!("create {topic}: {e}"));
    }
    let config = format!(
        "{}delivery = \"exactly-once\"\n{kafka_lines}\n[relay]\nreconnect_max_backoff_secs = 2\n",
        basic_config(&pg.url(), &cluster.bootstrap_servers())
    );
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .expect("create a watermark client");
    Rig {
        pg,
        cluster,
        config,
        marks: Vec::new(),
        watermarks,
    }
}

impl Rig {
    /// Starts a relay process and waits for the slot to exist.
    async fn start(&self) -> Relay {
        let mut relay = Relay::start(&self.config);
        relay.wait_for_slot(&self.pg, SLOT, STARTUP).await;
        relay
    }

    fn end_of(&self, topic: &str) -> i64 {
        self.watermarks
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("watermarks of {topic}: {e}"))
            .1
    }

    /// The process that wrote last is done: note where both topics end.
    fn mark(&mut self) {
        let mark = Mark {
            data: self.end_of(TOPIC),
            offsets: self.end_of(OFFSETS),
        };
        self.marks.push(mark);
    }

    /// Both topics up to the last mark, as a `read_committed` consumer reads them.
    async fn read(&self) -> (Vec<Rec>, Vec<Rec>) {
        let end = self.marks.last().copied().unwrap_or_default();
        let mut reader =
            Reader::read_committed(&self.cluster.bootstrap_servers(), &[TOPIC, OFFSETS]);
        let n = (end.data + end.offsets) as usize;
        assert!(
            reader.wait_for(n, SETTLE, || {}).await,
            "read {} of {n} records",
            reader.len()
        );
        let (data, mut offsets): (Vec<Rec>, Vec<Rec>) =
            reader.records().into_iter().partition(|r| r.topic == TOPIC);
        // Another relay's transactions wrote no events of ours.
        offsets.retain(|r| r.key_str().as_deref() != Some(OTHER_RELAY));
        (data, offsets)
    }

    /// Waits (with `relay` alive) until the slot is confirmed up to the WAL end, marks the
    /// end of `relay`'s records and checks what a read_committed consumer would see.
    async fn settle(
        &mut self,
        fault: &str,
        runs: usize,
        ledger: &Ledger,
        relay: &mut Relay,
    ) -> Audit {
        let target = self.pg.current_wal_lsn().await;
        let started = Instant::now();
        loop {
            relay.assert_running();
            let confirmed = self.pg.confirmed_flush_lsn(SLOT).await;
            if confirmed.is_some_and(|c| c >= target) {
                break;
            }
            assert!(
                started.elapsed() < SETTLE,
                "{fault}: confirmed_flush_lsn {} did not reach {} within {SETTLE:?}",
                confirmed.map_or("NULL".into(), lsn_text),
                lsn_text(target)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.mark();
        self.audit(fault, runs, ledger).await
    }

    async fn audit(&self, fault: &str, runs: usize, ledger: &Ledger) -> Audit {
        let (data, offsets) = self.read().await;
        let view = committed_view(&data, &offsets, &self.marks);
        let in_table = outbox_ids(&self.pg).await;
        let mut committed = ledger.committed.clone();
        let mut never: HashSet<&str> = ledger
            .never_committed
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        for e in &ledger.maybe {
            if in_table.contains(&e.id) {
                committed.push(e.clone());
            } else {
                never.insert(&e.id);
            }
        }
        let mut report = Report {
            fault: fault.into(),
            runs,
            committed: committed.len(),
            maybe: ledger.maybe.len(),
            never_committed: never.len(),
            problems: view.problems.clone(),
            ..Report::default()
        };
        tally(&mut report, &view.committed, &committed, &never);
        let delivery = check_delivery(&view.committed, &committed, 1);
        if !report.ok() || delivery.duplicates > 0 {
            report.problems.extend(delivery.problems);
        }
        println!(
            "{report} kafka_transactions={} aborted_records={} ranges={}",
            view.transactions,
            view.aborted,
            self.marks.len()
        );
        Audit {
            report,
            positions: offsets.iter().map(position).collect(),
        }
    }
}

/// The checker's findings and every position record.
struct Audit {
    report: Report,
    positions: Vec<Position>,
}

impl Audit {
    /// Nothing lost, reordered, invented, and no duplicates either.
    fn assert_exactly_once(&self) {
        self.report.assert_ok();
        assert_eq!(self.report.duplicates, 0, "{}", self.report);
    }
}

fn position(r: &Rec) -> Position {
    assert_eq!(
        r.key_str().as_deref(),
        Some(KEY),
        "position record key: the transactional id"
    );
    Position::from_json(r.value.as_deref().unwrap_or_default())
        .unwrap_or_else(|e| panic!("position record at {}: {e}", r.offset))
}

/// What a read_committed consumer of a broker with transactions would see (see the module
/// docs for why this holds on the mock cluster).
struct View {
    committed: Vec<Rec>,
    transactions: usize,
    aborted: usize,
    problems: Vec<String>,
}

fn committed_view(data: &[Rec], offsets: &[Rec], marks: &[Mark]) -> View {
    let mut view = View {
        committed: Vec::new(),
        transactions: 0,
        aborted: 0,
        problems: Vec::new(),
    };
    for (i, r) in data.iter().enumerate() {
        assert_eq!(
            r.offset, i as i64,
            "the mock's offsets have no gaps (no markers)"
        );
    }
    let mut from = Mark::default();
    for (process, mark) in marks.iter().enumerate() {
        let mut next = from.data;
        for record in offsets
            .iter()
            .filter(|r| r.offset >= from.offsets && r.offset < mark.offsets)
        {
            let p = position(record);
            let end = next + p.records as i64;
            if end > mark.data {
                view.problems.push(format!(
                    "process {process}: the position at offset {} claims {} records, but the process wrote only {} after its earlier transactions",
                    record.offset,
                    p.records,
                    mark.data - next
                ));
                break;
            }
            view.committed
                .extend_from_slice(&data[next as usize..end as usize]);
            view.transactions += 1;
            next = end;
        }
        view.aborted += (mark.data - next).max(0) as usize;
        from = *mark;
    }
    view
}

/// `n` events of the `order` aggregate over `keys` keys, next in `seqs`.
fn orders(seqs: &mut Seqs, n: usize, keys: usize, note: &str) -> Vec<common::NewEvent> {
    (0..n)
        .map(|i| {
            let key = format!("order-{}", i % keys);
            seqs.event("order", &key, "Changed", note)
        })
        .collect()
}

/// Commits `rows` in one transaction; returns the events.
async fn commit(pg: &Pg, rows: &[common::NewEvent]) -> Vec<Event> {
    let mut client = pg.client().await;
    let tx = client.transaction().await.expect("begin");
    let events = insert_outbox(&tx, rows).await;
    tx.commit().await.expect("commit");
    events
}

/// A rig and a relay that was handed ten events (committed, in the ledger).
async fn running_with_ten_events(kafka_lines: &str) -> (Rig, Relay, Seqs, Ledger) {
    let rig = rig(kafka_lines).await;
    let relay = rig.start().await;
    let mut seqs = Seqs::default();
    let mut ledger = Ledger::default();
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 10, 4, "before")).await);
    (rig, relay, seqs, ledger)
}

/// Waits (up to 120 s) until the relay logs a line that is `wanted`, or exits; returns that
/// line, or `exited <status>: <its last line>`.
async fn first_said(relay: &mut Relay, wanted: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = relay.stderr();
        if let Some(status) = relay.try_exit() {
            return format!("exited {status}: {}", last_line(&text));
        }
        if let Some(line) = text.lines().find(|l| wanted(l)) {
            return line.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "nothing said: {}",
            last_line(&text)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn signal(relay: &Relay, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &relay.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {}", relay.pid());
}

#[tokio::test]
async fn events_are_read_once_with_their_position_and_a_restart_resends_nothing() {
    let mut rig = rig("").await;
    let mut relay = rig.start().await;
    let mut seqs = Seqs::default();
    let mut ledger = Ledger::default();
    for (i, n) in [1, 5, 3, 40].into_iter().enumerate() {
        ledger
            .committed
            .extend(commit(&rig.pg, &orders(&mut seqs, n, 4, &format!("t{i}"))).await);
    }
    // Rolled back: never in the WAL as committed.
    {
        let mut client = rig.pg.client().await;
        let tx = client.transaction().await.expect("begin");
        ledger
            .never_committed
            .extend(insert_outbox(&tx, &orders(&mut seqs, 2, 4, "rolled back")).await);
        tx.rollback().await.expect("rollback");
    }
    let audit = rig.settle("basic", 1, &ledger, &mut relay).await;
    audit.assert_exactly_once();
    let last = audit.positions.last().expect("a position record");
    assert!(last.complete, "{last:?}");
    assert!(
        audit.positions.iter().map(|p| p.records).sum::<u64>() == 49,
        "positions count every record: {:?}",
        audit.positions
    );

    // A graceful stop commits what is open; the next process resends nothing.
    signal(&relay, "-TERM");
    let status = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop: {status:?}\n{}",
        relay.stderr()
    );
    rig.mark();
    let mut relay = rig.start().await;
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 3, 4, "after restart")).await);
    let audit = rig.settle("basic-restart", 2, &ledger, &mut relay).await;
    audit.assert_exactly_once();
    assert_eq!(audit.report.records, 52, "{}", audit.report);
}

#[tokio::test]
async fn kill_9_under_a_writer_is_exactly_once() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    // Small Kafka transactions, so the writer's transactions (up to 20 rows) are split too.
    let mut rig = rig("transaction_max_events = 7\n").await;
    let mut relay = rig.start().await;
    let writer = Writer::spawn_for(rig.pg.url(), seed, 20, Some("order"));
    let runs = runs(6);
    for _ in 0..runs {
        tokio::time::sleep(rng.millis(300, 3000)).await;
        relay.assert_running();
        relay.kill9();
        rig.mark();
        relay = Relay::start(&rig.config);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    let audit = rig
        .settle("kill9-exactly-once", runs, &ledger, &mut relay)
        .await;
    audit.assert_exactly_once();
    assert!(audit.report.committed > 0, "{}", audit.report);
}

#[tokio::test]
async fn a_large_transaction_is_split_and_resumed_mid_way_after_kill_9() {
    // The mock keeps at most 5 MB per partition (older records are dropped), so 25,000
    // rows of about 150 bytes rather than 50,000.
    const ROWS: usize = 25_000;
    const PER_TXN: u64 = 1_000;
    let mut rig = rig(&format!("transaction_max_events = {PER_TXN}\n")).await;
    let mut relay = rig.start().await;
    let mut seqs = Seqs::default();
    let mut ledger = Ledger::default();
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, ROWS, 16, "large")).await);
    // Each Kafka transaction ends with one position record.
    let started = Instant::now();
    // Two parts committed and records of the third appended, not yet committed.
    while rig.end_of(OFFSETS) < 2 || rig.end_of(TOPIC) <= rig.end_of(OFFSETS) * PER_TXN as i64 {
        relay.assert_running();
        assert!(
            started.elapsed() < SETTLE,
            "no split commit within {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    relay.kill9();
    rig.mark();
    let parts_before_kill = rig.marks[0].offsets;
    assert!(
        parts_before_kill < (ROWS as u64 / PER_TXN) as i64,
        "the kill came after the whole transaction was committed"
    );
    let mut relay = rig.start().await;
    let audit = rig.settle("large-txn-kill9", 1, &ledger, &mut relay).await;
    audit.assert_exactly_once();
    let parts: Vec<&Position> = audit.positions.iter().filter(|p| !p.complete).collect();
    assert!(
        parts.len() >= (ROWS as u64 / PER_TXN - 1) as usize,
        "{parts:?}"
    );
    assert!(audit.positions.iter().all(|p| p.records <= PER_TXN));
    let first = parts.first().expect("a split");
    assert!(
        parts.iter().all(|p| p.commit_lsn == first.commit_lsn),
        "one PostgreSQL transaction"
    );
    assert!(
        relay.stderr().contains("complete=false"),
        "the second process resumed inside the transaction"
    );
    println!(
        "large transaction: {ROWS} rows in {} Kafka transactions, killed after {parts_before_kill}",
        audit.positions.len()
    );
}

#[tokio::test]
async fn a_fenced_producer_stops_with_one_line_and_a_restart_is_exactly_once() {
    let (mut rig, mut a, mut seqs, mut ledger) = running_with_ten_events("").await;
    rig.settle("before-fence", 1, &ledger, &mut a)
        .await
        .assert_exactly_once();
    // What a broker answers a producer whose transactional id a newer producer registered.
    rig.cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let before = rig.pg.current_wal_lsn().await;
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 10, 4, "fenced")).await);
    let status = a.wait_exit(Duration::from_secs(60)).await;
    let confirmed = rig.pg.confirmed_flush_lsn(SLOT).await.unwrap_or_default();
    assert!(
        confirmed <= before,
        "the slot was confirmed to {} past events that never committed (from {})",
        lsn_text(confirmed),
        lsn_text(before)
    );

    let said = last_line(&a.stderr());
    println!("fenced relay: {status:?}: {said}");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the fenced relay still runs: {said}"
    );
    assert!(
        said.contains("fenced") && said.contains("transactional_id"),
        "{said}"
    );
    rig.mark();
    let mut b = rig.start().await;
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 10, 4, "after")).await);
    rig.settle("fenced", 1, &ledger, &mut b)
        .await
        .assert_exactly_once();
}

/// A broker that lacks the transaction APIs (here: the mock with AddPartitionsToTxn and
/// EndTxn taken away) gives librdkafka no error to report: the records simply never leave.
/// The relay cannot tell that from a slow broker, so it aborts after 30 s, says why in one
/// line and tries again; nothing is committed and the slot does not move.
#[tokio::test]
async fn a_broker_without_transactions_is_named_and_nothing_is_committed() {
    let rig = rig("").await;
    for api in [RDKafkaApiKey::AddPartitionsToTxn, RDKafkaApiKey::EndTxn] {
        rig.cluster
            .apiversion(api, None, None)
            .unwrap_or_else(|e| panic!("take {api:?} away: {e}"));
    }
    let mut relay = rig.start().await;
    let start = rig.pg.confirmed_flush_lsn(SLOT).await;
    commit(&rig.pg, &orders(&mut Seqs::default(), 3, 2, "x")).await;
    let said = first_said(&mut relay, |l| {
        l.contains("WARN") && l.contains("transaction support")
    })
    .await;
    println!("without transactions: {said}");
    assert!(!said.starts_with("exited"), "{said}");
    assert_eq!(rig.end_of(OFFSETS), 0, "no position written");
    assert_eq!(
        rig.pg.confirmed_flush_lsn(SLOT).await,
        start,
        "the slot stays"
    );
}

#[tokio::test]
async fn a_position_past_the_servers_wal_stops_the_relay_instead_of_skipping() {
    let rig = rig("").await;
    // What the offsets topic holds after the database was restored to an earlier point (or
    // the relay pointed at another database): a position far ahead of this WAL.
    let stale = Position {
        commit_lsn: Lsn(0xFF_0000_0000),
        events: 3,
        complete: true,
        confirm_lsn: Lsn(0xFF_0000_0100),
        records: 4,
    };
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", rig.cluster.bootstrap_servers())
        .create()
        .expect("create a producer");
    let value = stale.to_json();
    producer
        .send(BaseRecord::to(OFFSETS).key(KEY).payload(&value))
        .map_err(|(e, _)| e)
        .expect("queue the stale position");
    producer
        .flush(Duration::from_secs(10))
        .expect("write the stale position");
    let mut relay = Relay::start(&rig.config);
    let status = relay.wait_exit(Duration::from_secs(120)).await;
    let line = last_line(&relay.stderr());
    println!("stale position: {line}");
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {line}");
    assert!(
        line.contains("past this server's WAL") && line.contains("transactional_id"),
        "{line}"
    );
    // Nothing was confirmed on the stale position's word.
    let confirmed = rig.pg.confirmed_flush_lsn(SLOT).await.unwrap_or(0);
    assert!(
        confirmed < 0xFF_0000_0000,
        "slot confirmed to {confirmed:X}"
    );
}

/// A restart reads the offsets topic back from its end, so its cost follows what was written
/// since the relay's last commit, not the topic's history (issue: the active segment of the
/// compacted topic is never compacted until it rolls, and a relay that read it from the
/// beginning slowed down with every transaction).
///
/// A first relay commits two PostgreSQL transactions as two Kafka transactions (positions
/// `older` and `newest`) and stops. Then the topic gets a history of 100,000 records: older
/// positions of ours, a copy of `newest` (so the newest is 1,001 records back) and 1,000
/// positions of another relay sharing the topic, far past this database's WAL. A second
/// relay with the same transactional id then streams from a slot created before both
/// transactions, so PostgreSQL sends them again: it must skip both (resuming after `newest`,
/// found by reading back through the other relay's records) and publish only a third
/// transaction. An older position would send the second transaction again (duplicates), the
/// other relay's would stop it. The reader's log line says how many records it read: about
/// twice the distance back, a small part of the history (asserted on counts, not on time).
///
/// On a broker with transactions each Kafka transaction also adds a commit marker to the
/// topic, an offset of its own that a `read_committed` reader skips, and aborted positions
/// are skipped as well; librdkafka's mock writes neither (see the module docs), so here the
/// history's offsets are all records.
#[tokio::test]
async fn a_restart_after_100k_position_records_reads_back_only_the_newest() {
    const HISTORY: usize = 100_000;
    const OTHERS: usize = 1_000;
    const LAGGING: &str = "lagging";
    let mut rig = rig(&format!("transactional_id = \"{KEY}\"\n")).await;
    let mut first = rig.start().await;
    // Created after the first relay made the publication, before any event.
    rig.pg
        .sql(&format!(
            "SELECT pg_create_logical_replication_slot('{LAGGING}', 'pgoutput')"
        ))
        .await;
    let mut seqs = Seqs::default();
    let mut ledger = Ledger::default();
    for note in ["older", "newest"] {
        // Confirmed before the next one, so each is a Kafka transaction of its own.
        ledger
            .committed
            .extend(commit(&rig.pg, &orders(&mut seqs, 5, 2, note)).await);
        let target = rig.pg.current_wal_lsn().await;
        let (reached, _) = rig.pg.wait_confirmed(SLOT, target, SETTLE).await;
        first.assert_running();
        assert!(reached, "{note}: the slot did not catch up");
    }
    signal(&first, "-TERM");
    let status = first.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    rig.mark();
    let (_, offsets) = rig.read().await;
    let positions: Vec<Position> = offsets.iter().map(position).collect();
    let newest = *positions.last().expect("the first relay's positions");
    let older = *positions
        .iter()
        .find(|p| p.commit_lsn < newest.commit_lsn)
        .unwrap_or_else(|| panic!("two Kafka transactions: {positions:?}"));
    assert!(newest.complete && older.complete, "{positions:?}");

    // The history, as records of no events (`records: 0`) so that the audit counts none.
    let history = |p: Position| Position { records: 0, ..p }.to_json();
    let elsewhere = Position {
        commit_lsn: Lsn(0xFF_0000_0000),
        events: 1,
        complete: true,
        confirm_lsn: Lsn(0xFF_0000_0100),
        records: 1,
    }
    .to_json();
    let mut writes = vec![(KEY, history(older)); HISTORY - OTHERS - 1];
    writes.push((KEY, history(newest)));
    writes.extend(std::iter::repeat_n((OTHER_RELAY, elsewhere), OTHERS));
    let before = rig.end_of(OFFSETS);
    write_plainly(&rig.cluster, OFFSETS, &writes);
    let newest_at = before + (HISTORY - OTHERS - 1) as i64;
    assert_eq!(rig.end_of(OFFSETS), before + HISTORY as i64);
    rig.mark();

    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 10, 2, "after")).await);
    let config = rig
        .config
        .replace("[[outbox]]", &format!("slot = \"{LAGGING}\"\n\n[[outbox]]"));
    let mut second = Relay::start(&config);
    let target = rig.pg.current_wal_lsn().await;
    let (reached, _) = rig.pg.wait_confirmed(LAGGING, target, SETTLE).await;
    second.assert_running();
    assert!(reached, "the second relay did not catch up");
    rig.mark();
    let audit = rig.audit("restart-after-history", 2, &ledger).await;
    audit.assert_exactly_once();

    let stderr = second.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("resuming after the committed position"))
        .unwrap_or_else(|| panic!("no resume line:\n{stderr}"));
    println!("second relay: {line}");
    assert!(
        line.contains(&format!("commit_lsn={}", newest.commit_lsn))
            && line.contains(&format!("offset={newest_at} ")),
        "resumed after the newest position (offset {newest_at}): {line}"
    );
    let read = logged_number(line, "records_read");
    assert!(
        (OTHERS as u64..=2 * (OTHERS as u64 + 1) + FIRST_WINDOW as u64).contains(&read),
        "read {read} records to find the position {} back in {HISTORY}: {line}",
        OTHERS + 1
    );
}

/// Appends `records` (key, value) to partition 0 of `topic` with a plain, non-transactional
/// producer, compressed, so that the mock (which keeps at most 5 MB per partition) keeps
/// them all.
fn write_plainly(cluster: &Cluster, topic: &str, records: &[(&str, String)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("compression.type", "gzip")
        .set("linger.ms", "20")
        .create()
        .expect("create a producer");
    for (key, value) in records {
        let mut record = BaseRecord::to(topic).partition(0).key(*key).payload(value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    producer.poll(Duration::from_millis(50));
                    record = back;
                }
                Err((e, _)) => panic!("queue a record for {topic}: {e}"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("write {} records to {topic}: {e}", records.len()));
}

/// The number a log line gives `field` (`field=123`).
fn logged_number(line: &str, field: &str) -> u64 {
    let prefix = format!("{field}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

/// The zombie case: the leader frozen, its slot taken by a second relay, then woken. On a
/// real broker the second relay's `init_transactions` bumps the epoch of the transactional id,
/// so the first one's next commit fails fenced and it stops. librdkafka's mock cluster gives
/// every `InitProducerId` without a current producer id a fresh producer id (epoch 0) instead,
/// so nothing fences the first relay: it commits what it still had buffered from its socket,
/// and those events appear twice. Kept (ignored) as the reproduction of that mock limitation;
/// [`a_fenced_producer_stops_with_one_line_and_a_restart_is_exactly_once`] covers the relay's
/// side of fencing.
#[tokio::test]
#[ignore = "librdkafka's mock cluster does not fence a second producer with the same transactional.id"]
async fn a_second_relay_with_the_same_transactional_id_fences_the_first() {
    let (mut rig, mut a, mut seqs, mut ledger) =
        running_with_ten_events("transaction_max_events = 500\n").await;
    // A large transaction keeps A inside Kafka transactions while it is frozen.
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 20_000, 8, "during")).await);
    let started = Instant::now();
    while rig.end_of(TOPIC) < 2_000 {
        a.assert_running();
        assert!(
            started.elapsed() < SETTLE,
            "A did not start on the large transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A zombie: frozen while it holds the slot, then the slot taken from it.
    signal(&a, "-STOP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old = rig.pg.slot_active_pid(SLOT).await;
    rig.pg
        .sql(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        ))
        .await;
    rig.mark();
    let mut b = Relay::start(&rig.config);
    let started = Instant::now();
    while !b.stderr().contains("streaming") {
        b.assert_running();
        assert!(
            started.elapsed() < STARTUP,
            "B did not take the slot (A's walsender was {old:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ledger
        .committed
        .extend(commit(&rig.pg, &orders(&mut seqs, 10, 4, "after")).await);
    // B registered the transactional id when it took the slot: A wakes up fenced.
    signal(&a, "-CONT");
    let exited = a.wait_exit(Duration::from_secs(60)).await;
    let said = last_line(&a.stderr());
    match exited {
        Some(status) => {
            assert!(!status.success(), "A exited 0: {said}");
            assert!(said.contains("fenced"), "A's last line: {said}");
            assert!(!said.contains('\n'));
        }
        None => assert!(
            a.stderr().contains("standby"),
            "A neither stopped nor waits as a standby: {said}"
        ),
    }
    println!("first relay after being fenced: {said}");
    let audit = rig.settle("fenced", 1, &ledger, &mut b).await;
    audit.assert_exactly_once();
}

/// Throughput of a backlog drain, exactly-once against at-least-once, on the mock cluster:
/// `EOS_BENCH_EVENTS` (200,000) events in transactions of `EOS_BENCH_TXN_ROWS` (10) rows are
/// committed while the relay is stopped, then a relay is started and timed until the slot is
/// confirmed past them; its CPU time comes from /proc. Prints a Markdown table; asserts
/// nothing about speed. A release build measures the relay rather than debug code:
/// `cargo build --release --bin outbox-relay && OUTBOX_RELAY_BIN=target/release/outbox-relay
/// cargo test --test exactly_once throughput -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a test: run it with --ignored --nocapture"]
async fn throughput_exactly_once_against_at_least_once() {
    let events = common::checker::env_number("EOS_BENCH_EVENTS", 200_000) as usize;
    let rows = common::checker::env_number("EOS_BENCH_TXN_ROWS", 10) as usize;
    println!("| delivery | events | rows per PG transaction | seconds | events/s | relay CPU s |");
    println!("|---|---|---|---|---|---|");
    for (mode, lines) in [
        ("at-least-once", ""),
        ("exactly-once", "delivery = \"exactly-once\"\n"),
    ] {
        let pg = Pg::start();
        pg.sql(OUTBOX_DDL).await;
        let cluster = MockCluster::new(3).expect("mock cluster");
        cluster.create_topic(TOPIC, 4, 3).expect("create the topic");
        cluster
            .create_topic(OFFSETS, 1, 3)
            .expect("create the offsets topic");
        let config = format!(
            "{}{lines}\n",
            basic_config(&pg.url(), &cluster.bootstrap_servers())
        );
        // The slot first, then the backlog.
        let mut relay = Relay::start(&config);
        relay.wait_for_slot(&pg, SLOT, STARTUP).await;
        relay.kill9();
        let mut seqs = Seqs::default();
        let mut client = pg.client().await;
        for chunk in 0..events.div_ceil(rows) {
            let n = rows.min(events - chunk * rows);
            let tx = client.transaction().await.expect("begin");
            insert_outbox(&tx, &orders(&mut seqs, n, 64, "bench")).await;
            tx.commit().await.expect("commit");
        }
        let target = pg.current_wal_lsn().await;
        let started = Instant::now();
        let mut relay = Relay::start(&config);
        let (reached, _) = pg
            .wait_confirmed(SLOT, target, Duration::from_secs(1800))
            .await;
        let secs = started.elapsed().as_secs_f64();
        relay.assert_running();
        assert!(reached, "{mode}: the slot did not reach the backlog's end");
        let cpu = cpu_seconds(relay.pid());
        println!(
            "| {mode} | {events} | {rows} | {secs:.1} | {:.0} | {cpu:.1} |",
            events as f64 / secs
        );
    }
}

/// User plus system CPU time of process `pid`, from /proc (0 if it cannot be read).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // Clock ticks per second: 100 on Linux x86-64.
    ticks / 100.0
}

/// The table-less outbox in exactly-once mode: transactional messages count as events of
/// their transaction, a non-transactional one as a transaction of its own at its LSN; across
/// a graceful restart and a `kill -9`, each is read once.
#[tokio::test]
async fn logical_decoding_messages_are_exactly_once_too() {
    let mut rig = rig("\n[[message]]\nprefix = \"outbox\"\n").await;
    let mut relay = rig.start().await;
    let emit = |id: &str, transactional: bool| {
        format!(
            "SELECT pg_logical_emit_message({transactional}, 'outbox', \
             '{{\"id\": \"{id}\", \"aggregatetype\": \"order\", \"aggregateid\": \"m-{}\", \"type\": \"T\", \"payload\": 1}}');",
            id.len() % 3
        )
    };
    let mut ids = Vec::new();
    for round in 0..3 {
        for t in 0..4 {
            let mut sql = String::from("BEGIN;");
            for i in 0..5 {
                let id = format!("r{round}-t{t}-{i}");
                sql += &emit(&id, true);
                ids.push(id);
            }
            sql += "COMMIT;";
            rig.pg.sql(&sql).await;
            let id = format!("r{round}-alone-{t}");
            rig.pg.sql(&emit(&id, false)).await;
            ids.push(id);
        }
        // Rolled back: its transactional messages never count.
        rig.pg
            .sql(&format!("BEGIN; {} ROLLBACK;", emit("never", true)))
            .await;
        let target = rig.pg.current_wal_lsn().await;
        let (reached, _) = rig.pg.wait_confirmed(SLOT, target, SETTLE).await;
        relay.assert_running();
        assert!(reached, "round {round}: the slot did not catch up");
        match round {
            0 => signal(&relay, "-TERM"),
            _ => relay.kill9(),
        }
        relay.wait_exit(Duration::from_secs(30)).await;
        rig.mark();
        relay = rig.start().await;
    }
    rig.mark();
    let (data, offsets) = rig.read().await;
    let view = committed_view(&data, &offsets, &rig.marks);
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    let got: Vec<String> = view
        .committed
        .iter()
        .map(|r| r.header_str("id").unwrap_or_default())
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sorted, want, "each message once, and nothing else");
    println!(
        "messages: {} events, {} records read as read_committed, {} Kafka transactions",
        ids.len(),
        got.len(),
        view.transactions
    );
}

/// Tansu, the real broker of the other tests, has no transactions (it answers ApiVersions
/// without EndTxn): the relay stops at its first commit with one line saying so.
#[tokio::test]
async fn on_tansu_the_relay_stops_with_one_line_naming_the_missing_transactions() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let broker = common::Broker::start();
    for topic in [TOPIC, OFFSETS] {
        broker.create_topic(topic, 1).await;
    }
    let config = format!(
        "{}delivery = \"exactly-once\"\n",
        basic_config(&pg.url(), &broker.bootstrap())
    );
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    commit(&pg, &orders(&mut Seqs::default(), 3, 2, "x")).await;
    let said = first_said(&mut relay, |l| {
        l.contains("WARN outbox_relay") && l.contains("transaction")
    })
    .await;
    println!("on Tansu: {said}");
    assert!(said.starts_with("exited"), "{said}");
    assert!(said.contains("does not support transactions"), "{said}");
    assert!(said.contains("at-least-once"), "{said}");
}
