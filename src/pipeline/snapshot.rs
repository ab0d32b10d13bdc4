//! The initial snapshot (`[postgres] initial_snapshot`): when the relay creates the slot,
//! it first publishes the rows already in the outbox tables, read in the snapshot that the
//! slot's creation exports, so that the snapshot and the stream together hold every event
//! once: the snapshot every transaction committed before the slot's consistent point, the
//! stream every one committed after it.
//!
//! Crash safety rests on a temporary slot: it is created with the snapshot, lives only as long
//! as its replication connection, and is copied into the permanent slot (same consistent
//! point) only after Kafka acknowledged every snapshot record. A relay that dies before the
//! copy leaves no slot behind, so the next start takes the snapshot again (duplicates, never
//! loss). The temporary slot's name is also the lock between replicas: only one can hold it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{Config, OutboxConfig};
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::mapping::outbox::OutboxMapper;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::{AckTracker, Progress, TxnId};
use crate::pipeline::handover::{reported_failure, Handover, HandoverError, Waiting, WAIT_TICK};
use crate::postgres::catalog::{self, quote_ident, quoted};
use crate::postgres::connect::PgEndpoint;
use crate::postgres::errors::{Action, Cause, PgError, IN_RECOVERY};
use crate::postgres::pgoutput::{Column, Relation};
use crate::postgres::replication::{ReplicationConnection, ReplicationError};

/// Rows fetched per round trip: memory is bounded by this many rows, not by the table.
const FETCH_ROWS: usize = 500;
/// How often a long snapshot says how far it got.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// How a snapshot attempt ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The snapshot is in Kafka and the slot exists now, streaming from this LSN.
    Created(Lsn),
    /// The slot exists already (another instance made it): no snapshot is needed.
    SlotExists,
}

/// Why a snapshot attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Another instance is taking the snapshot right now: wait and look again.
    #[error("{0}")]
    Busy(String),
    /// A connection failed; another attempt may work (and takes the snapshot again).
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help: privileges, a table that no longer fits, a refused record.
    #[error("{0}")]
    Fatal(String),
}

/// What taking the snapshot needs from the relay.
pub struct Snapshot<'c> {
    /// The configuration.
    pub config: &'c Config,
    /// Where PostgreSQL is.
    pub endpoint: &'c PgEndpoint,
    /// The producer the stream will use too, so snapshot records precede streamed ones.
    pub publisher: &'c Publisher,
    /// Counts the snapshot's records as one transaction.
    pub tracker: &'c AckTracker,
    /// Refusals reported by Kafka.
    pub progress: &'c tokio::sync::watch::Receiver<Progress>,
    /// `snapshot_events_total`.
    pub metrics: &'c Arc<Metrics>,
    /// `/readyz` says a snapshot is under way.
    pub health: &'c Health,
}

