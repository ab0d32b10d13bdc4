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
//! One rule covers both, without telling a shutdown from an outage: records are waiting for
//! Kafka and Kafka has given no verdict on any record for `[relay]
//! release_session_after_secs`. Then the session ends as [`SessionEnd::Released`]: the socket
//! is dropped (which frees the walsender at once), the lifecycle waits for the producer queue
//! to drain while only the monitor's plain SQL connection talks to PostgreSQL, and the next
//! session resumes from the slot, which kept its position. The cost: the cut-off
//! transaction's records already acknowledged are sent again (duplicates, never loss or
//! reordering), and a broker silent for longer than the bound during normal operation also
//! costs a reconnect. Silence rather than the oldest record's age is the measure, so a slow
//! but working broker draining a long queue does not trigger it.

use std::time::Duration;

use crate::config::Config;
use crate::pipeline::ack::AckTracker;
use crate::pipeline::end::SessionEnd;

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
