//! Hostile outbox rows, end to end: a real PostgreSQL 15, Apache Kafka
//! and the relay binary, judged by what a user sees: records in Kafka (topic, partition, key,
//! value, headers), the slot's `confirmed_flush_lsn` in `pg_replication_slots`, and, where the
//! relay must stop, its exit status and its last stderr line.
//!
//! The behaviour each case expects, from a user's point of view:
//!
//! | row | expected |
//! |---|---|
//! | payload under `message.max.bytes` (~900 KB) | delivered byte for byte |
//! | payload over it (5 MB jsonb, default limits) | the relay stops: non-zero exit, one line naming the event id and topic; the slot stays before that event; a restart stops at the same event again; raising `message.max.bytes` and restarting delivers it and everything after it |
//! | NULL key column (`aggregateid`) | published with a null key (as Debezium does); NULL payload → null value; NULL `type` → `type` header with a null value |
//! | NULL topic column (`aggregatetype`) | the relay stops: one line naming the event and the column; the slot stays before it |
//! | empty strings | values, not NULLs: empty key (partitioned by murmur2 of no bytes), empty value, empty headers; `aggregatetype = ''` goes to topic `outbox.event.` |
//! | bytea key, payload and header columns | raw bytes (NUL, 0xff, invalid UTF-8, empty), partitioned by murmur2 of the raw key |
//! | a 1,000-column table | rows delivered as from a 5-column one |
//! | table renamed while running | never skipped silently: either its rows keep flowing, or the relay stops with one line naming the rename and the slot stays before the first row it did not publish |
//! | configured column dropped (or renamed) while running | the relay stops with one line naming the column and its config key; the slot stays before the first row without it |
//! | other columns dropped, added, renamed; payload type changed | rows keep flowing unchanged (payload as the new type prints it) |
//!
//! Run: `scripts/test.sh --test hostile -- --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_slot_holds, java_murmur2_partition, lsn_text, Broker, Pg, Reader, Rec, Relay,
    OUTBOX_DDL, PARTITIONED_OUTBOX_DDL, SLOT,
};

/// Generous bounds: the machine is small and shared; these are not performance limits.
const STARTUP: Duration = Duration::from_secs(90);
const DELIVERY: Duration = Duration::from_secs(120);
/// For the relay to stop on its own after a row it must refuse.
const STOP: Duration = Duration::from_secs(120);
/// For the slot to be confirmed up to the WAL end once everything was delivered.
const CONFIRM: Duration = Duration::from_secs(60);

const ORDER_TOPIC: &str = "outbox.event.order";
const PARTITIONS: i32 = 4;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A relay config for `public.outbox` with `outbox_extra` lines in its `[[outbox]]` entry and
/// `[kafka.properties]` lines in `kafka_properties`.
fn config(pg: &Pg, broker: &Broker, outbox_extra: &str, kafka_properties: &str) -> String {
    format!(
        "[postgres]\nurl = \"{}\"\nstatus_interval_secs = 1\n\n\
         [[outbox]]\ntable = \"public.outbox\"\n{outbox_extra}\n\n\
         [kafka]\nbrokers = \"{}\"\n\n[kafka.properties]\n{kafka_properties}\n",
        pg.url(),
        broker.bootstrap()
    )
}

/// PostgreSQL, Kafka with `topics` created, `ddl` applied, and a relay streaming from its slot.
async fn start(ddl: &str, topics: &[&str], outbox_extra: &str) -> (Pg, Broker, Relay) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(ddl).await;
    for topic in topics {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let mut relay = Relay::start(&config(&pg, &broker, outbox_extra, ""));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    (pg, broker, relay)
}

/// Runs one statement that returns one text column per row (e.g. `RETURNING id::text`).
async fn returning(pg: &Pg, sql: &str) -> Vec<String> {
    pg.client()
        .await
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e} {:?}", e.as_db_error().map(|d| d.message())))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Reads until `n` records arrived (failing fast if the relay exits), then settles.
async fn read(broker: &Broker, relay: &mut Relay, topics: &[&str], n: usize) -> Vec<Rec> {
    let mut reader = broker.reader(topics);
    let ok = reader
        .wait_for(n, DELIVERY, || relay.assert_running())
        .await;
    reader.settle(common::QUIET).await;
    let recs = reader.records();
    assert!(
        ok,
        "expected {n} records in {topics:?} within {DELIVERY:?}, got {}: {recs:#?}",
        recs.len()
    );
    recs
}

