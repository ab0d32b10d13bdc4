//! The monitor: polls slot health and broker reachability for metrics and `/readyz` while the
//! relay runs, and re-checks the server, the outbox tables and the publication so that a
//! change made under a running relay (a table swapped, a failover that left it on a standby)
//! stops it instead of silently starving it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::kafka::producer::Publisher;
use crate::kafka::replicas::Replicas;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::AckTracker;
use crate::pipeline::setup::{self, SetupError};
use crate::postgres::catalog;
use crate::postgres::connect::PgEndpoint;
use crate::postgres::errors::{Cause, PgError};

/// How often slot health and broker reachability are polled.
const MONITOR_EVERY: Duration = Duration::from_secs(5);

/// Polls slot health and broker reachability for metrics and `/readyz`, and re-checks the
/// outbox tables and the publication while streaming.
pub(super) struct Monitor {
    pub(super) endpoint: PgEndpoint,
    pub(super) config: Config,
    pub(super) publisher: Arc<Publisher>,
    pub(super) tracker: Arc<AckTracker>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    /// A problem that stops the relay: a table or the publication no longer fits the config.
    pub(super) problems: watch::Sender<Option<String>>,
}

impl Monitor {
    pub(super) async fn run(self) {
        let stall_after = Duration::from_secs(self.config.relay.stall_timeout_secs);
        let mut client = None;
        let mut replicas = Replicas::new(&self.config.kafka);
        let mut tick = tokio::time::interval(MONITOR_EVERY);
        loop {
            tick.tick().await;
            let stats = self.tracker.stats();
            let stalled = match stats.oldest_wait {
                Some(w) if w > stall_after => {
                    let waited = format!(
                        "the oldest of {} records has waited {} s for Kafka's acknowledgement",
                        stats.in_flight,
                        w.as_secs()
                    );
                    // Unreachable brokers are their own reason (see the probe below).
                    let why = if self.health.broker_down() {
                        None
                    } else {
                        let topics = self.publisher.topics();
                        replicas
                            .why_unacknowledged(&topics, Duration::from_secs(3))
                            .await
                    };
                    Some(match why {
                        Some(why) => format!("{waited}: {why}"),
                        None => waited,
                    })
                }
                _ => None,
            };
            self.health.set_stalled(stalled);
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
            match self.slot_health(c).await {
                Ok(()) => {}
                // No later poll fixes that: say it instead of polling a standby forever.
                Err(e) if e.cause == Cause::InRecovery => {
                    self.problems.send_replace(Some(e.to_string()));
                    continue;
                }
                Err(e) => {
                    tracing::debug!("slot monitor query failed: {e}");
                    client = None;
                    continue;
                }
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

    async fn slot_health(&self, c: &tokio_postgres::Client) -> Result<(), PgError> {
        let reading = catalog::read_slot(c, &self.config.postgres.slot).await?;
        reading.primary_wal()?;
        match &reading.slot {
            Some(slot) => {
                self.metrics
                    .set_wal_status(Some(slot.wal_status.as_deref().unwrap_or("missing")));
                if let Some(lag) = reading.lag_bytes() {
                    self.metrics.replication_lag_bytes.set(lag.max(0));
                }
                self.metrics
                    .slot_failover
                    .set(slot.failover.map_or(-1, i64::from));
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
        if setup::check_publication(c, &self.config).await?.is_none() {
            return Err(SetupError::PublicationDropped(
                self.config.postgres.publication.clone(),
            ));
        }
        Ok(())
    }
}
