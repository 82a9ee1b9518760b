//! A JWKS document as an issuer serves it, read by control's key cache (`JwksCache`,
//! through a GCP verifier whose `jwks_file` holds the fuzzed bytes), then used to verify
//! a genuine token. Checks: never panics; the token verifies only if the document
//! publishes the signing key itself (same modulus and exponent) under the token's `kid`.

#![no_main]

use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tether_fuzz::jwt::{self, NOW, SIGNER};

struct State {
    rt: tokio::runtime::Runtime,
    file: std::path::PathBuf,
    token: String,
}

static STATE: LazyLock<State> = LazyLock::new(|| State {
    rt: jwt::runtime(),
    file: tether_fuzz::scratch_path("jwks-input.json"),
    token: SIGNER.sign(jwt::header().as_bytes(), jwt::gcp_claims().as_bytes()),
});

/// Whether `doc` lists the signing key under `kid` (leading zeros of `n`, `e` ignored).
fn publishes_the_key(doc: &Value) -> bool {
    let strip = |b: &[u8]| -> Vec<u8> { b.iter().copied().skip_while(|&x| x == 0).collect() };
    let field = |k: &Value, name: &str| -> Option<Vec<u8>> {
        URL_SAFE_NO_PAD
            .decode(k[name].as_str()?)
            .ok()
            .map(|b| strip(&b))
    };
    doc["keys"].as_array().is_some_and(|keys| {
        keys.iter().any(|k| {
            k["kid"] == jwt::KID
                && field(k, "n").as_deref() == Some(&strip(&SIGNER.n)[..])
                && field(k, "e").as_deref() == Some(&strip(&SIGNER.e)[..])
        })
    })
}

fuzz_target!(
    init: {
    // Outside the time limit of the first input: the RSA key takes a while.
        LazyLock::force(&STATE);
    },
    |data: &[u8]| {
        let s = &*STATE;
        std::fs::write(&s.file, data).expect("write the JWKS");
        let verifier = jwt::gcp_verifier(&s.file);
        let r = s.rt.block_on(verifier.verify(
            &s.token,
            jwt::NONCE,
            jwt::GCP_PROJECT,
            jwt::GCP_SERVICE_ACCOUNT,
            NOW,
        ));
        if r.is_ok() {
            let doc: Value = serde_json::from_slice(data).expect("an accepted JWKS is JSON");
            assert!(
                publishes_the_key(&doc),
                "a token verified with a key set that does not publish its key"
            );
        }
    }
);
