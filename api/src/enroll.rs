//! Appliance enrollment and renewal: `POST /v1/enroll/challenge`, `POST /v1/enroll` with a
//! proof, and `POST /v1/renew` with the current certificate (both answer an
//! [`EnrollResponse`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Answer to `POST /v1/enroll/challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Challenge {
    /// The nonce to bind the proof to.
    pub nonce: String,
    /// When it expires, RFC 3339.
    pub expires_at: String,
}

/// The AWS proof as the agent sends it: `{"kind": "aws", "method", "url", "headers", "body"}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AwsProof {
    /// HTTP method (`POST`).
    pub method: String,
    /// The STS URL the request was signed for.
    pub url: String,
    /// The signed headers (and any others, which are not forwarded).
    pub headers: BTreeMap<String, String>,
    /// The body (`Action=GetCallerIdentity&Version=2011-06-15`).
    #[serde(default)]
    pub body: String,
}

/// A platform proof.
#[derive(Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Proof {
    /// A one-time enrollment token.
    Token {
        /// The token, as printed by `token create`.
        token: String,
    },
    /// A presigned `sts:GetCallerIdentity` request.
    Aws(AwsProof),
    /// A GCP instance-identity JWT.
    Gcp {
        /// The JWT.
        jwt: String,
    },
    /// A Kubernetes projected ServiceAccount JWT.
    K8s {
        /// The JWT.
        jwt: String,
    },
}

impl Proof {
    /// The proof's kind, as in the request (`token`, `aws`, `gcp`, `k8s`).
    pub fn kind(&self) -> &'static str {
        match self {
            Proof::Token { .. } => "token",
            Proof::Aws(_) => "aws",
            Proof::Gcp { .. } => "gcp",
            Proof::K8s { .. } => "k8s",
        }
    }
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proof::Token { .. } => "Proof::Token(<redacted>)",
            Proof::Aws(_) => "Proof::Aws(..)",
            Proof::Gcp { .. } => "Proof::Gcp(<redacted>)",
            Proof::K8s { .. } => "Proof::K8s(<redacted>)",
        })
    }
}

/// Body of `POST /v1/enroll`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The appliance id.
    pub appliance_id: String,
    /// PKCS#10 CSR, PEM.
    pub csr_pem: String,
    /// Nonce from the challenge.
    pub nonce: String,
    /// The proof.
    pub proof: Proof,
}

/// Answer to a successful enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// The appliance id.
    pub appliance_id: String,
    /// Leaf then intermediate, PEM.
    pub certificate_pem: String,
    /// The root CA, PEM (what the agent pins).
    pub ca_pem: String,
    /// Brokers to connect to (`host:port`).
    pub brokers: Vec<String>,
    /// SHA-256 of the leaf DER, lowercase hex.
    pub fingerprint: String,
    /// Certificate `notAfter`, RFC 3339.
    pub expires_at: String,
    /// Certificate `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// Body of `POST /v1/renew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 CSR for the new key, PEM.
    pub csr_pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_are_tagged_and_redacted() {
        let p = Proof::Token {
            token: "tt_secret".into(),
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"kind":"token","token":"tt_secret"}"#
        );
        assert!(!format!("{p:?}").contains("tt_secret"));
        let aws: Proof = serde_json::from_str(
            r#"{"kind":"aws","method":"POST","url":"https://sts.amazonaws.com","headers":{}}"#,
        )
        .unwrap();
        assert_eq!(aws.kind(), "aws");
    }
}
