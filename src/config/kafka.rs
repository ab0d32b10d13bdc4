//! `[kafka]` as typed values: the brokers, the producer's properties and the delivery mode
//! with its settings, defaulted and checked once here, so that the exactly-once code reads
//! settings that exist only in exactly-once mode.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::Duration;

use super::file::{DeliveryMode, KafkaFile};
use super::topic;

/// The offsets topic when `[kafka] offsets_topic` is unset.
pub const DEFAULT_OFFSETS_TOPIC: &str = "outbox-relay-offsets";
/// `transaction_max_ms` when unset: short, so a caught-up relay's events are not held long.
pub const DEFAULT_TRANSACTION_MAX_MS: u64 = 100;
/// `transaction_max_events` when unset.
pub const DEFAULT_TRANSACTION_MAX_EVENTS: u64 = 10_000;

/// Properties the relay sets itself in exactly-once mode, or that would break it.
const RESERVED: &[(&str, &str)] = &[
    ("transactional.id", "set [kafka] transactional_id instead"),
    (
        "enable.idempotence",
        "transactions need the idempotent producer",
    ),
    ("acks", "transactions need acks=all"),
];

/// `[kafka]`: the brokers and producer settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Where a record Kafka refuses for good (larger than `message.max.bytes`, an illegal or
    /// unknown topic: see `kafka::dead_letter`) goes instead, as a small JSON note; unset,
    /// such a record stops the relay.
    pub dead_letter_topic: Option<String>,
    /// librdkafka properties, passed through verbatim; they override the relay's defaults.
    pub properties: BTreeMap<String, String>,
    /// At-least-once (the default) or exactly-once through Kafka transactions.
    pub delivery: Delivery,
}

/// `[kafka] delivery`: what a consumer may see after a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Delivery {
    /// Every event at least once; duplicates after a crash (consumers dedup by `id`).
    #[default]
    AtLeastOnce,
    /// Every event once for `isolation.level=read_committed` consumers (Kafka transactions).
    ExactlyOnce(ExactlyOnceSettings),
}

/// The settings of exactly-once mode, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactlyOnceSettings {
    /// The producer's `transactional.id`, also the key of the position records: unique to
    /// one relay (two relays with the same id fence each other), where slot names may repeat
    /// across databases.
    pub transactional_id: String,
    /// The topic holding the committed position (one partition, compacted).
    pub offsets_topic: String,
    /// A Kafka transaction is committed once it is this old.
    pub transaction_max_age: Duration,
    /// A Kafka transaction is committed once it holds this many events.
    pub transaction_max_events: NonZeroU64,
}

