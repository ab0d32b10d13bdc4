//! The configuration file as written: every TOML key, its type and its default. The
//! `[[outbox]]`, `[[message]]` and `[kafka]` sections are only the raw material of the typed
//! values in [`Config`](super::Config), which `Config::parse` builds and checks; the
//! `[postgres]`, `[metrics]` and `[relay]` sections are used as they are read.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file. Deserializing it checks only the shape (unknown keys, types, missing
/// keys); combining the keys and checking that they make sense is `Config::parse`'s job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[postgres]`.
    pub postgres: PostgresConfig,
    /// `[[outbox]]`.
    #[serde(default)]
    pub outbox: Vec<OutboxFile>,
    /// `[[message]]`.
    #[serde(default)]
    pub message: Vec<MessageFile>,
    /// `[kafka]`.
    pub kafka: KafkaFile,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[relay]`.
    #[serde(default)]
    pub relay: RelayConfig,
}

/// `[postgres]`: the database, slot and publication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style connection URL.
    pub url: String,
    /// A file whose contents (trimmed) are the password; overrides any password in `url`.
    pub password_file: Option<String>,
    /// Logical replication slot name.
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication name.
    #[serde(default = "default_name")]
    pub publication: String,
    /// Upper bound between two standby status updates, in seconds.
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: u64,
    /// When the relay creates the slot, first publish the rows already in the outbox tables,
    /// read in the snapshot the slot's creation exports (see `snapshot`).
    #[serde(default)]
    pub initial_snapshot: bool,
    /// Whether the slot is kept a failover slot (PostgreSQL 17+), synchronised to physical
    /// standbys so that it survives a failover: unset is "where the server has them"; see
    /// [`PostgresConfig::failover`].
    pub failover_slot: Option<bool>,
}

/// `[postgres] failover_slot`, as the relay acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailoverSlot {
    /// Unset: on where the server supports it (17 and later).
    #[default]
    Auto,
    /// `true`: on, and a server without failover slots is a configuration error.
    On,
    /// `false`: the relay leaves the slot as it is.
    Off,
}

impl PostgresConfig {
    /// `failover_slot` as a decision.
    pub fn failover(&self) -> FailoverSlot {
        match self.failover_slot {
            None => FailoverSlot::Auto,
            Some(true) => FailoverSlot::On,
            Some(false) => FailoverSlot::Off,
        }
    }
}

/// The suffix of the temporary slot the initial snapshot is taken with.
pub const SNAPSHOT_SLOT_SUFFIX: &str = "_snapshot";

impl PostgresConfig {
    /// The temporary slot the initial snapshot is exported by: its name is what keeps two
    /// replicas from taking the snapshot at once (slot names are unique server-wide).
    pub fn snapshot_slot(&self) -> String {
        format!("{}{SNAPSHOT_SLOT_SUFFIX}", self.slot)
    }
}

/// `[metrics]`: where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address, e.g. `0.0.0.0:9187`; no endpoint when absent.
    pub listen: Option<String>,
}

/// `[relay]`: lifecycle timings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// On SIGTERM, how long to wait for Kafka to acknowledge queued records.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// Upper bound of the reconnect backoff.
    #[serde(default = "default_max_backoff")]
    pub reconnect_max_backoff_secs: u64,
    /// `/readyz` fails when a record waits longer than this for its ack while lag grows.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: u64,
    /// Closes the replication session once Kafka has acknowledged nothing for this long while
    /// records wait, so PostgreSQL can shut down or switch over; 0: never.
    #[serde(default = "default_release_session_after")]
    pub release_session_after_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            shutdown_timeout_secs: default_shutdown_timeout(),
            reconnect_max_backoff_secs: default_max_backoff(),
            stall_timeout_secs: default_stall_timeout(),
            release_session_after_secs: default_release_session_after(),
        }
    }
}

/// `[[outbox]]` as written; see [`OutboxConfig`](super::OutboxConfig) for what each key does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxFile {
    /// `table`.
    pub table: String,
    /// `id_column`.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// `key_column`.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    /// `type_column`.
    #[serde(default = "default_type_column")]
    pub type_column: String,
    /// `payload_column`.
    #[serde(default = "default_payload_column")]
    pub payload_column: String,
    /// `topic`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `header_columns`.
    #[serde(default)]
    pub header_columns: Vec<String>,
    /// `partition_column`.
    #[serde(default)]
    pub partition_column: Option<String>,
    /// `cloudevents`: whether the two keys after it apply.
    #[serde(default)]
    pub cloudevents: bool,
    /// `cloudevents_source`; `/outbox-relay/<schema>.<table>` when unset.
    #[serde(default)]
    pub cloudevents_source: Option<String>,
    /// `cloudevents_content_type`; `application/json` when unset.
    #[serde(default)]
    pub cloudevents_content_type: Option<String>,
    /// `snapshot_order_by`.
    #[serde(default)]
    pub snapshot_order_by: Option<String>,
    /// `format`.
    #[serde(default)]
    pub format: RecordFormat,
}

/// `[[message]]` as written; see [`MessageConfig`](super::MessageConfig).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageFile {
    /// `prefix`.
    pub prefix: String,
    /// `topic`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `header_fields`.
    #[serde(default)]
    pub header_fields: Vec<String>,
    /// `cloudevents`: whether the two keys after it apply.
    #[serde(default)]
    pub cloudevents: bool,
    /// `cloudevents_source`; `/outbox-relay/message/<prefix>` when unset.
    #[serde(default)]
    pub cloudevents_source: Option<String>,
    /// `cloudevents_content_type`; `application/json` when unset.
    #[serde(default)]
    pub cloudevents_content_type: Option<String>,
    /// `format`.
    #[serde(default)]
    pub format: RecordFormat,
}

/// `[kafka]` as written; see [`KafkaConfig`](super::KafkaConfig). The exactly-once keys are
/// optional here because they may be written only with `delivery = "exactly-once"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    /// `brokers`.
    pub brokers: String,
    /// `dead_letter_topic`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// `[kafka.properties]`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// `delivery`.
    #[serde(default)]
    pub delivery: DeliveryMode,
    /// `transactional_id`; `outbox-relay-{slot}` when unset.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// `offsets_topic`; `outbox-relay-offsets` when unset.
    #[serde(default)]
    pub offsets_topic: Option<String>,
    /// `transaction_max_ms`; 100 when unset.
    #[serde(default)]
    pub transaction_max_ms: Option<u64>,
    /// `transaction_max_events`; 10,000 when unset.
    #[serde(default)]
    pub transaction_max_events: Option<u64>,
}

