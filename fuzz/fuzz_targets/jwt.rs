//! Control's GCP and Kubernetes token verifiers (`GcpVerifier::verify`,
//! `K8sVerifier::verify`, through `jwks::verify_rs256`) on fuzzed tokens, trusting one key
//! (`tether_fuzz::jwt`) through a JWKS file.
//!
//! Input: the first byte selects the form. Even: the rest is a token as an appliance sends
//! it. Odd: the rest is a header and claims (JSON, or anything) separated by a NUL byte,
//! which the target encodes and signs with the trusted key, so the claims checks are
//! reached. Checks: never panics, and a token either verifier accepts carries the trusted
//! key's signature, an RS256 header and claims that name the binding, unexpired at `NOW`.

#![no_main]

use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tether_control::domain::proof::gcp::{GcpVerifier, GCP_ISSUERS};
use tether_control::domain::proof::k8s::K8sVerifier;
use tether_fuzz::jwt::{self, NOW, SIGNER};

struct State {
    rt: tokio::runtime::Runtime,
    gcp: GcpVerifier,
    k8s: K8sVerifier,
}

static STATE: LazyLock<State> = LazyLock::new(|| {
    let file = tether_fuzz::scratch_path("jwks.json");
    std::fs::write(&file, SIGNER.jwks()).expect("write the JWKS");
    State {
        rt: jwt::runtime(),
        gcp: jwt::gcp_verifier(&file),
        k8s: jwt::k8s_verifier(&file),
    }
});

fuzz_target!(
    init: {
    // Outside the time limit of the first input: the RSA key takes a while.
        LazyLock::force(&STATE);
    },
    |data: &[u8]| {
        let Some((&selector, rest)) = data.split_first() else {
            return;
        };
        let token = if selector & 1 == 0 {
            let Ok(t) = std::str::from_utf8(rest) else {
                return;
            };
            t.to_owned()
        } else {
            let (header, claims) = tether_fuzz::split_nul(rest);
            SIGNER.sign(header, claims)
        };
        let s = &*STATE;
        let gcp = s.rt.block_on(s.gcp.verify(
            &token,
            jwt::NONCE,
            jwt::GCP_PROJECT,
            jwt::GCP_SERVICE_ACCOUNT,
            NOW,
        ));
        let k8s = s.rt.block_on(s.k8s.verify(
            &token,
            jwt::K8S_ISSUER,
            jwt::K8S_NAMESPACE,
            jwt::K8S_SERVICE_ACCOUNT,
            NOW,
        ));
        if gcp.is_err() && k8s.is_err() {
            return;
        }
        // Accepted: the signature is the trusted key's, the header says RS256.
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "accepted a token that is not a compact JWS");
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("accepted signature is base64url");
        ring::signature::RsaPublicKeyComponents {
            n: &SIGNER.n,
            e: &SIGNER.e,
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            token[..parts[0].len() + 1 + parts[1].len()].as_bytes(),
            &sig,
        )
        .expect("accepted a token the trusted key did not sign");
        let json = |part: &str| -> Value {
            let bytes = URL_SAFE_NO_PAD.decode(part).expect("accepted part is base64url");
            serde_json::from_slice(&bytes).expect("accepted part is JSON")
        };
        let header = json(parts[0]);
        assert_eq!(header["alg"], "RS256");
        let claims = json(parts[1]);
        let aud_has = |want: &str| match &claims["aud"] {
            Value::String(a) => a == want,
            Value::Array(all) => all.iter().any(|a| a == want),
            _ => false,
        };
        let int = |name: &str| claims[name].as_i64();
        if gcp.is_ok() {
            assert!(GCP_ISSUERS.iter().any(|i| claims["iss"] == *i));
            assert!(aud_has(jwt::NONCE));
            assert_eq!(claims["email"], jwt::GCP_SERVICE_ACCOUNT);
            assert_eq!(claims["email_verified"], true);
            assert_eq!(claims["google"]["compute_engine"]["project_id"], jwt::GCP_PROJECT);
            assert!(int("exp").is_some_and(|exp| exp >= NOW - 30));
        }
        if k8s.is_ok() {
            assert_eq!(claims["iss"], jwt::K8S_ISSUER);
            assert!(aud_has(jwt::K8S_AUDIENCE));
            assert_eq!(
                claims["sub"],
                format!(
                    "system:serviceaccount:{}:{}",
                    jwt::K8S_NAMESPACE,
                    jwt::K8S_SERVICE_ACCOUNT
                )
            );
            assert_eq!(claims["kubernetes.io"]["namespace"], jwt::K8S_NAMESPACE);
            assert_eq!(
                claims["kubernetes.io"]["serviceaccount"]["name"],
                jwt::K8S_SERVICE_ACCOUNT
            );
            assert!(int("exp").is_some_and(|exp| exp >= NOW - 30));
            assert!(int("iat").is_some_and(|iat| iat <= NOW + 30 && NOW - iat <= 600));
        }
    }
);
