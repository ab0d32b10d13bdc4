//! End to end: a real PostgreSQL 15, Apache Kafka and the relay
//! binary, checked through what a Kafka consumer and `pg_replication_slots` show.

mod common;

use std::time::Duration;

use common::{
    aggregate_of, basic_config, check_delivery, insert_outbox, java_murmur2_partition, last_line,
    lsn_text, wait_until, Broker, Event, Pg, Relay, Seqs, OUTBOX_DDL, SLOT,
};

const PARTITIONS: i32 = 8;
const ORDER_TOPIC: &str = "outbox.event.order";
const CUSTOMER_TOPIC: &str = "outbox.event.customer";
const TOPICS: [&str; 2] = [ORDER_TOPIC, CUSTOMER_TOPIC];

/// Generous bounds: the machine is small and shared; these are not performance limits.
const STARTUP: Duration = Duration::from_secs(60);
const DELIVERY: Duration = Duration::from_secs(180);
/// The contract: once idle, the slot is confirmed up to the WAL end within a few seconds.
const IDLE_CONFIRM: Duration = Duration::from_secs(8);

/// Waits for delivery of `n` records and the slot's confirmation; see [`common::settle`].
async fn settle(
    pg: &Pg,
    broker: &Broker,
    relay: &mut Relay,
    topics: &[&str],
    n: usize,
    target: u64,
) -> (Vec<common::Rec>, Result<Duration, String>) {
    let patience = common::Patience {
        delivery: DELIVERY,
        confirm: IDLE_CONFIRM,
    };
    common::settle(pg, broker, relay, topics, n, target, patience).await
}

