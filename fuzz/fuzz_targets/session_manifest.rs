//! The session manifest parser and `verify_session` on arbitrary bytes (an approval,
//! then after a NUL byte a manifest): never panics; a manifest that parses is canonical
//! (re-encodes to the same bytes) and is never also a command manifest; with no key
//! pinned and no signatures nothing verifies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_ops::approvers::Approvers;
use tether_ops::manifest::Manifest;
use tether_ops::session::SessionManifest;
use tether_ops::verify::verify_session;

fuzz_target!(|data: &[u8]| {
    let (approval, manifest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    if let Ok(m) = SessionManifest::parse(manifest) {
        assert_eq!(m.to_bytes(), manifest);
        assert!(
            Manifest::parse(manifest).is_err(),
            "a session manifest is never a command manifest"
        );
    }
    let r = verify_session(approval, b"", manifest, b"", &Approvers::default(), 60_000);
    assert!(r.is_err(), "nothing signed: nothing may verify");
});
