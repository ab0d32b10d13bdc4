//! The acknowledgement tracker: turns Kafka delivery reports into the slot's confirmed LSN.
//!
//! Transactions are kept in commit order with a count of records Kafka has not acknowledged
//! yet. The head is released once its Commit was seen and its count is zero; its `end_lsn`
//! becomes the confirmed LSN. Memory is one entry per transaction in flight, never per record.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::lsn::Lsn;

/// Identifies a transaction to the tracker; small enough to ride along with every record.
pub type TxnId = u64;

/// A record Kafka refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    /// The event id (the `id` header), or `?` when the row had none.
    pub event_id: String,
    /// The topic the record was for.
    pub topic: String,
    /// What the broker or client said.
    pub error: String,
    /// Refused because a newer producer took the transactional id (exactly-once mode): not
    /// the record's fault, and no restart of this relay helps.
    pub fenced: bool,
}

impl std::fmt::Display for DeliveryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Kafka refused event {} for topic {}: {}",
            self.event_id, self.topic, self.error
        )
    }
}

/// What the tracker reports back to the replication loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Everything before this LSN is in Kafka; safe to confirm to the slot.
    pub confirmed: Lsn,
    /// Set once a record was refused; the confirmed LSN never moves past it.
    pub failure: Option<Arc<DeliveryFailure>>,
}

/// One record counted in flight for its transaction. Handing it to the producer
/// ([`InFlight::handed_over`]) passes the count on to the record's delivery report; dropping
/// it any other way (a full queue, an error returned through `?`) gives the count back, so a
/// drain never waits for a record that was never sent. Holds only a reference and the
/// transaction id: nothing is allocated per record.
#[must_use = "a record counted in flight must be handed to the producer or dropped"]
#[derive(Debug)]
pub struct InFlight<'t> {
    tracker: &'t AckTracker,
    txn: TxnId,
    /// Made by [`AckTracker::retake`]: dropped unsent, it fails its transaction quietly.
    retaken: bool,
}

impl<'t> InFlight<'t> {
    /// The record's transaction.
    pub fn txn(&self) -> TxnId {
        self.txn
    }

    /// The producer took the record (or, refused, the dead-letter queue took it): whoever
    /// took it settles the count from now on.
    pub fn handed_over(self) -> TxnId {
        let txn = self.txn;
        std::mem::forget(self);
        txn
    }

    /// The record was refused for good before it left: the tracker keeps the failure, and
    /// the confirmed LSN stays before it.
    pub fn refused(self, failure: DeliveryFailure) {
        let (tracker, txn) = (self.tracker, self.txn);
        std::mem::forget(self);
        tracker.delivered(txn, Err(failure));
    }

    /// Whether this token counts in `tracker`.
    pub fn counts_in(&self, tracker: &AckTracker) -> bool {
        std::ptr::eq(self.tracker, tracker)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.retaken {
            self.tracker.abandoned(self.txn);
        } else {
            self.tracker.not_sent(self.txn);
        }
    }
}

#[derive(Debug)]
struct Txn {
    pending: u64,
    end_lsn: Option<Lsn>,
    failed: bool,
    /// Commit time in microseconds since 2000-01-01, for the commit-to-ack histogram; `None`
    /// for the initial snapshot, whose rows committed at unknown times.
    commit_time: Option<i64>,
    /// When its first record was handed to the producer, for stall detection.
    since: Option<Instant>,
}

#[derive(Debug)]
struct State {
    /// The id of `txns[0]`.
    head: TxnId,
    txns: VecDeque<Txn>,
    in_flight: u64,
    /// Transactions released so far.
    done: u64,
    /// When Kafka last gave a verdict, or the first record went in flight after none was:
    /// how long records have waited without a word from Kafka.
    heard: Instant,
}

/// What [`AckTracker::delivered`] learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The record's transaction's commit time (µs since 2000), if it is still tracked.
    pub commit_time: Option<i64>,
    /// Records still unacknowledged after this one.
    pub in_flight: u64,
}

/// A snapshot for metrics and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Records handed to the producer and not yet acknowledged.
    pub in_flight: u64,
    /// Transactions fully acknowledged so far.
    pub transactions: u64,
    /// How long the oldest unacknowledged record has waited.
    pub oldest_wait: Option<Duration>,
}

