//! STS's answer to a forwarded AWS proof, as control reads it: the caller's ARN from a
//! `GetCallerIdentityResponse` (`aws::caller_arn`), `Code`/`Message` of an
//! `ErrorResponse` (`aws::sts_error`), and the ARN's role (`normalise_assumed_role`,
//! `is_role_arn`). Checks: never panics; an ARN read is non-empty and trimmed, and the
//! role an assumed-role ARN stands for is one control would record.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_control::domain::proof::aws;

fuzz_target!(|data: &[u8]| {
    // Control reads the answer as UTF-8 first.
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let _ = aws::sts_error(xml);
    let Ok(arn) = aws::caller_arn(xml) else {
        return;
    };
    assert!(!arn.is_empty());
    assert_eq!(arn.trim(), arn);
    if let Some(role) = aws::normalise_assumed_role(&arn) {
        assert!(aws::is_role_arn(&role), "{arn} normalises to {role}");
        assert_eq!(aws::normalise_assumed_role(&role), None);
    }
});
