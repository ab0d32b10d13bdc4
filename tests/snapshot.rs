//! `initial_snapshot = true`, end to end: rows already in the outbox when the relay creates
//! its slot are published from the snapshot the slot exports, then the stream follows, with
//! no event missed in between and none twice (unless the relay was killed mid-snapshot,
//! which may send the snapshot again but never loses a row). Each test checks what a user
//! sees: records in Kafka (read back and compared with what was committed) and
//! `pg_replication_slots`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::checker::{commit_until, events, Rng};
use common::{
    basic_config, check_delivery, free_port, insert_outbox, scrape, settle, wait_until, Broker,
    Delivery, Event, Patience, Pg, Rec, Relay, Seqs, OUTBOX_DDL, SLOT,
};

const PARTITIONS: i32 = 4;
const TOPICS: [&str; 2] = ["outbox.event.order", "outbox.event.customer"];
/// The temporary slot the relay takes the snapshot with.
const SNAPSHOT_SLOT: &str = "outbox_relay_snapshot";

/// The default config with `initial_snapshot = true`, `extra_postgres` and `extra_outbox`
/// added to their sections.
fn snapshot_config(pg: &Pg, broker: &Broker, extra_postgres: &str, extra_outbox: &str) -> String {
    basic_config(&pg.url(), &broker.bootstrap())
        .replacen(
            "\n\n[[outbox]]\n",
            &format!("\ninitial_snapshot = true\n{extra_postgres}\n\n[[outbox]]\n"),
            1,
        )
        .replacen(
            "table = \"public.outbox\"\n",
            &format!("table = \"public.outbox\"\n{extra_outbox}\n"),
            1,
        )
}

/// PostgreSQL with the example outbox table plus a `position` column filled in insert
/// order (for `snapshot_order_by`), and Kafka with the two topics.
async fn setup() -> (Pg, Broker) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    pg.sql("ALTER TABLE public.outbox ADD COLUMN position bigserial")
        .await;
    for topic in TOPICS {
        broker.create_topic(topic, PARTITIONS).await;
    }
    (pg, broker)
}

/// Inserts `n` events over 12 keys, in transactions of up to 2,000 rows.
async fn insert_many(pg: &Pg, rng: &mut Rng, seqs: &mut Seqs, n: u64, note: &str) -> Vec<Event> {
    let client = pg.client().await;
    let mut out = Vec::new();
    while (out.len() as u64) < n {
        let batch = (n - out.len() as u64).min(2000);
        let rows = events(rng, seqs, batch, 12, None, note);
        out.extend(insert_outbox(&client, &rows).await);
    }
    out
}

/// The names of the replication slots that exist now.
async fn slots(pg: &Pg) -> Vec<String> {
    pg.client()
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .expect("query pg_replication_slots")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// How often the relay's stderr says `needle`.
fn count_lines(relay: &Relay, needle: &str) -> usize {
    relay
        .stderr()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits for the relay to stop with an error (rather than retry for ever); its last line.
async fn stop_line(relay: &mut Relay) -> String {
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let stderr = relay.stderr();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the relay should stop: {status:?}\n{stderr}"
    );
    common::last_line(&stderr)
}

/// What `outbox-relay check` prints for `config`.
async fn check_output(config: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).expect("write relay.toml");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run outbox-relay check")
    })
    .await
    .expect("join");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PATIENCE: Patience = Patience {
    delivery: Duration::from_secs(180),
    confirm: Duration::from_secs(30),
};

/// Waits for at least `n` records and for the slot to confirm the WAL written so far, checks
/// the records against the committed `expected` events (none lost, each record right,
/// per-key order) and prints one line about them; the records and the check.
async fn delivered(
    pg: &Pg,
    broker: &Broker,
    relay: &mut Relay,
    expected: &[Event],
    n: usize,
    what: &str,
) -> (Vec<Rec>, Delivery) {
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(pg, broker, relay, &TOPICS, n, target, PATIENCE).await;
    let delivery = check_delivery(&recs, expected, PARTITIONS);
    eprintln!(
        "{what}: {} events committed, {} records read, {} duplicates, 0 lost",
        expected.len(),
        recs.len(),
        delivery.duplicates
    );
    delivery.assert_ok(what);
    confirmed.unwrap_or_else(|e| panic!("{what}: {e}"));
    (recs, delivery)
}

