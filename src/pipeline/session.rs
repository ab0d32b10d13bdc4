//! The pipeline: replication stream → pgoutput decoder → outbox mapping → publisher, with the
//! acknowledgement tracker's confirmed LSN fed back to the slot as standby status updates.
//! Around it, the lifecycle: reconnects with backoff, standby while another instance holds
//! the slot, a monitor for slot health and Kafka reachability, and graceful shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::sync::watch;

use crate::config::{Config, PostgresConfig, Source};
use crate::kafka::exactly_once::{self, ExactlyOnce, TxnError};
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::mapping::message::MessageMapper;
use crate::mapping::outbox::{OutboxMapper, Record};
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::{AckTracker, Progress, TxnId};
use crate::pipeline::handover::{Handover, HandoverError, Waiting};
use crate::pipeline::setup::{self, SetupError};
use crate::pipeline::snapshot::{Outcome, Snapshot, SnapshotError};
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
/// How often slot health and broker reachability are polled.
const MONITOR_EVERY: Duration = Duration::from_secs(5);
/// How often a standby retries acquiring the slot.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// How a streaming session ended.
enum SessionEnd {
    /// Shutdown was requested and handled.
    Stopped,
    /// Another process holds the slot: wait and retry.
    SlotBusy(String),
    /// The connection failed in a way a reconnect may fix.
    Transient(anyhow::Error),
    /// Stop the relay.
    Fatal(anyhow::Error),
}

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// Runs the relay until `shutdown` resolves (graceful, `Ok`) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let endpoint = PgEndpoint::new(&config.postgres)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    health.set_not_streaming("starting");
    if let Some(addr) = &config.metrics.listen {
        let bound = crate::ops::http::serve(addr, metrics.clone(), health.clone())
            .await
            .with_context(|| format!("cannot listen on [metrics] listen = {addr:?}"))?;
        tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    }
    let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(shutdown);
    let max_backoff = Duration::from_secs(config.relay.reconnect_max_backoff_secs.max(1));

    // Where the tracker starts does not matter: it is moved to the slot's position below.
    let eos = ExactlyOnce::new(&config);
    let (tracker, progress, kafka) = match eos {
        None => {
            let (t, p) = AckTracker::new(Lsn(0));
            (t, p, config.kafka.clone())
        }
        Some(_) => {
            let (t, p) = AckTracker::committed_only(Lsn(0));
            (t, p, exactly_once::producer_config(&config))
        }
    };
    let sources = config.sources();
    let new_publisher = || -> anyhow::Result<Arc<Publisher>> {
        Ok(Arc::new(
            Publisher::new(
                &kafka,
                &sources,
                tracker.clone(),
                metrics.clone(),
                health.clone(),
            )
            .context("cannot create the Kafka producer")?,
        ))
    };
    // Made once the database is known to be usable (or the snapshot needs it).
    let mut publisher = None;

    // Start-up checks, and the initial snapshot when it is the relay's to take: configuration
    // problems are fatal, an unreachable server is retried.
    let mut backoff = Backoff::new(max_backoff);
    let mut standby = false;
    let confirmed = loop {
        let attempt = async {
            let admin = endpoint.connect_sql().await.map_err(SetupError::from)?;
            setup::prepare(&admin, &config).await
        };
        let pause = match attempt.await {
            Ok(Some(slot)) => break slot.confirmed_flush,
            Ok(None) => {
                let publisher = match &publisher {
                    Some(p) => p,
                    None => publisher.insert(new_publisher()?),
                };
                let snapshot = Snapshot {
                    config: &config,
                    sources: &sources,
                    endpoint: &endpoint,
                    publisher,
                    tracker: &tracker,
                    progress: &progress,
                    metrics: &metrics,
                    health: &health,
                };
                let taken = tokio::select! {
                    taken = snapshot.take() => taken,
                    _ = shutdown.as_mut() => {
                        tracing::info!("stopped during the initial snapshot; the next start takes it again");
                        return Ok(());
                    }
                };
                match taken {
                    Ok(Outcome::Created(lsn)) => break lsn,
                    // Another replica made the slot: the checks above now find it.
                    Ok(Outcome::SlotExists) => Duration::ZERO,
                    Err(SnapshotError::Busy(why)) => {
                        health.set_not_streaming(format!("standby: {why}"));
                        if !standby {
                            tracing::info!("standby: {why}; retrying every {STANDBY_RETRY:?}");
                            standby = true;
                        }
                        STANDBY_RETRY
                    }
                    Err(SnapshotError::Transient(e)) => {
                        let wait = backoff.next();
                        tracing::warn!("initial snapshot failed: {e}; retrying in {wait:?}");
                        health.set_not_streaming(format!("initial snapshot failed: {e}"));
                        metrics.reconnects.with_label_values(&["postgres"]).inc();
                        wait
                    }
                    Err(SnapshotError::Fatal(e)) => return Err(anyhow!(e)),
                }
            }
            Err(SetupError::Connect(e)) => {
                let wait = backoff.next();
                tracing::warn!(
                    "cannot connect to PostgreSQL at {}: {e}; retrying in {wait:?}",
                    endpoint.display_url()
                );
                health.set_not_streaming(format!("cannot connect to PostgreSQL: {e}"));
                metrics.reconnects.with_label_values(&["postgres"]).inc();
                wait
            }
            Err(e) => return Err(e.into()),
        };
        if sleep_or_shutdown(pause, shutdown.as_mut()).await {
            return Ok(());
        }
    };
    tracker.rebase(confirmed);
    let publisher = match publisher {
        Some(p) => p,
        None => new_publisher()?,
    };
    let (problems, problem) = watch::channel(None);
    let monitor = tokio::spawn(
        Monitor {
            endpoint: endpoint.clone(),
            config: config.clone(),
            publisher: publisher.clone(),
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            problems,
        }
        .run(),
    );

    let mut pipeline = Pipeline {
        config: &config,
        endpoint: &endpoint,
        mapper: OutboxMapper::new(&config.outbox),
        messages: MessageMapper::new(&config.message, config.outbox.len()),
        sources,
        tracker,
        publisher,
        progress,
        problem,
        metrics,
        health: health.clone(),
        status: Status {
            every: Duration::from_secs(config.postgres.status_interval_secs),
            received: confirmed,
            reported: confirmed,
            last: Instant::now(),
        },
        txn: None,
        commit_time: 0,
        idle_end: confirmed,
        events: 0,
        eos,
    };
    let mut backoff = Backoff::new(max_backoff);
    let mut standby = false;
    let result = loop {
        let started = Instant::now();
        match pipeline.session(shutdown.as_mut()).await {
            SessionEnd::Stopped => break Ok(()),
            SessionEnd::Fatal(e) => break Err(e),
            SessionEnd::SlotBusy(why) => {
                health.set_not_streaming(format!("standby: {why}"));
                pipeline.metrics.leader.set(0);
                // Said once per standby spell: a standby may wait for days.
                if !standby {
                    tracing::info!("standby: {why}; retrying every {STANDBY_RETRY:?}");
                    standby = true;
                }
                if sleep_or_shutdown(STANDBY_RETRY, shutdown.as_mut()).await {
                    break Ok(());
                }
            }
            SessionEnd::Transient(e) => {
                standby = false;
                pipeline.metrics.leader.set(0);
                pipeline
                    .metrics
                    .reconnects
                    .with_label_values(&["postgres"])
                    .inc();
                if started.elapsed() > max_backoff * 2 {
                    backoff = Backoff::new(max_backoff);
                }
                let wait = backoff.next();
                tracing::warn!("{e:#}; reconnecting in {wait:?}");
                health.set_not_streaming(format!("reconnecting to PostgreSQL: {e:#}"));
                if let Err(e) = pipeline.abandon().await {
                    break Err(e);
                }
                if pipeline.drain(shutdown.as_mut()).await
                    || sleep_or_shutdown(wait, shutdown.as_mut()).await
                {
                    break Ok(());
                }
            }
        }
    };
    monitor.abort();
    result
}

