//! Handing one record to the producer: waiting while its queue is full (backpressure), and,
//! when the producer refuses a record for good, sending a dead letter in its place if
//! `[kafka] dead_letter_topic` is set. Shared by the replication stream and the initial
//! snapshot, which differ only in what they do while they wait.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, Source};
use crate::kafka::producer::{Publisher, SendError};
use crate::mapping::record::Record;
use crate::ops::metrics::Metrics;
use crate::pipeline::ack::{AckTracker, DeliveryFailure, InFlight, Progress, TxnId};

/// How long one wait for room in the producer's queue lasts at most before [`Waiting::tick`].
pub const WAIT_TICK: Duration = Duration::from_millis(100);

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

/// Why a record could not be handed over.
#[derive(Debug)]
pub enum HandoverError<E> {
    /// Kafka refused the record (or its dead letter: said here) for good; the tracker has
    /// the failure, so the confirmed LSN stays before it.
    Refused(&'static str),
    /// The sender's [`Waiting::tick`] failed.
    Waiting(E),
}

/// Borrowed pieces of the relay a hand-over needs.
pub struct Handover<'p> {
    /// The producer.
    pub publisher: &'p Publisher,
    /// Counts the record in flight.
    pub tracker: &'p AckTracker,
    /// For the refused-records counter.
    pub metrics: &'p Arc<Metrics>,
    /// The dead letter topic.
    pub config: &'p Config,
    /// Every source's name, by `Record::table`, for the dead letter.
    pub sources: &'p [Source],
}

impl Handover<'_> {
    /// Counts `record` as in flight in `txn` and hands it to the producer, waiting while its
    /// queue is full; a record refused for good becomes a dead letter when configured.
    pub async fn deliver<W: Waiting>(
        &self,
        waiting: &mut W,
        txn: TxnId,
        record: &Record<'_>,
    ) -> Result<(), HandoverError<W::Error>> {
        let Err((in_flight, failure)) = self
            .send(waiting, self.tracker.sending(txn), record)
            .await?
        else {
            return Ok(());
        };
        self.metrics
            .publish_errors
            .with_label_values(&[record.topic, "refused"])
            .inc();
        let Some(dead_letters) = &self.config.kafka.dead_letter_topic else {
            in_flight.refused(failure);
            return Err(HandoverError::Refused("Kafka refused a record"));
        };
        let source = record
            .table
            .and_then(|t| self.sources.get(t))
            .map_or("?", |s| s.name.as_str());
        let note = dead_letter_note(source, record, &failure);
        let letter = Record {
            topic: dead_letters,
            payload: Some(note.as_bytes()),
            extra_headers: vec![
                ("original_topic", Some(record.topic.as_bytes())),
                ("error", Some(failure.error.as_bytes())),
            ],
            // The chosen partition is the original topic's, not the letters'.
            partition: None,
            ..*record
        };
        tracing::warn!("{failure}; sent a note to dead_letter_topic {dead_letters} instead");
        // The note takes the refused record's place in its transaction's count.
        if let Err((in_flight, again)) = self.send(waiting, in_flight, &letter).await? {
            in_flight.refused(again);
            return Err(HandoverError::Refused("Kafka refused a dead letter"));
        }
        Ok(())
    }

    /// Hands `record` to the producer, waiting while its queue is full; `Ok(Err(_))` when the
    /// producer refused it for good, with its count still held.
    async fn send<'t, W: Waiting>(
        &self,
        waiting: &mut W,
        mut in_flight: InFlight<'t>,
        record: &Record<'_>,
    ) -> Result<Result<(), (InFlight<'t>, DeliveryFailure)>, HandoverError<W::Error>> {
        loop {
            match self.publisher.send(in_flight, record) {
                Ok(()) => return Ok(Ok(())),
                Err(SendError::Refused(back, failure)) => return Ok(Err((back, failure))),
                Err(SendError::QueueFull(back)) => {
                    in_flight = back;
                    // Refill in large steps: waking for every acknowledgement would cost a
                    // context switch per record.
                    let refill_at = self.tracker.in_flight() / 2;
                    tokio::select! {
                        _ = self.publisher.space_below(refill_at) => {}
                        _ = tokio::time::sleep(WAIT_TICK) => {}
                    }
                    // An error here drops the token: the record was never sent, so its
                    // count goes back and a later drain does not wait for it.
                    waiting.tick().await.map_err(HandoverError::Waiting)?;
                }
            }
        }
    }
}

/// The refusal Kafka reported for a record already sent, if any.
pub fn reported_failure(progress: &watch::Receiver<Progress>) -> Option<Arc<DeliveryFailure>> {
    progress.borrow().failure.clone()
}

/// The dead letter's value: what was refused and why, as one small JSON object (the refused
/// payload itself is what did not fit).
fn dead_letter_note(table: &str, record: &Record<'_>, failure: &DeliveryFailure) -> String {
    serde_json::json!({
        "id": failure.event_id,
        "table": table,
        "topic": record.topic,
        "key": record.key.map(String::from_utf8_lossy),
        "payload_bytes": record.payload.map_or(0, <[u8]>::len),
        "error": failure.error,
    })
    .to_string()
}