impl KafkaConfig {
    /// The exactly-once settings, or None in at-least-once mode.
    pub fn exactly_once(&self) -> Option<&ExactlyOnceSettings> {
        match &self.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce(settings) => Some(settings),
        }
    }

    /// Types and checks `[kafka]`; `slot` names the default transactional id, and the initial
    /// snapshot does not go with exactly-once. A one-line message on error.
    pub(super) fn build(
        file: KafkaFile,
        slot: &str,
        initial_snapshot: bool,
    ) -> Result<KafkaConfig, String> {
        let KafkaFile {
            brokers,
            dead_letter_topic,
            properties,
            delivery,
            transactional_id,
            offsets_topic,
            transaction_max_ms,
            transaction_max_events,
        } = file;
        if brokers.trim().is_empty() {
            return Err("[kafka] brokers is empty; set it to host:port[,host:port]".into());
        }
        if let Some(name) = &dead_letter_topic {
            topic::check(name).map_err(|e| format!("[kafka] dead_letter_topic: {e}"))?;
        }
        let delivery = match delivery {
            DeliveryMode::AtLeastOnce => {
                let set = [
                    ("transactional_id", transactional_id.is_some()),
                    ("offsets_topic", offsets_topic.is_some()),
                    ("transaction_max_ms", transaction_max_ms.is_some()),
                    ("transaction_max_events", transaction_max_events.is_some()),
                ];
                if let Some((key, _)) = set.iter().find(|(_, is_set)| *is_set) {
                    return Err(format!(
                        "[kafka] {key} is used only with delivery = \"exactly-once\"; set that or remove {key}"
                    ));
                }
                if properties.contains_key("transactional.id") {
                    return Err("[kafka.properties] transactional.id makes a transactional producer, which the at-least-once mode does not drive; use [kafka] delivery = \"exactly-once\" and transactional_id instead".into());
                }
                Delivery::AtLeastOnce
            }
            DeliveryMode::ExactlyOnce => {
                if initial_snapshot {
                    // The snapshot's records go out before any slot position exists to commit
                    // them with.
                    return Err("[postgres] initial_snapshot cannot be used with [kafka] delivery = \"exactly-once\" yet; take the snapshot with delivery = \"at-least-once\" once, then switch".into());
                }
                check_reserved(&properties)?;
                Delivery::ExactlyOnce(ExactlyOnceSettings::build(
                    transactional_id,
                    offsets_topic,
                    transaction_max_ms,
                    transaction_max_events,
                    slot,
                )?)
            }
        };
        Ok(KafkaConfig {
            brokers,
            dead_letter_topic,
            properties,
            delivery,
        })
    }
}

impl ExactlyOnceSettings {
    fn build(
        transactional_id: Option<String>,
        offsets_topic: Option<String>,
        max_ms: Option<u64>,
        max_events: Option<u64>,
        slot: &str,
    ) -> Result<ExactlyOnceSettings, String> {
        let transactional_id = match transactional_id {
            None => format!("outbox-relay-{slot}"),
            Some(id) if id.trim().is_empty() => {
                return Err(
                    "[kafka] transactional_id is empty; leave it unset for outbox-relay-{slot}"
                        .into(),
                )
            }
            Some(id) => id,
        };
        let offsets_topic = match offsets_topic {
            None => DEFAULT_OFFSETS_TOPIC.to_owned(),
            Some(topic) if topic.trim().is_empty() => {
                return Err(format!(
                    "[kafka] offsets_topic is empty; leave it unset for {DEFAULT_OFFSETS_TOPIC}"
                ))
            }
            Some(name) => {
                topic::check(&name).map_err(|e| format!("[kafka] offsets_topic: {e}"))?;
                name
            }
        };
        let max_ms = max_ms.unwrap_or(DEFAULT_TRANSACTION_MAX_MS);
        let max_events = NonZeroU64::new(max_events.unwrap_or(DEFAULT_TRANSACTION_MAX_EVENTS));
        let (Some(max_events), true) = (max_events, max_ms > 0) else {
            return Err(
                "[kafka] transaction_max_ms and transaction_max_events must be at least 1".into(),
            );
        };
        Ok(ExactlyOnceSettings {
            transactional_id,
            offsets_topic,
            transaction_max_age: Duration::from_millis(max_ms),
            transaction_max_events: max_events,
        })
    }
}

