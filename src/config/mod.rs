//! The relay's TOML configuration, read into typed values: the file's shape ([`file`]),
//! `${ENV_VAR}` expansion, defaults, and the checks that make the values usable as they are
//! (one home for every rule, so no other module checks a setting again). It depends on
//! nothing else in the crate: every other module reads it.

mod env;
pub mod file;
mod kafka;
mod sources;
pub mod topic;

use std::path::Path;

pub use file::{
    ConfigFile, FailoverSlot, MetricsConfig, PostgresConfig, RecordFormat, RelayConfig,
    SNAPSHOT_SLOT_SUFFIX,
};
pub use kafka::{
    Delivery, ExactlyOnceSettings, KafkaConfig, DEFAULT_OFFSETS_TOPIC,
    DEFAULT_TRANSACTION_MAX_EVENTS, DEFAULT_TRANSACTION_MAX_MS,
};
pub use sources::{CloudEvents, MessageConfig, OutboxConfig, Source};

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

/// The whole configuration, checked and with every default filled in. Only
/// [`Config::parse`] (or [`Config::load`]) makes one: the file's shape is [`ConfigFile`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the outbox lives.
    pub postgres: PostgresConfig,
    /// The outbox tables to relay.
    pub outbox: Vec<OutboxConfig>,
    /// The table-less outbox: logical decoding messages to relay, by prefix.
    pub message: Vec<MessageConfig>,
    /// Where records go.
    pub kafka: KafkaConfig,
    /// The Prometheus and health endpoint.
    pub metrics: MetricsConfig,
    /// Lifecycle timings.
    pub relay: RelayConfig,
}

impl Config {
    /// Every source of records, numbered as `Record::table` numbers them.
    pub fn sources(&self) -> Vec<Source> {
        let tables = self.outbox.iter().map(|o| Source {
            name: o.table.clone(),
            cloudevents: o.cloudevents.clone(),
        });
        let messages = self.message.iter().map(|m| Source {
            name: format!("message:{}", m.prefix),
            cloudevents: m.cloudevents.clone(),
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
        env::expand_env(&mut value, &env).map_err(|var| ConfigError::MissingEnv {
            path: path.to_owned(),
            var,
        })?;
        let file: ConfigFile = value
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(path, &e))?;
        Config::build(file).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// The typed values of `file`, or what is wrong with it on one line. The checks run
    /// section by section in the file's order, so the first problem is the one reported.
    fn build(file: ConfigFile) -> Result<Config, String> {
        let ConfigFile {
            postgres,
            outbox,
            message,
            kafka,
            metrics,
            relay,
        } = file;
        if outbox.is_empty() && message.is_empty() {
            return Err("no [[outbox]] table (or [[message]] prefix) configured; add one, e.g. [[outbox]] table = \"public.outbox\"".into());
        }
        check_postgres(&postgres)?;
        let kafka = KafkaConfig::build(kafka, &postgres.slot, postgres.initial_snapshot)?;
        let outbox = OutboxConfig::build_all(outbox)?;
        let message = MessageConfig::build_all(message)?;
        Ok(Config {
            postgres,
            outbox,
            message,
            kafka,
            metrics,
            relay,
        })
    }
}

fn check_postgres(postgres: &PostgresConfig) -> Result<(), String> {
    for name in [&postgres.slot, &postgres.publication] {
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
    if postgres.initial_snapshot && postgres.snapshot_slot().len() > 63 {
        return Err(format!(
            "with initial_snapshot = true the slot name may have at most {} characters (the snapshot is taken with a temporary slot named {:?}, and slot names have at most 63): {:?}",
            63 - SNAPSHOT_SLOT_SUFFIX.len(),
            postgres.snapshot_slot(),
            postgres.slot
        ));
    }
    if postgres.status_interval_secs == 0 {
        return Err("[postgres] status_interval_secs must be at least 1".into());
    }
    Ok(())
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

    pub(crate) fn env(var: &str) -> Option<String> {
        (var == "PGPASSWORD").then(|| "s3cret".to_owned())
    }

    /// The one-line error `text` is refused with.
    pub(crate) fn parse_err(text: &str) -> String {
        Config::parse(text, "relay.toml", env)
            .unwrap_err()
            .to_string()
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
        let err = parse_err(&text);
        assert!(err.contains("urll"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let err = parse_err("[postgres\nurl = 1");
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
        let err = parse_err(&text);
        assert!(err.contains("[[outbox]]"), "{err}");
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
        let err = parse_err(&text);
        assert!(err.contains("at most 54") && err.contains(&long), "{err}");
        // Without the snapshot the same name is fine.
        let text = MINIMAL.replace("[[outbox]]", &format!("slot = \"{long}\"\n[[outbox]]"));
        assert!(Config::parse(&text, "relay.toml", env).is_ok());
    }
}
