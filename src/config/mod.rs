//! The relay's TOML configuration: parsing, `${ENV_VAR}` expansion, defaults and validation.

pub mod exactly_once;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not fit the schema (unknown key, wrong type, missing key).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file's path.
        path: String,
        /// What toml said, folded onto one line.
        message: String,
    },
    /// A `${VAR}` names an environment variable that is not set.
    #[error("config file {path}: environment variable {var} is not set (referenced as ${{{var}}}); export it or remove the reference")]
    MissingEnv {
        /// The file's path.
        path: String,
        /// The variable's name.
        var: String,
    },
    /// The values parse but make no sense together.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file's path.
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the outbox lives.
    pub postgres: PostgresConfig,
    /// The outbox tables to relay.
    #[serde(default)]
    pub outbox: Vec<OutboxConfig>,
    /// The table-less outbox: logical decoding messages to relay, by prefix.
    #[serde(default)]
    pub message: Vec<MessageConfig>,
    /// Where records go.
    pub kafka: KafkaConfig,
    /// The Prometheus and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Lifecycle timings.
    #[serde(default)]
    pub relay: RelayConfig,
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
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            shutdown_timeout_secs: default_shutdown_timeout(),
            reconnect_max_backoff_secs: default_max_backoff(),
            stall_timeout_secs: default_stall_timeout(),
        }
    }
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
}

/// `[[outbox]]`: one outbox table and how its rows become records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Table name, optionally schema-qualified (`public` otherwise).
    pub table: String,
    /// Column carrying the event id (the `id` header).
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Column whose value is the record key.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    /// Column carrying the event type (the `type` header).
    #[serde(default = "default_type_column")]
    pub type_column: String,
    /// Column whose value is the record value.
    #[serde(default = "default_payload_column")]
    pub payload_column: String,
    /// Topic template; `{column}` is replaced by that column's value.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Extra columns copied into headers named after the column.
    #[serde(default)]
    pub header_columns: Vec<String>,
    /// Column holding the partition number; NULL (or unset) leaves it to the key's hash.
    #[serde(default)]
    pub partition_column: Option<String>,
    /// CloudEvents binary-mode headers (`ce_*`) on this table's records.
    #[serde(default)]
    pub cloudevents: bool,
    /// The `ce_source` attribute; `/outbox-relay/<schema>.<table>` when unset.
    #[serde(default)]
    pub cloudevents_source: Option<String>,
    /// The `content-type` header (the event's `datacontenttype`); `application/json` when unset.
    #[serde(default)]
    pub cloudevents_content_type: Option<String>,
    /// The column the initial snapshot reads rows in (ascending), so that per-key order of
    /// existing rows can follow a sequence or timestamp; physical order when unset.
    #[serde(default)]
    pub snapshot_order_by: Option<String>,
}

/// `[[message]]`: events emitted with `pg_logical_emit_message(true, prefix, envelope)`, a
/// JSON envelope `{"id", "aggregatetype", "aggregateid", "type", "payload"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageConfig {
    /// The prefix the events are emitted with; messages with other prefixes are not events.
    pub prefix: String,
    /// Topic template; `{field}` is replaced by that envelope field's value.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Extra envelope fields copied into headers named after the field.
    #[serde(default)]
    pub header_fields: Vec<String>,
    /// CloudEvents binary-mode headers (`ce_*`) on these records.
    #[serde(default)]
    pub cloudevents: bool,
    /// The `ce_source` attribute; `/outbox-relay/message/<prefix>` when unset.
    #[serde(default)]
    pub cloudevents_source: Option<String>,
    /// The `content-type` header; `application/json` when unset.
    #[serde(default)]
    pub cloudevents_content_type: Option<String>,
}

impl MessageConfig {
    /// The CloudEvents attributes of these records, if enabled.
    pub fn cloudevents(&self) -> Option<CloudEvents> {
        CloudEvents::resolve(
            self.cloudevents,
            self.cloudevents_source.as_deref(),
            self.cloudevents_content_type.as_deref(),
            || format!("/outbox-relay/message/{}", self.prefix),
        )
    }
}

/// Where records come from: the `[[outbox]]` tables, then the `[[message]]` prefixes, numbered
/// in that order (`Record::table` is this number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The `[[outbox]] table` as configured, or `message:<prefix>`: the metrics' `table` label.
    pub name: String,
    /// Its CloudEvents attributes, when on.
    pub cloudevents: Option<CloudEvents>,
}

/// The field names a topic template refers to, in order.
pub fn template_fields(topic: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = topic;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    out
}

