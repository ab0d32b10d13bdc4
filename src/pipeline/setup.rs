//! Start-up checks and provisioning over plain SQL: `wal_level`, the outbox tables and their
//! columns, the publication (created if missing, never altered) and the slot (created if
//! missing, checked if present). Every failure is one line naming the cause and the fix.

use tokio_postgres::Client;

use crate::config::{Config, OutboxConfig};
use crate::lsn::Lsn;

/// Why the database is not ready for the relay.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The server could not be reached; worth retrying.
    #[error("{0}")]
    Connect(String),
    /// A replication slot this relay created is gone: events may have been lost.
    #[error("replication slot {slot} is gone, but {marker}: events committed since its last confirmed LSN may never have reached Kafka (a failover to a server without the slot, or a dropped slot). Recover: re-publish outbox rows committed since the newest event in Kafka, then run COMMENT ON PUBLICATION {publication} IS NULL and restart; the relay then creates a fresh slot")]
    SlotVanished {
        /// The slot.
        slot: String,
        /// The publication carrying the marker.
        publication: String,
        /// What the marker says.
        marker: String,
    },
    /// Could not connect or a query failed.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// `wal_level` is not `logical`.
    #[error("wal_level is {0:?}, logical replication needs 'logical': set wal_level = logical in postgresql.conf (or the cloud parameter group) and restart PostgreSQL")]
    WalLevel(String),
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
    /// The existing publication does not publish a configured table's inserts.
    #[error("publication {publication} does not cover table {table}; run ALTER PUBLICATION {publication} ADD TABLE {table} (the relay never alters an existing publication)")]
    PublicationMissesTable {
        /// The publication.
        publication: String,
        /// The table.
        table: String,
    },
    /// The existing publication sends a partitioned outbox's rows under the partitions' names.
    #[error("publication {publication} publishes the partitions of table {table} under their own names, which match no [[outbox]] entry; run ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)")]
    PublicationViaPartitions {
        /// The publication.
        publication: String,
        /// The partitioned table.
        table: String,
    },
    /// The publication was dropped while the relay ran.
    #[error("publication {0} was dropped while the relay ran; recreate it (see migrations/002_relay_role.sql) and restart the relay")]
    PublicationDropped(String),
    /// The existing publication does not publish inserts.
    #[error("publication {0} does not publish inserts; run ALTER PUBLICATION {0} SET (publish = 'insert')")]
    PublicationNoInserts(String),
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
    /// The slot exists but cannot be used.
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

impl From<tokio_postgres::Error> for SetupError {
    fn from(e: tokio_postgres::Error) -> Self {
        // A TLS configuration problem or a server-side error (bad password, missing
        // database) will not fix itself; a socket-level one may.
        if let Some(message) = crate::postgres::connect::tls_config_error(&e) {
            SetupError::Postgres(message)
        } else if e.as_db_error().is_none() {
            SetupError::Connect(pg_message(&e))
        } else {
            pg(e)
        }
    }
}

/// A tokio-postgres error with the server's own message.
pub fn pg(e: tokio_postgres::Error) -> SetupError {
    SetupError::Postgres(pg_message(&e))
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

/// Whether `wal_level` is `logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SetupError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(pg)?
        .get(0);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel(wal_level));
    }
    Ok(())
}

/// Checks the database and creates the publication and slot where missing. `None`: the slot
/// is missing and, with `initial_snapshot`, is left for the snapshot to create.
pub async fn prepare(client: &Client, config: &Config) -> Result<Option<SlotState>, SetupError> {
    check_wal_level(client).await?;
    for table in &config.outbox {
        check_table(client, table).await?;
    }
    ensure_publication(client, config).await?;
    ensure_slot(
        client,
        &config.postgres.slot,
        &config.postgres.publication,
        !config.postgres.initial_snapshot,
        0,
    )
    .await
}

/// The table's name for SQL: schema and name, each quoted.
pub fn quoted(table: &OutboxConfig) -> String {
    let (schema, name) = table.schema_and_name();
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// An identifier for SQL, quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Whether the outbox table and every configured column exist.
pub async fn check_table(client: &Client, table: &OutboxConfig) -> Result<(), SetupError> {
    let (schema, name) = table.schema_and_name();
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &name],
        )
        .await
        .map_err(pg)?;
    if rows.is_empty() {
        return Err(SetupError::MissingTable(table.table.clone()));
    }
    let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
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
        if !columns.iter().any(|c| c == column) {
            return Err(SetupError::MissingColumn {
                table: table.table.clone(),
                column: column.to_owned(),
                role,
            });
        }
    }
    Ok(())
}

