//! `[[outbox]] format = "debezium-json"` against Debezium itself (issue #13): the same outbox
//! writes go through the relay with that format and through Debezium 3.6.1's Outbox Event
//! Router at its defaults (Kafka Connect's JsonConverter with schemas, `scripts/debezium.sh
//! --mode defaults`), and every record's key bytes, value bytes, partition and `id` header
//! must be identical: a consumer of Debezium's defaults then needs no change. Once with the
//! outbox table of `migrations/001_outbox.sql` (jsonb payload), once with a text payload.
//!
//! What still differs, by design: Debezium adds four `__debezium.context.*` headers (its
//! connector's name, task and run), which the relay has no counterpart for, and the relay
//! keeps its `type` header, which Debezium's defaults leave out.
//!
//! Debezium's jars come from Maven Central; if they cannot be fetched the test fails saying so.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    basic_config, java_murmur2_partition, relay_beside, Broker, Debezium, DebeziumMode, Pg, Rec,
    Relay, OUTBOX_DDL, QUIET,
};

const PARTITIONS: i32 = 3;
const AGGREGATES: [&str; 2] = ["order", "customer"];
const BULK: usize = 300;
/// Generous: a JVM starts on a small, shared machine.
const DELIVERY: Duration = Duration::from_secs(150);

/// One outbox row, its key and payload as SQL expressions (so that control characters can be
/// written with `E'...'`).
struct Row {
    id: String,
    aggregate: &'static str,
    key_sql: String,
    payload_sql: String,
}

fn row(n: u32, aggregate: &'static str, key_sql: &str, payload_sql: &str) -> Row {
    Row {
        id: format!("00000000-0000-0000-0000-{n:012}"),
        aggregate,
        key_sql: key_sql.to_owned(),
        payload_sql: payload_sql.to_owned(),
    }
}

fn insert_sql(rows: &[&Row]) -> String {
    let values: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "('{}', '{}', {}, 'Event', {})",
                r.id, r.aggregate, r.key_sql, r.payload_sql
            )
        })
        .collect();
    format!(
        "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) VALUES {}",
        values.join(", ")
    )
}

/// The shapes whose escaping could differ: quotes, backslashes, control characters (a text
/// key can hold them raw; jsonb holds them escaped), non-ASCII (two-, three- and four-byte
/// UTF-8, and U+2028/U+2029, which some encoders escape), an empty key, NULL, JSON scalars.
fn rows() -> Vec<Row> {
    vec![
        row(
            1,
            "order",
            "'42'",
            r#"'{"orderId": 42, "total": 12.5, "note": null, "items": [{"sku": "a", "qty": 2}]}'"#,
        ),
        row(2, "customer", "'7'", "NULL"),
        row(
            3,
            "order",
            r#"'a"b\c'"#,
            r#"'{"s": "say \"hi\" \\ back\ttab\nnl \u0001 \u001f \u007f / </script>"}'"#,
        ),
        row(
            4,
            "order",
            r"E'tab\there nl\nhere cr\r bs\b ff\f \x01 \x1f \x7f end'",
            r#"'"just a string"'"#,
        ),
        row(
            5,
            "customer",
            "'ключ-✓ 🚀 Zoë'",
            r#"'{"name": "Zoë ✓ 🚀", "sep": "\u2028\u2029"}'"#,
        ),
        row(6, "order", "E'line\\u2028sep\\u2029end'", "'42'"),
        row(7, "order", "''", "'[1, \"two\", null, true, 1.5e300]'"),
        row(
            8,
            "order",
            "'46'",
            r#"'{"big": 12345678901234567890, "neg": -0.0, "empty": {}, "arr": []}'"#,
        ),
    ]
}

fn bulk() -> Vec<Row> {
    (1..=BULK)
        .map(|i| Row {
            id: format!("00000000-0000-0000-0001-{i:012}"),
            aggregate: AGGREGATES[i % 2],
            key_sql: format!("'k{}'", i % 17),
            payload_sql: format!("'{{\"i\": {i}}}'"),
        })
        .collect()
}

/// Records of one system, by event id (the `id` header).
fn by_id(recs: &[Rec], prefix: &str) -> BTreeMap<String, Rec> {
    let mut out = BTreeMap::new();
    for r in recs.iter().filter(|r| r.topic.starts_with(prefix)) {
        let id = r
            .header_str("id")
            .unwrap_or_else(|| panic!("a record without id header: {r:?}"));
        assert!(
            out.insert(id.clone(), r.clone()).is_none(),
            "{prefix}: event {id} twice"
        );
    }
    out
}

/// Bytes as Rust would write them in a byte string: exact, and readable in a report.
fn shown(b: &Option<Vec<u8>>) -> String {
    match b {
        None => "<null>".into(),
        Some(b) => format!("b\"{}\"", b.escape_ascii()),
    }
}

#[tokio::test]
async fn debezium_json_format_sends_the_bytes_debeziums_defaults_send() {
    compare(None, rows()).await;
}

