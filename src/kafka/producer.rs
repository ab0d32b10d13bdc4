//! The Kafka publisher: an idempotent `acks=all` librdkafka producer, its defaults, and the
//! hand-over of one record (waiting while its queue is full). Delivery reports feed the
//! acknowledgement tracker (see `kafka::delivery`); records Kafka refuses for good
//! are settled, or replaced by a note in `[kafka] dead_letter_topic`, by the publisher's
//! refusal task (see [`crate::kafka::dead_letter`] for which ones).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::{topic, CloudEvents, KafkaConfig, Source};
use crate::fxhash::FxHashMap;
use crate::kafka::dead_letter::{catchable, is_fenced, Refusal, Stage};
use crate::kafka::delivery::{
    pack, send_lingering_now, serve_reports, Delivery, ReportQueue, Route, Shared, NO_ROUTE,
    POSITION_TOKEN,
};
use crate::mapping::cloudevents;
use crate::mapping::record::Record;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::{AckTracker, DeliveryFailure, InFlight};

/// Producer settings the relay's promises rest on; `[kafka.properties]` may override them.
pub const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // A batch the broker refuses for good must not be skipped over: by default librdkafka
    // renumbers and sends the later records of the partition, which then precede the refused
    // one when the relay re-sends it after a restart (per-key order broken). Gapless makes
    // that a fatal producer error, so the relay stops before anything later is appended.
    ("enable.gapless.guarantee", "true"),
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

/// How long one wait for room in the producer's queue lasts at most before [`Waiting::tick`].
pub const WAIT_TICK: Duration = Duration::from_millis(100);
/// Above this many unacknowledged records the relay is busy and `linger.ms` batching pays
/// for itself; below it a caught-up relay asks librdkafka to send at once.
const NUDGE_MAX_IN_FLIGHT: u64 = 64;
/// At most one nudge per this long: each one costs the broker a Produce request, and between
/// nudges `linger.ms` batches as usual.
const NUDGE_EVERY: Duration = Duration::from_millis(5);
/// How long a nudge keeps librdkafka's "flushing" state (linger.ms ignored) on.
const NUDGE_MS: i32 = 2;