/// The properties exactly-once mode sets itself may be written only with the values it sets.
fn check_reserved(properties: &BTreeMap<String, String>) -> Result<(), String> {
    for (key, why) in RESERVED {
        let Some(value) = properties.get(*key) else {
            continue;
        };
        let harmless = matches!(
            (*key, value.as_str()),
            ("enable.idempotence", "true") | ("acks", "all" | "-1")
        );
        if !harmless {
            return Err(format!(
                "[kafka.properties] {key} = {value:?} cannot be used with delivery = \"exactly-once\": {why}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::MINIMAL;
    use crate::config::Config;

    fn parse(kafka_lines: &str) -> Result<Config, String> {
        let text = format!("{MINIMAL}\n{kafka_lines}");
        Config::parse(&text, "relay.toml", |_| Some("pw".into())).map_err(|e| e.to_string())
    }

    #[test]
    fn at_least_once_is_the_default() {
        let c = parse("").unwrap();
        assert_eq!(c.kafka.delivery, Delivery::AtLeastOnce);
        assert_eq!(c.kafka.exactly_once(), None);
    }

    #[test]
    fn exactly_once_defaults_its_id_topic_and_bounds() {
        let c = parse("delivery = \"exactly-once\"").unwrap();
        assert_eq!(
            c.kafka.exactly_once(),
            Some(&ExactlyOnceSettings {
                transactional_id: "outbox-relay-outbox_relay".into(),
                offsets_topic: DEFAULT_OFFSETS_TOPIC.into(),
                transaction_max_age: Duration::from_millis(DEFAULT_TRANSACTION_MAX_MS),
                transaction_max_events: NonZeroU64::new(DEFAULT_TRANSACTION_MAX_EVENTS).unwrap(),
            })
        );
        let c = parse(
            "delivery = \"exactly-once\"\ntransactional_id = \"shop\"\noffsets_topic = \"o\"\n\
             transaction_max_ms = 5\ntransaction_max_events = 7",
        )
        .unwrap();
        let s = c.kafka.exactly_once().unwrap();
        assert_eq!(
            (
                s.transactional_id.as_str(),
                s.offsets_topic.as_str(),
                s.transaction_max_age,
                s.transaction_max_events.get()
            ),
            ("shop", "o", Duration::from_millis(5), 7)
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
            assert!(
                err.contains(&format!(
                    "[kafka] {key} is used only with delivery = \"exactly-once\""
                )),
                "{err}"
            );
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
            let key = prop.split(' ').next().unwrap().trim_matches('"');
            assert!(err.contains(&format!("[kafka.properties] {key}")), "{err}");
        }
        for harmless in [
            "acks = \"all\"",
            "acks = \"-1\"",
            "\"enable.idempotence\" = \"true\"",
        ] {
            assert!(
                parse(&format!(
                    "delivery = \"exactly-once\"\n[kafka.properties]\n{harmless}"
                ))
                .is_ok(),
                "{harmless}"
            );
        }
    }

    #[test]
    fn zero_bounds_empty_names_snapshots_and_unknown_modes_are_rejected() {
        let snapshot = MINIMAL.replace("[[outbox]]", "initial_snapshot = true\n[[outbox]]")
            + "\ndelivery = \"exactly-once\"";
        let err = Config::parse(&snapshot, "relay.toml", |_| Some("pw".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("initial_snapshot cannot be used"), "{err}");
        for (lines, says) in [
            (
                "transaction_max_events = 0",
                "transaction_max_ms and transaction_max_events must be at least 1",
            ),
            (
                "transaction_max_ms = 0",
                "transaction_max_ms and transaction_max_events must be at least 1",
            ),
            (
                "transactional_id = \" \"",
                "transactional_id is empty; leave it unset for outbox-relay-{slot}",
            ),
            (
                "offsets_topic = \"\"",
                "offsets_topic is empty; leave it unset for outbox-relay-offsets",
            ),
        ] {
            let err = parse(&format!("delivery = \"exactly-once\"\n{lines}")).unwrap_err();
            assert!(err.contains(says), "{lines}: {err}");
        }
        let err = parse("delivery = \"exactly_once\"").unwrap_err();
        assert!(err.contains("exactly_once"), "{err}");
    }

    #[test]
    fn the_default_transactional_id_follows_the_slot() {
        let text = MINIMAL.replace("[[outbox]]", "slot = \"shop\"\n[[outbox]]")
            + "\ndelivery = \"exactly-once\"";
        let c = Config::parse(&text, "relay.toml", |_| Some("pw".into())).unwrap();
        assert_eq!(
            c.kafka.exactly_once().map(|s| s.transactional_id.as_str()),
            Some("outbox-relay-shop")
        );
    }
}
