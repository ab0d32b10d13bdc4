//! librdkafka's own cost per record, for `benches/bench.sh`'s `floor` section: produces the
//! backlog's records (same sizes, keys, headers, topics and the relay's producer settings) as
//! fast as the producer's queue takes them, with no database and nothing else per record, and
//! serves the delivery reports on the producing thread as the relay does. What the relay costs
//! above this is decoding, mapping and tracking; what this costs is the floor of any relay
//! built on librdkafka.
//!
//! ```text
//! bench_floor --brokers 127.0.0.1:9092 --topics outbox-bench.order,outbox-bench.customer -n 1000000
//! ```
//!
//! Prints one JSON line: records, seconds, and CPU seconds (user + system, every thread,
//! from `getrusage`) of the measured part, after a warm-up that learns the topics' metadata.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

#[derive(Parser)]
struct Args {
    /// Bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// Topics, comma-separated; records go to them in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    topics: Vec<String>,
    /// Records to produce.
    #[arg(short, default_value_t = 1_000_000)]
    n: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 230)]
    payload: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 64)]
    keys: u64,
    /// Send no headers (to see what the `id` and `type` headers cost).
    #[arg(long)]
    no_headers: bool,
    /// A producer property over the relay's defaults, KEY=VALUE (repeatable), as
    /// `[kafka.properties]` would set it.
    #[arg(long = "set", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Counts acknowledgements; any failure is counted too and fails the run.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Acks {
    /// Reports served so far, good or bad.
    fn reported(&self) -> u64 {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc_rusage::rusage>();
        libc_rusage::getrusage(libc_rusage::RUSAGE_SELF, &mut usage);
        usage
    };
    let t = |tv: libc_rusage::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// The two calls of libc this needs, declared here rather than pulling in a crate.
mod libc_rusage {
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct timeval {
        pub tv_sec: i64,
        pub tv_usec: i64,
    }
    #[repr(C)]
    pub struct rusage {
        pub ru_utime: timeval,
        pub ru_stime: timeval,
        pub rest: [i64; 14],
    }
    pub const RUSAGE_SELF: i32 = 0;
    extern "C" {
        pub fn getrusage(who: i32, usage: *mut rusage) -> i32;
    }
}

/// Produces `n` records, serving reports whenever the queue is full; returns when all are acked.
fn produce(producer: &BaseProducer<Acks>, args: &Args, n: u64, records: &[Rec]) -> u64 {
    let acks = producer.context();
    let start = acks.reported();
    for i in 0..n {
        let rec = &records[i as usize % records.len()];
        let topic = &args.topics[i as usize % args.topics.len()];
        let mut record = BaseRecord::to(topic)
            .key(rec.key.as_bytes())
            .payload(rec.payload.as_bytes());
        if !args.no_headers {
            record = record.headers(
                OwnedHeaders::new_with_capacity(2)
                    .insert(Header {
                        key: "id",
                        value: Some(rec.id.as_bytes()),
                    })
                    .insert(Header {
                        key: "type",
                        value: Some(&b"Created"[..]),
                    }),
            );
        }
        // Queue full: serve reports (on this thread, as the relay does) and send the same
        // record again.
        while let Err((_, again)) = producer.send(record) {
            record = again;
            producer.poll(Duration::from_millis(1));
        }
    }
    while acks.reported() - start < n {
        producer.poll(Duration::from_millis(1));
    }
    acks.failed.load(Ordering::Relaxed)
}

struct Rec {
    id: String,
    key: String,
    payload: String,
}

fn run(args: &Args) -> anyhow::Result<String> {
    let kafka = outbox_relay::config::KafkaConfig {
        brokers: args.brokers.clone(),
        properties: args.properties.iter().cloned().collect(),
        ..Default::default()
    };
    let producer: BaseProducer<Acks> =
        outbox_relay::kafka::producer::client_config(&kafka, "outbox-bench-floor")
            .create_with_context(Acks::default())
            .context("cannot create the producer")?;
    let filler = "x".repeat(args.payload.saturating_sub(52));
    let records: Vec<Rec> = (0..4096u64)
        .map(|i| Rec {
            id: format!("{:08x}-0000-4000-8000-{:012x}", i, i),
            key: format!("key-{}", i % args.keys),
            payload: format!(
                r#"{{"seq": {i}, "customer": "c-{}", "note": "{filler}"}}"#,
                i % 977
            ),
        })
        .collect();
    // Warm-up, not measured: connections, producer id and the topics' metadata.
    if produce(&producer, args, 1000, &records) != 0 {
        return Err(anyhow!("the broker refused warm-up records"));
    }
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let failed = produce(&producer, args, args.n, &records);
    let (cpu, secs) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    if failed != 0 {
        return Err(anyhow!("{failed} records were refused"));
    }
    Ok(format!(
        "{{\"records\": {}, \"secs\": {secs:.3}, \"cpu_s\": {cpu:.3}, \"cpu_s_per_100k\": {:.3}}}",
        args.n,
        cpu * 100_000.0 / args.n as f64
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
