//! Reading Kafka back as a consumer would: records with their headers, from the beginning of
//! every partition, without a group, polled without blocking the test's runtime.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// One record as a consumer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// In record order; a header may repeat and may have a null value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Rec {
    /// The first header of that name; `Some(None)` for a present header with a null value.
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }

    /// The first header of that name as (lossy) text; `None` if absent or null.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .flatten()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The key as (lossy) text.
    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The value as (lossy) text.
    pub fn value_str(&self) -> Option<String> {
        self.value
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A consumer that joins no group: partitions are assigned explicitly, nothing is committed.
/// `extra` properties are set last (e.g. `isolation.level`).
pub(crate) fn reader_consumer(bootstrap: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    for (k, v) in extra {
        config.set(*k, *v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("create Kafka consumer")
}

pub(crate) fn partition_count(consumer: &BaseConsumer, topic: &str) -> Option<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(2))
        .ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    Some(t.partitions().len() as i32)
}

/// How long no new record must arrive before a read counts as complete.
///
/// Why not read up to the high watermarks? A relay that sends a record too many may still be
/// sending it when the expected count is reached; a quiet spell lets such extras show up.
pub const QUIET: Duration = Duration::from_secs(2);

/// A consumer assigned to every partition of some topics from the beginning (no group, no
/// commits). Polling never blocks, so a test can interleave reading with other checks on
/// its single-threaded runtime; librdkafka fetches in its own threads meanwhile.
pub struct Reader {
    consumer: BaseConsumer,
    recs: Vec<Rec>,
    last_new: Instant,
}

impl Reader {
    fn new(bootstrap: &str, topics: &[&str], extra: &[(&str, &str)]) -> Reader {
        let consumer = reader_consumer(bootstrap, extra);
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            let n = partition_count(&consumer, topic)
                .unwrap_or_else(|| panic!("topic {topic:?} has no metadata; create it first"));
            for p in 0..n {
                assignment
                    .add_partition_offset(topic, p, Offset::Beginning)
                    .expect("add partition");
            }
        }
        consumer.assign(&assignment).expect("assign partitions");
        Reader {
            consumer,
            recs: Vec::new(),
            last_new: Instant::now(),
        }
    }

    /// Takes whatever librdkafka has fetched so far; returns how many records were new.
    pub fn poll(&mut self) -> usize {
        let mut n = 0;
        while let Some(result) = self.consumer.poll(Duration::ZERO) {
            match result {
                Ok(m) => {
                    let headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.recs.push(Rec {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                    n += 1;
                }
                // Fetch errors are retried by librdkafka; show them for debugging.
                Err(e) => eprintln!("reader: {e}"),
            }
        }
        if n > 0 {
            self.last_new = Instant::now();
        }
        n
    }

    /// Records read so far.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Polls until at least `expected` records were read or `timeout` passed, calling
    /// `between` (e.g. `|| relay.assert_running()`) while waiting. Returns whether enough
    /// records arrived.
    pub async fn wait_for(
        &mut self,
        expected: usize,
        timeout: Duration,
        mut between: impl FnMut(),
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if self.recs.len() >= expected {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            between();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until nothing new arrived for `quiet`.
    pub async fn settle(&mut self, quiet: Duration) {
        // Even if records stopped arriving long ago, give late ones at least half a spell.
        self.last_new = self.last_new.max(Instant::now() - quiet / 2);
        loop {
            self.poll();
            if self.last_new.elapsed() >= quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything read so far, in (topic, partition, offset) order.
    pub fn records(&self) -> Vec<Rec> {
        let mut recs = self.recs.clone();
        recs.sort_by(|a, b| {
            (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset))
        });
        recs
    }

    /// A reader of `topics` on the cluster at `bootstrap` (e.g. an `rdkafka::mocking`
    /// cluster rather than a [`Broker`]), from the beginning of every partition.
    pub fn at(bootstrap: &str, topics: &[&str]) -> Reader {
        Reader::new(bootstrap, topics, &[])
    }

    /// Like [`Reader::at`], as a consumer with `isolation.level=read_committed`.
    pub fn read_committed(bootstrap: &str, topics: &[&str]) -> Reader {
        Reader::new(bootstrap, topics, &[("isolation.level", "read_committed")])
    }
}
