//! K8s proof. (Being built.)

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ProofError, Verified};

/// `[proofs.k8s]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct K8sSettings {}

/// Verifies K8s proofs.
#[derive(Debug)]
pub struct K8sVerifier {}

impl K8sVerifier {
    /// Build from settings.
    pub fn new(_settings: &K8sSettings) -> anyhow::Result<K8sVerifier> {
        Ok(K8sVerifier {})
    }

    /// Verify a JWT against the recorded binding.
    pub async fn verify(
        &self,
        _jwt: &str,
        _issuer: &str,
        _namespace: &str,
        _service_account: &str,
        _now: i64,
    ) -> Result<Verified, ProofError> {
        Err(ProofError::new(
            StatusCode::BAD_REQUEST,
            "proof_unsupported",
            "K8s proofs are not accepted yet",
        ))
    }
}
