//! One streaming session: replication stream → pgoutput decoder → outbox mapping → publisher,
//! with the acknowledgement tracker's confirmed LSN fed back to the slot as standby status
//! updates, until shutdown or an error ends it and says what the lifecycle should do next.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::watch;

use crate::config::{Config, PostgresConfig, Source};
use crate::kafka::exactly_once::{ExactlyOnce, TxnError};
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::mapping::message::MessageMapper;
use crate::mapping::outbox::OutboxMapper;
use crate::mapping::record::Record;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::{AckTracker, Progress, TxnId};
use crate::pipeline::handover::{Handover, HandoverError, Waiting};
use crate::pipeline::setup;
use crate::postgres::connect::PgEndpoint;
use crate::postgres::pgoutput::{self, Message};
use crate::postgres::replication::{
    pg_now_micros, secs_since, ReplicationConnection, ReplicationError, ReplicationEvent,
    ReplicationStream,
};

/// How often the loop looks at the confirmed LSN to report it; bounds status-update chattiness.
const CONFIRM_TICK: Duration = Duration::from_millis(100);
/// How often progress is logged at info.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// How a streaming session ended.
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

pub(super) type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

pub(super) struct Pipeline<'c> {
    pub(super) config: &'c Config,
    pub(super) endpoint: &'c PgEndpoint,
    pub(super) mapper: OutboxMapper,
    /// The table-less outbox's mapper (`[[message]]`).
    pub(super) messages: MessageMapper,
    /// Every source's name and CloudEvents attributes, by `Record::table`.
    pub(super) sources: Vec<Source>,
    pub(super) tracker: Arc<AckTracker>,
    pub(super) publisher: Arc<Publisher>,
    pub(super) progress: watch::Receiver<Progress>,
    /// From the monitor: a problem that stops the relay.
    pub(super) problem: watch::Receiver<Option<String>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) status: Status,
    /// The open transaction, between Begin and Commit.
    pub(super) txn: Option<TxnId>,
    /// The open transaction's commit time (microseconds since 2000-01-01 UTC).
    pub(super) commit_time: i64,
    /// The newest keepalive WAL end seen outside a transaction: everything before it was sent.
    pub(super) idle_end: Lsn,
    pub(super) events: u64,
    /// Exactly-once mode's Kafka transactions; None in at-least-once mode.
    pub(super) eos: Option<ExactlyOnce>,
}

/// What the server was last told, and when.
pub(super) struct Status {
    pub(super) every: Duration,
    /// Highest WAL position seen from the server.
    pub(super) received: Lsn,
    /// The confirmed LSN last sent to the server.
    pub(super) reported: Lsn,
    pub(super) last: Instant,
}

impl Status {
    /// Sends a standby status update if the confirmed LSN moved, the interval passed, or `force`.
    async fn send(
        &mut self,
        stream: &mut ReplicationStream,
        progress: &watch::Receiver<Progress>,
        force: bool,
    ) -> Result<(), ReplicationError> {
        let confirmed = progress.borrow().confirmed;
        if force || confirmed != self.reported || self.last.elapsed() >= self.every {
            stream
                .send_status(self.received.max(confirmed), confirmed)
                .await?;
            self.reported = confirmed;
            self.last = Instant::now();
        }
        Ok(())
    }
}

