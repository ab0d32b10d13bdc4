//! The Kafka publisher: an idempotent `acks=all` librdkafka producer whose delivery reports
//! feed the acknowledgement tracker, carrying only the transaction id per record.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use crate::ack::{AckTracker, DeliveryFailure, TxnId};
use crate::config::{KafkaConfig, OutboxConfig};
use crate::metrics::{Health, Metrics};
use crate::outbox::Record;
use crate::replication::pg_now_micros;

/// Producer settings the relay's promises rest on; `[kafka.properties]` may override them.
pub const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // The Java client's partitioner, so existing consumers see the same key → partition.
    ("partitioner", "murmur2_random"),
    // librdkafka buffers up to 1 GiB by default; a small queue is what makes backpressure.
    ("queue.buffering.max.messages", "20000"),
    ("queue.buffering.max.kbytes", "16384"),
    ("linger.ms", "5"),
    // Never give up on a record while the broker is away: backpressure holds the slot, and
    // /readyz reports the stall. Records refused for good still fail at once.
    ("message.timeout.ms", "0"),
];

/// Why a record could not be handed to the producer.
#[derive(Debug)]
pub enum SendError {
    /// The producer queue is full; wait for acknowledgements and try again.
    QueueFull,
    /// The record was refused before it left (e.g. larger than `message.max.bytes`).
    Refused(DeliveryFailure),
}

/// Packs the transaction and the outbox table's index into librdkafka's per-record opaque,
/// so a delivery report needs no allocation to find either.
const TABLE_BITS: u32 = 16;

struct Delivery {
    tracker: Arc<AckTracker>,
    space: Arc<Notify>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    tables: Vec<String>,
}

impl ClientContext for Delivery {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "{fac}: {log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "{error}: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.set_broker(false, reason);
        }
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, token: usize) {
        let txn = (token >> TABLE_BITS) as TxnId;
        let table = self
            .tables
            .get(token & ((1 << TABLE_BITS) - 1))
            .map_or("?", String::as_str);
        let verdict = match result {
            Ok(msg) => {
                self.metrics
                    .events_published
                    .with_label_values(&[table, msg.topic()])
                    .inc();
                Ok(())
            }
            Err((err, msg)) => {
                let reason = err
                    .rdkafka_error_code()
                    .map_or_else(|| err.to_string(), |c| format!("{c:?}"));
                self.metrics
                    .publish_errors
                    .with_label_values(&[msg.topic(), &reason])
                    .inc();
                Err(DeliveryFailure {
                    event_id: msg
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_else(|| "?".into()),
                    topic: msg.topic().to_owned(),
                    error: err.to_string(),
                })
            }
        };
        let ok = verdict.is_ok();
        if let Some(commit_time) = self.tracker.delivered(txn, verdict) {
            let secs = (pg_now_micros() - commit_time) as f64 / 1e6;
            self.metrics.commit_to_ack_seconds.observe(secs.max(0.0));
        }
        if ok && self.health.set_broker(true, "") {
            self.metrics.reconnects.with_label_values(&["kafka"]).inc();
        }
        self.space.notify_one();
    }
}

/// The librdkafka settings: the relay's defaults, the brokers, then `[kafka.properties]`.
pub fn client_config(config: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (k, v) in DEFAULT_PROPERTIES {
        client.set(*k, *v);
    }
    client.set("bootstrap.servers", &config.brokers);
    client.set("client.id", client_id);
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    client
}

/// Hands records to Kafka; acknowledgements flow to the tracker on librdkafka's thread.
pub struct Publisher {
    producer: ThreadedProducer<Delivery>,
    space: Arc<Notify>,
}

impl Publisher {
    /// Builds the producer from `[kafka]`, the relay's defaults overridden by `properties`.
    pub fn new(
        config: &KafkaConfig,
        tables: &[OutboxConfig],
        tracker: Arc<AckTracker>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, KafkaError> {
        let client = client_config(config, "outbox-relay");
        for (key, safe) in [
            ("acks", ["all", "-1"]),
            ("enable.idempotence", ["true", "true"]),
        ] {
            if let Some(v) = config.properties.get(key) {
                if !safe.contains(&v.as_str()) {
                    tracing::warn!(
                        "[kafka.properties] {key} = {v:?} weakens the relay's guarantees (no loss, per-key order)"
                    );
                }
            }
        }
        let space = Arc::new(Notify::new());
        let producer = client.create_with_context(Delivery {
            tracker,
            space: space.clone(),
            metrics,
            health,
            tables: tables.iter().map(|t| t.table.clone()).collect(),
        })?;
        Ok(Publisher { producer, space })
    }

    /// Hands one record of `txn` from outbox table number `table` to the producer without waiting.
    pub fn send(&self, txn: TxnId, table: usize, record: &Record<'_>) -> Result<(), SendError> {
        let token = ((txn as usize) << TABLE_BITS) | (table & ((1 << TABLE_BITS) - 1));
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header { key, value: *value });
        }
        let mut out =
            BaseRecord::<[u8], [u8], usize>::with_opaque_to(record.topic, token).headers(headers);
        if let Some(k) = record.key {
            out = out.key(k);
        }
        if let Some(p) = record.payload {
            out = out.payload(p);
        }
        match self.producer.send(out) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((err, _)) => Err(SendError::Refused(DeliveryFailure {
                event_id: record.event_id(),
                topic: record.topic.to_owned(),
                error: err.to_string(),
            })),
        }
    }

    /// Resolves after the next delivery report, i.e. when the queue may have room again.
    pub async fn space(&self) {
        self.space.notified().await
    }

    /// Waits up to `timeout` for every queued record's delivery report; false if some remain.
    pub async fn flush(self: &Arc<Self>, timeout: Duration) -> bool {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.producer.flush(timeout).is_ok())
            .await
            .unwrap_or(false)
    }

    /// Asks the brokers for cluster metadata: whether Kafka is reachable right now.
    pub async fn probe(self: &Arc<Self>, timeout: Duration) -> Result<(), String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    }

    /// Records queued or in flight inside librdkafka.
    pub fn queued(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::client_config;
    use crate::config::KafkaConfig;

    #[test]
    fn properties_override_the_relays_defaults() {
        let kafka = KafkaConfig {
            brokers: "k1:9092,k2:9092".into(),
            properties: [("acks", "1"), ("security.protocol", "ssl")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        };
        let c = client_config(&kafka, "x");
        assert_eq!(c.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(c.get("acks"), Some("1"));
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(c.get("client.id"), Some("x"));
    }
}
