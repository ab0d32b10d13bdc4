//! What becomes of a record Kafka refuses for good: which refusals `[kafka] dead_letter_topic`
//! catches, the small JSON note sent there in the record's place, and the queue that holds a
//! refused record's count until its note is sent (the publisher's refusal task serves it).
//!
//! A note takes its record's place in the acknowledgement tracker: the record's transaction is
//! confirmed only once the note is acknowledged, so the slot never moves past a record that is
//! neither in its topic nor set aside.
//!
//! What the dead-letter topic catches:
//! - an illegal rendered topic name (`Order Created`, `Order/Evil`): the relay's own check
//!   ([`crate::config::topic`]) refuses it before the producer sees it, at once;
//! - a record larger than the producer's `message.max.bytes`, and a topic or partition the
//!   producer already knows not to exist: librdkafka refuses them before queueing;
//! - a topic that does not exist (auto-creation off), once librdkafka gives up waiting for it
//!   (`topic.metadata.propagation.max.ms`, 30 s), and a topic the broker calls invalid: such a
//!   record never got a partition or a sequence number, so it leaves no gap behind.
//!
//! What it cannot catch, so the relay stops with the slot before the record:
//! - anything the broker refuses in answer to a produce request (message too large for the
//!   topic's `max.message.bytes`, invalid record, authorization): the record had a sequence
//!   number in its partition, and with `enable.gapless.guarantee` librdkafka makes that a fatal
//!   producer error rather than send later records past the gap. Keep `message.max.bytes` no
//!   higher than the topics' `max.message.bytes`, so oversized records are refused locally;
//! - authorization errors anywhere: a missing ACL is set-up, not a poison record, and setting
//!   aside every record of a topic until someone notices would empty it silently;
//! - in exactly-once mode, any refusal after sending: it dooms the open Kafka transaction, so a
//!   note could never be committed in the record's place;
//! - a refused dead letter itself, and anything once the producer had a fatal error.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use tokio::sync::Notify;

use crate::mapping::record::Record;
use crate::pipeline::ack::{DeliveryFailure, TxnId};

/// Where a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the producer took it (the relay's checks, or librdkafka's).
    Local,
    /// In its delivery report, after the producer took it.
    AfterSend,
}

/// A record refused for good, with the few values its note needs (never its payload).
#[derive(Debug)]
pub struct Refusal {
    pub(super) txn: TxnId,
    pub(super) stage: Stage,
    /// `None` when the code is not one of librdkafka's.
    pub(super) code: Option<RDKafkaErrorCode>,
    pub(super) failure: DeliveryFailure,
    /// The record's source (`Record::table`).
    pub(super) table: Option<usize>,
    pub(super) key: Option<Vec<u8>>,
    pub(super) id: Option<Vec<u8>>,
    pub(super) kind: Option<Vec<u8>>,
    pub(super) payload_bytes: usize,
    pub(super) time: Option<i64>,
}

impl Refusal {
    /// `record`, refused before the producer took it.
    pub(super) fn local(
        txn: TxnId,
        record: &Record<'_>,
        code: Option<RDKafkaErrorCode>,
        error: String,
    ) -> Self {
        Refusal {
            txn,
            stage: Stage::Local,
            code,
            failure: DeliveryFailure {
                event_id: record.event_id(),
                topic: record.topic.to_owned(),
                error,
                fenced: is_fenced(code),
            },
            table: record.table,
            key: record.key.map(<[u8]>::to_vec),
            id: record.id.map(<[u8]>::to_vec),
            kind: record.kind.map(<[u8]>::to_vec),
            payload_bytes: record.payload.map_or(0, <[u8]>::len),
            time: record.time,
        }
    }

    /// What was refused and why, for the tracker and the log.
    pub fn failure(&self) -> &DeliveryFailure {
        &self.failure
    }

    /// The note sent in the record's place: what was refused and why, as one small JSON
    /// object (the refused payload itself is what may not fit). `source` names the record's
    /// source.
    pub(super) fn note(&self, source: &str) -> String {
        serde_json::json!({
            "id": self.failure.event_id,
            "table": source,
            "topic": self.failure.topic,
            "key": self.key.as_deref().map(String::from_utf8_lossy),
            "payload_bytes": self.payload_bytes,
            "error": self.failure.error,
        })
        .to_string()
    }

    /// The record carrying `note` to `dead_letters`: the refused record's key, `id` and `type`
    /// headers (and CloudEvents attributes), with the original topic and the error as headers.
    pub(super) fn letter<'a>(&'a self, dead_letters: &'a str, note: &'a str) -> Record<'a> {
        Record {
            table: self.table,
            topic: dead_letters,
            key: self.key.as_deref(),
            payload: Some(note.as_bytes()),
            id: self.id.as_deref(),
            kind: self.kind.as_deref(),
            extra_headers: vec![
                ("original_topic", Some(self.failure.topic.as_bytes())),
                ("error", Some(self.failure.error.as_bytes())),
            ],
            // The chosen partition was the original topic's, not the letters'.
            partition: None,
            time: self.time,
        }
    }
}