/// Sorts a replication error into what the lifecycle does about it.
fn classify(e: ReplicationError, pg: &PostgresConfig, during: &str) -> SessionEnd {
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

impl Pipeline<'_> {
    /// Connects, streams until something ends the session, and says why it ended.
    pub(super) async fn session(&mut self, mut shutdown: Shutdown<'_>) -> SessionEnd {
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
            Err(e) => return SessionEnd::Transient(e),
        };
        if let Some(eos) = &mut self.eos {
            if let Err(e) = eos.start(&self.publisher, &self.tracker, server_wal).await {
                return txn_end(&self.progress, self.status.reported, e);
            }
        }
        self.health.set_streaming();
        self.metrics.leader.set(1);
        tracing::info!(
            slot,
            publication = %self.config.postgres.publication,
            resume_from = %self.status.reported,
            "streaming"
        );
        let end = self.stream(&mut stream, shutdown.as_mut()).await;
        self.health.set_not_streaming("replication stream ended");
        if !matches!(end, SessionEnd::Transient(_)) {
            // The socket still works: say goodbye so the slot is released at once.
            let _ = stream.close().await;
        }
        end
    }

    /// Takes the slot's confirmed position as the floor of what is reported; returns the
    /// server's current WAL position.
    async fn rebase(&mut self) -> anyhow::Result<Lsn> {
        let client = self.endpoint.connect_sql().await.map_err(setup::pg)?;
        let row = client
            .query_one(
                "SELECT (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1), \
                        pg_current_wal_lsn()::text",
                &[&self.config.postgres.slot],
            )
            .await
            .map_err(setup::pg)?;
        let server_wal: Lsn = row.try_get::<_, String>(1)?.parse()?;
        if let Some(lsn) = row.try_get::<_, Option<String>>(0)? {
            let lsn: Lsn = lsn.parse()?;
            self.tracker.rebase(lsn);
            let confirmed = self.tracker.confirmed();
            self.status.reported = confirmed;
            self.status.received = self.status.received.max(confirmed);
            self.idle_end = self.idle_end.max(confirmed);
        }
        Ok(server_wal)
    }

    async fn stream(
        &mut self,
        stream: &mut ReplicationStream,
        mut shutdown: Shutdown<'_>,
    ) -> SessionEnd {
        let mut tick = tokio::time::interval(CONFIRM_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_log = Instant::now();
        let mut logged = self.status.reported;
        // Set on shutdown while a transaction is open: finish reading it (its records are
        // already on their way) so that a restart does not send them again.
        let mut stopping: Option<tokio::time::Instant> = None;
        let mut shutdown_done = false;
        loop {
            if let Some(deadline) = stopping {
                if self.txn.is_none() || tokio::time::Instant::now() >= deadline {
                    return match self.stop(stream).await {
                        Ok(()) => SessionEnd::Stopped,
                        Err(e) => SessionEnd::Fatal(e),
                    };
                }
            }
            let step: Result<(), SessionEnd> = tokio::select! {
                biased;
                _ = &mut shutdown, if !shutdown_done => {
                    shutdown_done = true;
                    let grace = Duration::from_secs(self.config.relay.shutdown_timeout_secs);
                    if self.txn.is_some() {
                        tracing::info!("stopping: reading to the end of the open transaction first");
                    }
                    stopping = Some(tokio::time::Instant::now() + grace / 2);
                    Ok(())
                }
                _ = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now)), if stopping.is_some() => Ok(()),
                _ = self.progress.changed() => failed(&self.progress, self.status.reported).map_err(SessionEnd::Fatal),
                _ = self.problem.changed() => match self.problem.borrow().clone() {
                    Some(problem) => Err(SessionEnd::Fatal(anyhow!(problem))),
                    None => Ok(()),
                },
                _ = tick.tick() => {
                    // The server sends one keepalive when it catches up; if records were still
                    // in flight then, confirm its WAL end once they are acknowledged, rather
                    // than waiting ~15 s for the next one.
                    self.idle(self.idle_end);
                    self.update_metrics();
                    if last_log.elapsed() >= LOG_EVERY && self.status.reported != logged {
                        tracing::info!(confirmed = %self.status.reported, events = self.events, "confirmed");
                        logged = self.status.reported;
                        last_log = Instant::now();
                    }
                    match self.eos_pause(false).await {
                        Ok(()) => self
                            .status
                            .send(stream, &self.progress, false)
                            .await
                            .map_err(|e| classify(e, &self.config.postgres, "sending a status update failed")),
                        Err(end) => Err(end),
                    }
                }
                event = stream.next_event() => match event {
                    Ok(event) => self.handle_burst(stream, event, stopping.is_some()).await,
                    Err(e) => Err(classify(e, &self.config.postgres, "replication stream failed")),
                },
            };
            if let Err(end) = step {
                return end;
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
        let before = self.events;
        self.handle(stream, first).await?;
        for _ in 1..BURST {
            if stopping && self.txn.is_none() {
                break;
            }
            match stream.next_buffered() {
                Ok(Some(event)) => self.handle(stream, event).await?,
                Ok(None) => {
                    // Caught up with the server: nothing more to batch with for now.
                    if self.events != before {
                        self.publisher.nudge();
                    }
                    self.eos_pause(true).await?;
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

    fn update_metrics(&self) {
        let stats = self.tracker.stats();
        self.metrics.inflight_events.set(stats.in_flight as i64);
        let done = self.metrics.transactions.get();
        if stats.transactions > done {
            self.metrics.transactions.inc_by(stats.transactions - done);
        }
        self.metrics
            .confirmed_flush_lsn
            .set(self.status.reported.0 as i64);
        self.metrics.received_lsn.set(self.status.received.0 as i64);
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
                self.status.received = self.status.received.max(wal_end);
                if self.txn.is_none() {
                    self.idle_end = self.idle_end.max(wal_end);
                    self.idle(wal_end);
                }
                if reply_requested {
                    self.status
                        .send(stream, &self.progress, true)
                        .await
                        .map_err(|e| {
                            classify(e, &self.config.postgres, "answering a keepalive failed")
                        })?;
                }
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                self.status.received = self.status.received.max(wal_start);
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
                self.metrics
                    .commit_to_receive_seconds
                    .observe(secs_since(commit_time));
                self.txn = Some(self.tracker.begin(commit_time));
                self.commit_time = commit_time;
                if let Some(eos) = &mut self.eos {
                    eos.begin(final_lsn);
                }
            }
            Message::Commit { end_lsn, .. } => {
                if let Some(txn) = self.txn.take() {
                    self.tracker.commit(txn, end_lsn);
                }
                eos_end!(self, end_lsn);
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
                event!(self, stream, txn, &record);
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
                    (false, _) => (self.tracker.begin(time), true),
                };
                if let (true, Some(eos)) = (alone, &mut self.eos) {
                    // Exactly-once: a transaction of one event, known by its own LSN.
                    eos.begin_alone(lsn)
                        .map_err(|e| SessionEnd::Fatal(anyhow!(e)))?;
                }
                event!(self, stream, txn, &record);
                if alone {
                    self.tracker.commit(txn, lsn);
                    eos_end!(self, lsn);
                }
            }
            Message::Skipped(_) => {}
        }
        Ok(())
    }

    /// A keepalive's WAL end outside any transaction: confirm it if nothing is outstanding.
    fn idle(&self, wal_end: Lsn) {
        self.tracker.idle(wal_end);
        if let Some(eos) = &self.eos {
            eos.idle(wal_end, &self.tracker);
        }
    }

    /// Exactly-once mode, the stream paused (`caught_up` with the server, or a tick): commit
    /// the open Kafka transaction if it should not wait any longer.
    async fn eos_pause(&mut self, caught_up: bool) -> Result<(), SessionEnd> {
        let Some(eos) = &mut self.eos else {
            return Ok(());
        };
        let done = eos.pause(caught_up, &self.publisher, &self.tracker).await;
        done.map_err(|e| txn_end(&self.progress, self.status.reported, e))
    }

    /// Exactly-once mode, the session ended: abort the open Kafka transaction.
    pub(super) async fn abandon(&mut self) -> anyhow::Result<()> {
        if let Some(eos) = &mut self.eos {
            eos.abandon(&self.publisher).await?;
        }
        Ok(())
    }

    /// After a lost connection: wait for every queued record's verdict, then forget the
    /// transaction that was cut off. True if shutdown was requested meanwhile.
    pub(super) async fn drain(&mut self, mut shutdown: Shutdown<'_>) -> bool {
        loop {
            if self.tracker.in_flight() == 0 {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => return true,
                _ = self.publisher.space_below(0) => {}
                _ = tokio::time::sleep(CONFIRM_TICK) => {}
            }
        }
        self.tracker.reset_open();
        self.txn = None;
        false
    }

    async fn stop(&mut self, stream: &mut ReplicationStream) -> anyhow::Result<()> {
        self.health.set_not_streaming("stopping");
        tracing::info!("stopping: waiting for Kafka to acknowledge queued records");
        let deadline = Duration::from_secs(self.config.relay.shutdown_timeout_secs);
        if let Some(eos) = &mut self.eos {
            eos.finish(&self.publisher, &self.tracker).await?;
        }
        if !self.publisher.flush(deadline).await {
            tracing::warn!(
                queued = self.publisher.queued(),
                "some records were not acknowledged in time; they will be sent again after restart"
            );
        }
        self.idle(self.idle_end);
        self.status.send(stream, &self.progress, true).await?;
        tracing::info!(confirmed = %self.status.reported, events = self.events, "stopped");
        Ok(())
    }
}

/// While the producer's queue is full the relay stops reading the socket (the walsender
/// blocks on TCP), but keeps the server from timing it out.
struct KeepAlive<'p> {
    stream: &'p mut ReplicationStream,
    status: &'p mut Status,
    progress: &'p watch::Receiver<Progress>,
    pg: &'p PostgresConfig,
}

