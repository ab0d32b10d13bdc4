//! Where records come from, as typed values: the `[[outbox]]` tables and the `[[message]]`
//! prefixes, their topic templates and their CloudEvents attributes (resolved here, defaults
//! included, so the producer never sees half of them).

use super::file::{MessageFile, OutboxFile, RecordFormat};
use super::topic::Template;

/// `[[outbox]]`: one outbox table and how its rows become records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Table name, optionally schema-qualified (`public` otherwise).
    pub table: String,
    /// Column carrying the event id (the `id` header).
    pub id_column: String,
    /// Column whose value is the record key.
    pub key_column: String,
    /// Column carrying the event type (the `type` header).
    pub type_column: String,
    /// Column whose value is the record value.
    pub payload_column: String,
    /// Topic template; `{column}` is replaced by that column's value.
    pub topic: String,
    /// Extra columns copied into headers named after the column.
    pub header_columns: Vec<String>,
    /// Column holding the partition number; NULL (or unset) leaves it to the key's hash.
    pub partition_column: Option<String>,
    /// CloudEvents binary-mode headers (`ce_*`) on this table's records, when on.
    pub cloudevents: Option<CloudEvents>,
    /// The column the initial snapshot reads rows in (ascending), so that per-key order of
    /// existing rows can follow a sequence or timestamp; physical order when unset.
    pub snapshot_order_by: Option<String>,
    /// The bytes of the key and value: as stored, or in Debezium's JSON envelope.
    pub format: RecordFormat,
}

/// `[[message]]`: events emitted with `pg_logical_emit_message(true, prefix, envelope)`, a
/// JSON envelope `{"id", "aggregatetype", "aggregateid", "type", "payload"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageConfig {
    /// The prefix the events are emitted with; messages with other prefixes are not events.
    pub prefix: String,
    /// Topic template; `{field}` is replaced by that envelope field's value.
    pub topic: String,
    /// Extra envelope fields copied into headers named after the field.
    pub header_fields: Vec<String>,
    /// CloudEvents binary-mode headers (`ce_*`) on these records, when on.
    pub cloudevents: Option<CloudEvents>,
    /// The bytes of the key and value: as sent, or in Debezium's JSON envelope.
    pub format: RecordFormat,
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

/// The CloudEvents attributes a source's records carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvents {
    /// `ce_source`.
    pub source: String,
    /// `content-type`.
    pub content_type: String,
}

impl CloudEvents {
    /// The attributes when `enabled`, each defaulted when unset. Set but not enabled, they
    /// are ignored, so that `cloudevents = false` alone switches the headers off.
    fn resolve(
        enabled: bool,
        source: Option<String>,
        content_type: Option<String>,
        default_source: impl FnOnce() -> String,
    ) -> Option<CloudEvents> {
        enabled.then(|| CloudEvents {
            source: source.unwrap_or_else(default_source),
            content_type: content_type.unwrap_or_else(|| "application/json".to_owned()),
        })
    }
}

/// A one-line complaint if a topic template cannot make legal topic names.
fn check_template(section: &str, topic: &str) -> Result<(), String> {
    Template::parse(topic)
        .map(|_| ())
        .map_err(|e| format!("{section} {e}"))
}

impl OutboxConfig {
    /// Types and checks the `[[outbox]]` sections: a table at most once, usable templates.
    pub(super) fn build_all(files: Vec<OutboxFile>) -> Result<Vec<OutboxConfig>, String> {
        let mut out: Vec<OutboxConfig> = Vec::with_capacity(files.len());
        for file in files {
            if file.table.trim().is_empty() {
                return Err("[[outbox]] table is empty".into());
            }
            let o = OutboxConfig::build(file);
            if out
                .iter()
                .any(|seen| seen.schema_and_name() == o.schema_and_name())
            {
                return Err(format!(
                    "[[outbox]] table {:?} is configured twice",
                    o.table
                ));
            }
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
            out.push(o);
        }
        Ok(out)
    }

    fn build(file: OutboxFile) -> OutboxConfig {
        let OutboxFile {
            table,
            id_column,
            key_column,
            type_column,
            payload_column,
            topic,
            header_columns,
            partition_column,
            cloudevents,
            cloudevents_source,
            cloudevents_content_type,
            snapshot_order_by,
            format,
        } = file;
        let (schema, name) = split_table(&table);
        let cloudevents = CloudEvents::resolve(
            cloudevents,
            cloudevents_source,
            cloudevents_content_type,
            || format!("/outbox-relay/{schema}.{name}"),
        );
        OutboxConfig {
            table,
            id_column,
            key_column,
            type_column,
            payload_column,
            topic,
            header_columns,
            partition_column,
            cloudevents,
            snapshot_order_by,
            format,
        }
    }

    /// The table as `(schema, name)`, defaulting the schema to `public`.
    pub fn schema_and_name(&self) -> (&str, &str) {
        split_table(&self.table)
    }

