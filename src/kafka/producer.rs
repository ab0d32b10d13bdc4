//! The Kafka publisher: an idempotent `acks=all` librdkafka producer whose delivery reports
//! feed the acknowledgement tracker, carrying only the transaction id per record.
//!
//! Delivery reports are served by a task on the relay's own runtime (one thread), woken by
//! librdkafka when its report queue stops being empty, rather than by a polling thread of
//! their own: librdkafka frees each message on the thread that serves its report, and a
//! message freed on the thread that allocated it goes back to that thread's malloc cache,
//! where the next record's allocation finds it (across threads every one takes the arena's
//! locked slow path).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::bindings as rdsys;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use crate::config::{CloudEvents, KafkaConfig, Source};
use crate::fxhash::FxHashMap;
use crate::mapping::cloudevents;
use crate::mapping::record::Record;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::{AckTracker, DeliveryFailure, InFlight, TxnId};
use crate::postgres::replication::secs_since;

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

/// Why a record could not be handed to the producer; either way its in-flight token comes
/// back, for the caller to try again, to send a dead letter with, or to drop.
#[derive(Debug)]
pub enum SendError<'t> {
    /// The producer queue is full; wait for acknowledgements and try again.
    QueueFull(InFlight<'t>),
    /// The record was refused before it left (e.g. larger than `message.max.bytes`).
    Refused(InFlight<'t>, DeliveryFailure),
}

/// The per-record opaque packs the transaction and a route (outbox table and topic), so a
/// delivery report finds both, and the route's counter, without allocating or hashing.
const ROUTE_BITS: u32 = 16;
// The transaction id is shifted into the opaque's upper bits: on a 32-bit target it would
// wrap after 65,536 transactions and reports would land on the wrong transaction.
const _: () = assert!(
    usize::BITS == 64,
    "the delivery opaque packs txn << 16 into a 64-bit usize"
);
const ROUTE_MASK: usize = (1 << ROUTE_BITS) - 1;
/// Marks a record whose route did not fit in the opaque; its report takes the slow path.
const NO_ROUTE: usize = ROUTE_MASK;
/// Above this many unacknowledged records the relay is busy and `linger.ms` batching pays
/// for itself; below it a caught-up relay asks librdkafka to send at once.
const NUDGE_MAX_IN_FLIGHT: u64 = 64;
/// At most one nudge per this long: each one costs the broker a Produce request, and between
/// nudges `linger.ms` batches as usual.
const NUDGE_EVERY: Duration = Duration::from_millis(5);
/// How long a nudge keeps librdkafka's "flushing" state (linger.ms ignored) on.
const NUDGE_MS: i32 = 2;
/// `Shared::resume_below` when the relay is not waiting for room in the queue.
const NOT_WAITING: u64 = u64::MAX;
/// Delivery reports are also served this often without a wake-up, so a lost one costs a
/// pause, never a stall (librdkafka's own polling thread waits as long).
const SERVE_AT_LEAST_EVERY: Duration = Duration::from_millis(100);
/// Report events served per turn before the task yields to the replication loop.
const SERVE_BURST: usize = 256;
/// The opaque of an exactly-once position record: not an outbox event, so the tracker never
/// hears of it; its fate is its transaction's.
const POSITION_TOKEN: usize = usize::MAX;

/// Routes seen so far: each (outbox table, topic) pair gets a number and a counter.
#[derive(Default)]
struct Routes {
    by_topic: FxHashMap<String, Vec<(Option<usize>, usize)>>,
}

/// What the replication loop and librdkafka's delivery thread share.
struct Shared {
    tracker: Arc<AckTracker>,
    space: Notify,
    /// Wake the relay once this few records are unacknowledged: waking it for every report
    /// while the queue is full would cost a context switch per record.
    resume_below: AtomicU64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    tables: Vec<String>,
    /// `events_published_total{table,topic}` by route number.
    published: RwLock<Vec<IntCounter>>,
    /// Exactly-once mode: a position record got its delivery report.
    position: Notify,
}

struct Delivery(Arc<Shared>);

impl ClientContext for Delivery {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {log_message}")
            }
            // librdkafka calls every experimental property out at each start; for the
            // relay's own default (gapless) that warning says nothing the operator can act on.
            RDKafkaLogLevel::Warning
                if fac == "CONFWARN" && log_message.contains("enable.gapless.guarantee") =>
            {
                tracing::debug!(target: "librdkafka", "{fac}: {log_message}")
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
            self.0.health.set_broker(false, reason);
        }
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, token: usize) {
        if token == POSITION_TOKEN {
            if let Err((err, _)) = result {
                tracing::debug!("position record not delivered: {err}");
            }
            self.0.position.notify_one();
            return;
        }
        let shared = &*self.0;
        let txn = (token >> ROUTE_BITS) as TxnId;
        let route = token & ROUTE_MASK;
        let verdict = match result {
            Ok(msg) => {
                let published = shared
                    .published
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                match published.get(route) {
                    Some(counter) => counter.inc(),
                    None => shared
                        .metrics
                        .events_published
                        .with_label_values(&["other", msg.topic()])
                        .inc(),
                }
                Ok(())
            }
            // An aborted Kafka transaction (exactly-once mode) purges what it held: those
            // events are sent again from the committed position, not refused.
            Err((err, _))
                if matches!(
                    err.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) =>
            {
                Ok(())
            }
            Err((err, msg)) => {
                let reason = err
                    .rdkafka_error_code()
                    .map_or_else(|| err.to_string(), |c| format!("{c:?}"));
                shared
                    .metrics
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
        let done = shared.tracker.delivered(txn, verdict);
        if let Some(commit_time) = done.commit_time {
            shared
                .metrics
                .commit_to_ack_seconds
                .observe(secs_since(commit_time));
        }
        if ok && shared.health.broker_down() && shared.health.set_broker(true, "") {
            shared
                .metrics
                .reconnects
                .with_label_values(&["kafka"])
                .inc();
        }
        if done.in_flight <= shared.resume_below.load(Ordering::Acquire)
            && shared.resume_below.swap(NOT_WAITING, Ordering::AcqRel) != NOT_WAITING
        {
            shared.space.notify_one();
        }
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

/// Hands records to Kafka; acknowledgements flow to the tracker from the report task.
pub struct Publisher {
    producer: Arc<BaseProducer<Delivery>>,
    /// Serves delivery reports (see the module docs); stopped when the publisher is dropped.
    reports: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    routes: Mutex<Routes>,
    /// Per `Record::table`, the CloudEvents attributes when that source has them on.
    cloudevents: Vec<Option<CloudEvents>>,
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
        let shared = Arc::new(Shared {
            tracker,
            space: Notify::new(),
            resume_below: AtomicU64::new(NOT_WAITING),
            metrics,
            health,
            tables: sources.iter().map(|s| s.name.clone()).collect(),
            published: RwLock::new(Vec::new()),
            position: Notify::new(),
        });
        let producer: Arc<BaseProducer<Delivery>> =
            Arc::new(client.create_with_context(Delivery(shared.clone()))?);
        let queue = ReportQueue::new(producer.clone()).ok_or_else(|| {
            KafkaError::ClientCreation("librdkafka gave no delivery report queue".into())
        })?;
        let reports = tokio::spawn(serve_reports(queue));
        Ok(Publisher {
            producer,
            reports,
            shared,
            routes: Mutex::new(Routes::default()),
            cloudevents: sources.iter().map(|s| s.cloudevents.clone()).collect(),
            nudging: Arc::new(AtomicBool::new(false)),
            last_nudge: Mutex::new(Instant::now()),
        })
    }

    /// The relay has caught up with the server: have librdkafka send what it holds now rather
    /// than after `linger.ms`, unless so much is in flight that batching is worth the wait.
    /// Under a backlog the socket is never empty, so this never fires and batches stay large;
    /// at low rates it takes `linger.ms` out of every event's commit-to-ack latency.
    pub fn nudge(self: &Arc<Self>) {
        if self.shared.tracker.in_flight() > NUDGE_MAX_IN_FLIGHT {
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
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // rd_kafka_flush raises librdkafka's "flushing" flag, which makes the broker
            // threads treat linger.ms as expired, and wakes them. The flag is lowered when
            // the call returns, so it must wait (briefly) for the broker thread to run.
            // SAFETY: the handle is valid while `this` keeps the producer alive, and
            // rd_kafka_flush may be called from any thread. In the event API mode the
            // crate uses, it only waits: it does not serve delivery reports here.
            unsafe {
                rdkafka::bindings::rd_kafka_flush(this.producer.client().native_ptr(), NUDGE_MS);
            }
            this.nudging.store(false, Ordering::Release);
        });
    }

    /// The route number of (outbox table `table`, `topic`), made on first use.
    fn route(&self, table: Option<usize>, topic: &str) -> usize {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&(_, route)) = routes
            .by_topic
            .get(topic)
            .and_then(|v| v.iter().find(|(t, _)| *t == table))
        {
            return route;
        }
        let mut published = self
            .shared
            .published
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if published.len() >= NO_ROUTE {
            return NO_ROUTE;
        }
        let name = table
            .and_then(|t| self.shared.tables.get(t))
            .map_or("other", String::as_str);
        published.push(
            self.shared
                .metrics
                .events_published
                .with_label_values(&[name, topic]),
        );
        let route = published.len() - 1;
        routes
            .by_topic
            .entry(topic.to_owned())
            .or_default()
            .push((table, route));
        route
    }

    /// Hands one record to the producer without waiting; `in_flight` is its count in the
    /// tracker, passed on to the record's delivery report once the producer took it.
    pub fn send<'t>(
        &self,
        in_flight: InFlight<'t>,
        record: &Record<'_>,
    ) -> Result<(), SendError<'t>> {
        debug_assert!(in_flight.counts_in(&self.shared.tracker));
        let txn = in_flight.txn();
        let token = ((txn as usize) << ROUTE_BITS) | self.route(record.table, record.topic);
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
            Err((err, _)) => Err(SendError::Refused(
                in_flight,
                DeliveryFailure {
                    event_id: record.event_id(),
                    topic: record.topic.to_owned(),
                    error: err.to_string(),
                },
            )),
        }
    }

    /// Resolves once at most `in_flight` records are unacknowledged (checked as reports
    /// arrive), so a full queue is refilled in large steps rather than one record at a time.
    pub async fn space_below(&self, in_flight: u64) {
        let notified = self.shared.space.notified();
        tokio::pin!(notified);
        // Registered before the check, so a report arriving in between is not missed.
        notified.as_mut().enable();
        self.shared.resume_below.store(in_flight, Ordering::Release);
        if self.shared.tracker.in_flight() <= in_flight {
            self.shared
                .resume_below
                .store(NOT_WAITING, Ordering::Release);
            return;
        }
        notified.await
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

/// Kafka transactions, for exactly-once mode (`crate::kafka::exactly_once` decides when). The calls
/// that wait for the brokers run on a blocking thread, so the relay's thread keeps serving
/// delivery reports meanwhile: commit and abort wait for every queued record's report.
impl Publisher {
    /// Runs a waiting producer call on a blocking thread.
    async fn blocking(
        self: &Arc<Self>,
        call: impl FnOnce(&BaseProducer<Delivery>) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), KafkaError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || call(&this.producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Registers the `transactional.id`, fencing any older producer that used it.
    pub async fn init_transactions(self: &Arc<Self>, timeout: Duration) -> Result<(), KafkaError> {
        self.blocking(move |p| p.init_transactions(timeout)).await
    }

    /// Starts a Kafka transaction (a local step: it waits for no broker).
    pub fn begin_transaction(&self) -> Result<(), KafkaError> {
        self.producer.begin_transaction()
    }

    /// Resolves once a position record got its delivery report, or after `timeout`. Commit
    /// after it: rust-rdkafka's commit first flushes, and a flush that finds a record still
    /// queued polls for at least 100 ms, which would cost every Kafka transaction that much.
    pub async fn position_delivered(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.position.notified()).await;
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
        self.producer.send(record).map_err(|(err, _)| err)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reports.abort();
    }
}

/// librdkafka's main queue, where delivery reports and errors arrive, with a wake-up that
/// fires each time it stops being empty.
struct ReportQueue {
    producer: Arc<BaseProducer<Delivery>>,
    queue: *mut rdsys::rd_kafka_queue_t,
    /// Boxed so that its address, handed to librdkafka, stays put.
    wake: Box<tokio::sync::Notify>,
}

// SAFETY: librdkafka queues may be used from any thread; the pointer is only read.
unsafe impl Send for ReportQueue {}

impl ReportQueue {
    /// None if librdkafka has no queue to give (it only fails to allocate one).
    fn new(producer: Arc<BaseProducer<Delivery>>) -> Option<Self> {
        // SAFETY: the handle is valid while `producer` lives, which outlives this queue
        // reference (dropped first, in `Drop`).
        let queue = unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        if queue.is_null() {
            return None;
        }
        let wake = Box::new(tokio::sync::Notify::new());
        // SAFETY: a live queue; the callback's opaque is `wake`, which stays allocated until
        // the callback is switched off in `Drop`.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(
                queue,
                Some(reports_ready),
                &*wake as *const tokio::sync::Notify as *mut c_void,
            );
        }
        Some(ReportQueue {
            producer,
            queue,
            wake,
        })
    }

    fn len(&self) -> usize {
        // SAFETY: a live queue reference (see `new`).
        unsafe { rdsys::rd_kafka_queue_length(self.queue) }
    }
}

