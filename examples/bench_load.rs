//! Steady load for `benches/bench.sh`'s latency measurement: commits single-event
//! transactions into an outbox table at a fixed rate while a consumer reads the relay's topics,
//! and reports end-to-end latency (commit in PostgreSQL → record read by a Kafka consumer).
//!
//! ```text
//! bench_load --pg-url postgres://postgres@127.0.0.1:5432/postgres --brokers 127.0.0.1:9092 \
//!     --table outbox_bench.outbox --topics outbox-bench.order,outbox-bench.customer \
//!     --rate 1000 --secs 30
//! ```
//!
//! Each row's payload (~230 bytes of JSON, like the backlog's) carries `ts_us`, the server's
//! `clock_timestamp()` in microseconds taken inside the INSERT, a few microseconds before the
//! commit, and `run`, so that only this run's records are counted. The consumer starts at each
//! partition's end before the load begins. Inserts are spread over `--connections` pipelined
//! connections, one autocommit INSERT (one transaction) per event, on a fixed schedule; if the
//! server falls behind, the schedule is kept by having more statements in flight (up to
//! `--max-inflight`), and the achieved rate is reported.
//!
//! Prints one JSON line: sent/committed counts, achieved commits/s, how many records the
//! consumer saw, and end-to-end p50/p99/max in milliseconds (`--no-consumer`: no consumer,
//! for commit-to-ack measured with the broker serving the relay alone; `--read-committed`: the
//! consumer reads with `isolation.level=read_committed`, for the relay's exactly-once mode,
//! where a record is readable only once its Kafka transaction is committed).
//!
//! `--direct` is the baseline: no database; the same records at the same rate produced
//! straight to the broker with the relay's producer settings, reporting send-to-ack p50/p99
//! (`direct_p50_ms`, `direct_p99_ms`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_postgres::NoTls;

#[derive(Parser)]
struct Args {
    /// The database (libpq URL).
    #[arg(long, required_unless_present = "direct")]
    pg_url: Option<String>,
    /// Bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// The outbox table the relay publishes.
    #[arg(long, required_unless_present = "direct")]
    table: Option<String>,
    /// Produce straight to the broker (no database): the baseline.
    #[arg(long)]
    direct: bool,
    /// The topics the relay writes these rows to, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    topics: Vec<String>,
    /// Transactions (events) per second.
    #[arg(long)]
    rate: u64,
    /// How long the load runs.
    #[arg(long, default_value_t = 30.0)]
    secs: f64,
    /// Connections the inserts are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Upper bound of statements in flight.
    #[arg(long, default_value_t = 4000)]
    max_inflight: usize,
    /// Distinct record keys.
    #[arg(long, default_value_t = 64)]
    keys: u64,
    /// Run no consumer: commit-to-ack is then measured with the broker serving the relay
    /// alone, as for the `--direct` baseline (commit-to-consumer is not reported).
    #[arg(long)]
    no_consumer: bool,
    /// The consumer reads with `isolation.level=read_committed` (the relay's exactly-once
    /// mode: a record counts once its Kafka transaction is committed).
    #[arg(long)]
    read_committed: bool,
    /// After the load, how long to wait for the consumer to see every record.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.direct {
        direct(&args)
    } else {
        run(&args).await
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The consumer, positioned at the end of every partition of `topics`.
fn consumer_at_end(
    brokers: &str,
    topics: &[String],
    read_committed: bool,
) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .set(
            "group.id",
            format!("outbox-bench-load-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Fetch as soon as anything is there: this consumer measures latency.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.min.bytes", "1")
        .create()
        .context("cannot create the consumer")?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("no metadata for {topic}"))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len() as i32);
        if partitions == 0 {
            return Err(anyhow!("topic {topic} has no partitions (create it first)"));
        }
        for p in 0..partitions {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("cannot read the end of {topic}[{p}]"))?;
            assignment.add_partition_offset(topic, p, Offset::Offset(high))?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// What the consumer thread saw: latencies in microseconds.
fn consume(
    consumer: BaseConsumer,
    run: String,
    expected: Arc<AtomicU64>,
    stop_at: Arc<AtomicU64>,
) -> Vec<i64> {
    let mut latencies = Vec::new();
    loop {
        if latencies.len() as u64 >= expected.load(Ordering::Relaxed) {
            break;
        }
        let stop = stop_at.load(Ordering::Relaxed);
        if stop != 0 && now_us() as u64 > stop {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let seen = now_us();
                let Some(payload) = m.payload() else { continue };
                let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    continue;
                };
                // Debezium's JSON converter with schemas (its defaults): the document is an
                // escaped string in the envelope's `payload`.
                if v.get("run").is_none() {
                    if let Some(inner) = v.get("payload").and_then(|p| p.as_str()) {
                        if let Ok(inner) = serde_json::from_str(inner) {
                            v = inner;
                        }
                    }
                }
                if v.get("run").and_then(|r| r.as_str()) != Some(run.as_str()) {
                    continue;
                }
                if let Some(ts) = v.get("ts_us").and_then(|t| t.as_i64()) {
                    latencies.push(seen - ts);
                }
            }
            Some(Err(e)) => eprintln!("bench_load: consumer: {e}"),
            None => {}
        }
    }
    latencies
}