/// Shared between the replication loop (begin/send/commit) and Kafka's delivery thread.
#[derive(Debug)]
pub struct AckTracker {
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// Exactly-once mode: acknowledgements never move the confirmed LSN by themselves; only
    /// [`AckTracker::confirm_committed`] does, after the Kafka transaction committed.
    committed_only: bool,
}

impl AckTracker {
    /// A tracker whose confirmed position starts at `start`.
    pub fn new(start: Lsn) -> (Arc<Self>, watch::Receiver<Progress>) {
        Self::with_mode(start, false)
    }

    /// Exactly-once mode: like [`AckTracker::new`], but the confirmed LSN moves only through
    /// [`AckTracker::confirm_committed`] (an acknowledged record may still be aborted).
    pub fn committed_only(start: Lsn) -> (Arc<Self>, watch::Receiver<Progress>) {
        Self::with_mode(start, true)
    }

    fn with_mode(start: Lsn, committed_only: bool) -> (Arc<Self>, watch::Receiver<Progress>) {
        let (tx, rx) = watch::channel(Progress {
            confirmed: start,
            failure: None,
        });
        let tracker = AckTracker {
            state: Mutex::new(State {
                head: 0,
                txns: VecDeque::new(),
                in_flight: 0,
                done: 0,
                heard: Instant::now(),
            }),
            progress: tx,
            committed_only,
        };
        (Arc::new(tracker), rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counts half-updated in a way that
        // would confirm too far, so recovering the guard is safe.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a transaction (pgoutput Begin) committed at `commit_time` (µs since 2000).
    pub fn begin(&self, commit_time: i64) -> TxnId {
        self.open(Some(commit_time))
    }

    /// Opens the initial snapshot's records as one transaction, kept out of the
    /// commit-to-ack histogram (its rows' commit times are unknown and may be years old).
    pub fn begin_untimed(&self) -> TxnId {
        self.open(None)
    }

    fn open(&self, commit_time: Option<i64>) -> TxnId {
        let mut s = self.lock();
        s.txns.push_back(Txn {
            pending: 0,
            end_lsn: None,
            failed: false,
            commit_time,
            since: None,
        });
        s.head + s.txns.len() as u64 - 1
    }

    /// A record of `txn` is about to be handed to the producer: counted in flight until the
    /// returned token is handed over (its delivery report settles the count) or dropped
    /// (the count is given back).
    pub fn sending(&self, txn: TxnId) -> InFlight<'_> {
        let mut s = self.lock();
        if let Some(t) = s.get_mut(txn) {
            t.pending += 1;
            t.since.get_or_insert_with(Instant::now);
        }
        if s.in_flight == 0 {
            s.heard = Instant::now();
        }
        s.in_flight += 1;
        InFlight {
            tracker: self,
            txn,
            retaken: false,
        }
    }

    /// The count of a record of `txn` that was refused for good and handed over (to the
    /// dead-letter queue) instead of being settled, as a token again, for the note sent in
    /// the record's place. Unlike a fresh token, dropping it unsent does not simply give the
    /// count back: the refused record is then neither in Kafka nor set aside, and its
    /// transaction may already have its Commit, so the transaction is marked failed instead
    /// (without a reported failure: such a token is dropped unsent only when the producer
    /// itself goes away, and the next start reads the transaction again from the slot).
    pub fn retake(&self, txn: TxnId) -> InFlight<'_> {
        InFlight {
            tracker: self,
            txn,
            retaken: true,
        }
    }

    /// A token from [`AckTracker::retake`] was dropped unsent.
    fn abandoned(&self, txn: TxnId) {
        let mut s = self.lock();
        debug_assert!(s.in_flight > 0, "a retaken record that was never counted");
        s.in_flight = s.in_flight.saturating_sub(1);
        if let Some(t) = s.get_mut(txn) {
            t.pending = t.pending.saturating_sub(1);
            t.failed = true;
        }
    }