impl Snapshot<'_> {
    /// One attempt: takes the snapshot, publishes it, waits for Kafka, creates the slot.
    pub async fn take(&self) -> Result<Outcome, SnapshotError> {
        let pg = &self.config.postgres;
        let temporary = pg.snapshot_slot();
        let mut repl = ReplicationConnection::connect(self.endpoint)
            .await
            .map_err(|e| replication_error(e, "cannot open a replication connection"))?;
        let exported = match repl.create_temporary_slot(&temporary).await {
            Ok(exported) => exported,
            // Slot names are unique server-wide: the name is held by another instance.
            Err(e) if e.sqlstate() == Some(SqlState::DUPLICATE_OBJECT.code()) => {
                return Err(self.name_taken(&temporary).await)
            }
            Err(e) => {
                return Err(replication_error(
                    e,
                    &format!(
                        "cannot create the temporary slot {temporary} for the initial snapshot"
                    ),
                ))
            }
        };
        // The exported snapshot is valid only until the replication connection's next
        // command, so it is imported before anything else is sent there.
        let client = self
            .endpoint
            .connect_sql()
            .await
            .map_err(|e| sql_error(&e, "cannot connect to read the initial snapshot"))?;
        // No timeouts for this session: its transaction idles whenever Kafka applies
        // backpressure, and the first FETCH of an ordered read may sort the whole table.
        // (Through pg_settings, since transaction_timeout exists only from PostgreSQL 17 on.)
        client
            .batch_execute(
                "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN \
                 ('statement_timeout', 'idle_in_transaction_session_timeout', 'transaction_timeout')",
            )
            .await
            .map_err(|e| sql_error(&e, "cannot prepare the initial snapshot's session"))?;
        client
            .batch_execute(&format!(
                // Hex, as the stream sends bytea (a server default of 'escape' would not map).
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'; \
                 SET LOCAL bytea_output = 'hex'",
                exported.name.replace('\'', "''")
            ))
            .await
            .map_err(|e| match e.code() {
                // invalid snapshot identifier, from SET TRANSACTION SNAPSHOT: the export ended
                // before the import, which only a lost replication connection does.
                Some(&SqlState::INVALID_PARAMETER_VALUE) => SnapshotError::Transient(format!(
                    "cannot import the initial snapshot: {}",
                    PgError::from(e)
                )),
                _ => sql_error(&e, "cannot import the initial snapshot"),
            })?;
        // Imported: the walsender may let go of the export now. Its next command ends the
        // transaction that held it, which would otherwise idle for the whole snapshot (and
        // run into idle_in_transaction_session_timeout or transaction_timeout).
        repl.identify_system()
            .await
            .map_err(|e| replication_error(e, "the replication connection failed"))?;
        // An instance that finished a snapshot created the slot before its temporary slot
        // went away, so holding the temporary slot now means this check is final.
        // (pg_replication_slots is not versioned: the snapshot does not hide a new slot.)
        if catalog::read_slot(&client, &pg.slot)
            .await
            .map_err(|e| {
                sorted(
                    e,
                    &format!("cannot read replication slot {}", pg.slot),
                    SQL_PRIVILEGES,
                )
            })?
            .slot
            .is_some()
        {
            tracing::info!(slot = %pg.slot, "the slot exists already: no initial snapshot");
            let _ = repl.close().await;
            return Ok(Outcome::SlotExists);
        }
        tracing::info!(
            temporary_slot = %temporary,
            consistent_point = %exported.consistent_point,
            "initial snapshot: publishing the rows already in the outbox tables"
        );
        self.health
            .set_not_streaming("publishing the initial snapshot");
        let txn = self.tracker.begin_untimed();
        let published = self.publish_tables(&client, txn).await;
        // Closed at 0/0: the records leave the tracker once acknowledged but confirm nothing
        // themselves. Only a slot copied from this snapshot starts at its consistent point;
        // a slot someone else made may start earlier, before rows this snapshot lacks
        // (deleted after their commit), and must be streamed from there.
        self.tracker.commit(txn, Lsn(0));
        let rows = published?;
        self.acknowledged().await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| sql_error(&e, "cannot end the initial snapshot's transaction"))?;
        let copied = catalog::copy_slot(&client, &temporary, &pg.slot).await;
        let lsn = match copied {
            Ok(lsn) => lsn,
            Err(e) if e.is(&SqlState::DUPLICATE_OBJECT) => {
                // Made meanwhile by something other than a snapshotting replica (which would
                // have held the temporary slot): its stream has its own start, and what was
                // just published is duplicates of rows that are, or were, in the outbox.
                tracing::warn!(
                    slot = %pg.slot,
                    "the slot was created by someone else during the initial snapshot; using it (the {rows} snapshot records are duplicates)"
                );
                let _ = repl.close().await;
                return Ok(Outcome::SlotExists);
            }
            // The temporary slot went with its connection: this snapshot cannot be copied.
            Err(e) if e.is(&SqlState::UNDEFINED_OBJECT) => {
                return Err(SnapshotError::Transient(format!(
                    "the temporary slot {temporary} vanished before it was copied ({e}); taking the snapshot again"
                )))
            }
            Err(e) => {
                return Err(sorted(
                    e,
                    &format!("cannot copy the temporary slot {temporary} to {}", pg.slot),
                    SQL_PRIVILEGES,
                ))
            }
        };
        catalog::write_marker(&client, &pg.slot, &pg.publication, lsn).await;
        // Dropping the temporary slot only now keeps other replicas waiting until the slot
        // exists.
        let _ = repl.close().await;
        tracing::info!(
            slot = %pg.slot,
            lsn = %lsn,
            rows,
            "initial snapshot done: every row is in Kafka; created replication slot"
        );
        Ok(Outcome::Created(exported.consistent_point))
    }

    /// The temporary slot's name is taken: by another replica taking the snapshot (wait), or
    /// by a permanent slot that is not the relay's (waiting would never end).
    async fn name_taken(&self, temporary: &str) -> SnapshotError {
        let busy = || {
            SnapshotError::Busy(format!(
                "another instance is taking the initial snapshot (temporary slot {temporary} exists)"
            ))
        };
        let Ok(client) = self.endpoint.connect_sql().await else {
            return busy();
        };
        match catalog::read_slot(&client, temporary).await {
            Ok(reading) if reading.slot.as_ref().is_some_and(|s| !s.temporary) => SnapshotError::Fatal(format!(
                "replication slot {temporary} exists and is not temporary, but initial_snapshot takes its snapshot with a temporary slot of that name: drop it (SELECT pg_drop_replication_slot('{temporary}')) or configure another [postgres] slot"
            )),
            _ => busy(),
        }
    }

    /// Publishes every row of every outbox table; the number of rows.
    async fn publish_tables(&self, client: &Client, txn: TxnId) -> Result<u64, SnapshotError> {
        let mut mapper = OutboxMapper::new(&self.config.outbox);
        let mut total = 0;
        for (index, table) in self.config.outbox.iter().enumerate() {
            let relation = relation(client, table).await?;
            mapper
                .relation(&relation)
                .map_err(|e| SnapshotError::Fatal(e.to_string()))?;
            let rows = self
                .publish_table(client, txn, &mut mapper, &relation, index)
                .await?;
            tracing::info!(table = %table.table, rows, "initial snapshot: table published");
            total += rows;
        }
        Ok(total)
    }

    async fn publish_table(
        &self,
        client: &Client,
        txn: TxnId,
        mapper: &mut OutboxMapper,
        relation: &Relation,
        index: usize,
    ) -> Result<u64, SnapshotError> {
        let table = &self.config.outbox[index];
        let columns = relation
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let order = table
            .snapshot_order_by
            .as_deref()
            .map(|c| format!(" ORDER BY {}", quote_ident(c)))
            .unwrap_or_default();
        let cursor = format!("outbox_relay_snapshot_{index}");
        client
            .batch_execute(&format!(
                "DECLARE {cursor} NO SCROLL CURSOR FOR SELECT {columns} FROM {}{order}",
                quoted(table)
            ))
            .await
            .map_err(|e| sql_error(&e, &format!("cannot read outbox table {}", table.table)))?;
        let handover = Handover {
            publisher: self.publisher,
            tracker: self.tracker,
            metrics: self.metrics,
        };
        let counter = self
            .metrics
            .snapshot_events
            .with_label_values(&[&table.table]);
        let fetch = format!("FETCH {FETCH_ROWS} FROM {cursor}");
        let mut rows = 0;
        let mut logged = Instant::now();
        loop {
            let batch = client
                .simple_query(&fetch)
                .await
                .map_err(|e| sql_error(&e, &format!("cannot read outbox table {}", table.table)))?;
            let mut fetched = 0;
            for message in &batch {
                let SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                fetched += 1;
                let value = |i: usize| row.try_get(i).ok().flatten().map(str::as_bytes);
                let record = match mapper.map_columns(relation.id, value) {
                    Ok(Some(record)) => record,
                    Ok(None) => continue,
                    Err(e) => return Err(SnapshotError::Fatal(e.to_string())),
                };
                match handover
                    .deliver(&mut CheckRefusals(self.progress), txn, &record)
                    .await
                {
                    Ok(()) => {}
                    Err(HandoverError::Waiting(e)) => return Err(e),
                    Err(HandoverError::Refused(_)) => return Err(refused(self.progress)),
                }
                counter.inc();
                rows += 1;
            }
            if fetched == 0 {
                break;
            }
            if logged.elapsed() >= LOG_EVERY {
                tracing::info!(table = %table.table, rows, "initial snapshot: rows published so far");
                logged = Instant::now();
            }
        }
        Ok(rows)
    }

    /// Waits until Kafka acknowledged every record sent so far (nothing else is sending).
    async fn acknowledged(&self) -> Result<(), SnapshotError> {
        let mut waiting = CheckRefusals(self.progress);
        while self.tracker.in_flight() > 0 {
            tokio::select! {
                _ = self.publisher.space_below(0) => {}
                _ = tokio::time::sleep(WAIT_TICK) => {}
            }
            waiting.tick().await?;
        }
        waiting.tick().await
    }
}