#[tokio::test]
async fn relays_every_committed_outbox_insert_exactly_once() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    // Same columns as the outbox, but not configured: must never reach Kafka.
    pg.sql("CREATE TABLE public.not_outbox (LIKE public.outbox INCLUDING ALL)")
        .await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let mut relay = Relay::start(&basic_config(&pg.url(), &broker.bootstrap()));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let mut client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected: Vec<Event> = Vec::new();
    let unicode = "ключ-ü-🚀";
    let keys = [
        "order-1",
        "order-2",
        "order-3",
        "customer-1",
        "customer-2",
        unicode,
    ];

    // Single-row transactions (autocommit), both aggregate types and the unicode key.
    for i in 0..30 {
        let key = keys[i % keys.len()];
        let ev = seqs.event(aggregate_of(key), key, "Created", "single");
        expected.extend(insert_outbox(&client, &[ev]).await);
    }

    // One 5,000-row transaction interleaving the keys above with 20 more.
    let bulk: Vec<_> = (0..5000)
        .map(|i| {
            let key = if i % 3 == 0 {
                keys[i % keys.len()].to_owned()
            } else {
                format!("bulk-{}", i % 20)
            };
            seqs.event(aggregate_of(&key), &key, "Updated", "bulk")
        })
        .collect();
    let tx = client.transaction().await.unwrap();
    let inserted = insert_outbox(&tx, &bulk).await;
    tx.commit().await.unwrap();
    expected.extend(inserted);

    // Rolled back: must never arrive.
    let tx = client.transaction().await.unwrap();
    let rolled_back = insert_outbox(
        &tx,
        &[
            seqs.event("order", "order-1", "Cancelled", "rolled-back"),
            seqs.event("customer", "customer-1", "Cancelled", "rolled-back"),
        ],
    )
    .await;
    tx.rollback().await.unwrap();

    // Inserted and deleted in the same transaction: the insert was committed, so it counts.
    let tx = client.transaction().await.unwrap();
    let fleeting = insert_outbox(
        &tx,
        &[seqs.event("order", "order-2", "Shipped", "fleeting")],
    )
    .await;
    tx.execute(
        "DELETE FROM public.outbox WHERE id = $1::text::uuid",
        &[&fleeting[0].id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    expected.extend(fleeting);

    // NULL payload: a record without a value.
    let mut null_payload = seqs.event("order", "order-2", "Deleted", "");
    null_payload.payload = None;
    expected.extend(insert_outbox(&client, &[null_payload]).await);

    // jsonb arrives as PostgreSQL prints it (normalised key order), as JSON text.
    let mut literal = seqs.event("customer", "customer-2", "Literal", "");
    literal.payload = Some(format!(
        r#"{{"seq": {}, "b": [1, "x", null], "a": {{"z": "ü\"q"}}}}"#,
        literal.seq
    ));
    let literal = insert_outbox(&client, &[literal]).await;
    let literal_id = literal[0].id.clone();
    let literal_seq = literal[0].seq;
    expected.extend(literal);

    // A multi-row transaction across both topics, then a last single row.
    let tx = client.transaction().await.unwrap();
    let rows: Vec<_> = (0..10)
        .map(|i| {
            let key = keys[i % keys.len()];
            seqs.event(aggregate_of(key), key, "Batched", "multi")
        })
        .collect();
    expected.extend(insert_outbox(&tx, &rows).await);
    tx.batch_execute(
        "INSERT INTO public.not_outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'order-1', 'Leaked', '{}')",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    expected.extend(insert_outbox(&client, &[seqs.event("order", unicode, "Last", "last")]).await);

    // Last, updates and deletes of outbox rows and writes to another table: no records.
    // Being last, they also leave WAL after the last outbox commit, which only the relay's
    // idle confirmation of the server's WAL end covers.
    pg.sql(
        "UPDATE public.outbox SET payload = jsonb_set(payload, '{updated}', 'true') \
             WHERE aggregateid = 'order-1';
         UPDATE public.outbox SET type = 'Renamed' WHERE aggregateid = 'customer-2';
         DELETE FROM public.outbox WHERE aggregateid = 'order-3';
         INSERT INTO public.not_outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'order', 'order-1', 'Leaked', '{\"leak\": true}' FROM generate_series(1, 10);",
    )
    .await;

    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(&pg, &broker, &mut relay, &TOPICS, expected.len(), target).await;

    let delivery = check_delivery(&recs, &expected, PARTITIONS);
    delivery.assert_ok("relayed records");
    assert_eq!(delivery.duplicates, 0, "duplicates without any restart");
    assert_eq!(recs.len(), expected.len());
    for gone in &rolled_back {
        assert!(
            !recs
                .iter()
                .any(|r| r.header_str("id").as_deref() == Some(&gone.id)),
            "rolled-back event {} was relayed",
            gone.id
        );
    }
    // The record a consumer gets for the literal payload: JSON text, not a quoted string.
    let rec = recs
        .iter()
        .find(|r| r.header_str("id").as_deref() == Some(&literal_id))
        .unwrap();
    assert_eq!(
        rec.value_str().unwrap(),
        format!(r#"{{"a": {{"z": "ü\"q"}}, "b": [1, "x", null], "seq": {literal_seq}}}"#)
    );
    assert_eq!(rec.topic, CUSTOMER_TOPIC);
    // The NULL payload arrived without a value, the unicode key as its UTF-8 bytes.
    assert!(recs
        .iter()
        .any(|r| r.header_str("type").as_deref() == Some("Deleted") && r.value.is_none()));
    let unicode_recs: Vec<_> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some(unicode.as_bytes()))
        .collect();
    assert!(!unicode_recs.is_empty());
    assert!(unicode_recs
        .iter()
        .all(|r| r.partition == java_murmur2_partition(unicode.as_bytes(), PARTITIONS)));
    // Both aggregate types were routed to their own topic.
    for topic in TOPICS {
        assert!(recs.iter().any(|r| r.topic == topic), "nothing on {topic}");
    }

    // Kafka's own Java producer puts every one of these keys on the partition the relay chose.
    let mut relay_partition: std::collections::BTreeMap<Vec<u8>, i32> = Default::default();
    for r in &recs {
        if let Some(key) = &r.key {
            relay_partition.insert(key.clone(), r.partition);
        }
    }
    let java_topic = "java.partitions";
    broker.create_topic(java_topic, PARTITIONS).await;
    let keys: Vec<String> = relay_partition
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let lines: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "java")).collect();
    assert!(lines.len() >= 6, "too few keys to compare: {keys:?}");
    broker.produce_java(java_topic, &lines);
    let from_java = broker
        .read_all(&[java_topic], lines.len(), Duration::from_secs(60))
        .await;
    assert_eq!(
        from_java.len(),
        lines.len(),
        "records from Java: {from_java:#?}"
    );
    for rec in &from_java {
        let key = rec.key.clone().unwrap_or_default();
        assert_eq!(
            Some(&rec.partition),
            relay_partition.get(&key),
            "key {:?}: Java's producer and the relay disagree on the partition",
            String::from_utf8_lossy(&key)
        );
    }

    let waited = confirmed.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} events relayed; slot confirmed {} {:?} after delivery",
        expected.len(),
        lsn_text(target),
        waited
    );
}