/// Why a record could not be handed to the producer; either way its in-flight token comes
/// back, for the caller to try again, to set the record aside with, or to drop.
#[derive(Debug)]
pub enum SendError<'t> {
    /// The producer queue is full; wait for acknowledgements and try again.
    QueueFull(InFlight<'t>),
    /// The record was refused before it left (e.g. larger than `message.max.bytes`, or an
    /// illegal topic name); [`Publisher::set_aside`] decides what becomes of it.
    /// Boxed: refusals are rare, and the common `Result` stays small.
    Refused(InFlight<'t>, Box<Refusal>),
}

/// What the sender does between two looks at a full producer queue (e.g. keep the
/// replication connection alive); an error ends the hand-over.
// The relay runs on one thread, so its futures need no `Send` bound.
#[allow(async_fn_in_trait)]
pub trait Waiting {
    /// The sender's own error.
    type Error;
    /// Called after each wait for room in the queue.
    async fn tick(&mut self) -> Result<(), Self::Error>;
}

/// The refusal task's waiting: nothing to keep alive, nothing that ends it.
struct Patient;

impl Waiting for Patient {
    type Error = Infallible;

    async fn tick(&mut self) -> Result<(), Infallible> {
        Ok(())
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

/// Where refused records go, when `[kafka] dead_letter_topic` is set.
struct DeadLetters {
    topic: String,
    /// Whether refusals reported after sending are caught too (not in exactly-once mode,
    /// where such a refusal dooms the Kafka transaction the note would be written in).
    after_send: bool,
}

/// Route numbers by topic, then by source: `(Record::table, route)`.
type RouteNumbers = FxHashMap<String, Vec<(Option<usize>, usize)>>;

/// What sends records: the replication loop through [`Publisher`], and the refusal task.
struct Sender {
    producer: Arc<BaseProducer<Delivery>>,
    shared: Arc<Shared>,
    routes: Mutex<RouteNumbers>,
    /// Per `Record::table`, the CloudEvents attributes when that source has them on.
    cloudevents: Vec<Option<CloudEvents>>,
    dead_letters: Option<DeadLetters>,
}

/// Hands records to Kafka; acknowledgements flow to the tracker from the report task.
pub struct Publisher {
    sender: Arc<Sender>,
    /// Serves delivery reports (see `kafka::delivery`); stopped on drop.
    reports: tokio::task::JoinHandle<()>,
    /// Settles refused records or sends their notes; stopped on drop.
    refusals: tokio::task::JoinHandle<()>,
    /// A nudge is under way on a blocking thread.
    nudging: Arc<AtomicBool>,
    /// When the last nudge started.
    last_nudge: Mutex<Instant>,
}

impl Publisher {
    /// Builds the producer from `[kafka]`, the relay's defaults overridden by `properties`.
    pub fn new(
        config: &KafkaConfig,
        sources: &[Source],
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
        let tables = sources.iter().map(|s| s.name.clone()).collect();
        let shared = Arc::new(Shared::new(tracker, metrics, health, tables));
        let producer: Arc<BaseProducer<Delivery>> =
            Arc::new(client.create_with_context(Delivery(shared.clone()))?);
        let queue = ReportQueue::new(producer.clone()).ok_or_else(|| {
            KafkaError::ClientCreation("librdkafka gave no delivery report queue".into())
        })?;
        let sender = Arc::new(Sender {
            producer,
            shared,
            routes: Mutex::new(FxHashMap::default()),
            cloudevents: sources.iter().map(|s| s.cloudevents.clone()).collect(),
            dead_letters: config.dead_letter_topic.as_ref().map(|t| DeadLetters {
                topic: t.clone(),
                after_send: config.exactly_once().is_none(),
            }),
        });
        Ok(Publisher {
            reports: tokio::spawn(serve_reports(queue)),
            refusals: tokio::spawn(serve_refusals(sender.clone())),
            sender,
            nudging: Arc::new(AtomicBool::new(false)),
            last_nudge: Mutex::new(Instant::now()),
        })
    }

    /// The relay has caught up with the server: have librdkafka send what it holds now rather
    /// than after `linger.ms`, unless so much is in flight that batching is worth the wait.
    /// Under a backlog the socket is never empty, so this never fires and batches stay large;
    /// at low rates it takes `linger.ms` out of every event's commit-to-ack latency.
    pub fn nudge(self: &Arc<Self>) {
        if self.sender.shared.tracker.in_flight() > NUDGE_MAX_IN_FLIGHT {
            return;
        }
        {
            let mut last = self
                .last_nudge
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.elapsed() < NUDGE_EVERY || self.nudging.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Instant::now();
        }
        let (sender, nudging) = (self.sender.clone(), self.nudging.clone());
        tokio::task::spawn_blocking(move || {
            send_lingering_now(&sender.producer, NUDGE_MS);
            nudging.store(false, Ordering::Release);
        });
    }

    /// Hands one record to the producer without waiting; `in_flight` is its count in the
    /// tracker, passed on to the record's delivery report once the producer took it.
    pub fn send<'t>(
        &self,
        in_flight: InFlight<'t>,
        record: &Record<'_>,
    ) -> Result<(), SendError<'t>> {
        self.sender.send(in_flight, record)
    }

    /// Hands `record` to the producer, waiting while its queue is full (refilled in large
    /// steps, `waiting` ticking between looks); `Ok(Err(_))` when the record was refused for
    /// good, its count still held by the token that comes back.
    pub async fn send_when_room<'t, W: Waiting>(
        &self,
        waiting: &mut W,
        in_flight: InFlight<'t>,
        record: &Record<'_>,
    ) -> Result<Result<(), (InFlight<'t>, Box<Refusal>)>, W::Error> {
        self.sender.send_when_room(waiting, in_flight, record).await
    }

    /// A record refused before the producer took it: true if `[kafka] dead_letter_topic`
    /// takes it (its count passes to the note the refusal task sends in its place), else
    /// false, the tracker has the failure, and the confirmed LSN stays before the record.
    #[must_use = "false means the record was refused and the relay must stop"]
    pub fn set_aside(&self, in_flight: InFlight<'_>, refusal: Box<Refusal>) -> bool {
        if !self.sender.takes(&refusal) {
            in_flight.refused(self.sender.failure(*refusal));
            return false;
        }
        in_flight.handed_over();
        self.sender.shared.refusals.push(*refusal);
        true
    }

    /// Resolves once at most `in_flight` records are unacknowledged (checked as reports
    /// arrive), so a full queue is refilled in large steps rather than one record at a time.
    pub async fn space_below(&self, in_flight: u64) {
        self.sender.shared.space_below(in_flight).await
    }

    /// Waits up to `timeout` for every queued record's delivery report and every refused
    /// record's note; false if some remain.
    pub async fn flush(self: &Arc<Self>, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let sender = self.sender.clone();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let flushed = tokio::task::spawn_blocking(move || sender.producer.flush(left).is_ok())
                .await
                .unwrap_or(false);
            let refusals = &self.sender.shared.refusals;
            if !flushed || refusals.pending() == 0 {
                return flushed;
            }
            // A note sent meanwhile is in the producer's queue again: flush once more.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !refusals.idle(left).await {
                return false;
            }
        }
    }

    /// Asks the brokers for cluster metadata: whether Kafka is reachable right now.
    pub async fn probe(self: &Arc<Self>, timeout: Duration) -> Result<(), String> {
        let sender = self.sender.clone();
        tokio::task::spawn_blocking(move || {
            sender
                .producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    }

    /// The topics records have been sent to so far.
    pub fn topics(&self) -> Vec<String> {
        let routes = self
            .sender
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        routes.keys().cloned().collect()
    }

    /// Records queued or in flight inside librdkafka, and refused ones awaiting their notes.
    pub fn queued(&self) -> i32 {
        let refusals = i32::try_from(self.sender.shared.refusals.pending()).unwrap_or(i32::MAX);
        self.sender
            .producer
            .in_flight_count()
            .saturating_add(refusals)
    }
}

impl Sender {
    /// The route number of (source `table`, `topic`), made on first use.
    fn route(&self, table: Option<usize>, topic: &str) -> usize {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&(_, route)) = routes
            .get(topic)
            .and_then(|v| v.iter().find(|(t, _)| *t == table))
        {
            return route;
        }
        let mut numbered = self
            .shared
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if numbered.len() >= NO_ROUTE {
            return NO_ROUTE;
        }
        let name = table
            .and_then(|t| self.shared.tables.get(t))
            .map_or("other", String::as_str);
        numbered.push(Route {
            published: self
                .shared
                .metrics
                .events_published
                .with_label_values(&[name, topic]),
            table,
        });
        let route = numbered.len() - 1;
        routes
            .entry(topic.to_owned())
            .or_default()
            .push((table, route));
        route
    }

    /// See [`Publisher::send`].
    fn send<'t>(&self, in_flight: InFlight<'t>, record: &Record<'_>) -> Result<(), SendError<'t>> {
        debug_assert!(in_flight.counts_in(&self.shared.tracker));
        let txn = in_flight.txn();
        // A name Kafka would refuse costs librdkafka topic.metadata.propagation.max.ms (30 s)
        // of waiting for a topic that can never exist; refuse it here, at once.
        if let Err(illegal) = topic::check(record.topic) {
            let code = Some(RDKafkaErrorCode::InvalidTopic);
            let refusal = Refusal::local(txn, record, code, illegal.to_string());
            return Err(SendError::Refused(in_flight, Box::new(refusal)));
        }
        let token = pack(txn, self.route(record.table, record.topic));
        let ce = record
            .table
            .and_then(|t| self.cloudevents.get(t))
            .and_then(Option::as_ref);
        let mut headers = OwnedHeaders::new_with_capacity(
            2 + record.extra_headers.len() + if ce.is_some() { 6 } else { 0 },
        );
        for (key, value) in record.headers() {
            headers = headers.insert(Header { key, value });
        }
        if let Some(ce) = ce {
            let mut time = [0; cloudevents::TIME_LEN];
            let time = record.time.and_then(|t| cloudevents::time(t, &mut time));
            for (key, value) in cloudevents::headers(ce, record.id, record.kind, time) {
                headers = headers.insert(Header { key, value });
            }
        }
        let mut out =
            BaseRecord::<[u8], [u8], usize>::with_opaque_to(record.topic, token).headers(headers);
        if let Some(p) = record.partition {
            out = out.partition(p);
        }
        if let Some(k) = record.key {
            out = out.key(k);
        }
        if let Some(p) = record.payload {
            out = out.payload(p);
        }
        match self.producer.send(out) {
            Ok(()) => {
                in_flight.handed_over();
                Ok(())
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull(in_flight))
            }
            Err((err, _)) => {
                let refusal =
                    Refusal::local(txn, record, err.rdkafka_error_code(), err.to_string());
                Err(SendError::Refused(in_flight, Box::new(refusal)))
            }
        }
    }

    /// See [`Publisher::send_when_room`].
    async fn send_when_room<'t, W: Waiting>(
        &self,
        waiting: &mut W,
        mut in_flight: InFlight<'t>,
        record: &Record<'_>,
    ) -> Result<Result<(), (InFlight<'t>, Box<Refusal>)>, W::Error> {
        loop {
            match self.send(in_flight, record) {
                Ok(()) => return Ok(Ok(())),
                Err(SendError::Refused(back, refusal)) => return Ok(Err((back, refusal))),
                Err(SendError::QueueFull(back)) => {
                    in_flight = back;
                    // Refill in large steps: waking for every acknowledgement would cost a
                    // context switch per record.
                    let refill_at = self.shared.tracker.in_flight() / 2;
                    tokio::select! {
                        _ = self.shared.space_below(refill_at) => {}
                        _ = tokio::time::sleep(WAIT_TICK) => {}
                    }
                    // An error here drops the token: the record was never sent, so its
                    // count goes back and a later drain does not wait for it.
                    waiting.tick().await?;
                }
            }
        }
    }

    /// Whether the dead-letter topic takes this refusal in the record's place.
    fn takes(&self, refusal: &Refusal) -> bool {
        let Some(dead) = &self.dead_letters else {
            return false;
        };
        let failure = refusal.failure();
        (refusal.stage == Stage::Local || dead.after_send)
            // A refused note has no place of its own to go.
            && failure.topic != dead.topic
            && catchable(refusal.stage, refusal.code)
    }

    /// The failure the tracker gets for a refusal nothing sets aside, with what the operator
    /// can do about it. A producer with a fatal error refuses every record with librdkafka's
    /// bare "Fatal error", at `send` as in its reports: the cause (e.g. fenced by another
    /// relay) is the producer's, so it is asked.
    fn failure(&self, refusal: Refusal) -> DeliveryFailure {
        let mut failure = refusal.failure;
        if let Some((code, why)) = self.producer.client().fatal_error() {
            failure.fenced |= is_fenced(Some(code));
            failure.error = format!(
                "{}; the Kafka producer can no longer send: {why}{}",
                failure.error,
                size_hint(refusal.code)
            );
            return failure;
        }
        match &self.dead_letters {
            Some(dead) if failure.topic == dead.topic => {
                failure.error = format!(
                    "{} (a dead letter: check that dead_letter_topic {} exists and accepts this producer's writes)",
                    failure.error, dead.topic
                );
            }
            Some(dead)
                if !dead.after_send
                    && refusal.stage == Stage::AfterSend
                    && catchable(refusal.stage, refusal.code) =>
            {
                failure.error = format!(
                    "{}; in exactly-once mode a record refused after sending cannot be set aside (its Kafka transaction must abort): create the topic or fix the row",
                    failure.error
                );
            }
            None if catchable(refusal.stage, refusal.code) => {
                failure.error = format!(
                    "{}; set [kafka] dead_letter_topic to have such records set aside there instead",
                    failure.error
                );
            }
            _ => {}
        }
        failure
    }

    /// Settles one refused record: purged by an aborted Kafka transaction, it is not refused;
    /// else its note goes to the dead-letter topic in its place, or the tracker gets the
    /// failure.
    async fn judge(&self, refusal: Refusal) {
        let shared = &self.shared;
        let purged = matches!(
            refusal.code,
            Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
        );
        if self.producer.client().fatal_error().is_some() {
            // Gapless: the broker refused a record that already had its place in a partition,
            // and the producer will send nothing more (it purged what it held). Or, in
            // exactly-once mode, another relay fenced this one: the purged record says so.
            let txn = refusal.txn;
            shared.settle(txn, Err(self.failure(refusal)));
            return;
        }
        if purged && refusal.stage == Stage::AfterSend {
            // Exactly-once mode aborted the Kafka transaction: its events are sent again
            // from the committed position.
            shared.settle(refusal.txn, Ok(()));
            return;
        }
        let dead = match &self.dead_letters {
            Some(dead) if self.takes(&refusal) => dead,
            _ => {
                shared.settle(refusal.txn, Err(self.failure(refusal)));
                return;
            }
        };
        let source = refusal
            .table
            .and_then(|t| shared.tables.get(t))
            .map_or("?", String::as_str);
        let note = refusal.note(source);
        let letter = refusal.letter(&dead.topic, &note);
        tracing::warn!(
            "{}; sent a note to dead_letter_topic {} instead",
            refusal.failure,
            dead.topic
        );
        let in_flight = shared.tracker.retake(refusal.txn);
        let sent = self.send_when_room(&mut Patient, in_flight, &letter).await;
        let Ok(sent) = sent;
        if let Err((in_flight, again)) = sent {
            if again.code == Some(RDKafkaErrorCode::State) {
                // Exactly-once mode: the Kafka transaction was aborted meanwhile. The next
                // session reads the record again from the committed position, so its note is
                // put off, not lost; the dropped token keeps the transaction unconfirmed.
                drop(in_flight);
                return;
            }
            let failure = refusal.failure();
            in_flight.refused(DeliveryFailure {
                error: format!(
                    "{}; its note to dead_letter_topic {} was refused too: {}",
                    failure.error,
                    dead.topic,
                    again.failure().error
                ),
                ..failure.clone()
            });
        }
    }
}

