//! RFC 8785 (JSON Canonicalization Scheme) encoding, and the strict parse that accepts a
//! document only if it *is* its own canonical encoding.
//!
//! The strict parse is what makes "the customer read these bytes" mean something: no
//! whitespace to hide a second document in, no duplicate key for two parsers to read
//! differently, no unknown field, no float. The document types derive `Deserialize`
//! with `deny_unknown_fields` (serde's derive also refuses a duplicate field); the
//! re-encoding check catches the rest (order, whitespace, escapes, number forms).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Integers in documents stay below 2^53, where every JSON reader agrees on them.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Why bytes are not an acceptable document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CanonicalError {
    /// Longer than the cap for this kind of document.
    #[error("the document is {len} bytes; at most {max} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// Not JSON, not the schema (unknown or duplicate field, wrong type).
    #[error("the document does not parse: {0}")]
    Parse(String),
    /// Valid, but not in canonical form.
    #[error("the document is not in RFC 8785 canonical form (whitespace, key order, escapes or number form differ)")]
    NotCanonical,
    /// A value that cannot be encoded (an integer beyond 2^53).
    #[error("the document cannot be encoded canonically: {0}")]
    Encode(String),
}

/// The canonical bytes of `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    serde_jcs::to_vec(value).map_err(|e| CanonicalError::Encode(e.to_string()))
}

/// Parse `bytes` as a `T` that must be exactly its own canonical encoding.
pub fn parse<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
    max: usize,
) -> Result<T, CanonicalError> {
    if bytes.len() > max {
        return Err(CanonicalError::TooLong {
            len: bytes.len(),
            max,
        });
    }
    let value: T =
        serde_json::from_slice(bytes).map_err(|e| CanonicalError::Parse(e.to_string()))?;
    if encode(&value)? != bytes {
        return Err(CanonicalError::NotCanonical);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        b: String,
        a: i64,
    }

    #[test]
    fn keys_sorted_no_whitespace() {
        let d = Doc {
            b: "é \"q\"\n".into(),
            a: 5,
        };
        let bytes = encode(&d).unwrap();
        assert_eq!(bytes, "{\"a\":5,\"b\":\"é \\\"q\\\"\\n\"}".as_bytes());
        assert_eq!(parse::<Doc>(&bytes, 100).unwrap(), d);
    }

    #[test]
    fn anything_but_the_canonical_form_is_refused() {
        for bad in [
            &br#"{"a":5, "b":"x"}"#[..],
            br#"{"b":"x","a":5}"#,
            br#"{"a":5,"b":"x"} "#,
            br#"{"a":5,"a":5,"b":"x"}"#,
            br#"{"a":5,"b":"x","c":1}"#,
            br#"{"a":5.0,"b":"x"}"#,
            br#"{"a":5,"b":"\u0078"}"#,
        ] {
            assert!(
                parse::<Doc>(bad, 100).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse::<Doc>(br#"{"a":5,"b":"x"}"#, 10),
            Err(CanonicalError::TooLong { len: 15, max: 10 })
        );
    }
}
