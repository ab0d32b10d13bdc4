//! Hostile input, property-tested: whatever bytes the replication stream carries and whatever
//! text the config file holds, the relay's parsers never panic; they return a valid value or a
//! typed error whose message is one line.
//!
//! - pgoutput decoder (`outbox_relay::postgres::pgoutput::decode`): arbitrary bytes, arbitrary bytes
//!   behind each parsed tag, and mutations (truncation, flipped and inserted bytes, bogus
//!   counts and lengths) of the messages PostgreSQL 15 produced in
//!   `tests/fixtures/pgoutput/messages.hex`. Every `Ok` must be a real message: it re-encodes
//!   to exactly the bytes it was decoded from, and an Insert's values all decode.
//! - Generated valid messages decode to what was encoded (round trip).
//! - Outbox mapping (`outbox_relay::mapping::outbox::OutboxMapper`) on arbitrary relations and tuples:
//!   never a panic; on well-formed outbox rows, the record is the Debezium-style contract
//!   (topic, key, value, event id, bytea hex decoded to raw bytes).
//! - Config parser (`outbox_relay::config::Config::parse`) on arbitrary text and on mutations
//!   of `config/relay.example.toml`.
//!
//! Case counts are kept small so the file runs in seconds; `PROPTEST_CASES=20000 cargo test
//! --test properties` runs every property that many times instead. Failures are not persisted
//! to `proptest-regressions/`: the shrunk input is printed in the failure message.

use outbox_relay::config::{Config, OutboxConfig};
use outbox_relay::lsn::Lsn;
use outbox_relay::mapping::outbox::{MappingError, OutboxMapper};
use outbox_relay::postgres::pgoutput::{decode, Column, DecodeError, Message, Relation, Value};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

const FIXTURES: &str = include_str!("fixtures/pgoutput/messages.hex");
/// Logical decoding messages (the table-less outbox), captured the same way.
const LOGICAL_FIXTURES: &str = include_str!("fixtures/pgoutput/logical.hex");
const EXAMPLE_CONFIG: &str = include_str!("../config/relay.example.toml");

const TEXT: u32 = 25;
const BYTEA: u32 = 17;
const JSONB: u32 = 3802;
const UUID: u32 = 2950;