/// Waits until the slot is confirmed up to the WAL end as of now (everything before is done).
async fn assert_caught_up(pg: &Pg, relay: &mut Relay, what: &str) {
    common::assert_caught_up(pg, relay, what, CONFIRM).await;
}

fn by_id<'a>(recs: &'a [Rec], id: &str) -> &'a Rec {
    recs.iter()
        .find(|r| r.header_str("id").as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no record with id {id} in {recs:#?}"))
}

/// What is in `topics` after a quiet spell (for "nothing arrived" checks).
async fn settled(reader: &mut Reader) -> Vec<Rec> {
    reader.settle(common::QUIET).await;
    reader.records()
}

fn bytea_literal(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("'\\x{hex}'::bytea")
}

// ---------------------------------------------------------------------------------------------
// Huge payloads
// ---------------------------------------------------------------------------------------------

/// `n` × 32 characters of md5 hex: incompressible enough that TOAST cannot hide the size.
fn big_jsonb(chars: usize) -> String {
    format!(
        "jsonb_build_object('blob', (SELECT string_agg(md5(i::text), '') \
         FROM generate_series(1, {}) AS i))",
        chars / 32
    )
}

/// Inserts an event with a jsonb payload of about `chars` bytes, then an ordinary event for
/// the same key; returns both ids.
async fn huge_then_ordinary(pg: &Pg, chars: usize) -> (String, String) {
    let huge = returning(
        pg,
        &format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('order', 'k', 'Huge', {}) RETURNING id::text",
            big_jsonb(chars)
        ),
    )
    .await
    .remove(0);
    let after = returning(
        pg,
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'k', 'After', '{}') RETURNING id::text",
    )
    .await
    .remove(0);
    (huge, after)
}

#[tokio::test]
async fn payload_over_message_max_bytes_stops_the_relay_before_it() {
    // The topic takes 16 MB records (Kafka's own default is 1 MB), so the limit met here is
    // the relay's: librdkafka's message.max.bytes.
    let (pg, broker, mut relay) = start(OUTBOX_DDL, &[], "").await;
    broker
        .create_topic_with(
            ORDER_TOPIC,
            PARTITIONS,
            &[("max.message.bytes", "16777216")],
        )
        .await;

    // ~900 KB: under librdkafka's default message.max.bytes (1,000,000): delivered intact.
    let large = returning(
        &pg,
        &format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('order', 'k', 'Large', {}) RETURNING id::text",
            big_jsonb(896_000)
        ),
    )
    .await
    .remove(0);
    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], 1).await;
    let stored = returning(
        &pg,
        &format!("SELECT payload::text FROM outbox WHERE id = '{large}'"),
    )
    .await
    .remove(0);
    let rec = by_id(&recs, &large);
    assert_eq!(
        rec.value.as_deref(),
        Some(stored.as_bytes()),
        "~900 KB value"
    );
    assert_caught_up(&pg, &mut relay, "after the ~900 KB event").await;

    // 5 MB: over the limit. Then one ordinary event for the same key after it.
    let (huge, after) = huge_then_ordinary(&pg, 5 * 1024 * 1024).await;

    let line = relay.expect_fatal_exit(STOP, "a 5 MB payload").await;
    assert!(
        line.contains(&huge) && line.contains(ORDER_TOPIC),
        "the error should name the event {huge} and topic {ORDER_TOPIC}: {line}"
    );
    let lower = line.to_lowercase();
    assert!(
        lower.contains("size") || lower.contains("large"),
        "the error should say the record is too large: {line}"
    );
    assert_slot_holds(&pg, &huge, "after refusing the 5 MB event").await;
    let mut reader = broker.reader(&[ORDER_TOPIC]);
    let recs = settled(&mut reader).await;
    assert_eq!(recs.len(), 1, "nothing after the ~900 KB event: {recs:#?}");

    // A restart with the same settings stops at the same event: it was not skipped.
    let mut relay = Relay::start(&config(&pg, &broker, "", ""));
    let again = relay
        .expect_fatal_exit(STOP, "restart with the same limit")
        .await;
    assert!(again.contains(&huge), "{again}");
    assert_slot_holds(&pg, &huge, "after the restart").await;

    // The operator raises the limit and restarts: the 5 MB event and the one after it arrive,
    // in order, and the slot catches up.
    let mut relay = Relay::start(&config(
        &pg,
        &broker,
        "",
        "\"message.max.bytes\" = \"16777216\"",
    ));
    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], 3).await;
    let stored = returning(
        &pg,
        &format!("SELECT payload::text FROM outbox WHERE id = '{huge}'"),
    )
    .await
    .remove(0);
    let ids: Vec<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
    assert_eq!(
        ids,
        [large, huge.clone(), after],
        "one partition, in commit order"
    );
    assert_eq!(
        by_id(&recs, &huge).value.as_deref().map(<[u8]>::len),
        Some(stored.len()),
        "5 MB value"
    );
    assert!(by_id(&recs, &huge).value.as_deref() == Some(stored.as_bytes()));
    assert_caught_up(&pg, &mut relay, "after raising message.max.bytes").await;
}

