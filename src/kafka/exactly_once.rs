//! Exactly-once mode (`[kafka] delivery = "exactly-once"`): the records of one or more
//! PostgreSQL transactions go to Kafka in one Kafka transaction, whose last record is the
//! position it reaches (in the manner of Kafka Connect's exactly-once sources, KIP-618).
//! Consumers reading with `isolation.level=read_committed` see a Kafka transaction's records
//! only once it committed, together with its position; on start the relay reads the last
//! committed position back ([`crate::kafka::position`]) and skips what it already wrote.
//!
//! A position names the PostgreSQL transaction being read when the Kafka transaction was
//! committed by its commit LSN (Begin's `final_lsn`, unique and in commit order) and how many
//! of its events were written, so a PostgreSQL transaction larger than
//! `transaction_max_events` is split across Kafka transactions and resumes at the right event.
//! The slot is confirmed only up to the end of the last PostgreSQL transaction wholly inside
//! committed Kafka transactions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::{Config, Delivery, ExactlyOnceSettings, KafkaConfig};
use crate::kafka::position::{self, Position};
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::pipeline::ack::AckTracker;

/// Bound on each call that waits for the brokers (init, commit, abort), and on the wait for a
/// released session's records before their transaction is aborted.
pub const BROKER_WAIT: Duration = Duration::from_secs(30);

/// Why a Kafka transaction step failed, sorted by what the relay does next.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The producer is unusable (fenced, not authorised, no transactions): stop the relay.
    #[error("{0}")]
    Fatal(String),
    /// The open transaction was aborted or never began: restart streaming from the committed
    /// position.
    #[error("{0}")]
    Retry(String),
}

/// The producer's `[kafka]`: in exactly-once mode the same, with the transactional id.
pub fn producer_config(config: &Config) -> KafkaConfig {
    let mut kafka = config.kafka.clone();
    if let Some(settings) = config.kafka.exactly_once() {
        kafka
            .properties
            .insert("transactional.id".into(), settings.transactional_id.clone());
    }
    kafka
}

/// The PostgreSQL transaction being read.
#[derive(Debug, Clone, Copy)]
struct PgTxn {
    final_lsn: Lsn,
    /// Outbox events of it handled so far (written or skipped).
    events: u64,
    /// Its first this many events are in committed Kafka transactions already.
    skip: u64,
}

/// The open Kafka transaction.
#[derive(Debug, Clone, Copy)]
struct Open {
    started: Instant,
    records: u64,
}

/// Drives the Kafka transactions of one relay: when to begin and commit them, the position
/// records, and which events a restart skips. Called by the pipeline at each step.
pub struct ExactlyOnce {
    kafka: KafkaConfig,
    /// The transactional id (also the position records' key), the offsets topic and the
    /// bounds of a Kafka transaction.
    settings: ExactlyOnceSettings,
    /// `init_transactions` done and the position read.
    started: bool,
    committed: Position,
    pg: Option<PgTxn>,
    /// The last PostgreSQL transaction whose Commit was read: (commit LSN, events).
    last_pg: (Lsn, u64),
    /// End LSN of that transaction: everything before it was read.
    last_end: Lsn,
    open: Option<Open>,
}

impl ExactlyOnce {
    /// The driver for `config`, or None in at-least-once mode.
    pub fn new(config: &Config) -> Option<ExactlyOnce> {
        let Delivery::ExactlyOnce(settings) = &config.kafka.delivery else {
            return None;
        };
        Some(ExactlyOnce {
            kafka: config.kafka.clone(),
            settings: settings.clone(),
            started: false,
            committed: Position::default(),
            pg: None,
            last_pg: (Lsn(0), 0),
            last_end: Lsn(0),
            open: None,
        })
    }

