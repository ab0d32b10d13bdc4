//! `outbox-relay status`: the configured slot's state from `pg_replication_slots`, its lag
//! behind the server's WAL, and the publication's tables, as text or one JSON object, judged
//! by the same rules `run` and `check` apply. Read-only, and independent of any running relay.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, ConfigError, PostgresConfig};
use crate::ops::check::{describe_target, PG_TIMEOUT};
use crate::postgres::catalog::{self, SlotMarker, SlotReading, SlotVerdict};
use crate::postgres::connect::PgEndpoint;
use crate::postgres::errors::{pg_message, PgError, IN_RECOVERY};

/// Why no status could be read at all (as opposed to a slot in a bad state).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// PostgreSQL could not be reached or refused the connection.
    #[error("cannot connect to PostgreSQL at {target}: {cause}; check [postgres] url (host, port, user, password) and that PostgreSQL runs")]
    Connect {
        /// `user@host:port/db`.
        target: String,
        /// What went wrong.
        cause: String,
    },
    /// A catalog query failed.
    #[error("cannot read {what} from PostgreSQL: {cause}; check that the role may read the system catalogs")]
    Query {
        /// What was being read.
        what: &'static str,
        /// The server's message.
        cause: String,
    },
}

/// The slot, its lag and the publication: the fields of `status --json`. Field names are a
/// stable interface for scripts; add fields, never rename them.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// The configured slot name.
    pub slot: String,
    /// Whether the slot exists.
    pub exists: bool,
    /// Whether a walsender streams from it now.
    pub active: bool,
    /// The walsender's process id while active.
    pub active_pid: Option<i32>,
    /// The output plugin (`pgoutput` for the relay's slot).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: Option<String>,
    /// The database the slot decodes.
    pub database: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Everything before it reached Kafka and was confirmed, as `X/Y`.
    pub confirmed_flush_lsn: Option<String>,
    /// The oldest WAL the slot keeps, as `X/Y`.
    pub restart_lsn: Option<String>,
    /// The server's WAL position now (`pg_current_wal_lsn()`, or the last received on a standby).
    pub current_wal_lsn: Option<String>,
    /// `current_wal_lsn - confirmed_flush_lsn` in bytes.
    pub lag_bytes: Option<i64>,
    /// `current_wal_lsn - restart_lsn` in bytes: WAL the server keeps for the slot.
    pub retained_bytes: Option<i64>,
    /// Bytes of WAL that may still be written before the slot is lost (`max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
    /// Whether standbys with `sync_replication_slots = on` keep a copy of the slot, so that it
    /// survives a failover (PostgreSQL 17+; absent before).
    pub failover: Option<bool>,
    /// Whether this is a standby's synchronised copy of the slot (PostgreSQL 17+).
    pub synced: Option<bool>,
    /// The configured publication name.
    pub publication: String,
    /// Whether the publication exists.
    pub publication_exists: bool,
    /// The tables it publishes, as `schema.table`.
    pub publication_tables: Vec<String>,
    /// Whether the slot is usable by the relay: on a primary, exists, pgoutput, this database,
    /// not lost.
    pub ok: bool,
    /// Why not, when `ok` is false.
    pub problem: Option<String>,
}

/// Loads the config and reads the status of its slot and publication.
pub async fn read(path: &Path) -> Result<SlotStatus, StatusError> {
    let config = Config::load(path)?;
    let endpoint = PgEndpoint::new(&config.postgres)?;
    let target = describe_target(endpoint.config());
    let connect_error = |cause: String| StatusError::Connect {
        target: target.clone(),
        cause,
    };
    let client = tokio::time::timeout(PG_TIMEOUT, endpoint.connect_sql())
        .await
        .map_err(|_| connect_error(format!("no answer within {}s", PG_TIMEOUT.as_secs())))?
        .map_err(|e| connect_error(pg_message(&e)))?;
    query(&client, &config).await
}

