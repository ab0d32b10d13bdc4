//! When the relay lets go of the replication session so that a Kafka outage never blocks
//! PostgreSQL's shutdown or switchover.
//!
//! At a fast shutdown, each logical walsender waits (`WalSndDone`) until its client confirmed
//! the flush of everything sent; the relay cannot confirm what Kafka has not acknowledged, so
//! while Kafka is away `pg_ctl stop -m fast` (and a Patroni switchover, which uses it) hangs.
//! Two shapes of that, both measured: the producer queue is full and the relay has stopped
//! reading the socket (the walsender cannot even send its last messages), or a few records
//! are in flight and the relay reads and answers keepalives but still cannot confirm.
//!
//! One rule covers both: records are waiting for Kafka and Kafka has given no verdict on any
//! record for `[relay] release_session_after_secs`, and either the relay has stopped reading
//! (the producer queue is full) or, while it reads, the server asked for a reply (a walsender
//! at shutdown asks once and then waits; status updates otherwise go out far more often than
//! `wal_sender_timeout` would make it ask). Then the session ends as [`SessionEnd::Released`]:
//! the socket is dropped (which frees the walsender at once), the lifecycle waits for the
//! producer queue to drain while only the monitor's plain SQL connection talks to PostgreSQL,
//! and the next session resumes from the slot, which kept its position. The cost: the records
//! in flight at the release are sent again, as the slot hears of no acknowledgement meanwhile
//! (duplicates, never loss or reordering); a Kafka outage under a backlog that fills the queue
//! costs that whether or not PostgreSQL is shutting down. Silence rather than the oldest
//! record's age is the measure, so a slow but working broker draining a long queue does not
//! trigger it; and a broker slow to answer one record while the relay reads (an unknown
//! topic's metadata) does not either.
//!
//! The rule is checked wherever the session waits on Kafka: on the stream's timer, while it
//! waits for room in the producer queue, and, in exactly-once mode, while a Kafka transaction
//! waits for its records' acknowledgements before committing ([`racing`]).

use std::future::Future;
use std::time::Duration;

use crate::config::Config;
use crate::kafka::producer::WAIT_TICK;
use crate::pipeline::ack::AckTracker;
use crate::pipeline::end::SessionEnd;
use crate::pipeline::stop::Stop;

/// The session's end if Kafka has been silent too long while records wait; `None` otherwise
/// or when the bound is 0 (never release).
pub(super) fn due(tracker: &AckTracker, config: &Config) -> Option<SessionEnd> {
    let bound = Duration::from_secs(config.relay.release_session_after_secs);
    if bound.is_zero() {
        return None;
    }
    let silent = tracker.silent_for()?;
    (silent >= bound).then(|| {
        SessionEnd::Released(format!(
            "Kafka acknowledged none of {} waiting records for {} s",
            tracker.in_flight(),
            silent.as_secs()
        ))
    })
}

/// Runs `work` (an exactly-once step that may wait for Kafka) unless the release falls due
/// first; then `work` is dropped and the release is the session's end. Only the wait for
/// acknowledgements before a commit can be cut short so: the rule needs records in flight,
/// and a commit or an abort starts only once none are. The Kafka transaction stays open and
/// is aborted after the drain, when the broker is back. Not while stopping: the stop has its
/// own bound and its own last steps.
pub(super) async fn racing<F: Future>(
    tracker: &AckTracker,
    config: &Config,
    stop: &Stop,
    work: F,
) -> Result<F::Output, SessionEnd> {
    if config.relay.release_session_after_secs == 0 || stop.requested() {
        return Ok(work.await);
    }
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(WAIT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            _ = tick.tick() => {
                if let Some(end) = due(tracker, config) {
                    return Err(end);
                }
            }
        }
    }
}