/// With `dead_letter_topic` set, a record over `message.max.bytes` is replaced by a small
/// note in that topic (same key and headers), and the relay carries on: the events after it
/// arrive and the slot catches up.
#[tokio::test]
async fn payload_over_message_max_bytes_goes_to_the_dead_letter_topic_when_configured() {
    const DEAD_LETTERS: &str = "outbox.dead-letters";
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    broker.create_topic(ORDER_TOPIC, PARTITIONS).await;
    broker.create_topic(DEAD_LETTERS, 1).await;
    let cfg = config(&pg, &broker, "", "").replace(
        "[kafka.properties]",
        &format!("dead_letter_topic = \"{DEAD_LETTERS}\"\n\n[kafka.properties]"),
    );
    let mut relay = Relay::start(&cfg);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let (huge, after) = huge_then_ordinary(&pg, 2 * 1024 * 1024).await;

    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], 1).await;
    let ids: Vec<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
    assert_eq!(ids, [after], "the event after the refused one arrives");
    let letters = read(&broker, &mut relay, &[DEAD_LETTERS], 1).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!(letter.header_str("id").as_deref(), Some(huge.as_str()));
    assert_eq!(letter.header_str("type").as_deref(), Some("Huge"));
    assert_eq!(
        letter.header_str("original_topic").as_deref(),
        Some(ORDER_TOPIC)
    );
    assert_eq!(letter.key_str().as_deref(), Some("k"));
    let note: serde_json::Value =
        serde_json::from_slice(letter.value.as_deref().expect("a note")).expect("JSON note");
    assert_eq!(note["id"], huge.as_str());
    assert_eq!(note["topic"], ORDER_TOPIC);
    assert_eq!(note["table"], "public.outbox");
    assert!(
        note["payload_bytes"].as_u64().unwrap_or(0) > 2_000_000,
        "{note}"
    );
    let error = note["error"].as_str().unwrap_or("").to_lowercase();
    assert!(error.contains("size") || error.contains("large"), "{note}");
    relay.assert_running();
    assert_caught_up(&pg, &mut relay, "after the dead letter").await;
}

// ---------------------------------------------------------------------------------------------
// NULLs and empty strings
// ---------------------------------------------------------------------------------------------

/// An outbox without NOT NULL constraints and with a text id, so rows can be as odd as a
/// careless application makes them.
const LOOSE_OUTBOX: &str = "CREATE TABLE public.outbox (
    id text PRIMARY KEY,
    aggregatetype text,
    aggregateid text,
    type text,
    payload text
)";

#[tokio::test]
async fn null_key_is_published_without_a_key_and_null_topic_column_stops() {
    let (pg, broker, mut relay) = start(LOOSE_OUTBOX, &[ORDER_TOPIC], "").await;
    pg.sql(
        "INSERT INTO outbox VALUES ('null-key', 'order', NULL, 'Created', 'v1');
         INSERT INTO outbox VALUES ('all-null', 'order', NULL, NULL, NULL);
         INSERT INTO outbox VALUES ('keyed', 'order', 'k', 'Created', 'v2');",
    )
    .await;
    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], 3).await;
    assert_eq!(recs.len(), 3, "{recs:#?}");
    let r = by_id(&recs, "null-key");
    assert_eq!((r.key.as_deref(), r.value_str()), (None, Some("v1".into())));
    assert_eq!(r.header_str("type").as_deref(), Some("Created"));
    let r = by_id(&recs, "all-null");
    assert_eq!((r.key.as_deref(), r.value.as_deref()), (None, None));
    assert_eq!(
        r.header("type"),
        Some(None),
        "type header present, null value"
    );
    let r = by_id(&recs, "keyed");
    assert_eq!(r.partition, java_murmur2_partition(b"k", PARTITIONS));
    assert_caught_up(&pg, &mut relay, "after the NULL-key rows").await;

    // NULL in the topic template's column: no topic to send to; stop, never skip.
    pg.sql("INSERT INTO outbox VALUES ('no-topic', NULL, 'k', 'Created', 'v3')")
        .await;
    pg.sql("INSERT INTO outbox VALUES ('after', 'order', 'k', 'Created', 'v4')")
        .await;
    let line = relay.expect_fatal_exit(STOP, "NULL aggregatetype").await;
    assert!(
        line.contains("no-topic") && line.contains("aggregatetype"),
        "the error should name the event and the column: {line}"
    );
    assert_slot_holds(&pg, "no-topic", "after a NULL topic column").await;
    let mut reader = broker.reader(&[ORDER_TOPIC]);
    assert_eq!(
        settled(&mut reader).await.len(),
        3,
        "nothing after the stop"
    );
}

