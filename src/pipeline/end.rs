//! How a streaming session ends, and the one place errors met while streaming are sorted into
//! those endings: reconnect, wait as a standby, or stop the relay.

use anyhow::anyhow;
use tokio::sync::watch;

use crate::config::PostgresConfig;
use crate::kafka::exactly_once::TxnError;
use crate::lsn::Lsn;
use crate::pipeline::ack::Progress;
use crate::postgres::catalog;
use crate::postgres::errors::{Action, Cause, PgError, IN_RECOVERY};

/// How a streaming session ended.
#[derive(Debug)]
pub(super) enum SessionEnd {
    /// Shutdown was requested and handled.
    Stopped,
    /// Another process holds the slot: wait and retry.
    SlotBusy(String),
    /// The connection failed in a way a reconnect may fix.
    Transient(anyhow::Error),
    /// Kafka was silent too long while records waited: the replication session was let go so
    /// PostgreSQL can shut down or switch over (see `pipeline::release`); why, in words.
    Released(String),
    /// Stop the relay.
    Fatal(anyhow::Error),
    /// The server does not know a name the stream uses: the slot, or the publication. Which
    /// one is a catalog question, answered by the session and then put into words by
    /// [`undefined`]; it never leaves the session.
    Undefined(PgError),
}

/// What the catalog says about the names the stream uses, asked after an
/// [`SessionEnd::Undefined`]; `None` where it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Known {
    pub(super) slot: Option<bool>,
    pub(super) publication: Option<bool>,
    /// The statement that clears the record of the slot's creation (the lost-slot guard's),
    /// if there is one.
    pub(super) clear: Option<String>,
}

/// The fix's step that disarms the lost-slot guard, when where its record lies is not known
/// here: both places it may be.
fn clear_guard(pg: &PostgresConfig) -> String {
    format!(
        "clear the record of the slot's creation (DELETE FROM {} WHERE slot_name = '{}' where that table exists, else COMMENT ON PUBLICATION {} IS NULL)",
        catalog::MARKER_TABLE,
        pg.slot,
        pg.publication
    )
}

/// Sorts a failure met while streaming (by [`PgError`]'s one classification) into what the
/// lifecycle does about it, with the slot's own words for a slot that is gone or lost.
pub(super) fn classify(e: impl Into<PgError>, pg: &PostgresConfig, during: &str) -> SessionEnd {
    let e: PgError = e.into();
    let slot = &pg.slot;
    match (e.cause, e.action()) {
        (_, Action::Standby) => SessionEnd::SlotBusy(format!("slot {slot} is in use by another process")),
        // The slot or the publication: the words depend on which, see `undefined`.
        (Cause::UndefinedObject, _) => SessionEnd::Undefined(e),
        // The slot was invalidated (wal_status = lost).
        (Cause::NotInPrerequisiteState, _) => SessionEnd::Fatal(anyhow!(
            "replication slot {slot} can no longer be read ({e}): WAL it needed was removed, so events may have been lost; \
             re-publish outbox rows committed since the newest event in Kafka, drop the slot (SELECT pg_drop_replication_slot('{slot}')), {} and restart", clear_guard(pg)
        )),
        (Cause::InRecovery, _) => SessionEnd::Fatal(anyhow!("{IN_RECOVERY} ({during}: {e})")),
        (Cause::Credentials, _) => {
            SessionEnd::Fatal(anyhow::Error::new(e).context(format!("{during}: PostgreSQL refused the credentials")))
        }
        (_, Action::Retry) => SessionEnd::Transient(anyhow::Error::new(e).context(during.to_owned())),
        (_, Action::Fatal) => SessionEnd::Fatal(anyhow::Error::new(e).context(during.to_owned())),
    }
}