/// For a record too large for the broker: how to have such records refused before sending,
/// where the dead-letter topic can take them.
fn size_hint(code: Option<RDKafkaErrorCode>) -> &'static str {
    match code {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge) => {
            "; set [kafka.properties] message.max.bytes no higher than the topic's max.message.bytes, so that such records are refused before sending (and go to dead_letter_topic when it is set)"
        }
        _ => "",
    }
}

/// Serves refused records one at a time, in the order they were refused.
async fn serve_refusals(sender: Arc<Sender>) {
    loop {
        let refusal = sender.shared.refusals.next().await;
        sender.judge(refusal).await;
        sender.shared.refusals.done();
    }
}

/// Kafka transactions, for exactly-once mode (`crate::kafka::exactly_once` decides when). The calls
/// that wait for the brokers run on a blocking thread, so the relay's thread keeps serving
/// delivery reports meanwhile: commit and abort wait for every queued record's report.
impl Publisher {
    /// Runs a waiting producer call on a blocking thread.
    async fn blocking(
        self: &Arc<Self>,
        call: impl FnOnce(&BaseProducer<Delivery>) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), KafkaError> {
        let sender = self.sender.clone();
        tokio::task::spawn_blocking(move || call(&sender.producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Registers the `transactional.id`, fencing any older producer that used it.
    pub async fn init_transactions(self: &Arc<Self>, timeout: Duration) -> Result<(), KafkaError> {
        self.blocking(move |p| p.init_transactions(timeout)).await
    }

    /// Starts a Kafka transaction (a local step: it waits for no broker).
    pub fn begin_transaction(&self) -> Result<(), KafkaError> {
        self.sender.producer.begin_transaction()
    }

    /// Resolves once a position record got its delivery report, or after `timeout`. Commit
    /// after it: rust-rdkafka's commit first flushes, and a flush that finds a record still
    /// queued polls for at least 100 ms, which would cost every Kafka transaction that much.
    pub async fn position_delivered(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.sender.shared.position.notified()).await;
    }

    /// Commits the open Kafka transaction.
    pub async fn commit_transaction(self: &Arc<Self>, timeout: Duration) -> Result<(), KafkaError> {
        self.blocking(move |p| p.commit_transaction(timeout)).await
    }

    /// Aborts the open Kafka transaction; its queued records are purged.
    pub async fn abort_transaction(self: &Arc<Self>, timeout: Duration) -> Result<(), KafkaError> {
        self.blocking(move |p| p.abort_transaction(timeout)).await
    }

    /// Hands a position record to the producer, for partition 0 of `topic`.
    pub fn send_position(&self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), KafkaError> {
        let record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, POSITION_TOKEN)
            .partition(0)
            .key(key)
            .payload(value);
        self.sender.producer.send(record).map_err(|(err, _)| err)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reports.abort();
        self.refusals.abort();
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
            ..KafkaConfig::default()
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
