//! JWTs for the `jwt` and `jwks` targets: one RSA-2048 key generated from a fixed seed
//! (the same key in every run, so the raw tokens of the seed corpus verify), its JWKS,
//! RS256 signing with it, and control's GCP and Kubernetes verifiers trusting it through
//! a JWKS file.

use std::path::Path;
use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use tether_control::domain::proof::gcp::{GcpSettings, GcpVerifier};
use tether_control::domain::proof::k8s::{K8sCluster, K8sSettings, K8sVerifier};

/// The verifiers' `now`, Unix seconds (2026-09-21).
pub const NOW: i64 = 1_790_000_000;
/// The `kid` of the key.
pub const KID: &str = "fuzz-key";
/// The enrollment nonce a GCP token's `aud` must be.
pub const NONCE: &str = "n-3q2k8w1x7c5v";
/// The GCP binding.
pub const GCP_PROJECT: &str = "acme-prod";
/// The GCP binding's service account.
pub const GCP_SERVICE_ACCOUNT: &str = "appliance@acme-prod.iam.gserviceaccount.com";
/// The Kubernetes cluster's issuer.
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The Kubernetes cluster's audience.
pub const K8S_AUDIENCE: &str = "tether";
/// The Kubernetes binding's namespace.
pub const K8S_NAMESPACE: &str = "edge";
/// The Kubernetes binding's service account.
pub const K8S_SERVICE_ACCOUNT: &str = "tether-agent";

/// SplitMix64: a deterministic stream for key generation, so every run has the same key.
/// Not a cryptographic generator: the key protects nothing.
struct SeedRng(u64);

impl rand_core::RngCore for SeedRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

// rsa asks for a CryptoRng; see above for why this one may claim it.
impl rand_core::CryptoRng for SeedRng {}

/// The signing key and its public parts.
pub struct Signer {
    key: ring::signature::RsaKeyPair,
    /// Modulus, big-endian.
    pub n: Vec<u8>,
    /// Public exponent, big-endian.
    pub e: Vec<u8>,
}

/// The key, generated on first use (about a second).
pub static SIGNER: LazyLock<Signer> = LazyLock::new(|| {
    let key = rsa::RsaPrivateKey::new(&mut SeedRng(0x7e7e_0019), 2048).expect("RSA key");
    let der = key.to_pkcs1_der().expect("PKCS#1");
    Signer {
        key: ring::signature::RsaKeyPair::from_der(der.as_bytes()).expect("ring takes the key"),
        n: key.n().to_bytes_be(),
        e: key.e().to_bytes_be(),
    }
});

impl Signer {
    /// A compact JWS: base64url of `header` and `claims` as given (any bytes), signed
    /// RS256.
    pub fn sign(&self, header: &[u8], claims: &[u8]) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// The JWKS publishing the key under [`KID`].
    pub fn jwks(&self) -> String {
        serde_json::json!({"keys": [{
            "kty": "RSA",
            "kid": KID,
            "use": "sig",
            "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(&self.n),
            "e": URL_SAFE_NO_PAD.encode(&self.e),
        }]})
        .to_string()
    }
}

/// The header every genuine token carries.
pub fn header() -> String {
    serde_json::json!({"alg": "RS256", "kid": KID, "typ": "JWT"}).to_string()
}

/// Claims the GCP verifier accepts at [`NOW`] for the binding above.
pub fn gcp_claims() -> String {
    serde_json::json!({
        "iss": "https://accounts.google.com",
        "aud": NONCE,
        "azp": "1122334455",
        "sub": "1122334455",
        "email": GCP_SERVICE_ACCOUNT,
        "email_verified": true,
        "iat": NOW - 60,
        "exp": NOW + 3540,
        "google": {"compute_engine": {
            "instance_id": "4455667788",
            "instance_name": "edge-1",
            "project_id": GCP_PROJECT,
            "project_number": 99887766,
            "zone": "europe-west1-b"
        }}
    })
    .to_string()
}

/// Claims the Kubernetes verifier accepts at [`NOW`] for the binding above.
pub fn k8s_claims() -> String {
    serde_json::json!({
        "iss": K8S_ISSUER,
        "aud": [K8S_AUDIENCE],
        "sub": format!("system:serviceaccount:{K8S_NAMESPACE}:{K8S_SERVICE_ACCOUNT}"),
        "iat": NOW - 30,
        "nbf": NOW - 30,
        "exp": NOW + 570,
        "jti": "5c3e1f0a-9b7d-4e2a-8f61-2d4c8b0e7a13",
        "kubernetes.io": {
            "namespace": K8S_NAMESPACE,
            "serviceaccount": {"name": K8S_SERVICE_ACCOUNT, "uid": "f1e2d3c4"},
            "pod": {"name": "agent-0", "uid": "a1b2c3d4"}
        }
    })
    .to_string()
}

/// A GCP verifier reading its keys from `jwks_file`.
pub fn gcp_verifier(jwks_file: &Path) -> GcpVerifier {
    GcpVerifier::new(&GcpSettings {
        jwks_file: Some(jwks_file.to_owned()),
        ..GcpSettings::default()
    })
    .expect("GCP settings")
}

/// A Kubernetes verifier for [`K8S_ISSUER`] reading its keys from `jwks_file`.
pub fn k8s_verifier(jwks_file: &Path) -> K8sVerifier {
    K8sVerifier::new(&K8sSettings {
        clusters: vec![K8sCluster {
            issuer: K8S_ISSUER.into(),
            audience: K8S_AUDIENCE.into(),
            jwks_file: Some(jwks_file.to_owned()),
            ..K8sCluster::default()
        }],
        ..K8sSettings::default()
    })
    .expect("Kubernetes settings")
}

/// A single-threaded runtime to drive the (async) verifiers; the key file is read on
/// its blocking pool.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
