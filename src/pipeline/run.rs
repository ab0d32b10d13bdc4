//! The relay's lifecycle: start-up checks and provisioning, the initial snapshot, then
//! streaming sessions one after another with reconnects (capped backoff with jitter), standby
//! while another instance holds the slot, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::sync::watch;

use crate::config::Config;
use crate::kafka::exactly_once::{self, ExactlyOnce};
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::mapping::message::MessageMapper;
use crate::mapping::outbox::OutboxMapper;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::AckTracker;
use crate::pipeline::end::SessionEnd;
use crate::pipeline::monitor::Monitor;
use crate::pipeline::output::{Output, Status};
use crate::pipeline::session::Session;
use crate::pipeline::setup::{self, SetupError};
use crate::pipeline::snapshot::{Outcome, Snapshot, SnapshotError};
use crate::pipeline::stop::Stop;
use crate::postgres::connect::PgEndpoint;

/// How often a standby retries acquiring the slot.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Runs the relay until `shutdown` resolves (graceful, `Ok`) or a fatal error.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
    let mut stop = Stop::new(
        shutdown,
        Duration::from_secs(config.relay.shutdown_timeout_secs),
    );
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
                    endpoint: &endpoint,
                    publisher,
                    tracker: &tracker,
                    progress: &progress,
                    metrics: &metrics,
                    health: &health,
                };
                let taken = tokio::select! {
                    taken = snapshot.take() => taken,
                    _ = stop.wait() => {
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
        if stop.sleep(pause).await {
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

    let mut session = Session {
        config: &config,
        endpoint: &endpoint,
        mapper: OutboxMapper::new(&config.outbox),
        messages: MessageMapper::new(&config.message, config.outbox.len()),
        problem,
        health: health.clone(),
        txn: None,
        commit_time: 0,
        idle_end: confirmed,
        out: Output {
            config: &config,
            tracker,
            publisher,
            progress,
            metrics: metrics.clone(),
            status: Status::new(
                Duration::from_secs(config.postgres.status_interval_secs),
                confirmed,
            ),
            events: 0,
            eos,
            stop: stop.clone(),
        },
    };
    let mut backoff = Backoff::new(max_backoff);
    let mut standby = false;
    let result = loop {
        let started = Instant::now();
        match session.run().await {
            SessionEnd::Stopped => break Ok(()),
            SessionEnd::Fatal(e) => break Err(e),
            // The session puts it into words before returning; never seen here.
            SessionEnd::Undefined(e) => break Err(e.into()),
            SessionEnd::SlotBusy(why) => {
                health.set_not_streaming(format!("standby: {why}"));
                metrics.leader.set(0);
                // Said once per standby spell: a standby may wait for days.
                if !standby {
                    tracing::info!("standby: {why}; retrying every {STANDBY_RETRY:?}");
                    standby = true;
                }
                if stop.sleep(STANDBY_RETRY).await {
                    break Ok(());
                }
            }
            SessionEnd::Released(why) => {
                standby = false;
                metrics.leader.set(0);
                metrics.sessions_released.inc();
                tracing::warn!(
                    "released the replication session: {why}; PostgreSQL can shut down or switch over meanwhile; resuming from the slot once Kafka catches up"
                );
                health.set_released(why);
                // Drained before the abort (exactly-once mode): aborting needs the broker too,
                // and would fail while it is still away. Bounded there as a commit's wait is:
                // records a broker never acknowledges (no transaction support) must not hold
                // the relay forever; the abort then purges them.
                let drained = if session.out.eos.is_some() {
                    tokio::time::timeout(exactly_once::BROKER_WAIT, session.drain()).await
                } else {
                    Ok(session.drain().await)
                };
                match drained {
                    Ok(true) => break Ok(()),
                    Ok(false) => {}
                    Err(_) => tracing::warn!(
                        "Kafka acknowledged none of the released session's records within {:?}; aborting their Kafka transaction (a broker without transaction support never does: delivery = \"exactly-once\" needs one)",
                        exactly_once::BROKER_WAIT
                    ),
                }
                if let Err(e) = session.abandon().await {
                    break Err(e);
                }
                if session.drain().await {
                    break Ok(());
                }
            }
            SessionEnd::Transient(e) => {
                standby = false;
                metrics.leader.set(0);
                metrics.reconnects.with_label_values(&["postgres"]).inc();
                if started.elapsed() > max_backoff * 2 {
                    backoff = Backoff::new(max_backoff);
                }
                let wait = backoff.next();
                tracing::warn!("{e:#}; reconnecting in {wait:?}");
                health.set_not_streaming(format!("reconnecting to PostgreSQL: {e:#}"));
                if let Err(e) = session.abandon().await {
                    break Err(e);
                }
                if session.drain().await || stop.sleep(wait).await {
                    break Ok(());
                }
            }
        }
    };
    monitor.abort();
    result
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
