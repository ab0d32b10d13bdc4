//! Routing and shaping, end to end on a real PostgreSQL and Apache Kafka: a fixed topic, a
//! `partition_column` choosing partitions, and CloudEvents binary-mode headers, checked on the
//! records a consumer reads.

mod common;

use std::time::Duration;

use common::{assert_slot_holds, java_murmur2_partition, last_line, Broker, Pg, Relay, SLOT};

const STARTUP: Duration = Duration::from_secs(60);
const DELIVERY: Duration = Duration::from_secs(120);
const PARTITIONS: i32 = 4;

use common::ORDERS_OUTBOX_DDL as DDL;

fn config(pg: &Pg, broker: &Broker, extra: &str) -> String {
    format!(
        "[postgres]\nurl = \"{}\"\n\n\
         [[outbox]]\n\
         table = \"public.orders_outbox\"\n\
         topic = \"orders\"\n\
         partition_column = \"part\"\n\
         {extra}\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    )
}

/// The database's clock as a CloudEvents time (RFC 3339, UTC, microseconds).
async fn pg_clock(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn fixed_topic_partition_column_and_cloudevents_headers() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(DDL).await;
    broker.create_topic("orders", PARTITIONS).await;
    let mut relay = Relay::start(&config(
        &pg,
        &broker,
        "cloudevents = true\ncloudevents_source = \"/shop/orders\"",
    ));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let client = pg.client().await;
    let before = pg_clock(&client).await;
    // (key, chosen partition): NULL leaves the partition to the key's hash.
    let rows: Vec<(String, Option<i32>)> = (0..12)
        .map(|i| (format!("o-{i}"), (i % 3 != 2).then_some(i % PARTITIONS)))
        .collect();
    let mut ids = Vec::new();
    for (key, part) in &rows {
        let id: String = client
            .query_one(
                "INSERT INTO public.orders_outbox (aggregateid, type, payload, part) \
                 VALUES ($1, 'OrderPlaced', '{\"total\": 12.5}', $2) RETURNING id::text",
                &[key, part],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    let after = pg_clock(&client).await;

    let recs = broker.read_all(&["orders"], rows.len(), DELIVERY).await;
    assert_eq!(recs.len(), rows.len(), "{recs:#?}");
    for ((key, part), id) in rows.iter().zip(&ids) {
        let rec = recs
            .iter()
            .find(|r| r.header_str("id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("event {id} ({key}) missing"));
        let want = part.unwrap_or_else(|| java_murmur2_partition(key.as_bytes(), PARTITIONS));
        assert_eq!(rec.partition, want, "{key}: partition");
        assert_eq!(rec.key_str().as_deref(), Some(key.as_str()));
        assert_eq!(rec.value_str().as_deref(), Some("{\"total\": 12.5}"));
        // The CloudEvents Kafka binding, binary mode.
        assert_eq!(rec.header_str("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(rec.header_str("ce_id").as_deref(), Some(id.as_str()));
        assert_eq!(rec.header_str("ce_source").as_deref(), Some("/shop/orders"));
        assert_eq!(rec.header_str("ce_type").as_deref(), Some("OrderPlaced"));
        assert_eq!(
            rec.header_str("content-type").as_deref(),
            Some("application/json")
        );
        let time = rec
            .header_str("ce_time")
            .unwrap_or_else(|| panic!("{key}: no ce_time"));
        // Same fixed-width format, so text order is time order.
        assert!(
            time.len() == before.len() && before <= time && time <= after,
            "{key}: ce_time {time} is not the commit time, between {before} and {after}"
        );
        // Debezium's headers stay.
        assert_eq!(rec.header_str("type").as_deref(), Some("OrderPlaced"));
    }
    relay.assert_running();
}

#[tokio::test]
async fn cloudevents_default_source_names_the_table() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(DDL).await;
    broker.create_topic("orders", PARTITIONS).await;
    let mut relay = Relay::start(&config(&pg, &broker, "cloudevents = true"));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    pg.sql("INSERT INTO public.orders_outbox (aggregateid, type) VALUES ('o-1', 'OrderPlaced')")
        .await;
    let recs = broker.read_all(&["orders"], 1, DELIVERY).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].header_str("ce_source").as_deref(),
        Some("/outbox-relay/public.orders_outbox")
    );
    // A NULL payload is a null value.
    assert_eq!(recs[0].value, None);
}

#[tokio::test]
async fn a_partition_that_does_not_exist_stops_the_relay_naming_the_event() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(DDL).await;
    broker.create_topic("orders", PARTITIONS).await;
    let mut relay = Relay::start(&config(&pg, &broker, ""));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    pg.sql(
        "INSERT INTO public.orders_outbox (id, aggregateid, type, part) \
         VALUES ('00000000-0000-0000-0000-00000000beef', 'o-1', 'OrderPlaced', 1)",
    )
    .await;
    let recs = broker.read_all(&["orders"], 1, DELIVERY).await;
    assert_eq!(recs.len(), 1, "the good row first");
    pg.sql(
        "INSERT INTO public.orders_outbox (id, aggregateid, type, part) \
         VALUES ('00000000-0000-0000-0000-0000000000ff', 'o-2', 'OrderPlaced', 99)",
    )
    .await;
    let exited = relay.wait_exit(DELIVERY).await;
    let stderr = relay.stderr();
    assert!(
        exited.is_some_and(|s| !s.success()),
        "{exited:?}; stderr:\n{stderr}"
    );
    let line = last_line(&stderr);
    assert!(
        line.starts_with("outbox-relay: error: ") && line.contains("0000000000ff"),
        "{line}"
    );
    eprintln!("unknown partition: {line}");
    // Nothing was skipped: the slot still holds the refused event.
    assert_slot_holds(
        &pg,
        "00000000-0000-0000-0000-0000000000ff",
        "unknown partition",
    )
    .await;
}
