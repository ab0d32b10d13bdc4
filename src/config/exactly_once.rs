//! The rules for `[kafka] delivery = "exactly-once"` and its keys, checked when the
//! configuration is read so that a bad combination stops the relay before it connects.

use crate::config::{Delivery, KafkaConfig};

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

/// Checks the exactly-once keys of `[kafka]`; a one-line message on error.
pub fn validate(kafka: &KafkaConfig, initial_snapshot: bool) -> Result<(), String> {
    let set = [
        ("transactional_id", kafka.transactional_id.is_some()),
        ("offsets_topic", kafka.offsets_topic.is_some()),
        ("transaction_max_ms", kafka.transaction_max_ms.is_some()),
        (
            "transaction_max_events",
            kafka.transaction_max_events.is_some(),
        ),
    ];
    if kafka.delivery == Delivery::AtLeastOnce {
        if let Some((key, _)) = set.iter().find(|(_, is_set)| *is_set) {
            return Err(format!(
                "[kafka] {key} is used only with delivery = \"exactly-once\"; set that or remove {key}"
            ));
        }
        if kafka.properties.contains_key("transactional.id") {
            return Err("[kafka.properties] transactional.id makes a transactional producer, which the at-least-once mode does not drive; use [kafka] delivery = \"exactly-once\" and transactional_id instead".into());
        }
        return Ok(());
    }
    if initial_snapshot {
        // The snapshot's records go out before any slot position exists to commit them with.
        return Err("[postgres] initial_snapshot cannot be used with [kafka] delivery = \"exactly-once\" yet; take the snapshot with delivery = \"at-least-once\" once, then switch".into());
    }
    for (key, why) in RESERVED {
        let Some(value) = kafka.properties.get(*key) else {
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
    if kafka
        .transactional_id
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err(
            "[kafka] transactional_id is empty; leave it unset for outbox-relay-{slot}".into(),
        );
    }
    if kafka
        .offsets_topic
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err(format!(
            "[kafka] offsets_topic is empty; leave it unset for {DEFAULT_OFFSETS_TOPIC}"
        ));
    }
    if kafka.transaction_max_ms == Some(0) || kafka.transaction_max_events == Some(0) {
        return Err(
            "[kafka] transaction_max_ms and transaction_max_events must be at least 1".into(),
        );
    }
    Ok(())
}
