//! Side by side with Debezium (issue #13): the same outbox writes go through the relay and
//! through Debezium 3.6.1's PostgreSQL connector with its Outbox Event Router (Kafka Connect
//! 4.3.0, standalone, `scripts/debezium.sh`) in three configurations, each with its own slot,
//! publication and topic prefix on the same PostgreSQL and broker. Records are paired by event
//! id and compared field by field: topic (after the prefix), key bytes, partition, headers,
//! value bytes, order per key. What is asserted is what was measured:
//!
//! - `strings` (StringConverter for keys and values, `type` and the extra column `tenant` as
//!   headers, no extended headers): identical in every field, a NULL `tenant` included.
//! - `defaults` (Debezium's documented defaults, JSON converter with schemas): same topic,
//!   same `id` header and order per key; the key and the value are JSON envelopes
//!   (`{"schema":...,"payload":...}`, the payload an escaped JSON string), so the partition is
//!   the key hash of other bytes; no `type` header; four `__debezium.context.*` headers.
//! - `raw-json` (`table.expand.json.payload=true`, JSON converter without schemas): the key is
//!   a JSON string (quoted), the value compact JSON with null fields and empty arrays dropped,
//!   scalars and mixed arrays left as escaped strings, a NULL payload as the 4 bytes `null`;
//!   headers as with defaults; and a number beyond 64 bits stops the connector's task.
//!
//! Debezium's jars come from Maven Central; if they cannot be fetched the test fails saying so.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    java_murmur2_partition, relay_beside, Broker, Debezium, DebeziumMode, Pg, Rec, OUTBOX_DDL,
    QUIET,
};

const PARTITIONS: i32 = 3;
const AGGREGATES: [&str; 2] = ["order", "customer"];
const BULK: usize = 1000;
/// Generous: three JVMs start at once on a small, shared machine.
const DELIVERY: Duration = Duration::from_secs(150);
/// `strings` mode's `type` header plus the extra column as a header of its own name.
const TENANT_PLACEMENT: &str =
    "transforms.outbox.table.fields.additional.placement=type:header:type,tenant:header:tenant";
const MODES: [DebeziumMode; 3] = [
    DebeziumMode::Strings,
    DebeziumMode::Defaults,
    DebeziumMode::RawJson,
];

/// One outbox row and what Debezium's `raw-json` mode sends as its value (`None`: no record).
struct Row {
    id: String,
    aggregate: &'static str,
    key: String,
    kind: &'static str,
    /// The extra header column (`tenant`).
    tenant: Option<&'static str>,
    /// The payload as an SQL literal (`NULL` or a quoted jsonb text).
    payload_sql: String,
    raw_json_value: Option<Vec<u8>>,
}

fn row(
    n: u32,
    aggregate: &'static str,
    key: &str,
    kind: &'static str,
    payload: Option<&str>,
    raw: &str,
) -> Row {
    Row {
        id: format!("00000000-0000-0000-0000-{n:012}"),
        aggregate,
        key: key.to_owned(),
        kind,
        tenant: match n % 3 {
            0 => None,
            1 => Some("acme"),
            _ => Some("mandant-ü"),
        },
        payload_sql: payload.map_or("NULL".into(), |p| format!("'{}'", p.replace('\'', "''"))),
        raw_json_value: Some(raw.as_bytes().to_vec()),
    }
}

fn insert_sql(rows: &[&Row]) -> String {
    let values: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "('{}', '{}', '{}', '{}', {}, {})",
                r.id,
                r.aggregate,
                r.key.replace('\'', "''"),
                r.kind,
                r.payload_sql,
                r.tenant.map_or("NULL".into(), |t| format!("'{t}'"))
            )
        })
        .collect();
    format!(
        "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload, tenant) VALUES {}",
        values.join(", ")
    )
}

