//! The replication slot and the publication as PostgreSQL's catalogs show them, and every rule
//! the relay has about them: which slot it can stream from, which publication feeds it the
//! outbox rows, and the server it may do that on. Start-up, `check`, `status`, the monitor, the
//! streaming session and the initial snapshot all read and judge through here, so they cannot
//! disagree about what is usable.
//!
//! One function per query, returning typed rows; the verdicts are plain functions of those
//! rows, so they are the same whoever asks and can be tested without a server.

use tokio_postgres::{Client, Row};

use crate::config::{FailoverSlot, OutboxConfig, PostgresConfig};
use crate::lsn::Lsn;
use crate::postgres::errors::{PgError, IN_RECOVERY};

// ---------------------------------------------------------------------------------------------
// Names in SQL
// ---------------------------------------------------------------------------------------------

/// An identifier for SQL, quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal for SQL, quoted.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The table's name for SQL: schema and name, each quoted.
pub fn quoted(table: &OutboxConfig) -> String {
    let (schema, name) = table.schema_and_name();
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Reads column `i`, or says the server's answer was not what the relay expects.
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r Row,
    i: usize,
    what: &str,
) -> Result<T, PgError> {
    row.try_get(i).map_err(|e| PgError::unreadable(what, &e))
}

/// An LSN from its text form.
fn lsn(text: Option<String>, what: &str) -> Result<Option<Lsn>, PgError> {
    text.map(|t| {
        t.parse()
            .map_err(|e| PgError::unexpected(format!("cannot read {what}: {e}")))
    })
    .transpose()
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// What the relay needs of the server before it looks at slots and publications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    /// `wal_level`.
    pub wal_level: String,
    /// `pg_is_in_recovery()`: a standby.
    pub in_recovery: bool,
    /// `server_version_num`, e.g. 170004.
    pub version_num: i32,
}

/// Why the server cannot serve the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerProblem {
    /// `wal_level` is not `logical`.
    #[error("wal_level is {0:?}, logical replication needs 'logical': set wal_level = logical in postgresql.conf (or the cloud parameter group) and restart PostgreSQL")]
    WalLevel(String),
    /// A standby: its WAL position cannot be read, and before PostgreSQL 16 it cannot decode.
    #[error("{IN_RECOVERY}")]
    InRecovery,
    /// `failover_slot = true` on a server without failover slots.
    #[error("[postgres] failover_slot = true, but PostgreSQL {0} has no failover slots (they came in 17): upgrade, or remove failover_slot (or set it to false) and rely on the lost-slot guard to refuse a slot lost in a failover")]
    NoFailoverSlots(i32),
}

/// What `check` and `status` say about the slot's failover property, and whether it is a
/// problem: `None` where the server has no failover slots (or the slot is being created).
pub fn failover_note(slot: &Slot, name: &str, wanted: bool) -> Option<(bool, String)> {
    match (slot.failover?, wanted) {
        (true, _) => Some((
            true,
            format!("replication slot {name} is a failover slot: standbys with sync_replication_slots = on keep a copy of it"),
        )),
        (false, true) => Some((
            false,
            format!("replication slot {name} is not a failover slot, so a failover loses it: the relay makes it one when it next starts streaming ([postgres] failover_slot), or run ALTER_REPLICATION_SLOT {name} ( FAILOVER true ) on a replication connection (psql \"dbname=... replication=database\") while nothing streams from it"),
        )),
        (false, false) => Some((
            true,
            format!("replication slot {name} is not a failover slot ([postgres] failover_slot = false)"),
        )),
    }
}

/// The first server major with failover slots (`CREATE_REPLICATION_SLOT ... (FAILOVER)`,
/// `sync_replication_slots` on standbys).
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// Whether the relay keeps its slot a failover slot on a server of `version_num`; `true` on a
/// server without them is a configuration error.
pub fn failover_wanted(setting: FailoverSlot, version_num: i32) -> Result<bool, ServerProblem> {
    let supported = version_num >= FAILOVER_SLOTS_SINCE;
    match setting {
        FailoverSlot::Off => Ok(false),
        FailoverSlot::Auto => Ok(supported),
        FailoverSlot::On if supported => Ok(true),
        FailoverSlot::On => Err(ServerProblem::NoFailoverSlots(version_num / 10_000)),
    }
}

impl ServerState {
    /// Everything wrong with the server, worst first.
    pub fn problems(&self) -> Vec<ServerProblem> {
        let mut problems = Vec::new();
        if self.wal_level != "logical" {
            problems.push(ServerProblem::WalLevel(self.wal_level.clone()));
        }
        if self.in_recovery {
            problems.push(ServerProblem::InRecovery);
        }
        problems
    }
}

/// Reads `wal_level` and whether the server is a standby.
pub async fn server(client: &Client) -> Result<ServerState, PgError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), pg_is_in_recovery(), \
                    current_setting('server_version_num')::int",
            &[],
        )
        .await?;
    Ok(ServerState {
        wal_level: column(&row, 0, "wal_level")?,
        in_recovery: column(&row, 1, "pg_is_in_recovery()")?,
        version_num: column(&row, 2, "server_version_num")?,
    })
}

// ---------------------------------------------------------------------------------------------
// The slot
// ---------------------------------------------------------------------------------------------