    /// The column names referenced in braces by the topic template.
    pub fn topic_columns(&self) -> Vec<&str> {
        Template::parse(&self.topic).map_or_else(|_| Vec::new(), |t| t.fields().collect())
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

fn split_table(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

impl MessageConfig {
    /// Types and checks the `[[message]]` sections: a usable prefix at most once, usable
    /// templates.
    pub(super) fn build_all(files: Vec<MessageFile>) -> Result<Vec<MessageConfig>, String> {
        let mut out: Vec<MessageConfig> = Vec::with_capacity(files.len());
        for file in files {
            let MessageFile {
                prefix,
                topic,
                header_fields,
                cloudevents,
                cloudevents_source,
                cloudevents_content_type,
                format,
            } = file;
            if prefix.is_empty() || prefix.contains('\0') {
                return Err("[[message]] prefix is empty; set it to the prefix the events are emitted with, e.g. prefix = \"outbox\"".into());
            }
            if out.iter().any(|m| m.prefix == prefix) {
                return Err(format!("[[message]] prefix {prefix:?} is configured twice"));
            }
            check_template("[[message]]", &topic)?;
            let cloudevents = CloudEvents::resolve(
                cloudevents,
                cloudevents_source,
                cloudevents_content_type,
                || format!("/outbox-relay/message/{prefix}"),
            );
            out.push(MessageConfig {
                prefix,
                topic,
                header_fields,
                cloudevents,
                format,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{env, parse_err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn topic_columns_are_listed_in_order() {
        let mut c = Config::parse(MINIMAL, "relay.toml", env).unwrap();
        c.outbox[0].topic = "{tenant}.events.{type}".into();
        assert_eq!(c.outbox[0].topic_columns(), ["tenant", "type"]);
    }

    #[test]
    fn unbalanced_topic_template_is_rejected() {
        let text = MINIMAL.replace(
            "table = \"public.outbox\"",
            "table = \"public.outbox\"\n topic = \"x.{aggregatetype\"",
        );
        let err = parse_err(&text);
        assert!(err.contains("unbalanced or empty braces"), "{err}");
    }

    #[test]
    fn a_table_or_prefix_configured_twice_is_named() {
        let text = MINIMAL.replace(
            "[kafka]",
            "[[outbox]]\ntable = \"outbox\"\n[kafka]", // the same as public.outbox
        );
        let err = parse_err(&text);
        assert!(err.contains("\"outbox\" is configured twice"), "{err}");
        let text = MINIMAL.replace(
            "[kafka]",
            "[[message]]\nprefix = \"p\"\n[[message]]\nprefix = \"p\"\n[kafka]",
        );
        let err = parse_err(&text);
        assert!(err.contains("prefix \"p\" is configured twice"), "{err}");
    }

    #[test]
    fn empty_snapshot_order_by_is_rejected() {
        let text = MINIMAL.replace(
            "table = \"public.outbox\"",
            "table = \"public.outbox\"\nsnapshot_order_by = \" \"",
        );
        let err = parse_err(&text);
        assert!(err.contains("snapshot_order_by"), "{err}");
    }

    #[test]
    fn format_is_plain_by_default_and_unknown_ones_name_the_allowed() {
        use crate::config::RecordFormat;
        let with = |line: &str| {
            MINIMAL.replace(
                "table = \"public.outbox\"",
                &format!("table = \"public.outbox\"\n{line}"),
            )
        };
        let format =
            |line: &str| Config::parse(&with(line), "relay.toml", env).map(|c| c.outbox[0].format);
        assert_eq!(format("").unwrap(), RecordFormat::Plain);
        assert_eq!(format("format = \"plain\"").unwrap(), RecordFormat::Plain);
        assert_eq!(
            format("format = \"debezium-json\"").unwrap(),
            RecordFormat::DebeziumJson
        );
        let err = parse_err(&with("format = \"debezium\""));
        assert!(
            err.contains("debezium") && err.contains("`plain`") && err.contains("`debezium-json`"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn cloudevents_is_off_by_default_and_its_attributes_default() {
        let with = |line: &str| {
            let text = MINIMAL.replace(
                "table = \"public.outbox\"",
                &format!("table = \"public.outbox\"\n{line}"),
            );
            Config::parse(&text, "relay.toml", env).map(|c| c.outbox[0].cloudevents.clone())
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

    #[test]
    fn sources_number_tables_then_prefixes_with_their_cloudevents() {
        let text = MINIMAL.replace(
            "[kafka]",
            "[[message]]\nprefix = \"shop\"\ncloudevents = true\n[kafka]",
        );
        let c = Config::parse(&text, "relay.toml", env).unwrap();
        let sources = c.sources();
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["public.outbox", "message:shop"]);
        assert_eq!(sources[0].cloudevents, None);
        assert_eq!(
            sources[1].cloudevents.as_ref().map(|ce| ce.source.as_str()),
            Some("/outbox-relay/message/shop")
        );
    }
}
