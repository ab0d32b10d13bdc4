//! The shutdown request as a value every waiting place can look at, and the one deadline the
//! whole stop must fit in.
//!
//! A stop is bounded by `[relay] shutdown_timeout_secs` from the signal on, whatever the relay
//! was doing: an orchestrator kills the process after its own grace period, so a stop that
//! outlives it gains nothing. The first half may go to reading the open transaction to its
//! end (its records are already on their way, so a restart need not send them again); what
//! is left goes to waiting for Kafka's acknowledgements and the final status update.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Whether, and since when, shutdown was requested.
#[derive(Debug, Clone)]
pub(super) struct Stop {
    requested: watch::Receiver<Option<Instant>>,
    timeout: Duration,
}

impl Stop {
    /// Watches `signal` on a task of its own, so the request is seen even where the relay is
    /// not polling it (e.g. while it waits for room in a full producer queue).
    pub(super) fn new(
        signal: impl Future<Output = ()> + Send + 'static,
        timeout: Duration,
    ) -> Self {
        let (tx, requested) = watch::channel(None);
        tokio::spawn(async move {
            signal.await;
            tx.send_replace(Some(Instant::now()));
            // Kept open so receivers never see the channel closed.
            tx.closed().await;
        });
        Stop { requested, timeout }
    }

    /// True once shutdown was requested.
    pub(super) fn requested(&self) -> bool {
        self.requested.borrow().is_some()
    }

    /// Resolves once shutdown is requested (at once if it already was).
    pub(super) async fn wait(&mut self) {
        if self.requested.wait_for(Option::is_some).await.is_err() {
            // The watcher task is gone only when the runtime is shutting down.
            std::future::pending::<()>().await;
        }
    }

    /// When the whole stop must be over; `None` before shutdown was requested.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.requested.borrow().map(|at| at + self.timeout)
    }

    /// Until when the open transaction may still be read: the first half of the stop.
    pub(super) fn reading_deadline(&self) -> Option<Instant> {
        self.requested.borrow().map(|at| at + self.timeout / 2)
    }

    /// Time left before the deadline (zero once it passed, the whole timeout before a request).
    pub(super) fn remaining(&self) -> Duration {
        self.deadline().map_or(self.timeout, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    /// Sleeps `d`; true if shutdown was requested meanwhile.
    pub(super) async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.wait() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_signal_and_the_reading_gets_half() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut stop = Stop::new(
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(10),
        );
        assert!(!stop.requested());
        assert_eq!(stop.remaining(), Duration::from_secs(10));
        assert!(!stop.sleep(Duration::from_secs(1)).await);
        let _ = tx.send(());
        stop.wait().await;
        let at = Instant::now();
        assert!(stop.requested());
        assert_eq!(stop.deadline(), Some(at + Duration::from_secs(10)));
        assert_eq!(stop.reading_deadline(), Some(at + Duration::from_secs(5)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(stop.remaining(), Duration::from_secs(6));
        assert!(stop.sleep(Duration::from_secs(60)).await);
    }
}
