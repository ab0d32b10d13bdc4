//! Records Kafka refuses for good, end to end on a real PostgreSQL 15, Apache Kafka and the
//! relay binary, judged by what a user sees: records in the topics, notes in `dead_letter_topic`,
//! the slot's `confirmed_flush_lsn`, metrics, and the relay's exit and last stderr line.
//!
//! | outbox row | with `dead_letter_topic` | without |
//! |---|---|---|
//! | `aggregatetype` making an illegal name (`Order Created`, `Order/Evil`) | a note in the dead-letter topic at once; the rows around it arrive in order; the slot catches up | the relay stops at once (no 30 s metadata wait): one line naming the event, the topic and the fix; the slot stays before it |
//! | a topic nobody created (the test broker creates none on its own) | a note once librdkafka gives up on the topic (`topic.metadata.propagation.max.ms`), then at once for later rows; the slot does not pass the row before its note is in | the relay stops (tests/hostile.rs) |
//! | any of these, with a dead-letter topic that does not exist | the relay stops, naming the event and the dead-letter topic; the slot stays before it | |
//!
//! The relay refuses an illegal name before sending, so the broker's own InvalidTopic answer
//! is never reached here.
//!
//! Run: `scripts/test.sh --test dead_letters -- --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_slot_holds, free_port, insert_outbox, scrape, Broker, Event, Pg, Reader, Rec, Relay,
    Seqs, OUTBOX_DDL, SLOT,
};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// Generous bounds: the machine is small and shared; these are not performance limits.
const STARTUP: Duration = Duration::from_secs(90);
const DELIVERY: Duration = Duration::from_secs(120);
const CONFIRM: Duration = Duration::from_secs(60);
/// An illegal name is refused without waiting for metadata: far below librdkafka's 30 s.
const AT_ONCE: Duration = Duration::from_secs(20);

const ORDER_TOPIC: &str = "outbox.event.order";
const DEAD_LETTERS: &str = "outbox.dead-letters";
/// How long librdkafka waits for a topic to appear before refusing its records: shortened
/// from 30 s so the test is quick, long enough to look at the slot while a note is pending.
const PROPAGATION_MS: u64 = 8_000;

/// A relay config for `public.outbox` on `bootstrap`, with `kafka` lines in `[kafka]`,
/// `properties` in `[kafka.properties]` and metrics on `metrics_port`.
fn config(pg: &Pg, bootstrap: &str, kafka: &str, properties: &str, metrics_port: u16) -> String {
    format!(
        "[postgres]\nurl = \"{}\"\nstatus_interval_secs = 1\n\n\
         [[outbox]]\ntable = \"public.outbox\"\n\n\
         [kafka]\nbrokers = \"{}\"\n{kafka}\n\n[kafka.properties]\n{properties}\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        pg.url(),
        bootstrap
    )
}

/// PostgreSQL with the outbox, Kafka with `topics` (one partition each, so order is total),
/// and a relay on `config` streaming from its slot.
async fn start(
    topics: &[&str],
    config: impl FnOnce(&Pg, &Broker) -> String,
) -> (Pg, Broker, Relay) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    for topic in topics {
        broker.create_topic(topic, 1).await;
    }
    let mut relay = Relay::start(&config(&pg, &broker));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    (pg, broker, relay)
}

/// One transaction of outbox rows `(aggregatetype, type)`, all for key `k`.
async fn commit(pg: &Pg, seqs: &mut Seqs, rows: &[(&str, &str)]) -> Vec<Event> {
    let rows: Vec<_> = rows
        .iter()
        .map(|(aggregate, kind)| seqs.event(aggregate, "k", kind, kind))
        .collect();
    insert_outbox(&pg.client().await, &rows).await
}

/// Reads `topic` until `n` records arrived (failing fast if the relay exits).
async fn read(broker: &Broker, relay: &mut Relay, topic: &str, n: usize) -> Reader {
    let mut reader = broker.reader(&[topic]);
    let ok = reader
        .wait_for(n, DELIVERY, || relay.assert_running())
        .await;
    assert!(
        ok,
        "expected {n} records in {topic} within {DELIVERY:?}, got {}: {:#?}",
        reader.len(),
        reader.records()
    );
    reader
}

fn ids(recs: &[Rec]) -> Vec<String> {
    recs.iter().filter_map(|r| r.header_str("id")).collect()
}