/// One row of `pg_replication_slots`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    /// The output plugin; `None` for a physical slot.
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: Option<String>,
    /// The database a logical slot decodes.
    pub database: Option<String>,
    /// Dropped when its connection ends (the initial snapshot's slot is).
    pub temporary: bool,
    /// Whether a walsender streams from it now.
    pub active: bool,
    /// That walsender's process id.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Everything before it reached Kafka; `None` while the slot is being created.
    pub confirmed_flush: Option<Lsn>,
    /// The oldest WAL the slot keeps.
    pub restart: Option<Lsn>,
    /// Bytes of WAL that may still be written before the slot is lost.
    pub safe_wal_size: Option<i64>,
    /// Whether it is synchronised to standbys that ask for it (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
    /// On a standby: a copy synchronised from the primary (PostgreSQL 17+). On a promoted
    /// standby's slots it may stay true and means nothing.
    pub synced: Option<bool>,
}

/// A slot (or its absence) and the server's WAL position, read in one statement so that the
/// lags derived from them are consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotReading {
    /// The database this connection is in.
    pub current_database: String,
    /// Whether the server is a standby.
    pub in_recovery: bool,
    /// The WAL position now: `pg_current_wal_lsn()`, or on a standby the last received.
    pub wal: Option<Lsn>,
    /// The slot, if it exists.
    pub slot: Option<Slot>,
}

impl SlotReading {
    /// The primary's WAL position now; on a standby the error that says so, since a standby's
    /// position is not where the relay's stream ends.
    pub fn primary_wal(&self) -> Result<Lsn, PgError> {
        match self.wal {
            Some(wal) if !self.in_recovery => Ok(wal),
            _ => Err(PgError::in_recovery()),
        }
    }

    /// Bytes of WAL written since the slot's confirmed position.
    pub fn lag_bytes(&self) -> Option<i64> {
        distance(self.wal, self.slot.as_ref()?.confirmed_flush)
    }

    /// Bytes of WAL the server keeps for the slot.
    pub fn retained_bytes(&self) -> Option<i64> {
        distance(self.wal, self.slot.as_ref()?.restart)
    }
}

fn distance(to: Option<Lsn>, from: Option<Lsn>) -> Option<i64> {
    i64::try_from(i128::from(to?.0) - i128::from(from?.0)).ok()
}

/// Reads the slot `name` and the server's WAL position.
pub async fn read_slot(client: &Client, name: &str) -> Result<SlotReading, PgError> {
    let row = client
        .query_one(
            "WITH cur AS (SELECT pg_is_in_recovery() AS standby, \
                                 CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
                                      ELSE pg_current_wal_lsn() END AS lsn) \
             SELECT current_database()::text, cur.standby, cur.lsn::text, s.slot_name IS NOT NULL, \
                    s.plugin::text, s.slot_type::text, s.database::text, \
                    coalesce(s.temporary, false), coalesce(s.active, false), s.active_pid, \
                    s.wal_status, s.confirmed_flush_lsn::text, s.restart_lsn::text, s.safe_wal_size, \
                    (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool \
             FROM cur LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&name],
        )
        .await?;
    let what = "pg_replication_slots";
    let exists: bool = column(&row, 3, what)?;
    let slot = if exists {
        Some(Slot {
            plugin: column(&row, 4, what)?,
            slot_type: column(&row, 5, what)?,
            database: column(&row, 6, what)?,
            temporary: column(&row, 7, what)?,
            active: column(&row, 8, what)?,
            active_pid: column(&row, 9, what)?,
            wal_status: column(&row, 10, what)?,
            confirmed_flush: lsn(column(&row, 11, what)?, "confirmed_flush_lsn")?,
            restart: lsn(column(&row, 12, what)?, "restart_lsn")?,
            safe_wal_size: column(&row, 13, what)?,
            failover: column(&row, 14, what)?,
            synced: column(&row, 15, what)?,
        })
    } else {
        None
    };
    Ok(SlotReading {
        current_database: column(&row, 0, "current_database()")?,
        in_recovery: column(&row, 1, "pg_is_in_recovery()")?,
        wal: lsn(column(&row, 2, "the WAL position")?, "the WAL position")?,
        slot,
    })
}

