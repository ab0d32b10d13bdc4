//! The outbox mapping: turns an inserted outbox row into a Kafka record (topic, key, value,
//! headers), Debezium Outbox Event Router compatible by default.
//!
//! A plan is built once per Relation message (column positions, which are bytea, the parsed
//! topic template), so the per-row path only picks values out of the tuple.

use crate::config::topic::{Piece, Template, TemplateError};
use crate::config::{OutboxConfig, RecordFormat};
use crate::fxhash::FxHashMap;
use crate::mapping::debezium::{self, Envelopes};
use crate::mapping::record::Record;
use crate::postgres::pgoutput::{DecodeError, Relation, Tuple, Value};

/// PostgreSQL's type oid for `bytea`, whose text form is hex and must be sent as raw bytes.
const BYTEA_OID: u32 = 17;

/// Why a row could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// A configured column is not in the table (at start, or after an ALTER TABLE).
    #[error("outbox table {table} has no column {column:?} (configured as {role}); add the column or change {role} in the [[outbox]] entry")]
    MissingColumn {
        /// The table.
        table: String,
        /// The missing column.
        column: String,
        /// Which config key names it.
        role: &'static str,
    },
    /// A column the topic template needs is NULL in a row.
    #[error("event {event_id:?} in {table}: column {column:?} used by the topic template is NULL; the record has no topic")]
    NullTopicColumn {
        /// The table.
        table: String,
        /// The event id.
        event_id: String,
        /// The column.
        column: String,
    },
    /// A bytea value is not valid hex.
    #[error("{table}.{column}: bytea value is not in PostgreSQL's hex format (\\x...); set bytea_output = 'hex'")]
    BadBytea {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The partition column's value is not a partition number.
    #[error("event {event_id:?} in {table}: partition_column {column:?} holds {value:?}, not a partition number (0, 1, ...); fix the row's writer or unset partition_column")]
    BadPartition {
        /// The table.
        table: String,
        /// The event id.
        event_id: String,
        /// The column.
        column: String,
        /// What it holds.
        value: String,
    },
    /// A row has fewer columns than its Relation message announced.
    #[error("a row of {table} has {got} columns, its Relation message announced {expected}")]
    ShortRow {
        /// The table.
        table: String,
        /// Columns announced.
        expected: usize,
        /// Columns present.
        got: usize,
    },
    /// An outbox table was renamed while the relay ran.
    #[error("outbox table {table} was renamed to {new_name} while the relay ran; set [[outbox]] table = \"{new_name}\" and restart (the publication follows the table, nothing is lost)")]
    Renamed {
        /// The configured name.
        table: String,
        /// The table's name now.
        new_name: String,
    },
    /// `format = "debezium-json"` on a column whose type Debezium gives another schema.
    #[error("outbox table {table}: format = \"debezium-json\" needs {role} {column:?} to be {wanted}, as in migrations/001_outbox.sql (Debezium gives other types other envelopes); change the column's type or use format = \"plain\"")]
    EnvelopeType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Which config key names it.
        role: &'static str,
        /// The types supported for that role.
        wanted: &'static str,
    },
    /// An Insert arrived for a relation id no Relation message described.
    #[error("insert for unknown relation id {0}: the server sent no Relation message for it")]
    UnknownRelation(u32),
    /// The row's bytes were malformed.
    #[error("malformed row: {0}")]
    Decode(#[from] DecodeError),
    /// The topic template is unusable (the config's validation rejects it first).
    #[error("[[outbox]] {0}")]
    Template(#[from] TemplateError),
}

/// A piece of a topic template resolved to where the mapper puts each field's value.
#[derive(Debug, Clone)]
pub(crate) enum TopicPart {
    Literal(String),
    /// A column's (or envelope field's) value; `slot` is where the mapper puts it.
    Column {
        slot: usize,
        name: String,
    },
}

/// Resolves a parsed topic template; `slot_of` gives the slot of each name in braces.
pub(crate) fn resolve_topic<E>(
    template: &Template<'_>,
    mut slot_of: impl FnMut(&str) -> Result<usize, E>,
) -> Result<Vec<TopicPart>, E> {
    template
        .pieces()
        .iter()
        .map(|piece| match *piece {
            Piece::Literal(s) => Ok(TopicPart::Literal(s.to_owned())),
            Piece::Field(name) => Ok(TopicPart::Column {
                slot: slot_of(name)?,
                name: name.to_owned(),
            }),
        })
        .collect()
}

/// Writes the topic into `out`; `Err` names a field whose value is NULL (no topic then).
/// Whether Kafka accepts the name is checked where every record passes, in the producer, so
/// that a refused name can be set aside like any refused record.
pub(crate) fn render_topic<'p, 'v>(
    parts: &'p [TopicPart],
    out: &mut String,
    value: impl Fn(usize) -> Option<&'v [u8]>,
) -> Result<(), &'p str> {
    out.clear();
    for part in parts {
        match part {
            TopicPart::Literal(s) => out.push_str(s),
            TopicPart::Column { slot, name } => {
                let v = value(*slot).ok_or(name.as_str())?;
                match std::str::from_utf8(v) {
                    Ok(v) => out.push_str(v),
                    Err(_) => out.push_str(&String::from_utf8_lossy(v)),
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Col {
    /// Where the row pass puts the value (see `Plan::picks`).
    slot: usize,
    bytea: bool,
}

/// Slots of the fixed roles; topic-template and header columns follow.
const ID_SLOT: usize = 0;
const KEY_SLOT: usize = 1;
const KIND_SLOT: usize = 2;
const PAYLOAD_SLOT: usize = 3;

/// How one outbox table's rows become records.
#[derive(Debug, Clone)]
struct Plan {
    /// Index of the `[[outbox]]` entry.
    index: usize,
    table: String,
    /// Columns the Relation message announced.
    columns: usize,
    key: Col,
    payload: Col,
    topic: Vec<TopicPart>,
    headers: Vec<(String, Col)>,
    partition: Option<Col>,
    /// The JSON envelopes of key and value under `format = "debezium-json"`.
    envelopes: Option<Envelopes>,
    /// `(column, slot)` for every value a record needs, in column order, so one pass over
    /// the row picks them all.
    picks: Vec<(usize, usize)>,
    /// The column of each slot, for rows whose values are fetched by column.
    columns_by_slot: Vec<usize>,
}

/// Maps rows of the configured outbox tables; other tables are ignored.
#[derive(Debug)]
pub struct OutboxMapper {
    tables: Vec<OutboxConfig>,
    plans: FxHashMap<u32, Option<Plan>>,
    scratch: Scratch,
    /// Per slot, where its value lies in the row's bytes (`None`: NULL or unchanged).
    spans: Vec<Option<(usize, usize)>>,
}

/// Where a record's topic and decoded bytea values are built; reused from row to row.
#[derive(Debug, Default)]
struct Scratch {
    topic: String,
    key_buf: Vec<u8>,
    payload_buf: Vec<u8>,
    header_bufs: Vec<Vec<u8>>,
    /// The enveloped key and value, under `format = "debezium-json"`.
    key_envelope: Vec<u8>,
    payload_envelope: Vec<u8>,
}

impl OutboxMapper {
    /// A mapper for these `[[outbox]]` entries.
    pub fn new(tables: &[OutboxConfig]) -> Self {
        OutboxMapper {
            tables: tables.to_vec(),
            plans: FxHashMap::default(),
            scratch: Scratch::default(),
            spans: Vec::new(),
        }
    }

    /// Learns (or relearns, after ALTER TABLE) a table's columns from a Relation message.
    pub fn relation(&mut self, rel: &Relation) -> Result<(), MappingError> {
        let config = self
            .tables
            .iter()
            .position(|t| t.schema_and_name() == (rel.namespace.as_str(), rel.name.as_str()));
        let plan = match config {
            Some(i) => Some(plan_for(i, &self.tables[i], rel)?),
            None => {
                // The same table under another name (ALTER TABLE ... RENAME): the publication
                // follows the table, so its rows keep coming, and dropping them would lose them.
                if let Some(Some(old)) = self.plans.get(&rel.id) {
                    return Err(MappingError::Renamed {
                        table: old.table.clone(),
                        new_name: format!("{}.{}", rel.namespace, rel.name),
                    });
                }
                None
            }
        };
        self.plans.insert(rel.id, plan);
        Ok(())
    }

    /// Whether rows of this relation are outbox events.
    pub fn is_outbox(&self, relation_id: u32) -> bool {
        matches!(self.plans.get(&relation_id), Some(Some(_)))
    }

    /// The plan for `relation_id`; `None` when the table is not an outbox.
    fn plan(
        plans: &FxHashMap<u32, Option<Plan>>,
        relation_id: u32,
    ) -> Result<Option<&Plan>, MappingError> {
        match plans.get(&relation_id) {
            Some(plan) => Ok(plan.as_ref()),
            None => Err(MappingError::UnknownRelation(relation_id)),
        }
    }

    /// The record for a row of `relation_id`, or `None` when the table is not an outbox.
    pub fn map<'a>(
        &'a mut self,
        relation_id: u32,
        tuple: &Tuple<'a>,
    ) -> Result<Option<Record<'a>>, MappingError> {
        let Some(plan) = Self::plan(&self.plans, relation_id)? else {
            return Ok(None);
        };
        if tuple.len() < plan.columns {
            return Err(MappingError::ShortRow {
                table: plan.table.clone(),
                expected: plan.columns,
                got: tuple.len(),
            });
        }
        // One pass over the row for every value the record needs: `decode` validated the
        // tuple, and fetching each column by position would walk the row once per column.
        let data = tuple.bytes();
        let base = data.as_ptr() as usize;
        self.spans.clear();
        // One slot per pick: slot numbers are the picks' positions before sorting.
        self.spans.resize(plan.picks.len(), None);
        let mut picks = plan.picks.iter().peekable();
        for (i, value) in tuple.values().enumerate() {
            let Some(&&(next, _)) = picks.peek() else {
                break;
            };
            if i < next {
                continue;
            }
            let span = match value {
                Ok(Value::Text(b)) | Ok(Value::Binary(b)) => {
                    Some((b.as_ptr() as usize - base, b.len()))
                }
                _ => None,
            };
            while let Some(&(_, slot)) = picks.next_if(|(col, _)| *col == i) {
                self.spans[slot] = span;
            }
        }
        let spans = &self.spans;
        let text = |slot: usize| -> Option<&'a [u8]> {
            spans[slot].map(|(start, len)| &data[start..start + len])
        };
        build(plan, &self.tables[plan.index], &mut self.scratch, text).map(Some)
    }

    /// The record for a row of `relation_id` whose values are not in a pgoutput tuple (the
    /// initial snapshot reads them with SQL): `column(i)` is the text of the Relation's
    /// column `i`, `None` for NULL. `None` when the table is not an outbox.
    pub fn map_columns<'a>(
        &'a mut self,
        relation_id: u32,
        column: impl Fn(usize) -> Option<&'a [u8]>,
    ) -> Result<Option<Record<'a>>, MappingError> {
        let Some(plan) = Self::plan(&self.plans, relation_id)? else {
            return Ok(None);
        };
        let text = |slot: usize| column(plan.columns_by_slot[slot]);
        build(plan, &self.tables[plan.index], &mut self.scratch, text).map(Some)
    }
}