fn quantile(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

async fn run(args: &Args) -> anyhow::Result<String> {
    let run_id = format!("{}-{}", std::process::id(), now_us());
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let stop_at = Arc::new(AtomicU64::new(0));
    let consumer_thread = if args.no_consumer {
        None
    } else {
        let consumer = consumer_at_end(&args.brokers, &args.topics, args.read_committed)?;
        let (run, expected, stop_at) = (run_id.clone(), expected.clone(), stop_at.clone());
        Some(std::thread::spawn(move || {
            consume(consumer, run, expected, stop_at)
        }))
    };

    let (Some(pg_url), Some(table)) = (&args.pg_url, &args.table) else {
        return Err(anyhow!("--pg-url and --table are needed without --direct"));
    };
    let sql = format!(
        "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload) VALUES \
         (gen_random_uuid(), CASE WHEN $1::bigint % 2 = 0 THEN 'order' ELSE 'customer' END, \
          'key-' || ($1::bigint % $2::bigint), 'Created', \
          jsonb_build_object('seq', $1::bigint, 'run', $3::text, \
              'ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, \
              'customer', 'c-' || ($1::bigint % 977), 'note', repeat('x', 100), \
              'total', $1::bigint * 1.5))",
        table
    );
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (client, connection) = tokio_postgres::connect(pg_url, NoTls)
            .await
            .context("cannot connect to PostgreSQL")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let stmt = client.prepare(&sql).await?;
        clients.push((Arc::new(client), stmt));
    }
    // Let the consumer's assignment take effect before the first record is written.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let total = (args.rate as f64 * args.secs).round() as u64;
    let inflight = Arc::new(Semaphore::new(args.max_inflight));
    let committed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut max_behind = Duration::ZERO;
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        } else {
            max_behind = max_behind.max(now - due);
        }
        let permit = inflight.clone().acquire_owned().await?;
        let (client, stmt) = clients[i as usize % clients.len()].clone();
        let (committed, failed, run) = (committed.clone(), failed.clone(), run_id.clone());
        let (seq, keys) = (i as i64, args.keys as i64);
        tokio::spawn(async move {
            match client.execute(&stmt, &[&seq, &keys, &run]).await {
                Ok(_) => committed.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("bench_load: insert failed: {e}");
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            drop(permit);
        });
    }
    // Wait for every statement to finish.
    let _all = inflight.acquire_many(args.max_inflight as u32).await?;
    let load_secs = started.elapsed().as_secs_f64();
    let committed = committed.load(Ordering::Relaxed);
    expected.store(committed, Ordering::Relaxed);
    stop_at.store(
        (now_us() + args.drain_secs as i64 * 1_000_000) as u64,
        Ordering::Relaxed,
    );
    let consumed = match consumer_thread {
        None => "\"consumer\": false".to_owned(),
        Some(thread) => {
            let mut latencies = thread
                .join()
                .map_err(|_| anyhow!("consumer thread panicked"))?;
            latencies.sort_unstable();
            format!(
                "\"consumer\": true, \"read_committed\": {}, \"consumed\": {}, \"e2e_p50_ms\": {:.2}, \
                 \"e2e_p99_ms\": {:.2}, \"e2e_max_ms\": {:.2}",
                args.read_committed,
                latencies.len(),
                quantile(&latencies, 0.5),
                quantile(&latencies, 0.99),
                quantile(&latencies, 1.0),
            )
        }
    };
    Ok(format!(
        "{{\"rate\": {}, \"sent\": {total}, \"committed\": {committed}, \"failed\": {}, \
         \"load_secs\": {load_secs:.3}, \"achieved_per_s\": {:.1}, \"max_behind_ms\": {:.1}, \
         {consumed}}}",
        args.rate,
        failed.load(Ordering::Relaxed),
        committed as f64 / load_secs,
        max_behind.as_secs_f64() * 1000.0,
    ))
}

/// Delivery reports of the baseline producer: the opaque is the send time in µs.
struct Acks(std::sync::Mutex<Vec<i64>>);

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, sent_us: usize) {
        if result.is_ok() {
            let latency = now_us() - sent_us as i64;
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(latency);
        }
    }
}

/// The baseline: the same records at the same rate, straight to the broker.
fn direct(args: &Args) -> anyhow::Result<String> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

    let kafka = outbox_relay::config::KafkaConfig {
        brokers: args.brokers.clone(),
        ..Default::default()
    };
    let producer: ThreadedProducer<Acks> =
        outbox_relay::kafka::producer::client_config(&kafka, "outbox-bench-direct")
            .create_with_context(Acks(std::sync::Mutex::new(Vec::new())))
            .context("cannot create the producer")?;
    // Warm-up, not measured: one record per topic, so that the connection and the topics'
    // metadata (a few hundred ms on first use) are in place, as in a long-running relay.
    for topic in &args.topics {
        let warm = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, 0).payload(&b"{}"[..]);
        producer
            .send(warm)
            .map_err(|(e, _)| e)
            .context("warm-up record")?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("the broker did not acknowledge the warm-up records")?;
    producer
        .context()
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    let total = (args.rate as f64 * args.secs).round() as u64;
    let note = "x".repeat(100);
    let started = Instant::now();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let topic = &args.topics[i as usize % args.topics.len()];
        let key = format!("key-{}", i % args.keys);
        let id = format!("{:032x}", i);
        let payload = format!(
            r#"{{"seq": {i}, "ts_us": {}, "customer": "c-{}", "note": "{note}", "total": {}}}"#,
            now_us(),
            i % 977,
            i as f64 * 1.5
        );
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "id",
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "type",
                value: Some(&b"Created"[..]),
            });
        let mut record = BaseRecord::with_opaque_to(topic, now_us() as usize)
            .key(key.as_bytes())
            .payload(payload.as_bytes())
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    eprintln!("bench_load: produce: {e}");
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(args.drain_secs))
        .context("the broker did not acknowledge every record")?;
    let mut latencies = std::mem::take(
        &mut *producer
            .context()
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    latencies.sort_unstable();
    Ok(format!(
        "{{\"direct_sent\": {total}, \"direct_acked\": {}, \"direct_p50_ms\": {:.2}, \"direct_p99_ms\": {:.2}}}",
        latencies.len(),
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
    ))
}
