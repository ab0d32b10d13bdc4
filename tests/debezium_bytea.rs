//! A `bytea` payload column beside Debezium (issue #13): Debezium 3.6.1's `strings` settings
//! with the value converter swapped for Kafka's `ByteArrayConverter`, and the relay, on the
//! same writes to one outbox table whose payload is `bytea`. Records are paired by event id and
//! must be identical in key, partition, headers and value: the raw bytes as stored, a NULL
//! payload as a null value. (With the `StringConverter` Debezium sends the Java text
//! `java.nio.HeapByteBuffer[pos=0 lim=3 cap=3]` instead of the bytes, and with its defaults a
//! JSON envelope with the bytes in base64: measured once by hand, see docs/debezium.md.)
//!
//! Debezium's jars come from Maven Central; if they cannot be fetched the test fails saying so.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Broker, Debezium, DebeziumMode, Pg, Rec, Relay, QUIET, SLOT};

const TOPIC: &str = "outbox.event.blob";
const PARTITIONS: i32 = 3;
const BYTES: &str = "value.converter=org.apache.kafka.connect.converters.ByteArrayConverter";
/// A JVM starting on a small, shared machine.
const DELIVERY: Duration = Duration::from_secs(120);

/// Records of one system by event id.
fn by_id<'r>(recs: &'r [Rec], topic: &str) -> BTreeMap<String, &'r Rec> {
    recs.iter()
        .filter(|r| r.topic == topic)
        .map(|r| (r.header_str("id").expect("an id header"), r))
        .collect()
}

#[tokio::test]
async fn bytea_payloads_are_identical_to_debeziums_with_the_byte_array_converter() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(
        "CREATE TABLE public.outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload bytea)",
    )
    .await;
    let mode = DebeziumMode::Strings;
    let dbz_topic = format!("{}{TOPIC}", mode.prefix());
    for t in [TOPIC, &dbz_topic] {
        broker.create_topic(t, PARTITIONS).await;
    }
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n[[outbox]]\ntable = \"public.outbox\"\n\n[kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let mut relay = Relay::start(&config);
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(60))
        .await;
    let mut debezium =
        Debezium::start_with(&pg, &broker.bootstrap(), mode, &mode.prefix(), &[BYTES]).await;

    // Bytes that are not UTF-8, a NUL, text, empty, a 64 KiB blob and NULL.
    let big: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let payloads: Vec<Option<Vec<u8>>> = vec![
        Some(vec![0x00, 0x01, 0x02, 0xff, 0xfe]),
        Some(b"\xc3\x28 not utf-8 \x00 end".to_vec()),
        Some(b"plain text".to_vec()),
        Some(Vec::new()),
        Some(big),
        None,
    ];
    let client = pg.client().await;
    let mut written = BTreeMap::new();
    for (i, payload) in payloads.iter().enumerate() {
        let id = format!("00000000-0000-0000-0000-{i:012}");
        client
            .execute(
                "INSERT INTO public.outbox VALUES ($1::text::uuid, 'blob', $2, 'Stored', $3)",
                &[&id, &format!("blob-{i}"), payload],
            )
            .await
            .expect("insert a bytea row");
        written.insert(id, payload.clone());
    }

    let mut reader = broker.reader(&[TOPIC, &dbz_topic]);
    let deadline = Instant::now() + DELIVERY;
    loop {
        reader.poll();
        let recs = reader.records();
        let (r, d) = (by_id(&recs, TOPIC).len(), by_id(&recs, &dbz_topic).len());
        if r >= written.len() && d >= written.len() {
            break;
        }
        relay.assert_running();
        debezium.assert_running();
        assert!(
            Instant::now() < deadline,
            "within {DELIVERY:?}: the relay sent {r}, Debezium {d} of {}",
            written.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    reader.settle(QUIET).await;
    let recs = reader.records();
    let (relay_recs, dbz_recs) = (by_id(&recs, TOPIC), by_id(&recs, &dbz_topic));
    assert_eq!(relay_recs.len(), written.len(), "the relay's records");
    assert_eq!(dbz_recs.len(), written.len(), "Debezium's records");
    for (id, payload) in &written {
        let (r, d) = (relay_recs[id], dbz_recs[id]);
        assert_eq!(
            &r.value, payload,
            "{id}: the relay's value is not the stored bytes"
        );
        assert_eq!(d.value, r.value, "{id}: value");
        assert_eq!(d.key, r.key, "{id}: key");
        assert_eq!(d.partition, r.partition, "{id}: partition");
        assert_eq!(d.headers, r.headers, "{id}: headers");
    }
    eprintln!(
        "bytea: {} records each, key, partition, headers and value identical (ByteArrayConverter)",
        written.len()
    );
}
