//! The output side of a streaming session: everything a decoded event meets on its way to
//! Kafka (exactly-once transactions, the hand-over to the producer, the acknowledgement
//! tracker) and the standby status updates that carry the confirmed LSN back to the slot.
//!
//! It is kept apart from the decode side (the mappers) because a record borrows its mapper:
//! with the two in separate fields, the session can hand a borrowed record to these `&mut`
//! methods without copying it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::kafka::exactly_once::ExactlyOnce;
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::mapping::record::Record;
use crate::ops::metrics::Metrics;
use crate::pipeline::ack::{AckTracker, Progress, TxnId};
use crate::pipeline::end::{classify, failed, txn_end, SessionEnd};
use crate::pipeline::handover::{Handover, HandoverError, Waiting};
use crate::pipeline::release;
use crate::pipeline::stop::Stop;
use crate::postgres::replication::{ReplicationError, ReplicationStream};

/// Where decoded events go, and what comes back from there.
pub(super) struct Output<'c> {
    pub(super) config: &'c Config,
    pub(super) tracker: Arc<AckTracker>,
    pub(super) publisher: Arc<Publisher>,
    pub(super) progress: watch::Receiver<Progress>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) status: Status,
    /// Events handed to Kafka by this process.
    pub(super) events: u64,
    /// Exactly-once mode's Kafka transactions; None in at-least-once mode.
    pub(super) eos: Option<ExactlyOnce>,
    /// Seen while waiting for room in the producer's queue.
    pub(super) stop: Stop,
}

/// What the server was last told, and when.
pub(super) struct Status {
    pub(super) every: Duration,
    /// Highest WAL position seen from the server.
    pub(super) received: Lsn,
    /// The confirmed LSN last sent to the server.
    pub(super) reported: Lsn,
    pub(super) last: Instant,
    /// The server asked for a reply while records waited for Kafka: a walsender at shutdown
    /// asks once and then waits for a confirmation (see `pipeline::release`). Status updates
    /// go out far more often than `wal_sender_timeout` would make it ask otherwise.
    pub(super) asked: bool,
}

impl Status {
    /// Nothing told yet; the slot stands at `confirmed`.
    pub(super) fn new(every: Duration, confirmed: Lsn) -> Self {
        Status {
            every,
            received: confirmed,
            reported: confirmed,
            last: Instant::now(),
            asked: false,
        }
    }

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

impl Output<'_> {
    /// One outbox event of `txn`: skipped when exactly-once mode already committed it, else
    /// published and counted.
    pub(super) async fn event(
        &mut self,
        stream: &mut ReplicationStream,
        txn: TxnId,
        record: &Record<'_>,
    ) -> Result<(), SessionEnd> {
        if let Some(eos) = &mut self.eos {
            if eos.skips() {
                return Ok(());
            }
            let ready = eos.before_send(&self.publisher, &self.tracker);
            let ready = release::racing(&self.tracker, self.config, &self.stop, ready).await?;
            ready.map_err(|e| txn_end(&self.progress, self.status.reported, e))?;
        }
        self.publish(stream, txn, record).await?;
        self.events += 1;
        if let Some(eos) = &mut self.eos {
            eos.sent();
        }
        Ok(())
    }

