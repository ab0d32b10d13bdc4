//! The table-less outbox, end to end on a real PostgreSQL and Apache Kafka: events emitted with
//! `pg_logical_emit_message(true, 'outbox', envelope)` become the same records as outbox rows,
//! alone or mixed with an outbox table (order kept per key), and a malformed envelope stops
//! the relay without skipping it.

mod common;

use std::time::Duration;

use common::{last_line, Broker, Pg, Relay, OUTBOX_DDL, SLOT};

const STARTUP: Duration = Duration::from_secs(60);
const DELIVERY: Duration = Duration::from_secs(120);
const CONFIRM: Duration = Duration::from_secs(30);
const PARTITIONS: i32 = 4;
const ORDERS: &str = "outbox.event.order";
const CUSTOMERS: &str = "outbox.event.customer";

fn config(pg: &Pg, broker: &Broker, with_table: bool) -> String {
    let table = if with_table {
        "[[outbox]]\ntable = \"public.outbox\"\n\n"
    } else {
        ""
    };
    format!(
        "[postgres]\nurl = \"{}\"\n\n{table}\
         [[message]]\nprefix = \"outbox\"\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    )
}

/// SQL emitting one event as a transactional logical decoding message.
fn emit(id: &str, aggregate: &str, key: &str, kind: &str, payload: &str) -> String {
    let envelope = format!(
        r#"{{"id": "{id}", "aggregatetype": "{aggregate}", "aggregateid": "{key}", "type": "{kind}", "payload": {payload}}}"#
    );
    format!("SELECT pg_logical_emit_message(true, 'outbox', '{envelope}');")
}

async fn wait_caught_up(pg: &Pg, relay: &mut Relay, what: &str) {
    common::assert_caught_up(pg, relay, what, CONFIRM).await;
}

#[tokio::test]
async fn emitted_messages_become_records_without_any_table() {
    let pg = Pg::start();
    let broker = Broker::start();
    for topic in [ORDERS, CUSTOMERS] {
        broker.create_topic(topic, PARTITIONS).await;
    }
    let mut relay = Relay::start(&config(&pg, &broker, false));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let mut sql = String::from("BEGIN;");
    sql += &emit("m-1", "order", "o-1", "OrderCreated", r#"{"total": 12.5}"#);
    sql += "SELECT pg_logical_emit_message(true, 'audit', 'not an event');";
    sql += &emit("m-2", "order", "o-1", "OrderPaid", "null");
    sql += &emit("m-3", "customer", "c-1", "CustomerSeen", r#""plain text""#);
    sql += "COMMIT;";
    pg.sql(&sql).await;
    // Rolled back: never published.
    pg.sql(&format!(
        "BEGIN; {} ROLLBACK;",
        emit("never", "order", "o-1", "X", "1")
    ))
    .await;
    // Not transactional: published at once, even though its transaction rolls back.
    pg.sql(
        "BEGIN; SELECT pg_logical_emit_message(false, 'outbox', \
         '{\"id\": \"m-4\", \"aggregatetype\": \"order\", \"aggregateid\": \"o-2\", \"type\": \"Pinged\", \"payload\": []}'); \
         ROLLBACK;",
    )
    .await;

    let recs = broker.read_all(&[ORDERS, CUSTOMERS], 4, DELIVERY).await;
    let got: Vec<_> = recs
        .iter()
        .map(|r| {
            (
                r.header_str("id").unwrap_or_default(),
                r.topic.as_str(),
                r.key_str().unwrap_or_default(),
                r.header_str("type").unwrap_or_default(),
                r.value_str(),
            )
        })
        .collect();
    let want = |id: &str, topic, key: &str, kind: &str, value: Option<&str>| {
        (
            id.to_owned(),
            topic,
            key.to_owned(),
            kind.to_owned(),
            value.map(str::to_owned),
        )
    };
    for expected in [
        // The payload stays JSON, as sent: not a string with escaped quotes.
        want(
            "m-1",
            ORDERS,
            "o-1",
            "OrderCreated",
            Some(r#"{"total": 12.5}"#),
        ),
        want("m-2", ORDERS, "o-1", "OrderPaid", None),
        want("m-3", CUSTOMERS, "c-1", "CustomerSeen", Some("plain text")),
        want("m-4", ORDERS, "o-2", "Pinged", Some("[]")),
    ] {
        assert!(got.contains(&expected), "{expected:?} not in {got:#?}");
    }
    assert_eq!(got.len(), 4, "{got:#?}");
    // m-1 before m-2: same key, one partition, commit order.
    let offset = |id: &str| {
        recs.iter()
            .find(|r| r.header_str("id").as_deref() == Some(id))
    };
    let (a, b) = (offset("m-1").unwrap(), offset("m-2").unwrap());
    assert_eq!(a.partition, b.partition);
    assert!(a.offset < b.offset);
    wait_caught_up(&pg, &mut relay, "after the messages").await;
}

#[tokio::test]
async fn table_rows_and_messages_keep_one_order_per_key() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    broker.create_topic(ORDERS, PARTITIONS).await;
    let mut relay = Relay::start(&config(&pg, &broker, true));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    // Per key, a sequence alternating between the table and messages, within and across
    // transactions.
    let keys = ["k-1", "k-2", "k-3"];
    let mut n = 0;
    for txn in 0..20 {
        let mut sql = String::from("BEGIN;");
        for step in 0..6 {
            let key = keys[(txn + step) % keys.len()];
            let id = format!("e-{n:04}");
            let payload = format!(r#"{{"seq": {n}}}"#);
            if (txn + step) % 2 == 0 {
                sql += &emit(&id, "order", key, "Step", &payload);
            } else {
                sql += &format!(
                    "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) \
                     VALUES (md5('{id}')::uuid, 'order', '{key}', 'Step', '{payload}');"
                );
            }
            n += 1;
        }
        sql += "COMMIT;";
        pg.sql(&sql).await;
    }
    let recs = broker.read_all(&[ORDERS], n, DELIVERY).await;
    assert_eq!(recs.len(), n, "every event once");
    for key in keys {
        let mut mine: Vec<_> = recs
            .iter()
            .filter(|r| r.key_str().as_deref() == Some(key))
            .collect();
        assert!(mine.windows(2).all(|w| w[0].partition == w[1].partition));
        mine.sort_by_key(|r| r.offset);
        let seqs: Vec<u64> = mine
            .iter()
            .map(|r| {
                let v: serde_json::Value =
                    serde_json::from_str(&r.value_str().unwrap_or_default()).unwrap();
                v["seq"].as_u64().unwrap()
            })
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "{key}: offsets out of commit order");
    }
    wait_caught_up(&pg, &mut relay, "after the mixed transactions").await;
}

#[tokio::test]
async fn a_malformed_envelope_stops_the_relay_or_goes_to_the_dead_letter_topic() {
    let pg = Pg::start();
    let broker = Broker::start();
    broker.create_topic(ORDERS, PARTITIONS).await;
    broker.create_topic("dead-letters", 1).await;
    let cfg = config(&pg, &broker, false);
    let mut relay = Relay::start(&cfg);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    pg.sql(&format!(
        "BEGIN; {} SELECT pg_logical_emit_message(true, 'outbox', 'oops, not json'); COMMIT;",
        emit("before", "order", "o-1", "A", "1")
    ))
    .await;
    pg.sql(&emit("after", "order", "o-1", "B", "2")).await;

    let status = relay.wait_exit(DELIVERY).await;
    let line = last_line(&relay.stderr());
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {line}");
    assert!(
        line.starts_with("outbox-relay: error: ")
            && line.contains("not a JSON envelope")
            && line.contains("dead_letter_topic"),
        "{line}"
    );
    eprintln!("malformed envelope: {line}");
    // Stopped before the bad message: a restart meets it again; nothing after it is skipped.
    let mut relay = Relay::start(&cfg);
    let status = relay.wait_exit(DELIVERY).await;
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert_eq!(
        last_line(&relay.stderr()),
        line,
        "the same message stops it again"
    );

    // With a dead-letter topic the bad message is set aside there and the rest flows.
    let cfg = cfg.replace(
        "[kafka]\n",
        "[kafka]\ndead_letter_topic = \"dead-letters\"\n",
    );
    let mut relay = Relay::start(&cfg);
    let recs = broker
        .read_all(&[ORDERS, "dead-letters"], 3, DELIVERY)
        .await;
    let ids: Vec<_> = recs.iter().filter_map(|r| r.header_str("id")).collect();
    assert!(ids.contains(&"after".to_owned()), "{ids:?}");
    // "before" shares the bad message's transaction, which was never confirmed: sent again
    // (a duplicate after a failure, never a loss).
    assert!(ids.contains(&"before".to_owned()), "{ids:?}");
    let letters: Vec<_> = recs.iter().filter(|r| r.topic == "dead-letters").collect();
    assert_eq!(letters.len(), 1, "{recs:#?}");
    let note: serde_json::Value =
        serde_json::from_str(&letters[0].value_str().unwrap_or_default()).unwrap();
    assert_eq!(note["content"], "oops, not json");
    assert_eq!(note["source"], "message:outbox");
    assert!(
        note["error"].as_str().unwrap_or("").contains("JSON"),
        "{note}"
    );
    wait_caught_up(&pg, &mut relay, "after setting the message aside").await;
}