#[tokio::test]
async fn bytea_payloads_header_columns_and_topic_template() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(
        "CREATE TABLE public.outbox_bin (
             id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
             aggregatetype text NOT NULL,
             aggregateid text NOT NULL,
             type text NOT NULL,
             payload bytea,
             tenant text NOT NULL,
             trace_id text NOT NULL
         )",
    )
    .await;
    let topics = ["tenant-acme.events", "tenant-globex.events"];
    for topic in topics {
        broker.create_topic(topic, 4).await;
    }
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n\
         [[outbox]]\n\
         table = \"public.outbox_bin\"\n\
         topic = \"tenant-{{tenant}}.events\"\n\
         header_columns = [\"tenant\", \"trace_id\"]\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    // Bytes that are not UTF-8, a NUL, and a 64 KiB blob.
    let big: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let payloads: Vec<Vec<u8>> = vec![
        vec![0x00, 0x01, 0x02, 0xff, 0xfe],
        b"\xc3\x28 not utf-8 \x00 end".to_vec(),
        b"plain text".to_vec(),
        big,
    ];
    struct Row {
        id: String,
        key: String,
        tenant: &'static str,
        trace: String,
        payload: Vec<u8>,
    }
    let client = pg.client().await;
    let mut rows = Vec::new();
    for (i, payload) in payloads.into_iter().enumerate() {
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let key = format!("blob-{i}");
        let trace = format!("trace-{i}-ü");
        let id: String = client
            .query_one(
                "INSERT INTO public.outbox_bin (aggregatetype, aggregateid, type, payload, tenant, trace_id)
                 VALUES ('blob', $1, 'Stored', $2, $3, $4) RETURNING id::text",
                &[&key, &payload, &tenant, &trace],
            )
            .await
            .unwrap()
            .get(0);
        rows.push(Row {
            id,
            key,
            tenant,
            trace,
            payload,
        });
    }
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(&pg, &broker, &mut relay, &topics, rows.len(), target).await;

    assert_eq!(
        recs.len(),
        rows.len(),
        "records: {:?}",
        recs.iter()
            .map(|r| (&r.topic, r.key_str()))
            .collect::<Vec<_>>()
    );
    for row in &rows {
        let rec = recs
            .iter()
            .find(|r| r.header_str("id").as_deref() == Some(&row.id))
            .unwrap_or_else(|| panic!("{} ({}) missing", row.id, row.key));
        assert_eq!(rec.topic, format!("tenant-{}.events", row.tenant));
        assert_eq!(rec.key.as_deref(), Some(row.key.as_bytes()));
        assert!(
            rec.value.as_deref() == Some(&row.payload[..]),
            "{}: value {:?} (len {:?}), expected {} raw bytes",
            row.key,
            rec.value.as_deref().map(|v| &v[..v.len().min(32)]),
            rec.value.as_ref().map(Vec::len),
            row.payload.len()
        );
        assert_eq!(rec.header_str("type").as_deref(), Some("Stored"));
        assert_eq!(rec.header_str("tenant").as_deref(), Some(row.tenant));
        assert_eq!(rec.header_str("trace_id"), Some(row.trace.clone()));
        assert_eq!(rec.partition, java_murmur2_partition(row.key.as_bytes(), 4));
    }
    confirmed.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn relays_as_a_role_with_a_scram_password() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    let (user, password) = ("relay_user", "Relay-Pass-42");
    pg.create_scram_role(user, password).await;
    // Enough rights to create the publication itself: own the table, CREATE on the database.
    pg.sql(&format!(
        "ALTER TABLE public.outbox OWNER TO {user};
         GRANT CREATE ON DATABASE postgres TO {user};"
    ))
    .await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let mut relay = Relay::start(&basic_config(
        &pg.url_for(user, password),
        &broker.bootstrap(),
    ));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    for i in 0..20 {
        let key = format!("customer-{}", i % 4);
        expected.extend(
            insert_outbox(
                &client,
                &[seqs.event(aggregate_of(&key), &key, "Signed", "scram")],
            )
            .await,
        );
    }
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(&pg, &broker, &mut relay, &TOPICS, expected.len(), target).await;
    let delivery = check_delivery(&recs, &expected, PARTITIONS);
    delivery.assert_ok("relayed with a SCRAM role");
    assert_eq!(delivery.duplicates, 0);
    confirmed.unwrap_or_else(|e| panic!("{e}"));
    // The relay really connected as that role (which pg_hba.conf makes use SCRAM).
    let sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(sessions > 0, "no session of {user} while the relay runs");
}

