//! The canonical JSON of an audit entry's `details` (`tether_audit::hash::canonical_json`),
//! which every verifier recomputes from the exported object to check an entry's hash.
//! Checks: never panics; the canonical text is JSON that reads back to a value whose
//! canonical text is the same (so any spacing or key order of an export hashes alike),
//! and holds no whitespace outside strings.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tether_audit::hash::canonical_json;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(text) = canonical_json(&value) else {
        return;
    };
    let again: Value = serde_json::from_str(&text).expect("canonical JSON reads back");
    assert_eq!(canonical_json(&again).as_deref(), Ok(text.as_str()));
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_string = !in_string,
            (false, _, c) => assert!(!c.is_whitespace(), "whitespace in {text:?}"),
            _ => {}
        }
    }
});