    /// Once per process, after the slot is ours: fences older producers with our
    /// transactional id and reads the committed position back; `server_wal` is the
    /// database's current WAL position, which a position written against it never passes.
    pub async fn start(
        &mut self,
        publisher: &Arc<Publisher>,
        tracker: &AckTracker,
        server_wal: Lsn,
    ) -> Result<(), TxnError> {
        if self.started {
            return Ok(());
        }
        // Before the position is read: init_transactions completes our previous
        // transaction, which the reader relies on (see position::read_back).
        publisher
            .init_transactions(BROKER_WAIT)
            .await
            .map_err(|e| self.classify(&e, "registering the transactional id"))?;
        let kafka = self.kafka.clone();
        let topic = self.settings.offsets_topic.clone();
        let key = self.settings.transactional_id.clone();
        let back = tokio::task::spawn_blocking(move || position::read_back(&kafka, &topic, &key))
            .await
            .map_err(|e| TxnError::Retry(format!("reading the position failed: {e}")))?
            .map_err(|e| {
                if e.is_fatal() {
                    TxnError::Fatal(e.to_string())
                } else {
                    TxnError::Retry(e.to_string())
                }
            })?;
        let (topic, key) = (
            &self.settings.offsets_topic,
            &self.settings.transactional_id,
        );
        match back.found {
            Some((position, offset)) => {
                if position.commit_lsn.max(position.confirm_lsn) > server_wal {
                    // Written against another database, or this one before a restore rewound
                    // its WAL: resuming after it would skip this history's events up to there.
                    return Err(TxnError::Fatal(format!(
                        "{topic} holds a position (commit {}, confirmed {}) past this server's WAL ({server_wal}) for transactional id {key}: it belongs to another database or to WAL before a restore, and resuming from it would skip events; set a new [kafka] transactional_id (or offsets_topic) and restart",
                        position.commit_lsn, position.confirm_lsn
                    )));
                }
                tracing::info!(
                    commit_lsn = %position.commit_lsn,
                    events = position.events,
                    complete = position.complete,
                    confirm_lsn = %position.confirm_lsn,
                    offset,
                    records_read = back.records_read,
                    windows = back.windows,
                    "exactly-once: resuming after the committed position in {topic}"
                );
                self.committed = position;
                self.last_end = self.last_end.max(position.confirm_lsn);
                tracker.confirm_committed(position.confirm_lsn);
            }
            None => tracing::info!(
                records_read = back.records_read,
                windows = back.windows,
                "exactly-once: {topic} holds no position for transactional id {key}; starting at the slot"
            ),
        }
        // Retention deletes the position of a relay that wrote nothing for longer than it;
        // a restart then finds none and resends a PostgreSQL transaction written in part.
        if let Some(policy) = position::cleanup_policy(&self.kafka, topic).await {
            if policy.contains("delete") {
                tracing::warn!(
                    "{topic} has cleanup.policy={policy}: Kafka deletes the committed position once the relay has written nothing for longer than the topic's retention, and a restart without it resends a PostgreSQL transaction that was written in part; make it compacted: kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact"
                );
            }
        }
        self.started = true;
        Ok(())
    }

    /// A PostgreSQL transaction begins (pgoutput Begin).
    pub fn begin(&mut self, final_lsn: Lsn) {
        let c = &self.committed;
        let skip = if final_lsn < c.commit_lsn || (final_lsn == c.commit_lsn && c.complete) {
            u64::MAX
        } else if final_lsn == c.commit_lsn {
            c.events
        } else {
            0
        };
        self.pg = Some(PgTxn {
            final_lsn,
            events: 0,
            skip,
        });
    }

    /// A non-transactional logical decoding message, decoded on its own at `lsn`: a
    /// transaction of one event, known by its LSN. pgoutput sends none inside a transaction;
    /// if it did, the position could not name it, so that is an error.
    pub fn begin_alone(&mut self, lsn: Lsn) -> Result<(), String> {
        if self.pg.is_some() {
            return Err(format!(
                "a non-transactional logical decoding message at {lsn} arrived inside a transaction, which delivery = \"exactly-once\" cannot place; use transactional messages (pg_logical_emit_message(true, ...))"
            ));
        }
        self.begin(lsn);
        Ok(())
    }

    /// Whether the next outbox event is in Kafka already; if so it counts as handled.
    pub fn skips(&mut self) -> bool {
        match &mut self.pg {
            Some(pg) if pg.events < pg.skip => {
                pg.events += 1;
                true
            }
            _ => false,
        }
    }

    /// Before an event is handed to the producer: commits the open Kafka transaction if it
    /// is full or old (even inside a PostgreSQL transaction), and makes sure one is open.
    pub async fn before_send(
        &mut self,
        publisher: &Arc<Publisher>,
        tracker: &AckTracker,
    ) -> Result<(), TxnError> {
        if self.full() {
            self.commit(publisher, tracker).await?;
        }
        if self.open.is_none() {
            publisher
                .begin_transaction()
                .map_err(|e| self.classify(&e, "beginning a Kafka transaction"))?;
            self.open = Some(Open {
                started: Instant::now(),
                records: 0,
            });
        }
        Ok(())
    }

