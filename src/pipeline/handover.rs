//! Handing one record to the producer: waiting while its queue is full (backpressure), and,
//! when the producer refuses a record for good, setting it aside in `[kafka]
//! dead_letter_topic` when the publisher can (see `kafka::dead_letter` for which refusals), or
//! stopping. Shared by the replication stream and the initial snapshot, which differ only in
//! what they do while they wait.

use std::sync::Arc;

use tokio::sync::watch;

use crate::kafka::producer::Publisher;
pub use crate::kafka::producer::{Waiting, WAIT_TICK};
use crate::mapping::record::Record;
use crate::ops::metrics::Metrics;
use crate::pipeline::ack::{AckTracker, DeliveryFailure, Progress, TxnId};

/// Why a record could not be handed over.
#[derive(Debug)]
pub enum HandoverError<E> {
    /// Kafka refused the record for good and no dead-letter topic took it; the tracker has
    /// the failure, so the confirmed LSN stays before it.
    Refused(&'static str),
    /// The sender's [`Waiting::tick`] failed.
    Waiting(E),
}

/// Borrowed pieces of the relay a hand-over needs.
pub struct Handover<'p> {
    /// The producer; it knows the dead-letter topic.
    pub publisher: &'p Publisher,
    /// Counts the record in flight.
    pub tracker: &'p AckTracker,
    /// For the refused-records counter.
    pub metrics: &'p Arc<Metrics>,
}

impl Handover<'_> {
    /// Counts `record` as in flight in `txn` and hands it to the producer, waiting while its
    /// queue is full; a record refused for good is set aside as a dead letter when possible.
    pub async fn deliver<W: Waiting>(
        &self,
        waiting: &mut W,
        txn: TxnId,
        record: &Record<'_>,
    ) -> Result<(), HandoverError<W::Error>> {
        let in_flight = self.tracker.sending(txn);
        let sent = self
            .publisher
            .send_when_room(waiting, in_flight, record)
            .await;
        let Err((in_flight, refusal)) = sent.map_err(HandoverError::Waiting)? else {
            return Ok(());
        };
        self.metrics
            .publish_errors
            .with_label_values(&[record.topic, "refused"])
            .inc();
        if self.publisher.set_aside(in_flight, refusal) {
            Ok(())
        } else {
            Err(HandoverError::Refused("Kafka refused a record"))
        }
    }
}

/// The refusal Kafka reported for a record already sent, if any.
pub fn reported_failure(progress: &watch::Receiver<Progress>) -> Option<Arc<DeliveryFailure>> {
    progress.borrow().failure.clone()
}
