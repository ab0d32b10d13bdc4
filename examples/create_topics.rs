//! Creates topics with a given partition count (replication factor 1), for the demo and for
//! trying the relay against a local broker. Topics that already exist are left as they are.
//!
//! ```text
//! cargo run --example create_topics -- --brokers 127.0.0.1:9092 --partitions 3 \
//!     outbox.event.order outbox.event.customer
//! cargo run --example create_topics -- --brokers 127.0.0.1:9092 --partitions 1 \
//!     --config cleanup.policy=compact outbox-relay-offsets
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

/// Creates the named topics; "already exists" is not an error.
#[derive(Parser)]
struct Args {
    /// Bootstrap servers, host:port[,host:port].
    #[arg(long)]
    brokers: String,
    /// Partitions per topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// A topic setting, KEY=VALUE (repeatable), e.g. cleanup.policy=compact.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = key_value)]
    configs: Vec<(String, String)>,
    /// The topics to create.
    #[arg(required = true)]
    topics: Vec<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()
    {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("create_topics: cannot create admin client: {e}");
            return ExitCode::from(2);
        }
    };
    let new_topics: Vec<NewTopic<'_>> = args
        .topics
        .iter()
        .map(|t| {
            args.configs.iter().fold(
                NewTopic::new(t, args.partitions, TopicReplication::Fixed(1)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = match admin.create_topics(&new_topics, &options).await {
        Ok(results) => results,
        Err(e) => {
            eprintln!("create_topics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for result in results {
        match result {
            Ok(topic) => println!("created topic {topic} ({} partitions)", args.partitions),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                println!("topic {topic} already exists")
            }
            Err((topic, code)) => {
                eprintln!("create_topics: cannot create {topic}: {code}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