    /// Publishes one record of `txn`; a record refused for good stops the relay unless a
    /// dead-letter topic takes it.
    async fn publish(
        &mut self,
        stream: &mut ReplicationStream,
        txn: TxnId,
        record: &Record<'_>,
    ) -> Result<(), SessionEnd> {
        let handover = Handover {
            publisher: &self.publisher,
            tracker: &self.tracker,
            metrics: &self.metrics,
        };
        let mut waiting = KeepAlive {
            stream,
            status: &mut self.status,
            progress: &self.progress,
            tracker: &self.tracker,
            config: self.config,
            stop: &self.stop,
        };
        match handover.deliver(&mut waiting, txn, record).await {
            Ok(()) => Ok(()),
            Err(HandoverError::Waiting(end)) => Err(end),
            Err(HandoverError::Refused(what)) => Err(SessionEnd::Fatal(
                failed(&self.progress, self.status.reported)
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("{what}")),
            )),
        }
    }

    /// A PostgreSQL transaction `txn` (or a lone message) ended at `end`.
    pub(super) async fn commit(&mut self, txn: TxnId, end: Lsn) -> Result<(), SessionEnd> {
        self.tracker.commit(txn, end);
        if let Some(eos) = &mut self.eos {
            let done = eos.end(end, &self.publisher, &self.tracker);
            let done = release::racing(&self.tracker, self.config, &self.stop, done).await?;
            done.map_err(|e| txn_end(&self.progress, self.status.reported, e))?;
        }
        Ok(())
    }

    /// A keepalive's WAL end outside any transaction: confirm it if nothing is outstanding.
    pub(super) fn idle(&self, wal_end: Lsn) {
        self.tracker.idle(wal_end);
        if let Some(eos) = &self.eos {
            eos.idle(wal_end, &self.tracker);
        }
    }

    /// Exactly-once mode, the stream paused (`caught_up` with the server, or a tick): commit
    /// the open Kafka transaction if it should not wait any longer.
    pub(super) async fn pause(&mut self, caught_up: bool) -> Result<(), SessionEnd> {
        let Some(eos) = &mut self.eos else {
            return Ok(());
        };
        let done = eos.pause(caught_up, &self.publisher, &self.tracker);
        let done = release::racing(&self.tracker, self.config, &self.stop, done).await?;
        done.map_err(|e| txn_end(&self.progress, self.status.reported, e))
    }

    /// Exactly-once mode, the session ended: abort the open Kafka transaction.
    pub(super) async fn abandon(&mut self) -> anyhow::Result<()> {
        if let Some(eos) = &mut self.eos {
            eos.abandon(&self.publisher).await?;
        }
        Ok(())
    }

    /// Tells the server the confirmed LSN if it moved or `force`; a failure is sorted into
    /// how the session ends.
    pub(super) async fn report(
        &mut self,
        stream: &mut ReplicationStream,
        force: bool,
        during: &str,
    ) -> Result<(), SessionEnd> {
        let sent = self.status.send(stream, &self.progress, force).await;
        sent.map_err(|e| classify(e, &self.config.postgres, during))
    }

    /// A refusal Kafka reported for a record already sent, as the session's end.
    pub(super) fn refusal(&self) -> Result<(), SessionEnd> {
        failed(&self.progress, self.status.reported).map_err(SessionEnd::Fatal)
    }

    /// The tracker's counts and the LSNs, for the metrics.
    pub(super) fn update_metrics(&self) {
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

    /// The stop's last steps: finish the Kafka transaction, wait for acknowledgements, and
    /// tell the server the final confirmed LSN, all within what is left of the stop's
    /// deadline. Records still unacknowledged then are sent again after a restart.
    /// `idle_end` is the newest WAL end seen outside a transaction, confirmed if everything
    /// before it was acknowledged by then.
    pub(super) async fn stop(
        &mut self,
        stream: &mut ReplicationStream,
        idle_end: Lsn,
    ) -> anyhow::Result<()> {
        tracing::info!("stopping: waiting for Kafka to acknowledge queued records");
        if let Some(eos) = &mut self.eos {
            let finish = eos.finish(&self.publisher, &self.tracker);
            match tokio::time::timeout(self.stop.remaining(), finish).await {
                Ok(done) => done?,
                Err(_) => tracing::warn!(
                    "the open Kafka transaction did not commit within shutdown_timeout_secs; its events will be sent again after restart"
                ),
            }
        }
        if !self.publisher.flush(self.stop.remaining()).await {
            tracing::warn!(
                queued = self.publisher.queued(),
                "some records were not acknowledged within shutdown_timeout_secs; they will be sent again after restart"
            );
        }
        self.idle(idle_end);
        self.status.send(stream, &self.progress, true).await?;
        tracing::info!(confirmed = %self.status.reported, events = self.events, "stopped");
        Ok(())
    }
}

/// While the producer's queue is full the relay stops reading the socket (the walsender
/// blocks on TCP), but keeps the server from timing it out, and gives up the wait once a
/// requested stop has spent its reading half: a frozen broker must not hold the process past
/// `shutdown_timeout_secs`; nor, once Kafka has been silent for `release_session_after_secs`,
/// hold PostgreSQL's shutdown (see `pipeline::release`).
struct KeepAlive<'p> {
    stream: &'p mut ReplicationStream,
    status: &'p mut Status,
    progress: &'p watch::Receiver<Progress>,
    tracker: &'p AckTracker,
    config: &'p Config,
    stop: &'p Stop,
}

impl Waiting for KeepAlive<'_> {
    type Error = SessionEnd;

    async fn tick(&mut self) -> Result<(), SessionEnd> {
        self.status
            .send(self.stream, self.progress, false)
            .await
            .map_err(|e| classify(e, &self.config.postgres, "sending a status update failed"))?;
        failed(self.progress, self.status.reported).map_err(SessionEnd::Fatal)?;
        // The open transaction may still be read for the first half of the stop; past that,
        // the rest of the stop goes to waiting for what was sent.
        match self.stop.reading_deadline() {
            Some(until) if tokio::time::Instant::now() >= until => Err(SessionEnd::Stopped),
            // A requested stop bounds itself; it needs the socket for its last status update.
            Some(_) => Ok(()),
            None => release::due(self.tracker, self.config).map_or(Ok(()), Err),
        }
    }
}
