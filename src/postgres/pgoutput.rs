//! Zero-copy decoder for pgoutput logical replication messages, protocol version 1.
//!
//! Only the messages the relay acts on are parsed (Begin, Commit, Relation, Insert, and logical
//! decoding messages); every other kind is reported by its tag so new or uninteresting
//! messages never break the stream. Row
//! values borrow from the XLogData payload, so decoding an Insert allocates nothing.

use std::iter::FusedIterator;

use crate::lsn::Lsn;

/// One decoded pgoutput message, borrowing from the XLogData payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// 'B': start of a committed transaction.
    Begin {
        /// LSN of the transaction's commit record; equals the Commit's `commit_lsn`.
        final_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// 'C': end of the transaction.
    Commit {
        /// Unused by protocol version 1 (always 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record: the position to confirm once the transaction is done.
        end_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
    },
    /// 'R': a table's description; replaces any earlier one with the same id.
    Relation(Relation),
    /// 'I': a new row.
    Insert {
        /// Id of the table, as announced by an earlier Relation message.
        relation_id: u32,
        /// The row's column values, in the Relation's column order.
        tuple: Tuple<'a>,
    },
    /// 'M': a logical decoding message (`pg_logical_emit_message`), sent with `messages 'true'`.
    Logical {
        /// Emitted as part of its transaction (between Begin and Commit), rather than at once.
        transactional: bool,
        /// LSN just past the message's WAL record.
        lsn: Lsn,
        /// The prefix it was emitted with.
        prefix: &'a [u8],
        /// Its content, as emitted.
        content: &'a [u8],
    },
    /// Any other message kind we do not act on ('U','D','T','O','Y', …): carries its tag byte.
    Skipped(u8),
}

/// A table's description from a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation id (the table's oid), referenced by later row messages.
    pub id: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `pg_class.relreplident`: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    /// The published columns, in tuple order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// 1 if the column is part of the replica identity key, else 0.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Oid of the column's data type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when the type has none.
    pub type_modifier: i32,
}

/// The column values of a row, decoded lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    /// The bytes after the column count.
    data: &'a [u8],
    columns: u16,
}

impl<'a> Tuple<'a> {
    /// Number of columns the message announced.
    pub fn len(&self) -> usize {
        usize::from(self.columns)
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    /// The encoded column values; every value [`Tuple::values`] yields borrows from these.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// The column values in order; stops after the first error.
    pub fn values(&self) -> TupleValues<'a> {
        TupleValues {
            reader: Reader { buf: self.data },
            remaining: self.columns,
            done: false,
        }
    }
}

/// Iterator over a [`Tuple`]'s values, from [`Tuple::values`].
#[derive(Debug, Clone)]
pub struct TupleValues<'a> {
    reader: Reader<'a>,
    remaining: u16,
    done: bool,
}

impl<'a> Iterator for TupleValues<'a> {
    type Item = Result<Value<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.remaining == 0 {
            self.done = true;
            // Leftover bytes mean the column count and the data disagree: the row is corrupt.
            return self.reader.finish("tuple data").err().map(Err);
        }
        self.remaining -= 1;
        let value = self.reader.value();
        self.done = value.is_err();
        Some(value)
    }
}

impl FusedIterator for TupleValues<'_> {}

/// One column value of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value the change did not touch, so the server did not send it.
    Unchanged,
    /// The value in the type's text output format (e.g. `\x…` hex for bytea).
    Text(&'a [u8]),
    /// The value in the type's binary format (only sent when binary mode was requested).
    Binary(&'a [u8]),
}

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload had no bytes at all.
    #[error("empty pgoutput message")]
    Empty,
    /// The payload ended before a field was complete.
    #[error("pgoutput message is truncated: it ends inside the {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// Bytes remained after the message (or the announced columns) had been read.
    #[error("unexpected trailing bytes after the {what} ({count} bytes)")]
    TrailingBytes {
        /// What was complete when the extra bytes were found.
        what: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A count or length field was negative.
    #[error("{what} is negative ({value})")]
    Negative {
        /// The field.
        what: &'static str,
        /// Its value.
        value: i32,
    },
    /// An Insert's tuple was not marked 'N' (new tuple).
    #[error("Insert carries tuple marker {:?}, expected 'N'", char::from(*.0))]
    UnexpectedTupleMarker(u8),
    /// A column value had a kind other than 'n', 'u', 't' or 'b'.
    #[error("unknown tuple column kind {:?}", char::from(*.0))]
    UnknownTupleKind(u8),
    /// A name in a Relation message was not UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        what: &'static str,
    },
}