/// While the producer's queue is full, nothing needs keeping alive (the replication
/// connection is idle between commands): only a refusal Kafka reported stops the snapshot.
struct CheckRefusals<'p>(&'p tokio::sync::watch::Receiver<Progress>);

impl Waiting for CheckRefusals<'_> {
    type Error = SnapshotError;

    async fn tick(&mut self) -> Result<(), SnapshotError> {
        match reported_failure(self.0) {
            Some(_) => Err(refused(self.0)),
            None => Ok(()),
        }
    }
}

/// The fatal error for a record Kafka refused during the snapshot.
fn refused(progress: &tokio::sync::watch::Receiver<Progress>) -> SnapshotError {
    let what = reported_failure(progress)
        .map_or_else(|| "Kafka refused a record".to_owned(), |f| f.to_string());
    SnapshotError::Fatal(format!(
        "{what} during the initial snapshot; no slot was created: fix the cause and restart (the snapshot is taken again)"
    ))
}

/// The columns the mapping reads, with their types, as the Relation message the stream
/// would announce, if the table had only those columns.
async fn relation(client: &Client, table: &OutboxConfig) -> Result<Relation, SnapshotError> {
    let wanted: Vec<&str> = table.required_columns();
    let rows = client
        .query(
            "SELECT c.oid, a.attname::text, a.atttypid, a.atttypmod FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid \
             WHERE c.oid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attname = ANY($2)",
            &[&quoted(table), &wanted],
        )
        .await
        .map_err(|e| sql_error(&e, &format!("cannot read the columns of {}", table.table)))?;
    let (schema, name) = table.schema_and_name();
    let mut columns = Vec::with_capacity(wanted.len());
    let mut id = 0;
    for column in &wanted {
        // A missing column is named by the mapper when it plans the relation.
        if let Some(row) = rows.iter().find(|r| r.get::<_, String>(1) == *column) {
            id = row.get::<_, u32>(0);
            columns.push(Column {
                flags: 0,
                name: (*column).to_owned(),
                type_oid: row.get(2),
                type_modifier: row.get(3),
            });
        }
    }
    Ok(Relation {
        id,
        namespace: schema.to_owned(),
        name: name.to_owned(),
        replica_identity: b'd',
        columns,
    })
}