/// Checks an existing publication publishes inserts of every outbox table under the table's
/// own name; `Ok(false)` when there is no such publication.
pub async fn check_publication(client: &Client, config: &Config) -> Result<bool, SetupError> {
    match publication_problems(client, config, |_| true).await? {
        None => Ok(false),
        Some(problems) => match problems.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(true),
        },
    }
}

/// Every rule about an existing publication, written once: `run` stops at the first problem,
/// `check` reports them all, the monitor re-checks them while streaming. `None` when there is
/// no such publication; `present(i)` says whether outbox table `i` exists (a missing table is
/// reported on its own, so the publication is not blamed for it too).
pub async fn publication_problems(
    client: &Client,
    config: &Config,
    present: impl Fn(usize) -> bool,
) -> Result<Option<Vec<SetupError>>, SetupError> {
    let publication = &config.postgres.publication;
    let existing = client
        .query_opt(
            "SELECT pubinsert, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(pg)?;
    let Some(row) = existing else {
        return Ok(None);
    };
    if !row.try_get::<_, bool>(0).map_err(pg)? {
        return Ok(Some(vec![SetupError::PublicationNoInserts(
            publication.clone(),
        )]));
    }
    let via_root: bool = row.try_get(1).map_err(pg)?;
    let mut problems = Vec::new();
    for (i, table) in config.outbox.iter().enumerate() {
        if !present(i) {
            continue;
        }
        let (schema, name) = table.schema_and_name();
        if !via_root && is_partitioned(client, table).await? {
            problems.push(SetupError::PublicationViaPartitions {
                publication: publication.clone(),
                table: table.table.clone(),
            });
            continue;
        }
        let covered = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[publication, &schema, &name],
            )
            .await
            .map_err(pg)?;
        if covered.is_none() {
            problems.push(SetupError::PublicationMissesTable {
                publication: publication.clone(),
                table: table.table.clone(),
            });
        }
    }
    Ok(Some(problems))
}

/// Whether the table is partitioned (its rows live in partitions).
async fn is_partitioned(client: &Client, table: &OutboxConfig) -> Result<bool, SetupError> {
    let row = client
        .query_opt(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)",
            &[&quoted(table)],
        )
        .await
        .map_err(pg)?;
    Ok(row.is_some_and(|r| r.get(0)))
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

/// Creates the publication if missing; checks an existing one covers every outbox table.
pub async fn ensure_publication(client: &Client, config: &Config) -> Result<(), SetupError> {
    let publication = &config.postgres.publication;
    if check_publication(client, config).await? {
        return Ok(());
    }
    let tables = config
        .outbox
        .iter()
        .map(quoted)
        .collect::<Vec<_>>()
        .join(", ");
    let sql = create_publication_sql(&quote_ident(publication), &tables);
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(publication = %publication, tables = %tables, "created publication");
            Ok(())
        }
        // Another replica created it between our check and now: the catalog's unique index
        // reports that as 23505 when both CREATEs ran at once, as 42710 otherwise.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(SetupError::CreatePublication {
            publication: publication.clone(),
            tables,
            cause: pg(e).to_string(),
        }),
    }
}

/// The publication comment that records "this relay created slot X": it outlives the slot
/// (catalogs are replicated, slots are not), so a slot lost in a failover is noticed.
fn marker_prefix(slot: &str) -> String {
    format!("outbox-relay: slot {slot} created")
}

/// Whether the slot exists now.
pub async fn slot_exists(client: &Client, slot: &str) -> Result<bool, SetupError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg)?
        .is_some())
}

/// How often, 200 ms apart, a slot another replica is creating right now is looked at again
/// before giving up on it.
const SLOT_CREATION_PATIENCE: u32 = 150;