/// `default` cases, or `PROPTEST_CASES` when set; never writes regression files.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Whether an error message is one non-empty line, as the relay's log and `check` output
/// need (user data in a message is quoted, so a newline in it cannot split the line).
fn one_line(msg: &str) -> bool {
    !msg.is_empty() && !msg.contains('\n')
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

/// The captured messages, in stream order.
fn fixtures() -> Vec<Vec<u8>> {
    FIXTURES
        .lines()
        .chain(LOGICAL_FIXTURES.lines())
        .filter(|l| !l.trim().is_empty())
        .map(|l| unhex(l.split_once(' ').expect("label and hex").1.trim()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A pgoutput encoder, the decoder's inverse, to check that every Ok is a real message
// ---------------------------------------------------------------------------------------------

fn put_cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn put_value(out: &mut Vec<u8>, v: &Value<'_>) {
    match v {
        Value::Null => out.push(b'n'),
        Value::Unchanged => out.push(b'u'),
        Value::Text(b) | Value::Binary(b) => {
            out.push(if matches!(v, Value::Text(_)) {
                b't'
            } else {
                b'b'
            });
            out.extend_from_slice(&(b.len() as i32).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
}

fn encode_relation(r: &Relation) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&r.id.to_be_bytes());
    put_cstr(&mut out, &r.namespace);
    put_cstr(&mut out, &r.name);
    out.push(r.replica_identity);
    out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
    for c in &r.columns {
        out.push(c.flags);
        put_cstr(&mut out, &c.name);
        out.extend_from_slice(&c.type_oid.to_be_bytes());
        out.extend_from_slice(&c.type_modifier.to_be_bytes());
    }
    out
}

fn encode_insert(relation_id: u32, values: &[Value<'_>]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend_from_slice(&relation_id.to_be_bytes());
    out.push(b'N');
    out.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        put_value(&mut out, v);
    }
    out
}

/// The bytes a decoded message came from (for parsed kinds; Skipped keeps only its tag).
fn encode(m: &Message<'_>) -> Vec<u8> {
    match m {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            let mut out = vec![b'B'];
            out.extend_from_slice(&final_lsn.0.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
            out
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            let mut out = vec![b'C', *flags];
            out.extend_from_slice(&commit_lsn.0.to_be_bytes());
            out.extend_from_slice(&end_lsn.0.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
            out
        }
        Message::Relation(r) => encode_relation(r),
        Message::Insert { relation_id, tuple } => {
            let values: Vec<Value<'_>> = tuple
                .values()
                .collect::<Result<_, _>>()
                .expect("an Insert that decoded has valid values");
            encode_insert(*relation_id, &values)
        }
        Message::Logical {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            let mut out = vec![b'M', u8::from(*transactional)];
            out.extend_from_slice(&lsn.0.to_be_bytes());
            out.extend_from_slice(prefix);
            out.push(0);
            out.extend_from_slice(&(content.len() as i32).to_be_bytes());
            out.extend_from_slice(content);
            out
        }
        Message::Skipped(tag) => vec![*tag],
    }
}

/// What must hold for any `decode` result: an error is one non-empty line; an Ok is exactly
/// the input (parsed kinds re-encode to it; unparsed kinds carry its tag).
fn check_decoded(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode(bytes) {
        Err(e) => {
            let text = e.to_string();
            prop_assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
            if bytes.is_empty() {
                prop_assert_eq!(e, DecodeError::Empty);
            }
        }
        Ok(Message::Skipped(tag)) => {
            prop_assert_eq!(Some(&tag), bytes.first());
            prop_assert!(!b"BCRIM".contains(&tag), "parsed kind {} skipped", tag);
        }
        Ok(m) => {
            if let Message::Insert { tuple, .. } = &m {
                let values: Vec<_> = tuple.values().collect();
                prop_assert_eq!(values.len(), tuple.len());
                prop_assert!(values.iter().all(Result::is_ok), "{values:?}");
            }
            let mut bytes = bytes.to_vec();
            if let Message::Logical { transactional, .. } = m {
                // Only the flags' low bit means anything (transactional); the encoder
                // writes just that bit.
                prop_assert_eq!(bytes[1] & 1 == 1, transactional);
                bytes[1] &= 1;
            }
            prop_assert_eq!(encode(&m), bytes, "decoded as {:?}", m);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// An edit to a message's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    /// Overwrite an Int16 count with a bogus value.
    Count16(prop::sample::Index, i16),
    /// Overwrite an Int32 length with a bogus value (relative to the bytes after it if `rel`).
    Len32(prop::sample::Index, i32, bool),
    Append(Vec<u8>),
}

fn bogus_i16() -> impl Strategy<Value = i16> {
    prop_oneof![
        Just(0i16),
        Just(1),
        Just(-1),
        Just(i16::MAX),
        Just(i16::MIN),
        -3i16..40,
        any::<i16>(),
    ]
}

fn bogus_i32() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(0i32),
        Just(-1),
        Just(i32::MAX),
        Just(i32::MIN),
        -3i32..3,
        -64i32..4096,
        any::<i32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
        (any::<prop::sample::Index>(), bogus_i16()).prop_map(|(i, n)| Mutation::Count16(i, n)),
        (any::<prop::sample::Index>(), bogus_i32(), any::<bool>())
            .prop_map(|(i, n, rel)| Mutation::Len32(i, n, rel)),
        prop::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Mutation::Flip(i, x) if len > 0 => bytes[i.index(len)] ^= x,
        Mutation::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
        Mutation::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
        Mutation::Remove(i) if len > 0 => {
            bytes.remove(i.index(len));
        }
        Mutation::Count16(i, n) if len >= 2 => {
            let at = i.index(len - 1);
            bytes[at..at + 2].copy_from_slice(&n.to_be_bytes());
        }
        Mutation::Len32(i, n, rel) if len >= 4 => {
            let at = i.index(len - 3);
            let n = if *rel {
                // A length that is just off from what remains: the classic off-by-one.
                ((len - at - 4) as i32).wrapping_add(*n % 3)
            } else {
                *n
            };
            bytes[at..at + 4].copy_from_slice(&n.to_be_bytes());
        }
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
        _ => {}
    }
}

/// Text without NUL (what a C string in pgoutput can carry).
fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z_][a-z0-9_]{0,12}", "[^\u{0}]{0,16}"]
}

fn relation() -> impl Strategy<Value = Relation> {
    let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    (
        any::<u32>(),
        name(),
        name(),
        any::<u8>(),
        prop::collection::vec(column, 0..24),
    )
        .prop_map(
            |(id, namespace, name, replica_identity, columns)| Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            },
        )
}

/// A tuple value with owned bytes: (kind, bytes) with kind n/u/t/b.
fn owned_value() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        Just((b'n', Vec::new())),
        Just((b'u', Vec::new())),
        prop::collection::vec(any::<u8>(), 0..48).prop_map(|b| (b't', b)),
        prop::collection::vec(any::<u8>(), 0..48).prop_map(|b| (b'b', b)),
    ]
}

fn as_value((kind, bytes): &(u8, Vec<u8>)) -> Value<'_> {
    match kind {
        b'n' => Value::Null,
        b'u' => Value::Unchanged,
        b't' => Value::Text(bytes),
        _ => Value::Binary(bytes),
    }
}