/// The note a dead letter carries, checked against the refused event.
fn assert_note(letter: &Rec, event: &Event, error_has: &str) {
    let topic = event.default_topic();
    assert_eq!(letter.header_str("id").as_deref(), Some(event.id.as_str()));
    assert_eq!(
        letter.header_str("type").as_deref(),
        Some(event.event_type.as_str())
    );
    assert_eq!(
        letter.header_str("original_topic").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(letter.key_str().as_deref(), Some("k"));
    let note: serde_json::Value =
        serde_json::from_slice(letter.value.as_deref().expect("a note")).expect("JSON note");
    assert_eq!(note["id"], event.id.as_str(), "{note}");
    assert_eq!(note["topic"], topic.as_str(), "{note}");
    assert_eq!(note["table"], "public.outbox", "{note}");
    assert_eq!(
        note["payload_bytes"].as_u64(),
        event.payload.as_ref().map(|p| p.len() as u64),
        "{note}"
    );
    let error = note["error"].as_str().unwrap_or_default();
    assert!(error.contains(error_has), "{note}");
    assert_eq!(
        letter.header_str("error").as_deref(),
        Some(error),
        "the error header"
    );
}

#[tokio::test]
async fn refused_topics_go_to_the_dead_letter_topic_and_everything_else_flows() {
    let metrics = free_port();
    let (pg, broker, mut relay) = start(&[ORDER_TOPIC, DEAD_LETTERS], |pg, broker| {
        config(
            pg,
            &broker.bootstrap(),
            &format!("dead_letter_topic = \"{DEAD_LETTERS}\""),
            &format!("\"topic.metadata.propagation.max.ms\" = \"{PROPAGATION_MS}\""),
            metrics,
        )
    })
    .await;
    let mut seqs = Seqs::default();
    let first = commit(
        &pg,
        &mut seqs,
        &[
            ("order", "Good1"),
            ("Order Created", "Spaced"),
            ("order", "Good2"),
        ],
    )
    .await;
    let evil = commit(&pg, &mut seqs, &[("Order/Evil", "Slashed")]).await;
    let before_missing = pg.current_wal_lsn().await;
    let inserted = Instant::now();
    let last = commit(
        &pg,
        &mut seqs,
        &[
            ("order", "Good3"),
            ("NoSuchTopic", "Lost"),
            ("order", "Good4"),
        ],
    )
    .await;

    // Every good row arrives, in commit order, while the missing topic's row still waits.
    let good = [&first[0], &first[2], &last[0], &last[2]];
    let mut orders = read(&broker, &mut relay, ORDER_TOPIC, good.len()).await;
    let confirmed = pg.confirmed_flush_lsn(SLOT).await.unwrap_or(0);
    if inserted.elapsed() < Duration::from_millis(PROPAGATION_MS * 3 / 4) {
        // librdkafka cannot refuse the NoSuchTopic row before PROPAGATION_MS after it first
        // saw the topic, which was after `inserted`: its note is not even sent yet.
        assert!(
            confirmed <= before_missing,
            "confirmed_flush_lsn {confirmed} passed the transaction whose row awaits its note \
             (it started after {before_missing})"
        );
    } else {
        eprintln!("the good rows took too long to look at the slot while the note is pending");
    }

    let mut letters = read(&broker, &mut relay, DEAD_LETTERS, 3).await;
    letters.settle(common::QUIET).await;
    let letters = letters.records();
    assert_eq!(
        ids(&letters),
        [first[1].id.as_str(), &evil[0].id, &last[1].id],
        "one note per refused row; the illegal names first, without waiting for metadata"
    );
    assert_note(&letters[0], &first[1], "not a legal Kafka topic name");
    assert_note(&letters[1], &evil[0], "not a legal Kafka topic name");
    assert_note(&letters[2], &last[1], "UnknownTopicOrPartition");

    // librdkafka now knows the topic is missing: the next row for it is refused before
    // sending, at once, and set aside too.
    let again = commit(
        &pg,
        &mut seqs,
        &[("NoSuchTopic", "LostAgain"), ("order", "Good5")],
    )
    .await;
    let mut letters = read(&broker, &mut relay, DEAD_LETTERS, 4).await;
    letters.settle(common::QUIET).await;
    let letters = letters.records();
    assert_eq!(ids(&letters[3..]), [again[0].id.as_str()], "{letters:#?}");
    assert_note(&letters[3], &again[0], "Unknown topic");

    orders
        .wait_for(5, DELIVERY, || relay.assert_running())
        .await;
    orders.settle(common::QUIET).await;
    let good_ids: Vec<&str> = good
        .iter()
        .chain([&&again[1]])
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids(&orders.records()), good_ids, "the good rows, in order");

    common::assert_caught_up(&pg, &mut relay, "after the dead letters", CONFIRM).await;
    let s = scrape(metrics).expect("GET /metrics");
    let published = |topic: &str| s.sum("outbox_relay_events_published_total", &[("topic", topic)]);
    assert_eq!(published(ORDER_TOPIC), 5.0, "{}", s.text);
    assert_eq!(published(DEAD_LETTERS), 4.0, "{}", s.text);
    relay.assert_running();
}

