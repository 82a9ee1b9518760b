//! Platform proofs: how an appliance with no certificate shows control who it is.
//!
//! Each verifier checks one kind of proof against the appliance's recorded platform
//! binding and, on success, returns a [`Verified`] whose `proof_id` the enrollment records
//! as used (replay protection: a proof is accepted once).
//!
//! - [`aws`]: a presigned `sts:GetCallerIdentity` request, forwarded only to allowlisted
//!   STS endpoints; the nonce must be inside the signed headers.
//! - [`gcp`]: a GCP instance-identity JWT (RS256) whose audience is the nonce.
//! - [`k8s`]: a projected Kubernetes ServiceAccount JWT.

use serde::{Deserialize, Serialize};

pub mod aws;
pub mod gcp;
pub mod jwks;
pub mod k8s;

// A refused proof is a [`crate::domain::Error`]: `BadRequest` malformed, `Forbidden` does
// not prove the identity, `Upstream` the upstream failed.
use crate::domain::Error;

/// What a verified platform proof established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The proof kind (`"aws"`, `"gcp"`, `"k8s"`): the namespace of `proof_id`.
    pub kind: &'static str,
    /// A stable id of this proof (a `jti`, or the SHA-256 of the signature) recorded as
    /// used so the same proof is never accepted twice.
    pub proof_id: String,
    /// Until when the proof id must be remembered (the proof's own expiry), Unix seconds.
    pub remember_until: i64,
}

/// `[proofs]` in `control.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProofSettings {
    /// `[proofs.aws]`
    pub aws: aws::AwsSettings,
    /// `[proofs.gcp]`
    pub gcp: gcp::GcpSettings,
    /// `[proofs.k8s]`
    pub k8s: k8s::K8sSettings,
}

/// The verifiers a running control uses (built once from [`ProofSettings`]; they hold
/// HTTP clients and key caches).
#[derive(Debug)]
pub struct Verifiers {
    /// AWS STS.
    pub aws: aws::AwsVerifier,
    /// GCP identity tokens.
    pub gcp: gcp::GcpVerifier,
    /// Kubernetes ServiceAccount tokens.
    pub k8s: k8s::K8sVerifier,
}

impl Verifiers {
    /// Build the verifiers.
    pub fn new(settings: &ProofSettings) -> anyhow::Result<Verifiers> {
        Ok(Verifiers {
            aws: aws::AwsVerifier::new(&settings.aws)?,
            gcp: gcp::GcpVerifier::new(&settings.gcp)?,
            k8s: k8s::K8sVerifier::new(&settings.k8s)?,
        })
    }
}
