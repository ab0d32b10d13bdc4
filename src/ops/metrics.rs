//! Metrics and health: the Prometheus registry the pipeline updates, and the readiness state
//! `/readyz` reports (streaming, broker reachable, acknowledgements progressing).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the relay exports, prefixed `outbox_relay_`.
pub struct Metrics {
    registry: Registry,
    /// Records Kafka acknowledged, by outbox table and topic.
    pub events_published: IntCounterVec,
    /// Records Kafka refused, by topic and reason.
    pub publish_errors: IntCounterVec,
    /// Transactions whose records were all acknowledged.
    pub transactions: IntCounter,
    /// The slot's confirmed flush LSN as a number.
    pub confirmed_flush_lsn: IntGauge,
    /// The newest WAL position received from the server.
    pub received_lsn: IntGauge,
    /// Server WAL end minus the confirmed LSN.
    pub replication_lag_bytes: IntGauge,
    /// PostgreSQL commit time to Kafka acknowledgement.
    pub commit_to_ack_seconds: Histogram,
    /// PostgreSQL commit time to the relay receiving the transaction: the database's share.
    pub commit_to_receive_seconds: Histogram,
    /// Records handed to the producer and not yet acknowledged.
    pub inflight_events: IntGauge,
    /// 1 while the process runs.
    pub up: IntGauge,
    /// 1 while this instance holds the slot and streams.
    pub leader: IntGauge,
    /// Reconnects, by target (`postgres`, `kafka`).
    pub reconnects: IntCounterVec,
    /// 1 for the slot's current `wal_status` (reserved, extended, unreserved, lost, missing).
    pub slot_wal_status: IntGaugeVec,
    /// Rows of the initial snapshot handed to the producer, by outbox table.
    pub snapshot_events: IntCounterVec,
    /// Replication sessions closed because Kafka acknowledged nothing for
    /// `[relay] release_session_after_secs`.
    pub sessions_released: IntCounter,
    /// 1 if the slot is a failover slot, 0 if not, -1 where the server has none (before 17).
    pub slot_failover: IntGauge,
    /// 1 for the `host:port` of `[postgres] url` the relay streams from (the primary).
    pub primary: IntGaugeVec,
}

/// `wal_status` values exported, so a dashboard sees zeros rather than gaps.
pub const WAL_STATUSES: [&str; 5] = ["reserved", "extended", "unreserved", "lost", "missing"];

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("outbox_relay")
}

