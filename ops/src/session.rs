//! The signed session manifest of a break-glass tunnel (design §3.6, §3.8): at the end
//! of every activated session the appliance signs, with its manifest key (namespace
//! [`crate::MANIFEST_NAMESPACE`], as command manifests), what happened: which approval
//! (the SHA-256 of its exact bytes), the tunnel as opened (resource, privilege, target,
//! the addresses pinned at activation), when it was activated and ended and why, each
//! connection with its byte counts and close reason, what became of the one-time
//! credential, and whether teardown (the revoke command) succeeded.
//!
//! Times are the agent's clock in ms since the epoch, as in the command manifest
//! (`started_ms`) and the approval (`not_before_ms`). The session id is a decimal string
//! (it may exceed 2^53). At most [`MAX_LISTED_CONNECTIONS`] connections are listed; the
//! totals count them all. `tether ops verify --session` checks one against its approval
//! offline ([`crate::verify::verify_session`]).

use serde::{Deserialize, Serialize};
use ssh_key::PrivateKey;

use crate::approval::ApplianceRef;
use crate::canonical;
use crate::manifest::{ApprovalRef, MAX_MANIFEST_LEN};
use crate::{Phase, MANIFEST_NAMESPACE};

/// `type` of a session manifest.
pub const SESSION_MANIFEST_TYPE: &str = "tether.session-manifest.v1";
/// The most connections a manifest lists one by one (the totals count every one).
pub const MAX_LISTED_CONNECTIONS: usize = 256;

/// One TCP connection of the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionRecord {
    /// 1 for the session's first connection, then +1.
    pub n: u64,
    /// When the target accepted it (agent's clock, ms since the epoch).
    pub opened_ms: i64,
    /// When it closed.
    pub closed_ms: i64,
    /// Bytes from the vendor to the target (into the customer's network).
    pub to_target_bytes: u64,
    /// Bytes from the target to the vendor (out of the customer's network).
    pub from_target_bytes: u64,
    /// Why it closed (`finished` when both sides closed their half, else a tunnel close
    /// reason: `idle`, `expired`, `revoked`, …).
    pub reason: String,
}

/// What became of the session's one-time credential.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRecord {
    /// The customer's id for it (`""` when none was minted).
    pub id: String,
    /// The mint command ran and its output was sealed.
    pub minted: bool,
    /// The sealed credential was handed to the vendor (in `TunnelReady`).
    pub delivered: bool,
    /// The revoke command ran and succeeded (`teardown` is `ok`).
    pub revoked: bool,
}

/// The result of the session's teardown (its revoke command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Teardown {
    /// Nothing to revoke: the privilege declares no revoke command.
    None,
    /// The revoke command succeeded.
    Ok,
    /// It kept failing (the last error); the agent retries it when it starts again.
    Failed(String),
}

/// A session manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionManifest {
    /// [`SESSION_MANIFEST_TYPE`].
    #[serde(rename = "type")]
    pub doc_type: String,
    /// Which appliance, and the key that signs this.
    pub appliance: ApplianceRef,
    /// The vendor's request id.
    pub request_id: String,
    /// The agent's id for the session (decimal).
    pub session_id: String,
    /// The approval that opened it: the SHA-256 of its exact bytes, its id, its signer.
    pub approval: ApprovalRef,
    /// The resource's phase.
    pub phase: Phase,
    /// The resource, by the customer's name.
    pub resource: String,
    /// The privilege.
    pub privilege: String,
    /// The target, as the customer's policy names it.
    pub target: String,
    /// The addresses resolved and pinned at activation (every connection went to one).
    pub pinned: Vec<String>,
    /// The session length the agent enforced, in seconds (the approved `duration_s`,
    /// capped by the customer's policy).
    pub duration_s: u64,
    /// When it became active.
    pub activated_ms: i64,
    /// When it ended (connections reset; teardown follows). For a session a crash of the
    /// agent cut off (`end_reason` `recovered_after_crash`, signed when the agent starts
    /// again): the latest it can have lasted, its expiry or that restart if earlier, and
    /// its connections are those the log recorded as closed.
    pub ended_ms: i64,
    /// Why it ended (a tunnel close reason: `expired`, `closed`, `revoked`, …, or
    /// `recovered_after_crash`).
    pub end_reason: String,
    /// Its connections, in order (at most [`MAX_LISTED_CONNECTIONS`]).
    pub connections: Vec<ConnectionRecord>,
    /// Every connection the target accepted, listed or not.
    pub connections_total: u64,
    /// Bytes to the target over all connections.
    pub to_target_bytes: u64,
    /// Bytes from the target over all connections.
    pub from_target_bytes: u64,
    /// The one-time credential.
    pub credential: CredentialRecord,
    /// The revoke command's result.
    pub teardown: Teardown,
    /// The agent's version.
    pub agent_version: String,
}

impl SessionManifest {
    /// The canonical bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        canonical::encode(self).unwrap_or_default()
    }

    /// Parse `bytes` strictly.
    pub fn parse(bytes: &[u8]) -> Result<SessionManifest, String> {
        let m: SessionManifest =
            canonical::parse(bytes, MAX_MANIFEST_LEN).map_err(|e| e.to_string())?;
        if m.doc_type != SESSION_MANIFEST_TYPE {
            return Err(format!(
                "type is {:?}, not {SESSION_MANIFEST_TYPE:?}",
                m.doc_type
            ));
        }
        Ok(m)
    }

    /// The bytes and the armored signature by `key`.
    pub fn sign(&self, key: &PrivateKey) -> Result<(Vec<u8>, String), ssh_key::Error> {
        let bytes = self.to_bytes();
        let sig = crate::sig::sign(key, MANIFEST_NAMESPACE, &bytes)?;
        Ok((bytes, sig))
    }
}