    /// An event was handed to the producer.
    pub fn sent(&mut self) {
        if let Some(pg) = &mut self.pg {
            pg.events += 1;
        }
        if let Some(open) = &mut self.open {
            open.records += 1;
        }
    }

    /// A PostgreSQL transaction ended (pgoutput Commit at `end_lsn`); commits the Kafka
    /// transaction if it is full or old.
    pub async fn end(
        &mut self,
        end_lsn: Lsn,
        publisher: &Arc<Publisher>,
        tracker: &AckTracker,
    ) -> Result<(), TxnError> {
        if let Some(pg) = self.pg.take() {
            self.last_pg = (pg.final_lsn, pg.events);
        }
        self.last_end = self.last_end.max(end_lsn);
        if self.open.is_none() {
            // Nothing of it to write (no outbox rows, or all written before): confirm it.
            tracker.confirm_committed(self.last_end);
        } else if self.full() {
            self.commit(publisher, tracker).await?;
        }
        Ok(())
    }

    /// The stream paused: the relay `caught_up` with the server, or a timer ticked. Commits
    /// the open Kafka transaction if caught up between PostgreSQL transactions (rather than
    /// keep it waiting for more), or once it is full or old even inside one, so that a stream
    /// stalled mid-transaction never lets the broker's `transaction.timeout.ms` abort it.
    pub async fn pause(
        &mut self,
        caught_up: bool,
        publisher: &Arc<Publisher>,
        tracker: &AckTracker,
    ) -> Result<(), TxnError> {
        let between = caught_up && self.pg.is_none();
        if self.open.is_some() && (between || self.full()) {
            self.commit(publisher, tracker).await?;
        }
        Ok(())
    }

    /// A keepalive's WAL end outside any PostgreSQL transaction: with no Kafka transaction
    /// open, everything before it is committed or had nothing to write.
    pub fn idle(&self, wal_end: Lsn, tracker: &AckTracker) {
        if self.pg.is_none() && self.open.is_none() {
            tracker.confirm_committed(wal_end);
        }
    }

    /// Commits the open Kafka transaction, if any (graceful stop).
    pub async fn finish(
        &mut self,
        publisher: &Arc<Publisher>,
        tracker: &AckTracker,
    ) -> Result<(), TxnError> {
        if self.open.is_some() {
            self.commit(publisher, tracker).await?;
        }
        Ok(())
    }

    /// The session ended: abort the open Kafka transaction, so the events it held are sent
    /// again from the committed position.
    pub async fn abandon(&mut self, publisher: &Arc<Publisher>) -> Result<(), TxnError> {
        self.forget_uncommitted();
        if self.open.take().is_some() {
            self.abort(publisher).await?;
        }
        Ok(())
    }

    /// Forgets what was read after the committed position: the next session reads it again.
    /// Left in place, the end of a PostgreSQL transaction whose events were in the aborted
    /// Kafka transaction would be confirmed by the next commit (or by a transaction without
    /// events), before its events are written again: a crash then would lose them.
    fn forget_uncommitted(&mut self) {
        self.pg = None;
        let c = self.committed;
        self.last_pg = (c.commit_lsn, c.events);
        self.last_end = c.confirm_lsn;
    }

    fn full(&self) -> bool {
        self.open.is_some_and(|o| {
            o.records >= self.settings.transaction_max_events.get()
                || o.started.elapsed() >= self.settings.transaction_max_age
        })
    }

    /// Where the open Kafka transaction reaches if committed now.
    fn reached(&self) -> Position {
        let records = self.open.map_or(0, |o| o.records);
        match self.pg {
            Some(pg) => Position {
                commit_lsn: pg.final_lsn,
                events: pg.events,
                complete: false,
                confirm_lsn: self.last_end,
                records,
            },
            None => Position {
                commit_lsn: self.last_pg.0,
                events: self.last_pg.1,
                complete: true,
                confirm_lsn: self.last_end,
                records,
            },
        }
    }