/// A one-line complaint if a topic template's braces do not pair up or name nothing.
fn check_template(section: &str, topic: &str) -> Result<(), String> {
    if topic.matches('{').count() != topic.matches('}').count()
        || template_fields(topic).iter().any(|c| c.is_empty())
    {
        return Err(format!(
            "{section} topic template {topic:?} has unbalanced or empty braces; write e.g. \"outbox.event.{{aggregatetype}}\""
        ));
    }
    Ok(())
}

/// The CloudEvents attributes a source's records carry, once resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvents {
    /// `ce_source`.
    pub source: String,
    /// `content-type`.
    pub content_type: String,
}

impl CloudEvents {
    /// The attributes when `enabled`, each defaulted when unset.
    pub fn resolve(
        enabled: bool,
        source: Option<&str>,
        content_type: Option<&str>,
        default_source: impl FnOnce() -> String,
    ) -> Option<CloudEvents> {
        enabled.then(|| CloudEvents {
            source: source.map_or_else(default_source, str::to_owned),
            content_type: content_type.unwrap_or("application/json").to_owned(),
        })
    }
}

/// `[kafka]`: the brokers and producer settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Where a record the producer refuses for good (e.g. larger than `message.max.bytes`)
    /// goes instead, as a small JSON note; unset, such a record stops the relay.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// librdkafka properties, passed through verbatim; they override the relay's defaults.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// At-least-once (the default) or exactly-once through Kafka transactions.
    #[serde(default)]
    pub delivery: Delivery,
    /// Exactly-once only: the producer's `transactional.id`; `outbox-relay-{slot}` when unset.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Exactly-once only: the topic holding the committed position (one partition, compacted).
    #[serde(default)]
    pub offsets_topic: Option<String>,
    /// Exactly-once only: a Kafka transaction is committed once it is this old (milliseconds).
    #[serde(default)]
    pub transaction_max_ms: Option<u64>,
    /// Exactly-once only: a Kafka transaction is committed once it holds this many events.
    #[serde(default)]
    pub transaction_max_events: Option<u64>,
}

/// `[kafka] delivery`: what a consumer may see after a crash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Every event at least once; duplicates after a crash (consumers dedup by `id`).
    #[default]
    AtLeastOnce,
    /// Every event once for `isolation.level=read_committed` consumers (Kafka transactions).
    ExactlyOnce,
}