/// The record of one row whose value for each slot `text` hands out.
fn build<'a>(
    plan: &'a Plan,
    config: &OutboxConfig,
    scratch: &'a mut Scratch,
    text: impl Fn(usize) -> Option<&'a [u8]>,
) -> Result<Record<'a>, MappingError> {
    let Scratch {
        topic,
        key_buf,
        payload_buf,
        header_bufs,
        key_envelope,
        payload_envelope,
    } = scratch;
    let event_id = || {
        text(ID_SLOT)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "?".into())
    };

    render_topic(&plan.topic, topic, &text).map_err(|column| MappingError::NullTopicColumn {
        table: plan.table.clone(),
        event_id: event_id(),
        column: column.to_owned(),
    })?;

    let bad_bytea = |col: &str| MappingError::BadBytea {
        table: plan.table.clone(),
        column: col.to_owned(),
    };
    let key = decode_col(text(KEY_SLOT), plan.key, key_buf)
        .ok_or_else(|| bad_bytea(&config.key_column))?;
    let payload = decode_col(text(PAYLOAD_SLOT), plan.payload, payload_buf)
        .ok_or_else(|| bad_bytea(&config.payload_column))?;
    // The envelope's buffers are reused from row to row, like the bytea ones.
    let (key, payload) = match &plan.envelopes {
        None => (key, payload),
        Some(e) => (
            e.key(key, key_envelope),
            Some(e.payload(payload, payload_envelope)),
        ),
    };

    let mut extra_headers = Vec::new();
    if !plan.headers.is_empty() {
        extra_headers.reserve_exact(plan.headers.len());
        header_bufs.resize_with(plan.headers.len(), Vec::new);
        for ((name, col), buf) in plan.headers.iter().zip(header_bufs.iter_mut()) {
            let v = decode_col(text(col.slot), *col, buf).ok_or_else(|| bad_bytea(name))?;
            extra_headers.push((name.as_str(), v));
        }
    }
    let partition = match plan.partition {
        None => None,
        Some(col) => match text(col.slot) {
            None => None,
            Some(v) => Some(
                parse_partition(v).ok_or_else(|| MappingError::BadPartition {
                    table: plan.table.clone(),
                    event_id: event_id(),
                    column: config.partition_column.clone().unwrap_or_default(),
                    value: String::from_utf8_lossy(v).into_owned(),
                })?,
            ),
        },
    };
    Ok(Record {
        table: Some(plan.index),
        topic: topic.as_str(),
        key,
        payload,
        id: text(ID_SLOT),
        kind: text(KIND_SLOT),
        extra_headers,
        partition,
        time: None,
    })
}

