//! Checks the test harness itself, without the relay: PostgreSQL comes up ready for logical
//! replication (and SCRAM), Apache Kafka accepts topics, producers and consumers, and
//! librdkafka's `murmur2_random` partitioner, Kafka's own Java producer and our Java-murmur2
//! model agree on partitions.

mod common;

use std::time::Duration;

use common::{java_murmur2, java_murmur2_partition, Broker, Pg};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Kafka's own `UtilsTest.testMurmur2` vectors (Java signed ints).
#[test]
fn java_murmur2_matches_kafka_vectors() {
    let cases: [(&[u8], i32); 7] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
        (&[12, 42, 56, 24, 109, 111], 274_204_207),
    ];
    for (data, want) in cases {
        assert_eq!(java_murmur2(data), want, "murmur2({data:?})");
    }
    // toPositive(h) % n, as the Java producer computes it.
    assert_eq!(
        java_murmur2_partition(b"21", 8),
        (-973_932_308i32 & 0x7fff_ffff) % 8
    );
    assert_eq!(java_murmur2_partition(b"abc", 7), 479_470_107 % 7);
}

#[tokio::test]
async fn postgres_cluster_is_ready_for_logical_replication() {
    let pg = Pg::start();
    let client = pg.client().await;
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "logical");
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(encoding, "UTF8");

    pg.sql(common::OUTBOX_DDL).await;
    assert_eq!(pg.confirmed_flush_lsn("harness").await, None);
    pg.sql("SELECT pg_create_logical_replication_slot('harness', 'pgoutput')")
        .await;
    let created = pg.confirmed_flush_lsn("harness").await.expect("slot LSN");
    pg.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('a', 'b', 'c', '{}')")
        .await;
    let now = pg.current_wal_lsn().await;
    assert!(
        now > created,
        "{} <= {}",
        common::lsn_text(now),
        common::lsn_text(created)
    );
    // Nothing consumes the slot, so it must not move.
    let (reached, last) = pg
        .wait_confirmed("harness", now, Duration::from_millis(300))
        .await;
    assert!(!reached);
    assert_eq!(last, Some(created));

    // SCRAM: the password is required for normal and replication connections alike.
    pg.create_scram_role("relay_user", "Relay-Pass-42").await;
    let with_pw = pg.url_for("relay_user", "Relay-Pass-42");
    common::connect(&with_pw)
        .await
        .expect("SCRAM login with the password");
    let wrong_pw = pg.url_for("relay_user", "wrong");
    let err = common::connect(&wrong_pw)
        .await
        .expect_err("login with a wrong password must fail");
    let code = err.as_db_error().map(|e| e.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("28P01"), "{err:?}"); // invalid_password
    for (url, ok) in [(&with_pw, true), (&wrong_pw, false)] {
        let out = std::process::Command::new("psql")
            .arg(format!("{url}?replication=database"))
            .args(["-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM"])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        assert_eq!(
            out.status.success(),
            ok,
            "replication connection to {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn kafka_partitions_keys_like_the_java_client() {
    let broker = Broker::start();
    broker.create_topic("smoke", 8).await;
    broker.create_topic("smoke-empty", 3).await;

    // What the relay's producer looks like: Java-compatible partitioning, idempotent.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");

    let keys: Vec<String> = (0..40)
        .map(|i| format!("key-{i}"))
        .chain(["ключ-ü-🚀".to_owned(), String::new(), "21".to_owned()])
        .collect();
    for (i, key) in keys.iter().enumerate() {
        let value = format!("{{\"n\": {i}}}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(&format!("id-{i}")),
            })
            .insert(Header {
                key: "type",
                value: Some("Created"),
            });
        let record = FutureRecord::to("smoke")
            .key(key.as_bytes())
            .payload(&value)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {key:?}: {e}"));
    }
    // A record with neither key nor value.
    producer
        .send(
            FutureRecord::<(), ()>::to("smoke").partition(5),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce empty: {e}"));

    let recs = broker
        .read_all(
            &["smoke", "smoke-empty"],
            keys.len() + 1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(recs.len(), keys.len() + 1, "{recs:#?}");
    for (i, key) in keys.iter().enumerate() {
        let id = format!("id-{i}");
        let rec = recs
            .iter()
            .find(|r| r.header_str("id").as_deref() == Some(&id))
            .unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(rec.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(rec.value_str(), Some(format!("{{\"n\": {i}}}")));
        assert_eq!(rec.header_str("type").as_deref(), Some("Created"));
        assert_eq!(
            rec.partition,
            java_murmur2_partition(key.as_bytes(), 8),
            "key {key:?}"
        );
    }
    let bare = recs
        .iter()
        .find(|r| r.headers.is_empty())
        .expect("bare record");
    assert_eq!((bare.partition, &bare.key, &bare.value), (5, &None, &None));
    // Offsets are dense per partition, starting at 0.
    for p in 0..8 {
        let offsets: Vec<i64> = recs
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, (0..offsets.len() as i64).collect::<Vec<_>>());
    }

    // The same keys through Kafka's own Java producer land on the same partitions.
    broker.create_topic("smoke-java", 8).await;
    let java: Vec<(&str, String)> = keys
        .iter()
        .filter(|k| !k.is_empty())
        .enumerate()
        .map(|(i, k)| (k.as_str(), format!("j{i}")))
        .collect();
    let lines: Vec<(&str, &str)> = java.iter().map(|(k, v)| (*k, v.as_str())).collect();
    broker.produce_java("smoke-java", &lines);
    let from_java = broker
        .read_all(&["smoke-java"], java.len(), Duration::from_secs(30))
        .await;
    assert_eq!(from_java.len(), java.len(), "{from_java:#?}");
    for rec in &from_java {
        let key = rec.key.as_deref().expect("Java record with a key");
        let ours = recs
            .iter()
            .find(|r| r.topic == "smoke" && r.key.as_deref() == Some(key))
            .expect("the same key from librdkafka");
        assert_eq!(
            rec.partition,
            ours.partition,
            "key {:?}: Java's producer and librdkafka's murmur2_random disagree",
            String::from_utf8_lossy(key)
        );
    }
}