/// Why the configured slot cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotProblem {
    /// A physical slot of that name.
    #[error("replication slot {slot} is a {slot_type} slot, the relay needs a logical pgoutput slot; drop it (SELECT pg_drop_replication_slot('{slot}')) if nothing uses it, or configure another [postgres] slot")]
    NotLogical {
        /// The slot.
        slot: String,
        /// Its type.
        slot_type: String,
    },
    /// A logical slot with another output plugin.
    #[error("replication slot {slot} exists with plugin {plugin}, the relay needs pgoutput; drop it (SELECT pg_drop_replication_slot('{slot}')) if nothing uses it, or configure another [postgres] slot")]
    WrongPlugin {
        /// The slot.
        slot: String,
        /// Its plugin.
        plugin: String,
    },
    /// A slot of another database (slot names are server-wide).
    #[error("replication slot {slot} belongs to database {database}, not {current}; configure another [postgres] slot or point [postgres] url at that database")]
    OtherDatabase {
        /// The slot.
        slot: String,
        /// Its database.
        database: String,
        /// The configured one.
        current: String,
    },
    /// The server removed WAL the slot still needed.
    #[error("replication slot {slot} has wal_status = lost: WAL it needed was removed, so events committed after {confirmed} may never reach Kafka; recover by re-publishing outbox rows committed since then, then drop the slot (SELECT pg_drop_replication_slot('{slot}')){clear} and restart the relay")]
    Lost {
        /// The slot.
        slot: String,
        /// Its last confirmed position.
        confirmed: String,
        /// `, run <statement>` clearing the record of the slot's creation, or empty when
        /// there is none (a fresh slot would otherwise be refused as vanished).
        clear: String,
    },
    /// The slot is missing, but the relay's record says that it created it.
    #[error("replication slot {slot} is gone, but {marker}: events committed since its last confirmed LSN may never have reached Kafka (a failover to a server without the slot, or a dropped slot). Recover: re-publish outbox rows committed since the newest event in Kafka, then run {clear} and restart; the relay then creates a fresh slot")]
    Vanished {
        /// The slot.
        slot: String,
        /// Where the record is and what it says.
        marker: String,
        /// The statement that clears it.
        clear: String,
    },
}

/// What the relay can do with the configured slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotVerdict {
    /// Stream from it, from this position.
    Usable(Lsn),
    /// Someone is creating it right now (it has no confirmed position yet): wait.
    Creating,
    /// It does not exist and nothing says it ever did: the relay creates it.
    Missing,
    /// It cannot be used: stop and say why.
    Unusable(SlotProblem),
}

/// Judges the configured slot; `marker` (the record of its creation, see [`read_guard`])
/// tells a slot that never existed from one that vanished.
pub fn slot_verdict(
    reading: &SlotReading,
    marker: Option<&SlotMarker>,
    pg: &PostgresConfig,
) -> SlotVerdict {
    let name = pg.slot.clone();
    let Some(slot) = &reading.slot else {
        return match marker {
            Some(marker) => SlotVerdict::Unusable(SlotProblem::Vanished {
                slot: name,
                marker: marker.to_string(),
                clear: marker.clear_sql(&pg.slot),
            }),
            None => SlotVerdict::Missing,
        };
    };
    let problem = if slot.slot_type.as_deref() != Some("logical") {
        Some(SlotProblem::NotLogical {
            slot: name,
            slot_type: slot
                .slot_type
                .clone()
                .unwrap_or_else(|| "non-logical".into()),
        })
    } else if slot.plugin.as_deref() != Some("pgoutput") {
        Some(SlotProblem::WrongPlugin {
            slot: name,
            plugin: slot.plugin.clone().unwrap_or_else(|| "(none)".into()),
        })
    } else if slot.database.as_deref() != Some(reading.current_database.as_str()) {
        Some(SlotProblem::OtherDatabase {
            slot: name,
            database: slot.database.clone().unwrap_or_else(|| "(none)".into()),
            current: reading.current_database.clone(),
        })
    } else if slot.wal_status.as_deref() == Some("lost") {
        Some(SlotProblem::Lost {
            slot: name,
            clear: marker.map_or_else(String::new, |m| format!(", run {}", m.clear_sql(&pg.slot))),
            confirmed: slot.confirmed_flush.map_or_else(
                || "its last confirmed LSN".to_owned(),
                |lsn| lsn.to_string(),
            ),
        })
    } else {
        None
    };
    match (problem, slot.confirmed_flush) {
        (Some(problem), _) => SlotVerdict::Unusable(problem),
        (None, Some(lsn)) => SlotVerdict::Usable(lsn),
        (None, None) => SlotVerdict::Creating,
    }
}

impl Slot {
    /// A warning for a slot that is still usable but about to be lost.
    pub fn at_risk(&self, name: &str) -> Option<String> {
        (self.wal_status.as_deref() == Some("unreserved")).then(|| format!(
            "replication slot {name} has wal_status = unreserved: its WAL is past max_slot_wal_keep_size and will be removed at the next checkpoint unless the relay catches up"
        ))
    }
}

/// How many replication slots exist and how many may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRoom {
    /// Slots in `pg_replication_slots`.
    pub used: i64,
    /// `max_replication_slots`.
    pub max: i64,
}

impl SlotRoom {
    /// Slots the relay creates at start: the initial snapshot holds its temporary slot while
    /// it copies it into the permanent one.
    pub fn needed(pg: &PostgresConfig) -> i64 {
        if pg.initial_snapshot {
            2
        } else {
            1
        }
    }

    /// Whether the relay can create what it needs.
    pub fn fits(&self, pg: &PostgresConfig) -> bool {
        self.used + Self::needed(pg) <= self.max
    }
}

/// Counts the slots against `max_replication_slots`.
pub async fn slot_room(client: &Client) -> Result<SlotRoom, PgError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots), \
                    current_setting('max_replication_slots')::int8",
            &[],
        )
        .await?;
    Ok(SlotRoom {
        used: column(&row, 0, "the number of replication slots")?,
        max: column(&row, 1, "max_replication_slots")?,
    })
}

/// Creates the logical pgoutput slot `name`; its consistent point.
pub async fn create_slot(client: &Client, name: &str) -> Result<Lsn, PgError> {
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await?;
    let created = lsn(column(&row, 0, "the new slot's LSN")?, "the new slot's LSN")?;
    created.ok_or_else(|| PgError::unexpected("the new slot has no LSN"))
}

