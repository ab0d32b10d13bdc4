//! One streaming session: the replication stream is decoded (pgoutput), mapped (outbox rows
//! and messages) and handed to the output side, whose confirmed LSN goes back to the slot as
//! standby status updates, until shutdown or an error ends it and says what the lifecycle
//! should do next.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::watch;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::mapping::message::MessageMapper;
use crate::mapping::outbox::OutboxMapper;
use crate::mapping::record::Record;
use crate::ops::metrics::Health;
use crate::pipeline::ack::TxnId;
use crate::pipeline::end::{self, classify, txn_end, Known, SessionEnd};
use crate::pipeline::output::Output;
use crate::pipeline::release;
use crate::postgres::catalog;
use crate::postgres::connect::PgEndpoint;
use crate::postgres::errors::PgError;
use crate::postgres::pgoutput::{self, Message};
use crate::postgres::replication::{
    pg_now_micros, secs_since, ReplicationConnection, ReplicationEvent, ReplicationStream,
};

/// How often the loop looks at the confirmed LSN to report it; bounds status-update chattiness.
const CONFIRM_TICK: Duration = Duration::from_millis(100);
/// How often progress is logged at info.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The decode side and the session's own state; [`Output`] is the rest.
pub(super) struct Session<'c> {
    pub(super) config: &'c Config,
    pub(super) endpoint: &'c PgEndpoint,
    pub(super) mapper: OutboxMapper,
    /// The table-less outbox's mapper (`[[message]]`).
    pub(super) messages: MessageMapper,
    /// From the monitor: a problem that stops the relay.
    pub(super) problem: watch::Receiver<Option<String>>,
    pub(super) health: std::sync::Arc<Health>,
    /// The open transaction, between Begin and Commit.
    pub(super) txn: Option<TxnId>,
    /// The open transaction's commit time (microseconds since 2000-01-01 UTC).
    pub(super) commit_time: i64,
    /// The newest keepalive WAL end seen outside a transaction: everything before it was sent.
    pub(super) idle_end: Lsn,
    pub(super) out: Output<'c>,
}