    async fn commit(
        &mut self,
        publisher: &Arc<Publisher>,
        tracker: &AckTracker,
    ) -> Result<(), TxnError> {
        let position = self.reached();
        // Every record acknowledged before the position is written: commit would wait for
        // them anyway, and a record refused for good is then seen before anything commits.
        // (It also keeps the position from reaching the broker before the events it covers,
        // which matters on a broker without isolation, see tests/exactly_once.rs.)
        let deadline = Instant::now() + BROKER_WAIT;
        while tracker.in_flight() > 0 {
            if Instant::now() >= deadline {
                self.open = None;
                self.abort(publisher).await?;
                return Err(TxnError::Retry(format!(
                    "Kafka acknowledged the transaction's records not within {BROKER_WAIT:?}; aborted it (a broker without transaction support never does: delivery = \"exactly-once\" needs one)"
                )));
            }
            tokio::select! {
                _ = publisher.space_below(0) => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        if tracker.has_failed() {
            return Err(TxnError::Retry("a record was refused".into()));
        }
        let acked = Instant::now();
        let value = position.to_json();
        let (topic, key) = (
            &self.settings.offsets_topic,
            &self.settings.transactional_id,
        );
        if let Err(e) = publisher.send_position(topic, key.as_bytes(), value.as_bytes()) {
            self.open = None;
            self.abort(publisher).await?;
            return Err(TxnError::Retry(format!(
                "cannot queue the position record for {topic}: {e}"
            )));
        }
        publisher.position_delivered(BROKER_WAIT).await;
        loop {
            match publisher.commit_transaction(BROKER_WAIT).await {
                Ok(()) => break,
                Err(e) => match self.classify(&e, "committing a Kafka transaction") {
                    // Retriable (e.g. timed out): the same commit may be called again.
                    TxnError::Retry(_) if retriable(&e) && Instant::now() < deadline => {
                        tracing::warn!("committing a Kafka transaction: {e}; retrying");
                    }
                    TxnError::Retry(why) => {
                        self.open = None;
                        self.abort(publisher).await?;
                        return Err(TxnError::Retry(format!("{why}; aborted it")));
                    }
                    fatal => return Err(fatal),
                },
            }
        }
        tracing::debug!(
            records = position.records,
            acks_ms = (acked + BROKER_WAIT - deadline).as_millis() as u64,
            commit_ms = acked.elapsed().as_millis() as u64,
            "committed a Kafka transaction"
        );
        self.open = None;
        self.committed = position;
        tracker.confirm_committed(position.confirm_lsn);
        Ok(())
    }

    async fn abort(&self, publisher: &Arc<Publisher>) -> Result<(), TxnError> {
        match publisher.abort_transaction(BROKER_WAIT).await {
            Ok(()) => Ok(()),
            Err(e) => match self.classify(&e, "aborting a Kafka transaction") {
                // The broker aborts it on its own after transaction.timeout.ms, or when the
                // next init_transactions fences this producer; the relay restarts to get there.
                TxnError::Retry(why) => Err(TxnError::Fatal(format!(
                    "{why}; restart the relay (the broker aborts the transaction when it starts again)"
                ))),
                fatal => Err(fatal),
            },
        }
    }

    /// Sorts a failed transactional call; the message says what happened and what to do.
    fn classify(&self, e: &KafkaError, during: &str) -> TxnError {
        let id = &self.settings.transactional_id;
        let code = e.rdkafka_error_code();
        if crate::kafka::dead_letter::is_fenced(code) {
            return TxnError::Fatal(format!(
                "fenced: another relay started with transactional_id {id:?} and now owns its transactions; this one stops ({during}: {e})"
            ));
        }
        if matches!(
            code,
            Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed)
        ) {
            return TxnError::Fatal(format!(
                "{during}: Kafka does not allow transactional_id {id:?} ({e}); grant WRITE and DESCRIBE on the TransactionalId resource"
            ));
        }
        if matches!(
            code,
            Some(RDKafkaErrorCode::UnsupportedVersion | RDKafkaErrorCode::UnsupportedFeature)
        ) {
            return TxnError::Fatal(format!(
                "{during}: the Kafka broker does not support transactions ({e}); delivery = \"exactly-once\" needs Kafka 0.11 or later with transactions, else use \"at-least-once\""
            ));
        }
        match e {
            KafkaError::Transaction(t) if t.is_fatal() => TxnError::Fatal(format!(
                "{during} failed for good (transactional_id {id:?}): {e}"
            )),
            _ => TxnError::Retry(format!(
                "{during} failed (transactional_id {id:?}): {e}; if this repeats, check that the broker supports transactions"
            )),
        }
    }
}

fn retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kafka_lines: &str) -> Config {
        let text = format!("{}\n{kafka_lines}", crate::config::tests::MINIMAL);
        Config::parse(&text, "relay.toml", |_| Some("pw".into())).unwrap()
    }

    #[test]
    fn at_least_once_has_no_driver_and_no_transactional_id() {
        let c = parse("");
        assert!(ExactlyOnce::new(&c).is_none());
        assert_eq!(producer_config(&c), c.kafka);
    }

    #[test]
    fn the_driver_and_the_producer_use_the_settings() {
        let c = parse("delivery = \"exactly-once\"\ntransactional_id = \"shop\"");
        let e = ExactlyOnce::new(&c).unwrap();
        assert_eq!(e.settings.transactional_id, "shop");
        assert_eq!(
            producer_config(&c)
                .properties
                .get("transactional.id")
                .map(String::as_str),
            Some("shop")
        );
    }

    fn driver(committed: Position) -> ExactlyOnce {
        let mut e = ExactlyOnce::new(&parse("delivery = \"exactly-once\"")).unwrap();
        e.committed = committed;
        e
    }

    #[test]
    fn a_restart_skips_what_committed_transactions_hold() {
        let mut e = driver(Position {
            commit_lsn: Lsn(100),
            events: 2,
            complete: false,
            confirm_lsn: Lsn(50),
            records: 2,
        });
        e.begin(Lsn(90));
        assert!(
            e.skips() && e.skips() && e.skips(),
            "an earlier transaction"
        );
        e.begin(Lsn(100));
        assert!(e.skips() && e.skips(), "the split transaction's first two");
        assert!(!e.skips(), "its third is new");
        e.begin(Lsn(110));
        assert!(!e.skips(), "a later transaction");
        e.committed.complete = true;
        e.begin(Lsn(100));
        assert!(e.skips() && e.skips() && e.skips(), "complete: all of it");
    }

    #[test]
    fn after_an_abort_the_next_commit_confirms_nothing_that_was_in_it() {
        let committed = Position {
            commit_lsn: Lsn(10),
            events: 1,
            complete: true,
            confirm_lsn: Lsn(12),
            records: 1,
        };
        let mut e = driver(committed);
        // Transactions up to 40 read into a Kafka transaction that is then aborted (the
        // session ended), the open one at 50 included.
        e.last_pg = (Lsn(30), 3);
        e.last_end = Lsn(40);
        e.begin(Lsn(50));
        e.sent();
        e.forget_uncommitted();
        // The next session reads them again: the one at 30 is written again, in part, and
        // that Kafka transaction committed (it is full).
        e.begin(Lsn(30));
        e.sent();
        let p = e.reached();
        assert_eq!(
            (p.commit_lsn, p.events, p.complete, p.confirm_lsn),
            (Lsn(30), 1, false, Lsn(12)),
            "the aborted reads' end (40) is not confirmed"
        );
    }

    #[test]
    fn the_position_inside_a_transaction_confirms_only_the_one_before() {
        let mut e = driver(Position::default());
        let (tracker, _rx) = AckTracker::committed_only(Lsn(0));
        e.last_pg = (Lsn(10), 1);
        e.last_end = Lsn(12);
        e.begin(Lsn(20));
        e.sent();
        e.sent();
        let p = e.reached();
        assert_eq!(
            (p.commit_lsn, p.events, p.complete, p.confirm_lsn),
            (Lsn(20), 2, false, Lsn(12))
        );
        e.pg = None;
        e.last_pg = (Lsn(20), 2);
        e.last_end = Lsn(22);
        let p = e.reached();
        assert_eq!(
            (p.commit_lsn, p.events, p.complete, p.confirm_lsn),
            (Lsn(20), 2, true, Lsn(22))
        );
        e.idle(Lsn(30), &tracker);
        assert_eq!(
            tracker.confirmed(),
            Lsn(30),
            "nothing open: the WAL end is safe"
        );
    }
}