/// Records on the publication that this relay created `slot` at `lsn` (see [`marker_prefix`]);
/// without the publication's ownership only a warning, since the slot itself is fine.
pub async fn write_marker(client: &Client, slot: &str, publication: &str, lsn: &str) {
    let comment = format!(
        "{} at {lsn}; if the slot disappears outbox-relay refuses to create a new one until this comment is cleared",
        marker_prefix(slot)
    );
    let sql = format!(
        "COMMENT ON PUBLICATION {} IS {}",
        quote_ident(publication),
        quote_literal(&comment)
    );
    if let Err(e) = client.batch_execute(&sql).await {
        tracing::warn!(
            "cannot mark publication {publication} with the slot's creation ({}); a slot lost in a failover will then not be detected at start",
            pg(e)
        );
    }
}

async fn ensure_slot(
    client: &Client,
    slot: &str,
    publication: &str,
    create: bool,
    attempt: u32,
) -> Result<Option<SlotState>, SetupError> {
    let slot_err = |problem: String| SetupError::Slot {
        slot: slot.to_owned(),
        problem,
    };
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, current_database()::text, \
                    confirmed_flush_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg)?;
    let Some(row) = row else {
        let marker: Option<String> = client
            .query_opt(
                "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(pg)?
            .and_then(|r| r.get(0));
        if let Some(marker) = marker.filter(|m| m.starts_with(&marker_prefix(slot))) {
            // Another replica may have created the slot (and written the marker) between
            // our two queries: only a slot that is still missing now has vanished.
            if attempt == 0 && slot_exists(client, slot).await? {
                return Box::pin(ensure_slot(client, slot, publication, create, attempt + 1)).await;
            }
            return Err(SetupError::SlotVanished {
                slot: slot.to_owned(),
                publication: publication.to_owned(),
                marker: format!("publication {publication} records {marker:?}"),
            });
        }
        if !create {
            return Ok(None);
        }
        let created = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await;
        return match created {
            Ok(row) => {
                let lsn: String = row.get(0);
                tracing::info!(slot, lsn = %lsn, "created replication slot");
                write_marker(client, slot, publication, &lsn).await;
                Ok(Some(SlotState {
                    confirmed_flush: lsn.parse().map_err(|e| slot_err(format!("{e}")))?,
                    created: true,
                }))
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {
                // Another replica created it a moment ago; use it.
                Box::pin(ensure_slot(client, slot, publication, create, attempt + 1)).await
            }
            Err(e) => Err(slot_err(format!(
                "cannot create it: {}; the relay's role needs the REPLICATION attribute (ALTER ROLE <role> REPLICATION)",
                pg(e)
            ))),
        };
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: Option<String> = row.get(1);
    let database: Option<String> = row.get(2);
    let current: String = row.get(3);
    let confirmed: Option<String> = row.get(4);
    let wal_status: Option<String> = row.get(5);
    if slot_type.as_deref() != Some("logical") || plugin.as_deref() != Some("pgoutput") {
        return Err(slot_err(format!(
            "exists with plugin {plugin:?} ({slot_type:?}), the relay needs a logical pgoutput slot; drop it or configure another [postgres] slot"
        )));
    }
    if database.as_deref() != Some(current.as_str()) {
        return Err(slot_err(format!(
            "belongs to database {database:?}, not {current:?}; configure another [postgres] slot"
        )));
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(slot_err(format!(
            "has wal_status = lost: WAL it needed was removed, so events committed after {} may never reach Kafka; \
             recover by re-publishing outbox rows committed since then, then drop the slot (SELECT pg_drop_replication_slot('{slot}')), run COMMENT ON PUBLICATION {publication} IS NULL and restart the relay",
            confirmed.as_deref().unwrap_or("its last confirmed LSN")
        )));
    }
    let Some(confirmed) = confirmed else {
        // A logical slot has no confirmed position only while it is being created (another
        // replica is building its snapshot, which waits for running transactions): wait.
        if attempt < SLOT_CREATION_PATIENCE {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return Box::pin(ensure_slot(client, slot, publication, create, attempt + 1)).await;
        }
        return Err(slot_err(
            "has had no confirmed_flush_lsn for 30 s: its creation did not finish; drop it and restart the relay".into(),
        ));
    };
    let confirmed = confirmed.parse().map_err(|e| slot_err(format!("{e}")))?;
    Ok(Some(SlotState {
        confirmed_flush: confirmed,
        created: false,
    }))
}
