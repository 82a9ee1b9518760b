//! The proofs an appliance presents to enroll: a one-time token, or a platform identity
//! bound to the enrollment nonce (AWS STS, GCP instance identity, Kubernetes
//! ServiceAccount token). Control checks each against the appliance's recorded binding.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    pub async fn build(&self, nonce: &str) -> Result<tether_api::enroll::Proof, EnrollError> {
        match self {
            EnrollProof::Token(t) => Ok(tether_api::enroll::Proof::Token { token: t.clone() }),
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

/// How the appliance enrolled, without any secret: recorded in `state.json` so the agent
/// can make a fresh platform proof on its own when its certificate expired offline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProofSpec {
    /// One-time token: a new one must come from an operator.
    Token,
    /// AWS STS.
    Aws {
        /// STS endpoint.
        sts_url: String,
        /// Signing region.
        region: String,
    },
    /// GCP metadata server.
    Gcp {
        /// Metadata server base URL.
        metadata_url: String,
    },
    /// Kubernetes projected token.
    K8s {
        /// Token file.
        token_file: PathBuf,
    },
}

impl EnrollProof {
    /// The secret-free description of this proof.
    pub fn spec(&self) -> ProofSpec {
        match self {
            EnrollProof::Token(_) => ProofSpec::Token,
            EnrollProof::Aws(s) => ProofSpec::Aws {
                sts_url: s.sts_url.clone(),
                region: s.region.clone(),
            },
            EnrollProof::Gcp(s) => ProofSpec::Gcp {
                metadata_url: s.metadata_url.clone(),
            },
            EnrollProof::K8s(s) => ProofSpec::K8s {
                token_file: s.token_file.clone(),
            },
        }
    }

    /// The proof to make again from `spec`; `None` for a token (it cannot be remade).
    pub fn from_spec(spec: &ProofSpec) -> Option<EnrollProof> {
        match spec {
            ProofSpec::Token => None,
            ProofSpec::Aws { sts_url, region } => Some(EnrollProof::Aws(aws::AwsSource {
                sts_url: sts_url.clone(),
                region: region.clone(),
            })),
            ProofSpec::Gcp { metadata_url } => Some(EnrollProof::Gcp(gcp::GcpSource {
                metadata_url: metadata_url.clone(),
            })),
            ProofSpec::K8s { token_file } => Some(EnrollProof::K8s(k8s::K8sSource {
                token_file: token_file.clone(),
            })),
        }
    }
}
