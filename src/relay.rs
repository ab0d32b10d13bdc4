//! The pipeline: replication stream → pgoutput decoder → outbox mapping → publisher, with the
//! acknowledgement tracker's confirmed LSN fed back to the slot as standby status updates.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::ack::{AckTracker, Progress, TxnId};
use crate::config::Config;
use crate::lsn::Lsn;
use crate::outbox::OutboxMapper;
use crate::pgconn::PgEndpoint;
use crate::pgoutput::{self, Message};
use crate::publisher::{Publisher, SendError};
use crate::replication::{ReplicationConnection, ReplicationEvent, ReplicationStream};
use crate::setup;

/// How often the loop looks at the confirmed LSN to report it; bounds status-update chattiness.
const CONFIRM_TICK: Duration = Duration::from_millis(100);
/// How long a graceful stop waits for Kafka to acknowledge what is queued.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);
/// How often progress is logged at info.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Runs the relay until `shutdown` resolves (graceful, `Ok`) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let endpoint = PgEndpoint::new(&config.postgres)?;
    let admin = endpoint
        .connect_sql()
        .await
        .map_err(setup::pg)
        .with_context(|| format!("cannot connect to PostgreSQL at {}", endpoint.display_url()))?;
    let slot = setup::prepare(&admin, &config).await?;
    drop(admin);

    let (tracker, progress) = AckTracker::new(slot.confirmed_flush);
    let publisher = Arc::new(
        Publisher::new(&config.kafka, tracker.clone())
            .context("cannot create the Kafka producer")?,
    );

    let mut conn = ReplicationConnection::connect(&endpoint)
        .await
        .with_context(|| {
            format!(
                "cannot open a replication connection to {}",
                endpoint.display_url()
            )
        })?;
    let system = conn.identify_system().await?;
    let stream = conn
        .start_replication(&config.postgres.slot, &config.postgres.publication, Lsn(0))
        .await
        .with_context(|| {
            format!(
                "cannot start replication from slot {}",
                config.postgres.slot
            )
        })?;
    tracing::info!(
        slot = %config.postgres.slot,
        publication = %config.postgres.publication,
        resume_from = %slot.confirmed_flush,
        server_wal = %system.xlog_pos,
        "streaming"
    );

    let mut pipeline = Pipeline {
        stream,
        mapper: OutboxMapper::new(&config.outbox),
        tracker,
        publisher,
        progress,
        status: Status {
            every: Duration::from_secs(config.postgres.status_interval_secs),
            received: slot.confirmed_flush,
            reported: slot.confirmed_flush,
            last: Instant::now(),
        },
        txn: None,
        idle_end: slot.confirmed_flush,
        events: 0,
    };
    pipeline.run(shutdown).await
}

struct Pipeline {
    stream: ReplicationStream,
    mapper: OutboxMapper,
    tracker: Arc<AckTracker>,
    publisher: Arc<Publisher>,
    progress: watch::Receiver<Progress>,
    status: Status,
    /// The open transaction, between Begin and Commit.
    txn: Option<TxnId>,
    /// The newest keepalive WAL end seen outside a transaction: everything before it was sent.
    idle_end: Lsn,
    events: u64,
}

/// What the server was last told, and when.
struct Status {
    every: Duration,
    /// Highest WAL position seen from the server.
    received: Lsn,
    /// The confirmed LSN last sent to the server.
    reported: Lsn,
    last: Instant,
}