impl Waiting for KeepAlive<'_> {
    type Error = SessionEnd;

    async fn tick(&mut self) -> Result<(), SessionEnd> {
        self.status
            .send(self.stream, self.progress, false)
            .await
            .map_err(|e| classify(e, self.pg, "sending a status update failed"))?;
        failed(self.progress, self.status.reported).map_err(SessionEnd::Fatal)
    }
}

/// Exactly-once mode, before an event is handed over: true if it is in committed Kafka
/// transactions already (skip it); else a Kafka transaction is open for it. Field by field,
/// like [`publish`], so that the record may stay borrowed.
macro_rules! eos_skips {
    ($pipeline:expr) => {
        match &mut $pipeline.eos {
            None => false,
            Some(eos) => {
                eos.skips() || {
                    let ready = eos
                        .before_send(&$pipeline.publisher, &$pipeline.tracker)
                        .await;
                    ready
                        .map_err(|e| txn_end(&$pipeline.progress, $pipeline.status.reported, e))?;
                    false
                }
            }
        }
    };
}
use eos_skips;

/// One outbox event of `$txn`: skipped when exactly-once mode already committed it, else
/// published and counted.
macro_rules! event {
    ($pipeline:expr, $stream:expr, $txn:expr, $record:expr) => {
        if !eos_skips!($pipeline) {
            publish!($pipeline, $stream, $txn, $record)?;
            $pipeline.events += 1;
            if let Some(eos) = &mut $pipeline.eos {
                eos.sent();
            }
        }
    };
}
use event;