#[tokio::test]
async fn rows_already_in_the_outbox_arrive_once_and_the_stream_follows() {
    let (pg, broker) = setup().await;
    // A bytea header column with a default: the snapshot's rows and the stream's must both
    // carry it as raw bytes (the stream sends bytea as hex text, SQL reads it the same way).
    pg.sql("ALTER TABLE public.outbox ADD COLUMN trace bytea DEFAULT '\\xdeadbeef'::bytea")
        .await;
    let mut rng = Rng::new(7);
    let mut seqs = Seqs::default();
    let before = insert_many(&pg, &mut rng, &mut seqs, 1500, "before").await;
    assert!(
        slots(&pg).await.is_empty(),
        "no slot before the relay starts"
    );
    // The snapshot's transaction idles while Kafka holds it back (here a long linger.ms and
    // a small queue): a server-wide timeout for idle transactions must not end it.
    pg.sql("ALTER DATABASE postgres SET idle_in_transaction_session_timeout = '100ms'")
        .await;
    // Nor one for long transactions (PostgreSQL 17 on): the snapshot takes a few seconds.
    let version: i32 = pg
        .client()
        .await
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .expect("server_version_num")
        .get(0);
    if version >= 170000 {
        pg.sql("ALTER DATABASE postgres SET transaction_timeout = '500ms'")
            .await;
    }

    let port = free_port();
    let config = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        snapshot_config(
            &pg,
            &broker,
            "",
            "header_columns = [\"trace\", \"aggregatetype\"]"
        )
    ) + "\n[kafka.properties]\n\"linger.ms\" = \"300\"\n\"queue.buffering.max.messages\" = \"500\"\n";
    let check = check_output(&config).await;
    assert!(
        check.lines().any(|l| l.starts_with("ok ")
            && l.contains("does not exist")
            && l.contains("initial_snapshot")),
        "check should say the slot is made after the snapshot:\n{check}"
    );
    let mut relay = Relay::start(&config);
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(120))
        .await;

    // Written after the slot exists: these can only come from the stream.
    let mut client = pg.client().await;
    let rows = events(&mut rng, &mut seqs, 40, 12, None, "after");
    let mut expected = before.clone();
    for chunk in rows.chunks(10) {
        let tx = client.transaction().await.expect("begin");
        expected.extend(insert_outbox(&tx, chunk).await);
        tx.commit().await.expect("commit");
    }
    let what = format!(
        "snapshot of {} rows, then {} streamed",
        before.len(),
        expected.len() - before.len()
    );
    let n = expected.len();
    let (recs, delivery) = delivered(&pg, &broker, &mut relay, &expected, n, &what).await;
    assert_eq!(delivery.duplicates, 0, "every event exactly once");
    assert_eq!(recs.len(), expected.len());
    for r in &recs {
        assert_eq!(
            r.header("trace"),
            Some(Some(&[0xde, 0xad, 0xbe, 0xef][..])),
            "bytea header as raw bytes at {}[{}]@{}",
            r.topic,
            r.partition,
            r.offset
        );
        let aggregate = r.topic.trim_start_matches("outbox.event.");
        assert_eq!(r.header_str("aggregatetype").as_deref(), Some(aggregate));
    }
    // The temporary slot is gone; only the permanent one is left.
    assert_eq!(slots(&pg).await, [SLOT]);
    let metrics = scrape(port).expect("scrape /metrics");
    assert_eq!(
        metrics.sum(
            "outbox_relay_snapshot_events_total",
            &[("table", "public.outbox")]
        ),
        before.len() as f64,
        "{}",
        metrics.text
    );
    assert_eq!(count_lines(&relay, "initial snapshot done"), 1);
    relay.assert_running();
}