/// Decodes one pgoutput message (the payload of one XLogData message).
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (&tag, body) = buf.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { buf: body };
    let (message, what) = match tag {
        b'B' => (
            Message::Begin {
                final_lsn: r.lsn("Begin final LSN")?,
                commit_time: r.i64("Begin commit time")?,
                xid: r.u32("Begin xid")?,
            },
            "Begin message",
        ),
        b'C' => (
            Message::Commit {
                flags: r.u8("Commit flags")?,
                commit_lsn: r.lsn("Commit LSN")?,
                end_lsn: r.lsn("Commit end LSN")?,
                commit_time: r.i64("Commit time")?,
            },
            "Commit message",
        ),
        b'R' => (Message::Relation(r.relation()?), "Relation message"),
        b'I' => (r.insert()?, "Insert message"),
        b'M' => (r.logical()?, "logical decoding message"),
        other => return Ok(Message::Skipped(other)),
    };
    // Extra bytes mean we and the server disagree about the layout; better to stop than to
    // act on misread fields.
    r.finish(what)?;
    Ok(message)
}

/// Smallest encoding of a Relation column: flags, empty name + NUL, type oid, modifier.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

/// Big-endian cursor over a message; every read is bounds-checked.
#[derive(Debug, Clone)]
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { what });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated { what })?;
        self.buf = rest;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// An Int16 count; PostgreSQL never sends a negative one, so it signals corruption.
    fn count(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let n = i16::from_be_bytes(self.array(what)?);
        u16::try_from(n).map_err(|_| DecodeError::Negative {
            what,
            value: n.into(),
        })
    }

    /// The bytes of a NUL-terminated string, without the NUL.
    fn cbytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let bytes = self.take(len, what)?;
        self.u8(what)?;
        Ok(bytes)
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.cbytes(what)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { what })?;
        Ok(s.to_owned())
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("Relation id")?;
        let namespace = self.cstr("Relation namespace")?;
        let name = self.cstr("Relation name")?;
        let replica_identity = self.u8("Relation replica identity")?;
        let count = usize::from(self.count("Relation column count")?);
        // Cap the reservation by what the bytes can hold, so a bogus count cannot make us
        // allocate far more than the message size.
        let mut columns = Vec::with_capacity(count.min(self.buf.len() / MIN_COLUMN_LEN));
        for _ in 0..count {
            columns.push(Column {
                flags: self.u8("column flags")?,
                name: self.cstr("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// The part after the 'M' tag (protocol version 1: no xid).
    fn logical(&mut self) -> Result<Message<'a>, DecodeError> {
        let transactional = self.u8("message flags")? & 1 == 1;
        let lsn = self.lsn("message LSN")?;
        let prefix = self.cbytes("message prefix")?;
        let n = self.i32("message length")?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Negative {
            what: "message length",
            value: n,
        })?;
        let content = self.take(n, "message content")?;
        Ok(Message::Logical {
            transactional,
            lsn,
            prefix,
            content,
        })
    }

    /// The part after the 'I' tag; consumes the whole rest of the message.
    fn insert(&mut self) -> Result<Message<'a>, DecodeError> {
        let relation_id = self.u32("Insert relation id")?;
        match self.u8("Insert tuple marker")? {
            b'N' => {}
            other => return Err(DecodeError::UnexpectedTupleMarker(other)),
        }
        let tuple = self.tuple()?;
        // Validating here surfaces corrupt rows at decode time, so `values()` cannot fail
        // later; it is one allocation-free pass over the kind and length fields.
        tuple.values().try_for_each(|v| v.map(drop))?;
        Ok(Message::Insert { relation_id, tuple })
    }

    /// TupleData: the column count, then the rest of the message as the values.
    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let columns = self.count("tuple column count")?;
        let data = std::mem::take(&mut self.buf);
        Ok(Tuple { data, columns })
    }

    fn value(&mut self) -> Result<Value<'a>, DecodeError> {
        match self.u8("column kind")? {
            b'n' => Ok(Value::Null),
            b'u' => Ok(Value::Unchanged),
            b't' => Ok(Value::Text(self.sized_value()?)),
            b'b' => Ok(Value::Binary(self.sized_value()?)),
            other => Err(DecodeError::UnknownTupleKind(other)),
        }
    }

    fn sized_value(&mut self) -> Result<&'a [u8], DecodeError> {
        let what = "column value length";
        let len = self.i32(what)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Negative { what, value: len })?;
        self.take(len, "column value")
    }

    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { what, count }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = include_str!("../../tests/fixtures/pgoutput/messages.hex");

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The captured messages in stream order (each line is `label hex`).
    fn fixture_bytes() -> Vec<Vec<u8>> {
        lines_of(FIXTURES)
    }

    fn lines_of(fixture: &str) -> Vec<Vec<u8>> {
        fixture
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| unhex(l.split_once(' ').expect("label and hex").1.trim()))
            .collect()
    }

    fn with_decoded(f: impl FnOnce(Vec<Message<'_>>)) {
        let bytes = fixture_bytes();
        let messages = bytes.iter().map(|b| decode(b).unwrap()).collect();
        f(messages)
    }

    fn relations<'m>(messages: &'m [Message<'_>]) -> Vec<&'m Relation> {
        messages
            .iter()
            .filter_map(|m| match m {
                Message::Relation(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn text(v: &str) -> Value<'_> {
        Value::Text(v.as_bytes())
    }

    /// A hand-built Insert for relation 7 with the given column count and raw TupleData body.
    fn insert_bytes(columns: i16, body: &[u8]) -> Vec<u8> {
        let mut b = vec![b'I', 0, 0, 0, 7, b'N'];
        b.extend_from_slice(&columns.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn logical_messages_carry_prefix_content_and_whether_transactional() {
        const LOGICAL: &str = include_str!("../../tests/fixtures/pgoutput/logical.hex");
        let bytes = lines_of(LOGICAL);
        let messages: Vec<_> = bytes.iter().map(|b| decode(b).unwrap()).collect();
        // (in a transaction, prefix, content) in stream order; Begin/Commit as markers.
        let mut seen = Vec::new();
        let mut open = None;
        for m in &messages {
            match *m {
                Message::Begin { final_lsn, .. } => open = Some(final_lsn),
                Message::Commit { .. } => {
                    open = None;
                    seen.push((false, &b"C"[..], &b""[..]));
                }
                Message::Logical {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => {
                    assert_eq!(transactional, open.is_some(), "{m:?}");
                    // The LSN is the end of the message's record: at most the commit's.
                    if let Some(commit) = open {
                        assert!(lsn <= commit, "{lsn} after the commit at {commit}");
                    }
                    seen.push((transactional, prefix, &content[..content.len().min(12)]));
                }
                ref other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            seen,
            [
                (true, &b"outbox"[..], &b"{\"id\": \"e-1\""[..]),
                (true, b"audit", b"not an event"),
                (true, b"outbox", b"{\"id\": \"e-2\""),
                (false, b"C", b""),
                (false, b"outbox", b"{\"id\": \"e-3\""),
                (true, b"outbox", b"\x00\xff{"),
                (true, b"outbox", b""),
                (false, b"C", b""),
            ]
        );
    }

    #[test]
    fn every_captured_message_decodes() {
        for (i, b) in fixture_bytes().iter().enumerate() {
            assert!(decode(b).is_ok(), "message {i}: {:?}", decode(b));
        }
    }

    #[test]
    fn transactions_are_bracketed_by_begin_and_commit_with_matching_lsns() {
        with_decoded(|messages| {
            let mut open: Option<(Lsn, i64)> = None;
            let mut last_end = Lsn(0);
            let mut transactions = 0;
            for m in &messages {
                match *m {
                    Message::Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    } => {
                        assert!(open.is_none(), "Begin inside a transaction");
                        assert!(final_lsn > last_end, "{final_lsn} <= {last_end}");
                        assert_ne!(xid, 0);
                        open = Some((final_lsn, commit_time));
                    }
                    Message::Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    } => {
                        let (final_lsn, begin_time) = open.take().expect("Commit without Begin");
                        assert_eq!(flags, 0);
                        assert_eq!(commit_lsn, final_lsn);
                        assert_eq!(commit_time, begin_time);
                        assert!(end_lsn > commit_lsn);
                        last_end = end_lsn;
                        transactions += 1;
                    }
                    _ => assert!(open.is_some(), "{m:?} outside a transaction"),
                }
            }
            assert!(open.is_none(), "stream ends inside a transaction");
            // capture.sql commits 11 transactions after creating the slot; the one touching
            // only an unpublished table and the ALTER TABLE are not sent at all.
            assert_eq!(transactions, 9);
        });
    }

    #[test]
    fn relation_describes_outbox_names_keys_and_types() {
        with_decoded(|messages| {
            let outbox = relations(&messages)[0];
            assert_eq!(outbox.namespace, "public");
            assert_eq!(outbox.name, "outbox");
            assert_eq!(outbox.replica_identity, b'd');
            let columns: Vec<_> = outbox
                .columns
                .iter()
                .map(|c| (c.name.as_str(), c.type_oid, c.flags, c.type_modifier))
                .collect();
            assert_eq!(
                columns,
                [
                    ("id", 2950, 1, -1),
                    ("aggregatetype", 25, 0, -1),
                    ("aggregateid", 25, 0, -1),
                    ("type", 25, 0, -1),
                    ("payload", 3802, 0, -1),
                ]
            );

            let bin = relations(&messages)
                .into_iter()
                .find(|r| r.name == "outbox_bin")
                .unwrap();
            assert_ne!(bin.id, outbox.id);
            assert_eq!(bin.columns.last().unwrap().type_oid, 17);
            // No primary key, so no column is flagged as key.
            assert!(bin.columns.iter().all(|c| c.flags == 0));
        });
    }

    #[test]
    fn inserts_decode_to_the_inserted_text_values() {
        with_decoded(|messages| {
            let rels = relations(&messages);
            let table = |id: u32| rels.iter().find(|r| r.id == id).unwrap().name.clone();
            let rows: Vec<(String, Vec<Value<'_>>)> = messages
                .iter()
                .filter_map(|m| match m {
                    Message::Insert { relation_id, tuple } => {
                        let values = tuple.values().collect::<Result<Vec<_>, _>>().unwrap();
                        assert_eq!(values.len(), tuple.len());
                        Some((table(*relation_id), values))
                    }
                    _ => None,
                })
                .collect();
            let id = |n: u32| format!("00000000-0000-0000-0000-{n:012}");
            let (id1, id2, id3, id4) = (id(1), id(2), id(3), id(4));
            let (id5, id6, id7, id8) = (id(5), id(6), id(7), id(8));
            let expected: Vec<(&str, Vec<Value<'_>>)> = vec![
                (
                    "outbox",
                    vec![
                        text(&id1),
                        text("order"),
                        text("o-1"),
                        text("OrderCreated"),
                        // jsonb's output form: keys reordered, whitespace normalised.
                        text(r#"{"lines": [1, 2], "total": 12.50, "currency": "EUR"}"#),
                    ],
                ),
                (
                    "outbox",
                    vec![
                        text(&id2),
                        text("order"),
                        text("o-2"),
                        text("OrderCreated"),
                        text(r#"{"n": 2}"#),
                    ],
                ),
                (
                    "outbox",
                    vec![
                        text(&id3),
                        text("order"),
                        text("o-2"),
                        text("OrderPaid"),
                        text(r#"{"n": 3}"#),
                    ],
                ),
                (
                    "outbox",
                    vec![
                        text(&id4),
                        text("customer"),
                        text("c-9"),
                        text("CustomerSeen"),
                        text("[]"),
                    ],
                ),
                (
                    "outbox",
                    vec![
                        text(&id5),
                        text("order"),
                        text("o-3"),
                        text("OrderDeleted"),
                        Value::Null,
                    ],
                ),
                (
                    "outbox",
                    vec![
                        text(&id6),
                        text("order"),
                        text("ключ-ü-🚀"),
                        text("OrderCreated"),
                        text(r#"{"k": "ключ"}"#),
                    ],
                ),
                (
                    "outbox_bin",
                    vec![
                        text(&id7),
                        text("blob"),
                        text("b-1"),
                        text("BlobStored"),
                        text(r"\x00deadbeef7f80ff"),
                    ],
                ),
                (
                    "outbox",
                    vec![
                        text(&id8),
                        text("order"),
                        text("o-4"),
                        text("OrderCreated"),
                        text("{}"),
                        text("more"),
                    ],
                ),
            ];
            let rows: Vec<(&str, Vec<Value<'_>>)> =
                rows.iter().map(|(t, v)| (t.as_str(), v.clone())).collect();
            assert_eq!(rows, expected);
        });
    }

    #[test]
    fn added_column_appears_in_a_second_relation_for_the_same_table() {
        with_decoded(|messages| {
            let outbox: Vec<_> = relations(&messages)
                .into_iter()
                .filter(|r| r.name == "outbox")
                .collect();
            assert_eq!(outbox.len(), 2);
            let (before, after) = (outbox[0], outbox[1]);
            assert_eq!(before.id, after.id);
            assert_eq!(after.columns[..5], before.columns[..]);
            let extra = &after.columns[5];
            assert_eq!((extra.name.as_str(), extra.type_oid), ("extra", 25));
        });
    }

    #[test]
    fn update_delete_and_truncate_are_skipped() {
        with_decoded(|messages| {
            let skipped: Vec<u8> = messages
                .iter()
                .filter_map(|m| match m {
                    Message::Skipped(tag) => Some(*tag),
                    _ => None,
                })
                .collect();
            assert_eq!(skipped, b"UDT");
        });
    }

    #[test]
    fn every_truncation_of_a_captured_message_is_an_error() {
        for full in fixture_bytes() {
            let skipped = matches!(decode(&full), Ok(Message::Skipped(_)));
            assert_eq!(decode(&full[..0]), Err(DecodeError::Empty));
            for end in 1..full.len() {
                let result = decode(&full[..end]);
                // Skipped messages are never parsed, so only the tag byte matters.
                if skipped {
                    assert_eq!(result, Ok(Message::Skipped(full[0])));
                } else {
                    assert!(result.is_err(), "prefix {end}/{}: {result:?}", full.len());
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_after_a_parsed_message_are_an_error() {
        for mut full in fixture_bytes() {
            if matches!(decode(&full), Ok(Message::Skipped(_))) {
                continue;
            }
            full.push(0);
            assert!(
                matches!(
                    decode(&full),
                    Err(DecodeError::TrailingBytes { count: 1, .. })
                ),
                "{:?}",
                decode(&full)
            );
        }
    }

    /// The first captured Insert: tag, relation id, 'N', Int16 count at 6..8, then the first
    /// column's kind at 8 and its length at 9..13.
    fn captured_insert() -> Vec<u8> {
        fixture_bytes().into_iter().find(|b| b[0] == b'I').unwrap()
    }

    #[test]
    fn unknown_column_kind_is_rejected() {
        let mut bytes = captured_insert();
        assert_eq!(bytes[8], b't');
        bytes[8] = b'x';
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownTupleKind(b'x')));
    }

    #[test]
    fn negative_value_length_is_rejected() {
        let mut bytes = captured_insert();
        bytes[9..13].copy_from_slice(&(-2i32).to_be_bytes());
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Negative {
                what: "column value length",
                value: -2
            })
        );
    }

    #[test]
    fn negative_column_count_is_rejected() {
        let bytes = insert_bytes(-1, b"");
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::Negative { value: -1, .. })
        ));
    }

    #[test]
    fn column_count_larger_than_the_data_is_truncation() {
        let mut bytes = captured_insert();
        let count = i16::from_be_bytes([bytes[6], bytes[7]]);
        bytes[6..8].copy_from_slice(&(count + 1).to_be_bytes());
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Truncated {
                what: "column kind"
            })
        );
    }

    #[test]
    fn column_count_smaller_than_the_data_is_rejected() {
        let bytes = insert_bytes(1, b"nn");
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::TrailingBytes {
                what: "tuple data",
                count: 1
            })
        );
    }

    #[test]
    fn value_longer_than_the_message_is_truncation() {
        let bytes = insert_bytes(1, &[b't', 0, 0, 0, 9, b'a']);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Truncated {
                what: "column value"
            })
        );
    }

    #[test]
    fn insert_without_new_tuple_marker_is_rejected() {
        let mut bytes = insert_bytes(1, b"n");
        bytes[5] = b'K';
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnexpectedTupleMarker(b'K'))
        );
    }

    #[test]
    fn unchanged_and_binary_values_are_passed_through() {
        let bytes = insert_bytes(3, &[b'u', b'b', 0, 0, 0, 2, 0xde, 0xad, b't', 0, 0, 0, 0]);
        let Ok(Message::Insert { relation_id, tuple }) = decode(&bytes) else {
            panic!("{:?}", decode(&bytes));
        };
        assert_eq!(relation_id, 7);
        let values: Vec<_> = tuple.values().collect();
        assert_eq!(
            values,
            [
                Ok(Value::Unchanged),
                Ok(Value::Binary(&[0xde, 0xad])),
                Ok(Value::Text(b"")),
            ]
        );
    }

    #[test]
    fn empty_tuple_is_empty() {
        let bytes = insert_bytes(0, b"");
        let Ok(Message::Insert { tuple, .. }) = decode(&bytes) else {
            panic!("{:?}", decode(&bytes));
        };
        assert!(tuple.is_empty());
        assert_eq!(tuple.values().next(), None);
    }

    #[test]
    fn tuple_values_stop_after_the_first_error() {
        // Built directly: `decode` would already have rejected this row.
        let tuple = Tuple {
            data: b"nxn",
            columns: 3,
        };
        let mut values = tuple.values();
        assert_eq!(values.next(), Some(Ok(Value::Null)));
        assert_eq!(
            values.next(),
            Some(Err(DecodeError::UnknownTupleKind(b'x')))
        );
        assert_eq!(values.next(), None);
        assert_eq!(values.next(), None);
    }

    #[test]
    fn relation_name_must_be_utf8() {
        let bytes = [b'R', 0, 0, 0, 1, 0, 0xff, 0, b'd', 0, 0];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::InvalidUtf8 {
                what: "Relation name"
            })
        );
    }

    #[test]
    fn relation_with_huge_column_count_fails_without_reserving_for_it() {
        let bytes = [b'R', 0, 0, 0, 1, 0, b't', 0, b'd', 0x7f, 0xff];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Truncated {
                what: "column flags"
            })
        );
    }

    #[test]
    fn a_truncated_logical_message_is_an_error() {
        // Flags, LSN, prefix "p", then a length of 5 with only 2 bytes of content.
        let mut b = vec![b'M', 1, 0, 0, 0, 0, 0, 0, 0, 9, b'p', 0];
        b.extend(5i32.to_be_bytes());
        b.extend(b"ab");
        assert_eq!(
            decode(&b),
            Err(DecodeError::Truncated {
                what: "message content"
            })
        );
    }

    #[test]
    fn empty_input_is_an_error() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn unparsed_kinds_are_skipped_by_tag() {
        for tag in *b"UDTOYx" {
            assert_eq!(decode(&[tag, 1, 2]), Ok(Message::Skipped(tag)));
        }
    }
}