/// Exactly-once mode: a PostgreSQL transaction (or a lone message) ended at `$end`.
macro_rules! eos_end {
    ($pipeline:expr, $end:expr) => {
        if let Some(eos) = &mut $pipeline.eos {
            let done = eos
                .end($end, &$pipeline.publisher, &$pipeline.tracker)
                .await;
            done.map_err(|e| txn_end(&$pipeline.progress, $pipeline.status.reported, e))?;
        }
    };
}
use eos_end;

/// Publishes one record of `txn` from the pipeline's fields, borrowed one by one (not the
/// mappers, which the record borrows); a record refused for good stops the relay unless a
/// dead-letter topic takes it.
macro_rules! publish {
    ($pipeline:expr, $stream:expr, $txn:expr, $record:expr) => {{
        let handover = Handover {
            publisher: &$pipeline.publisher,
            tracker: &$pipeline.tracker,
            metrics: &$pipeline.metrics,
            config: $pipeline.config,
            sources: &$pipeline.sources,
        };
        let mut waiting = KeepAlive {
            stream: $stream,
            status: &mut $pipeline.status,
            progress: &$pipeline.progress,
            pg: &$pipeline.config.postgres,
        };
        match handover.deliver(&mut waiting, $txn, $record).await {
            Ok(()) => Ok(()),
            Err(HandoverError::Waiting(end)) => Err(end),
            Err(HandoverError::Refused(what)) => Err(SessionEnd::Fatal(
                failed(&$pipeline.progress, $pipeline.status.reported)
                    .err()
                    .unwrap_or_else(|| anyhow!("{what}")),
            )),
        }
    }};
}
use publish;

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

/// How a failed Kafka transaction step ends the session; a refused record comes first, as it
/// does in at-least-once mode.
fn txn_end(progress: &watch::Receiver<Progress>, confirmed: Lsn, e: TxnError) -> SessionEnd {
    if let Err(refused) = failed(progress, confirmed) {
        return SessionEnd::Fatal(refused);
    }
    match e {
        TxnError::Fatal(why) => SessionEnd::Fatal(anyhow!(why)),
        TxnError::Retry(why) => SessionEnd::Transient(anyhow!(why)),
    }
}

/// The fatal error for a refused record, if one was reported.
fn failed(progress: &watch::Receiver<Progress>, confirmed: Lsn) -> anyhow::Result<()> {
    if let Some(f) = &progress.borrow().failure {
        return Err(anyhow!(
            "{f}; the slot stays before this event (confirmed {confirmed}); fix the cause and restart"
        ));
    }
    Ok(())
}
