//! Exactly-once mode (`[kafka] delivery = "exactly-once"`): the records of one or more
//! PostgreSQL transactions go to Kafka in one Kafka transaction, whose last record is the
//! position it reaches (in the manner of Kafka Connect's exactly-once sources, KIP-618).
//! Consumers reading with `isolation.level=read_committed` see a Kafka transaction's records
//! only once it committed, together with its position; on start the relay reads the last
//! committed position back and skips what it already wrote.
//!
//! A position names the PostgreSQL transaction being read when the Kafka transaction was
//! committed by its commit LSN (Begin's `final_lsn`, unique and in commit order) and how many
//! of its events were written, so a PostgreSQL transaction larger than
//! `transaction_max_events` is split across Kafka transactions and resumes at the right event.
//! The slot is confirmed only up to the end of the last PostgreSQL transaction wholly inside
//! committed Kafka transactions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Delivery, KafkaConfig};
use crate::kafka::producer::Publisher;
use crate::lsn::Lsn;
use crate::pipeline::ack::AckTracker;

pub use crate::config::exactly_once::{
    DEFAULT_OFFSETS_TOPIC, DEFAULT_TRANSACTION_MAX_EVENTS, DEFAULT_TRANSACTION_MAX_MS,
};
/// Bound on each call that waits for the brokers (init, commit, abort, reading the position).
const BROKER_WAIT: Duration = Duration::from_secs(30);
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

/// The `transactional.id` for `config`.
pub fn transactional_id(config: &Config) -> String {
    config
        .kafka
        .transactional_id
        .clone()
        .unwrap_or_else(|| format!("outbox-relay-{}", config.postgres.slot))
}

/// The producer's `[kafka]` in exactly-once mode: the same, with the transactional id.
pub fn producer_config(config: &Config) -> KafkaConfig {
    let mut kafka = config.kafka.clone();
    kafka
        .properties
        .insert("transactional.id".into(), transactional_id(config));
    kafka
}

/// How far committed Kafka transactions reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Commit LSN (Begin's `final_lsn`) of the PostgreSQL transaction last read.
    pub commit_lsn: Lsn,
    /// Its outbox events already written (or, before, skipped as written).
    pub events: u64,
    /// Whether all of its events are written.
    pub complete: bool,
    /// The slot may be confirmed up to here: the end of the last PostgreSQL transaction wholly
    /// inside committed Kafka transactions.
    pub confirm_lsn: Lsn,
    /// Records in the Kafka transaction that wrote this position (outbox records and dead
    /// letters), for whoever audits the topics.
    pub records: u64,
}

/// The JSON value of a position record (LSNs in PostgreSQL's text form).
#[derive(Serialize, Deserialize)]
struct PositionJson {
    commit_lsn: String,
    events: u64,
    complete: bool,
    confirm_lsn: String,
    records: u64,
}

impl Position {
    /// The record's value.
    pub fn to_json(&self) -> String {
        let json = PositionJson {
            commit_lsn: self.commit_lsn.to_string(),
            events: self.events,
            complete: self.complete,
            confirm_lsn: self.confirm_lsn.to_string(),
            records: self.records,
        };
        serde_json::to_string(&json).unwrap_or_default()
    }

