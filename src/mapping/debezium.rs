//! `format = "debezium-json"`: the key and value bytes Debezium's Outbox Event Router sends
//! with Kafka Connect's JsonConverter at its defaults (schemas on), so that consumers of those
//! records read the relay's unchanged (issue #13, `docs/debezium.md`).
//!
//! Each is a JSON object, `{"schema":<the column's Connect schema>,"payload":<the value>}`,
//! with no whitespace. The value is a JSON string holding the column's text (for a jsonb
//! payload, its JSON text, escaped once more), or `null`. The escaping is the one measured on
//! Debezium's records (`tests/debezium_envelope.rs`): `"` and `\` get a backslash, the control
//! characters U+0000 to U+001F get `\b`, `\t`, `\n`, `\f`, `\r` or `\u00XX`, a character
//! beyond U+FFFF (four UTF-8 bytes, e.g. an emoji) becomes its UTF-16 surrogate pair
//! `\uD83D\uDE80` (hex in upper case throughout), and everything else (DEL, `/`, U+2028, the
//! rest of non-ASCII) is written as it is.
//!
//! The envelope depends on the column's type and nullability, which Debezium reads from the
//! catalog; the relay supports the shape of `migrations/001_outbox.sql` (a NOT NULL text key,
//! a nullable json or jsonb payload; a nullable text payload too), checks it at start and
//! refuses other column types.

/// PostgreSQL type oids of the columns an envelope is made for.
const TEXT_OID: u32 = 25;
const VARCHAR_OID: u32 = 1043;
const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;

/// What precedes the key's value: the Connect schema of a NOT NULL text column.
const KEY_HEAD: &[u8] = br#"{"schema":{"type":"string","optional":false},"payload":"#;
/// What precedes the payload's value: the Connect schema of a nullable json or jsonb column.
const PAYLOAD_HEAD: &[u8] =
    br#"{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1},"payload":"#;
/// What precedes the payload's value: the Connect schema of a nullable text column.
const TEXT_PAYLOAD_HEAD: &[u8] = br#"{"schema":{"type":"string","optional":true},"payload":"#;

/// The envelopes of one table's key and payload columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelopes {
    key: &'static [u8],
    payload: &'static [u8],
}

/// The column types `debezium-json` can envelope, named for error messages.
pub const KEY_TYPES: &str = "text or varchar";
/// See [`KEY_TYPES`].
pub const PAYLOAD_TYPES: &str = "json, jsonb, text or varchar";

impl Envelopes {
    /// The envelopes of the default outbox table's columns (a NOT NULL text key, a nullable
    /// jsonb payload), which `[[message]]` events are given too: they have no columns, and a
    /// consumer moving from the table to messages then sees no difference.
    pub const DEFAULT: Envelopes = Envelopes {
        key: KEY_HEAD,
        payload: PAYLOAD_HEAD,
    };

    /// The envelopes for a key column and a payload column of these types; `Err` names the
    /// role (`key_column` or `payload_column`) whose type Debezium would give another schema.
    pub fn for_types(key_oid: u32, payload_oid: u32) -> Result<Envelopes, &'static str> {
        if !matches!(key_oid, TEXT_OID | VARCHAR_OID) {
            return Err("key_column");
        }
        let payload = match payload_oid {
            JSON_OID | JSONB_OID => PAYLOAD_HEAD,
            TEXT_OID | VARCHAR_OID => TEXT_PAYLOAD_HEAD,
            _ => return Err("payload_column"),
        };
        Ok(Envelopes {
            key: KEY_HEAD,
            payload,
        })
    }

    /// The key's envelope in `out` (cleared first). A NULL key has none: the column is
    /// NOT NULL (checked at start), and Debezium's converter refuses a null there; a
    /// `[[message]]` envelope without `aggregateid` keeps its null key.
    pub fn key<'b>(&self, value: Option<&[u8]>, out: &'b mut Vec<u8>) -> Option<&'b [u8]> {
        value.map(|v| wrap(self.key, Some(v), out))
    }

    /// The payload's envelope in `out` (cleared first); NULL is `"payload":null`.
    pub fn payload<'b>(&self, value: Option<&[u8]>, out: &'b mut Vec<u8>) -> &'b [u8] {
        wrap(self.payload, value, out)
    }
}

/// `head`, then `value` as a JSON string (or `null`), then the closing brace.
fn wrap<'b>(head: &[u8], value: Option<&[u8]>, out: &'b mut Vec<u8>) -> &'b [u8] {
    out.clear();
    out.extend_from_slice(head);
    match value {
        None => out.extend_from_slice(b"null"),
        Some(v) => {
            out.reserve(v.len() + 3);
            out.push(b'"');
            escape_into(v, out);
            out.push(b'"');
        }
    }
    out.push(b'}');
    out.as_slice()
}

/// Appends `v` escaped as the inside of a JSON string, copying unescaped runs whole.
fn escape_into(v: &[u8], out: &mut Vec<u8>) {
    let mut run = 0;
    let mut i = 0;
    while i < v.len() {
        let b = v[i];
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            b'\t' => b't',
            b'\n' => b'n',
            0x0c => b'f',
            b'\r' => b'r',
            0x00..=0x1f => 0,
            0xf0..=0xf4 => {
                // A four-byte sequence: its code point as a surrogate pair. Bytes that are
                // not a well-formed sequence (never in a UTF-8 database) pass as they are.
                let Some(c) = v
                    .get(i..i + 4)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.chars().next())
                else {
                    i += 1;
                    continue;
                };
                out.extend_from_slice(&v[run..i]);
                let mut pair = [0u16; 2];
                for unit in c.encode_utf16(&mut pair) {
                    push_u_escape(*unit, out);
                }
                i += 4;
                run = i;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&v[run..i]);
        if short != 0 {
            out.extend_from_slice(&[b'\\', short]);
        } else {
            push_u_escape(u16::from(b), out);
        }
        i += 1;
        run = i;
    }
    out.extend_from_slice(&v[run..]);
}

