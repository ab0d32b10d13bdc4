//! How a streaming session ends, and the one place errors met while streaming are sorted into
//! those endings: reconnect, wait as a standby, or stop the relay.

use anyhow::anyhow;
use tokio::sync::watch;

use crate::config::PostgresConfig;
use crate::kafka::exactly_once::TxnError;
use crate::lsn::Lsn;
use crate::pipeline::ack::Progress;
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
    /// Stop the relay.
    Fatal(anyhow::Error),
}

/// Sorts a failure met while streaming (by [`PgError`]'s one classification) into what the
/// lifecycle does about it, with the slot's own words for a slot that is gone or lost.
pub(super) fn classify(e: impl Into<PgError>, pg: &PostgresConfig, during: &str) -> SessionEnd {
    let e: PgError = e.into();
    let (slot, publication) = (&pg.slot, &pg.publication);
    match (e.cause, e.action()) {
        (_, Action::Standby) => SessionEnd::SlotBusy(format!("slot {slot} is in use by another process")),
        // The slot is gone (dropped, or lost in a failover).
        (Cause::UndefinedObject, _) => SessionEnd::Fatal(anyhow!(
            "replication slot {slot} no longer exists ({e}): events committed since its last confirmed LSN may never reach Kafka; \
             re-publish outbox rows committed since the newest event in Kafka, run COMMENT ON PUBLICATION {publication} IS NULL, then restart the relay to create a fresh slot"
        )),
        // The slot was invalidated (wal_status = lost).
        (Cause::NotInPrerequisiteState, _) => SessionEnd::Fatal(anyhow!(
            "replication slot {slot} can no longer be read ({e}): WAL it needed was removed, so events may have been lost; \
             re-publish outbox rows committed since the newest event in Kafka, drop the slot (SELECT pg_drop_replication_slot('{slot}')), run COMMENT ON PUBLICATION {publication} IS NULL and restart"
        )),
        (Cause::InRecovery, _) => SessionEnd::Fatal(anyhow!("{IN_RECOVERY} ({during}: {e})")),
        (Cause::Credentials, _) => {
            SessionEnd::Fatal(anyhow::Error::new(e).context(format!("{during}: PostgreSQL refused the credentials")))
        }
        (_, Action::Retry) => SessionEnd::Transient(anyhow::Error::new(e).context(during.to_owned())),
        (_, Action::Fatal) => SessionEnd::Fatal(anyhow::Error::new(e).context(during.to_owned())),
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