#[tokio::test]
async fn empty_strings_are_values_not_nulls() {
    let empty_topic = "outbox.event.";
    let (pg, broker, mut relay) = start(LOOSE_OUTBOX, &[ORDER_TOPIC, empty_topic], "").await;
    pg.sql(
        "INSERT INTO outbox VALUES ('e1', 'order', '', '', '');
         INSERT INTO outbox VALUES ('', '', 'k', 'T', '{}');",
    )
    .await;
    let recs = read(&broker, &mut relay, &[ORDER_TOPIC, empty_topic], 2).await;
    assert_eq!(recs.len(), 2, "{recs:#?}");

    let r = by_id(&recs, "e1");
    assert_eq!(r.topic, ORDER_TOPIC);
    assert_eq!(
        r.key.as_deref(),
        Some(&b""[..]),
        "empty key, not a null key"
    );
    assert_eq!(r.value.as_deref(), Some(&b""[..]), "empty value, not null");
    assert_eq!(r.header("type"), Some(Some(&b""[..])));
    assert_eq!(
        r.partition,
        java_murmur2_partition(b"", PARTITIONS),
        "an empty key is partitioned like any key"
    );

    let r = by_id(&recs, "");
    assert_eq!(r.topic, empty_topic, "aggregatetype '' fills the template");
    assert_eq!(r.header("id"), Some(Some(&b""[..])));
    assert_eq!(r.key_str().as_deref(), Some("k"));
    assert_caught_up(&pg, &mut relay, "after empty strings").await;
}

// ---------------------------------------------------------------------------------------------
// bytea
// ---------------------------------------------------------------------------------------------

/// An outbox whose key, payload and an extra header column are bytea.
const BYTEA_OUTBOX: &str = "CREATE TABLE public.outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid bytea,
    type text NOT NULL,
    payload bytea,
    trace bytea
)";

#[tokio::test]
async fn bytea_keys_payloads_and_headers_arrive_as_raw_bytes() {
    let (pg, broker, mut relay) =
        start(BYTEA_OUTBOX, &[ORDER_TOPIC], "header_columns = [\"trace\"]").await;
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let rows: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = vec![
        (vec![0], vec![0, 0, 0], vec![0xff]),
        (vec![0xff, 0x00, 0xfe], b"\\x00 not hex".to_vec(), vec![]),
        (vec![], vec![], vec![0x80, 0x81]),
        ("ключ".as_bytes().to_vec(), vec![0xc3, 0x28], b"t".to_vec()),
        (vec![0x7f; 300], big, vec![1, 2, 3]),
    ];
    let mut expected = Vec::new();
    for (key, payload, trace) in rows {
        let id = returning(
            &pg,
            &format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, trace) \
                 VALUES ('order', {}, 'Blob', {}, {}) RETURNING id::text",
                bytea_literal(&key),
                bytea_literal(&payload),
                bytea_literal(&trace)
            ),
        )
        .await
        .remove(0);
        expected.push((id, key, payload, trace));
    }
    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], expected.len()).await;
    assert_eq!(recs.len(), expected.len());
    for (id, key, payload, trace) in &expected {
        let r = by_id(&recs, id);
        assert_eq!(r.key.as_deref(), Some(&key[..]), "key of {id}");
        assert_eq!(r.value.as_deref(), Some(&payload[..]), "value of {id}");
        assert_eq!(r.header("trace"), Some(Some(&trace[..])), "trace of {id}");
        assert_eq!(
            r.partition,
            java_murmur2_partition(key, PARTITIONS),
            "partition of the raw key of {id}"
        );
    }
    assert_caught_up(&pg, &mut relay, "after bytea rows").await;
}