fn default_name() -> String {
    "outbox_relay".into()
}
fn default_status_interval() -> u64 {
    10
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

/// The suffix of the temporary slot the initial snapshot is taken with.
pub const SNAPSHOT_SLOT_SUFFIX: &str = "_snapshot";

impl PostgresConfig {
    /// The temporary slot the initial snapshot is exported by: its name is what keeps two
    /// replicas from taking the snapshot at once (slot names are unique server-wide).
    pub fn snapshot_slot(&self) -> String {
        format!("{}{SNAPSHOT_SLOT_SUFFIX}", self.slot)
    }
}

impl OutboxConfig {
    /// The CloudEvents attributes of this table's records, if enabled; the default
    /// `ce_source` is `/outbox-relay/<schema>.<table>`.
    pub fn cloudevents(&self) -> Option<CloudEvents> {
        CloudEvents::resolve(
            self.cloudevents,
            self.cloudevents_source.as_deref(),
            self.cloudevents_content_type.as_deref(),
            || {
                let (schema, name) = self.schema_and_name();
                format!("/outbox-relay/{schema}.{name}")
            },
        )
    }

    /// The table as `(schema, name)`, defaulting the schema to `public`.
    pub fn schema_and_name(&self) -> (&str, &str) {
        self.table
            .split_once('.')
            .unwrap_or(("public", &self.table))
    }

    /// The column names referenced in braces by the topic template.
    pub fn topic_columns(&self) -> Vec<&str> {
        template_fields(&self.topic)
    }

    /// Every column the mapping reads, without repeats.
    pub fn required_columns(&self) -> Vec<&str> {
        let mut cols = vec![
            self.id_column.as_str(),
            self.key_column.as_str(),
            self.type_column.as_str(),
            self.payload_column.as_str(),
        ];
        cols.extend(self.topic_columns());
        cols.extend(self.header_columns.iter().map(String::as_str));
        cols.extend(self.partition_column.as_deref());
        let mut seen = Vec::with_capacity(cols.len());
        cols.retain(|c| {
            let new = !seen.contains(c);
            seen.push(*c);
            new
        });
        cols
    }
}

impl Config {
    /// Every source of records, numbered as `Record::table` numbers them.
    pub fn sources(&self) -> Vec<Source> {
        let tables = self.outbox.iter().map(|o| Source {
            name: o.table.clone(),
            cloudevents: o.cloudevents(),
        });
        let messages = self.message.iter().map(|m| Source {
            name: format!("message:{}", m.prefix),
            cloudevents: m.cloudevents(),
        });
        tables.chain(messages).collect()
    }

    /// Reads, expands and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown, |var| std::env::var(var).ok())
    }

    /// Parses `text`; `env` resolves `${VAR}` references. `path` only labels errors.
    pub fn parse(
        text: &str,
        path: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| parse_error(path, &e))?;
        expand_env(&mut value, &env).map_err(|var| ConfigError::MissingEnv {
            path: path.to_owned(),
            var,
        })?;
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(path, &e))?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.outbox.is_empty() && self.message.is_empty() {
            return Err("no [[outbox]] table (or [[message]] prefix) configured; add one, e.g. [[outbox]] table = \"public.outbox\"".into());
        }
        for name in [&self.postgres.slot, &self.postgres.publication] {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(format!(
                    "slot and publication names may use only lower-case letters, digits and '_' (at most 63): {name:?}"
                ));
            }
        }
        if self.postgres.initial_snapshot && self.postgres.snapshot_slot().len() > 63 {
            return Err(format!(
                "with initial_snapshot = true the slot name may have at most {} characters (the snapshot is taken with a temporary slot named {:?}, and slot names have at most 63): {:?}",
                63 - SNAPSHOT_SLOT_SUFFIX.len(),
                self.postgres.snapshot_slot(),
                self.postgres.slot
            ));
        }
        if self.postgres.status_interval_secs == 0 {
            return Err("[postgres] status_interval_secs must be at least 1".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err("[kafka] brokers is empty; set it to host:port[,host:port]".into());
        }
        exactly_once::validate(&self.kafka, self.postgres.initial_snapshot)?;
        let mut tables = Vec::new();
        for o in &self.outbox {
            if o.table.trim().is_empty() {
                return Err("[[outbox]] table is empty".into());
            }
            let key = o.schema_and_name();
            if tables.contains(&key) {
                return Err(format!(
                    "[[outbox]] table {:?} is configured twice",
                    o.table
                ));
            }
            tables.push(key);
            if o.snapshot_order_by
                .as_deref()
                .is_some_and(|c| c.trim().is_empty())
            {
                return Err(format!(
                    "[[outbox]] table {:?}: snapshot_order_by is empty; name a column (e.g. \"created_at\") or remove the key",
                    o.table
                ));
            }
            check_template("[[outbox]]", &o.topic)?;
        }
        let mut prefixes = Vec::new();
        for m in &self.message {
            if m.prefix.is_empty() || m.prefix.contains('\0') {
                return Err("[[message]] prefix is empty; set it to the prefix the events are emitted with, e.g. prefix = \"outbox\"".into());
            }
            if prefixes.contains(&&m.prefix) {
                return Err(format!(
                    "[[message]] prefix {:?} is configured twice",
                    m.prefix
                ));
            }
            prefixes.push(&m.prefix);
            check_template("[[message]]", &m.topic)?;
        }
        Ok(())
    }
}

fn parse_error(path: &str, e: &toml::de::Error) -> ConfigError {
    // toml's messages span several lines with a source excerpt; keep the error to one line.
    let message = e
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Parse {
        path: path.to_owned(),
        message,
    }
}

/// Replaces `${VAR}` in every string; returns the name of the first variable that is unset.
fn expand_env(
    value: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    match value {
        toml::Value::String(s) => {
            if s.contains("${") {
                *s = expand_str(s, env)?;
            }
            Ok(())
        }
        toml::Value::Array(items) => items.iter_mut().try_for_each(|v| expand_env(v, env)),
        toml::Value::Table(t) => t.iter_mut().try_for_each(|(_, v)| expand_env(v, env)),
        _ => Ok(()),
    }
}