/// Whether a refusal of this kind is the record's own fault and leaves nothing behind it in
/// Kafka, so that a note may take its place (see the module docs for why each is in or out).
pub(super) fn catchable(stage: Stage, code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode::*;
    match stage {
        Stage::Local => matches!(
            code,
            Some(
                MessageSizeTooLarge
                    | InvalidTopic
                    | UnknownTopic
                    | UnknownPartition
                    | UnknownTopicOrPartition
            )
        ),
        // Failed before it was given a partition: no sequence number, no gap.
        Stage::AfterSend => matches!(
            code,
            Some(InvalidTopic | UnknownTopic | UnknownPartition | UnknownTopicOrPartition)
        ),
    }
}

/// Whether Kafka refused a record because a newer producer registered the transactional id.
pub fn is_fenced(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

/// Refusals waiting for their notes (or for their verdict, if refused after sending); each
/// holds its record's count in the tracker meanwhile. Filled by the producer's side, served
/// by the publisher's refusal task.
#[derive(Debug, Default)]
pub(super) struct RefusalQueue {
    queue: Mutex<VecDeque<Refusal>>,
    /// Refusals pushed and not yet done with: queued, or being served.
    pending: AtomicUsize,
    /// Woken on each push and each one done with; waiters register before they look.
    changed: Notify,
}

impl RefusalQueue {
    pub(super) fn push(&self, refusal: Refusal) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(refusal);
        self.changed.notify_waiters();
    }

    /// The oldest refusal, once there is one. Only the refusal task takes from the queue.
    pub(super) async fn next(&self) -> Refusal {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the look, so a push in between is not missed.
            changed.as_mut().enable();
            if let Some(r) = self
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
            {
                return r;
            }
            changed.await;
        }
    }

    /// The refusal taken by [`RefusalQueue::next`] was settled or handed on.
    pub(super) fn done(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Refusals not yet done with.
    pub(super) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` until no refusal is pending; false if some still are.
    pub(super) async fn idle(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.pending() == 0 {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(topic: &str, error: &str) -> Refusal {
        let record = Record {
            table: Some(0),
            topic,
            key: Some(b"k-1"),
            payload: Some(b"{\"total\": 1}"),
            id: Some(b"e-1"),
            kind: Some(b"Created"),
            extra_headers: vec![("tenant", Some(b"t"))],
            partition: Some(3),
            time: Some(7),
        };
        Refusal::local(
            9,
            &record,
            Some(RDKafkaErrorCode::InvalidTopic),
            error.into(),
        )
    }

    #[test]
    fn the_note_says_what_was_refused_and_why_without_the_payload() {
        let r = refusal("Order Created", "illegal name");
        let note: serde_json::Value = serde_json::from_str(&r.note("public.outbox")).unwrap();
        assert_eq!(
            note,
            serde_json::json!({
                "id": "e-1", "table": "public.outbox", "topic": "Order Created",
                "key": "k-1", "payload_bytes": 12, "error": "illegal name",
            })
        );
        let note = r.note("public.outbox");
        let letter = r.letter("dead", &note);
        assert_eq!((letter.topic, letter.key), ("dead", Some(&b"k-1"[..])));
        assert_eq!(letter.partition, None);
        assert_eq!(
            letter.headers().collect::<Vec<_>>(),
            [
                ("id", Some(&b"e-1"[..])),
                ("type", Some(&b"Created"[..])),
                ("original_topic", Some(&b"Order Created"[..])),
                ("error", Some(&b"illegal name"[..])),
            ]
        );
    }

    #[test]
    fn only_refusals_that_leave_no_gap_are_catchable_after_sending() {
        use RDKafkaErrorCode::*;
        for code in [UnknownTopicOrPartition, UnknownTopic, InvalidTopic] {
            assert!(catchable(Stage::AfterSend, Some(code)), "{code:?}");
            assert!(catchable(Stage::Local, Some(code)), "{code:?}");
        }
        assert!(catchable(Stage::Local, Some(MessageSizeTooLarge)));
        for code in [
            MessageSizeTooLarge,
            InvalidRecord,
            TopicAuthorizationFailed,
            GaplessGuarantee,
            Fatal,
            PurgeQueue,
        ] {
            assert!(!catchable(Stage::AfterSend, Some(code)), "{code:?}");
        }
        assert!(!catchable(Stage::Local, Some(TopicAuthorizationFailed)));
        assert!(!catchable(Stage::Local, Some(Fatal)));
        assert!(!catchable(Stage::Local, None));
    }

    #[tokio::test]
    async fn the_queue_is_idle_once_each_refusal_is_done_with() {
        let q = RefusalQueue::default();
        assert!(q.idle(Duration::ZERO).await);
        q.push(refusal("a", "x"));
        q.push(refusal("b", "x"));
        assert!(!q.idle(Duration::from_millis(10)).await);
        assert_eq!(q.next().await.failure().topic, "a");
        q.done();
        assert_eq!(q.pending(), 1);
        assert_eq!(q.next().await.failure().topic, "b");
        q.done();
        assert!(q.idle(Duration::ZERO).await);
    }
}
