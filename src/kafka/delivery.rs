//! Delivery reports: the producer context that turns each report into the tracker's count
//! (successes settled at once, refusals queued for the publisher's refusal task), the
//! per-record opaque that lets a report find its transaction and route without a lookup,
//! and the task serving librdkafka's report queue. All of the publisher's `unsafe` is here.
//!
//! Delivery reports are served by a task on the relay's own runtime (one thread), woken by
//! librdkafka when its report queue stops being empty, rather than by a polling thread of
//! their own: librdkafka frees each message on the thread that serves its report, and a
//! message freed on the thread that allocated it goes back to that thread's malloc cache,
//! where the next record's allocation finds it (across threads every one takes the arena's
//! locked slow path).

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus::IntCounter;
use rdkafka::bindings as rdsys;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Headers, Message};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use crate::kafka::dead_letter::{is_fenced, Refusal, RefusalQueue, Stage};
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::{AckTracker, DeliveryFailure, TxnId};
use crate::postgres::replication::secs_since;

// The opaque packs the transaction id above the route number; on a 32-bit target the
// transaction ids would wrap after 65,536 transactions.
const _: () = assert!(
    usize::BITS == 64,
    "the delivery opaque packs the transaction id into the upper 48 bits of a usize"
);

/// The per-record opaque packs the transaction and a route (outbox table and topic), so a
/// delivery report finds both, and the route's counter, without allocating or hashing.
const ROUTE_BITS: u32 = 16;
const ROUTE_MASK: usize = (1 << ROUTE_BITS) - 1;
/// Marks a record whose route did not fit in the opaque; its report takes the slow path.
pub(super) const NO_ROUTE: usize = ROUTE_MASK;
/// The opaque of an exactly-once position record: not an outbox event, so the tracker never
/// hears of it; its fate is its transaction's.
pub(super) const POSITION_TOKEN: usize = usize::MAX;
/// `Shared::resume_below` when the relay is not waiting for room in the queue.
const NOT_WAITING: u64 = u64::MAX;
/// Delivery reports are also served this often without a wake-up, so a lost one costs a
/// pause, never a stall (librdkafka's own polling thread waits as long).
const SERVE_AT_LEAST_EVERY: Duration = Duration::from_millis(100);
/// Report events served per turn before the task yields to the replication loop.
const SERVE_BURST: usize = 256;

/// The opaque of a record of `txn` sent by `route`.
pub(super) fn pack(txn: TxnId, route: usize) -> usize {
    ((txn as usize) << ROUTE_BITS) | (route & ROUTE_MASK)
}

/// The transaction and route packed by [`pack`].
fn unpack(token: usize) -> (TxnId, usize) {
    ((token >> ROUTE_BITS) as TxnId, token & ROUTE_MASK)
}

/// One (outbox table, topic) pair records were sent by.
pub(super) struct Route {
    /// `events_published_total{table,topic}`.
    pub(super) published: IntCounter,
    /// The source (`Record::table`), for a refused record's note.
    pub(super) table: Option<usize>,
}

/// What the replication loop, the refusal task and librdkafka's delivery reports share.
pub(super) struct Shared {
    pub(super) tracker: Arc<AckTracker>,
    space: Notify,
    /// Wake the relay once this few records are unacknowledged: waking it for every report
    /// while the queue is full would cost a context switch per record.
    resume_below: AtomicU64,
    pub(super) metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Every source's name, by `Record::table`.
    pub(super) tables: Vec<String>,
    /// By route number (the opaque's low bits).
    pub(super) routes: RwLock<Vec<Route>>,
    /// Exactly-once mode: a position record got its delivery report.
    pub(super) position: Notify,
    /// Records refused for good, each holding its count until it is settled or set aside.
    pub(super) refusals: RefusalQueue,
}

impl Shared {
    pub(super) fn new(
        tracker: Arc<AckTracker>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        tables: Vec<String>,
    ) -> Self {
        Shared {
            tracker,
            space: Notify::new(),
            resume_below: AtomicU64::new(NOT_WAITING),
            metrics,
            health,
            tables,
            routes: RwLock::new(Vec::new()),
            position: Notify::new(),
            refusals: RefusalQueue::default(),
        }
    }

    /// Kafka's final word on one record of `txn`: settles its count, and wakes a relay waiting
    /// for room in the queue once few enough records are left.
    pub(super) fn settle(&self, txn: TxnId, verdict: Result<(), DeliveryFailure>) {
        let done = self.tracker.delivered(txn, verdict);
        if let Some(commit_time) = done.commit_time {
            self.metrics
                .commit_to_ack_seconds
                .observe(secs_since(commit_time));
        }
        if done.in_flight <= self.resume_below.load(Ordering::Acquire)
            && self.resume_below.swap(NOT_WAITING, Ordering::AcqRel) != NOT_WAITING
        {
            self.space.notify_one();
        }
    }

    /// Resolves once at most `in_flight` records are unacknowledged (checked as reports
    /// arrive), so a full queue is refilled in large steps rather than one record at a time.
    pub(super) async fn space_below(&self, in_flight: u64) {
        let notified = self.space.notified();
        tokio::pin!(notified);
        // Registered before the check, so a report arriving in between is not missed.
        notified.as_mut().enable();
        self.resume_below.store(in_flight, Ordering::Release);
        if self.tracker.in_flight() <= in_flight {
            self.resume_below.store(NOT_WAITING, Ordering::Release);
            return;
        }
        notified.await
    }