impl Envelopes {
    /// [`Envelopes::for_types`] for an `[[outbox]]` entry's key and payload columns of these
    /// types, the error naming the column and the types it may have.
    pub fn for_columns(
        table: &str,
        c: &OutboxConfig,
        key_oid: u32,
        payload_oid: u32,
    ) -> Result<Envelopes, MappingError> {
        Envelopes::for_types(key_oid, payload_oid).map_err(|role| {
            let (column, wanted) = if role == "key_column" {
                (&c.key_column, debezium::KEY_TYPES)
            } else {
                (&c.payload_column, debezium::PAYLOAD_TYPES)
            };
            MappingError::EnvelopeType {
                table: table.to_owned(),
                column: column.clone(),
                role,
                wanted,
            }
        })
    }
}

/// The value as raw bytes: text passes through; bytea hex is decoded into `buf`.
/// The outer `None` means the bytea text was malformed.
fn decode_col<'a>(
    value: Option<&'a [u8]>,
    col: Col,
    buf: &'a mut Vec<u8>,
) -> Option<Option<&'a [u8]>> {
    let Some(v) = value else {
        return Some(None);
    };
    if !col.bytea {
        return Some(Some(v));
    }
    let hex = v.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    buf.clear();
    for pair in hex.chunks_exact(2) {
        buf.push((hex_digit(pair[0])? << 4) | hex_digit(pair[1])?);
    }
    Some(Some(buf.as_slice()))
}