/// Sleeps `d`; true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(d: Duration, shutdown: Shutdown<'_>) -> bool {
    tokio::select! {
        _ = shutdown => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Capped exponential backoff with jitter, so replicas do not reconnect in lockstep.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(250),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter from the clock's low bits: good enough to de-synchronise, no RNG needed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
    }
}

/// Polls slot health and broker reachability for metrics and `/readyz`, and re-checks the
/// outbox tables and the publication while streaming.
struct Monitor {
    endpoint: PgEndpoint,
    config: Config,
    publisher: Arc<Publisher>,
    tracker: Arc<AckTracker>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// A problem that stops the relay: a table or the publication no longer fits the config.
    problems: watch::Sender<Option<String>>,
}

impl Monitor {
    async fn run(self) {
        let stall_after = Duration::from_secs(self.config.relay.stall_timeout_secs);
        let mut client = None;
        let mut tick = tokio::time::interval(MONITOR_EVERY);
        loop {
            tick.tick().await;
            let stats = self.tracker.stats();
            self.health.set_stalled(match stats.oldest_wait {
                Some(w) if w > stall_after => Some(format!(
                    "the oldest of {} records has waited {} s for Kafka's acknowledgement",
                    stats.in_flight,
                    w.as_secs()
                )),
                _ => None,
            });
            match self.publisher.probe(Duration::from_secs(5)).await {
                Ok(()) => {
                    if self.health.set_broker(true, "") {
                        self.metrics.reconnects.with_label_values(&["kafka"]).inc();
                    }
                }
                Err(e) => {
                    self.health.set_broker(false, e);
                }
            }
            if client.is_none() {
                client = self.endpoint.connect_sql().await.ok();
            }
            let Some(c) = &client else { continue };
            if let Err(e) = self.slot_health(c).await {
                tracing::debug!("slot monitor query failed: {e}");
                client = None;
                continue;
            }
            match self.outbox_still_published(c).await {
                Ok(()) => {}
                Err(SetupError::Postgres(e) | SetupError::Connect(e)) => {
                    tracing::debug!("publication check failed: {e}");
                    client = None;
                }
                Err(e) => {
                    self.problems.send_replace(Some(e.to_string()));
                }
            }
        }
    }

