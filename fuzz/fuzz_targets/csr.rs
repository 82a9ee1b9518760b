//! Control's CSR check (`ca::csr::verify_csr`, `verify_csr_der`): parse, key type, proof
//! of possession.
//!
//! Input: the first byte selects the form. 0: the rest is PEM text; 1: DER; anything else:
//! the rest is a `CertificationRequestInfo` that the target signs with a fixed Ed25519 key
//! (`tether_fuzz::csr`), so requests whose body is fuzzed get past the signature check.
//! Checks: never panics; an accepted key has its type's length; a request the target
//! signed is accepted only for the target's own key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_control::domain::ca::csr::{verify_csr, verify_csr_der, CsrKeyType};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let result = match selector {
        0 => {
            let Ok(pem) = std::str::from_utf8(rest) else {
                return;
            };
            verify_csr(pem)
        }
        1 => verify_csr_der(rest),
        _ => {
            let der = tether_fuzz::csr::sign_request(&tether_fuzz::csr::key(), rest);
            let r = verify_csr_der(&der);
            if let Ok(v) = &r {
                assert_eq!(v.public_key(), tether_fuzz::csr::public_key());
            }
            r
        }
    };
    let Ok(v) = result else { return };
    match v.key_type() {
        CsrKeyType::Ed25519 => assert_eq!(v.public_key().len(), 32),
        CsrKeyType::EcdsaP256 => {
            assert_eq!(v.public_key().len(), 65);
            assert_eq!(v.public_key()[0], 4);
        }
    }
    assert_eq!(v.key_sha256().len(), 64);
});
