//! A tiny Kafka reader for the demo: reads every partition of the given topics from the
//! beginning (partitions assigned by hand, no group membership, no commits) and prints one
//! line per record.
//!
//! ```text
//! cargo run --example consume -- --brokers 127.0.0.1:9092 \
//!     --topics outbox.event.order,outbox.event.customer --expect 6 --timeout-secs 30
//! ```
//!
//! Each line reads `topic[partition]@offset key=<key> id=<id header> type=<type header>
//! value=<value as text>`; a missing key, header or value prints as `<null>`. Exits 0 once
//! `--expect` records were read, 1 if the timeout came first (a topic that never appeared
//! included), 2 on a usage or client error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Reads the given topics from the beginning and prints each record.
#[derive(Parser)]
struct Args {
    /// Bootstrap servers, host:port[,host:port].
    #[arg(long)]
    brokers: String,
    /// Topics to read, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    topics: Vec<String>,
    /// Stop (exit 0) after this many records.
    #[arg(long)]
    expect: u64,
    /// Give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(read) if read >= args.expect => ExitCode::SUCCESS,
        Ok(read) => {
            eprintln!(
                "consume: timed out after {}s with {read} of {} records",
                args.timeout_secs, args.expect
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("consume: {e}");
            ExitCode::from(2)
        }
    }
}

/// Returns how many records were read before `--expect` was reached or time ran out.
fn run(args: &Args) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        // librdkafka's assign() wants a group id, but with partitions assigned by hand and
        // nothing committed the group never coordinates anything; a unique one per run.
        .set(
            "group.id",
            format!("outbox-relay-consume-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("cannot create consumer: {e}"))?;

    let mut assignment = TopicPartitionList::new();
    for topic in &args.topics {
        let Some(partitions) = partitions_of(&consumer, topic, deadline) else {
            return Ok(0);
        };
        for partition in 0..partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .map_err(|e| format!("cannot assign {topic}[{partition}]: {e}"))?;
        }
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("cannot assign partitions: {e}"))?;

    let mut read = 0;
    while read < args.expect {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left.min(Duration::from_millis(200))) {
            None => {}
            Some(Ok(message)) => {
                println!("{}", describe(&message));
                read += 1;
            }
            // Transient (broker restarting, leader moving): librdkafka recovers by itself.
            Some(Err(e)) => eprintln!("consume: {e}"),
        }
    }
    Ok(read)
}

/// The topic's partition count, waiting (until `deadline`) for it to appear in the metadata;
/// `None` if it did not.
fn partitions_of(consumer: &BaseConsumer, topic: &str, deadline: Instant) -> Option<i32> {
    loop {
        let outcome = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| e.to_string())
            .and_then(|metadata| {
                let t = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .ok_or_else(|| "not in metadata".to_owned())?;
                match (t.error(), t.partitions().len()) {
                    (Some(e), _) => Err(RDKafkaErrorCode::from(e).to_string()),
                    (None, 0) => Err("no partitions".to_owned()),
                    (None, n) => Ok(n as i32),
                }
            });
        match outcome {
            Ok(n) => return Some(n),
            Err(e) if Instant::now() >= deadline => {
                eprintln!("consume: topic {topic} not available: {e}");
                return None;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn describe(m: &BorrowedMessage<'_>) -> String {
    let header = |name: &str| {
        m.headers()
            .and_then(|h| h.iter().find(|h| h.key == name))
            .and_then(|h| h.value)
            .map_or_else(|| "<null>".to_owned(), text)
    };
    format!(
        "{}[{}]@{} key={} id={} type={} value={}",
        m.topic(),
        m.partition(),
        m.offset(),
        m.key().map_or_else(|| "<null>".to_owned(), text),
        header("id"),
        header("type"),
        m.payload().map_or_else(|| "<null>".to_owned(), text),
    )
}

/// Bytes as text; invalid UTF-8 (a bytea payload, say) is shown lossily.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