impl Status {
    /// Sends a standby status update if the confirmed LSN moved, the interval passed, or `force`.
    async fn send(
        &mut self,
        stream: &mut ReplicationStream,
        progress: &watch::Receiver<Progress>,
        force: bool,
    ) -> anyhow::Result<()> {
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

impl Pipeline {
    async fn run(&mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(CONFIRM_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_log = Instant::now();
        let mut logged = self.status.reported;
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return self.stop().await,
                _ = self.progress.changed() => self.check_failure()?,
                _ = tick.tick() => {
                    // The server sends one keepalive when it catches up; if records were still
                    // in flight then, confirm its WAL end once they are acknowledged, rather
                    // than waiting ~15 s for the next one.
                    self.tracker.idle(self.idle_end);
                    self.report(false).await?;
                    if last_log.elapsed() >= LOG_EVERY && self.status.reported != logged {
                        tracing::info!(confirmed = %self.status.reported, events = self.events, "confirmed");
                        logged = self.status.reported;
                        last_log = Instant::now();
                    }
                }
                event = self.stream.next_event() => {
                    let event = event.context("replication stream failed")?;
                    self.handle(event).await?;
                }
            }
        }
    }

    fn check_failure(&self) -> anyhow::Result<()> {
        failed(&self.progress, self.status.reported)
    }

    async fn report(&mut self, force: bool) -> anyhow::Result<()> {
        self.status
            .send(&mut self.stream, &self.progress, force)
            .await
    }

    async fn handle(&mut self, event: ReplicationEvent) -> anyhow::Result<()> {
        match event {
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.status.received = self.status.received.max(wal_end);
                if self.txn.is_none() {
                    self.idle_end = self.idle_end.max(wal_end);
                    self.tracker.idle(wal_end);
                }
                if reply_requested {
                    self.report(true).await?;
                }
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                self.status.received = self.status.received.max(wal_start);
                let message = pgoutput::decode(&data)
                    .with_context(|| format!("cannot decode pgoutput message at {wal_start}"))?;
                self.apply(message).await?;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, message: Message<'_>) -> anyhow::Result<()> {
        match message {
            Message::Begin { .. } => self.txn = Some(self.tracker.begin()),
            Message::Commit { end_lsn, .. } => {
                if let Some(txn) = self.txn.take() {
                    self.tracker.commit(txn, end_lsn);
                }
            }
            Message::Relation(rel) => self.mapper.relation(&rel)?,
            Message::Insert { relation_id, tuple } => {
                let Some(txn) = self.txn else {
                    bail!("pgoutput sent an Insert outside a transaction");
                };
                let Some(record) = self.mapper.map(relation_id, &tuple)? else {
                    return Ok(());
                };
                self.tracker.sending(txn);
                loop {
                    match self.publisher.send(txn, &record) {
                        Ok(()) => break,
                        Err(SendError::QueueFull) => {
                            // Backpressure: stop reading the socket (the walsender blocks on
                            // TCP) but keep the server from timing us out.
                            tokio::select! {
                                _ = self.publisher.space() => {}
                                _ = tokio::time::sleep(CONFIRM_TICK) => {}
                            }
                            self.status
                                .send(&mut self.stream, &self.progress, false)
                                .await?;
                            failed(&self.progress, self.status.reported)?;
                        }
                        Err(SendError::Refused(failure)) => {
                            self.tracker.delivered(txn, Err(failure));
                            failed(&self.progress, self.status.reported)?;
                            bail!("Kafka refused a record");
                        }
                    }
                }
                self.events += 1;
            }
            Message::Skipped(_) => {}
        }
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        tracing::info!("stopping: waiting for Kafka to acknowledge queued records");
        let flushed = self.publisher.flush(SHUTDOWN_FLUSH).await;
        if !flushed {
            tracing::warn!(
                queued = self.publisher.queued(),
                "some records were not acknowledged in time; they will be sent again after restart"
            );
        }
        self.report(true).await?;
        tracing::info!(confirmed = %self.status.reported, events = self.events, "stopped");
        Ok(())
    }
}

/// The fatal error for a refused record, if one was reported.
fn failed(progress: &watch::Receiver<Progress>, confirmed: Lsn) -> anyhow::Result<()> {
    if let Some(f) = &progress.borrow().failure {
        bail!("{f}; the slot stays before this event (confirmed {confirmed}); fix the cause and restart");
    }
    Ok(())
}
