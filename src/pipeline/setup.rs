//! Start-up checks and provisioning over plain SQL: the server, the outbox tables and their
//! columns, the publication (created if missing, never altered) and the slot (created if
//! missing, checked if present). Every failure is one line naming the cause and the fix; the
//! rules about the server, the slot and the publication are [`catalog`]'s, shared with
//! `check`, `status` and the monitor.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::{Config, OutboxConfig, PostgresConfig, RecordFormat};
use crate::lsn::Lsn;
use crate::mapping::debezium::Envelopes;
use crate::mapping::outbox::MappingError;
use crate::postgres::catalog::{
    self, Guard, Publication, PublicationProblem, ServerProblem, SlotProblem, SlotVerdict,
};
use crate::postgres::errors::{Action, Cause, PgError};

/// Why the database is not ready for the relay.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The server could not be reached, or is busy; worth retrying.
    #[error("{0}")]
    Connect(String),
    /// A query failed in a way retrying does not fix.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The server cannot serve the relay: `wal_level`, or a standby.
    #[error(transparent)]
    Server(#[from] ServerProblem),
    /// A configured outbox table does not exist.
    #[error("outbox table {0} does not exist; create it (see migrations/001_outbox.sql) or fix [[outbox]] table")]
    MissingTable(String),
    /// A configured column does not exist.
    #[error("outbox table {table} has no column {column:?} (configured as {role}); add it or change {role} in the [[outbox]] entry")]
    MissingColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Which config key names it.
        role: &'static str,
    },
    /// `format = "debezium-json"` on a table whose key may be NULL or whose payload may not:
    /// Debezium's envelope says which (`"optional"`), and the relay's reproduces the shape of
    /// migrations/001_outbox.sql only.
    #[error("outbox table {table}: format = \"debezium-json\" needs {role} {column:?} to be {wanted}, as in migrations/001_outbox.sql (Debezium's envelope says whether a value may be null); ALTER TABLE {table} ALTER COLUMN {column} {fix}, or use format = \"plain\"")]
    EnvelopeNullability {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Which config key names it.
        role: &'static str,
        /// `NOT NULL` or `nullable`.
        wanted: &'static str,
        /// The statement's end that makes it so.
        fix: &'static str,
    },
    /// `format = "debezium-json"` on a column whose type gets another envelope from Debezium
    /// (the check the mapper makes on every Relation message, made at start too).
    #[error(transparent)]
    EnvelopeType(MappingError),
    /// The existing publication does not feed the relay every outbox row.
    #[error(transparent)]
    Publication(#[from] PublicationProblem),
    /// The publication was dropped while the relay ran.
    #[error("publication {0} was dropped while the relay ran; recreate it (see migrations/002_relay_role.sql) and restart the relay")]
    PublicationDropped(String),
    /// The publication could not be created.
    #[error("cannot create publication {publication}: {cause}; create it as the tables' owner: CREATE PUBLICATION {publication} FOR TABLE {tables} WITH (publish = 'insert', publish_via_partition_root = true)")]
    CreatePublication {
        /// The publication.
        publication: String,
        /// The tables.
        tables: String,
        /// The server's message.
        cause: String,
    },
    /// The slot exists but cannot be used, or vanished.
    #[error(transparent)]
    SlotUnusable(#[from] SlotProblem),
    /// The slot could not be created or its creation never finished.
    #[error("replication slot {slot}: {problem}")]
    Slot {
        /// The slot.
        slot: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

/// What start-up learned about the slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// The slot's `confirmed_flush_lsn`: where streaming resumes.
    pub confirmed_flush: Lsn,
    /// Whether this start created it.
    pub created: bool,
}

impl From<PgError> for SetupError {
    fn from(e: PgError) -> Self {
        if e.cause == Cause::InRecovery {
            return SetupError::Server(ServerProblem::InRecovery);
        }
        match e.action() {
            Action::Retry | Action::Standby => SetupError::Connect(e.message),
            Action::Fatal => SetupError::Postgres(e.message),
        }
    }
}

impl From<tokio_postgres::Error> for SetupError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::from(e).into()
    }
}

