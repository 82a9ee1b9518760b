//! AWS proof: a presigned `sts:GetCallerIdentity` request. (Being built.)

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ProofError, Verified};

/// The AWS proof as the agent sends it: `{"kind": "aws", "method", "url", "headers", "body"}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AwsProof {
    /// HTTP method (`POST`).
    pub method: String,
    /// The STS URL the request was signed for.
    pub url: String,
    /// The signed headers (and any others).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The body (`Action=GetCallerIdentity&Version=2011-06-15`).
    #[serde(default)]
    pub body: String,
}

/// `[proofs.aws]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {}

/// Verifies AWS proofs.
#[derive(Debug)]
pub struct AwsVerifier {}

impl AwsVerifier {
    /// Build from settings.
    pub fn new(_settings: &AwsSettings) -> anyhow::Result<AwsVerifier> {
        Ok(AwsVerifier {})
    }

    /// Verify `proof` for `nonce` against the recorded `role_arn`.
    pub async fn verify(
        &self,
        _proof: &AwsProof,
        _nonce: &str,
        _role_arn: &str,
    ) -> Result<Verified, ProofError> {
        Err(ProofError::new(
            StatusCode::BAD_REQUEST,
            "proof_unsupported",
            "AWS proofs are not accepted yet",
        ))
    }
}
