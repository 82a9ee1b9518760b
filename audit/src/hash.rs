//! The hash of an entry, and the canonical JSON of its `details`.
//!
//! # The hash of an entry (format `tether-audit-v1`)
//!
//! `hash` is the lowercase hex SHA-256 of these fields, concatenated with nothing in
//! between:
//!
//! | # | field | encoding |
//! |---|-------|----------|
//! | 1 | the text `tether-audit-v1` | `str` |
//! | 2 | `seq` | `int` |
//! | 3 | `at` (Unix seconds) | `int` |
//! | 4 | actor kind: `operator`, `appliance`, `broker` or `system` | `str` |
//! | 5 | actor name | `str` |
//! | 6 | `action` | `str` |
//! | 7 | `target` | `str` |
//! | 8 | outcome: `success`, `refused` or `failed` | `str` |
//! | 9 | `details` in canonical JSON (below) | `str` |
//! | 10 | `prev_hash`: the previous entry's `hash`, 64 lowercase hex characters; for `seq` 1, 64 `0`s ([`GENESIS_HASH`]) | `str` |
//!
//! - `int(n)`: the 8 bytes of `n` as a signed 64-bit integer, big-endian, two's
//!   complement.
//! - `str(s)`: the length of `s` in UTF-8 bytes as 4 bytes, big-endian unsigned, then those
//!   bytes.
//!
//! Every field has a fixed width or a length prefix, so two different entries never
//! encode to the same bytes.
//!
//! **Canonical JSON** is RFC 8785 (JCS) restricted to what `details` may hold: objects,
//! arrays, strings, `true`, `false`, `null` and integers within ±(2⁵³ − 1). No whitespace;
//! object members sorted by their names compared as UTF-16 code units; strings escape `"`
//! and `\` with a backslash, U+0008, U+0009, U+000A, U+000C, U+000D as `\b`, `\t`, `\n`,
//! `\f`, `\r`, the other characters below U+0020 as `\u00xx` (lowercase hex), and write
//! everything else as is (UTF-8); integers in decimal, with `-` when negative. Any JCS
//! implementation gives the same text for such a value (a number with a fraction or
//! outside that range has no canonical form here and is refused). The exported
//! `details` object may be written in any key order or spacing: verifiers re-canonicalize
//! it.

use serde_json::Value;

use crate::entry::{Actor, AuditEvent, EventError, Outcome};

/// `prev_hash` of the first entry: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The first field of every hashed entry (the format version).
pub const HASH_FORMAT: &str = "tether-audit-v1";
/// Largest integer canonical JSON holds (2⁵³ − 1); its negation is the smallest.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// The hash of an entry with these contents: lowercase hex SHA-256 of the encoding in the
/// module docs.
pub fn entry_hash(
    seq: i64,
    at: i64,
    event: &AuditEvent,
    prev_hash: &str,
) -> Result<String, EventError> {
    let details = canonical_json(&event.details)?;
    Ok(hash_parts(
        seq,
        at,
        &event.actor,
        &event.action,
        &event.target,
        event.outcome,
        &details,
        prev_hash,
    ))
}

/// The hash, given `details` already in canonical JSON (a store keeps that text, as
/// [`AuditEvent::validate`] returns it).
#[allow(clippy::too_many_arguments)]
pub fn hash_parts(
    seq: i64,
    at: i64,
    actor: &Actor,
    action: &str,
    target: &str,
    outcome: Outcome,
    details_json: &str,
    prev_hash: &str,
) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    put_str(&mut h, HASH_FORMAT);
    h.update(&seq.to_be_bytes());
    h.update(&at.to_be_bytes());
    for field in [
        actor.kind.as_str(),
        &actor.name,
        action,
        target,
        outcome.as_str(),
        details_json,
        prev_hash,
    ] {
        put_str(&mut h, field);
    }
    hex(h.finish().as_ref())
}

/// `str(s)` of the module docs: a 4-byte big-endian length, then the UTF-8 bytes.
fn put_str(h: &mut ring::digest::Context, s: &str) {
    // Fields are far below 4 GiB (the store bounds them); saturate rather than wrap.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    h.update(&len.to_be_bytes());
    h.update(s.as_bytes());
}

/// `str(s)` of the module docs, appended to `out`.
pub(crate) fn put_str_bytes(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Whether `s` has the form of an entry hash: 64 lowercase hex characters.
pub(crate) fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(H[usize::from(b >> 4)]));
        s.push(char::from(H[usize::from(b & 15)]));
    }
    s
}

/// `value` in canonical JSON (see the module docs).
pub fn canonical_json(value: &Value) -> Result<String, EventError> {
    let mut out = String::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) -> Result<(), EventError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            let int = if let Some(i) = n.as_i64() {
                Some(i)
            } else if n.is_u64() {
                None
            } else {
                // An integral float (`3.0`) is the integer JCS writes for it.
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER as f64)
                    .map(|f| f as i64)
            };
            match int {
                Some(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => {
                    out.push_str(&i.to_string())
                }
                _ => return Err(EventError::Number(n.to_string())),
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785: by UTF-16 code units (not the map's own order, which a
            // `preserve_order` build of serde_json would make insertion order).
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c < '\u{20}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::entry::action;

    #[test]
    fn canonical_json_is_jcs_for_the_allowed_values() {
        let v = json!({
            "b": [1, -2, true, null, "x"],
            "a": {"z": 0, "y": "line\nbreak \"q\" \\ \u{1} \u{7f} é"},
            "\u{e000}": 1,
            "\u{1f600}": 2,
            "n": 3.0,
        });
        assert_eq!(
            canonical_json(&v).unwrap(),
            "{\"a\":{\"y\":\"line\\nbreak \\\"q\\\" \\\\ \\u0001 \u{7f} é\",\"z\":0},\
             \"b\":[1,-2,true,null,\"x\"],\"n\":3,\"\u{1f600}\":2,\"\u{e000}\":1}"
        );
        assert_eq!(
            canonical_json(&json!(1.5)),
            Err(EventError::Number("1.5".into()))
        );
        assert!(canonical_json(&json!(MAX_SAFE_INTEGER)).is_ok());
        assert!(canonical_json(&json!(-MAX_SAFE_INTEGER)).is_ok());
        assert!(canonical_json(&json!(MAX_SAFE_INTEGER + 1)).is_err());
        assert!(canonical_json(&json!(u64::MAX)).is_err());
    }

    /// The encoding in the module docs, written out by hand for one entry.
    #[test]
    fn hash_follows_the_documented_encoding() {
        let event = AuditEvent::refused(
            Actor::appliance("app-1"),
            action::APPLIANCE_ENROLL,
            "app-1",
            "nonce_replayed",
        )
        .with("proof_kind", "token");
        let mut m = Vec::new();
        let s = |m: &mut Vec<u8>, s: &str| {
            m.extend_from_slice(&(s.len() as u32).to_be_bytes());
            m.extend_from_slice(s.as_bytes());
        };
        s(&mut m, "tether-audit-v1");
        m.extend_from_slice(&7i64.to_be_bytes());
        m.extend_from_slice(&1_700_000_000i64.to_be_bytes());
        for f in [
            "appliance",
            "app-1",
            "appliance.enroll",
            "app-1",
            "refused",
            r#"{"code":"nonce_replayed","proof_kind":"token"}"#,
            GENESIS_HASH,
        ] {
            s(&mut m, f);
        }
        let expected = hex(ring::digest::digest(&ring::digest::SHA256, &m).as_ref());
        assert_eq!(
            entry_hash(7, 1_700_000_000, &event, GENESIS_HASH).unwrap(),
            expected
        );
    }
}