    /// A record counted by [`AckTracker::sending`] never reached the producer.
    fn not_sent(&self, txn: TxnId) {
        let mut s = self.lock();
        debug_assert!(
            s.in_flight > 0,
            "a record given back that was never counted"
        );
        s.in_flight = s.in_flight.saturating_sub(1);
        if let Some(t) = s.get_mut(txn) {
            // Tokens live only while their record is handed over, which is before its
            // transaction's Commit: an unsent record can never let a transaction confirm.
            debug_assert!(t.end_lsn.is_none(), "a record given back after its Commit");
            debug_assert!(t.pending > 0);
            t.pending = t.pending.saturating_sub(1);
        }
        // No release here: the transaction is still open, so nothing it holds up can move.
    }

    /// Closes `txn` (pgoutput Commit); `end_lsn` is confirmed once all its records are acked.
    pub fn commit(&self, txn: TxnId, end_lsn: Lsn) {
        let mut s = self.lock();
        if let Some(t) = s.get_mut(txn) {
            t.end_lsn = Some(end_lsn);
        }
        self.release(&mut s);
    }

    /// Kafka's verdict on one record of `txn`.
    pub fn delivered(&self, txn: TxnId, result: Result<(), DeliveryFailure>) -> Delivered {
        let mut s = self.lock();
        // A report for a record never counted would be a bookkeeping bug; in release builds
        // it must not wrap the count around and stall every drain.
        debug_assert!(
            s.in_flight > 0,
            "a delivery report for a record never counted"
        );
        s.in_flight = s.in_flight.saturating_sub(1);
        s.heard = Instant::now();
        let mut done = Delivered {
            commit_time: None,
            in_flight: s.in_flight,
        };
        if let Some(t) = s.get_mut(txn) {
            debug_assert!(t.pending > 0, "a delivery report for a settled transaction");
            t.pending = t.pending.saturating_sub(1);
            if result.is_err() {
                t.failed = true;
            }
            done.commit_time = t.commit_time;
        }
        match result {
            Ok(()) => self.release(&mut s),
            Err(failure) => {
                self.progress.send_if_modified(|p| {
                    if p.failure.is_some() {
                        return false;
                    }
                    p.failure = Some(Arc::new(failure));
                    true
                });
            }
        }
        done
    }

    /// The server's WAL end from a keepalive outside any transaction: confirm it if nothing is
    /// in flight, so an idle outbox never holds WAL back.
    pub fn idle(&self, wal_end: Lsn) {
        let s = self.lock();
        if s.txns.is_empty() && !self.committed_only {
            self.advance(wal_end);
        }
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight
    }

    /// How long records have been in flight without any verdict from Kafka (acknowledgement
    /// or refusal); `None` when nothing is in flight. Unlike the oldest record's wait, this
    /// stays small while a slow but working broker acknowledges a long queue.
    pub fn silent_for(&self) -> Option<Duration> {
        let s = self.lock();
        (s.in_flight > 0).then(|| s.heard.elapsed())
    }

    /// Counts for metrics and readiness.
    pub fn stats(&self) -> Stats {
        let s = self.lock();
        Stats {
            in_flight: s.in_flight,
            transactions: s.done,
            oldest_wait: s
                .txns
                .iter()
                .find(|t| t.pending > 0)
                .and_then(|t| t.since)
                .map(|since| since.elapsed()),
        }
    }

    /// After the replication connection was lost and every queued record got its verdict:
    /// forgets transactions that will never see their Commit (the server sends them again).
    pub fn reset_open(&self) {
        let mut s = self.lock();
        self.release(&mut s);
        let dropped = s.txns.len() as u64;
        s.txns.clear();
        s.head += dropped;
    }

    /// The slot's confirmed position as the server has it now; ours never lags behind it,
    /// so a status update can never move the slot backwards.
    pub fn rebase(&self, slot_confirmed: Lsn) {
        let _s = self.lock();
        self.advance(slot_confirmed);
    }

