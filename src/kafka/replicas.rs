//! Why Kafka is not acknowledging: asked only once records have waited past
//! `stall_timeout_secs`, it looks for the partitions the relay writes to that have no leader or
//! fewer in-sync replicas than their `min.insync.replicas`. With `acks=all` the broker refuses
//! such writes (`NOT_ENOUGH_REPLICAS`) and librdkafka retries them without a word, so without
//! this `/readyz` could only say that records wait, not why.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::metadata::Metadata;

use crate::config::KafkaConfig;
use crate::kafka::producer::client_config;

/// A partition Kafka cannot take `acks=all` writes for.
#[derive(Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// The topic's name.
    pub topic: String,
    /// The partition's number.
    pub partition: i32,
    /// How many replicas are in sync; `None`: the partition has no leader.
    pub in_sync: Option<usize>,
    /// The topic's `min.insync.replicas`, when the brokers said.
    pub min_in_sync: Option<usize>,
}

/// Asks the brokers about the partitions' replicas; its admin client is made on first use, as
/// a healthy relay never needs it.
pub struct Replicas {
    config: KafkaConfig,
    admin: Option<Arc<AdminClient<DefaultClientContext>>>,
}

impl Replicas {
    /// Asks the brokers of `config`, with its security settings.
    pub fn new(config: &KafkaConfig) -> Self {
        Replicas {
            config: config.clone(),
            admin: None,
        }
    }

    /// One line on the partitions of `topics` that cannot take `acks=all` writes now, or
    /// `None` when all can (or the brokers do not answer: readiness says that elsewhere).
    pub async fn why_unacknowledged(
        &mut self,
        topics: &[String],
        timeout: Duration,
    ) -> Option<String> {
        let admin = match &self.admin {
            Some(a) => a.clone(),
            None => {
                let made = client_config(&self.config, "outbox-relay-replicas")
                    .create::<AdminClient<DefaultClientContext>>();
                match made {
                    Ok(a) => self.admin.insert(Arc::new(a)).clone(),
                    Err(e) => {
                        tracing::debug!("admin client for the replica check: {e}");
                        return None;
                    }
                }
            }
        };
        let fetcher = admin.clone();
        let metadata =
            tokio::task::spawn_blocking(move || fetcher.inner().fetch_metadata(None, timeout))
                .await
                .ok()?
                .ok()?;
        let wanted: Vec<ResourceSpecifier<'_>> =
            topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let options = AdminOptions::new().request_timeout(Some(timeout));
        let described = admin.describe_configs(&wanted, &options).await.ok()?;
        let min_in_sync = |topic: &str| {
            described.iter().flatten().find_map(|r| {
                let named = matches!(&r.specifier, rdkafka::admin::OwnedResourceSpecifier::Topic(t) if t == topic);
                named
                    .then(|| r.get("min.insync.replicas")?.value.as_deref()?.parse().ok())
                    .flatten()
            })
        };
        describe(&shortfalls(&metadata, topics, min_in_sync))
    }
}

/// The partitions of `topics` without a leader or below their `min.insync.replicas`.
fn shortfalls(
    metadata: &Metadata,
    topics: &[String],
    min_in_sync: impl Fn(&str) -> Option<usize>,
) -> Vec<Shortfall> {
    let mut found = Vec::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| topics.iter().any(|w| w == t.name()))
    {
        let min = min_in_sync(topic.name());
        for p in topic.partitions() {
            let in_sync = (p.leader() >= 0).then_some(p.isr().len());
            if in_sync.is_none() || matches!((in_sync, min), (Some(n), Some(m)) if n < m) {
                found.push(Shortfall {
                    topic: topic.name().to_owned(),
                    partition: p.id(),
                    in_sync,
                    min_in_sync: min,
                });
            }
        }
    }
    found
}

/// One line naming the first partition, how many more there are and what to do.
pub fn describe(found: &[Shortfall]) -> Option<String> {
    let first = found.first()?;
    let more = match found.len() - 1 {
        0 => String::new(),
        1 => " (and 1 more partition)".to_owned(),
        n => format!(" (and {n} more partitions)"),
    };
    let (topic, p) = (&first.topic, first.partition);
    Some(match (first.in_sync, first.min_in_sync) {
        (Some(n), Some(m)) => format!(
            "partition {p} of {topic} has {n} in-sync replica{} but min.insync.replicas={m}{more}, so the brokers refuse acks=all writes until a replica catches up: bring the stopped brokers back",
            if n == 1 { "" } else { "s" }
        ),
        _ => format!(
            "partition {p} of {topic} has no leader{more}: bring its replicas' brokers back"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(in_sync: Option<usize>) -> Shortfall {
        Shortfall {
            topic: "outbox.event.order".into(),
            partition: 2,
            in_sync,
            min_in_sync: Some(2),
        }
    }

    #[test]
    fn names_the_partition_its_replicas_and_the_fix() {
        assert_eq!(describe(&[]), None);
        let one = describe(&[short(Some(1))]).unwrap();
        assert_eq!(
            one,
            "partition 2 of outbox.event.order has 1 in-sync replica but min.insync.replicas=2, so the brokers refuse acks=all writes until a replica catches up: bring the stopped brokers back"
        );
        let three = describe(&[short(None), short(Some(1)), short(Some(1))]).unwrap();
        assert!(
            three.starts_with(
                "partition 2 of outbox.event.order has no leader (and 2 more partitions)"
            ),
            "{three}"
        );
    }
}