/// What a refused privilege means for the snapshot's SQL session.
const SQL_PRIVILEGES: &str =
    "the relay's role needs SELECT on every outbox table and the REPLICATION attribute";
/// What a refused privilege means for the replication connection.
const REPLICATION_PRIVILEGES: &str =
    "the relay's role needs the REPLICATION attribute (ALTER ROLE <role> REPLICATION)";

/// A failed step, sorted by the one classification ([`PgError`]): another attempt (which
/// takes the snapshot again), waiting, or stopping with the fix for a refused privilege.
fn sorted(e: PgError, during: &str, privileges: &str) -> SnapshotError {
    let message = format!("{during}: {e}");
    match e.cause {
        Cause::InRecovery => SnapshotError::Fatal(format!("{IN_RECOVERY} ({message})")),
        Cause::Privilege => SnapshotError::Fatal(format!("{message}; {privileges}")),
        _ => match e.action() {
            Action::Retry => SnapshotError::Transient(message),
            Action::Standby => SnapshotError::Busy(message),
            Action::Fatal => SnapshotError::Fatal(message),
        },
    }
}

/// A failed SQL step.
fn sql_error(e: &tokio_postgres::Error, during: &str) -> SnapshotError {
    sorted(PgError::from(e), during, SQL_PRIVILEGES)
}

/// A failed replication command.
fn replication_error(e: ReplicationError, during: &str) -> SnapshotError {
    sorted(PgError::from(e), during, REPLICATION_PRIVILEGES)
}