    /// Reads a record's value; the error says what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Position, String> {
        let json: PositionJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(Position {
            commit_lsn: json.commit_lsn.parse().map_err(|e| format!("{e}"))?,
            events: json.events,
            complete: json.complete,
            confirm_lsn: json.confirm_lsn.parse().map_err(|e| format!("{e}"))?,
            records: json.records,
        })
    }
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
    id: String,
    topic: String,
    /// The position record's key: the transactional id, unique to one relay (two relays
    /// with the same id fence each other), where slot names may repeat across databases.
    key: String,
    max_age: Duration,
    max_events: u64,
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
        let k = &config.kafka;
        (k.delivery == Delivery::ExactlyOnce).then(|| ExactlyOnce {
            kafka: k.clone(),
            id: transactional_id(config),
            topic: k
                .offsets_topic
                .clone()
                .unwrap_or_else(|| DEFAULT_OFFSETS_TOPIC.into()),
            key: transactional_id(config),
            max_age: Duration::from_millis(
                k.transaction_max_ms.unwrap_or(DEFAULT_TRANSACTION_MAX_MS),
            ),
            max_events: k
                .transaction_max_events
                .unwrap_or(DEFAULT_TRANSACTION_MAX_EVENTS),
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
        publisher
            .init_transactions(BROKER_WAIT)
            .await
            .map_err(|e| self.classify(&e, "registering the transactional id"))?;
        let (kafka, topic, key) = (self.kafka.clone(), self.topic.clone(), self.key.clone());
        let found = tokio::task::spawn_blocking(move || read_position(&kafka, &topic, &key))
            .await
            .map_err(|e| TxnError::Retry(format!("reading the position failed: {e}")))??;
        if let Some(position) = found {
            if position.commit_lsn.max(position.confirm_lsn) > server_wal {
                // Written against another database, or this one before a restore rewound its
                // WAL: resuming after it would skip this history's events up to there.
                return Err(TxnError::Fatal(format!(
                    "{} holds a position (commit {}, confirmed {}) past this server's WAL ({server_wal}) for transactional id {}: it belongs to another database or to WAL before a restore, and resuming from it would skip events; set a new [kafka] transactional_id (or offsets_topic) and restart",
                    self.topic, position.commit_lsn, position.confirm_lsn, self.key
                )));
            }
            tracing::info!(
                commit_lsn = %position.commit_lsn,
                events = position.events,
                complete = position.complete,
                confirm_lsn = %position.confirm_lsn,
                "exactly-once: resuming after the committed position in {}",
                self.topic
            );
            self.committed = position;
            self.last_end = self.last_end.max(position.confirm_lsn);
            tracker.confirm_committed(position.confirm_lsn);
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
        self.pg = None;
        if self.open.take().is_some() {
            self.abort(publisher).await?;
        }
        Ok(())
    }

    fn full(&self) -> bool {
        self.open
            .is_some_and(|o| o.records >= self.max_events || o.started.elapsed() >= self.max_age)
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
        if let Err(e) = publisher.send_position(&self.topic, self.key.as_bytes(), value.as_bytes())
        {
            self.open = None;
            self.abort(publisher).await?;
            return Err(TxnError::Retry(format!(
                "cannot queue the position record for {}: {e}",
                self.topic
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
        let id = &self.id;
        let code = e.rdkafka_error_code();
        if matches!(
            code,
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        ) {
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

/// The position reader's librdkafka context: reaching the partition's end is what it waits
/// for, not an error to log.
struct PositionReader;

impl ClientContext for PositionReader {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(target: "librdkafka", "reading the position: {error}: {reason}");
        }
    }
}

impl ConsumerContext for PositionReader {}

fn retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

/// Reads partition 0 of `topic` to its end as a `read_committed` consumer and returns the
/// newest position recorded for `key`. Blocks (up to [`BROKER_WAIT`]).
fn read_position(
    kafka: &KafkaConfig,
    topic: &str,
    key: &str,
) -> Result<Option<Position>, TxnError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &kafka.brokers);
    // Security settings apply to consumers too; producer-only ones are ignored by librdkafka.
    for (k, v) in &kafka.properties {
        client.set(k, v);
    }
    client
        .set("group.id", "outbox-relay-position")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // The end is seen in a fetch answer, which an idle broker holds up to this long.
        .set("fetch.wait.max.ms", "10");
    let retry = |what: &str, e: KafkaError| TxnError::Retry(format!("{what} {topic}: {e}"));
    let consumer: BaseConsumer<PositionReader> = client
        .create_with_context(PositionReader)
        .map_err(|e| TxnError::Fatal(format!("cannot create a consumer for {topic}: {e}")))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), BROKER_WAIT)
        .map_err(|e| retry("cannot read the metadata of", e))?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Err(TxnError::Fatal(format!(
            "[kafka] offsets_topic {topic} does not exist; create it with one partition and cleanup.policy=compact (e.g. kafka-topics.sh --create --topic {topic} --partitions 1 --config cleanup.policy=compact)"
        )));
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| retry("cannot assign", e))?;
    consumer
        .assign(&assignment)
        .map_err(|e| retry("cannot assign", e))?;
    let deadline = Instant::now() + BROKER_WAIT;
    let mut found = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TxnError::Retry(format!(
                "reading the position from {topic} did not reach its end within {BROKER_WAIT:?}"
            )));
        }
        match consumer.poll(left.min(Duration::from_millis(500))) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(found),
            Some(Err(e)) => return Err(retry("cannot read", e)),
            Some(Ok(m)) if m.key() == Some(key.as_bytes()) => {
                let value = m.payload().unwrap_or_default();
                found = Some(Position::from_json(value).map_err(|e| {
                    TxnError::Fatal(format!(
                        "{topic} offset {} holds an unreadable position for {key}: {e}",
                        m.offset()
                    ))
                })?);
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kafka_lines: &str) -> Result<Config, String> {
        let text = format!("{}\n{kafka_lines}", crate::config::tests::MINIMAL);
        Config::parse(&text, "relay.toml", |_| Some("pw".into())).map_err(|e| e.to_string())
    }

    #[test]
    fn at_least_once_is_the_default_and_has_no_driver() {
        let c = parse("").unwrap();
        assert_eq!(c.kafka.delivery, Delivery::AtLeastOnce);
        assert!(ExactlyOnce::new(&c).is_none());
    }

    #[test]
    fn exactly_once_defaults_its_id_topic_and_bounds() {
        let c = parse("delivery = \"exactly-once\"").unwrap();
        let e = ExactlyOnce::new(&c).unwrap();
        assert_eq!(e.id, "outbox-relay-outbox_relay");
        assert_eq!(e.topic, DEFAULT_OFFSETS_TOPIC);
        assert_eq!(e.max_events, DEFAULT_TRANSACTION_MAX_EVENTS);
        assert_eq!(
            producer_config(&c)
                .properties
                .get("transactional.id")
                .map(String::as_str),
            Some("outbox-relay-outbox_relay")
        );
    }

    #[test]
    fn exactly_once_keys_without_the_mode_are_rejected_by_name() {
        for line in [
            "transactional_id = \"x\"",
            "offsets_topic = \"o\"",
            "transaction_max_ms = 5",
            "transaction_max_events = 5",
        ] {
            let err = parse(line).unwrap_err();
            let key = line.split(' ').next().unwrap();
            assert!(err.contains(key) && err.contains("exactly-once"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn conflicting_properties_are_rejected() {
        for (mode, prop) in [
            ("exactly-once", "\"transactional.id\" = \"x\""),
            ("exactly-once", "\"enable.idempotence\" = \"false\""),
            ("exactly-once", "acks = \"1\""),
            ("at-least-once", "\"transactional.id\" = \"x\""),
        ] {
            let err = parse(&format!(
                "delivery = \"{mode}\"\n[kafka.properties]\n{prop}"
            ))
            .unwrap_err();
            assert!(
                err.contains("transactional")
                    || err.contains(prop.split(' ').next().unwrap().trim_matches('"')),
                "{err}"
            );
        }
        assert!(parse("delivery = \"exactly-once\"\n[kafka.properties]\nacks = \"all\"").is_ok());
    }

    #[test]
    fn zero_bounds_empty_names_and_unknown_modes_are_rejected() {
        let snapshot = crate::config::tests::MINIMAL
            .replace("[[outbox]]", "initial_snapshot = true\n[[outbox]]")
            + "\ndelivery = \"exactly-once\"";
        let err = Config::parse(&snapshot, "relay.toml", |_| Some("pw".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("initial_snapshot"), "{err}");
        for lines in [
            "delivery = \"exactly-once\"\ntransaction_max_events = 0",
            "delivery = \"exactly-once\"\ntransaction_max_ms = 0",
            "delivery = \"exactly-once\"\ntransactional_id = \" \"",
            "delivery = \"exactly-once\"\noffsets_topic = \"\"",
            "delivery = \"exactly_once\"",
        ] {
            assert!(parse(lines).is_err(), "{lines}");
        }
    }

    #[test]
    fn positions_round_trip_and_bad_ones_are_named() {
        let p = Position {
            commit_lsn: Lsn(0x1_0000_0010),
            events: 7,
            complete: false,
            confirm_lsn: Lsn(0x20),
            records: 9,
        };
        assert_eq!(Position::from_json(p.to_json().as_bytes()), Ok(p));
        assert!(Position::from_json(b"{\"commit_lsn\":\"x\"}").is_err());
        assert!(Position::from_json(b"\xff").is_err());
    }

    fn driver(committed: Position) -> ExactlyOnce {
        let mut e = ExactlyOnce::new(&parse("delivery = \"exactly-once\"").unwrap()).unwrap();
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