/// Copies the (temporary) slot `from` into a permanent slot `to`; the copy's position.
pub async fn copy_slot(client: &Client, from: &str, to: &str) -> Result<Lsn, PgError> {
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_copy_logical_replication_slot($1, $2, false)",
            &[&from, &to],
        )
        .await?;
    let copied = lsn(
        column(&row, 0, "the copied slot's LSN")?,
        "the copied slot's LSN",
    )?;
    copied.ok_or_else(|| PgError::unexpected("the copied slot has no LSN"))
}

// ---------------------------------------------------------------------------------------------
// The publication
// ---------------------------------------------------------------------------------------------

/// A table as `pg_publication_tables` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One row of `pg_publication`, with the tables it publishes and its comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publication {
    /// `pubinsert`: it publishes inserts.
    pub inserts: bool,
    /// `pubviaroot`: partitions' rows go out under their partitioned table's name.
    pub via_root: bool,
    /// `puballtables`: `FOR ALL TABLES`.
    pub all_tables: bool,
    /// What `pg_publication_tables` lists: the partitions rather than a partitioned table
    /// unless `via_root`.
    pub tables: Vec<TableName>,
    /// The comment: the relay's "slot created" marker, or anything else someone wrote.
    pub comment: Option<String>,
}

/// Reads the publication `name`; `None` if there is none.
pub async fn read_publication(client: &Client, name: &str) -> Result<Option<Publication>, PgError> {
    let row = client
        .query_opt(
            "SELECT p.pubinsert, p.pubviaroot, p.puballtables, \
                    obj_description(p.oid, 'pg_publication'), \
                    ARRAY(SELECT t.schemaname::text FROM pg_publication_tables t \
                          WHERE t.pubname = p.pubname ORDER BY t.schemaname, t.tablename), \
                    ARRAY(SELECT t.tablename::text FROM pg_publication_tables t \
                          WHERE t.pubname = p.pubname ORDER BY t.schemaname, t.tablename) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&name],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let what = "pg_publication";
    let schemas: Vec<String> = column(&row, 4, what)?;
    let names: Vec<String> = column(&row, 5, what)?;
    Ok(Some(Publication {
        inserts: column(&row, 0, what)?,
        via_root: column(&row, 1, what)?,
        all_tables: column(&row, 2, what)?,
        comment: column(&row, 3, what)?,
        tables: schemas
            .into_iter()
            .zip(names)
            .map(|(schema, name)| TableName { schema, name })
            .collect(),
    }))
}

/// The outbox tables with what the publication rules need to know of them: whether each is
/// partitioned (its rows live in partitions); a table that does not exist is not.
pub async fn outbox_tables<'c>(
    client: &Client,
    tables: &[&'c OutboxConfig],
) -> Result<Vec<OutboxTable<'c>>, PgError> {
    let names: Vec<String> = tables.iter().map(|t| quoted(t)).collect();
    let rows = client
        .query(
            "SELECT coalesce((SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = to_regclass(t)), false) \
             FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
            &[&names],
        )
        .await?;
    tables
        .iter()
        .zip(&rows)
        .map(|(config, row)| {
            Ok(OutboxTable {
                config,
                partitioned: column(row, 0, "pg_class.relkind")?,
            })
        })
        .collect()
}

/// Why the publication does not feed the relay every outbox row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicationProblem {
    /// It does not publish inserts.
    #[error("publication {0} does not publish inserts; run ALTER PUBLICATION {0} SET (publish = 'insert')")]
    NoInserts(String),
    /// It sends a partitioned outbox's rows under the partitions' names.
    #[error("publication {publication} publishes the partitions of table {table} under their own names, which match no [[outbox]] entry; run ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)")]
    ViaPartitions {
        /// The publication.
        publication: String,
        /// The partitioned table.
        table: String,
    },
    /// It does not publish a configured table.
    #[error("publication {publication} does not cover table {table}; run ALTER PUBLICATION {publication} ADD TABLE {table} (the relay never alters an existing publication)")]
    MissesTable {
        /// The publication.
        publication: String,
        /// The table.
        table: String,
    },
}

/// An outbox table as the publication rules need it.
#[derive(Debug, Clone, Copy)]
pub struct OutboxTable<'c> {
    /// Its configuration.
    pub config: &'c OutboxConfig,
    /// Whether it is partitioned.
    pub partitioned: bool,
}

