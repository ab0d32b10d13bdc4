//! Outbox events: writing them to PostgreSQL, and checking what arrived in Kafka against
//! what was committed (every event, once, on the right partition, in per-key order).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::broker::Broker;
use super::murmur::java_murmur2_partition;
use super::pg::Pg;
use super::reader::{Rec, QUIET};
use super::relay::Relay;
use super::util::lsn_text;

/// An outbox row to insert. `seq` counts per key, so consumers can check per-key order.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub aggregatetype: String,
    pub key: String,
    pub event_type: String,
    pub seq: i64,
    /// jsonb text, `None` for SQL NULL.
    pub payload: Option<String>,
}

/// An inserted outbox row, as PostgreSQL stored it (ids and jsonb text from `RETURNING`).
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub aggregatetype: String,
    pub key: String,
    pub event_type: String,
    pub seq: i64,
    /// `payload::text`: what PostgreSQL prints for the jsonb, `None` for NULL.
    pub payload: Option<String>,
}

impl Event {
    /// The topic of the default template `outbox.event.{aggregatetype}`.
    pub fn default_topic(&self) -> String {
        format!("outbox.event.{}", self.aggregatetype)
    }
}

/// Aggregate type by key (fixed per key, so a key's events share one topic): `customer-*`
/// and odd `bulk-*` keys are customers, everything else is an order.
pub fn aggregate_of(key: &str) -> &'static str {
    let odd_bulk = key
        .strip_prefix("bulk-")
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n % 2 == 1);
    if key.starts_with("customer") || odd_bulk {
        "customer"
    } else {
        "order"
    }
}

/// Hands out per-key sequence numbers and builds payloads carrying them.
#[derive(Default)]
pub struct Seqs(std::collections::HashMap<String, i64>);

impl Seqs {
    /// The next event for `key`, with payload `{"key": …, "seq": n, "note": …}`.
    /// `key` and `note` must not need JSON escaping (no `"` or `\`).
    pub fn event(
        &mut self,
        aggregatetype: &str,
        key: &str,
        event_type: &str,
        note: &str,
    ) -> NewEvent {
        let seq = self.0.entry(key.to_owned()).or_insert(0);
        *seq += 1;
        NewEvent {
            aggregatetype: aggregatetype.to_owned(),
            key: key.to_owned(),
            event_type: event_type.to_owned(),
            seq: *seq,
            payload: Some(format!(
                r#"{{"key": "{key}", "seq": {seq}, "note": "{note}"}}"#,
                seq = *seq
            )),
        }
    }
}

/// Inserts `rows` into `public.outbox` with one statement, in the given order (so per-key
/// sequence order is commit order), on `client`, which may be inside a transaction.
/// Ids are drawn (`gen_random_uuid()`) in the statement so each row's id is known.
pub async fn insert_outbox(
    client: &impl tokio_postgres::GenericClient,
    rows: &[NewEvent],
) -> Vec<Event> {
    try_insert_outbox(client, rows)
        .await
        .unwrap_or_else(|e| panic!("insert into outbox: {e}"))
}

/// The relay's default slot name.
pub const SLOT: &str = "outbox_relay";

/// How long [`settle`] waits for each stage.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    /// For all records to be in Kafka (generous: the machine is small; not a benchmark).
    pub delivery: Duration,
    /// After that, for the slot to be confirmed up to the target.
    pub confirm: Duration,
}

/// Waits until `n` records arrived (up to `delivery`, failing fast if the relay dies), then
/// up to `confirm` for the default slot's `confirmed_flush_lsn` to reach `target` (the WAL
/// position taken after the last write), then lets the reader settle so late extras show.
/// Returns the records and how long confirmation took after delivery (or why it failed),
/// for the caller to check after the records, so a delivery problem is reported as such.
pub async fn settle(
    pg: &Pg,
    broker: &Broker,
    relay: &mut Relay,
    topics: &[&str],
    n: usize,
    target: u64,
    patience: Patience,
) -> (Vec<Rec>, Result<Duration, String>) {
    let Patience { delivery, confirm } = patience;
    let mut reader = broker.reader(topics);
    reader
        .wait_for(n, delivery, || relay.assert_running())
        .await;
    relay.assert_running();
    let delivered = Instant::now();
    let (reached, last) = pg.wait_confirmed(SLOT, target, confirm).await;
    let confirmed = if reached {
        Ok(delivered.elapsed())
    } else {
        Err(format!(
            "confirmed_flush_lsn {} did not reach {} (pg_current_wal_lsn() after the last \
             write) within {confirm:?} of {} records being in Kafka",
            last.map_or("NULL".into(), lsn_text),
            lsn_text(target),
            reader.len()
        ))
    };
    reader.settle(QUIET).await;
    (reader.records(), confirmed)
}

