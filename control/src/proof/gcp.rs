//! Gcp proof. (Being built.)

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ProofError, Verified};

/// `[proofs.gcp]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcpSettings {}

/// Verifies Gcp proofs.
#[derive(Debug)]
pub struct GcpVerifier {}

impl GcpVerifier {
    /// Build from settings.
    pub fn new(_settings: &GcpSettings) -> anyhow::Result<GcpVerifier> {
        Ok(GcpVerifier {})
    }

    /// Verify a JWT against the recorded binding.
    pub async fn verify(
        &self,
        _jwt: &str,
        _nonce: &str,
        _project: &str,
        _service_account: &str,
        _now: i64,
    ) -> Result<Verified, ProofError> {
        Err(ProofError::new(
            StatusCode::BAD_REQUEST,
            "proof_unsupported",
            "Gcp proofs are not accepted yet",
        ))
    }
}
