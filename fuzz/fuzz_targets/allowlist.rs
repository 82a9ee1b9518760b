//! The allowlist text parser on arbitrary bytes: never panics, and whatever it accepts
//! applies to an `Allowlist` without error (it refuses conflicts itself) and round-trips
//! through the text format.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_broker::allowlist::{parse, Allowlist, Change};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = parse(data) else { return };
    let text: String = entries
        .iter()
        .map(|e| format!("{} {}\n", e.appliance, e.fingerprint))
        .collect();
    assert_eq!(parse(text.as_bytes()).as_ref(), Ok(&entries));
    let list = Allowlist::new();
    list.apply(Change::Replace {
        version: None,
        entries: entries.clone(),
    })
    .expect("parsed entries never conflict");
    assert_eq!(list.snapshot().len(), entries.len());
});
