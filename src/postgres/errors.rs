//! The one answer to "try again, wait as a standby, or stop?" for a failed PostgreSQL request,
//! read from its SQLSTATE rather than its text: start-up, the streaming session, the initial
//! snapshot and `check` all sort failures here, so that no code is worth a retry in one place
//! and fatal in another.

use tokio_postgres::error::SqlState;

use crate::postgres::connect::tls_config_error;
use crate::postgres::replication::ReplicationError;

/// The line a relay pointed at a standby stops with (and `check` and `status` say).
pub const IN_RECOVERY: &str =
    "connected to a standby (in recovery): point [postgres] url at the primary";

/// What the relay does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Try again after a pause: the network or the server's state may change by itself.
    Retry,
    /// Another process holds the slot: wait as a standby and try again.
    Standby,
    /// Stop: every attempt gets the same answer until someone changes something.
    Fatal,
}

/// What a failure means to the relay, from its SQLSTATE (or the lack of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No SQLSTATE: the server never answered (refused, reset or closed connection, timeout).
    Connection,
    /// Classes 08 (connection exception), 40 (transaction rollback), 53 (insufficient
    /// resources), 57 (operator intervention: shutdown, restart, starting up) and 58 (system
    /// error): the server's state, not the request.
    Unavailable,
    /// The server is a standby: 55000 "recovery is in progress" (WAL functions), 0A000
    /// "logical decoding cannot be used while in recovery" (before PostgreSQL 16), or
    /// `pg_is_in_recovery()`.
    InRecovery,
    /// 55006 object_in_use: another walsender streams from the slot.
    InUse,
    /// 42704 undefined_object: the named object (a slot) does not exist.
    UndefinedObject,
    /// 55000 object_not_in_prerequisite_state, other than recovery: an invalidated slot.
    NotInPrerequisiteState,
    /// Class 28: the server refused the credentials.
    Credentials,
    /// 42501 insufficient_privilege.
    Privilege,
    /// The rest of class 42 (syntax or access rule), class 0A (not supported) and 22023
    /// (invalid parameter value: an option this server does not know): the request does not
    /// fit this server.
    Refused,
    /// A failure on the relay's side that is not the network: an unusable URL or TLS setup,
    /// an authentication method it lacks, an answer it cannot read.
    Client,
    /// Any other SQLSTATE.
    Other,
}

impl Cause {
    /// Sorts a server error by its SQLSTATE; the message only tells recovery apart within
    /// codes that also mean something else.
    pub fn of_sqlstate(code: &str, message: &str) -> Cause {
        let class = code.get(..2).unwrap_or(code);
        match code {
            "55006" => Cause::InUse,
            "42704" => Cause::UndefinedObject,
            "42501" => Cause::Privilege,
            "55000" if message.starts_with("recovery is in progress") => Cause::InRecovery,
            "55000" => Cause::NotInPrerequisiteState,
            "0A000" if message.contains("while in recovery") => Cause::InRecovery,
            "22023" => Cause::Refused,
            _ => match class {
                "08" | "40" | "53" | "57" | "58" => Cause::Unavailable,
                "28" => Cause::Credentials,
                "42" | "0A" => Cause::Refused,
                _ => Cause::Other,
            },
        }
    }

    /// What the relay does about it.
    ///
    /// An unknown SQLSTATE ([`Cause::Other`]) is fatal: nobody decided that the condition
    /// passes by itself, and a relay retrying it forever would look alive while relaying
    /// nothing. Stopping names the cause in one line and leaves restarts, with their own
    /// backoff, to the supervisor; a code found to be passing belongs in
    /// [`Cause::Unavailable`].
    pub fn action(self) -> Action {
        match self {
            Cause::Connection | Cause::Unavailable => Action::Retry,
            Cause::InUse => Action::Standby,
            Cause::InRecovery
            | Cause::UndefinedObject
            | Cause::NotInPrerequisiteState
            | Cause::Credentials
            | Cause::Privilege
            | Cause::Refused
            | Cause::Client
            | Cause::Other => Action::Fatal,
        }
    }
}

/// A failed PostgreSQL request: its one-line message and what it means to the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    /// The SQLSTATE, when the server answered with an error.
    pub sqlstate: Option<String>,
    /// What it means.
    pub cause: Cause,
    /// One line: the server's words and SQLSTATE, or the client-side cause chain.
    pub message: String,
}

impl PgError {
    /// What the relay does about it.
    pub fn action(&self) -> Action {
        self.cause.action()
    }

    /// Whether the SQLSTATE is `state`.
    pub fn is(&self, state: &SqlState) -> bool {
        self.sqlstate.as_deref() == Some(state.code())
    }