/// Puts an [`SessionEnd::Undefined`] into words once the catalog said which name is missing.
/// PostgreSQL reports both a dropped slot and a publication the slot cannot see as SQLSTATE
/// 42704, and their fixes are opposite: a dropped slot lost events and needs a re-publish, a
/// publication created after the slot lost nothing and needs the order of creation fixed.
pub(super) fn undefined(e: PgError, pg: &PostgresConfig, known: Known) -> SessionEnd {
    let (slot, publication) = (&pg.slot, &pg.publication);
    let clear = known
        .clear
        .as_ref()
        .map_or_else(|| clear_guard(pg), |sql| format!("run {sql}"));
    match known {
        // The slot is gone (dropped, or lost in a failover).
        Known { slot: Some(false), .. } => SessionEnd::Fatal(anyhow!(
            "replication slot {slot} no longer exists ({e}): events committed since its last confirmed LSN may never reach Kafka; \
             re-publish outbox rows committed since the newest event in Kafka, {clear}, then restart the relay to create a fresh slot"
        )),
        Known { slot: Some(true), publication: Some(false), .. } => SessionEnd::Fatal(anyhow!(
            "publication {publication} does not exist ({e}): it was dropped while slot {slot} was in use; \
             create it again for the outbox tables and restart (events committed while it was missing were not published)"
        )),
        // Decoding reads the catalog as of each change's position, so a publication created
        // after the slot's confirmed position is unknown there (taking over another tool's slot
        // with a new publication does this).
        Known { slot: Some(true), publication: Some(true), .. } => SessionEnd::Fatal(anyhow!(
            "publication {publication} is not visible at slot {slot}'s position ({e}): the slot was created, or last confirmed, before the publication, and stays there; \
             create the publication before the slot (use the publication the slot was streamed with), \
             or start on a new slot (with initial_snapshot = true to publish the rows already in the outbox)"
        )),
        _ => SessionEnd::Fatal(anyhow!(
            "PostgreSQL does not know replication slot {slot} or publication {publication} ({e}), and the catalog could not be read to tell which; \
             check both exist (pg_replication_slots, pg_publication) and restart"
        )),
    }
}

/// How a failed Kafka transaction step ends the session; a refused record comes first, as it
/// does in at-least-once mode.
pub(super) fn txn_end(
    progress: &watch::Receiver<Progress>,
    confirmed: Lsn,
    e: TxnError,
) -> SessionEnd {
    if let Err(refused) = failed(progress, confirmed) {
        return SessionEnd::Fatal(refused);
    }
    match e {
        TxnError::Fatal(why) => SessionEnd::Fatal(anyhow!(why)),
        TxnError::Retry(why) => SessionEnd::Transient(anyhow!(why)),
    }
}

/// The fatal error for a refused record, if one was reported.
pub(super) fn failed(progress: &watch::Receiver<Progress>, confirmed: Lsn) -> anyhow::Result<()> {
    if let Some(f) = &progress.borrow().failure {
        if f.fenced {
            // Restarting this relay would not help: the other one owns the transactions now.
            return Err(anyhow!(
                "fenced: another relay started with this [kafka] transactional_id and now owns its transactions; this one stops ({f})"
            ));
        }
        return Err(anyhow!(
            "{f}; the slot stays before this event (confirmed {confirmed}); fix the cause and restart"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::ack::DeliveryFailure;

    fn refused(fenced: bool) -> String {
        let failure = DeliveryFailure {
            event_id: "e1".into(),
            topic: "t".into(),
            error: "InvalidProducerEpoch".into(),
            fenced,
        };
        let (_tx, rx) = watch::channel(Progress {
            confirmed: Lsn(0),
            failure: Some(Arc::new(failure)),
        });
        failed(&rx, Lsn(0)).unwrap_err().to_string()
    }

    #[test]
    fn a_record_refused_because_the_producer_was_fenced_says_so() {
        let said = refused(true);
        assert!(
            said.starts_with("fenced:") && said.contains("transactional_id"),
            "{said}"
        );
        assert!(!said.contains("restart"), "{said}");
        assert!(refused(false).contains("fix the cause and restart"));
    }
}