/// A partition number in text form (an integer column's output), or `None` if it is not one.
fn parse_partition(v: &[u8]) -> Option<i32> {
    std::str::from_utf8(v)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p >= 0)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn plan_for(index: usize, c: &OutboxConfig, rel: &Relation) -> Result<Plan, MappingError> {
    let table = format!("{}.{}", rel.namespace, rel.name);
    let mut picks = Vec::new();
    let mut find = |name: &str, role: &'static str| -> Result<Col, MappingError> {
        let index = rel
            .columns
            .iter()
            .position(|col| col.name == name)
            .ok_or_else(|| MappingError::MissingColumn {
                table: table.clone(),
                column: name.to_owned(),
                role,
            })?;
        let slot = picks.len();
        picks.push((index, slot));
        Ok(Col {
            slot,
            bytea: rel.columns[index].type_oid == BYTEA_OID,
        })
    };
    // The fixed roles first, in the order of the *_SLOT constants.
    let id = find(&c.id_column, "id_column")?;
    let key = find(&c.key_column, "key_column")?;
    let kind = find(&c.type_column, "type_column")?;
    let payload = find(&c.payload_column, "payload_column")?;
    let envelopes = match c.format {
        RecordFormat::Plain => None,
        RecordFormat::DebeziumJson => {
            let type_of = |name: &str| {
                rel.columns
                    .iter()
                    .find(|col| col.name == name)
                    .map_or(0, |col| col.type_oid)
            };
            Some(Envelopes::for_columns(
                &table,
                c,
                type_of(&c.key_column),
                type_of(&c.payload_column),
            )?)
        }
    };
    debug_assert_eq!(
        [id.slot, key.slot, kind.slot, payload.slot],
        [ID_SLOT, KEY_SLOT, KIND_SLOT, PAYLOAD_SLOT]
    );
    let template = Template::parse(&c.topic)?;
    let topic = resolve_topic(&template, |name| find(name, "topic").map(|col| col.slot))?;
    let headers = c
        .header_columns
        .iter()
        .map(|h| Ok((h.clone(), find(h, "header_columns")?)))
        .collect::<Result<_, MappingError>>()?;
    let partition = c
        .partition_column
        .as_deref()
        .map(|p| find(p, "partition_column"))
        .transpose()?;
    // Picks were made in slot order; keep that before sorting them by column.
    let columns_by_slot = picks.iter().map(|&(column, _)| column).collect();
    picks.sort_unstable();
    Ok(Plan {
        index,
        columns: rel.columns.len(),
        key,
        payload,
        topic,
        headers,
        partition,
        envelopes,
        picks,
        columns_by_slot,
        table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::postgres::pgoutput::{decode, Message};

    const TEXT: u32 = 25;
    const UUID: u32 = 2950;
    const JSONB: u32 = 3802;

    fn outbox_config(extra: &str) -> OutboxConfig {
        let text = format!(
            "[postgres]\nurl = \"postgres://x@h/db\"\n[[outbox]]\ntable = \"public.outbox\"\n{extra}\n[kafka]\nbrokers = \"k:9092\"\n"
        );
        Config::parse(&text, "t.toml", |_| None)
            .unwrap()
            .outbox
            .remove(0)
    }

    /// pgoutput 'R' bytes, as the server would send them.
    fn relation_bytes(id: u32, table: &str, columns: &[(&str, u32)]) -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(id.to_be_bytes());
        b.extend(b"public\0");
        b.extend(table.as_bytes());
        b.push(0);
        b.push(b'd');
        b.extend((columns.len() as i16).to_be_bytes());
        for (name, oid) in columns {
            b.push(0);
            b.extend(name.as_bytes());
            b.push(0);
            b.extend(oid.to_be_bytes());
            b.extend((-1i32).to_be_bytes());
        }
        b
    }

    /// pgoutput 'I' bytes; `None` is a NULL column.
    fn insert_bytes(id: u32, values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend(id.to_be_bytes());
        b.push(b'N');
        b.extend((values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(v) => {
                    b.push(b't');
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend(*v);
                }
            }
        }
        b
    }

    fn learn(mapper: &mut OutboxMapper, bytes: &[u8]) -> Result<(), MappingError> {
        match decode(bytes).unwrap() {
            Message::Relation(rel) => mapper.relation(&rel),
            other => panic!("not a relation: {other:?}"),
        }
    }

    fn map_row<T>(
        mapper: &mut OutboxMapper,
        bytes: &[u8],
        check: impl FnOnce(Result<Option<Record<'_>>, MappingError>) -> T,
    ) -> T {
        match decode(bytes).unwrap() {
            Message::Insert { relation_id, tuple } => check(mapper.map(relation_id, &tuple)),
            other => panic!("not an insert: {other:?}"),
        }
    }

    const DEFAULT_COLUMNS: &[(&str, u32)] = &[
        ("id", UUID),
        ("aggregatetype", TEXT),
        ("aggregateid", TEXT),
        ("type", TEXT),
        ("payload", JSONB),
    ];

    #[test]
    fn default_row_becomes_a_debezium_style_record() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        learn(&mut m, &relation_bytes(7, "outbox", DEFAULT_COLUMNS)).unwrap();
        let row = insert_bytes(
            7,
            &[
                Some(b"4a1c1f5e-0000-4000-8000-000000000001"),
                Some(b"order"),
                Some("ключ-🚀".as_bytes()),
                Some(b"OrderCreated"),
                Some(br#"{"total": 12.5}"#),
            ],
        );
        map_row(&mut m, &row, |r| {
            let r = r.unwrap().unwrap();
            assert_eq!(r.topic, "outbox.event.order");
            assert_eq!(r.key, Some("ключ-🚀".as_bytes()));
            assert_eq!(r.payload, Some(&br#"{"total": 12.5}"#[..]));
            assert_eq!(
                r.headers().collect::<Vec<_>>(),
                vec![
                    ("id", Some(&b"4a1c1f5e-0000-4000-8000-000000000001"[..])),
                    ("type", Some(&b"OrderCreated"[..])),
                ]
            );
        });
    }

    #[test]
    fn null_payload_and_key_become_absent() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        learn(&mut m, &relation_bytes(7, "outbox", DEFAULT_COLUMNS)).unwrap();
        let row = insert_bytes(7, &[Some(b"e"), Some(b"a"), None, Some(b"t"), None]);
        map_row(&mut m, &row, |r| {
            let r = r.unwrap().unwrap();
            assert_eq!((r.key, r.payload), (None, None));
        });
    }

    #[test]
    fn bytea_columns_arrive_as_raw_bytes() {
        let mut m = OutboxMapper::new(&[outbox_config("header_columns = [\"trace\"]")]);
        let mut cols = DEFAULT_COLUMNS.to_vec();
        cols[4] = ("payload", BYTEA_OID);
        cols.push(("trace", BYTEA_OID));
        learn(&mut m, &relation_bytes(7, "outbox", &cols)).unwrap();
        let row = insert_bytes(
            7,
            &[
                Some(b"e"),
                Some(b"a"),
                Some(b"k"),
                Some(b"t"),
                Some(b"\\x00ff10"),
                Some(b"\\xAB"),
            ],
        );
        map_row(&mut m, &row, |r| {
            let r = r.unwrap().unwrap();
            assert_eq!(r.payload, Some(&[0x00, 0xff, 0x10][..]));
            assert_eq!(r.headers().nth(2).unwrap(), ("trace", Some(&[0xab][..])));
        });
    }

    #[test]
    fn malformed_bytea_is_an_error_not_garbage() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        let mut cols = DEFAULT_COLUMNS.to_vec();
        cols[4] = ("payload", BYTEA_OID);
        learn(&mut m, &relation_bytes(7, "outbox", &cols)).unwrap();
        let row = insert_bytes(
            7,
            &[
                Some(b"e"),
                Some(b"a"),
                Some(b"k"),
                Some(b"t"),
                Some(b"\\x0"),
            ],
        );
        map_row(&mut m, &row, |r| {
            assert!(matches!(r, Err(MappingError::BadBytea { .. })), "{r:?}")
        });
    }

    #[test]
    fn topic_template_uses_any_columns_and_null_is_an_error() {
        let mut m =
            OutboxMapper::new(&[outbox_config("topic = \"{type}-events.{aggregatetype}\"")]);
        learn(&mut m, &relation_bytes(7, "outbox", DEFAULT_COLUMNS)).unwrap();
        let row = insert_bytes(
            7,
            &[
                Some(b"e1"),
                Some(b"order"),
                Some(b"k"),
                Some(b"Created"),
                None,
            ],
        );
        map_row(&mut m, &row, |r| {
            assert_eq!(r.unwrap().unwrap().topic, "Created-events.order")
        });
        let row = insert_bytes(7, &[Some(b"e2"), None, Some(b"k"), Some(b"Created"), None]);
        map_row(&mut m, &row, |r| {
            let err = r.unwrap_err().to_string();
            assert!(err.contains("e2") && err.contains("aggregatetype"), "{err}");
        });
    }

    #[test]
    fn rows_of_other_tables_are_not_events() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        learn(&mut m, &relation_bytes(9, "orders", &[("id", TEXT)])).unwrap();
        let row = insert_bytes(9, &[Some(b"1")]);
        map_row(&mut m, &row, |r| assert!(r.unwrap().is_none()));
        assert!(!m.is_outbox(9));
    }

    #[test]
    fn a_new_relation_message_replaces_the_old_columns() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        learn(&mut m, &relation_bytes(7, "outbox", DEFAULT_COLUMNS)).unwrap();
        let mut cols = vec![("extra", TEXT)];
        cols.extend_from_slice(DEFAULT_COLUMNS);
        learn(&mut m, &relation_bytes(7, "outbox", &cols)).unwrap();
        let row = insert_bytes(
            7,
            &[
                Some(b"x"),
                Some(b"e"),
                Some(b"a"),
                Some(b"k"),
                Some(b"t"),
                Some(b"{}"),
            ],
        );
        map_row(&mut m, &row, |r| {
            let r = r.unwrap().unwrap();
            assert_eq!((r.key, r.payload), (Some(&b"k"[..]), Some(&b"{}"[..])));
        });
    }

    #[test]
    fn a_dropped_configured_column_is_named() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        let err = learn(&mut m, &relation_bytes(7, "outbox", &DEFAULT_COLUMNS[..4]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"payload\"") && err.contains("payload_column"),
            "{err}"
        );
    }

    #[test]
    fn partition_column_picks_the_partition_and_rejects_non_numbers() {
        let mut m = OutboxMapper::new(&[outbox_config("partition_column = \"part\"")]);
        let mut cols = DEFAULT_COLUMNS.to_vec();
        cols.push(("part", 23));
        learn(&mut m, &relation_bytes(7, "outbox", &cols)).unwrap();
        let row = |id: &'static [u8], part: Option<&'static [u8]>| {
            insert_bytes(
                7,
                &[Some(id), Some(b"a"), Some(b"k"), Some(b"t"), None, part],
            )
        };
        map_row(&mut m, &row(b"e1", Some(b"5")), |r| {
            assert_eq!(r.unwrap().unwrap().partition, Some(5))
        });
        map_row(&mut m, &row(b"e2", None), |r| {
            assert_eq!(r.unwrap().unwrap().partition, None)
        });
        for bad in [&b"-1"[..], b"two"] {
            map_row(&mut m, &row(b"e3", Some(bad)), |r| {
                let err = r.unwrap_err().to_string();
                assert!(
                    err.contains("e3") && err.contains("partition_column"),
                    "{err}"
                );
            });
        }
    }

    #[test]
    fn values_by_column_map_to_the_record_the_stream_gives() {
        // The initial snapshot reads rows with SQL and hands values out by column; the
        // record must be the one the same row gives when it arrives from the stream.
        let config = outbox_config(
            "topic = \"{aggregatetype}.{type}\"\nheader_columns = [\"trace\", \"aggregatetype\"]",
        );
        let mut cols = DEFAULT_COLUMNS.to_vec();
        cols.push(("trace", BYTEA_OID));
        let values: [Option<&[u8]>; 6] = [
            Some(b"e1"),
            Some(b"order"),
            Some(b"k"),
            Some(b"Created"),
            Some(b"{\"a\": 1}"),
            Some(b"\\x00ff"),
        ];
        let mut streamed = OutboxMapper::new(std::slice::from_ref(&config));
        learn(&mut streamed, &relation_bytes(7, "outbox", &cols)).unwrap();
        let from_stream = map_row(&mut streamed, &insert_bytes(7, &values), |r| {
            format!("{:?}", r.unwrap().unwrap())
        });
        // Only the columns the mapping reads, in another order, as the snapshot selects them.
        let order = [4, 0, 2, 3, 1, 5];
        let picked: Vec<(&str, u32)> = order.iter().map(|&i| cols[i]).collect();
        let mut read = OutboxMapper::new(&[config]);
        learn(&mut read, &relation_bytes(9, "outbox", &picked)).unwrap();
        let from_sql = read.map_columns(9, |i| values[order[i]]).unwrap().unwrap();
        assert_eq!(format!("{from_sql:?}"), from_stream);
        assert_eq!(from_sql.topic, "order.Created");
        assert_eq!(
            from_sql.headers().nth(2),
            Some(("trace", Some(&[0, 0xff][..])))
        );
    }

    #[test]
    fn debezium_json_format_envelopes_key_and_value_and_checks_the_column_types() {
        let config = outbox_config("format = \"debezium-json\"");
        let mut m = OutboxMapper::new(std::slice::from_ref(&config));
        learn(&mut m, &relation_bytes(7, "outbox", DEFAULT_COLUMNS)).unwrap();
        let row = |payload: Option<&'static [u8]>| {
            insert_bytes(
                7,
                &[
                    Some(b"e1"),
                    Some(b"order"),
                    Some(b"42"),
                    Some(b"Created"),
                    payload,
                ],
            )
        };
        map_row(&mut m, &row(Some(br#"{"a": "x"}"#)), |r| {
            let r = r.unwrap().unwrap();
            assert_eq!(
                r.key,
                Some(&br#"{"schema":{"type":"string","optional":false},"payload":"42"}"#[..])
            );
            assert_eq!(
                r.payload,
                Some(&br#"{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1},"payload":"{\"a\": \"x\"}"}"#[..])
            );
            // Topic and headers are those of the plain format.
            assert_eq!(r.topic, "outbox.event.order");
            assert_eq!(r.id, Some(&b"e1"[..]));
            assert_eq!(r.kind, Some(&b"Created"[..]));
        });
        map_row(&mut m, &row(None), |r| {
            assert!(r
                .unwrap()
                .unwrap()
                .payload
                .unwrap()
                .ends_with(br#""payload":null}"#))
        });
        // The snapshot's path gives the same bytes.
        let values: [Option<&[u8]>; 5] = [
            Some(b"e1"),
            Some(b"order"),
            Some(b"42"),
            Some(b"Created"),
            None,
        ];
        let from_sql = format!("{:?}", m.map_columns(7, |i| values[i]).unwrap().unwrap());
        assert_eq!(
            from_sql,
            map_row(&mut m, &row(None), |r| format!("{:?}", r.unwrap().unwrap()))
        );

        // A uuid key or a bytea payload would get other envelopes from Debezium: refused.
        let mut cols = DEFAULT_COLUMNS.to_vec();
        cols[2] = ("aggregateid", UUID);
        let err = learn(&mut m, &relation_bytes(8, "outbox", &cols))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key_column") && err.contains("text or varchar"),
            "{err}"
        );
        let mut cols = DEFAULT_COLUMNS.to_vec();
        cols[4] = ("payload", BYTEA_OID);
        let err = learn(&mut m, &relation_bytes(8, "outbox", &cols))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("payload_column") && err.contains("json, jsonb, text or varchar"),
            "{err}"
        );
        // The plain format takes any type.
        let mut plain = OutboxMapper::new(&[outbox_config("")]);
        learn(&mut plain, &relation_bytes(8, "outbox", &cols)).unwrap();
    }

    #[test]
    fn insert_for_an_unannounced_relation_is_an_error() {
        let mut m = OutboxMapper::new(&[outbox_config("")]);
        map_row(&mut m, &insert_bytes(3, &[None]), |r| {
            assert!(matches!(r, Err(MappingError::UnknownRelation(3))))
        });
    }
}
