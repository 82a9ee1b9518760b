//! AWS proof: a presigned `sts:GetCallerIdentity`. (Being built.)

use crate::enroll::EnrollError;

/// Where and how to sign.
#[derive(Clone, Debug)]
pub struct AwsSource {
    /// The STS endpoint URL to sign for.
    pub sts_url: String,
    /// The signing region.
    pub region: String,
}

impl AwsSource {
    /// The proof JSON.
    pub async fn build(&self, _nonce: &str) -> Result<serde_json::Value, EnrollError> {
        Err(EnrollError::Proof("AWS proofs are not built yet".into()))
    }
}