    /// A new session found the slot *behind* what this process confirmed: the server lost the
    /// slot's latest position (a crash before the slot was saved, or a failover to a standby
    /// whose synced copy of the slot lags). The server sends again what lies between, on a
    /// new timeline possibly other WAL than before, so confirming from the old position would
    /// skip it: the tracker starts over from the slot's. Called between sessions, with nothing
    /// in flight; says whether it moved back.
    pub fn restart_from(&self, slot_confirmed: Lsn) -> bool {
        let _s = self.lock();
        self.progress.send_if_modified(|p| {
            if slot_confirmed < p.confirmed && p.failure.is_none() {
                p.confirmed = slot_confirmed;
            }
            false
        });
        self.confirmed() == slot_confirmed
    }

    /// Exactly-once mode: everything before `lsn` is in committed Kafka transactions.
    pub fn confirm_committed(&self, lsn: Lsn) {
        self.rebase(lsn);
    }

    /// Whether a record was refused for good.
    pub fn has_failed(&self) -> bool {
        self.progress.borrow().failure.is_some()
    }

    /// The confirmed LSN now.
    pub fn confirmed(&self) -> Lsn {
        self.progress.borrow().confirmed
    }

    fn release(&self, s: &mut State) {
        let mut confirmed = None;
        while let Some(t) = s.txns.front() {
            match t.end_lsn {
                Some(end) if t.pending == 0 && !t.failed => confirmed = Some(end),
                _ => break,
            }
            s.txns.pop_front();
            s.head += 1;
            s.done += 1;
        }
        match confirmed {
            Some(lsn) if !self.committed_only => self.advance(lsn),
            _ => {}
        }
    }

    fn advance(&self, lsn: Lsn) {
        // Modified in place without waking the receiver: the replication loop reads the
        // confirmed LSN on its status tick, and waking it once per transaction costs a
        // context switch per transaction at low rates. Only a failure wakes it.
        self.progress.send_if_modified(|p| {
            if lsn > p.confirmed && p.failure.is_none() {
                p.confirmed = lsn;
            }
            false
        });
    }
}

impl State {
    fn get_mut(&mut self, txn: TxnId) -> Option<&mut Txn> {
        let index = txn.checked_sub(self.head)?;
        self.txns.get_mut(usize::try_from(index).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> DeliveryFailure {
        DeliveryFailure {
            event_id: "e1".into(),
            topic: "t".into(),
            error: "MessageSizeTooLarge".into(),
            fenced: false,
        }
    }

    #[test]
    fn confirms_a_transaction_only_after_all_its_records_are_acked() {
        let (t, rx) = AckTracker::new(Lsn(10));
        let a = t.begin(0);
        t.sending(a).handed_over();
        t.sending(a).handed_over();
        t.commit(a, Lsn(100));
        t.delivered(a, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(10));
        t.delivered(a, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(100));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_later_transaction_acked_first_waits_for_the_earlier_one() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.sending(a).handed_over();
        t.commit(a, Lsn(100));
        let b = t.begin(0);
        t.sending(b).handed_over();
        t.commit(b, Lsn(200));
        t.delivered(b, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(0));
        t.delivered(a, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(200));
    }

    #[test]
    fn acks_before_commit_do_not_confirm_an_open_transaction() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.sending(a).handed_over();
        t.delivered(a, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(0));
        t.commit(a, Lsn(50));
        assert_eq!(rx.borrow().confirmed, Lsn(50));
    }

    #[test]
    fn empty_transactions_confirm_at_commit() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.commit(a, Lsn(70));
        assert_eq!(rx.borrow().confirmed, Lsn(70));
    }