/// Whether the server can serve the relay: `wal_level = logical`, not a standby, and failover
/// slots if `[postgres] failover_slot = true` demands them.
pub async fn check_server(client: &Client, pg: &PostgresConfig) -> Result<(), SetupError> {
    let state = catalog::server(client).await?;
    match state.problems().into_iter().next() {
        Some(problem) => Err(problem.into()),
        None => {
            catalog::failover_wanted(pg.failover(), state.version_num)?;
            Ok(())
        }
    }
}

/// Checks the database and creates the publication and slot where missing. `None`: the slot
/// is missing and, with `initial_snapshot`, is left for the snapshot to create.
pub async fn prepare(client: &Client, config: &Config) -> Result<Option<SlotState>, SetupError> {
    check_server(client, &config.postgres).await?;
    for table in &config.outbox {
        check_table(client, table).await?;
    }
    ensure_publication(client, config).await?;
    // Read before the slot: a record of its creation then predates the slot's reading.
    let guard =
        catalog::read_guard(client, &config.postgres.slot, &config.postgres.publication).await?;
    ensure_slot(
        client,
        &config.postgres,
        &guard,
        !config.postgres.initial_snapshot,
        0,
    )
    .await
}

/// Whether the outbox table and every configured column exist.
pub async fn check_table(client: &Client, table: &OutboxConfig) -> Result<(), SetupError> {
    let (schema, name) = table.schema_and_name();
    let rows = client
        .query(
            "SELECT a.attname::text, a.attnotnull, a.atttypid FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &name],
        )
        .await?;
    if rows.is_empty() {
        return Err(SetupError::MissingTable(table.table.clone()));
    }
    let columns: Vec<(String, bool, u32)> = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| PgError::unreadable("pg_attribute", &e))?;
    let mut wanted = vec![
        (table.id_column.as_str(), "id_column"),
        (table.key_column.as_str(), "key_column"),
        (table.type_column.as_str(), "type_column"),
        (table.payload_column.as_str(), "payload_column"),
    ];
    wanted.extend(table.topic_columns().into_iter().map(|c| (c, "topic")));
    wanted.extend(
        table
            .header_columns
            .iter()
            .map(|c| (c.as_str(), "header_columns")),
    );
    wanted.extend(
        table
            .partition_column
            .as_deref()
            .map(|c| (c, "partition_column")),
    );
    wanted.extend(
        table
            .snapshot_order_by
            .as_deref()
            .map(|c| (c, "snapshot_order_by")),
    );
    for (column, role) in wanted {
        if !columns.iter().any(|(c, _, _)| c == column) {
            return Err(SetupError::MissingColumn {
                table: table.table.clone(),
                column: column.to_owned(),
                role,
            });
        }
    }
    if table.format == RecordFormat::DebeziumJson {
        let not_null = |name: &str| columns.iter().any(|(c, nn, _)| c == name && *nn);
        let type_of = |name: &str| {
            columns
                .iter()
                .find(|(c, _, _)| c == name)
                .map_or(0, |(_, _, oid)| *oid)
        };
        Envelopes::for_columns(
            &table.table,
            table,
            type_of(&table.key_column),
            type_of(&table.payload_column),
        )
        .map_err(SetupError::EnvelopeType)?;
        let problem = if !not_null(&table.key_column) {
            Some((&table.key_column, "key_column", "NOT NULL", "SET NOT NULL"))
        } else if not_null(&table.payload_column) {
            Some((
                &table.payload_column,
                "payload_column",
                "nullable",
                "DROP NOT NULL",
            ))
        } else {
            None
        };
        if let Some((column, role, wanted, fix)) = problem {
            return Err(SetupError::EnvelopeNullability {
                table: table.table.clone(),
                column: column.clone(),
                role,
                wanted,
                fix,
            });
        }
    }
    Ok(())
}

/// Checks an existing publication publishes inserts of every outbox table under the table's
/// own name and returns it; `None` when there is no such publication.
pub async fn check_publication(
    client: &Client,
    config: &Config,
) -> Result<Option<Publication>, SetupError> {
    let name = &config.postgres.publication;
    let Some(publication) = catalog::read_publication(client, name).await? else {
        return Ok(None);
    };
    let outbox: Vec<&OutboxConfig> = config.outbox.iter().collect();
    let tables = catalog::outbox_tables(client, &outbox).await?;
    match catalog::publication_problems(name, &publication, &tables)
        .into_iter()
        .next()
    {
        Some(problem) => Err(problem.into()),
        None => Ok(Some(publication)),
    }
}

