//! The table-less outbox: turns a logical decoding message (`pg_logical_emit_message`) with a
//! configured prefix into a Kafka record, like a row of an outbox table.
//!
//! The message content is a JSON envelope, `{"id", "aggregatetype", "aggregateid", "type",
//! "payload"}`: the key is `aggregateid`, the value `payload` (its JSON text as sent; a JSON
//! string's contents, like a text column), headers `id` and `type`. Only the envelope's top
//! level is looked at; the payload's JSON is passed through, not parsed into values.

use std::convert::Infallible;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::topic::Template;
use crate::config::{MessageConfig, RecordFormat};
use crate::mapping::debezium::Envelopes;
use crate::mapping::outbox::{render_topic, resolve_topic, TopicPart};
use crate::mapping::record::Record;

/// Envelope fields with a fixed role, in slot order.
const FIXED: [&str; 4] = ["id", "aggregateid", "type", "payload"];
const ID_SLOT: usize = 0;
const KEY_SLOT: usize = 1;
const KIND_SLOT: usize = 2;
const PAYLOAD_SLOT: usize = 3;

/// Why a message with a configured prefix could not become a record.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The content is not a JSON object (or its field names use escapes).
    #[error("the content is not a JSON envelope object ({0})")]
    NotJson(String),
    /// The envelope has no (or a null) `id`, which consumers deduplicate on.
    #[error("the envelope has no \"id\"")]
    NoId,
    /// A field the topic template needs is missing or null.
    #[error("event {event_id:?}: envelope field {field:?} used by the topic template is missing or null; the record has no topic")]
    NullTopicField {
        /// The event id.
        event_id: String,
        /// The field.
        field: String,
    },
}

/// How one prefix's messages become records.
#[derive(Debug)]
struct Plan {
    /// Its number among the relay's sources (`Record::table`).
    source: usize,
    prefix: Vec<u8>,
    /// The envelope field behind each slot: the fixed ones, then topic and header fields.
    fields: Vec<String>,
    topic: Vec<TopicPart>,
    /// `(header name, slot)`.
    headers: Vec<(String, usize)>,
    /// The JSON envelopes of key and value under `format = "debezium-json"`.
    envelopes: Option<Envelopes>,
}

/// Maps messages of the configured prefixes; other prefixes are not events.
#[derive(Debug)]
pub struct MessageMapper {
    plans: Vec<Plan>,
    topic: String,
    /// Per slot, room for a JSON string's unescaped contents.
    bufs: Vec<String>,
    /// The enveloped key and value, under `format = "debezium-json"`.
    key_envelope: Vec<u8>,
    payload_envelope: Vec<u8>,
}

/// Reads an envelope's top level, keeping only the raw values of the fields a plan needs (by
/// slot): no map is built, and other fields are skipped over unparsed.
struct Pick<'p, 'a> {
    fields: &'p [String],
    raw: &'p mut Vec<Option<&'a RawValue>>,
}