/// Everything that keeps `publication` from feeding the relay the inserts of `tables` under
/// the tables' own names, at most one problem per table; empty when it does.
pub fn publication_problems(
    name: &str,
    publication: &Publication,
    tables: &[OutboxTable<'_>],
) -> Vec<PublicationProblem> {
    if !publication.inserts {
        return vec![PublicationProblem::NoInserts(name.to_owned())];
    }
    let mut problems = Vec::new();
    for table in tables {
        let (schema, table_name) = table.config.schema_and_name();
        // Without via_root a partitioned table is never listed itself (its partitions are):
        // the cause is the missing option, not a missing table.
        if table.partitioned && !publication.via_root {
            problems.push(PublicationProblem::ViaPartitions {
                publication: name.to_owned(),
                table: table.config.table.clone(),
            });
        } else if !publication
            .tables
            .iter()
            .any(|t| t.schema == schema && t.name == table_name)
        {
            problems.push(PublicationProblem::MissesTable {
                publication: name.to_owned(),
                table: table.config.table.clone(),
            });
        }
    }
    problems
}

/// The statement that creates the publication for `tables` (quoted, comma-separated).
pub fn create_publication_sql(publication: &str, tables: &str) -> String {
    // With only [[message]] sources the publication lists no table: pgoutput needs one by
    // name, and logical decoding messages are sent whatever it lists.
    let for_tables = if tables.is_empty() {
        String::new()
    } else {
        format!("FOR TABLE {tables} ")
    };
    // Via the partition root: a partitioned outbox's rows then arrive under its own name
    // (without it they arrive as the partitions' and match no [[outbox]] entry).
    format!(
        "CREATE PUBLICATION {publication} {for_tables}WITH (publish = 'insert', publish_via_partition_root = true)"
    )
}

/// Creates the publication `name` for `tables`.
pub async fn create_publication(
    client: &Client,
    name: &str,
    tables: &[OutboxConfig],
) -> Result<(), PgError> {
    let list = tables.iter().map(quoted).collect::<Vec<_>>().join(", ");
    client
        .batch_execute(&create_publication_sql(&quote_ident(name), &list))
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The lost-slot guard
// ---------------------------------------------------------------------------------------------

/// The table in which the relay records each slot it created; migrations/002_relay_role.sql
/// creates it and grants the relay's role SELECT, INSERT and UPDATE on it. A row outlives its
/// slot: table rows are replicated to physical standbys, slots are not (before PostgreSQL
/// 17's failover slots), so after a failover the row without its slot tells a lost slot from
/// one that never existed. A table of its own rather than the publication's comment, because
/// commenting needs the publication's ownership, and owning it needs CREATE on the database,
/// which would let the least-privilege role create schemas and publications too.
pub const MARKER_TABLE: &str = "public.outbox_relay_slots";
/// [`MARKER_TABLE`]'s schema and name, for looking it up in the catalogs.
const MARKER_TABLE_PARTS: (&str, &str) = ("public", "outbox_relay_slots");

/// The publication comment that records "this relay created slot X": the record where there
/// is no [`MARKER_TABLE`] but the relay owns the publication (it created it, or a superuser).
fn marker_prefix(slot: &str) -> String {
    format!("outbox-relay: slot {slot} created")
}

/// The marker comment saying that the relay created `slot`, if `comment` is one.
fn created_slot<'c>(comment: Option<&'c str>, slot: &str) -> Option<&'c str> {
    comment.filter(|c| c.starts_with(&marker_prefix(slot)))
}

/// Where the record of a slot's creation is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerPlace {
    /// A row of [`MARKER_TABLE`].
    Table,
    /// The comment on this publication.
    Publication(String),
}

/// The record that the relay created the configured slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMarker {
    /// Where it is.
    pub place: MarkerPlace,
    /// What it says.
    pub text: String,
}

impl SlotMarker {
    /// The statement that clears it, after which the relay creates a fresh slot.
    pub fn clear_sql(&self, slot: &str) -> String {
        match &self.place {
            MarkerPlace::Table => format!(
                "DELETE FROM {MARKER_TABLE} WHERE slot_name = {} (as the table's owner)",
                quote_literal(slot)
            ),
            MarkerPlace::Publication(publication) => {
                format!("COMMENT ON PUBLICATION {publication} IS NULL")
            }
        }
    }
}

impl std::fmt::Display for SlotMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.place {
            MarkerPlace::Table => write!(f, "{MARKER_TABLE} records {:?}", self.text),
            MarkerPlace::Publication(p) => write!(f, "publication {p} records {:?}", self.text),
        }
    }
}

/// Where the relay, as its configured role, can record a slot's creation, and the record of
/// the configured slot if there is one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// The role the relay connects as.
    pub role: String,
    /// Whether [`MARKER_TABLE`] exists.
    pub table: bool,
    /// Whether the role may read it.
    pub table_readable: bool,
    /// Whether the role may insert and update its rows.
    pub table_writable: bool,
    /// Whether the role owns (may comment on) the publication; `None` when there is none yet
    /// (the relay owns the one it creates).
    pub owns_publication: Option<bool>,
    /// The record of the configured slot's creation.
    pub marker: Option<SlotMarker>,
}

/// Where the guard records a slot's creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardArmed {
    /// In [`MARKER_TABLE`].
    Table,
    /// As the publication's comment.
    Publication,
}

/// Why the relay cannot record a slot's creation anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the lost-slot guard is off: role {role} cannot write {MARKER_TABLE} ({why}) and does not own publication {publication}, so the relay cannot record the creation of slot {slot} and would replace a slot lost in a failover with a fresh one, skipping the events in between; run migrations/002_relay_role.sql as a superuser (it creates {MARKER_TABLE} and grants {role} SELECT, INSERT, UPDATE on it)")]
pub struct GuardOff {
    /// The relay's role.
    pub role: String,
    /// The slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// What is wrong with the table.
    pub why: &'static str,
}