/// Creates the publication if missing; checks an existing one covers every outbox table.
/// Returns the existing publication (a new one has nothing to tell yet).
pub async fn ensure_publication(
    client: &Client,
    config: &Config,
) -> Result<Option<Publication>, SetupError> {
    let name = &config.postgres.publication;
    if let Some(existing) = check_publication(client, config).await? {
        return Ok(Some(existing));
    }
    match catalog::create_publication(client, name, &config.outbox).await {
        Ok(()) => {
            tracing::info!(publication = %name, "created publication");
            Ok(None)
        }
        // Another replica created it between our check and now: the catalog's unique index
        // reports that as 23505 when both CREATEs ran at once, as 42710 otherwise.
        Err(e) if e.is(&SqlState::DUPLICATE_OBJECT) || e.is(&SqlState::UNIQUE_VIOLATION) => {
            Ok(None)
        }
        Err(e) if e.action() == Action::Fatal => Err(SetupError::CreatePublication {
            publication: name.clone(),
            tables: config
                .outbox
                .iter()
                .map(catalog::quoted)
                .collect::<Vec<_>>()
                .join(", "),
            cause: e.message,
        }),
        Err(e) => Err(e.into()),
    }
}

/// How often, 200 ms apart, a slot another replica is creating right now is looked at again
/// before giving up on it.
const SLOT_CREATION_PATIENCE: u32 = 150;

/// Uses the slot, or creates it (`create`) when [`catalog::slot_verdict`] finds it missing.
/// `guard` was read before the slot: its record then predates the reading, so a record of the
/// slot's creation without the slot means the slot vanished, not that it is being made.
async fn ensure_slot(
    client: &Client,
    pg: &PostgresConfig,
    guard: &Guard,
    create: bool,
    attempt: u32,
) -> Result<Option<SlotState>, SetupError> {
    let slot = pg.slot.as_str();
    let slot_err = |problem: String| SetupError::Slot {
        slot: slot.to_owned(),
        problem,
    };
    let reading = catalog::read_slot(client, slot).await?;
    match catalog::slot_verdict(&reading, guard.marker.as_ref(), pg) {
        SlotVerdict::Usable(confirmed_flush) => Ok(Some(SlotState {
            confirmed_flush,
            created: false,
        })),
        SlotVerdict::Unusable(problem) => Err(problem.into()),
        // A logical slot has no confirmed position only while it is being created (another
        // replica is building its snapshot, which waits for running transactions): wait.
        SlotVerdict::Creating if attempt < SLOT_CREATION_PATIENCE => {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            Box::pin(ensure_slot(client, pg, guard, create, attempt + 1)).await
        }
        SlotVerdict::Creating => Err(slot_err(
            "has had no confirmed_flush_lsn for 30 s: its creation did not finish; drop it and restart the relay".into(),
        )),
        SlotVerdict::Missing if !create => Ok(None),
        SlotVerdict::Missing => match catalog::create_slot(client, slot).await {
            Ok(lsn) => {
                tracing::info!(slot, lsn = %lsn, "created replication slot");
                catalog::record_creation(client, guard, slot, &pg.publication, lsn).await;
                Ok(Some(SlotState {
                    confirmed_flush: lsn,
                    created: true,
                }))
            }
            // Another replica created it a moment ago; use it.
            Err(e) if e.is(&SqlState::DUPLICATE_OBJECT) => {
                Box::pin(ensure_slot(client, pg, guard, create, attempt + 1)).await
            }
            Err(e) if e.action() == Action::Fatal && e.cause != Cause::InRecovery => {
                Err(slot_err(format!(
                    "cannot create it: {e}; the relay's role needs the REPLICATION attribute (ALTER ROLE <role> REPLICATION)"
                )))
            }
            Err(e) => Err(e.into()),
        },
    }
}