impl Drop for ReportQueue {
    fn drop(&mut self) {
        // SAFETY: switches the callback off before `wake` is freed (librdkafka calls it under
        // the queue's lock, which this takes too), then drops the reference taken in `new`.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.queue, None, std::ptr::null_mut());
            rdsys::rd_kafka_queue_destroy(self.queue);
        }
    }
}

/// Called by librdkafka (on its own threads) when the report queue gets its first event.
unsafe extern "C" fn reports_ready(_rk: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` of a live `ReportQueue` (see `ReportQueue::new`).
    let wake = unsafe { &*(opaque as *const tokio::sync::Notify) };
    wake.notify_one();
}

/// Serves delivery reports (and librdkafka's error events) as they arrive.
async fn serve_reports(queue: ReportQueue) {
    loop {
        // A wake-up that came meanwhile is kept by `Notify`, so none is lost between the
        // last look at the queue and this wait; the timeout is a safety net only.
        let _ = tokio::time::timeout(SERVE_AT_LEAST_EVERY, queue.wake.notified()).await;
        loop {
            let mut served = 0;
            while served < SERVE_BURST && queue.len() > 0 {
                queue.producer.poll(Duration::ZERO);
                served += 1;
            }
            if served < SERVE_BURST {
                break;
            }
            // Under a flood of reports, let the replication loop have its turn too.
            tokio::task::yield_now().await;
        }
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
