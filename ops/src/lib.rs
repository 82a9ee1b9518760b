//! Tether signed operations: the documents and rules by which the **customer**, not the
//! vendor, decides what runs on an appliance.
//!
//! A compromised control plane or broker can send any frame. The agent therefore trusts
//! no field it did not derive itself: for each command it builds the approval document
//! it expects from its own view (its identity and manifest key, its own classification
//! of the command under the customer's policy, the exact command it is about to run),
//! copies only the signer's choices from the approval it received (id, approver, window,
//! request id, reason), encodes that in RFC 8785 form and checks the customer's SSHSIG
//! signature over those bytes. A vendor who changed anything has changed the bytes.
//!
//! Break glass (a customer-approved tunnel to a resource on the customer's network) works
//! the same way: the vendor asks for a resource and a privilege by name, and the target
//! and the credential mint/revoke commands the customer signs come from the customer's
//! own policy on the appliance, never from the vendor.
//!
//! This crate is pure: no tokio, no network, no file system beyond what its callers hand
//! it, so the agent, the `tether` CLI, the customer's `tether-approve` and the fuzzers
//! share one implementation.
//!
//! Modules:
//! - [`canonical`]: RFC 8785 (JCS) encoding and the strict parse (byte-identical
//!   re-encoding, unknown and duplicate keys refused, sizes capped);
//! - [`sig`]: SSHSIG signing and verification (`ssh-ed25519`, `sk-ssh-ed25519` with the
//!   user-presence flag), with the two namespaces;
//! - [`approvers`]: the customer's pinned keys (`approvers.toml`) with validity windows
//!   and scopes, and their `allowed_signers` export;
//! - [`policy`]: the customer's `policy.toml` (phases, classification, deny rules,
//!   break-glass resources and limits) and its evaluation against a resolved program
//!   path;
//! - [`approval`]: the approval document of a command, its re-derivation and the
//!   admission check (and the steps every approval kind shares);
//! - [`tunnel`]: the break-glass approval document (`break_glass` instead of `exec`),
//!   its re-derivation from the agent's policy and the admission check, with the
//!   session length capped by the policy;
//! - [`ledger`]: single use (seen ids plus the pruning horizon), in memory, for the
//!   agent to persist;
//! - [`manifest`]: the signed output manifest;
//! - [`session`]: the signed manifest of a break-glass session;
//! - [`verify`]: the offline checks either party runs (`tether ops verify`, with
//!   `--session` for a break-glass session).
//!
//! Refusal codes are [`tether_proto::CommandFailure`]'s: one vocabulary from the agent
//! to `tether exec`'s exit code. Break glass adds none: an undeclared resource or
//! privilege is `denied_by_policy`, a closed phase `phase_disabled`, a malformed request
//! `invalid`, and the document's checks answer as for commands.

pub mod approval;
pub mod approvers;
pub mod canonical;
pub mod ledger;
pub mod manifest;
pub mod policy;
pub mod session;
pub mod sig;
pub mod tunnel;
pub mod verify;

use serde::{Deserialize, Serialize};
pub use ssh_key;
pub use tether_proto::CommandFailure;

/// The SSHSIG namespace of approvals (`ssh-keygen -Y sign -n tether-approval-v1`).
pub const APPROVAL_NAMESPACE: &str = "tether-approval-v1";
/// The SSHSIG namespace of output manifests.
pub const MANIFEST_NAMESPACE: &str = "tether-manifest-v1";
/// The SSHSIG namespace of the appliance audit log's checkpoints.
pub const CHECKPOINT_NAMESPACE: &str = "tether-audit-checkpoint-v1";

/// What an appliance audit log checkpoint signs: the entry `seq` and its `hash`, as
/// `tether-audit-checkpoint-v1\n<seq>\n<hash>\n`.
pub fn checkpoint_message(seq: i64, hash: &str) -> String {
    format!("{CHECKPOINT_NAMESPACE}\n{seq}\n{hash}\n")
}

/// A refusal: the shared failure code and a sentence for logs and the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Refusal {
    /// One of [`CommandFailure::SIGNED_OPS_REFUSALS`] (or `shell_not_allowed`, or
    /// `invalid` for a malformed break-glass request).
    pub code: CommandFailure,
    /// What exactly failed.
    pub detail: String,
}

impl Refusal {
    /// A refusal with `code` and `detail`.
    pub fn new(code: CommandFailure, detail: impl Into<String>) -> Refusal {
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

/// A permission phase (customer-trust design §2). Commands nobody classified are
/// [`Phase::Operate`]; a shell command is never [`Phase::Observe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Steady state: read-only, usually no approval.
    Observe,
    /// The vendor's deploy or upgrade entry point.
    Deploy,
    /// Restarts, repairs, anything unclassified.
    Operate,
    /// Agent upgrades, OS packages; usually disabled outside maintenance windows.
    Install,
}

impl Phase {
    /// Every phase, in order of privilege.
    pub const ALL: [Phase; 4] = [
        Phase::Observe,
        Phase::Deploy,
        Phase::Operate,
        Phase::Install,
    ];

    /// Its name in documents and policy files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Observe => "observe",
            Phase::Deploy => "deploy",
            Phase::Operate => "operate",
            Phase::Install => "install",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Milliseconds since the Unix epoch of an RFC 3339 time (`2026-12-01T18:00:00Z`).
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let t =
        humantime::parse_rfc3339(s).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?;
    i64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too far in the future"))
}

/// An RFC 3339 UTC time (seconds) of milliseconds since the epoch.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