/// A text payload column: Debezium's schema has no name then, the text is escaped as is.
#[tokio::test]
async fn debezium_json_format_matches_debezium_on_a_text_payload_column() {
    let rows = vec![
        row(1, "order", "'42'", r#"'plain "text" \ with a backslash'"#),
        row(2, "customer", "'7'", "NULL"),
        row(3, "order", "'43'", r"E'controls \t\n\r\b\f \x01 \x1f \x7f'"),
        row(4, "order", "'44'", "'Zoë ✓ 🚀 \u{2028} {\"not\": json'"),
        row(5, "order", "'45'", "''"),
    ];
    compare(
        Some("ALTER TABLE public.outbox ALTER COLUMN payload TYPE text"),
        rows,
    )
    .await;
}

/// Writes `singles` and the bulk rows (after `alter` on the outbox table, if any), through
/// the relay with `format = "debezium-json"` and Debezium at its defaults, and asserts both
/// systems' records identical in key bytes, value bytes, partition and `id` header.
async fn compare(alter: Option<&str>, singles: Vec<Row>) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    if let Some(alter) = alter {
        pg.sql(alter).await;
    }
    let mode = DebeziumMode::Defaults;
    let (mut relay, topics) = relay_beside(
        &pg,
        &broker,
        [String::new(), mode.prefix()],
        &AGGREGATES,
        PARTITIONS,
        "format = \"debezium-json\"",
    )
    .await;
    let mut debezium = Debezium::start(&pg, &broker.bootstrap(), mode).await;

    let bulk = bulk();
    for r in &singles {
        pg.sql(&insert_sql(&[r])).await;
    }
    pg.sql(&insert_sql(&bulk.iter().collect::<Vec<_>>())).await;
    let n = singles.len() + bulk.len();

    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut reader = broker.reader(&topic_refs);
    let deadline = Instant::now() + DELIVERY;
    loop {
        reader.poll();
        let recs = reader.records();
        let counts = (
            by_id(&recs, "outbox.").len(),
            by_id(&recs, &mode.prefix()).len(),
        );
        if counts.0 >= n && counts.1 >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all records arrived within {DELIVERY:?}: relay, Debezium have {counts:?} of {n}"
        );
        relay.assert_running();
        debezium.assert_running();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.settle(QUIET).await;
    let recs = reader.records();
    let relay_recs = by_id(&recs, "outbox.");
    let dbz = by_id(&recs, &mode.prefix());
    assert_eq!((relay_recs.len(), dbz.len()), (n, n), "records per system");

    let mut failures = Vec::new();
    for (id, d) in &dbz {
        let r = &relay_recs[id];
        // The awkward ones are printed, so the bytes compared are on record.
        if id.starts_with("00000000-0000-0000-0000-") {
            eprintln!(
                "{id}: Debezium key {}\n    value {}\n  relay key {}\n    value {}\n  partitions {} / {}",
                shown(&d.key),
                shown(&d.value),
                shown(&r.key),
                shown(&r.value),
                d.partition,
                r.partition
            );
        }
        let same = [
            (
                "topic after the prefix",
                d.topic.strip_prefix(&mode.prefix()) == Some(&r.topic),
            ),
            ("key", d.key == r.key),
            ("value", d.value == r.value),
            ("partition", d.partition == r.partition),
            ("id header", d.header("id") == r.header("id")),
        ];
        for (field, ok) in same {
            if !ok {
                failures.push(format!(
                    "{id} {field}: Debezium key {} value {} partition {}; relay key {} value {} partition {}",
                    shown(&d.key),
                    shown(&d.value),
                    d.partition,
                    shown(&r.key),
                    shown(&r.value),
                    r.partition
                ));
            }
        }
        // Both follow Kafka's Java partitioner over the enveloped key bytes.
        let key = r.key.as_deref().expect("the relay sends a key");
        if r.partition != java_murmur2_partition(key, PARTITIONS) {
            failures.push(format!(
                "{id}: the relay's partition is not the Java partitioner's for its key"
            ));
        }
        // The headers that differ by design, and nothing else.
        let names =
            |rec: &Rec| -> Vec<String> { rec.headers.iter().map(|(k, _)| k.clone()).collect() };
        let dbz_extra: Vec<String> = names(d)
            .into_iter()
            .filter(|h| h != "id" && !h.starts_with("__debezium.context."))
            .collect();
        if !dbz_extra.is_empty() || names(r) != ["id", "type"] {
            failures.push(format!(
                "{id}: headers: Debezium {:?}, relay {:?}",
                names(d),
                names(r)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{n} records: key bytes, value bytes, partition and id header identical to Debezium's"
    );
}

/// A table whose key may be NULL, or whose payload may not, would get other envelopes from
/// Debezium (`"optional"` says which): the relay refuses to start, naming the fix, rather
/// than send bytes that differ.
#[tokio::test]
async fn debezium_json_format_refuses_a_table_it_cannot_match() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let config = basic_config(&pg.url(), "127.0.0.1:9").replace(
        "table = \"public.outbox\"\n",
        "table = \"public.outbox\"\nformat = \"debezium-json\"\n",
    );
    for (alter, needles) in [
        (
            "ALTER TABLE public.outbox ALTER COLUMN aggregateid DROP NOT NULL",
            ["key_column \"aggregateid\"", "NOT NULL", "SET NOT NULL"],
        ),
        (
            "ALTER TABLE public.outbox ALTER COLUMN aggregateid SET NOT NULL; \
             ALTER TABLE public.outbox ALTER COLUMN payload SET NOT NULL",
            ["payload_column \"payload\"", "nullable", "DROP NOT NULL"],
        ),
        (
            "ALTER TABLE public.outbox ALTER COLUMN payload DROP NOT NULL; \
             ALTER TABLE public.outbox ALTER COLUMN payload TYPE bytea USING NULL",
            [
                "payload_column \"payload\"",
                "json, jsonb, text or varchar",
                "format = \"plain\"",
            ],
        ),
    ] {
        pg.sql(alter).await;
        let mut relay = Relay::start(&config);
        let line = relay
            .expect_fatal_exit(Duration::from_secs(60), alter)
            .await;
        for needle in needles {
            assert!(line.contains(needle), "{alter}: {line}");
        }
    }
}