impl<'de, 'p> DeserializeSeed<'de> for Pick<'p, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'p> Visitor<'de> for Pick<'p, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<&'de str>()? {
            match self.fields.iter().position(|f| f == key) {
                Some(slot) => self.raw[slot] = Some(map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

impl MessageMapper {
    /// A mapper for these `[[message]]` entries; `first_source` is the first one's source number.
    pub fn new(messages: &[MessageConfig], first_source: usize) -> Self {
        let plans = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut fields: Vec<String> = FIXED.iter().map(|f| (*f).to_owned()).collect();
                let mut slot_of = |name: &str| -> usize {
                    fields.iter().position(|f| f == name).unwrap_or_else(|| {
                        fields.push(name.to_owned());
                        fields.len() - 1
                    })
                };
                // Validated with the config; an unusable one renders the empty name, which
                // the producer refuses as illegal.
                let topic = match Template::parse(&m.topic) {
                    Ok(template) => {
                        let Ok(parts) =
                            resolve_topic(&template, |name| Ok::<_, Infallible>(slot_of(name)));
                        parts
                    }
                    Err(_) => Vec::new(),
                };
                let headers = m
                    .header_fields
                    .iter()
                    .map(|h| (h.clone(), slot_of(h)))
                    .collect();
                Plan {
                    source: first_source + i,
                    prefix: m.prefix.as_bytes().to_vec(),
                    fields,
                    topic,
                    headers,
                    envelopes: match m.format {
                        RecordFormat::Plain => None,
                        RecordFormat::DebeziumJson => Some(Envelopes::DEFAULT),
                    },
                }
            })
            .collect();
        MessageMapper {
            plans,
            topic: String::new(),
            bufs: Vec::new(),
            key_envelope: Vec::new(),
            payload_envelope: Vec::new(),
        }
    }

    /// Whether any prefix is configured (pgoutput then has to send messages).
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// The source number of a configured prefix.
    pub fn source_of(&self, prefix: &[u8]) -> Option<usize> {
        self.plans
            .iter()
            .find(|p| p.prefix == prefix)
            .map(|p| p.source)
    }

    /// The record for a message, or `None` when its prefix is not configured.
    pub fn map<'a>(
        &'a mut self,
        prefix: &[u8],
        content: &'a [u8],
    ) -> Result<Option<Record<'a>>, EnvelopeError> {
        let Some(plan) = self.plans.iter().find(|p| p.prefix == prefix) else {
            return Ok(None);
        };
        let mut raw = vec![None; plan.fields.len()];
        let not_json = |e: serde_json::Error| EnvelopeError::NotJson(e.to_string());
        let mut de = serde_json::Deserializer::from_slice(content);
        Pick {
            fields: &plan.fields,
            raw: &mut raw,
        }
        .deserialize(&mut de)
        .map_err(not_json)?;
        de.end().map_err(not_json)?;
        if self.bufs.len() < plan.fields.len() {
            self.bufs.resize_with(plan.fields.len(), String::new);
        }
        let mut values = Vec::with_capacity(plan.fields.len());
        for (raw, buf) in raw.into_iter().zip(self.bufs.iter_mut()) {
            values.push(raw.map_or(Ok(None), |raw| text_of(raw, buf))?);
        }
        let id = values[ID_SLOT].ok_or(EnvelopeError::NoId)?;
        render_topic(&plan.topic, &mut self.topic, |slot| values[slot]).map_err(|field| {
            EnvelopeError::NullTopicField {
                event_id: String::from_utf8_lossy(id).into_owned(),
                field: field.to_owned(),
            }
        })?;
        let (key, payload) = match &plan.envelopes {
            None => (values[KEY_SLOT], values[PAYLOAD_SLOT]),
            Some(e) => (
                e.key(values[KEY_SLOT], &mut self.key_envelope),
                Some(e.payload(values[PAYLOAD_SLOT], &mut self.payload_envelope)),
            ),
        };
        Ok(Some(Record {
            table: Some(plan.source),
            topic: &self.topic,
            key,
            payload,
            id: Some(id),
            kind: values[KIND_SLOT],
            extra_headers: plan
                .headers
                .iter()
                .map(|(name, slot)| (name.as_str(), values[*slot]))
                .collect(),
            partition: None,
            time: None,
        }))
    }
}

