//! The approval parser and the admission check on arbitrary bytes: never panics; whatever
//! parses is canonical (re-encodes to the same bytes) and re-derives to itself when the
//! agent's view matches it; a garbage signature is always `approval_invalid`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_ops::approval::{self, Approval, Expected};
use tether_ops::approvers::Approvers;
use tether_ops::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let (doc, sig) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(a) = Approval::parse(doc) {
        assert_eq!(a.to_bytes(), doc);
        let expected = Expected {
            appliance: &a.appliance,
            phase: a.phase,
            exec: &a.exec,
        };
        assert_eq!(a.derive(&expected), a);
        let limits = Policy::parse(b"").unwrap().limits;
        let r = approval::check(
            doc,
            sig,
            &expected,
            &Approvers::default(),
            &limits,
            a.not_before_ms,
        );
        assert!(r.is_err(), "no key is pinned: nothing may verify");
    }
});