    async fn slot_health(&self, c: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
        let row = c
            .query_opt(
                "SELECT wal_status, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.postgres.slot],
            )
            .await?;
        match row {
            Some(row) => {
                let status: Option<String> = row.get(0);
                self.metrics
                    .set_wal_status(Some(status.as_deref().unwrap_or("missing")));
                if let Some(lag) = row.get::<_, Option<i64>>(1) {
                    self.metrics.replication_lag_bytes.set(lag.max(0));
                }
            }
            None => self.metrics.set_wal_status(None),
        }
        Ok(())
    }

    /// The start-up checks of the tables and the publication, again: a table renamed, swapped
    /// for a new one or dropped from the publication while the relay runs would otherwise go
    /// unnoticed while its new rows never enter the stream.
    async fn outbox_still_published(&self, c: &tokio_postgres::Client) -> Result<(), SetupError> {
        for table in &self.config.outbox {
            setup::check_table(c, table).await?;
        }
        if !setup::check_publication(c, &self.config).await? {
            return Err(SetupError::PublicationDropped(
                self.config.postgres.publication.clone(),
            ));
        }
        Ok(())
    }
}

struct Pipeline<'c> {
    config: &'c Config,
    endpoint: &'c PgEndpoint,
    mapper: OutboxMapper,
    /// The table-less outbox's mapper (`[[message]]`).
    messages: MessageMapper,
    /// Every source's name and CloudEvents attributes, by `Record::table`.
    sources: Vec<Source>,
    tracker: Arc<AckTracker>,
    publisher: Arc<Publisher>,
    progress: watch::Receiver<Progress>,
    /// From the monitor: a problem that stops the relay.
    problem: watch::Receiver<Option<String>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: Status,
    /// The open transaction, between Begin and Commit.
    txn: Option<TxnId>,
    /// The open transaction's commit time (microseconds since 2000-01-01 UTC).
    commit_time: i64,
    /// The newest keepalive WAL end seen outside a transaction: everything before it was sent.
    idle_end: Lsn,
    events: u64,
    /// Exactly-once mode's Kafka transactions; None in at-least-once mode.
    eos: Option<ExactlyOnce>,
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
    async fn session(&mut self, mut shutdown: Shutdown<'_>) -> SessionEnd {
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
                        time: self.commit_time,
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
                            table: self
                                .messages
                                .source_of(prefix.as_bytes())
                                .unwrap_or(usize::MAX),
                            topic: dead_letters,
                            key: None,
                            payload: Some(note.as_bytes()),
                            id: None,
                            kind: None,
                            extra_headers: vec![("error", Some(b"malformed envelope"))],
                            partition: None,
                            time: 0,
                        }
                    }
                };
                let record = Record { time, ..record };
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
    async fn abandon(&mut self) -> anyhow::Result<()> {
        if let Some(eos) = &mut self.eos {
            eos.abandon(&self.publisher).await?;
        }
        Ok(())
    }

    /// After a lost connection: wait for every queued record's verdict, then forget the
    /// transaction that was cut off. True if shutdown was requested meanwhile.
    async fn drain(&mut self, mut shutdown: Shutdown<'_>) -> bool {
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

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        assert!(waits[0] <= Duration::from_millis(250));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(4)));
        assert!(waits[7] >= Duration::from_secs(2));
    }
}
