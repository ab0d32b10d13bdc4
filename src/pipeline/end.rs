//! How a streaming session ends, and the one place errors met while streaming are sorted into
//! those endings: reconnect, wait as a standby, or stop the relay.

use anyhow::anyhow;
use tokio::sync::watch;

use crate::config::PostgresConfig;
use crate::kafka::exactly_once::TxnError;
use crate::lsn::Lsn;
use crate::pipeline::ack::Progress;
use crate::postgres::replication::ReplicationError;

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

/// Sorts a replication error into what the lifecycle does about it.
pub(super) fn classify(e: ReplicationError, pg: &PostgresConfig, during: &str) -> SessionEnd {
    let (slot, publication) = (&pg.slot, &pg.publication);
    match e.sqlstate() {
        // object_in_use: another walsender has the slot.
        Some("55006") => SessionEnd::SlotBusy(format!("slot {slot} is in use by another process")),
        // undefined_object: the slot is gone (dropped, or lost in a failover).
        Some("42704") => SessionEnd::Fatal(anyhow!(
            "replication slot {slot} no longer exists ({e}): events committed since its last confirmed LSN may never reach Kafka; \
             re-publish outbox rows committed since the newest event in Kafka, run COMMENT ON PUBLICATION {publication} IS NULL, then restart the relay to create a fresh slot"
        )),
        // object_not_in_prerequisite_state: the slot was invalidated (wal_status = lost).
        Some("55000") => SessionEnd::Fatal(anyhow!(
            "replication slot {slot} can no longer be read ({e}): WAL it needed was removed, so events may have been lost; \
             re-publish outbox rows committed since the newest event in Kafka, drop the slot (SELECT pg_drop_replication_slot('{slot}')), run COMMENT ON PUBLICATION {publication} IS NULL and restart"
        )),
        Some(code) if code.starts_with("28") => {
            SessionEnd::Fatal(anyhow::Error::new(e).context(format!("{during}: PostgreSQL refused the credentials")))
        }
        // 22023 invalid_parameter_value: an option pgoutput does not know (e.g. messages
        // before PostgreSQL 14); retrying cannot help.
        Some(code) if code.starts_with("42") || code.starts_with("0A") || code == "22023" => {
            SessionEnd::Fatal(anyhow::Error::new(e).context(during.to_owned()))
        }
        Some(_) | None => match e {
            ReplicationError::Protocol(_) | ReplicationError::Config(_) | ReplicationError::Auth(_) => {
                SessionEnd::Fatal(anyhow::Error::new(e).context(during.to_owned()))
            }
            _ => SessionEnd::Transient(anyhow::Error::new(e).context(during.to_owned())),
        },
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
        return Err(anyhow!(
            "{f}; the slot stays before this event (confirmed {confirmed}); fix the cause and restart"
        ));
    }
    Ok(())
}