    #[test]
    fn keepalive_confirms_wal_end_only_when_nothing_is_outstanding() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.idle(Lsn(500));
        assert_eq!(rx.borrow().confirmed, Lsn(0), "open transaction");
        t.sending(a).handed_over();
        t.commit(a, Lsn(100));
        t.idle(Lsn(500));
        assert_eq!(rx.borrow().confirmed, Lsn(0), "record in flight");
        t.delivered(a, Ok(()));
        t.idle(Lsn(500));
        assert_eq!(rx.borrow().confirmed, Lsn(500));
    }

    #[test]
    fn confirmed_never_moves_backwards() {
        let (t, rx) = AckTracker::new(Lsn(1000));
        let a = t.begin(0);
        t.commit(a, Lsn(10));
        t.idle(Lsn(20));
        assert_eq!(rx.borrow().confirmed, Lsn(1000));
    }

    #[test]
    fn a_refused_record_stops_confirmation_and_is_reported() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.sending(a).handed_over();
        t.sending(a).handed_over();
        t.commit(a, Lsn(100));
        t.delivered(a, Err(failure()));
        t.delivered(a, Ok(()));
        let b = t.begin(0);
        t.commit(b, Lsn(200));
        t.idle(Lsn(300));
        let p = rx.borrow().clone();
        assert_eq!(p.confirmed, Lsn(0));
        assert_eq!(p.failure.as_deref(), Some(&failure()));
    }

    #[test]
    fn reset_forgets_a_transaction_cut_off_by_a_reconnect() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.sending(a).handed_over();
        t.delivered(a, Ok(()));
        t.reset_open();
        let b = t.begin(0);
        t.commit(b, Lsn(40));
        assert_eq!(rx.borrow().confirmed, Lsn(40));
    }

    #[test]
    fn stats_report_the_oldest_wait_and_finished_transactions() {
        let (t, _rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.commit(a, Lsn(1));
        let b = t.begin(0);
        t.sending(b).handed_over();
        let s = t.stats();
        assert_eq!((s.in_flight, s.transactions), (1, 1));
        assert!(s.oldest_wait.is_some());
    }

    #[test]
    fn committed_only_confirms_what_was_committed_not_what_was_acked() {
        let (t, rx) = AckTracker::committed_only(Lsn(0));
        let a = t.begin(0);
        t.sending(a).handed_over();
        t.commit(a, Lsn(100));
        t.delivered(a, Ok(()));
        t.idle(Lsn(200));
        assert_eq!(rx.borrow().confirmed, Lsn(0));
        t.confirm_committed(Lsn(100));
        assert_eq!(rx.borrow().confirmed, Lsn(100));
    }

    #[test]
    fn a_token_dropped_unsent_gives_the_count_back_and_confirms_nothing() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        let sent = t.sending(a).handed_over();
        {
            // A session error returned through `?` while the queue was full.
            let _unsent = t.sending(a);
        }
        assert_eq!(t.in_flight(), 1);
        t.delivered(sent, Ok(()));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(
            rx.borrow().confirmed,
            Lsn(0),
            "the transaction never committed"
        );
        t.reset_open();
        let b = t.begin(0);
        t.commit(b, Lsn(30));
        assert_eq!(rx.borrow().confirmed, Lsn(30));
    }

    #[test]
    fn refused_before_sending_stops_confirmation() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        t.sending(a).refused(failure());
        t.commit(a, Lsn(10));
        assert_eq!(t.in_flight(), 0);
        let p = rx.borrow().clone();
        assert_eq!(
            (p.confirmed, p.failure.as_deref()),
            (Lsn(0), Some(&failure()))
        );
    }

    #[test]
    fn a_retaken_record_confirms_once_acked_and_never_if_dropped_unsent() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        // Refused after sending: the report hands the count over instead of settling it.
        t.sending(a).handed_over();
        t.commit(a, Lsn(10));
        t.retake(a).handed_over();
        assert_eq!(rx.borrow().confirmed, Lsn(0), "the note is not acked yet");
        t.delivered(a, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(10));

        let b = t.begin(0);
        t.sending(b).handed_over();
        t.commit(b, Lsn(20));
        drop(t.retake(b));
        assert_eq!(t.in_flight(), 0, "a drain does not wait for it");
        let c = t.begin(0);
        t.commit(c, Lsn(30));
        let p = rx.borrow().clone();
        assert_eq!((p.confirmed, p.failure), (Lsn(10), None));
        t.reset_open();
        let d = t.begin(0);
        t.commit(d, Lsn(40));
        assert_eq!(
            rx.borrow().confirmed,
            Lsn(40),
            "the next session starts afresh"
        );
    }

    #[test]
    fn not_sent_records_do_not_hold_the_transaction() {
        let (t, rx) = AckTracker::new(Lsn(0));
        let a = t.begin(0);
        drop(t.sending(a));
        t.sending(a).handed_over();
        t.commit(a, Lsn(9));
        t.delivered(a, Ok(()));
        assert_eq!(rx.borrow().confirmed, Lsn(9));
    }
}