/// `[kafka] delivery` as written: the word alone, its settings being keys of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// `"at-least-once"`.
    #[default]
    AtLeastOnce,
    /// `"exactly-once"`.
    ExactlyOnce,
}

/// `[[outbox]] format` and `[[message]] format`: the bytes of a record's key and value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordFormat {
    /// `"plain"`: the key column's text and the payload column's text (or bytea bytes), as
    /// stored.
    #[default]
    Plain,
    /// `"debezium-json"`: the key and the value each wrapped in the JSON envelope Debezium's
    /// Outbox Event Router sends with Kafka Connect's JsonConverter at its defaults
    /// (`{"schema":...,"payload":...}`), so that consumers written for those records read the
    /// relay's unchanged.
    DebeziumJson,
}

fn default_name() -> String {
    "outbox_relay".into()
}
fn default_status_interval() -> u64 {
    10
}
fn default_shutdown_timeout() -> u64 {
    10
}
fn default_max_backoff() -> u64 {
    30
}
fn default_stall_timeout() -> u64 {
    60
}
/// A few seconds: well inside `pg_ctl`'s 60 s and Patroni's switchover waits, well above a
/// healthy broker's acknowledgement time.
fn default_release_session_after() -> u64 {
    5
}
fn default_id_column() -> String {
    "id".into()
}
fn default_key_column() -> String {
    "aggregateid".into()
}
fn default_type_column() -> String {
    "type".into()
}
fn default_payload_column() -> String {
    "payload".into()
}
fn default_topic() -> String {
    "outbox.event.{aggregatetype}".into()
}
