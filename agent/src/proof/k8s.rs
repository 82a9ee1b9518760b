//! Kubernetes proof: the projected ServiceAccount token. (Being built.)

use std::path::PathBuf;

use crate::enroll::EnrollError;

/// Where the token is.
#[derive(Clone, Debug)]
pub struct K8sSource {
    /// The projected token file.
    pub token_file: PathBuf,
}

impl K8sSource {
    /// The proof JSON.
    pub async fn build(&self, _nonce: &str) -> Result<serde_json::Value, EnrollError> {
        Err(EnrollError::Proof(
            "Kubernetes proofs are not built yet".into(),
        ))
    }
}