/// A field's value as bytes: a JSON string's contents (borrowed unless it has escapes, then
/// unescaped into `buf`), `None` for null, any other JSON as its text.
fn text_of<'a>(raw: &'a RawValue, buf: &'a mut String) -> Result<Option<&'a [u8]>, EnvelopeError> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return Ok(Some(text.as_bytes()));
    };
    if !inner.contains('\\') {
        return Ok(Some(inner.as_bytes()));
    }
    *buf = serde_json::from_str(text).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    Ok(Some(buf.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn mapper(extra: &str) -> MessageMapper {
        let text = format!(
            "[postgres]\nurl = \"postgres://x@h/db\"\n[[message]]\nprefix = \"outbox\"\n{extra}\n[kafka]\nbrokers = \"k:9092\"\n"
        );
        let c = Config::parse(&text, "t.toml", |_| None).unwrap();
        MessageMapper::new(&c.message, c.outbox.len())
    }

    const EVENT: &[u8] = br#"{"id": "e-1", "aggregatetype": "order", "aggregateid": "o-1",
        "type": "OrderCreated", "payload": {"total": 12.5, "lines": [1, 2]}}"#;

    #[test]
    fn envelope_fields_become_topic_key_value_and_headers() {
        let mut m = mapper("");
        let r = m.map(b"outbox", EVENT).unwrap().unwrap();
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(r.key, Some(&b"o-1"[..]));
        assert_eq!(r.payload, Some(&br#"{"total": 12.5, "lines": [1, 2]}"#[..]));
        assert_eq!(
            r.headers().collect::<Vec<_>>(),
            [
                ("id", Some(&b"e-1"[..])),
                ("type", Some(&b"OrderCreated"[..]))
            ]
        );
    }

    #[test]
    fn debezium_json_format_envelopes_key_and_value_like_the_default_table() {
        let mut m = mapper("format = \"debezium-json\"");
        let r = m.map(b"outbox", EVENT).unwrap().unwrap();
        assert_eq!(
            r.key,
            Some(&br#"{"schema":{"type":"string","optional":false},"payload":"o-1"}"#[..])
        );
        assert_eq!(
            r.payload,
            Some(&br#"{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1},"payload":"{\"total\": 12.5, \"lines\": [1, 2]}"}"#[..])
        );
        let r = m
            .map(
                b"outbox",
                br#"{"id": "e", "aggregatetype": "a", "payload": null}"#,
            )
            .unwrap()
            .unwrap();
        assert_eq!(r.key, None, "no aggregateid, no key");
        assert!(r.payload.unwrap().ends_with(br#""payload":null}"#));
    }

    #[test]
    fn other_prefixes_are_not_events() {
        assert!(mapper("").map(b"audit", EVENT).unwrap().is_none());
    }

    #[test]
    fn strings_are_unescaped_numbers_kept_and_null_payload_is_absent() {
        let mut m = mapper("topic = \"t.{tenant}\"\nheader_fields = [\"tenant\"]");
        let content = br#"{"id": 42, "aggregateid": "a\"b", "tenant": "t\u00fc", "payload": null}"#;
        let r = m.map(b"outbox", content).unwrap().unwrap();
        assert_eq!(r.id, Some(&b"42"[..]));
        assert_eq!(r.key, Some(&b"a\"b"[..]));
        assert_eq!(r.topic, "t.tü");
        assert_eq!(r.payload, None);
        assert_eq!(r.kind, None);
        assert_eq!(r.extra_headers, [("tenant", Some("tü".as_bytes()))]);
        // A string payload is sent as its contents, like a text column.
        let r = m
            .map(
                b"outbox",
                br#"{"id": "e", "tenant": "x", "payload": "plain"}"#,
            )
            .unwrap()
            .unwrap();
        assert_eq!(r.payload, Some(&b"plain"[..]));
    }

    #[test]
    fn bad_envelopes_are_errors_naming_the_problem() {
        let mut m = mapper("");
        for (content, want) in [
            (&b"not json"[..], "not a JSON envelope"),
            (b"[1, 2]", "not a JSON envelope"),
            (b"", "not a JSON envelope"),
            (br#"{"aggregatetype": "order"}"#, "no \"id\""),
            (br#"{"id": "e-9", "payload": {}}"#, "aggregatetype"),
        ] {
            let err = m.map(b"outbox", content).unwrap_err().to_string();
            assert!(err.contains(want), "{content:?}: {err}");
        }
    }
}
