//! What Tether's fuzz targets share: the fixed keys and identities the verifier targets
//! build their inputs around, so a seed written once (by `tests/seeds.rs`) still verifies
//! in every later run, and the small helpers that wrap fuzzed bytes into a well-formed
//! proof.
//!
//! - [`jwt`]: an RSA key made from a fixed seed, its JWKS, RS256 signing, and the GCP and
//!   Kubernetes verifiers (control's own) that trust it.
//! - [`csr`]: an Ed25519 key from a fixed seed that signs a fuzzed
//!   `CertificationRequestInfo` into a CSR.
//! - [`aws`]: the STS endpoints and nonce of the AWS proof target.
//! - [`audit`]: the trust domain and committed root certificate of the audit export seeds.
//!
//! Nothing here reads the clock: the verifiers are called at [`jwt::NOW`].

pub mod audit;
pub mod aws;
pub mod csr;
pub mod jwt;

/// `data` split at its first NUL byte: (before, after). No NUL: (`data`, empty).
pub fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// A directory for the files a target must hand a verifier (a JWKS file): `$TMPDIR`, which
/// `scripts/fuzz` points at its own temporary directory.
pub fn scratch_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tether-fuzz-{}-{name}", std::process::id()))
}
