//! GCP proof: an instance identity token. (Being built.)

use crate::enroll::EnrollError;

/// Where to get the token.
#[derive(Clone, Debug)]
pub struct GcpSource {
    /// Base URL of the metadata server.
    pub metadata_url: String,
}

impl GcpSource {
    /// The proof JSON.
    pub async fn build(&self, _nonce: &str) -> Result<serde_json::Value, EnrollError> {
        Err(EnrollError::Proof("GCP proofs are not built yet".into()))
    }
}