/// `\uXXXX`, hex digits in upper case.
fn push_u_escape(unit: u16, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let nibble = |shift: u16| HEX[usize::from((unit >> shift) & 0xf)];
    out.extend_from_slice(&[b'\\', b'u', nibble(12), nibble(8), nibble(4), nibble(0)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelopes() -> Envelopes {
        Envelopes::for_types(TEXT_OID, JSONB_OID).unwrap()
    }

    fn payload(v: Option<&[u8]>) -> String {
        let mut out = Vec::new();
        String::from_utf8(envelopes().payload(v, &mut out).to_vec()).unwrap()
    }

    fn key(v: &[u8]) -> String {
        let mut out = Vec::new();
        String::from_utf8(envelopes().key(Some(v), &mut out).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn key_and_payload_envelopes_are_debeziums_bytes() {
        // As measured on Debezium 3.6.1's records (docs/debezium.md).
        assert_eq!(
            key(b"42"),
            r#"{"schema":{"type":"string","optional":false},"payload":"42"}"#
        );
        assert_eq!(
            payload(Some(br#"{"a": 1, "s": "x"}"#)),
            r#"{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1},"payload":"{\"a\": 1, \"s\": \"x\"}"}"#
        );
        assert_eq!(
            payload(None),
            r#"{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1},"payload":null}"#
        );
        let mut out = Vec::new();
        assert_eq!(envelopes().key(None, &mut out), None);
    }

    #[test]
    fn escaping_covers_quotes_backslashes_control_characters_and_leaves_unicode() {
        let inner = |v: &[u8]| {
            let k = key(v);
            k[KEY_HEAD.len() + 1..k.len() - 2].to_owned()
        };
        assert_eq!(inner(br#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(
            inner(b"\x08\t\n\x0c\r"),
            r"\b\t\n\f\r",
            "the five short escapes"
        );
        assert_eq!(inner(b"\x00\x01\x1f"), r"\u0000\u0001\u001F");
        // DEL, the slash, HTML characters and non-ASCII up to U+FFFF pass as they are.
        assert_eq!(inner(b"\x7f/<&>'"), "\x7f/<&>'");
        let bmp = "ключ-✓ Zoë \u{2028}\u{2029}\u{ffff}";
        assert_eq!(inner(bmp.as_bytes()), bmp);
        // Beyond U+FFFF: the UTF-16 surrogate pair, as Debezium sends 🚀.
        assert_eq!(inner("a🚀b".as_bytes()), r"a\uD83D\uDE80b");
        assert_eq!(
            inner("\u{10000}\u{10ffff}".as_bytes()),
            r"\uD800\uDC00\uDBFF\uDFFF"
        );
        // Malformed UTF-8 (never in a UTF-8 database) is passed through, not dropped.
        let mut out = Vec::new();
        let malformed = envelopes().key(Some(b"\xf0\x9f!"), &mut out).unwrap();
        assert_eq!(&malformed[KEY_HEAD.len()..], b"\"\xf0\x9f!\"}");
        assert_eq!(inner(b""), "");
        // jsonb text, whose strings PostgreSQL has escaped already, is escaped once more.
        assert_eq!(
            inner(br#"{"s": "say \"hi\"\n"}"#),
            r#"{\"s\": \"say \\\"hi\\\"\\n\"}"#
        );
        // What a JSON parser reads back is the column's text.
        for v in [
            "a\"b\\c\u{1}\t\u{7f}ü🚀\u{2028}",
            "",
            "{\"a\": [1, \"\\\\\"]}",
        ] {
            let parsed: serde_json::Value = serde_json::from_str(&key(v.as_bytes())).unwrap();
            assert_eq!(parsed["payload"], v);
        }
    }

    #[test]
    fn other_column_types_are_refused_by_role() {
        const UUID: u32 = 2950;
        const BYTEA: u32 = 17;
        assert_eq!(
            Envelopes::for_types(VARCHAR_OID, JSON_OID),
            Ok(Envelopes::DEFAULT)
        );
        // A text payload is a plain string schema (measured: no name, no version).
        let text = Envelopes::for_types(TEXT_OID, TEXT_OID).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            text.payload(Some(br#"plain "text""#), &mut out),
            br#"{"schema":{"type":"string","optional":true},"payload":"plain \"text\""}"#
        );
        assert_eq!(Envelopes::for_types(UUID, JSONB_OID), Err("key_column"));
        assert_eq!(Envelopes::for_types(TEXT_OID, BYTEA), Err("payload_column"));
    }

    #[test]
    fn the_buffer_is_reused_without_leftovers() {
        let e = envelopes();
        let mut out = Vec::new();
        e.payload(Some(&[b'x'; 100]), &mut out);
        let cap = out.capacity();
        assert_eq!(
            e.payload(Some(b"y"), &mut out).len(),
            PAYLOAD_HEAD.len() + 4
        );
        assert_eq!(out.capacity(), cap, "no reallocation for a shorter value");
    }
}