#[tokio::test]
async fn a_restart_resumes_after_the_confirmed_point_without_duplicates() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let config = basic_config(&pg.url(), &broker.bootstrap());
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let mut client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut write = |round: &'static str| {
        let rows: Vec<_> = (0..200)
            .map(|i| {
                let key = format!("order-{}", i % 7);
                seqs.event(aggregate_of(&key), &key, "Placed", round)
            })
            .collect();
        rows
    };

    // First run: two transactions, wait until the slot confirmed all of it, then kill -9.
    let mut expected = Vec::new();
    let first = write("first");
    for half in first.chunks(100) {
        let tx = client.transaction().await.unwrap();
        expected.extend(insert_outbox(&tx, half).await);
        tx.commit().await.unwrap();
    }
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(&pg, &broker, &mut relay, &TOPICS, expected.len(), target).await;
    check_delivery(&recs, &expected, PARTITIONS).assert_ok("first run");
    confirmed.unwrap_or_else(|e| panic!("first run: {e}"));
    relay.kill9();
    let gone = wait_until(Duration::from_secs(30), || async {
        !pg.slot_active(SLOT).await
    })
    .await;
    assert!(gone, "the slot stayed active after the relay was killed");

    // Written while no relay runs, and after the restart.
    let second = write("while-down");
    expected.extend(insert_outbox(&client, &second[..50]).await);
    let mut relay = Relay::start(&config);
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.assert_running();
    let tx = client.transaction().await.unwrap();
    expected.extend(insert_outbox(&tx, &second[50..]).await);
    tx.commit().await.unwrap();

    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(&pg, &broker, &mut relay, &TOPICS, expected.len(), target).await;
    let delivery = check_delivery(&recs, &expected, PARTITIONS);
    delivery.assert_ok("after restart");
    assert_eq!(
        delivery.duplicates, 0,
        "events confirmed before the restart were sent again"
    );
    confirmed.unwrap_or_else(|e| panic!("after restart: {e}"));
}

#[tokio::test]
async fn an_unknown_config_key_is_fatal_and_named() {
    // Everything else is valid; nothing listens on port 1, so a relay that got past the file
    // would hang or fail on connecting instead, with another message.
    let config = "[postgres]\n\
                  url = \"postgres://postgres@127.0.0.1:1/postgres\"\n\
                  urll = \"postgres://postgres@127.0.0.1:1/postgres\"\n\n\
                  [[outbox]]\ntable = \"public.outbox\"\n\n\
                  [kafka]\nbrokers = \"127.0.0.1:1\"\n";
    let mut relay = Relay::start(config);
    let line = relay
        .expect_fatal_exit(Duration::from_secs(30), "a bad config")
        .await;
    assert!(
        line.contains("urll"),
        "last stderr line does not name `urll`: {line:?}"
    );
}

#[tokio::test]
async fn a_missing_outbox_table_is_fatal_and_named() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n\
         [[outbox]]\ntable = \"public.outbox\"\n\n\
         [[outbox]]\ntable = \"public.no_such_outbox\"\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let stderr = relay.stderr();
    let status =
        status.unwrap_or_else(|| panic!("still running without its table; stderr:\n{stderr}"));
    assert!(
        !status.success(),
        "exit {status} without its table; stderr:\n{stderr}"
    );
    let line = last_line(&stderr);
    assert!(
        line.contains("no_such_outbox"),
        "last stderr line does not name the table: {line:?}\n{stderr}"
    );
}