impl Session<'_> {
    /// Connects, streams until something ends the session, and says why it ended.
    pub(super) async fn run(&mut self) -> SessionEnd {
        match self.connect_and_stream().await {
            SessionEnd::Undefined(e) => {
                let known = self.known().await;
                end::undefined(e, &self.config.postgres, known)
            }
            end => end,
        }
    }

    /// Asks the catalog whether the slot and the publication exist, to tell which one an
    /// "undefined object" error was about.
    async fn known(&self) -> Known {
        let pg = &self.config.postgres;
        let Ok(client) = self.endpoint.connect_sql().await else {
            return Known {
                slot: None,
                publication: None,
                clear: None,
            };
        };
        Known {
            clear: catalog::read_guard(&client, &pg.slot, &pg.publication)
                .await
                .ok()
                .and_then(|g| g.marker)
                .map(|m| m.clear_sql(&pg.slot)),
            slot: catalog::read_slot(&client, &pg.slot)
                .await
                .ok()
                .map(|r| r.slot.is_some()),
            publication: catalog::read_publication(&client, &pg.publication)
                .await
                .ok()
                .map(|p| p.is_some()),
        }
    }

    async fn connect_and_stream(&mut self) -> SessionEnd {
        let slot = self.config.postgres.slot.as_str();
        let conn = match ReplicationConnection::connect(self.endpoint).await {
            Ok(c) => c,
            Err(e) => {
                let during = format!(
                    "cannot open a replication connection to {}",
                    self.endpoint.display_url()
                );
                return classify(e, &self.config.postgres, &during);
            }
        };
        let mut conn = conn;
        let host = conn.host().to_owned();
        if let Err(e) = self.keep_failover(&mut conn).await {
            return classify(
                e,
                &self.config.postgres,
                &format!("cannot make slot {slot} a failover slot"),
            );
        }
        let start = conn
            .start_replication(
                slot,
                &self.config.postgres.publication,
                Lsn(0),
                !self.messages.is_empty(),
            )
            .await;
        let mut stream = match start {
            Ok(s) => s,
            Err(e) => {
                return classify(
                    e,
                    &self.config.postgres,
                    &format!("cannot start replication from slot {slot}"),
                )
            }
        };
        // We hold the slot now; nobody else moves it. Never report below where it stands.
        let server_wal = match self.rebase().await {
            Ok(wal) => wal,
            Err(e) => return classify(e, &self.config.postgres, "cannot read the slot's position"),
        };
        let out = &mut self.out;
        if let Some(eos) = &mut out.eos {
            if let Err(e) = eos.start(&out.publisher, &out.tracker, server_wal).await {
                return txn_end(&out.progress, out.status.reported, e);
            }
        }
        self.health.set_streaming();
        self.out.metrics.leader.set(1);
        self.out.metrics.set_primary(&host);
        tracing::info!(
            slot,
            host,
            publication = %self.config.postgres.publication,
            resume_from = %self.out.status.reported,
            "streaming"
        );
        let end = self.stream(&mut stream).await;
        self.health.set_not_streaming("replication stream ended");
        match end {
            SessionEnd::Transient(_) => {}
            // Dropped, not closed: a goodbye could wait on a server that is not reading, and
            // closing the socket with unread data in it resets the connection, which ends the
            // walsender at once even while it is blocked sending.
            SessionEnd::Released(_) => drop(stream),
            // The socket still works: say goodbye so the slot is released at once.
            _ => {
                let _ = stream.close().await;
            }
        }
        end
    }

    /// `[postgres] failover_slot`: on a server with failover slots, makes the slot one if it is
    /// not yet (a slot created before 17, by the initial snapshot's copy, which does not keep
    /// the property, or by hand), before streaming, which it cannot be while streamed from.
    /// Another walsender holding the slot is left for START_REPLICATION to report.
    async fn keep_failover(
        &self,
        conn: &mut ReplicationConnection,
    ) -> Result<(), crate::postgres::replication::ReplicationError> {
        let pg = &self.config.postgres;
        let version = conn.server_version_num().await?;
        // A `true` the server cannot honour was refused at start; here it only decides.
        if !catalog::failover_wanted(pg.failover(), version).unwrap_or(false) {
            return Ok(());
        }
        // On the replication connection itself: it reached the primary the slot lives on.
        if !conn.slot_lacks_failover(&pg.slot).await? {
            return Ok(());
        }
        match conn.set_failover(&pg.slot).await {
            Ok(()) => {
                tracing::info!(slot = %pg.slot, "made the slot a failover slot: standbys with sync_replication_slots = on keep a copy of it");
                Ok(())
            }
            Err(e) if e.sqlstate() == Some("55006") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes the slot's confirmed position as the floor of what is reported; returns the
    /// server's current WAL position.
    async fn rebase(&mut self) -> Result<Lsn, PgError> {
        self.out.status.asked = false;
        let client = self.endpoint.connect_sql().await?;
        let reading = catalog::read_slot(&client, &self.config.postgres.slot).await?;
        let server_wal = reading.primary_wal()?;
        if let Some(lsn) = reading.slot.and_then(|s| s.confirmed_flush) {
            let out = &mut self.out;
            let before = out.tracker.confirmed();
            if lsn < before && out.tracker.restart_from(lsn) {
                tracing::warn!(
                    slot = %self.config.postgres.slot,
                    "the slot stands at {lsn}, before the {before} this relay had confirmed: the server lost the slot's latest position (a crash, or a failover to a standby whose copy of the slot lagged); resuming from the slot, so the events in between are sent again"
                );
                out.status.received = lsn;
                self.idle_end = lsn;
            }
            out.tracker.rebase(lsn);
            let confirmed = out.tracker.confirmed();
            out.status.reported = confirmed;
            out.status.received = out.status.received.max(confirmed);
            self.idle_end = self.idle_end.max(confirmed);
        }
        Ok(server_wal)
    }

    async fn stream(&mut self, stream: &mut ReplicationStream) -> SessionEnd {
        let mut tick = tokio::time::interval(CONFIRM_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_log = Instant::now();
        let mut logged = self.out.status.reported;
        let mut stop = self.out.stop.clone();
        loop {
            // On shutdown, the open transaction is read to its end (its records are already
            // on their way, so a restart need not send them again), for half the stop's time.
            if let Some(reading_until) = stop.reading_deadline() {
                if self.txn.is_none() || tokio::time::Instant::now() >= reading_until {
                    return self.stop(stream).await;
                }
            }
            let (stopping, reading_until) = (stop.requested(), stop.reading_deadline());
            let step: Result<(), SessionEnd> = tokio::select! {
                biased;
                _ = stop.wait(), if !stopping => {
                    if self.txn.is_some() {
                        tracing::info!("stopping: reading to the end of the open transaction first");
                    }
                    Ok(())
                }
                _ = tokio::time::sleep_until(reading_until.unwrap_or_else(tokio::time::Instant::now)), if stopping => Ok(()),
                _ = self.out.progress.changed() => self.out.refusal(),
                _ = self.problem.changed() => match self.problem.borrow().clone() {
                    Some(problem) => Err(SessionEnd::Fatal(anyhow!(problem))),
                    None => Ok(()),
                },
                _ = tick.tick() => {
                    // The server sends one keepalive when it catches up; if records were still
                    // in flight then, confirm its WAL end once they are acknowledged, rather
                    // than waiting ~15 s for the next one.
                    self.out.idle(self.idle_end);
                    self.out.update_metrics();
                    // Records in flight and Kafka silent: the walsender may be holding a
                    // shutdown for a confirmation that cannot come (see `pipeline::release`).
                    // While the relay reads, only when the server asked for a reply: a broker
                    // merely slow to answer one record (a topic's metadata, say) must not cost
                    // a reconnect and the records in flight sent again.
                    if self.out.tracker.in_flight() == 0 {
                        self.out.status.asked = false;
                    }
                    if !stopping && self.out.status.asked {
                        if let Some(end) = release::due(&self.out.tracker, self.config) {
                            return end;
                        }
                    }
                    let reported = self.out.status.reported;
                    if last_log.elapsed() >= LOG_EVERY && reported != logged {
                        tracing::info!(confirmed = %reported, events = self.out.events, "confirmed");
                        logged = reported;
                        last_log = Instant::now();
                    }
                    match self.out.pause(false).await {
                        Ok(()) => self.out.report(stream, false, "sending a status update failed").await,
                        Err(end) => Err(end),
                    }
                }
                event = stream.next_event() => match event {
                    Ok(event) => self.handle_burst(stream, event, stopping).await,
                    Err(e) => Err(classify(e, &self.config.postgres, "replication stream failed")),
                },
            };
            match step {
                Ok(()) => {}
                // Shutdown while waiting for room in the producer's queue.
                Err(SessionEnd::Stopped) => return self.stop(stream).await,
                Err(end) => return end,
            }
        }
    }

    /// Handles `first` and then whatever else is already buffered, up to a bound so timers
    /// and shutdown still get their turn; while stopping, only up to the open transaction's end.
    async fn handle_burst(
        &mut self,
        stream: &mut ReplicationStream,
        first: ReplicationEvent,
        stopping: bool,
    ) -> Result<(), SessionEnd> {
        const BURST: usize = 1024;
        let before = self.out.events;
        self.handle(stream, first).await?;
        for _ in 1..BURST {
            if stopping && self.txn.is_none() {
                break;
            }
            match stream.next_buffered() {
                Ok(Some(event)) => self.handle(stream, event).await?,
                Ok(None) => {
                    // Caught up with the server: nothing more to batch with for now.
                    if self.out.events != before {
                        self.out.publisher.nudge();
                    }
                    self.out.pause(true).await?;
                    break;
                }
                Err(e) => {
                    return Err(classify(
                        e,
                        &self.config.postgres,
                        "replication stream failed",
                    ))
                }
            }
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        stream: &mut ReplicationStream,
        event: ReplicationEvent,
    ) -> Result<(), SessionEnd> {
        match event {
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
            } => {
                let status = &mut self.out.status;
                status.received = status.received.max(wal_end);
                if self.txn.is_none() {
                    self.idle_end = self.idle_end.max(wal_end);
                    self.out.idle(wal_end);
                }
                if reply_requested {
                    if self.out.tracker.in_flight() > 0 {
                        self.out.status.asked = true;
                    }
                    self.out
                        .report(stream, true, "answering a keepalive failed")
                        .await?;
                }
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let status = &mut self.out.status;
                status.received = status.received.max(wal_start);
                let message = pgoutput::decode(&data).map_err(|e| {
                    SessionEnd::Fatal(anyhow!(
                        "cannot decode pgoutput message at {wal_start}: {e}"
                    ))
                })?;
                self.apply(stream, message).await?;
            }
        }
        Ok(())
    }

    async fn apply(
        &mut self,
        stream: &mut ReplicationStream,
        message: Message<'_>,
    ) -> Result<(), SessionEnd> {
        match message {
            Message::Begin {
                commit_time,
                final_lsn,
                ..
            } => {
                self.out
                    .metrics
                    .commit_to_receive_seconds
                    .observe(secs_since(commit_time));
                self.txn = Some(self.out.tracker.begin(commit_time));
                self.commit_time = commit_time;
                if let Some(eos) = &mut self.out.eos {
                    eos.begin(final_lsn);
                }
            }
            Message::Commit { end_lsn, .. } => {
                if let Some(txn) = self.txn.take() {
                    self.out.commit(txn, end_lsn).await?;
                }
            }
            Message::Relation(rel) => self
                .mapper
                .relation(&rel)
                .map_err(|e| SessionEnd::Fatal(e.into()))?,
            Message::Insert { relation_id, tuple } => {
                let Some(txn) = self.txn else {
                    return Err(SessionEnd::Fatal(anyhow!(
                        "pgoutput sent an Insert outside a transaction"
                    )));
                };
                let record = match self.mapper.map(relation_id, &tuple) {
                    Ok(Some(r)) => Record {
                        time: Some(self.commit_time),
                        ..r
                    },
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(SessionEnd::Fatal(e.into())),
                };
                self.out.event(stream, txn, &record).await?;
            }
            Message::Logical {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let time = if transactional {
                    self.commit_time
                } else {
                    pg_now_micros()
                };
                let note;
                let record = match self.messages.map(prefix, content) {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let prefix = String::from_utf8_lossy(prefix);
                        let Some(dead_letters) = &self.config.kafka.dead_letter_topic else {
                            return Err(SessionEnd::Fatal(anyhow!(
                                "logical decoding message {prefix:?} at {lsn}: {e}; the slot stays before it: fix the writer, or set [kafka] dead_letter_topic to set such messages aside there, and restart"
                            )));
                        };
                        tracing::warn!(
                            "logical decoding message {prefix:?} at {lsn}: {e}; sent it to dead_letter_topic {dead_letters} instead"
                        );
                        note = bad_message_note(&prefix, lsn, content, &e.to_string());
                        Record {
                            table: self.messages.source_of(prefix.as_bytes()),
                            topic: dead_letters,
                            key: None,
                            payload: Some(note.as_bytes()),
                            id: None,
                            kind: None,
                            extra_headers: vec![("error", Some(b"malformed envelope"))],
                            partition: None,
                            time: None,
                        }
                    }
                };
                let record = Record {
                    time: Some(time),
                    ..record
                };
                // A non-transactional message was decoded on its own, outside any transaction
                // (even one that rolled back): it is a transaction of one event, ending at its LSN.
                let (txn, alone) = match (transactional, self.txn) {
                    (true, Some(txn)) => (txn, false),
                    (true, None) => {
                        return Err(SessionEnd::Fatal(anyhow!(
                            "pgoutput sent a transactional message outside a transaction"
                        )))
                    }
                    (false, _) => (self.out.tracker.begin(time), true),
                };
                if let (true, Some(eos)) = (alone, &mut self.out.eos) {
                    // Exactly-once: a transaction of one event, known by its own LSN.
                    eos.begin_alone(lsn)
                        .map_err(|e| SessionEnd::Fatal(anyhow!(e)))?;
                }
                self.out.event(stream, txn, &record).await?;
                if alone {
                    self.out.commit(txn, lsn).await?;
                }
            }
            Message::Skipped(_) => {}
        }
        Ok(())
    }

    /// Exactly-once mode, the session ended: abort the open Kafka transaction.
    pub(super) async fn abandon(&mut self) -> anyhow::Result<()> {
        if self.out.eos.is_some() {
            // A WAL end seen while that Kafka transaction was open lies past its events; with
            // it aborted, the next session's first tick must not confirm it.
            self.idle_end = self.out.tracker.confirmed();
        }
        self.out.abandon().await
    }

    /// After a lost connection: wait for every queued record's verdict, then forget the
    /// transaction that was cut off. True if shutdown was requested meanwhile.
    pub(super) async fn drain(&mut self) -> bool {
        let mut stop = self.out.stop.clone();
        while self.out.tracker.in_flight() > 0 {
            // Kept current: a drain may last as long as a Kafka outage.
            self.out.update_metrics();
            tokio::select! {
                _ = stop.wait() => return true,
                _ = self.out.publisher.space_below(0) => {}
                _ = tokio::time::sleep(CONFIRM_TICK) => {}
            }
        }
        self.out.tracker.reset_open();
        self.txn = None;
        false
    }

    /// Shutdown: the output side's last steps, then the session ends as stopped.
    async fn stop(&mut self, stream: &mut ReplicationStream) -> SessionEnd {
        self.health.set_not_streaming("stopping");
        match self.out.stop(stream, self.idle_end).await {
            Ok(()) => SessionEnd::Stopped,
            Err(e) => SessionEnd::Fatal(e),
        }
    }
}

/// The dead letter for a message whose envelope is malformed: what, where and why, with the
/// content itself (as text, cut at 64 KiB) so that it can be looked at and sent again.
fn bad_message_note(prefix: &str, lsn: Lsn, content: &[u8], error: &str) -> String {
    const KEEP: usize = 64 * 1024;
    serde_json::json!({
        "source": format!("message:{prefix}"),
        "lsn": lsn.to_string(),
        "error": error,
        "content": String::from_utf8_lossy(&content[..content.len().min(KEEP)]),
        "content_bytes": content.len(),
    })
    .to_string()
}
