//! The polling publisher `benches/bench.sh` compares the relay with: the classic
//! transactional-outbox poller of the seed article, done well. One loop:
//!
//! ```text
//! BEGIN;
//! SELECT seq, id, aggregatetype, aggregateid, type, payload::text FROM <table>
//!     ORDER BY seq LIMIT <batch> FOR UPDATE SKIP LOCKED;
//! -- produce every row (same producer settings as the relay), wait for all acks
//! DELETE FROM <table> WHERE seq = ANY(<the ids>);
//! COMMIT;
//! ```
//!
//! until the SELECT returns nothing. Records look like the relay's: key = aggregateid,
//! headers `id` and `type`, value = the payload's text, topic = prefix + aggregatetype.
//!
//! ```text
//! bench_poller --pg-url postgres://postgres@127.0.0.1:5432/postgres --brokers 127.0.0.1:9092 \
//!     --table outbox_bench.outbox_poll --topic-prefix outbox-bench. --batch 1000
//! ```
//!
//! Prints one JSON line: `{"events": N, "batches": B, "secs": S, "backend_cpu_s": C,
//! "select_s": .., "produce_s": .., "delete_s": ..}`, where `backend_cpu_s` is the CPU time of
//! the PostgreSQL backend serving the loop (null when the server is not on this machine) and
//! the last three split the time between the locking SELECT, producing until every record is
//! acknowledged, and DELETE + COMMIT.

use std::process::ExitCode;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use outbox_relay::kafka::producer::DEFAULT_PROPERTIES;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio_postgres::NoTls;

#[derive(Parser)]
struct Args {
    /// The database (libpq URL).
    #[arg(long)]
    pg_url: String,
    /// Bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// The outbox copy to drain; needs a `seq bigint` ordering column.
    #[arg(long)]
    table: String,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: i64,
    /// Topic = this prefix + the row's aggregatetype.
    #[arg(long, default_value = "outbox.event.")]
    topic_prefix: String,
    /// librdkafka properties overriding the relay's defaults, key=value.
    #[arg(long = "property")]
    properties: Vec<String>,
    /// Clock ticks per second of /proc/PID/stat (getconf CLK_TCK).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
}

/// Counts delivery reports (acknowledged, failed) and wakes the loop waiting for them.
///
/// The loop waits on this rather than calling `flush()`: rust-rdkafka's `flush` polls in
/// steps that always last 100 ms, which would make every batch take at least that long.
#[derive(Default)]
struct Counter {
    done: Mutex<(u64, u64)>,
    changed: Condvar,
}

impl ClientContext for Counter {}

impl ProducerContext for Counter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut done = self.done.lock().unwrap();
        match result {
            Ok(_) => done.0 += 1,
            Err((e, _)) => {
                eprintln!("bench_poller: delivery failed: {e}");
                done.1 += 1;
            }
        }
        self.changed.notify_one();
    }
}

impl Counter {
    /// Waits until `sent` reports arrived in total; returns how many failed.
    fn wait(&self, sent: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        let mut done = self.done.lock().unwrap();
        while done.0 + done.1 < sent {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for acknowledgements");
            }
            done = self.changed.wait_timeout(done, left).unwrap().0;
        }
        Ok(done.1)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_poller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn backend_ticks(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn run(args: &Args) -> anyhow::Result<String> {
    let mut config = ClientConfig::new();
    for (k, v) in DEFAULT_PROPERTIES {
        config.set(*k, *v);
    }
    config.set("bootstrap.servers", &args.brokers);
    config.set("client.id", "outbox-bench-poller");
    for p in &args.properties {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--property {p:?} is not key=value"))?;
        config.set(k, v);
    }
    let producer: ThreadedProducer<Counter> = config
        .create_with_context(Counter::default())
        .context("cannot create the producer")?;

    let (mut client, connection) = tokio_postgres::connect(&args.pg_url, NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let backend_start = backend_ticks(backend);
    let select = client
        .prepare(&format!(
            "SELECT seq, id::text, aggregatetype, aggregateid, type, payload::text FROM {} \
             ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
            args.table
        ))
        .await?;
    let delete = client
        .prepare(&format!("DELETE FROM {} WHERE seq = ANY($1)", args.table))
        .await?;

    let started = Instant::now();
    let (mut events, mut batches, mut sent) = (0u64, 0u64, 0u64);
    // Where the time goes: the locking SELECT, producing until acknowledged, DELETE + COMMIT.
    let (mut t_select, mut t_produce, mut t_delete) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut topic = String::new();
    loop {
        let t0 = Instant::now();
        let txn = client.transaction().await?;
        let rows = txn.query(&select, &[&args.batch]).await?;
        let t1 = Instant::now();
        t_select += t1 - t0;
        if rows.is_empty() {
            txn.commit().await?;
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.get::<_, i64>(0));
            let id: &str = row.get(1);
            let aggregatetype: &str = row.get(2);
            let key: &str = row.get(3);
            let kind: &str = row.get(4);
            let payload: Option<&str> = row.get(5);
            topic.clear();
            topic.push_str(&args.topic_prefix);
            topic.push_str(aggregatetype);
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "id",
                    value: Some(id),
                })
                .insert(Header {
                    key: "type",
                    value: Some(kind),
                });
            let mut record = BaseRecord::<str, str, ()>::to(&topic)
                .key(key)
                .headers(headers);
            if let Some(p) = payload {
                record = record.payload(p);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        std::thread::sleep(Duration::from_millis(1));
                        record = r;
                    }
                    Err((e, _)) => bail!("cannot produce: {e}"),
                }
            }
            sent += 1;
        }
        // Every record acknowledged before the rows go: at-least-once, as with the relay.
        let failed = producer.context().wait(sent, Duration::from_secs(120))?;
        if failed > 0 {
            bail!("{failed} records were not delivered");
        }
        let t2 = Instant::now();
        t_produce += t2 - t1;
        txn.execute(&delete, &[&ids]).await?;
        txn.commit().await?;
        t_delete += t2.elapsed();
        events += rows.len() as u64;
        batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let backend_cpu = match (backend_start, backend_ticks(backend)) {
        (Some(a), Some(b)) => format!("{:.2}", (b - a) as f64 / args.clk_tck as f64),
        _ => "null".into(),
    };
    Ok(format!(
        "{{\"events\": {events}, \"batches\": {batches}, \"secs\": {secs:.3}, \"backend_cpu_s\": {backend_cpu}, \"select_s\": {:.3}, \"produce_s\": {:.3}, \"delete_s\": {:.3}}}",
        t_select.as_secs_f64(),
        t_produce.as_secs_f64(),
        t_delete.as_secs_f64()
    ))
}
