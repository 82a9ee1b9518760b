//! An audit export file through the offline verifier (`tether_audit::export::verify_export`,
//! what `tether audit verify` runs), trusting the seeds' root for their trust domain.
//! Checks: never panics; every line that parses re-encodes to a line that parses equal;
//! a verified export has entries from 1 and its last checkpoint is not past its head.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether_audit::checkpoint::{pem_certs, CheckpointVerifier};
use tether_audit::export::{verify_export, ExportLine, ExportVerifier};
use tether_fuzz::audit::{ROOT_PEM, TRUST_DOMAIN};

static CHECKPOINTS: LazyLock<CheckpointVerifier> = LazyLock::new(|| {
    let roots = pem_certs(ROOT_PEM).expect("root PEM");
    CheckpointVerifier::new(&roots, TRUST_DOMAIN).expect("checkpoint verifier")
});

fuzz_target!(
    init: {
        LazyLock::force(&CHECKPOINTS);
    },
    |data: &[u8]| {
        for line in data.split(|&b| b == b'\n') {
            if let Ok(parsed) = ExportLine::parse(line) {
                let again = ExportLine::parse(parsed.to_json().as_bytes());
                assert_eq!(again.as_ref(), Ok(&parsed), "a line does not survive re-encoding");
            }
        }
        let verifier = ExportVerifier::new(CHECKPOINTS.clone());
        let Ok(summary) = verify_export(data, verifier) else {
            return;
        };
        let (head, _) = summary.head.clone().expect("a verified export has a head");
        assert!(summary.entries >= 1);
        assert_eq!(u64::try_from(head).ok(), Some(summary.entries));
        if let Some(cp) = summary.last_checkpoint {
            assert!(cp <= head, "{summary:?}");
        }
    }
);