    /// The server is a standby, as `pg_is_in_recovery()` said.
    pub fn in_recovery() -> PgError {
        PgError {
            sqlstate: None,
            cause: Cause::InRecovery,
            message: IN_RECOVERY.to_owned(),
        }
    }

    /// The server answered something the relay cannot read (a column of another type).
    pub fn unreadable(what: &str, e: &tokio_postgres::Error) -> PgError {
        PgError::unexpected(format!("cannot read {what}: {}", pg_message(e)))
    }

    /// An answer the relay does not expect: asking again gets the same.
    pub fn unexpected(message: impl Into<String>) -> PgError {
        PgError {
            sqlstate: None,
            cause: Cause::Client,
            message: message.into(),
        }
    }
}

impl From<&tokio_postgres::Error> for PgError {
    fn from(e: &tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            return PgError {
                sqlstate: Some(db.code().code().to_owned()),
                cause: Cause::of_sqlstate(db.code().code(), db.message()),
                message: pg_message(e),
            };
        }
        // A TLS setup that cannot work does not start working; a socket-level failure may.
        match tls_config_error(e) {
            Some(message) => PgError {
                sqlstate: None,
                cause: Cause::Client,
                message,
            },
            None => PgError {
                sqlstate: None,
                cause: Cause::Connection,
                message: pg_message(e),
            },
        }
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::from(&e)
    }
}

impl From<ReplicationError> for PgError {
    fn from(e: ReplicationError) -> Self {
        let cause = match &e {
            ReplicationError::Io(_) | ReplicationError::NotPrimary(_) => Cause::Connection,
            ReplicationError::Server { code, message, .. } => Cause::of_sqlstate(code, message),
            ReplicationError::Auth(_)
            | ReplicationError::Protocol(_)
            | ReplicationError::Config(_) => Cause::Client,
        };
        PgError {
            sqlstate: e.sqlstate().map(str::to_owned),
            cause,
            message: e.to_string(),
        }
    }
}

/// The error as one line: the server's message and SQLSTATE, or the client-side cause chain.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    // tokio-postgres' Display says only "db error" for server errors; show the server's words.
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    // Client-side errors keep the useful part ("Connection refused") in their sources.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> PgError {
        PgError::from(ReplicationError::Server {
            code: code.into(),
            message: message.into(),
            hint: None,
        })
    }

    #[test]
    fn a_standby_is_fatal_whichever_way_it_shows() {
        // pg_current_wal_lsn() on a standby, START_REPLICATION on a standby before 16.
        for (code, message) in [
            ("55000", "recovery is in progress"),
            ("0A000", "logical decoding cannot be used while in recovery"),
        ] {
            let e = server(code, message);
            assert_eq!(e.cause, Cause::InRecovery, "{code} {message}");
            assert_eq!(e.action(), Action::Fatal);
        }
        assert_eq!(PgError::in_recovery().action(), Action::Fatal);
        assert!(PgError::in_recovery().to_string().contains("primary"));
        // The same 55000 for an invalidated slot is not a standby.
        let lost = server(
            "55000",
            "can no longer get changes from replication slot \"s\"",
        );
        assert_eq!(lost.cause, Cause::NotInPrerequisiteState);
    }

    #[test]
    fn passing_conditions_retry_a_held_slot_waits_the_rest_stops() {
        for code in ["08006", "40001", "53300", "57P01", "57P03", "58030"] {
            assert_eq!(server(code, "x").action(), Action::Retry, "{code}");
        }
        assert_eq!(server("55006", "slot is active").action(), Action::Standby);
        for code in [
            "42704", "28P01", "28000", "42501", "42P01", "0A000", "22023",
        ] {
            assert_eq!(server(code, "x").action(), Action::Fatal, "{code}");
        }
        // Unknown codes: one default, documented on Cause::action.
        for code in ["XX000", "25006", "P0001"] {
            assert_eq!(server(code, "x").cause, Cause::Other, "{code}");
            assert_eq!(server(code, "x").action(), Action::Fatal, "{code}");
        }
    }

    #[test]
    fn client_side_failures_retry_only_when_the_network_failed() {
        let io = PgError::from(ReplicationError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert_eq!(io.action(), Action::Retry);
        for e in [
            ReplicationError::Auth("no password".into()),
            ReplicationError::Protocol("tag".into()),
            ReplicationError::Config("no user".into()),
        ] {
            assert_eq!(PgError::from(e).action(), Action::Fatal);
        }
    }

    #[test]
    fn the_message_and_sqlstate_are_kept() {
        let e = server("42704", "replication slot \"s\" does not exist");
        assert_eq!(e.sqlstate.as_deref(), Some("42704"));
        assert!(e.is(&SqlState::UNDEFINED_OBJECT));
        assert_eq!(
            e.to_string(),
            "PostgreSQL error 42704: replication slot \"s\" does not exist"
        );
    }
}