/// Reads the status of `config`'s slot and publication over `client`.
pub async fn query(client: &Client, config: &Config) -> Result<SlotStatus, StatusError> {
    let failed = |what: &'static str| {
        move |e: PgError| StatusError::Query {
            what,
            cause: e.to_string(),
        }
    };
    let reading = catalog::read_slot(client, &config.postgres.slot)
        .await
        .map_err(failed("pg_replication_slots"))?;
    let publication = catalog::read_publication(client, &config.postgres.publication)
        .await
        .map_err(failed("pg_publication"))?;
    let guard = catalog::read_guard(client, &config.postgres.slot, &config.postgres.publication)
        .await
        .map_err(failed(catalog::MARKER_TABLE))?;
    let slot = reading.slot.as_ref();
    let text = |lsn: Option<crate::lsn::Lsn>| lsn.map(|l| l.to_string());
    let problem = problem(&reading, guard.marker.as_ref(), &config.postgres);
    Ok(SlotStatus {
        slot: config.postgres.slot.clone(),
        exists: slot.is_some(),
        active: slot.is_some_and(|s| s.active),
        active_pid: slot.and_then(|s| s.active_pid),
        plugin: slot.and_then(|s| s.plugin.clone()),
        slot_type: slot.and_then(|s| s.slot_type.clone()),
        database: slot.and_then(|s| s.database.clone()),
        wal_status: slot.and_then(|s| s.wal_status.clone()),
        confirmed_flush_lsn: text(slot.and_then(|s| s.confirmed_flush)),
        restart_lsn: text(slot.and_then(|s| s.restart)),
        current_wal_lsn: text(reading.wal),
        lag_bytes: reading.lag_bytes(),
        retained_bytes: reading.retained_bytes(),
        safe_wal_size: slot.and_then(|s| s.safe_wal_size),
        failover: slot.and_then(|s| s.failover),
        synced: slot.and_then(|s| s.synced),
        publication: config.postgres.publication.clone(),
        publication_exists: publication.is_some(),
        publication_tables: publication
            .iter()
            .flat_map(|p| p.tables.iter().map(ToString::to_string))
            .collect(),
        ok: problem.is_none(),
        problem,
    })
}

/// Why the relay could not stream from the slot as it is, if it could not: the verdict `run`
/// would reach, where a missing slot is a problem only for now (the relay creates it).
fn problem(
    reading: &SlotReading,
    marker: Option<&SlotMarker>,
    pg: &PostgresConfig,
) -> Option<String> {
    if reading.in_recovery {
        return Some(IN_RECOVERY.to_owned());
    }
    match catalog::slot_verdict(reading, marker, pg) {
        SlotVerdict::Usable(_) | SlotVerdict::Creating => None,
        SlotVerdict::Missing => Some(format!(
            "slot {} does not exist; the relay creates it at start (outbox-relay check tells whether it can)",
            pg.slot
        )),
        SlotVerdict::Unusable(problem) => Some(problem.to_string()),
    }
}

/// The status as aligned `name  value` lines, one per field, for people.
pub fn render_text(s: &SlotStatus) -> String {
    fn opt<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let active = match (s.active, s.active_pid) {
        (true, Some(pid)) => format!("yes (pid {pid})"),
        (true, None) => "yes".to_owned(),
        (false, _) => "no".to_owned(),
    };
    let tables = if !s.publication_exists {
        "(publication does not exist)".to_owned()
    } else if s.publication_tables.is_empty() {
        "(none)".to_owned()
    } else {
        s.publication_tables.join(", ")
    };
    let rows = [
        ("slot", s.slot.clone()),
        ("exists", yes_no(s.exists).to_owned()),
        ("active", active),
        ("plugin", opt(&s.plugin)),
        ("slot_type", opt(&s.slot_type)),
        ("database", opt(&s.database)),
        ("wal_status", opt(&s.wal_status)),
        ("confirmed_flush_lsn", opt(&s.confirmed_flush_lsn)),
        ("restart_lsn", opt(&s.restart_lsn)),
        ("current_wal_lsn", opt(&s.current_wal_lsn)),
        ("lag_bytes", opt(&s.lag_bytes)),
        ("retained_bytes", opt(&s.retained_bytes)),
        ("safe_wal_size", opt(&s.safe_wal_size)),
        ("failover", opt(&s.failover)),
        ("publication", s.publication.clone()),
        ("publication_tables", tables),
        ("ok", yes_no(s.ok).to_owned()),
    ];
    let mut out = String::new();
    for (name, value) in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{name:<21}{value}");
    }
    if let Some(p) = &s.problem {
        let _ = writeln!(out, "{:<21}{}", "problem", p.replace('\n', " "));
    }
    out
}