#[tokio::test]
async fn without_a_dead_letter_topic_an_illegal_topic_name_stops_the_relay_at_once() {
    let (pg, broker, mut relay) = start(&[ORDER_TOPIC], |pg, broker| {
        config(pg, &broker.bootstrap(), "", "", free_port())
    })
    .await;
    let mut seqs = Seqs::default();
    let before = commit(&pg, &mut seqs, &[("order", "Good1")]).await;
    read(&broker, &mut relay, ORDER_TOPIC, 1).await;
    let inserted = Instant::now();
    let evil = commit(
        &pg,
        &mut seqs,
        &[("Order/Evil", "Slashed"), ("order", "Good2")],
    )
    .await;

    let line = relay
        .expect_fatal_exit(AT_ONCE, "an illegal topic name")
        .await;
    eprintln!("stopped {:?} after the insert", inserted.elapsed());
    let topic = evil[0].default_topic();
    assert!(
        line.contains(&evil[0].id) && line.contains(&topic),
        "the line names event {} and topic {topic}: {line}",
        evil[0].id
    );
    assert!(
        line.contains("legal") && line.contains("dead_letter_topic"),
        "the line says what is wrong and how to carry on: {line}"
    );
    assert_slot_holds(&pg, &evil[0].id, "after the illegal topic name").await;
    let mut orders = broker.reader(&[ORDER_TOPIC]);
    orders.settle(common::QUIET).await;
    assert_eq!(
        ids(&orders.records()),
        [before[0].id.as_str()],
        "nothing after the refused row"
    );
}

#[tokio::test]
async fn a_dead_letter_kafka_refuses_stops_the_relay_before_the_event() {
    const MISSING: &str = "outbox.dead-letters.missing";
    let (pg, _broker, mut relay) = start(&[ORDER_TOPIC], |pg, broker| {
        config(
            pg,
            &broker.bootstrap(),
            &format!("dead_letter_topic = \"{MISSING}\""),
            "\"topic.metadata.propagation.max.ms\" = \"1000\"",
            free_port(),
        )
    })
    .await;
    let mut seqs = Seqs::default();
    let spaced = commit(&pg, &mut seqs, &[("Order Created", "Spaced")]).await;

    let line = relay
        .expect_fatal_exit(DELIVERY, "a dead letter to a missing topic")
        .await;
    assert!(
        line.contains(&spaced[0].id)
            && line.contains(MISSING)
            && line.contains("dead_letter_topic"),
        "the line names the event and the dead-letter topic: {line}"
    );
    assert_slot_holds(&pg, &spaced[0].id, "after the refused dead letter").await;
}

/// What the dead-letter topic cannot catch: the broker refuses a record it was sent (here a
/// message too large for the topic, injected on librdkafka's mock cluster, which refuses a
/// produce request on cue). The record had its sequence number in the partition, so with
/// `enable.gapless.guarantee` the producer stops for good; the relay stops too, with the way
/// to have such records refused before sending, and the slot stays before the record.
#[tokio::test]
async fn a_record_the_broker_refuses_after_sending_stops_the_relay_even_with_a_dead_letter_topic() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let cluster: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("start librdkafka's mock cluster");
    for topic in [ORDER_TOPIC, DEAD_LETTERS] {
        cluster
            .create_topic(topic, 1, 1)
            .unwrap_or_else(|e| panic!("create {topic} on the mock cluster: {e}"));
    }
    let text = config(
        &pg,
        &cluster.bootstrap_servers(),
        &format!("dead_letter_topic = \"{DEAD_LETTERS}\""),
        "",
        free_port(),
    );
    let mut relay = Relay::start(&text);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    let mut seqs = Seqs::default();
    commit(&pg, &mut seqs, &[("order", "Good1")]).await;
    common::assert_caught_up(&pg, &mut relay, "before the refusal", CONFIRM).await;

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let big = commit(&pg, &mut seqs, &[("order", "Big"), ("order", "After")]).await;
    let line = relay
        .expect_fatal_exit(DELIVERY, "a record refused after sending")
        .await;
    assert!(
        line.contains(&format!("refused event {}", big[0].id)) && line.contains(ORDER_TOPIC),
        "the line names the refused event and its topic: {line}"
    );
    assert!(
        line.contains("can no longer send") && line.contains("message.max.bytes"),
        "the line says why nothing was set aside, and what to change: {line}"
    );
    assert_slot_holds(&pg, &big[0].id, "after the refusal").await;
}

#[tokio::test]
async fn an_illegal_dead_letter_topic_is_refused_at_start() {
    let text = "[postgres]\nurl = \"postgres://relay@127.0.0.1:1/db\"\n\
                [[outbox]]\ntable = \"public.outbox\"\n\
                [kafka]\nbrokers = \"127.0.0.1:1\"\ndead_letter_topic = \"dead letters\"\n";
    let mut relay = Relay::start(text);
    let line = relay
        .expect_fatal_exit(STARTUP, "an illegal dead_letter_topic")
        .await;
    assert!(
        line.contains("dead_letter_topic") && line.contains("\"dead letters\""),
        "{line}"
    );
}