    /// A record refused in its delivery report, with what its note needs copied out.
    fn refused(&self, txn: TxnId, route: usize, err: &KafkaError, msg: &BorrowedMessage<'_>) {
        let code = err.rdkafka_error_code();
        let header = |name: &str| {
            msg.headers()
                .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                .map(<[u8]>::to_vec)
        };
        let id = header("id");
        let table = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .and_then(|r| r.table);
        self.refusals.push(Refusal {
            txn,
            stage: Stage::AfterSend,
            code,
            failure: DeliveryFailure {
                event_id: id
                    .as_deref()
                    .map_or_else(|| "?".into(), |v| String::from_utf8_lossy(v).into_owned()),
                topic: msg.topic().to_owned(),
                error: err.to_string(),
                fenced: is_fenced(code),
            },
            table,
            key: msg.key().map(<[u8]>::to_vec),
            id,
            kind: header("type"),
            payload_bytes: msg.payload_len(),
            time: None,
        });
    }
}

/// The producer's context: logs, client errors and delivery reports.
pub(super) struct Delivery(pub(super) Arc<Shared>);

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
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.0.health.set_broker(false, reason);
            }
            // A wrong CA, host name or password: the brokers are up but refuse us, and the
            // monitor's probe would only see a timeout.
            Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication) => {
                self.0.health.set_transport_error(reason);
            }
            _ => {}
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
        let (txn, route) = unpack(token);
        match result {
            Ok(msg) => {
                let routes = shared.routes.read().unwrap_or_else(PoisonError::into_inner);
                match routes.get(route) {
                    Some(route) => route.published.inc(),
                    None => shared
                        .metrics
                        .events_published
                        .with_label_values(&["other", msg.topic()])
                        .inc(),
                }
                drop(routes);
                shared.settle(txn, Ok(()));
                if shared.health.broker_down() && shared.health.set_broker(true, "") {
                    shared
                        .metrics
                        .reconnects
                        .with_label_values(&["kafka"])
                        .inc();
                }
            }
            // Judged by the refusal task, which can ask the producer whether it had a fatal
            // error: then even a purged record is lost to this producer, not merely aborted.
            Err((err, msg)) => {
                let code = err.rdkafka_error_code();
                if !matches!(
                    code,
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) {
                    let reason = code.map_or_else(|| err.to_string(), |c| format!("{c:?}"));
                    shared
                        .metrics
                        .publish_errors
                        .with_label_values(&[msg.topic(), &reason])
                        .inc();
                }
                shared.refused(txn, route, err, msg);
            }
        }
    }
}

/// Raises librdkafka's "flushing" flag for about `ms`, which makes the broker threads treat
/// `linger.ms` as expired, and wakes them. The flag is lowered when the call returns, so it
/// must wait (briefly) for the broker thread to run: call it on a blocking thread.
pub(super) fn send_lingering_now(producer: &BaseProducer<Delivery>, ms: i32) {
    // SAFETY: the handle is valid while `producer` lives, and rd_kafka_flush may be called
    // from any thread. In the event API mode the crate uses, it only waits: it does not serve
    // delivery reports here.
    unsafe {
        rdsys::rd_kafka_flush(producer.client().native_ptr(), ms);
    }
}

/// librdkafka's main queue, where delivery reports and errors arrive, with a wake-up that
/// fires each time it stops being empty.
pub(super) struct ReportQueue {
    producer: Arc<BaseProducer<Delivery>>,
    queue: *mut rdsys::rd_kafka_queue_t,
    /// Boxed so that its address, handed to librdkafka, stays put.
    wake: Box<Notify>,
}

// SAFETY: librdkafka queues may be used from any thread; the pointer is only read.
unsafe impl Send for ReportQueue {}

impl ReportQueue {
    /// None if librdkafka has no queue to give (it only fails to allocate one).
    pub(super) fn new(producer: Arc<BaseProducer<Delivery>>) -> Option<Self> {
        // SAFETY: the handle is valid while `producer` lives, which outlives this queue
        // reference (dropped first, in `Drop`).
        let queue = unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        if queue.is_null() {
            return None;
        }
        let wake = Box::new(Notify::new());
        // SAFETY: a live queue; the callback's opaque is `wake`, which stays allocated until
        // the callback is switched off in `Drop`.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(
                queue,
                Some(reports_ready),
                &*wake as *const Notify as *mut c_void,
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
    let wake = unsafe { &*(opaque as *const Notify) };
    wake.notify_one();
}

/// Serves delivery reports (and librdkafka's error events) as they arrive.
pub(super) async fn serve_reports(queue: ReportQueue) {
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
    use super::*;

    #[test]
    fn the_opaque_keeps_large_transaction_ids_and_routes_apart() {
        for (txn, route) in [(0, 0), (1, NO_ROUTE), ((1 << 48) - 1, 12_345)] {
            let token = pack(txn, route);
            assert_ne!(token, POSITION_TOKEN);
            assert_eq!(unpack(token), (txn, route));
        }
    }
}