/// The status as one line of JSON, for scripts.
pub fn render_json(s: &SlotStatus) -> String {
    // Plain strings, numbers, booleans and options: serialising cannot fail, but a fallback
    // keeps the output parseable should that ever change.
    serde_json::to_string(s).unwrap_or_else(|e| {
        serde_json::json!({ "slot": s.slot, "error": e.to_string() }).to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absent() -> SlotStatus {
        SlotStatus {
            slot: "outbox_relay".into(),
            exists: false,
            active: false,
            active_pid: None,
            plugin: None,
            slot_type: None,
            database: None,
            wal_status: None,
            confirmed_flush_lsn: None,
            restart_lsn: None,
            current_wal_lsn: Some("0/16B3748".into()),
            lag_bytes: None,
            retained_bytes: None,
            safe_wal_size: None,
            failover: None,
            synced: None,
            publication: "outbox_relay".into(),
            publication_exists: false,
            publication_tables: Vec::new(),
            ok: false,
            problem: None,
        }
    }

    fn healthy() -> SlotStatus {
        SlotStatus {
            exists: true,
            active: true,
            active_pid: Some(4242),
            plugin: Some("pgoutput".into()),
            slot_type: Some("logical".into()),
            database: Some("app".into()),
            wal_status: Some("reserved".into()),
            confirmed_flush_lsn: Some("0/16B3700".into()),
            restart_lsn: Some("0/16B3000".into()),
            lag_bytes: Some(0x48),
            retained_bytes: Some(0x748),
            ..absent()
        }
    }

    fn postgres() -> PostgresConfig {
        toml::from_str("url = \"postgres://relay@db/app\"").expect("minimal [postgres]")
    }

    fn reading(database: &str, slot: Option<catalog::Slot>) -> SlotReading {
        SlotReading {
            current_database: database.into(),
            in_recovery: false,
            wal: Some(crate::lsn::Lsn(0x16B_3748)),
            slot,
        }
    }

    fn pgoutput_slot() -> catalog::Slot {
        catalog::Slot {
            plugin: Some("pgoutput".into()),
            slot_type: Some("logical".into()),
            database: Some("app".into()),
            wal_status: Some("reserved".into()),
            confirmed_flush: Some(crate::lsn::Lsn(0x16B_3700)),
            ..catalog::Slot::default()
        }
    }

    #[test]
    fn problems_are_missing_wrong_plugin_other_database_lost_and_standby() {
        let pg = postgres();
        let problem_of = |r: &SlotReading| problem(r, None, &pg);
        assert!(problem_of(&reading("app", None)).is_some_and(|p| p.contains("does not exist")));
        assert_eq!(problem_of(&reading("app", Some(pgoutput_slot()))), None);
        assert!(problem_of(&reading("other", Some(pgoutput_slot())))
            .is_some_and(|p| p.contains("database app")));
        let wrong = catalog::Slot {
            plugin: Some("test_decoding".into()),
            ..pgoutput_slot()
        };
        assert!(
            problem_of(&reading("app", Some(wrong))).is_some_and(|p| p.contains("test_decoding"))
        );
        let lost = catalog::Slot {
            wal_status: Some("lost".into()),
            ..pgoutput_slot()
        };
        assert!(problem_of(&reading("app", Some(lost))).is_some_and(|p| p.contains("0/16B3700")));
        let standby = SlotReading {
            in_recovery: true,
            ..reading("app", Some(pgoutput_slot()))
        };
        assert_eq!(problem_of(&standby).as_deref(), Some(IN_RECOVERY));
    }

    #[test]
    fn json_has_stable_snake_case_fields() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&healthy())).unwrap();
        assert_eq!(v["confirmed_flush_lsn"], "0/16B3700");
        assert_eq!(v["lag_bytes"], 72);
        assert_eq!(v["active_pid"], 4242);
        assert_eq!(v["publication_tables"], serde_json::json!([]));
        let v: serde_json::Value = serde_json::from_str(&render_json(&absent())).unwrap();
        assert!(v["lag_bytes"].is_null() && v["confirmed_flush_lsn"].is_null());
        assert!(!render_json(&absent()).contains('\n'));
    }

    #[test]
    fn text_has_one_aligned_line_per_field() {
        let text = render_text(&healthy());
        assert!(
            text.contains("active               yes (pid 4242)\n"),
            "{text}"
        );
        assert!(text.contains("lag_bytes            72\n"), "{text}");
        assert!(render_text(&absent()).contains("confirmed_flush_lsn  -\n"));
    }
}