// ---------------------------------------------------------------------------------------------
// A very wide table
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn thousand_column_table_is_relayed_like_a_narrow_one() {
    // 995 filler columns with the outbox columns spread among them, payload last.
    let mut columns: Vec<String> = (0..995).map(|i| format!("c{i} int")).collect();
    columns.insert(0, "id uuid PRIMARY KEY DEFAULT gen_random_uuid()".into());
    columns.insert(250, "aggregatetype text NOT NULL".into());
    columns.insert(500, "aggregateid text".into());
    columns.insert(750, "type text".into());
    columns.push("payload jsonb".into());
    assert_eq!(columns.len(), 1000);
    let ddl = format!("CREATE TABLE public.outbox ({})", columns.join(", "));
    let (pg, broker, mut relay) = start(&ddl, &[ORDER_TOPIC], "").await;

    // Some filler columns set, the rest NULL; one multi-row transaction and a single row.
    let fill: Vec<String> = (0..995).step_by(7).map(|i| format!("c{i}")).collect();
    let values: Vec<String> = (0..995).step_by(7).map(|i| i.to_string()).collect();
    let mut sql = String::from("BEGIN;");
    for n in 0..20 {
        sql += &format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, {}) \
             VALUES ('order', 'k{}', 'Wide', '{{\"n\": {n}}}', {});",
            fill.join(", "),
            n % 3,
            values.join(", ")
        );
    }
    sql += "COMMIT; INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
            VALUES ('order', 'k0', 'Wide', '{\"n\": 20}');";
    pg.sql(&sql).await;

    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], 21).await;
    assert_eq!(recs.len(), 21, "{recs:#?}");
    for key in ["k0", "k1", "k2"] {
        let ns: Vec<i64> = recs
            .iter()
            .filter(|r| r.key_str().as_deref() == Some(key))
            .map(|r| {
                assert_eq!(
                    r.partition,
                    java_murmur2_partition(key.as_bytes(), PARTITIONS)
                );
                assert_eq!(r.header_str("type").as_deref(), Some("Wide"));
                let v: serde_json::Value =
                    serde_json::from_slice(r.value.as_deref().unwrap()).expect("JSON payload");
                v["n"].as_i64().unwrap()
            })
            .collect();
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "per-key order for {key}");
        assert!(ns
            .iter()
            .all(|n| n % 3 == key[1..].parse::<i64>().unwrap() || *n == 20));
    }
    assert_caught_up(&pg, &mut relay, "after the wide rows").await;
}

// ---------------------------------------------------------------------------------------------
// Schema changes while the relay runs (new Relation messages)
// ---------------------------------------------------------------------------------------------

const INSERT_ORDER: &str = "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                            VALUES ('order', 'k', 'Created', '{}') RETURNING id::text";