#[tokio::test]
async fn a_writer_during_the_snapshot_loses_nothing_and_duplicates_nothing() {
    let (pg, broker) = setup().await;
    let mut rng = Rng::new(11);
    let mut seqs = Seqs::default();
    let before = insert_many(&pg, &mut rng, &mut seqs, 20_000, "before").await;

    // The writer runs from before the relay's start until well after its slot exists, so
    // transactions commit on both sides of the slot's consistent point.
    let stop = Arc::new(AtomicBool::new(false));
    let slot_made = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(commit_until(
        pg.url(),
        Rng::new(rng.next() | 1),
        seqs,
        20,
        10,
        stop.clone(),
        slot_made.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = snapshot_config(&pg, &broker, "", "snapshot_order_by = \"position\"");
    let mut relay = Relay::start(&config);
    // While the snapshot runs only the temporary slot exists.
    let pg_ref = &pg;
    let snapshotting = wait_until(Duration::from_secs(60), || async move {
        slots(pg_ref).await.iter().any(|s| s == SNAPSHOT_SLOT)
    })
    .await;
    relay.assert_running();
    assert!(snapshotting, "the temporary slot never appeared");
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(180))
        .await;
    slot_made.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (written, before_slot) = writing.await.expect("writer task");
    assert!(
        before_slot > 0 && before_slot < written.len(),
        "the writer committed {before_slot} events before the slot existed and {} after: it must straddle the snapshot",
        written.len() - before_slot
    );
    let mut expected = before.clone();
    expected.extend(written.iter().cloned());
    let what = format!(
        "snapshot of {} rows with a writer ({} events, {before_slot} of them before the slot existed)",
        before.len(),
        written.len()
    );
    let n = expected.len();
    let (_, delivery) = delivered(&pg, &broker, &mut relay, &expected, n, &what).await;
    assert_eq!(delivery.duplicates, 0, "no event twice");
    assert_eq!(slots(&pg).await, [SLOT]);
}

#[tokio::test]
async fn kill_9_during_the_snapshot_leaves_no_slot_and_the_restart_loses_nothing() {
    let (pg, broker) = setup().await;
    let mut rng = Rng::new(13);
    let mut seqs = Seqs::default();
    let before = insert_many(&pg, &mut rng, &mut seqs, 30_000, "before").await;
    // A small producer queue and a long linger slow the snapshot down (a few thousand
    // records a second), so that the kill lands in its middle.
    let slow = "\n[kafka.properties]\n\"queue.buffering.max.messages\" = \"200\"\n\"linger.ms\" = \"50\"\n";
    let order = "snapshot_order_by = \"position\"";
    let mut relay = Relay::start(&(snapshot_config(&pg, &broker, "", order) + slow));
    let mut reader = broker.reader(&TOPICS);
    let mut seen_slots = Vec::new();
    let started = std::time::Instant::now();
    // Kill once part of the snapshot is in Kafka; until then the permanent slot must never
    // have existed.
    while reader.len() < 2000 {
        relay.assert_running();
        reader.poll();
        let now = slots(&pg).await;
        assert!(
            !now.iter().any(|s| s == SLOT),
            "the permanent slot existed after {} of {} snapshot records: {now:?}",
            reader.len(),
            before.len()
        );
        seen_slots.extend(now);
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} records within 120 s",
            reader.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill9();
    let killed_at = reader.len();
    assert!(
        seen_slots.iter().any(|s| s == SNAPSHOT_SLOT),
        "the snapshot ran without its temporary slot: {seen_slots:?}"
    );
    // The temporary slot goes with the dead relay's connection: nothing is left behind.
    let pg_ref = &pg;
    let gone = wait_until(Duration::from_secs(30), || async move {
        slots(pg_ref).await.is_empty()
    })
    .await;
    assert!(gone, "slots left after the kill: {:?}", slots(&pg).await);

    // The restart takes the snapshot again, then streams.
    let mut relay = Relay::start(&snapshot_config(&pg, &broker, "", order));
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(180))
        .await;
    let client = pg.client().await;
    let rows = events(&mut rng, &mut seqs, 50, 12, None, "after");
    let mut expected = before.clone();
    expected.extend(insert_outbox(&client, &rows).await);
    let what = format!(
        "kill -9 after {killed_at} of {} snapshot records, restart",
        before.len()
    );
    let n = expected.len() + killed_at;
    let (_, delivery) = delivered(&pg, &broker, &mut relay, &expected, n, &what).await;
    assert!(
        delivery.duplicates >= killed_at,
        "the restart took the snapshot again: the {killed_at} records sent before the kill are sent twice"
    );
    assert_eq!(count_lines(&relay, "initial snapshot done"), 1);
}