impl Guard {
    /// Where the relay records a slot's creation: the table when it may, else the
    /// publication's comment when it owns the publication.
    pub fn armed(&self, slot: &str, publication: &str) -> Result<GuardArmed, GuardOff> {
        if self.table_readable && self.table_writable {
            return Ok(GuardArmed::Table);
        }
        if self.owns_publication != Some(false) {
            return Ok(GuardArmed::Publication);
        }
        Err(GuardOff {
            role: self.role.clone(),
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            why: if !self.table {
                "it does not exist"
            } else if !self.table_readable {
                "no SELECT privilege on it, or no USAGE on its schema"
            } else {
                "no INSERT and UPDATE privileges on it"
            },
        })
    }
}

/// Reads where the relay may record the creation of `slot`, and the record if there is one:
/// a row of [`MARKER_TABLE`], else a marker comment on `publication`.
pub async fn read_guard(client: &Client, slot: &str, publication: &str) -> Result<Guard, PgError> {
    let row = client
        .query_one(
            // Looked up in pg_class rather than by to_regclass, which fails outright for a
            // role without USAGE on the schema: that role just cannot use the table.
            "SELECT current_user::text, t.oid IS NOT NULL, \
                    coalesce(t.usable AND has_table_privilege(t.oid, 'SELECT'), false), \
                    coalesce(t.usable AND has_table_privilege(t.oid, 'INSERT') \
                             AND has_table_privilege(t.oid, 'UPDATE'), false), \
                    (SELECT pg_has_role(p.pubowner, 'USAGE') FROM pg_publication p WHERE p.pubname = $3), \
                    (SELECT obj_description(p.oid, 'pg_publication') FROM pg_publication p WHERE p.pubname = $3) \
             FROM (SELECT 1) one LEFT JOIN \
                  (SELECT c.oid, has_schema_privilege(n.oid, 'USAGE') AS usable \
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                   WHERE n.nspname = $1 AND c.relname = $2) t ON true",
            &[&MARKER_TABLE_PARTS.0, &MARKER_TABLE_PARTS.1, &publication],
        )
        .await?;
    let what = "the lost-slot guard's privileges";
    let mut guard = Guard {
        role: column(&row, 0, what)?,
        table: column(&row, 1, what)?,
        table_readable: column(&row, 2, what)?,
        table_writable: column(&row, 3, what)?,
        owns_publication: column(&row, 4, what)?,
        marker: None,
    };
    let comment: Option<String> = column(&row, 5, "the publication's comment")?;
    if guard.table_readable {
        let row = client
            .query_opt(
                &format!(
                    "SELECT format('slot %s created at %s on %s', slot_name, created_lsn, created_at) \
                     FROM {MARKER_TABLE} WHERE slot_name = $1"
                ),
                &[&slot],
            )
            .await?;
        if let Some(row) = row {
            guard.marker = Some(SlotMarker {
                place: MarkerPlace::Table,
                text: column(&row, 0, MARKER_TABLE)?,
            });
        }
    }
    if guard.marker.is_none() {
        guard.marker = created_slot(comment.as_deref(), slot).map(|text| SlotMarker {
            place: MarkerPlace::Publication(publication.to_owned()),
            text: text.to_owned(),
        });
    }
    Ok(guard)
}

fn guard_off(slot: &str, cause: &str) {
    tracing::warn!(
        "the lost-slot guard is off: cannot record the creation of slot {slot} ({cause}); a slot lost in a failover will then not be detected at start"
    )
}

/// Records that this relay created `slot` at `lsn` where [`Guard::armed`] says, so that its
/// loss is noticed (see [`slot_verdict`]); where it cannot, only a warning, since the slot
/// itself is fine.
pub async fn write_marker(client: &Client, slot: &str, publication: &str, lsn: Lsn) {
    match read_guard(client, slot, publication).await {
        Ok(guard) => record_creation(client, &guard, slot, publication, lsn).await,
        Err(e) => guard_off(slot, &e.to_string()),
    }
}

