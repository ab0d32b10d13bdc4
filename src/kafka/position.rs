//! The committed position of exactly-once mode: the record each Kafka transaction ends with
//! (key: the transactional id, value: [`Position`] as JSON), and reading the newest one back
//! at start. The offsets topic is read backwards from its end, in windows that double, so a
//! restart reads about as many records as were written since the relay's last commit,
//! however long the topic's history (the active segment of a compacted topic keeps every
//! record until it rolls).

use std::ops::Range;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;
use crate::lsn::Lsn;

/// Bound on reading the position back, waits for the brokers included.
const READ_WAIT: Duration = Duration::from_secs(30);
/// How many offsets the first window back from the end spans; each further one spans twice
/// as many as the one before. On a broker with transactions every Kafka transaction of a
/// relay adds two offsets to the topic (its position record and the commit marker), so the
/// first window holds the last 32 transactions of all relays writing to the topic.
pub const FIRST_WINDOW: i64 = 64;

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
        // A struct of strings, numbers and a bool always serializes.
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

/// What reading the position back found, and what it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadBack {
    /// The newest committed position for the key and its offset, if there is one.
    pub found: Option<(Position, i64)>,
    /// Records read (of any key), which the windows keep near the number written since.
    pub records_read: u64,
    /// Windows read.
    pub windows: u32,
}

/// Why the position could not be read back; [`ReadError::is_fatal`] sorts them.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offsets topic is missing: an operator has to create it.
    #[error("[kafka] offsets_topic {topic} does not exist; create it with one partition and cleanup.policy=compact (e.g. kafka-topics.sh --create --topic {topic} --partitions 1 --config cleanup.policy=compact)")]
    NoTopic {
        /// The offsets topic.
        topic: String,
    },
    /// The consumer could not be made (a bad property, most likely).
    #[error("cannot create a consumer for {topic}: {source}")]
    Client {
        /// The offsets topic.
        topic: String,
        /// librdkafka's reason.
        source: KafkaError,
    },
    /// The brokers answered with an error, or not at all.
    #[error("{doing} {topic}: {source}")]
    Broker {
        /// What the reader was doing.
        doing: &'static str,
        /// The offsets topic.
        topic: String,
        /// librdkafka's reason.
        source: KafkaError,
    },
    /// The topic's end stayed out of reach (an open transaction, or slow brokers).
    #[error("reading the position from {topic} did not reach offset {offset} within {READ_WAIT:?} ({why})")]
    Timeout {
        /// The offsets topic.
        topic: String,
        /// The offset that was not reached.
        offset: i64,
        /// What was awaited.
        why: &'static str,
    },
    /// The newest record for the key is not a position.
    #[error("{topic} offset {offset} holds an unreadable position for {key}: {why}")]
    Unreadable {
        /// The offsets topic.
        topic: String,
        /// The record's offset.
        offset: i64,
        /// Its key.
        key: String,
        /// What is wrong with its value.
        why: String,
    },
}

impl ReadError {
    /// Whether trying again cannot help (the operator has to act).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ReadError::NoTopic { .. } | ReadError::Client { .. } | ReadError::Unreadable { .. }
        )
    }
}

/// The offset ranges to read, newest first: `[low, end)` cut from `end` backwards into
/// windows of `first` offsets, then twice, four times as many, and so on; the last one is cut
/// short at `low`. They tile `[low, end)` without overlap, so no record is read twice, and
/// reaching back `n` offsets takes at most `1 + ⌈log2(n / first + 1)⌉` windows spanning fewer
/// than `2 n + first` offsets: the cost follows how far back the record is, not the topic.
pub fn windows(low: i64, end: i64, first: i64) -> impl Iterator<Item = Range<i64>> {
    let mut upper = end;
    let mut len = first.max(1);
    std::iter::from_fn(move || {
        if upper <= low {
            return None;
        }
        let start = upper.saturating_sub(len).max(low);
        let window = start..upper;
        upper = start;
        len = len.saturating_mul(2);
        Some(window)
    })
}

