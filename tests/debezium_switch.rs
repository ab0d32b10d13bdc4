//! Switching over from Debezium to the relay on Debezium's own slot and publication (issue
//! #13): Debezium 3.6.1 (`scripts/debezium.sh --mode strings`, routed to the relay's topic
//! names) streams some events, is stopped with SIGTERM after its offsets reached the slot,
//! more events are written while nothing runs, and the relay starts with `slot` and
//! `publication` set to Debezium's. A consumer of the topic must see every event at least
//! once, duplicates only from Debezium's last transaction (Debezium confirms the slot at that
//! transaction's commit, so it is decoded again), and each key's events in commit order.
//!
//! Debezium's jars come from Maven Central; if they cannot be fetched the test fails saying so.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{Broker, Debezium, DebeziumMode, Pg, Rec, Relay, OUTBOX_DDL, QUIET};

const TOPIC: &str = "outbox.event.order";
const PARTITIONS: i32 = 3;
const KEYS: u64 = 10;
/// Transactions of `KEYS` events (one per key) streamed by Debezium, then written while
/// nothing runs.
const BEFORE_TXNS: u64 = 11;
const BETWEEN_TXNS: u64 = 5;
/// A JVM starting on a small, shared machine.
const DEBEZIUM_DELIVERY: Duration = Duration::from_secs(120);
const DELIVERY: Duration = Duration::from_secs(60);

fn id(n: u64) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

/// One transaction: events `first..first + KEYS`, one per key `k0..k9`.
fn txn_sql(first: u64) -> String {
    let values: Vec<String> = (first..first + KEYS)
        .map(|n| {
            format!(
                "('{}', 'order', 'k{}', 'Switched', '{{\"n\": {n}}}')",
                id(n),
                n % KEYS
            )
        })
        .collect();
    format!(
        "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) VALUES {}",
        values.join(", ")
    )
}

async fn wal_lsn(pg: &Pg) -> u64 {
    let row = pg
        .client()
        .await
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text", &[])
        .await
        .expect("read the WAL position");
    row.get::<_, String>(0).parse().expect("numeric LSN")
}

/// The event number in the `id` header.
fn event_no(r: &Rec) -> u64 {
    let id = r.header_str("id").expect("an id header");
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a numbered id")
}

/// Polls until the topic holds `n` records or `timeout` passes; the records in the order a
/// consumer of each partition reads them.
async fn wait_records(
    reader: &mut common::Reader,
    n: usize,
    timeout: Duration,
    what: &str,
) -> Vec<Rec> {
    let deadline = Instant::now() + timeout;
    loop {
        reader.poll();
        let recs = reader.records();
        if recs.len() >= n {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} records within {timeout:?}",
            recs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn switching_over_from_debeziums_slot_loses_nothing() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    broker.create_topic(TOPIC, PARTITIONS).await;
    let mode = DebeziumMode::Strings;
    let slot = mode.slot();
    let mut debezium = Debezium::start_with(&pg, &broker.bootstrap(), mode, "", &[]).await;

    // Debezium streams BEFORE_TXNS transactions; the slot is written before each is committed.
    let mut last_txn_start = 0;
    for t in 0..BEFORE_TXNS {
        last_txn_start = wal_lsn(&pg).await;
        pg.sql(&txn_sql(t * KEYS)).await;
    }
    let streamed = (BEFORE_TXNS * KEYS) as usize;
    let mut reader = broker.reader(&[TOPIC]);
    let started = Instant::now();
    loop {
        reader.poll();
        if reader.records().len() >= streamed {
            break;
        }
        debezium.assert_running();
        assert!(
            started.elapsed() < DEBEZIUM_DELIVERY,
            "Debezium: {} of {streamed} records within {DEBEZIUM_DELIVERY:?}",
            reader.records().len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stop only once Debezium's offsets reached the slot (Connect flushes every 10 s): it
    // confirms up to where its last transaction begins (measured), which a user sees as
    // confirmed_flush_lsn no longer moving.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.confirmed_flush_lsn(&slot).await.unwrap_or(0) < last_txn_start {
        debezium.assert_running();
        assert!(
            Instant::now() < deadline,
            "Debezium's offsets did not reach slot {slot} within 60 s: confirmed {:?}, last transaction from {last_txn_start}, WAL now {}",
            pg.confirmed_flush_lsn(&slot).await,
            wal_lsn(&pg).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    debezium.stop();
    reader.settle(QUIET).await;
    let by_debezium = reader.records().len();
    let confirmed_at_stop = pg.confirmed_flush_lsn(&slot).await;

    // Written while nothing runs.
    for t in BEFORE_TXNS..BEFORE_TXNS + BETWEEN_TXNS {
        pg.sql(&txn_sql(t * KEYS)).await;
    }
    let events = (BEFORE_TXNS + BETWEEN_TXNS) * KEYS;

    let config = format!(
        "[postgres]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n\
         [[outbox]]\ntable = \"public.outbox\"\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let mut relay = Relay::start(&config);
    let recs = wait_records(
        &mut reader,
        by_debezium + (BETWEEN_TXNS * KEYS) as usize,
        DELIVERY,
        "after the switch",
    )
    .await;
    relay.assert_running();
    reader.settle(QUIET).await;
    let recs = if reader.records().len() > recs.len() {
        reader.records()
    } else {
        recs
    };

    // What a consumer of each partition reads, per key.
    let mut sorted: Vec<&Rec> = recs.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut per_key: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
    for r in &sorted {
        per_key
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(event_no(r));
    }
    let mut seen = HashSet::new();
    let mut duplicates = Vec::new();
    for r in &sorted {
        if !seen.insert(event_no(r)) {
            duplicates.push(event_no(r));
        }
    }
    duplicates.sort_unstable();
    let lost: Vec<u64> = (0..events).filter(|n| !seen.contains(n)).collect();
    eprintln!(
        "switch-over: {events} events ({} by Debezium before its stop, {} written while stopped), \
         {} records ({by_debezium} from Debezium, {} from the relay), {} duplicates {duplicates:?}, \
         lost {lost:?}; slot confirmed at Debezium's stop: {confirmed_at_stop:?}",
        BEFORE_TXNS * KEYS,
        BETWEEN_TXNS * KEYS,
        recs.len(),
        recs.len() - by_debezium,
        duplicates.len()
    );
    assert!(lost.is_empty(), "events lost in the switch-over: {lost:?}");
    // Duplicates: at most Debezium's last transaction, decoded again from the slot.
    let last_txn = (BEFORE_TXNS - 1) * KEYS..BEFORE_TXNS * KEYS;
    assert!(
        duplicates.iter().all(|n| last_txn.contains(n)),
        "duplicates beyond Debezium's last transaction {last_txn:?}: {duplicates:?}"
    );
    // Per key, each event's first sighting comes in commit order, and a repeat only right
    // after the event itself.
    for (key, ns) in &per_key {
        let mut first: Vec<u64> = Vec::new();
        for &n in ns {
            if first.last() == Some(&n) {
                continue;
            }
            assert!(
                !first.contains(&n),
                "key {}: event {n} repeated out of place: {ns:?}",
                String::from_utf8_lossy(key)
            );
            first.push(n);
        }
        assert!(
            first.windows(2).all(|w| w[0] < w[1]),
            "key {}: out of commit order: {ns:?}",
            String::from_utf8_lossy(key)
        );
    }
    assert_eq!(per_key.len(), KEYS as usize, "keys seen");
}