/// [`write_marker`] with the `guard` read before the slot was created, so that the record
/// follows the slot's creation by one statement.
pub async fn record_creation(
    client: &Client,
    guard: &Guard,
    slot: &str,
    publication: &str,
    lsn: Lsn,
) {
    let written = match guard.armed(slot, publication) {
        Ok(GuardArmed::Table) => client
            .execute(
                &format!(
                    "INSERT INTO {MARKER_TABLE} (slot_name, created_lsn) VALUES ($1, $2::text::pg_lsn) \
                     ON CONFLICT (slot_name) DO UPDATE SET created_lsn = excluded.created_lsn, created_at = now()"
                ),
                &[&slot, &lsn.to_string()],
            )
            .await
            .map(drop),
        Ok(GuardArmed::Publication) => {
            let comment = format!(
                "{} at {lsn}; if the slot disappears outbox-relay refuses to create a new one until this comment is cleared",
                marker_prefix(slot)
            );
            client
                .batch_execute(&format!(
                    "COMMENT ON PUBLICATION {} IS {}",
                    quote_ident(publication),
                    quote_literal(&comment)
                ))
                .await
        }
        Err(problem) => return tracing::warn!("{problem}"),
    };
    if let Err(e) = written {
        guard_off(slot, &PgError::from(e).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg() -> PostgresConfig {
        let mut pg: PostgresConfig =
            toml::from_str("url = \"postgres://relay@db/app\"").expect("minimal [postgres]");
        pg.slot = "outbox_relay".into();
        pg.publication = "outbox_pub".into();
        pg
    }

    fn reading(slot: Option<Slot>) -> SlotReading {
        SlotReading {
            current_database: "app".into(),
            in_recovery: false,
            wal: Some(Lsn(0x16B_3748)),
            slot,
        }
    }

    fn healthy() -> Slot {
        Slot {
            plugin: Some("pgoutput".into()),
            slot_type: Some("logical".into()),
            database: Some("app".into()),
            wal_status: Some("reserved".into()),
            confirmed_flush: Some(Lsn(0x16B_3700)),
            restart: Some(Lsn(0x16B_3000)),
            ..Slot::default()
        }
    }

    fn problem(verdict: SlotVerdict) -> String {
        match verdict {
            SlotVerdict::Unusable(p) => p.to_string(),
            other => panic!("expected a problem, got {other:?}"),
        }
    }

    #[test]
    fn a_pgoutput_slot_of_this_database_is_usable_from_its_confirmed_position() {
        let verdict = slot_verdict(&reading(Some(healthy())), None, &pg());
        assert_eq!(verdict, SlotVerdict::Usable(Lsn(0x16B_3700)));
        let r = reading(Some(healthy()));
        assert_eq!(r.lag_bytes(), Some(0x48));
        assert_eq!(r.retained_bytes(), Some(0x748));
        assert_eq!(r.primary_wal(), Ok(Lsn(0x16B_3748)));
    }

    #[test]
    fn physical_wrong_plugin_other_database_and_lost_slots_are_refused_with_the_fix() {
        let physical = Slot {
            slot_type: Some("physical".into()),
            plugin: None,
            ..healthy()
        };
        let text = problem(slot_verdict(&reading(Some(physical)), None, &pg()));
        assert!(text.contains("is a physical slot") && text.contains("pg_drop_replication_slot"));

        let wrong = Slot {
            plugin: Some("test_decoding".into()),
            ..healthy()
        };
        let text = problem(slot_verdict(&reading(Some(wrong)), None, &pg()));
        assert!(text.contains("plugin test_decoding"), "{text}");

        let other = Slot {
            database: Some("billing".into()),
            ..healthy()
        };
        let text = problem(slot_verdict(&reading(Some(other)), None, &pg()));
        assert!(text.contains("database billing, not app"), "{text}");

        let lost = Slot {
            wal_status: Some("lost".into()),
            ..healthy()
        };
        let text = problem(slot_verdict(&reading(Some(lost)), None, &pg()));
        for needle in [
            "wal_status = lost",
            "0/16B3700",
            "may never reach Kafka",
            "pg_drop_replication_slot('outbox_relay')",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn a_missing_slot_is_created_unless_its_creation_is_recorded() {
        assert_eq!(
            slot_verdict(&reading(None), None, &pg()),
            SlotVerdict::Missing
        );
        // A comment of someone else's, or another slot's marker, says nothing about this one.
        for comment in [
            "owned by the billing team",
            "outbox-relay: slot outbox_relay_2 created at 0/1",
        ] {
            assert_eq!(created_slot(Some(comment), "outbox_relay"), None);
        }
        let comment = "outbox-relay: slot outbox_relay created at 0/16B3700; ...";
        assert_eq!(created_slot(Some(comment), "outbox_relay"), Some(comment));
        let on_publication = SlotMarker {
            place: MarkerPlace::Publication("outbox_pub".into()),
            text: comment.into(),
        };
        let text = problem(slot_verdict(&reading(None), Some(&on_publication), &pg()));
        assert!(
            text.contains("is gone")
                && text.contains("publication outbox_pub records")
                && text.contains("run COMMENT ON PUBLICATION outbox_pub IS NULL and restart"),
            "{text}"
        );
        let in_table = SlotMarker {
            place: MarkerPlace::Table,
            text: "slot outbox_relay created at 0/16B3700 on 2026-12-04".into(),
        };
        let text = problem(slot_verdict(&reading(None), Some(&in_table), &pg()));
        assert!(
            text.contains(
                "public.outbox_relay_slots records \"slot outbox_relay created at 0/16B3700"
            ) && text.contains(
                "run DELETE FROM public.outbox_relay_slots WHERE slot_name = 'outbox_relay'"
            ) && !text.contains("COMMENT ON"),
            "{text}"
        );
        // A lost slot's recovery clears the record where there is one, and only then.
        let lost = Slot {
            wal_status: Some("lost".into()),
            ..healthy()
        };
        let text = problem(slot_verdict(
            &reading(Some(lost.clone())),
            Some(&in_table),
            &pg(),
        ));
        assert!(text.contains("pg_drop_replication_slot('outbox_relay')), run DELETE FROM public.outbox_relay_slots"), "{text}");
        let text = problem(slot_verdict(&reading(Some(lost)), None, &pg()));
        assert!(
            text.contains("pg_drop_replication_slot('outbox_relay')) and restart"),
            "{text}"
        );
    }

    #[test]
    fn the_guard_records_in_the_table_else_on_an_owned_publication_else_is_off() {
        let writable = Guard {
            role: "outbox_relay".into(),
            table: true,
            table_readable: true,
            table_writable: true,
            owns_publication: Some(false),
            marker: None,
        };
        assert_eq!(writable.armed("s", "p"), Ok(GuardArmed::Table));
        let owner = Guard {
            table: false,
            table_readable: false,
            table_writable: false,
            owns_publication: Some(true),
            ..writable.clone()
        };
        assert_eq!(owner.armed("s", "p"), Ok(GuardArmed::Publication));
        // No publication yet: the relay creates it and then owns it.
        let creator = Guard {
            owns_publication: None,
            ..owner.clone()
        };
        assert_eq!(creator.armed("s", "p"), Ok(GuardArmed::Publication));
        let neither = Guard {
            owns_publication: Some(false),
            ..owner
        };
        let off = neither
            .armed("s", "p")
            .expect_err("nowhere to write")
            .to_string();
        for needle in [
            "the lost-slot guard is off",
            "role outbox_relay cannot write public.outbox_relay_slots (it does not exist)",
            "does not own publication p",
            "slot s",
            "run migrations/002_relay_role.sql",
        ] {
            assert!(off.contains(needle), "{needle}: {off}");
        }
        let read_only = Guard {
            table: true,
            table_readable: true,
            ..neither
        };
        let off = read_only
            .armed("s", "p")
            .expect_err("read-only")
            .to_string();
        assert!(off.contains("no INSERT and UPDATE privileges"), "{off}");
    }

    #[test]
    fn a_slot_without_a_confirmed_position_is_being_created() {
        let creating = Slot {
            confirmed_flush: None,
            ..healthy()
        };
        assert_eq!(
            slot_verdict(&reading(Some(creating)), None, &pg()),
            SlotVerdict::Creating
        );
    }

    #[test]
    fn a_standby_has_no_primary_wal_position() {
        let standby = SlotReading {
            in_recovery: true,
            ..reading(Some(healthy()))
        };
        let e = standby.primary_wal().expect_err("a standby");
        assert_eq!(e.to_string(), IN_RECOVERY);
        let state = ServerState {
            wal_level: "logical".into(),
            in_recovery: true,
            version_num: 150_010,
        };
        assert_eq!(state.problems(), [ServerProblem::InRecovery]);
    }

    #[test]
    fn failover_slots_are_kept_where_the_server_has_them_and_demanded_only_by_true() {
        assert_eq!(failover_wanted(FailoverSlot::Auto, 170_004), Ok(true));
        assert_eq!(failover_wanted(FailoverSlot::Auto, 160_008), Ok(false));
        assert_eq!(failover_wanted(FailoverSlot::Off, 180_001), Ok(false));
        assert_eq!(failover_wanted(FailoverSlot::On, 180_001), Ok(true));
        let e = failover_wanted(FailoverSlot::On, 150_010).expect_err("15 has none");
        assert!(
            e.to_string().starts_with(
                "[postgres] failover_slot = true, but PostgreSQL 15 has no failover slots"
            ),
            "{e}"
        );
    }

    fn outbox(table: &str) -> OutboxConfig {
        let text = format!(
            "[postgres]\nurl = \"postgres://relay@db/app\"\n[kafka]\nbrokers = \"kafka:9092\"\n[[outbox]]\ntable = \"{table}\"\n"
        );
        let mut config =
            crate::config::Config::parse(&text, "relay.toml", |_| None).expect("a minimal config");
        config.outbox.remove(0)
    }

    fn published(tables: &[(&str, &str)], via_root: bool) -> Publication {
        Publication {
            inserts: true,
            via_root,
            tables: tables
                .iter()
                .map(|(s, n)| TableName {
                    schema: (*s).into(),
                    name: (*n).into(),
                })
                .collect(),
            ..Publication::default()
        }
    }

    #[test]
    fn a_partitioned_outbox_needs_publish_via_partition_root() {
        let table = outbox("public.outbox");
        let tables = [OutboxTable {
            config: &table,
            partitioned: true,
        }];
        // Without via_root, pg_publication_tables lists the partitions, not the table.
        let leaves = published(&[("public", "outbox_2025_01")], false);
        let problems = publication_problems("p", &leaves, &tables);
        assert_eq!(
            problems,
            [PublicationProblem::ViaPartitions {
                publication: "p".into(),
                table: "public.outbox".into()
            }]
        );
        assert!(problems[0]
            .to_string()
            .contains("SET (publish_via_partition_root = true)"));
        let root = published(&[("public", "outbox")], true);
        assert!(publication_problems("p", &root, &tables).is_empty());
    }

    #[test]
    fn a_publication_must_publish_inserts_of_every_table() {
        let a = outbox("public.a");
        let b = outbox("sales.b");
        let tables = [
            OutboxTable {
                config: &a,
                partitioned: false,
            },
            OutboxTable {
                config: &b,
                partitioned: false,
            },
        ];
        let only_a = published(&[("public", "a")], false);
        assert_eq!(
            publication_problems("p", &only_a, &tables),
            [PublicationProblem::MissesTable {
                publication: "p".into(),
                table: "sales.b".into()
            }]
        );
        let no_inserts = Publication {
            inserts: false,
            ..published(&[("public", "a"), ("sales", "b")], false)
        };
        assert_eq!(
            publication_problems("p", &no_inserts, &tables),
            [PublicationProblem::NoInserts("p".into())]
        );
    }
}