/// The `cleanup.policy` the brokers report for `topic`, or None if they cannot say (no
/// DescribeConfigs permission, a timeout): a hint for a warning, never a reason to stop.
pub async fn cleanup_policy(kafka: &KafkaConfig, topic: &str) -> Option<String> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        client.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = client.create().ok()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .ok()?;
    let resource = results.into_iter().next()?.ok()?;
    resource.get("cleanup.policy")?.value.clone()
}

/// Reads partition 0 of `topic` back from its end and returns the newest committed position
/// recorded for `key`. Call it after `init_transactions`, which does not return before the
/// previous transaction of this transactional id is completed, so none of ours is open.
/// Blocks (up to [`READ_WAIT`]).
///
/// Where the end is: a consumer with `isolation.level=read_committed` sees the partition
/// only up to its last stable offset (LSO), the first offset of the oldest transaction still
/// open (of any producer), and librdkafka's ListOffsets (`fetch_watermarks`) answers it with
/// that LSO, not the high watermark. Ours being closed, the LSO can still lie before our
/// newest committed position: another relay sharing the topic may have appended its position
/// record before ours and not committed yet (for up to its `transaction.timeout.ms` if it
/// died in between). Reading only to the LSO would then find an older position of ours and
/// send its events again. So the end is the high watermark, asked for by a second,
/// `read_uncommitted` client, and the reader waits until the LSO has passed it: the
/// transactions open at that moment have ended and everything before the end is readable.
pub fn read_back(kafka: &KafkaConfig, topic: &str, key: &str) -> Result<ReadBack, ReadError> {
    let deadline = Instant::now() + READ_WAIT;
    let broker = |doing: &'static str| {
        move |source: KafkaError| ReadError::Broker {
            doing,
            topic: topic.to_owned(),
            source,
        }
    };
    let committed = consumer(kafka, topic, "read_committed")?;
    let metadata = committed
        .fetch_metadata(Some(topic), left(deadline))
        .map_err(broker("cannot read the metadata of"))?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Err(ReadError::NoTopic {
            topic: topic.to_owned(),
        });
    }
    let (low, end) = consumer(kafka, topic, "read_uncommitted")?
        .fetch_watermarks(topic, 0, left(deadline))
        .map_err(broker("cannot read the end of"))?;
    loop {
        let (_, stable) = committed
            .fetch_watermarks(topic, 0, left(deadline))
            .map_err(broker("cannot read the last stable offset of"))?;
        if stable >= end {
            break;
        }
        if left(deadline) < Duration::from_millis(100) {
            return Err(ReadError::Timeout {
                topic: topic.to_owned(),
                offset: end,
                why: "a transaction of another producer stayed open",
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut back = ReadBack::default();
    for window in windows(low, end, FIRST_WINDOW) {
        back.windows += 1;
        let newest = newest_in(&committed, topic, key, window, deadline, &mut back)?;
        if let Some((offset, value)) = newest {
            let position = Position::from_json(&value).map_err(|why| ReadError::Unreadable {
                topic: topic.to_owned(),
                offset,
                key: key.to_owned(),
                why,
            })?;
            back.found = Some((position, offset));
            break;
        }
    }
    Ok(back)
}

/// The last record with `key` in `window` as (offset, value), reading with `consumer` (a
/// `read_committed` one whose LSO has passed the window's end).
fn newest_in(
    consumer: &BaseConsumer<PositionReader>,
    topic: &str,
    key: &str,
    window: Range<i64>,
    deadline: Instant,
    back: &mut ReadBack,
) -> Result<Option<(i64, Vec<u8>)>, ReadError> {
    let mut assignment = TopicPartitionList::new();
    let assigned = assignment
        .add_partition_offset(topic, 0, Offset::Offset(window.start))
        .and_then(|()| consumer.assign(&assignment));
    assigned.map_err(|source| ReadError::Broker {
        doing: "cannot assign",
        topic: topic.to_owned(),
        source,
    })?;
    let mut newest = None;
    loop {
        if left(deadline).is_zero() {
            return Err(ReadError::Timeout {
                topic: topic.to_owned(),
                offset: window.end,
                why: "reading a window of it",
            });
        }
        match consumer.poll(left(deadline).min(Duration::from_millis(500))) {
            None => {}
            // The fetch reached the LSO, which is past the window's end (see read_back): the
            // window's last offsets were transaction markers or aborted records, which a
            // read_committed consumer skips, or compacted away.
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(newest),
            Some(Err(source)) => {
                return Err(ReadError::Broker {
                    doing: "cannot read",
                    topic: topic.to_owned(),
                    source,
                })
            }
            // Past the window: the window held nothing more.
            Some(Ok(m)) if m.offset() >= window.end => return Ok(newest),
            Some(Ok(m)) => {
                back.records_read += 1;
                if m.key() == Some(key.as_bytes()) {
                    newest = Some((m.offset(), m.payload().unwrap_or_default().to_vec()));
                }
                if m.offset() + 1 >= window.end {
                    return Ok(newest);
                }
            }
        }
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn consumer(
    kafka: &KafkaConfig,
    topic: &str,
    isolation: &str,
) -> Result<BaseConsumer<PositionReader>, ReadError> {
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
        .set("isolation.level", isolation)
        .set("enable.partition.eof", "true")
        // Should retention have removed a window's start meanwhile, read what is left of it.
        .set("auto.offset.reset", "earliest")
        // The end is seen in a fetch answer, which an idle broker holds up to this long.
        .set("fetch.wait.max.ms", "10");
    client
        .create_with_context(PositionReader)
        .map_err(|source| ReadError::Client {
            topic: topic.to_owned(),
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn windows_tile_the_topic_backwards_and_double() {
        let all: Vec<Range<i64>> = windows(0, 1_000, 64).collect();
        assert_eq!(
            all,
            [936..1_000, 808..936, 552..808, 40..552, 0..40],
            "newest first, each twice the one before, the last cut at the start"
        );
        // A topic whose start was compacted or deleted away.
        let all: Vec<Range<i64>> = windows(900, 1_000, 64).collect();
        assert_eq!(all, [936..1_000, 900..936]);
        assert_eq!(windows(5, 5, 64).count(), 0, "an empty topic");
        let short: Vec<Range<i64>> = windows(0, 3, 64).collect();
        assert_eq!(short.len(), 1);
        assert_eq!(short[0], 0..3, "a topic shorter than the first window");
    }

    #[test]
    fn reaching_back_costs_logarithmic_windows_and_about_twice_the_distance() {
        let end = 20_000_000;
        for distance in [1_i64, 63, 64, 65, 1_000, 100_000, 10_000_000] {
            // Windows are read until one holds the offset `distance` back from the end.
            let target = end - distance;
            let (mut spanned, mut count) = (0, 0_u32);
            for w in windows(0, end, FIRST_WINDOW) {
                count += 1;
                spanned += w.end - w.start;
                if w.contains(&target) {
                    break;
                }
            }
            assert!(
                spanned < 2 * distance + FIRST_WINDOW,
                "{distance}: {spanned}"
            );
            let most = 1.0 + (distance as f64 / FIRST_WINDOW as f64 + 1.0).log2().ceil();
            assert!(f64::from(count) <= most, "{distance}: {count} windows");
        }
        // Nothing lost or read twice, whatever the sizes.
        for (low, end, first) in [(0, 100_000, 64), (17, 100_003, 1), (0, 1, 64), (3, 7, 0)] {
            let mut covered: Vec<Range<i64>> = windows(low, end, first).collect();
            covered.reverse();
            assert_eq!(covered.first().map(|w| w.start), Some(low));
            assert_eq!(covered.last().map(|w| w.end), Some(end));
            assert!(covered
                .windows(2)
                .all(|p| p[0].end == p[1].start && p[0].start < p[0].end));
        }
    }
}
