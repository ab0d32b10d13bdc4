//! The monitor: polls slot health and broker reachability for metrics and `/readyz` while the
//! relay runs, and re-checks the outbox tables and the publication so that a change made under
//! a running relay stops it instead of silently starving it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::kafka::producer::Publisher;
use crate::ops::metrics::{Health, Metrics};
use crate::pipeline::ack::AckTracker;
use crate::pipeline::setup::{self, SetupError};
use crate::postgres::connect::PgEndpoint;

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