// ---------------------------------------------------------------------------------------------
// pgoutput decoder
// ---------------------------------------------------------------------------------------------

#[test]
fn every_fixture_round_trips_through_the_checker() {
    // The checker itself must accept what PostgreSQL really sent.
    for bytes in fixtures() {
        check_decoded(&bytes).unwrap();
        assert!(decode(&bytes).is_ok());
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn decoder_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_decoded(&bytes)?;
    }

    #[test]
    fn decoder_survives_arbitrary_bytes_behind_a_parsed_tag(
        tag in prop::sample::select(b"BCRI".to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![tag];
        bytes.extend(body);
        check_decoded(&bytes)?;
    }

    #[test]
    fn decoder_survives_mutated_captured_messages(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let all = fixtures();
        let mut bytes = all[which.index(all.len())].clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check_decoded(&bytes)?;
    }

}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn generated_relations_round_trip(rel in relation()) {
        let bytes = encode_relation(&rel);
        prop_assert_eq!(decode(&bytes), Ok(Message::Relation(rel)));
    }

    #[test]
    fn generated_inserts_round_trip(
        relation_id in any::<u32>(),
        values in prop::collection::vec(owned_value(), 0..40),
    ) {
        let values: Vec<Value<'_>> = values.iter().map(as_value).collect();
        let bytes = encode_insert(relation_id, &values);
        let decoded = decode(&bytes);
        let Ok(Message::Insert { relation_id: id, tuple }) = decoded else {
            return Err(TestCaseError::fail(format!("{decoded:?}")));
        };
        prop_assert_eq!(id, relation_id);
        let got: Vec<Value<'_>> = tuple.values().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(got, values);
    }

    #[test]
    fn generated_begin_and_commit_round_trip(
        lsn in any::<u64>(), end in any::<u64>(), time in any::<i64>(), xid in any::<u32>(),
        flags in any::<u8>(),
    ) {
        let begin = Message::Begin { final_lsn: Lsn(lsn), commit_time: time, xid };
        let bytes = encode(&begin);
        prop_assert_eq!(decode(&bytes), Ok(begin));
        let commit = Message::Commit {
            flags, commit_lsn: Lsn(lsn), end_lsn: Lsn(end), commit_time: time,
        };
        let bytes = encode(&commit);
        prop_assert_eq!(decode(&bytes), Ok(commit));
    }

    #[test]
    fn lsn_text_never_panics_and_round_trips(text in "\\PC{0,24}", n in any::<u64>()) {
        if let Ok(lsn) = text.parse::<Lsn>() {
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
        prop_assert_eq!(Lsn(n).to_string().parse::<Lsn>().unwrap(), Lsn(n));
    }
}

/// The widest table PostgreSQL allows (1,600 columns) with the outbox columns at the far end:
/// the Relation and the Insert decode, and the mapping finds the columns.
#[test]
fn widest_table_decodes_and_maps() {
    let mut columns: Vec<Column> = (0..1595)
        .map(|i| Column {
            flags: 0,
            name: format!("c{i}"),
            type_oid: TEXT,
            type_modifier: -1,
        })
        .collect();
    for (name, oid) in [
        ("id", UUID),
        ("aggregatetype", TEXT),
        ("aggregateid", TEXT),
        ("type", TEXT),
        ("payload", JSONB),
    ] {
        columns.push(Column {
            flags: 0,
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
        });
    }
    let rel = Relation {
        id: 42,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns,
    };
    let rel_bytes = encode_relation(&rel);
    let Ok(Message::Relation(decoded)) = decode(&rel_bytes) else {
        panic!("{:?}", decode(&rel_bytes));
    };
    assert_eq!(decoded, rel);

    let filler: Vec<String> = (0..1595).map(|i| format!("v{i}")).collect();
    let mut values: Vec<Value<'_>> = filler.iter().map(|s| Value::Text(s.as_bytes())).collect();
    values.extend([
        Value::Text(b"e-1"),
        Value::Text(b"order"),
        Value::Text(b"k-1"),
        Value::Text(b"Created"),
        Value::Text(b"{}"),
    ]);
    let insert = encode_insert(42, &values);
    let mut mapper = OutboxMapper::new(&[outbox_config("")]);
    mapper.relation(&decoded).unwrap();
    let Ok(Message::Insert { relation_id, tuple }) = decode(&insert) else {
        panic!("{:?}", decode(&insert));
    };
    let record = mapper.map(relation_id, &tuple).unwrap().unwrap();
    assert_eq!(record.topic, "outbox.event.order");
    assert_eq!(record.key, Some(&b"k-1"[..]));
    assert_eq!(record.payload, Some(&b"{}"[..]));
}

// ---------------------------------------------------------------------------------------------
// Outbox mapping
// ---------------------------------------------------------------------------------------------

fn outbox_config(extra: &str) -> OutboxConfig {
    let text = format!(
        "[postgres]\nurl = \"postgres://x@h/db\"\n[[outbox]]\ntable = \"public.outbox\"\n{extra}\n[kafka]\nbrokers = \"k:9092\"\n"
    );
    Config::parse(&text, "t.toml", |_| None)
        .unwrap()
        .outbox
        .remove(0)
}

/// One column of a generated outbox row: its name, type and stored value.
#[derive(Debug, Clone)]
struct Cell {
    name: String,
    type_oid: u32,
    /// What the server sends in text format (`\x…` for bytea); `None` is NULL.
    text: Option<Vec<u8>>,
    /// For bytea: the raw bytes the text stands for (`None` if the text is malformed).
    raw: Option<Vec<u8>>,
}

fn hex(bytes: &[u8]) -> Vec<u8> {
    let mut out = b"\\x".to_vec();
    for b in bytes {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out
}

/// A column's (text form, raw bytea bytes), as in [`Cell`].
type TextAndRaw = (Option<Vec<u8>>, Option<Vec<u8>>);

/// A value for a column of type `oid`: NULL, any text (for text-like types), or for bytea
/// usually well-formed hex and sometimes garbage.
fn cell(name: &'static str, oid: u32, nullable: bool) -> impl Strategy<Value = Cell> {
    let text_value = prop::collection::vec(any::<u8>(), 0..40);
    let value: BoxedStrategy<TextAndRaw> = if oid == BYTEA {
        prop_oneof![
            4 => text_value.prop_map(|raw| (Some(hex(&raw)), Some(raw))),
            1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(|junk| (Some(junk), None)),
        ]
        .boxed()
    } else {
        text_value.prop_map(|t| (Some(t), None)).boxed()
    };
    let value = if nullable {
        prop_oneof![1 => Just((None, None)), 5 => value].boxed()
    } else {
        value.boxed()
    };
    value.prop_map(move |(text, raw)| {
        // Malformed hex that happens to be well-formed is still well-formed.
        let raw = match (&text, raw) {
            (Some(t), None) if oid == BYTEA => unhex_bytea(t),
            (_, raw) => raw,
        };
        Cell {
            name: name.into(),
            type_oid: oid,
            text,
            raw,
        }
    })
}

fn unhex_bytea(t: &[u8]) -> Option<Vec<u8>> {
    let h = t.strip_prefix(b"\\x")?;
    if h.len() % 2 != 0 {
        return None;
    }
    let s = std::str::from_utf8(h).ok()?;
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn key_or_payload_type() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![TEXT, BYTEA, JSONB])
}

/// An outbox table's columns in random order among fillers, with one row's values.
fn outbox_row() -> impl Strategy<Value = Vec<Cell>> {
    (
        key_or_payload_type(),
        key_or_payload_type(),
        key_or_payload_type(),
    )
        .prop_flat_map(|(key_t, payload_t, tenant_t)| {
            let required = vec![
                cell("id", UUID, false).boxed(),
                cell("aggregatetype", TEXT, true).boxed(),
                cell("aggregateid", key_t, true).boxed(),
                cell("type", TEXT, true).boxed(),
                cell("payload", payload_t, true).boxed(),
                cell("tenant", tenant_t, true).boxed(),
            ];
            let fillers = prop::collection::vec(
                prop::sample::select(vec![TEXT, BYTEA, JSONB])
                    .prop_flat_map(|t| cell("filler", t, true)),
                0..6,
            );
            (required, fillers)
        })
        .prop_map(|(mut cells, fillers)| {
            cells.extend(fillers);
            cells
        })
        .prop_shuffle()
}

proptest! {
    #![proptest_config(cases(600))]

    /// A well-formed outbox row maps to the record contract, or to the error a user needs.
    #[test]
    fn outbox_rows_map_to_the_record_contract(cells in outbox_row()) {
        let config = outbox_config("header_columns = [\"tenant\"]");
        let mut mapper = OutboxMapper::new(&[config]);
        let rel = Relation {
            id: 7,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: cells
                .iter()
                .map(|c| Column { flags: 0, name: c.name.clone(), type_oid: c.type_oid, type_modifier: -1 })
                .collect(),
        };
        mapper.relation(&rel).unwrap();
        let values: Vec<Value<'_>> = cells
            .iter()
            .map(|c| c.text.as_deref().map_or(Value::Null, Value::Text))
            .collect();
        let bytes = encode_insert(7, &values);
        let Ok(Message::Insert { relation_id, tuple }) = decode(&bytes) else {
            return Err(TestCaseError::fail("insert did not decode"));
        };
        let get = |n: &str| cells.iter().find(|c| c.name == n).unwrap();
        // What the column contributes to the record: raw bytes for bytea, text otherwise;
        // the outer None means malformed bytea.
        let contributes = |c: &Cell| -> Option<Option<Vec<u8>>> {
            match (&c.text, c.type_oid) {
                (None, _) => Some(None),
                (Some(_), BYTEA) => c.raw.clone().map(Some),
                (Some(t), _) => Some(Some(t.clone())),
            }
        };
        let result = mapper.map(relation_id, &tuple);
        if let Err(e) = &result {
            let text = e.to_string();
            prop_assert!(one_line(&text), "{text:?}");
        }
        let aggregatetype = get("aggregatetype");
        let Some(agg) = &aggregatetype.text else {
            prop_assert!(matches!(result, Err(MappingError::NullTopicColumn { .. })), "{result:?}");
            return Ok(());
        };
        let (key, payload, tenant) = (
            contributes(get("aggregateid")),
            contributes(get("payload")),
            contributes(get("tenant")),
        );
        let (Some(key), Some(payload), Some(_tenant)) = (key, payload, tenant) else {
            prop_assert!(matches!(result, Err(MappingError::BadBytea { .. })), "{result:?}");
            return Ok(());
        };
        let record = match result {
            Ok(Some(r)) => r,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(record.table, Some(0));
        prop_assert_eq!(record.topic, format!("outbox.event.{}", String::from_utf8_lossy(agg)));
        prop_assert_eq!(record.key, key.as_deref());
        prop_assert_eq!(record.payload, payload.as_deref());
        // Only the id header is checked here, through `event_id()`: the headers' shape is
        // the publisher's business (and is checked end to end in tests/hostile.rs).
        let id = get("id").text.as_deref().map(String::from_utf8_lossy);
        prop_assert_eq!(record.event_id(), id.map_or("?".into(), |s| s.into_owned()));
    }

    /// Any relation and any tuple, related or not: the mapper never panics, and every error
    /// is one line.
    #[test]
    fn mapper_survives_arbitrary_relations_and_tuples(
        mut rel in relation(),
        outbox_named in any::<bool>(),
        values in prop::collection::vec(owned_value(), 0..30),
        same_id in any::<bool>(),
        other_id in any::<u32>(),
        topic in prop::sample::select(vec![
            "outbox.event.{aggregatetype}", "{type}", "fixed", "{aggregateid}.{c0}",
        ]),
    ) {
        if outbox_named {
            rel.namespace = "public".into();
            rel.name = "outbox".into();
            // Give the required columns a chance to exist.
            for (c, n) in rel.columns.iter_mut().zip([
                "id", "aggregatetype", "aggregateid", "type", "payload", "c0",
            ]) {
                c.name = n.into();
            }
        }
        let mut mapper = OutboxMapper::new(&[outbox_config(&format!("topic = {topic:?}"))]);
        let one_line = |e: &MappingError| one_line(&e.to_string());
        match mapper.relation(&rel) {
            Ok(()) => {}
            Err(e) => {
                prop_assert!(one_line(&e), "{e}");
                return Ok(());
            }
        }
        let values: Vec<Value<'_>> = values.iter().map(as_value).collect();
        let bytes = encode_insert(if same_id { rel.id } else { other_id }, &values);
        let Ok(Message::Insert { relation_id, tuple }) = decode(&bytes) else {
            return Err(TestCaseError::fail("insert did not decode"));
        };
        let is_outbox = mapper.is_outbox(relation_id);
        match mapper.map(relation_id, &tuple) {
            Ok(Some(r)) => {
                prop_assert!(is_outbox);
                prop_assert_eq!(r.table, Some(0));
                let _ = r.event_id(); // must not panic, whatever the id column holds
            }
            Ok(None) => prop_assert!(!is_outbox),
            Err(e) => prop_assert!(one_line(&e), "{e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config parser
// ---------------------------------------------------------------------------------------------

fn env(var: &str) -> Option<String> {
    (var == "PGPASSWORD").then(|| "s3cret".to_owned())
}

/// Parses `text`; any error must be one non-empty line (what the relay prints and exits on).
fn check_config(text: &str) -> Result<Option<Config>, TestCaseError> {
    match Config::parse(text, "relay.toml", env) {
        Ok(c) => {
            prop_assert!(!c.outbox.is_empty());
            Ok(Some(c))
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(
                one_line(&msg),
                "config error is not one line: {msg:?}\n--- input ---\n{text}"
            );
            Ok(None)
        }
    }
}

#[test]
fn example_config_parses() {
    let c = Config::parse(EXAMPLE_CONFIG, "relay.toml", env).unwrap();
    assert_eq!(c.outbox[0].table, "public.outbox");
}

/// An edit to the example file, on whole lines or characters so the text stays UTF-8.
#[derive(Debug, Clone)]
enum TextEdit {
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    SwapLines(prop::sample::Index, prop::sample::Index),
    Truncate(prop::sample::Index),
    InsertAt(prop::sample::Index, String),
    DeleteChar(prop::sample::Index),
    /// Replace what follows the first `=` of a line.
    ReplaceValue(prop::sample::Index, String),
    /// Uncomment a line (`# key = …` becomes `key = …`).
    Uncomment(prop::sample::Index),
}

fn toml_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("[[outbox]]".to_owned()),
        Just("[kafka]".to_owned()),
        Just("\"${PGPASSWORD}\"".to_owned()),
        Just("\"${UNSET_VAR}\"".to_owned()),
        Just("\"${\"".to_owned()),
        Just("\"{}\"".to_owned()),
        Just("\"x.{\"".to_owned()),
        Just("\"}{\"".to_owned()),
        Just("-1".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("0".to_owned()),
        Just("1e400".to_owned()),
        Just("nan".to_owned()),
        Just("true".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
        Just("\"\"\"\nmulti\nline\n\"\"\"".to_owned()),
        Just("'''\n'''".to_owned()),
        Just("\"a\\nb\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\n".to_owned()),
        Just("=".to_owned()),
        Just("#".to_owned()),
        "[ -~]{0,12}",
        "\\PC{0,8}",
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[ -~&&[^\"\\\\]]{0,10}\"",
    ]
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    use prop::sample::Index;
    prop_oneof![
        1 => any::<Index>().prop_map(TextEdit::DeleteLine),
        1 => any::<Index>().prop_map(TextEdit::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TextEdit::SwapLines(a, b)),
        1 => any::<Index>().prop_map(TextEdit::Truncate),
        1 => (any::<Index>(), toml_token()).prop_map(|(i, s)| TextEdit::InsertAt(i, s)),
        1 => any::<Index>().prop_map(TextEdit::DeleteChar),
        3 => (any::<Index>(), toml_token()).prop_map(|(i, s)| TextEdit::ReplaceValue(i, s)),
        2 => any::<Index>().prop_map(TextEdit::Uncomment),
    ]
}

fn edit(text: &str, e: &TextEdit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let chars: Vec<char> = text.chars().collect();
    let n = lines.len();
    match e {
        TextEdit::DeleteLine(i) if n > 0 => {
            lines.remove(i.index(n));
        }
        TextEdit::DuplicateLine(i) if n > 0 => {
            let l = lines[i.index(n)].clone();
            lines.insert(i.index(n), l);
        }
        TextEdit::SwapLines(a, b) if n > 0 => lines.swap(a.index(n), b.index(n)),
        TextEdit::Truncate(i) => return chars[..i.index(chars.len() + 1)].iter().collect(),
        TextEdit::InsertAt(i, s) => {
            let at = i.index(chars.len() + 1);
            let mut out: String = chars[..at].iter().collect();
            out.push_str(s);
            out.extend(&chars[at..]);
            return out;
        }
        TextEdit::DeleteChar(i) if !chars.is_empty() => {
            let at = i.index(chars.len());
            return chars[..at].iter().chain(&chars[at + 1..]).collect();
        }
        TextEdit::ReplaceValue(i, s) => {
            let with_eq: Vec<usize> = (0..n).filter(|&k| lines[k].contains('=')).collect();
            if !with_eq.is_empty() {
                let k = with_eq[i.index(with_eq.len())];
                let key = lines[k].split_once('=').unwrap().0.to_owned();
                lines[k] = format!("{key}= {s}");
            }
        }
        TextEdit::Uncomment(i) => {
            let commented: Vec<usize> = (0..n)
                .filter(|&k| lines[k].trim_start().starts_with("# ") && lines[k].contains('='))
                .collect();
            if !commented.is_empty() {
                let k = commented[i.index(commented.len())];
                lines[k] = lines[k]
                    .trim_start()
                    .trim_start_matches("# ")
                    .trim_start_matches('#')
                    .to_owned();
            }
        }
        _ => {}
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

proptest! {
    #![proptest_config(cases(800))]

    #[test]
    fn config_parser_survives_arbitrary_text(text in "\\PC{0,200}") {
        check_config(&text)?;
    }

    #[test]
    fn config_parser_survives_toml_shaped_text(
        parts in prop::collection::vec(
            prop_oneof![
                toml_token(),
                Just("[postgres]\nurl = \"postgres://u@h/d\"\n".to_owned()),
                Just("[[outbox]]\ntable = \"public.outbox\"\n".to_owned()),
                Just("[kafka]\nbrokers = \"k:9092\"\n".to_owned()),
                Just("\n".to_owned()),
                Just(" = ".to_owned()),
                "[a-z_]{1,12}",
            ],
            0..24,
        ),
    ) {
        check_config(&parts.concat())?;
    }

    #[test]
    fn config_parser_survives_mutated_example(edits in prop::collection::vec(text_edit(), 1..5)) {
        let mut text = EXAMPLE_CONFIG.to_owned();
        for e in &edits {
            text = edit(&text, e);
        }
        if let Some(c) = check_config(&text)? {
            // Whatever parsed is usable: the validation rules hold.
            for name in [&c.postgres.slot, &c.postgres.publication] {
                prop_assert!(!name.is_empty() && name.len() <= 63, "{name:?}");
            }
            prop_assert!(c.postgres.status_interval_secs >= 1);
            prop_assert!(!c.kafka.brokers.trim().is_empty());
            for o in &c.outbox {
                prop_assert!(!o.table.trim().is_empty());
                prop_assert!(o.topic_columns().iter().all(|col| !col.is_empty()));
            }
        }
    }

    /// `${VAR}` expansion with hostile values (newlines, quotes, braces, more `${`).
    #[test]
    fn env_expansion_survives_hostile_values(
        value in "\\PC{0,40}|[\n\"'{}$\\\\]{0,10}",
        field in prop::sample::select(vec!["url", "slot", "publication", "table", "topic", "brokers"]),
    ) {
        let text = format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{}\"\npublication = \"{}\"\n\
             [[outbox]]\ntable = \"{}\"\ntopic = \"{}\"\n[[outbox]]\ntable = \"{}\"\n\
             [kafka]\nbrokers = \"{}\"\n",
            if field == "url" { "${V}" } else { "postgres://u@h/d" },
            if field == "slot" { "${V}" } else { "outbox_relay" },
            if field == "publication" { "${V}" } else { "outbox_relay" },
            if field == "table" { "${V}" } else { "public.outbox" },
            if field == "topic" { "${V}" } else { "outbox.event.{aggregatetype}" },
            if field == "table" { "${V}" } else { "public.outbox2" },
            if field == "brokers" { "${V}" } else { "k:9092" },
        );
        let result = Config::parse(&text, "relay.toml", |var| (var == "V").then(|| value.clone()));
        if let Err(e) = result {
            let msg = e.to_string();
            prop_assert!(one_line(&msg), "{msg:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bugs the properties above found once (minimal repros, now fixed): user data in an error
// message must not split it over two lines.
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_table_error_is_one_line() {
    let text = "[postgres]\nurl = \"postgres://u@h/d\"\n[[outbox]]\ntable = \"${T}\"\n\
                [[outbox]]\ntable = \"${T}\"\n[kafka]\nbrokers = \"k:9092\"\n";
    let err = Config::parse(text, "relay.toml", |_| Some("a\nb".into()))
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err:?}");
}

#[test]
fn null_topic_column_error_is_one_line() {
    let mut mapper = OutboxMapper::new(&[outbox_config("")]);
    let rel = Relation {
        id: 7,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: ["id", "aggregatetype", "aggregateid", "type", "payload"]
            .into_iter()
            .map(|n| Column {
                flags: 0,
                name: n.into(),
                type_oid: TEXT,
                type_modifier: -1,
            })
            .collect(),
    };
    mapper.relation(&rel).unwrap();
    let bytes = encode_insert(
        7,
        &[
            Value::Text(b"line1\nline2"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
    );
    let Ok(Message::Insert { relation_id, tuple }) = decode(&bytes) else {
        panic!("insert did not decode");
    };
    let err = mapper.map(relation_id, &tuple).unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err:?}");
}
