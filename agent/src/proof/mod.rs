//! The proofs an appliance presents to enroll: a one-time token, or a platform identity
//! bound to the enrollment nonce (AWS STS, GCP instance identity, Kubernetes
//! ServiceAccount token). Control checks each against the appliance's recorded binding.

use crate::enroll::EnrollError;

pub mod aws;
pub mod gcp;
pub mod k8s;

/// Default AWS STS endpoint the agent signs for.
pub const DEFAULT_AWS_STS_URL: &str = "https://sts.us-east-1.amazonaws.com/";
/// Default AWS region for the signature.
pub const DEFAULT_AWS_REGION: &str = "us-east-1";
/// Default GCP metadata server.
pub const DEFAULT_GCP_METADATA_URL: &str = "http://metadata.google.internal";
/// Default path of the projected ServiceAccount token.
pub const DEFAULT_K8S_TOKEN_FILE: &str = "/var/run/secrets/tokens/tether";

/// The proof an appliance presents.
#[derive(Clone)]
pub enum EnrollProof {
    /// A one-time enrollment token from an operator.
    Token(String),
    /// AWS: sign `sts:GetCallerIdentity` with the instance's credentials.
    Aws(aws::AwsSource),
    /// GCP: an identity token from the metadata server, audience = nonce.
    Gcp(gcp::GcpSource),
    /// Kubernetes: the projected ServiceAccount token file.
    K8s(k8s::K8sSource),
}

impl std::fmt::Debug for EnrollProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnrollProof::Token(_) => f.write_str("Token(<redacted>)"),
            EnrollProof::Aws(s) => write!(f, "Aws({s:?})"),
            EnrollProof::Gcp(s) => write!(f, "Gcp({s:?})"),
            EnrollProof::K8s(s) => write!(f, "K8s({s:?})"),
        }
    }
}

impl EnrollProof {
    /// The proof JSON for `POST /v1/enroll`, bound to `nonce` where the kind allows.
    pub async fn build(&self, nonce: &str) -> Result<serde_json::Value, EnrollError> {
        match self {
            EnrollProof::Token(t) => Ok(serde_json::json!({"kind": "token", "token": t})),
            EnrollProof::Aws(s) => s.build(nonce).await,
            EnrollProof::Gcp(s) => s.build(nonce).await,
            EnrollProof::K8s(s) => s.build(nonce).await,
        }
    }

    /// Whether this kind can be made again without an operator (platform proofs can; a
    /// token cannot). An appliance whose certificate expired offline re-enrolls on its own
    /// only when this is true.
    pub fn renewable_unattended(&self) -> bool {
        !matches!(self, EnrollProof::Token(_))
    }
}
