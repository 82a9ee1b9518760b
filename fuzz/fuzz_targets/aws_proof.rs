//! The AWS proof as an enrollment body carries it (`AwsProof` JSON: method, URL, headers,
//! body), through every check control makes before it forwards the request to STS
//! (`AwsVerifier::check_offline`; nothing is sent). Checks: never panics, and a proof
//! that passes is a `POST` of exactly GetCallerIdentity to a configured endpoint, with the
//! nonce and the host among its signed headers.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether_api::enroll::AwsProof;
use tether_control::domain::proof::aws::{AwsVerifier, GET_CALLER_IDENTITY_BODY};
use tether_fuzz::aws::{self, ENDPOINTS, NONCE};

static VERIFIER: LazyLock<AwsVerifier> = LazyLock::new(aws::verifier);

fuzz_target!(
    init: {
        LazyLock::force(&VERIFIER);
    },
    |data: &[u8]| {
        let Ok(proof) = serde_json::from_slice::<AwsProof>(data) else {
            return;
        };
        if VERIFIER
            .check_offline(&proof, NONCE, tether_fuzz::jwt::NOW)
            .is_err()
        {
            return;
        }
        assert_eq!(proof.method, "POST");
        assert_eq!(proof.body, GET_CALLER_IDENTITY_BODY);
        let header = |name: &str| {
            let found: Vec<&String> = proof
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .collect();
            assert!(found.len() <= 1, "{name} twice");
            found.first().map(|v| v.as_str())
        };
        assert_eq!(header("x-tether-nonce"), Some(NONCE));
        let auth = header("authorization").expect("accepted without Authorization");
        let signed = auth
            .split(',')
            .find_map(|p| p.trim().strip_prefix("SignedHeaders="))
            .expect("accepted without SignedHeaders");
        let signed: Vec<&str> = signed.split(';').collect();
        assert!(signed.contains(&"x-tether-nonce") && signed.contains(&"host"));
        let origin = |u: &str| {
            let u = url::Url::parse(u).expect("accepted URL parses");
            (
                u.scheme().to_owned(),
                u.host_str().map(str::to_owned),
                u.port_or_known_default(),
            )
        };
        let got = origin(&proof.url);
        assert!(
            ENDPOINTS.iter().any(|e| origin(e) == got),
            "accepted a URL whose origin is not configured: {:?}",
            proof.url
        );
    }
);