#[tokio::test]
async fn renamed_table_is_never_skipped_silently() {
    let (pg, broker, mut relay) = start(OUTBOX_DDL, &[ORDER_TOPIC], "").await;
    let first = returning(&pg, INSERT_ORDER).await.remove(0);
    read(&broker, &mut relay, &[ORDER_TOPIC], 1).await;
    assert_caught_up(&pg, &mut relay, "before the rename").await;

    // The application keeps writing to the same table under its new name (the publication
    // follows the table, not the name).
    pg.sql("ALTER TABLE public.outbox RENAME TO outbox_renamed")
        .await;
    let before = pg.current_wal_lsn().await;
    let second = returning(
        &pg,
        "INSERT INTO outbox_renamed (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'k', 'AfterRename', '{}') RETURNING id::text",
    )
    .await
    .remove(0);
    let after_insert = pg.current_wal_lsn().await;

    // Acceptable: the row arrives, or the relay stops and says why. Not acceptable: the
    // relay keeps running and the slot moves past the row that never reached Kafka.
    let mut reader = broker.reader(&[ORDER_TOPIC]);
    let delivered = |reader: &Reader| {
        reader
            .records()
            .iter()
            .any(|r| r.header_str("id").as_deref() == Some(second.as_str()))
    };
    let deadline = Instant::now() + DELIVERY;
    loop {
        let confirmed = pg.confirmed_flush_lsn(SLOT).await.unwrap_or(0);
        reader.poll();
        if delivered(&reader) {
            let recs = settled(&mut reader).await;
            let ids: Vec<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
            assert_eq!(ids, [first.clone(), second.clone()]);
            assert_caught_up(&pg, &mut relay, "after the rename").await;
            return;
        }
        if relay.try_exit().is_some() {
            let line = relay.expect_fatal_exit(STOP, "rename").await;
            assert!(
                line.contains("outbox_renamed"),
                "the error should name the new name: {line}"
            );
            assert_slot_holds(&pg, &second, "after the rename").await;
            // The operator points the config at the new name and restarts: the row arrives.
            let cfg = config(&pg, &broker, "", "")
                .replace("\"public.outbox\"", "\"public.outbox_renamed\"");
            let mut relay = Relay::start(&cfg);
            read(&broker, &mut relay, &[ORDER_TOPIC], 2).await;
            return;
        }
        if confirmed >= after_insert {
            // The slot says the row is done; give the consumer a moment to see it.
            let recs = settled(&mut reader).await;
            assert!(
                delivered(&reader),
                "event {second}, inserted into the renamed table, never reached Kafka, yet the \
                 relay is still running and confirmed the slot to {} (past the row, which \
                 begins after {}): a silent skip; in Kafka: {recs:#?}",
                lsn_text(confirmed),
                lsn_text(before)
            );
            continue;
        }
        assert!(Instant::now() < deadline, "neither delivered nor stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The classic table swap done by a migration: the outbox is renamed away and a new, empty
/// `public.outbox` takes its place. The publication lists tables, not names, so the new table
/// is not in it and its rows never enter the stream. Expected: the user is told (the relay
/// stops with one line naming the table and the publication, as it does at start-up) rather
/// than the relay streaming on while new events pile up unpublished.
#[tokio::test]
async fn swapped_in_table_is_noticed_while_running() {
    let (pg, broker, mut relay) = start(OUTBOX_DDL, &[ORDER_TOPIC], "").await;
    returning(&pg, INSERT_ORDER).await;
    read(&broker, &mut relay, &[ORDER_TOPIC], 1).await;
    pg.sql(&format!(
        "BEGIN; ALTER TABLE public.outbox RENAME TO outbox_old; \
         ALTER TABLE public.outbox_old RENAME CONSTRAINT outbox_pkey TO outbox_old_pkey; \
         {OUTBOX_DDL}; COMMIT;"
    ))
    .await;
    let id = returning(&pg, INSERT_ORDER).await.remove(0);

    let mut reader = broker.reader(&[ORDER_TOPIC]);
    let deadline = Instant::now() + STOP;
    loop {
        reader.poll();
        if reader
            .records()
            .iter()
            .any(|r| r.header_str("id").as_deref() == Some(id.as_str()))
        {
            return; // Delivered after all: fine.
        }
        if relay.try_exit().is_some() {
            let line = relay.expect_fatal_exit(STOP, "table swap").await;
            assert!(
                line.contains("outbox") && line.contains("publication"),
                "the error should name the table and the publication: {line}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{STOP:?} after a table swap the relay still runs, event {id} in the new \
             public.outbox is not in Kafka and nothing was said; stderr:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Streams one row, applies `change` to a configured column while the relay runs, inserts a
/// row with `insert` (which returns its id), and expects the relay to stop with one line
/// naming `column` and its config key `role`, the slot still holding that row, and nothing
/// more in Kafka.
async fn configured_column_change_stops_the_relay(
    change: &str,
    insert: &str,
    column: &str,
    role: &str,
) {
    let (pg, broker, mut relay) = start(OUTBOX_DDL, &[ORDER_TOPIC], "").await;
    returning(&pg, INSERT_ORDER).await;
    read(&broker, &mut relay, &[ORDER_TOPIC], 1).await;
    assert_caught_up(&pg, &mut relay, "before the change").await;

    pg.sql(change).await;
    let id = returning(&pg, insert).await.remove(0);
    let line = relay.expect_fatal_exit(STOP, change).await;
    assert!(
        line.contains(&format!("{column:?}")) && line.contains(role),
        "{change}: the error should name the column and its config key: {line}"
    );
    assert_slot_holds(&pg, &id, change).await;
    let mut reader = broker.reader(&[ORDER_TOPIC]);
    let recs = settled(&mut reader).await;
    assert_eq!(recs.len(), 1, "{change}: nothing after the stop: {recs:#?}");
}

#[tokio::test]
async fn dropped_configured_column_stops_the_relay_before_the_next_row() {
    configured_column_change_stops_the_relay(
        "ALTER TABLE public.outbox DROP COLUMN payload",
        "INSERT INTO outbox (aggregatetype, aggregateid, type) \
         VALUES ('order', 'k', 'NoPayload') RETURNING id::text",
        "payload",
        "payload_column",
    )
    .await;
}

#[tokio::test]
async fn renamed_configured_column_stops_the_relay_before_the_next_row() {
    configured_column_change_stops_the_relay(
        "ALTER TABLE public.outbox RENAME COLUMN aggregateid TO aggregate_id",
        "INSERT INTO outbox (aggregatetype, aggregate_id, type) \
         VALUES ('order', 'k', 'Moved') RETURNING id::text",
        "aggregateid",
        "key_column",
    )
    .await;
}

#[tokio::test]
async fn other_schema_changes_keep_rows_flowing() {
    let ddl = format!("{OUTBOX_DDL}; ALTER TABLE public.outbox ADD COLUMN note text");
    let (pg, broker, mut relay) = start(&ddl, &[ORDER_TOPIC], "").await;
    let mut ids = Vec::new();
    let mut payloads = Vec::new();
    ids.extend(returning(&pg, INSERT_ORDER).await);
    payloads.push("{}");

    // Each change, then a row in the same transaction and one after it.
    for change in [
        "ALTER TABLE public.outbox DROP COLUMN note",
        "ALTER TABLE public.outbox ADD COLUMN extra int DEFAULT 7",
        "ALTER TABLE public.outbox ADD COLUMN first_in_line text",
        "ALTER TABLE public.outbox RENAME COLUMN extra TO extra2",
    ] {
        let client = pg.client().await;
        client.batch_execute("BEGIN").await.unwrap();
        client.batch_execute(change).await.unwrap();
        let id: String = client.query_one(INSERT_ORDER, &[]).await.unwrap().get(0);
        client.batch_execute("COMMIT").await.unwrap();
        ids.push(id);
        ids.extend(returning(&pg, INSERT_ORDER).await);
        payloads.extend(["{}", "{}"]);
    }
    // The payload becomes text: it is sent as the new type prints it.
    pg.sql("ALTER TABLE public.outbox ALTER COLUMN payload TYPE text USING payload::text")
        .await;
    ids.extend(
        returning(
            &pg,
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('order', 'k', 'Created', 'plain text, not JSON') RETURNING id::text",
        )
        .await,
    );
    payloads.push("plain text, not JSON");
    // The key becomes bytea holding the same bytes: same key, same partition, order kept.
    pg.sql(
        "ALTER TABLE public.outbox ALTER COLUMN aggregateid TYPE bytea \
         USING convert_to(aggregateid, 'UTF8')",
    )
    .await;
    ids.extend(returning(&pg, INSERT_ORDER).await);
    payloads.push("{}");

    let recs = read(&broker, &mut relay, &[ORDER_TOPIC], ids.len()).await;
    let got: Vec<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
    assert_eq!(got, ids, "every row, once, in commit order (one key)");
    let values: Vec<String> = recs.iter().filter_map(Rec::value_str).collect();
    assert_eq!(values, payloads);
    assert!(recs.iter().all(|r| r.key.as_deref() == Some(&b"k"[..])));
    assert_caught_up(&pg, &mut relay, "after the schema changes").await;
}

// ---------------------------------------------------------------------------------------------
// Rows whose topic Kafka cannot take, and database settings that change what rows look like
// ---------------------------------------------------------------------------------------------

/// `aggregatetype` values that make no usable topic: a name Kafka forbids (space, slash) and a
/// valid name for a topic nobody created. Expected: never a silent skip. Either the record is
/// delivered (the broker auto-creates the topic) or the relay stops with one line naming the
/// event and the topic, and the slot stays before it.
#[tokio::test]
async fn rows_for_unusable_topics_are_never_skipped() {
    for (aggregatetype, what) in [
        ("no such/topic", "an illegal topic name"),
        ("missing", "a topic nobody created"),
    ] {
        let (pg, broker, mut relay) = start(OUTBOX_DDL, &[ORDER_TOPIC], "").await;
        let id = returning(
            &pg,
            &format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                 VALUES ('{aggregatetype}', 'k', 'Odd', '{{}}') RETURNING id::text"
            ),
        )
        .await
        .remove(0);
        returning(&pg, INSERT_ORDER).await;
        let topic = format!("outbox.event.{aggregatetype}");
        let deadline = Instant::now() + STOP;
        loop {
            if relay.try_exit().is_some() {
                let line = relay.expect_fatal_exit(STOP, what).await;
                assert!(
                    line.contains(&id) && line.contains(&topic),
                    "{what}: the error should name event {id} and topic {topic:?}: {line}"
                );
                assert_slot_holds(&pg, &id, what).await;
                break;
            }
            let confirmed = pg.confirmed_flush_lsn(SLOT).await.unwrap_or(0);
            let after = pg.current_wal_lsn().await;
            if confirmed >= after {
                // Everything confirmed: the odd record must be in Kafka, and the next one too.
                let mut reader = broker.reader(&[ORDER_TOPIC]);
                let recs = settled(&mut reader).await;
                assert_eq!(recs.len(), 1, "{what}: the event after it: {recs:#?}");
                let mut reader = broker.reader(&[topic.as_str()]);
                let recs = settled(&mut reader).await;
                assert!(
                    recs.iter()
                        .any(|r| r.header_str("id").as_deref() == Some(id.as_str())),
                    "{what}: event {id} for topic {topic:?} was confirmed but is not in Kafka"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: neither delivered nor stopped within {STOP:?}; stderr:\n{}",
                relay.stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A partitioned outbox table (common, so old events can be dropped by partition): rows live
/// in the partitions, and pgoutput describes them under the partitions' names unless the
/// publication publishes via the root. Expected: rows delivered as from a plain table, or a
/// clear start-up error; never a silent skip.
#[tokio::test]
async fn partitioned_outbox_table_is_relayed() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(PARTITIONED_OUTBOX_DDL).await;
    broker.create_topic(ORDER_TOPIC, PARTITIONS).await;
    let mut relay = Relay::start(&config(&pg, &broker, "", ""));
    let deadline = Instant::now() + STARTUP;
    while pg.confirmed_flush_lsn(SLOT).await.is_none() {
        if relay.try_exit().is_some() {
            // A clear start-up refusal is acceptable.
            let line = relay.expect_fatal_exit(STOP, "partitioned outbox").await;
            assert!(line.contains("outbox"), "{line}");
            return;
        }
        assert!(Instant::now() < deadline, "no slot within {STARTUP:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ids = returning(&pg, INSERT_ORDER).await;
    ids.extend(
        returning(
            &pg,
            "INSERT INTO outbox (created, aggregatetype, aggregateid, type, payload) \
             VALUES ('2025-02-10', 'order', 'k', 'Created', '{}') RETURNING id::text",
        )
        .await,
    );
    let after_insert = pg.current_wal_lsn().await;
    let mut reader = broker.reader(&[ORDER_TOPIC]);
    let deadline = Instant::now() + DELIVERY;
    while reader.len() < 2 {
        relay.assert_running();
        let confirmed = pg.confirmed_flush_lsn(SLOT).await.unwrap_or(0);
        if confirmed >= after_insert {
            // The slot says the rows are done; give the consumer a moment to see them.
            let recs = settled(&mut reader).await;
            assert_eq!(
                recs.len(),
                2,
                "rows of a partitioned outbox did not reach Kafka, yet the relay runs on and \
                 confirmed the slot to {} (past them): a silent skip; in Kafka: {recs:#?}",
                lsn_text(confirmed)
            );
        }
        assert!(
            Instant::now() < deadline,
            "not delivered within {DELIVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        reader.poll();
    }
    let recs = settled(&mut reader).await;
    let got: Vec<String> = recs.iter().filter_map(|r| r.header_str("id")).collect();
    assert_eq!(got, ids);
    assert_caught_up(&pg, &mut relay, "partitioned outbox").await;
}

/// `bytea_output = 'escape'` set for the database (a legacy setting some databases carry):
/// the walsender then prints bytea in escape format. Expected: the raw bytes still arrive
/// (the relay can ask for hex in its own session), or the relay stops with one line naming
/// bytea_output and the slot stays before the row; never wrong bytes.
#[tokio::test]
async fn bytea_output_escape_never_yields_wrong_bytes() {
    let ddl = format!("{BYTEA_OUTBOX}; ALTER DATABASE postgres SET bytea_output = 'escape'");
    let (pg, broker, mut relay) = start(&ddl, &[ORDER_TOPIC], "").await;
    let key = vec![0u8, b'\\', b'x', 0xff];
    let payload = b"plain ascii".to_vec();
    let id = returning(
        &pg,
        &format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('order', {}, 'Blob', {}) RETURNING id::text",
            bytea_literal(&key),
            bytea_literal(&payload)
        ),
    )
    .await
    .remove(0);
    let mut reader = broker.reader(&[ORDER_TOPIC]);
    let deadline = Instant::now() + STOP;
    loop {
        reader.poll();
        if !reader.records().is_empty() {
            let recs = settled(&mut reader).await;
            let r = by_id(&recs, &id);
            assert_eq!(r.key.as_deref(), Some(&key[..]));
            assert_eq!(r.value.as_deref(), Some(&payload[..]));
            return;
        }
        if relay.try_exit().is_some() {
            let line = relay.expect_fatal_exit(STOP, "bytea_output = escape").await;
            assert!(line.contains("bytea_output"), "{line}");
            assert_slot_holds(&pg, &id, "bytea_output = escape").await;
            return;
        }
        assert!(Instant::now() < deadline, "neither delivered nor stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