/// Where the records go and how long to wait for them, for [`assert_delivered`].
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub topics: &'a [&'a str],
    pub partitions: i32,
    pub patience: Patience,
}

/// Waits until every event of `expected` is in Kafka and the slot is confirmed past the WAL
/// position now, then checks the records against `expected` (`what` names the moment in a
/// failure). Returns how many records were read and the delivery, for further checks.
pub async fn assert_delivered(
    pg: &Pg,
    broker: &Broker,
    relay: &mut Relay,
    to: Expect<'_>,
    expected: &[Event],
    what: &str,
) -> (usize, Delivery) {
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(
        pg,
        broker,
        relay,
        to.topics,
        expected.len(),
        target,
        to.patience,
    )
    .await;
    let delivery = check_delivery(&recs, expected, to.partitions);
    delivery.assert_ok(what);
    confirmed.unwrap_or_else(|e| panic!("{what}: {e}"));
    (recs.len(), delivery)
}

/// The outcome of comparing what a consumer read with what was committed.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Records whose `id` header was already seen.
    pub duplicates: usize,
    /// Everything wrong other than duplicates, one line each.
    pub problems: Vec<String>,
}

impl Delivery {
    /// Panics listing the first problems, if any.
    pub fn assert_ok(&self, what: &str) {
        if !self.problems.is_empty() {
            let shown: Vec<&str> = self.problems.iter().take(25).map(String::as_str).collect();
            panic!(
                "{what}: {} problem(s) ({} duplicate record(s)):\n  {}",
                self.problems.len(),
                self.duplicates,
                shown.join("\n  ")
            );
        }
    }
}

/// Checks `recs` (as read by [`Broker::read_all`], in partition/offset order) against the
/// committed `expected` events of the default outbox table:
/// every event arrived; nothing else did; each record has the right topic, key, value,
/// `id`/`type` headers and Java-murmur2 partition; and per key the sequence numbers increase
/// in offset order once repeated ids are skipped. Duplicates are counted, not judged.
pub fn check_delivery(recs: &[Rec], expected: &[Event], partitions: i32) -> Delivery {
    let by_id: std::collections::HashMap<&str, &Event> =
        expected.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut d = Delivery::default();
    let mut seen: HashSet<String> = HashSet::new();
    // Last sequence number per (topic, key), over first deliveries in offset order.
    let mut last_seq: std::collections::HashMap<(String, String), (i64, i64)> = Default::default();
    for r in recs {
        let at = format!("{}[{}]@{}", r.topic, r.partition, r.offset);
        let Some(id) = r.header_str("id") else {
            d.problems.push(format!(
                "{at}: no id header (key {:?}, value {:?})",
                r.key_str(),
                r.value_str()
            ));
            continue;
        };
        let Some(e) = by_id.get(id.as_str()) else {
            d.problems.push(format!(
                "{at}: unexpected record id={id} key={:?} value={:?}",
                r.key_str(),
                r.value_str()
            ));
            continue;
        };
        if r.topic != e.default_topic() {
            d.problems.push(format!(
                "{at}: id={id} expected on topic {}",
                e.default_topic()
            ));
        }
        if r.key.as_deref() != Some(e.key.as_bytes()) {
            d.problems.push(format!(
                "{at}: id={id} key {:?}, expected {:?}",
                r.key_str(),
                e.key
            ));
        }
        if r.value.as_deref() != e.payload.as_deref().map(str::as_bytes) {
            d.problems.push(format!(
                "{at}: id={id} value {:?}, expected {:?}",
                r.value_str(),
                e.payload
            ));
        }
        if r.header_str("type").as_deref() != Some(e.event_type.as_str()) {
            d.problems.push(format!(
                "{at}: id={id} type header {:?}, expected {:?}",
                r.header_str("type"),
                e.event_type
            ));
        }
        let want_partition = java_murmur2_partition(e.key.as_bytes(), partitions);
        if r.partition != want_partition {
            d.problems.push(format!(
                "{at}: key {:?} belongs in partition {want_partition} (Java murmur2)",
                e.key
            ));
        }
        if !seen.insert(id.clone()) {
            d.duplicates += 1;
            continue;
        }
        let slot = last_seq
            .entry((r.topic.clone(), e.key.clone()))
            .or_insert((0, -1));
        if e.seq <= slot.0 {
            d.problems.push(format!(
                "{at}: key {:?} seq {} after seq {} (offset {}): per-key order broken",
                e.key, e.seq, slot.0, slot.1
            ));
        }
        if e.seq > slot.0 {
            *slot = (e.seq, r.offset);
        }
    }
    let missing: Vec<&Event> = expected.iter().filter(|e| !seen.contains(&e.id)).collect();
    if !missing.is_empty() {
        d.problems.insert(
            0,
            format!(
                "{} of {} committed events never arrived, e.g. {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(3)]
            ),
        );
    }
    d
}