/// The e2e shapes and the awkward ones, with what `raw-json` makes of each (measured).
fn rows() -> (Vec<Row>, Vec<Row>) {
    let singles = vec![
        // jsonb keeps keys ordered by length; expansion drops the null field and compacts.
        row(
            1,
            "order",
            "42",
            "OrderCreated",
            Some(
                r#"{"orderId": 42, "total": 12.5, "items": [{"sku": "a", "qty": 2}], "note": null}"#,
            ),
            r#"{"items":[{"qty":2,"sku":"a"}],"total":12.5,"orderId":42}"#,
        ),
        // NULL payload: the relay sends a null value, raw-json the 4 bytes `null`.
        row(2, "customer", "7", "CustomerRegistered", None, "null"),
        row(
            3,
            "order",
            "ключ-✓",
            "OrderCreated",
            Some(r#"{"name": "Zoë ✓ \"q\"\t<&>"}"#),
            r#"{"name":"Zoë ✓ \"q\"\t<&>"}"#,
        ),
        // A JSON scalar is not expanded: it stays an escaped string.
        row(
            6,
            "order",
            "45",
            "Scalar",
            Some(r#""just a string""#),
            r#""\"just a string\"""#,
        ),
        row(7, "order", "45", "Number", Some("42"), r#""42""#),
        // An array of mixed types cannot be given a schema: the whole payload stays a string.
        row(
            8,
            "order",
            "45",
            "MixedArray",
            Some(r#"{"arr": [1, "two"]}"#),
            r#""{\"arr\": [1, \"two\"]}""#,
        ),
        // An empty array has no element schema: the field is dropped.
        row(
            9,
            "order",
            "45",
            "EmptyArray",
            Some(r#"{"arr": [], "n": 1}"#),
            r#"{"n":1}"#,
        ),
        row(
            10,
            "customer",
            "7",
            "Nested",
            Some(r#"{"a": {"b": {"c": true}}}"#),
            r#"{"a":{"b":{"c":true}}}"#,
        ),
    ];
    // Inserted and deleted in one transaction, and deleted in a later one: both published.
    let deleted = vec![
        row(
            4,
            "order",
            "43",
            "DeletedSameTx",
            Some(r#"{"a": 1}"#),
            r#"{"a":1}"#,
        ),
        row(
            5,
            "order",
            "44",
            "DeletedLater",
            Some(r#"{"b": 2}"#),
            r#"{"b":2}"#,
        ),
    ];
    (singles, deleted)
}

fn bulk() -> Vec<Row> {
    (1..=BULK)
        .map(|i| Row {
            id: format!("00000000-0000-0000-0001-{i:012}"),
            aggregate: "order",
            key: format!("k{}", i % 10),
            kind: "Bulk",
            tenant: Some("acme"),
            payload_sql: format!("'{{\"i\": {i}}}'"),
            raw_json_value: Some(format!("{{\"i\":{i}}}").into_bytes()),
        })
        .collect()
}

/// A number beyond 64 bits: fine for the relay and the string modes, fatal for raw-json.
fn big_number() -> Row {
    Row {
        raw_json_value: None,
        ..row(
            99,
            "order",
            "46",
            "BigNumber",
            Some(r#"{"big": 12345678901234567890}"#),
            "",
        )
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Records of one system, by event id (the `id` header).
fn by_id(recs: &[Rec], prefix: &str) -> BTreeMap<String, Rec> {
    let mut out = BTreeMap::new();
    // The relay's topics start with "outbox.", Debezium's with "debezium-<mode>.".
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

/// Event ids per key in partition order: what a consumer of one key sees.
fn order_per_key(recs: &BTreeMap<String, Rec>) -> BTreeMap<Vec<u8>, Vec<String>> {
    let mut sorted: Vec<&Rec> = recs.values().collect();
    sorted
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut out: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for r in sorted {
        // Grouped by the key bytes this system sent (Debezium's may be a JSON envelope);
        // the sequences are then compared without their keys.
        out.entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(r.header_str("id").unwrap());
    }
    out
}

/// Per field, how many pairs differ and the first example.
#[derive(Default)]
struct FieldDiffs(BTreeMap<&'static str, (usize, String)>);

impl FieldDiffs {
    fn note(&mut self, field: &'static str, same: bool, example: impl FnOnce() -> String) {
        let e = self.0.entry(field).or_insert((0, String::new()));
        if !same {
            if e.0 == 0 {
                e.1 = example();
            }
            e.0 += 1;
        }
    }
}

/// Headers as `name=value` text, for messages.
fn header_text(r: &Rec) -> String {
    let hs: Vec<String> = r
        .headers
        .iter()
        .map(|(k, v)| format!("{k}={}", lossy(v)))
        .collect();
    hs.join(",")
}

fn lossy(b: &Option<Vec<u8>>) -> String {
    b.as_deref()
        .map_or("<null>".into(), |b| String::from_utf8_lossy(b).into_owned())
}

#[tokio::test]
async fn debezium_records_beside_the_relays_field_by_field() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    // An extra column sent as a header: the relay's `header_columns`, Debezium's
    // `table.fields.additional.placement` (strings mode).
    pg.sql("ALTER TABLE public.outbox ADD COLUMN tenant text")
        .await;
    let (mut relay, topics) = relay_beside(
        &pg,
        &broker,
        std::iter::once(String::new()).chain(MODES.iter().map(|m| m.prefix())),
        &AGGREGATES,
        PARTITIONS,
        "header_columns = [\"tenant\"]",
    )
    .await;
    let mut workers = Vec::new();
    for mode in MODES {
        let sets: &[&str] = if mode == DebeziumMode::Strings {
            &[TENANT_PLACEMENT]
        } else {
            &[]
        };
        workers
            .push(Debezium::start_with(&pg, &broker.bootstrap(), mode, &mode.prefix(), sets).await);
    }

    let (singles, deleted) = rows();
    let bulk = bulk();
    for r in &singles {
        pg.sql(&insert_sql(&[r])).await;
    }
    pg.sql(&format!(
        "BEGIN; {}; DELETE FROM public.outbox WHERE id = '{}'; COMMIT",
        insert_sql(&[&deleted[0]]),
        deleted[0].id
    ))
    .await;
    pg.sql(&insert_sql(&[&deleted[1]])).await;
    pg.sql(&format!(
        "DELETE FROM public.outbox WHERE id = '{}'",
        deleted[1].id
    ))
    .await;
    pg.sql(&insert_sql(&bulk.iter().collect::<Vec<_>>())).await;
    let written: Vec<&Row> = singles.iter().chain(&deleted).chain(&bulk).collect();
    let n = written.len();

    // Everything arrives in all four; the first record of each worker is timed from its start.
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut reader = broker.reader(&topic_refs);
    let mut first: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + DELIVERY;
    loop {
        reader.poll();
        let recs = reader.records();
        for w in &workers {
            if !first.contains_key(w.mode.arg())
                && recs.iter().any(|r| r.topic.starts_with(&w.mode.prefix()))
            {
                first.insert(w.mode.arg().into(), w.started.elapsed());
            }
        }
        let counts: Vec<usize> = std::iter::once("outbox.".to_string())
            .chain(MODES.iter().map(|m| m.prefix()))
            .map(|p| by_id(&recs, &p).len())
            .collect();
        if counts.iter().all(|&c| c >= n) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all records arrived within {DELIVERY:?}: relay, {MODES:?} have {counts:?} of {n}"
        );
        relay.assert_running();
        for w in &mut workers {
            w.assert_running();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("start to first record, three workers starting at once (informational): {first:?}");

    // Last, in a transaction of its own: a number beyond 64 bits.
    let big = big_number();
    pg.sql(&insert_sql(&[&big])).await;
    let raw_worker = workers
        .iter()
        .find(|w| w.mode == DebeziumMode::RawJson)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        reader.poll();
        let recs = reader.records();
        let others = std::iter::once("outbox.".to_string())
            .chain([
                DebeziumMode::Strings.prefix(),
                DebeziumMode::Defaults.prefix(),
            ])
            .all(|p| by_id(&recs, &p).contains_key(&big.id));
        let log = raw_worker.log();
        if others && log.contains("Task threw an uncaught and unrecoverable exception") {
            assert!(
                log.contains(
                    "Invalid Java object for schema with type FLOAT64: class java.math.BigDecimal"
                ),
                "raw-json's task stopped for another reason:\n{log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the big number: relay/strings/defaults delivered it: {others}; raw-json's task did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.settle(QUIET).await;
    let recs = reader.records();

    let relay_recs = by_id(&recs, "outbox.");
    assert_eq!(relay_recs.len(), n + 1, "the relay's records");
    let rows: BTreeMap<&str, &Row> = written
        .iter()
        .copied()
        .chain([&big])
        .map(|r| (r.id.as_str(), r))
        .collect();
    let relay_order = order_per_key(&relay_recs);
    let mut failures = Vec::new();
    for mode in MODES {
        let prefix = mode.prefix();
        let dbz = by_id(&recs, &prefix);
        let expected_ids: Vec<&str> = rows
            .values()
            .filter(|r| mode != DebeziumMode::RawJson || r.raw_json_value.is_some())
            .map(|r| r.id.as_str())
            .collect();
        let got: Vec<&str> = dbz.keys().map(String::as_str).collect();
        if got != expected_ids {
            failures.push(format!(
                "{mode:?}: events {got:?}, expected {expected_ids:?}"
            ));
            continue;
        }
        let mut diffs = FieldDiffs::default();
        for (id, d) in &dbz {
            let r = &relay_recs[id];
            let row = rows[id.as_str()];
            diffs.note(
                "topic after the prefix",
                d.topic.strip_prefix(&prefix) == Some(&r.topic),
                || format!("{} vs {}", d.topic, r.topic),
            );
            diffs.note("key", d.key == r.key, || {
                format!("{} vs {}", lossy(&d.key), lossy(&r.key))
            });
            diffs.note("partition", d.partition == r.partition, || {
                format!("{} vs {} (key {})", d.partition, r.partition, lossy(&d.key))
            });
            diffs.note("headers", d.headers == r.headers, || {
                format!("{} vs {}", header_text(d), header_text(r))
            });
            diffs.note("value", d.value == r.value, || {
                format!("{} vs {}", lossy(&d.value), lossy(&r.value))
            });

            // Where Debezium's partition comes from, in every mode: Kafka's Java partitioner
            // over the key bytes it sends.
            let key = d.key.as_deref().expect("Debezium sends a key");
            if d.partition != java_murmur2_partition(key, PARTITIONS) {
                failures.push(format!(
                    "{mode:?} {id}: partition {} is not the Java partitioner's for its key",
                    d.partition
                ));
            }
            // The exact bytes each mode sends, derived from the relay's record.
            let (key_ok, value_ok, headers_ok) = match mode {
                DebeziumMode::Strings => {
                    (d.key == r.key, d.value == r.value, d.headers == r.headers)
                }
                DebeziumMode::Defaults | DebeziumMode::RawJson => {
                    let k = json_string(&row.key);
                    let key_want = if mode == DebeziumMode::Defaults {
                        format!(
                            r#"{{"schema":{{"type":"string","optional":false}},"payload":{k}}}"#
                        )
                    } else {
                        k
                    };
                    let value_want = if mode == DebeziumMode::Defaults {
                        let payload = r.value_str().map_or("null".into(), |v| json_string(&v));
                        Some(format!(
                            r#"{{"schema":{{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1}},"payload":{payload}}}"#
                        ).into_bytes())
                    } else {
                        row.raw_json_value.clone()
                    };
                    let names: Vec<&str> = d.headers.iter().map(|(k, _)| k.as_str()).collect();
                    let headers_ok = d.header_str("id") == r.header_str("id")
                        && d.header("type").is_none()
                        && names.len() == 5
                        && [
                            "__debezium.context.connectorLogicalName",
                            "__debezium.context.taskId",
                            "__debezium.context.connectorName",
                            "__debezium.context.runId",
                        ]
                        .iter()
                        .all(|h| names.contains(h));
                    (
                        d.key.as_deref() == Some(key_want.as_bytes()),
                        d.value == value_want,
                        headers_ok,
                    )
                }
            };
            // The extra column: as a header in both (strings), its text as the value.
            if mode == DebeziumMode::Strings {
                if d.header("tenant").flatten() != row.tenant.map(str::as_bytes) {
                    failures.push(format!(
                        "{mode:?} {id}: tenant header {} for column {:?}",
                        header_text(d),
                        row.tenant
                    ));
                }
                if row.tenant.is_none() && id.ends_with("000000000003") {
                    eprintln!(
                        "a NULL header column: Debezium strings {}; the relay {}",
                        header_text(d),
                        header_text(r)
                    );
                }
            }
            for (what, ok) in [
                ("key", key_ok),
                ("value", value_ok),
                ("headers", headers_ok),
            ] {
                if !ok {
                    failures.push(format!(
                        "{mode:?} {id} ({}): unexpected {what}: key {}, headers {}, value {}; the relay's: key {}, value {}",
                        row.kind, lossy(&d.key), header_text(d), lossy(&d.value), lossy(&r.key), lossy(&r.value)
                    ));
                }
            }
        }
        // Order per key: the relay's, for every key Debezium has (keys compared by event ids).
        let mut relay_seq: Vec<Vec<String>> = relay_order
            .values()
            .map(|ids| {
                ids.iter()
                    .filter(|i| dbz.contains_key(*i))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            // A key all of whose events Debezium lacks (the big number in raw-json) has no
            // sequence there.
            .filter(|ids| !ids.is_empty())
            .collect();
        let mut dbz_seq: Vec<Vec<String>> = order_per_key(&dbz).into_values().collect();
        relay_seq.sort();
        dbz_seq.sort();
        let order_same = relay_seq == dbz_seq;
        if !order_same {
            failures.push(format!("{mode:?}: order per key differs from the relay's"));
        }
        eprintln!("{mode:?} ({} events) against the relay:", dbz.len());
        for (field, (count, example)) in &diffs.0 {
            if *count == 0 {
                eprintln!("  {field}: identical");
            } else {
                eprintln!("  {field}: differs in {count}, e.g. {example}");
            }
        }
        eprintln!(
            "  order per key: {}",
            if order_same { "identical" } else { "DIFFERS" }
        );
        // What is identical, per mode (partitions differ wherever the key bytes hash apart).
        let must_match: &[&str] = match mode {
            DebeziumMode::Strings => &[
                "topic after the prefix",
                "key",
                "partition",
                "headers",
                "value",
            ],
            DebeziumMode::Defaults | DebeziumMode::RawJson => &["topic after the prefix"],
        };
        for field in must_match {
            if diffs.0[field].0 != 0 {
                failures.push(format!("{mode:?}: {field} differs: {}", diffs.0[field].1));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} unexpected differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