#[tokio::test]
async fn an_existing_slot_means_no_snapshot_after_a_restart() {
    let (pg, broker) = setup().await;
    let mut rng = Rng::new(17);
    let mut seqs = Seqs::default();
    let mut expected = insert_many(&pg, &mut rng, &mut seqs, 300, "before").await;
    let config = snapshot_config(&pg, &broker, "", "");
    let mut relay = Relay::start(&config);
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(120))
        .await;
    let client = pg.client().await;
    let rows = events(&mut rng, &mut seqs, 30, 12, None, "first run");
    expected.extend(insert_outbox(&client, &rows).await);
    let n = expected.len();
    delivered(&pg, &broker, &mut relay, &expected, n, "first run").await;
    relay.sigterm();
    let status = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop: {status:?}"
    );

    // Written while the relay is down, then the same config again: the slot exists, so the
    // rows in the outbox (all 300 + 30 + 20 of them) are not published a second time.
    let rows = events(&mut rng, &mut seqs, 20, 12, None, "while down");
    expected.extend(insert_outbox(&client, &rows).await);
    let mut relay = Relay::start(&config);
    let n = expected.len();
    let what = "restart with initial_snapshot and the slot in place";
    let (recs, _) = delivered(&pg, &broker, &mut relay, &expected, n, what).await;
    assert_eq!(recs.len(), expected.len(), "nothing published twice");
    assert_eq!(
        count_lines(&relay, "initial snapshot"),
        0,
        "{}",
        relay.stderr()
    );
}

#[tokio::test]
async fn two_replicas_started_at_once_take_one_snapshot() {
    let (pg, broker) = setup().await;
    let mut rng = Rng::new(19);
    let mut seqs = Seqs::default();
    let mut expected = insert_many(&pg, &mut rng, &mut seqs, 5000, "before").await;
    let config = snapshot_config(&pg, &broker, "", "snapshot_order_by = \"position\"");
    let mut a = Relay::start(&config);
    let mut b = Relay::start(&config);
    let pg_ref = &pg;
    let made = wait_until(Duration::from_secs(120), || async move {
        pg_ref.confirmed_flush_lsn(SLOT).await.is_some()
    })
    .await;
    a.assert_running();
    b.assert_running();
    assert!(made, "no replica created the slot");
    let client = pg.client().await;
    let rows = events(&mut rng, &mut seqs, 30, 12, None, "after");
    expected.extend(insert_outbox(&client, &rows).await);
    let mut reader = broker.reader(&TOPICS);
    reader
        .wait_for(expected.len(), PATIENCE.delivery, || {
            a.assert_running();
            b.assert_running();
        })
        .await;
    reader.settle(common::QUIET).await;
    let recs = reader.records();
    let delivery = check_delivery(&recs, &expected, PARTITIONS);
    let snapshots =
        count_lines(&a, "initial snapshot done") + count_lines(&b, "initial snapshot done");
    eprintln!(
        "two replicas: {snapshots} snapshot(s), {} events, {} records read, {} duplicates",
        expected.len(),
        recs.len(),
        delivery.duplicates
    );
    delivery.assert_ok("two replicas with initial_snapshot");
    assert_eq!(snapshots, 1, "exactly one replica takes the snapshot");
    assert_eq!(
        delivery.duplicates, 0,
        "the other replica published nothing"
    );
}