/// Like [`insert_outbox`], but returns the error instead of panicking: for writers that must
/// survive the server going away under them.
pub async fn try_insert_outbox(
    client: &impl tokio_postgres::GenericClient,
    rows: &[NewEvent],
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let types: Vec<&str> = rows.iter().map(|r| r.aggregatetype.as_str()).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let event_types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    let payloads: Vec<Option<&str>> = rows.iter().map(|r| r.payload.as_deref()).collect();
    let returned = client
        .query(
            "WITH input AS MATERIALIZED (
                 SELECT gen_random_uuid() AS id, aggregatetype, aggregateid, type,
                        payload::jsonb AS payload, n
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                     WITH ORDINALITY AS t(aggregatetype, aggregateid, type, payload, n)
             ), ins AS (
                 INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload)
                 SELECT id, aggregatetype, aggregateid, type, payload FROM input ORDER BY n
                 RETURNING id
             )
             SELECT input.id::text, input.payload::text
             FROM input JOIN ins USING (id) ORDER BY input.n",
            &[&types, &keys, &event_types, &payloads],
        )
        .await?;
    assert_eq!(returned.len(), rows.len(), "rows inserted");
    Ok(rows
        .iter()
        .zip(returned)
        .map(|(new, row)| Event {
            id: row.get(0),
            aggregatetype: new.aggregatetype.clone(),
            key: new.key.clone(),
            event_type: new.event_type.clone(),
            seq: new.seq,
            payload: row.get(1),
        })
        .collect())
}

/// The slot must still hold the row with event id `id`: a restart would send it again. The
/// slot's own changes are peeked (nothing is consumed) once the relay has released it.
///
/// Why not compare `confirmed_flush_lsn` with a WAL position taken before the row? The relay
/// may rightly confirm a keepalive's WAL end that lies inside a large transaction still being
/// written (nothing of it has been decoded yet); PostgreSQL sends a transaction again when its
/// commit record lies after the confirmed position, which is what this checks.
pub async fn assert_slot_holds(pg: &Pg, id: &str, what: &str) {
    let client = pg.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let peek = client
            .query_one(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                 'proto_version', '1', 'publication_names', 'outbox_relay') \
                 WHERE position($2::bytea IN data) > 0",
                &[&SLOT, &id.as_bytes()],
            )
            .await;
        match peek {
            Ok(row) => break row.get::<_, i64>(0),
            // The walsender may hold the slot a moment after the relay exits.
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: peeking the slot: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: cannot peek the slot: {e}"),
        }
    };
    let confirmed = pg
        .confirmed_flush_lsn(SLOT)
        .await
        .map_or("NULL".into(), lsn_text);
    assert!(
        held > 0,
        "{what}: the slot (confirmed to {confirmed}) no longer holds event {id}: a restart \
         would skip it"
    );
}

/// Waits until the slot is confirmed up to the WAL end as of now (everything before is done).
pub async fn assert_caught_up(pg: &Pg, relay: &mut Relay, what: &str, within: Duration) {
    relay.assert_running();
    let target = pg.current_wal_lsn().await;
    let (reached, last) = pg.wait_confirmed(SLOT, target, within).await;
    assert!(
        reached,
        "{what}: confirmed_flush_lsn {} did not reach {} within {within:?}",
        last.map_or("NULL".into(), lsn_text),
        lsn_text(target)
    );
}