/// A latency histogram from 1 ms to 60 s, with bounds at 7.5 and 15 ms around the 10 ms
/// target so that its p99 can be read without interpolating across a wide bucket.
fn latency(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::from(opts(name, help)).buckets(vec![
        0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0, 60.0,
    ]))
    .expect("static metric definition")
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::new(),
            events_published: IntCounterVec::new(
                opts(
                    "events_published_total",
                    "Outbox events acknowledged by Kafka",
                ),
                &["table", "topic"],
            )
            .expect("static metric definition"),
            publish_errors: IntCounterVec::new(
                opts("publish_errors_total", "Records Kafka refused"),
                &["topic", "reason"],
            )
            .expect("static metric definition"),
            transactions: IntCounter::with_opts(opts(
                "transactions_total",
                "Transactions fully acknowledged",
            ))
            .expect("static metric definition"),
            confirmed_flush_lsn: IntGauge::with_opts(opts(
                "confirmed_flush_lsn",
                "LSN confirmed to the slot (everything before it is in Kafka)",
            ))
            .expect("static metric definition"),
            received_lsn: IntGauge::with_opts(opts(
                "received_lsn",
                "Newest WAL position received from PostgreSQL",
            ))
            .expect("static metric definition"),
            replication_lag_bytes: IntGauge::with_opts(opts(
                "replication_lag_bytes",
                "Server WAL end minus the confirmed LSN",
            ))
            .expect("static metric definition"),
            commit_to_ack_seconds: latency(
                "commit_to_ack_seconds",
                "PostgreSQL commit timestamp to Kafka acknowledgement, per record",
            ),
            commit_to_receive_seconds: latency(
                "commit_to_receive_seconds",
                "PostgreSQL commit timestamp to the relay receiving the transaction's first message",
            ),
            inflight_events: IntGauge::with_opts(opts(
                "inflight_events",
                "Records handed to the producer and not yet acknowledged",
            ))
            .expect("static metric definition"),
            up: IntGauge::with_opts(opts("up", "1 while the relay process runs"))
                .expect("static metric definition"),
            leader: IntGauge::with_opts(opts(
                "leader",
                "1 while this instance holds the replication slot",
            ))
            .expect("static metric definition"),
            reconnects: IntCounterVec::new(
                opts("reconnects_total", "Reconnects after a lost connection"),
                &["target"],
            )
            .expect("static metric definition"),
            slot_wal_status: IntGaugeVec::new(
                opts(
                    "slot_wal_status",
                    "1 for the slot's current wal_status in pg_replication_slots",
                ),
                &["status"],
            )
            .expect("static metric definition"),
            snapshot_events: IntCounterVec::new(
                opts(
                    "snapshot_events_total",
                    "Rows of the initial snapshot handed to the producer",
                ),
                &["table"],
            )
            .expect("static metric definition"),
            sessions_released: IntCounter::with_opts(opts(
                "sessions_released_total",
                "Replication sessions closed so that a Kafka outage does not block PostgreSQL's shutdown",
            ))
            .expect("static metric definition"),
            slot_failover: IntGauge::with_opts(opts(
                "slot_failover",
                "1 if the slot is a failover slot (kept on standbys with sync_replication_slots), 0 if not, -1 if the server has none (before PostgreSQL 17)",
            ))
            .expect("static metric definition"),
            primary: IntGaugeVec::new(
                opts(
                    "primary",
                    "1 for the host of [postgres] url the relay streams from, the primary",
                ),
                &["host"],
            )
            .expect("static metric definition"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 17] = [
            Box::new(m.events_published.clone()),
            Box::new(m.publish_errors.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.confirmed_flush_lsn.clone()),
            Box::new(m.received_lsn.clone()),
            Box::new(m.replication_lag_bytes.clone()),
            Box::new(m.commit_to_ack_seconds.clone()),
            Box::new(m.commit_to_receive_seconds.clone()),
            Box::new(m.inflight_events.clone()),
            Box::new(m.up.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.reconnects.clone()),
            Box::new(m.slot_wal_status.clone()),
            Box::new(m.snapshot_events.clone()),
            Box::new(m.sessions_released.clone()),
            Box::new(m.slot_failover.clone()),
            Box::new(m.primary.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        for target in ["postgres", "kafka"] {
            m.reconnects.with_label_values(&[target]);
        }
        m.set_wal_status(None);
        m.slot_failover.set(-1);
        m.up.set(1);
        m
    }

    /// Marks `status` (None: the slot is missing) as the slot's current `wal_status`.
    pub fn set_wal_status(&self, status: Option<&str>) {
        let current = status.unwrap_or("missing");
        for s in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[s])
                .set(i64::from(s == current));
        }
    }

    /// Marks `host` as the one the relay streams from now.
    pub fn set_primary(&self, host: &str) {
        self.primary.reset();
        self.primary.with_label_values(&[host]).set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would only drop the body.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/readyz` reports; each part is set by the component that knows it.
#[derive(Default)]
pub struct Health {
    streaming: AtomicBool,
    broker_down: AtomicBool,
    not_streaming_reason: Mutex<String>,
    broker_reason: Mutex<String>,
    /// The last TLS or authentication failure towards the brokers: why they are unreachable
    /// when a probe only sees a timeout. Cleared when a broker answers.
    transport_error: Mutex<Option<String>>,
    stalled: Mutex<Option<String>>,
    /// Why the replication session was released while Kafka is silent, until streaming again.
    released: Mutex<Option<String>>,
}

impl Health {
    /// The replication stream is running (this instance holds the slot).
    pub fn set_streaming(&self) {
        *lock(&self.released) = None;
        self.streaming.store(true, Ordering::Relaxed);
    }

    /// The replication session was released because Kafka stayed silent (`why`); `/readyz`
    /// names Kafka's trouble first, as the cause, then the release.
    pub fn set_released(&self, why: impl Into<String>) {
        let why = why.into();
        *lock(&self.released) = Some(why.clone());
        self.set_not_streaming(format!("released the replication session ({why}); waiting for Kafka before resuming from the slot"));
    }

    /// The replication stream is not running, and why (standby, reconnecting, stopping).
    pub fn set_not_streaming(&self, reason: impl Into<String>) {
        *lock(&self.not_streaming_reason) = reason.into();
        self.streaming.store(false, Ordering::Relaxed);
    }

    /// Whether the broker was last reported unreachable.
    pub fn broker_down(&self) -> bool {
        self.broker_down.load(Ordering::Relaxed)
    }

    /// Whether the broker answered recently; true when it just came back.
    pub fn set_broker(&self, reachable: bool, reason: impl Into<String>) -> bool {
        if reachable {
            *lock(&self.transport_error) = None;
        } else {
            *lock(&self.broker_reason) = reason.into();
        }
        let was_down = self.broker_down.swap(!reachable, Ordering::Relaxed);
        reachable && was_down
    }

    /// A TLS handshake or SASL authentication with a broker failed, and why (librdkafka's
    /// words, which name the setting to fix): reported by `/readyz` while Kafka is unreachable.
    pub fn set_transport_error(&self, reason: impl Into<String>) {
        *lock(&self.transport_error) = Some(reason.into());
    }

    /// `Some(why)` when acknowledgements stopped progressing.
    pub fn set_stalled(&self, why: Option<String>) {
        *lock(&self.stalled) = why;
    }

    /// `Ok` when ready; otherwise the one-line reason.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.streaming.load(Ordering::Relaxed) {
            let not_streaming = format!("not streaming: {}", lock(&self.not_streaming_reason));
            return Err(
                match (lock(&self.released).is_some(), self.kafka_trouble()) {
                    (true, Some(cause)) => format!("{cause}; {not_streaming}"),
                    _ => not_streaming,
                },
            );
        }
        self.kafka_trouble().map_or(Ok(()), Err)
    }

    /// Kafka unreachable, or acknowledgements stalled, in words.
    fn kafka_trouble(&self) -> Option<String> {
        if self.broker_down.load(Ordering::Relaxed) {
            return Some(match lock(&self.transport_error).as_ref() {
                Some(why) => format!("Kafka unreachable: {why}"),
                None => format!("Kafka unreachable: {}", lock(&self.broker_reason)),
            });
        }
        lock(&self.stalled)
            .as_ref()
            .map(|why| format!("stalled: {why}"))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain strings; a poisoned one is still meaningful.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.events_published
            .with_label_values(&["public.outbox", "outbox.event.order"])
            .inc();
        m.publish_errors.with_label_values(&["t", "x"]).inc();
        m.commit_to_ack_seconds.observe(0.004);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "outbox_relay_events_published_total{table=\"public.outbox\",topic=\"outbox.event.order\"} 1",
            "outbox_relay_publish_errors_total",
            "outbox_relay_transactions_total",
            "outbox_relay_confirmed_flush_lsn",
            "outbox_relay_received_lsn",
            "outbox_relay_replication_lag_bytes",
            "outbox_relay_commit_to_ack_seconds_bucket",
            "outbox_relay_inflight_events",
            "outbox_relay_up 1",
            "outbox_relay_leader 0",
            "outbox_relay_reconnects_total{target=\"postgres\"} 0",
            "outbox_relay_slot_wal_status{status=\"missing\"} 1",
            "outbox_relay_sessions_released_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn a_released_session_names_kafka_first() {
        let h = Health::default();
        h.set_released("Kafka acknowledged none of 3 waiting records for 5 s");
        let said = h.readiness().unwrap_err();
        assert!(
            said.starts_with("not streaming: released the replication session"),
            "{said}"
        );
        h.set_broker(false, "1/1 brokers are down");
        let said = h.readiness().unwrap_err();
        assert!(
            said.starts_with("Kafka unreachable: 1/1 brokers are down; not streaming: released"),
            "{said}"
        );
        h.set_streaming();
        h.set_not_streaming("reconnecting to PostgreSQL");
        assert_eq!(
            h.readiness(),
            Err("not streaming: reconnecting to PostgreSQL".into())
        );
    }

    #[test]
    fn readiness_names_the_first_reason() {
        let h = Health::default();
        h.set_not_streaming("slot outbox_relay is in use by another process");
        assert_eq!(
            h.readiness(),
            Err("not streaming: slot outbox_relay is in use by another process".into())
        );
        h.set_streaming();
        assert_eq!(h.readiness(), Ok(()));
        h.set_broker(false, "all brokers down");
        assert!(h.readiness().unwrap_err().contains("all brokers down"));
        h.set_transport_error("SSL handshake failed: certificate verify failed");
        h.set_broker(false, "Meta data fetch error: OperationTimedOut");
        assert_eq!(
            h.readiness(),
            Err("Kafka unreachable: SSL handshake failed: certificate verify failed".into())
        );
        h.set_broker(true, "");
        h.set_broker(false, "all brokers down");
        assert!(h.readiness().unwrap_err().contains("all brokers down"));
        h.set_broker(true, "");
        h.set_stalled(Some("oldest record waited 61 s".into()));
        assert!(h.readiness().unwrap_err().starts_with("stalled"));
    }
}