#[tokio::test]
async fn a_role_that_may_not_read_the_outbox_stops_with_one_line_and_no_slot() {
    let (pg, broker) = setup().await;
    pg.sql(
        "CREATE ROLE relay LOGIN REPLICATION;\n\
         CREATE PUBLICATION outbox_relay FOR TABLE public.outbox \
         WITH (publish = 'insert', publish_via_partition_root = true);\n\
         INSERT INTO public.outbox (aggregatetype, aggregateid, type) VALUES ('order', 'k', 't');",
    )
    .await;
    let config = basic_config(&pg.url_for("relay", "unused"), &broker.bootstrap()).replacen(
        "\n\n[[outbox]]\n",
        "\ninitial_snapshot = true\n\n[[outbox]]\n",
        1,
    );
    let last = stop_line(&mut Relay::start(&config)).await;
    eprintln!("without SELECT: {last}");
    assert!(
        last.contains("permission denied") && last.contains("SELECT"),
        "one line naming the cause and the fix: {last}"
    );
    assert!(slots(&pg).await.is_empty(), "no slot left behind");
}

#[tokio::test]
async fn a_permanent_slot_with_the_temporary_slots_name_stops_with_one_line() {
    let (pg, broker) = setup().await;
    pg.sql("SELECT pg_create_logical_replication_slot('outbox_relay_snapshot', 'pgoutput')")
        .await;
    let last = stop_line(&mut Relay::start(&snapshot_config(&pg, &broker, "", ""))).await;
    assert!(
        last.contains(SNAPSHOT_SLOT) && last.contains("pg_drop_replication_slot"),
        "one line naming the slot and the fix: {last}"
    );
    assert_eq!(slots(&pg).await, [SNAPSHOT_SLOT], "no slot of the relay's");
}

#[tokio::test]
async fn snapshot_records_keep_partition_column_and_cloudevents_headers() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(common::ORDERS_OUTBOX_DDL).await;
    pg.sql(
        "INSERT INTO public.orders_outbox (aggregateid, type, payload, part)
         SELECT 'o-' || i, 'OrderPlaced', ('{\"n\": ' || i || '}')::jsonb, i % 4
         FROM generate_series(0, 19) i",
    )
    .await;
    broker.create_topic("orders", PARTITIONS).await;
    let config = format!(
        "[postgres]\nurl = \"{}\"\ninitial_snapshot = true\n\n\
         [[outbox]]\ntable = \"public.orders_outbox\"\ntopic = \"orders\"\n\
         partition_column = \"part\"\ncloudevents = true\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let mut relay = Relay::start(&config);
    relay
        .wait_for_slot(&pg, SLOT, Duration::from_secs(120))
        .await;
    pg.sql(
        "INSERT INTO public.orders_outbox (aggregateid, type, payload, part) \
         VALUES ('o-streamed', 'OrderPlaced', '{}', 3)",
    )
    .await;
    let recs = broker
        .read_all(&["orders"], 21, Duration::from_secs(120))
        .await;
    relay.assert_running();
    assert_eq!(recs.len(), 21, "20 snapshot records and 1 streamed");
    for r in &recs {
        let key = r.key_str().unwrap_or_default();
        let want = match key.strip_prefix("o-").and_then(|n| n.parse::<i32>().ok()) {
            Some(n) => n % 4,
            None => 3,
        };
        assert_eq!(r.partition, want, "partition_column for {key}");
        assert_eq!(r.header_str("ce_id"), r.header_str("id"), "ce_id of {key}");
        assert_eq!(r.header_str("ce_type").as_deref(), Some("OrderPlaced"));
        // The snapshot does not know when a row committed; the stream does.
        assert_eq!(
            r.header("ce_time").is_some(),
            key == "o-streamed",
            "ce_time of {key}: {:?}",
            r.header_str("ce_time")
        );
    }
}