fn expand_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            // An unterminated reference is kept literally rather than guessed at.
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        out.push_str(&env(var).ok_or_else(|| var.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest valid file; it ends inside `[kafka]`, so more keys of it may follow.
    pub(crate) const MINIMAL: &str = r#"
        [postgres]
        url = "postgres://relay:${PGPASSWORD}@db:5432/app"
        [[outbox]]
        table = "public.outbox"
        [kafka]
        brokers = "kafka:9092"
    "#;

    fn env(var: &str) -> Option<String> {
        (var == "PGPASSWORD").then(|| "s3cret".to_owned())
    }

    #[test]
    fn minimal_file_gets_debezium_defaults() {
        let c = Config::parse(MINIMAL, "relay.toml", env).unwrap();
        assert_eq!(c.postgres.url, "postgres://relay:s3cret@db:5432/app");
        assert_eq!(c.postgres.slot, "outbox_relay");
        assert_eq!(c.postgres.publication, "outbox_relay");
        let o = &c.outbox[0];
        assert_eq!(o.schema_and_name(), ("public", "outbox"));
        assert_eq!(o.topic, "outbox.event.{aggregatetype}");
        assert_eq!(
            o.required_columns(),
            ["id", "aggregateid", "type", "payload", "aggregatetype"]
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("url =", "urll =");
        let err = Config::parse(&text, "relay.toml", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("urll"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let err = Config::parse("[postgres\nurl = 1", "relay.toml", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn unset_env_var_is_named() {
        let err = Config::parse(MINIMAL, "relay.toml", |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("PGPASSWORD"), "{err}");
    }

    #[test]
    fn missing_outbox_is_rejected_with_an_example() {
        let text = MINIMAL.replace("[[outbox]]\n        table = \"public.outbox\"", "");
        let err = Config::parse(&text, "relay.toml", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[[outbox]]"), "{err}");
    }

    #[test]
    fn unbalanced_topic_template_is_rejected() {
        let text = MINIMAL.replace(
            "table = \"public.outbox\"",
            "table = \"public.outbox\"\n topic = \"x.{aggregatetype\"",
        );
        assert!(Config::parse(&text, "relay.toml", env).is_err());
    }

    #[test]
    fn initial_snapshot_is_off_by_default_and_parses() {
        let c = Config::parse(MINIMAL, "relay.toml", env).unwrap();
        assert!(!c.postgres.initial_snapshot);
        assert_eq!(c.outbox[0].snapshot_order_by, None);
        let text = MINIMAL
            .replace("[[outbox]]", "initial_snapshot = true\n[[outbox]]")
            .replace(
                "table = \"public.outbox\"",
                "table = \"public.outbox\"\nsnapshot_order_by = \"created_at\"",
            );
        let c = Config::parse(&text, "relay.toml", env).unwrap();
        assert!(c.postgres.initial_snapshot);
        assert_eq!(c.postgres.snapshot_slot(), "outbox_relay_snapshot");
        assert_eq!(c.outbox[0].snapshot_order_by.as_deref(), Some("created_at"));
    }

    #[test]
    fn initial_snapshot_needs_room_for_the_temporary_slot_name() {
        let long = "s".repeat(60);
        let text = MINIMAL.replace(
            "[[outbox]]",
            &format!("slot = \"{long}\"\ninitial_snapshot = true\n[[outbox]]"),
        );
        let err = Config::parse(&text, "relay.toml", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 54") && err.contains(&long), "{err}");
        // Without the snapshot the same name is fine.
        let text = MINIMAL.replace("[[outbox]]", &format!("slot = \"{long}\"\n[[outbox]]"));
        assert!(Config::parse(&text, "relay.toml", env).is_ok());
    }

    #[test]
    fn empty_snapshot_order_by_is_rejected() {
        let text = MINIMAL.replace(
            "table = \"public.outbox\"",
            "table = \"public.outbox\"\nsnapshot_order_by = \" \"",
        );
        let err = Config::parse(&text, "relay.toml", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot_order_by"), "{err}");
    }

    #[test]
    fn topic_columns_are_listed_in_order() {
        let mut c = Config::parse(MINIMAL, "relay.toml", env).unwrap();
        c.outbox[0].topic = "{tenant}.events.{type}".into();
        assert_eq!(c.outbox[0].topic_columns(), ["tenant", "type"]);
    }

    #[test]
    fn cloudevents_is_off_by_default_and_its_attributes_default() {
        let with = |line: &str| {
            let text = MINIMAL.replace(
                "table = \"public.outbox\"",
                &format!("table = \"public.outbox\"\n{line}"),
            );
            Config::parse(&text, "relay.toml", env).map(|c| c.outbox[0].cloudevents())
        };
        assert_eq!(with("").unwrap(), None);
        assert_eq!(with("cloudevents = false").unwrap(), None);
        let on = with("cloudevents = true").unwrap().unwrap();
        assert_eq!(on.source, "/outbox-relay/public.outbox");
        assert_eq!(on.content_type, "application/json");
        let custom = with(
            "cloudevents = true\ncloudevents_source = \"/shop\"\ncloudevents_content_type = \"text/plain\"",
        )
            .unwrap()
            .unwrap();
        assert_eq!(
            (custom.source.as_str(), custom.content_type.as_str()),
            ("/shop", "text/plain")
        );
        assert_eq!(
            with("cloudevents_source = \"/shop\"").unwrap(),
            None,
            "off unless enabled"
        );
    }
}
