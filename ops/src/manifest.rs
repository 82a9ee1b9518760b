//! The signed output manifest (design §1.8): one per command, refusals included, signed
//! with the appliance's own manifest key (namespace `tether-manifest-v1`), chained by a
//! per-appliance sequence and the previous manifest's SHA-256 so a missing one shows.

use serde::{Deserialize, Serialize};
use ssh_key::PrivateKey;

use crate::approval::{ApplianceRef, ExecSpec};
use crate::canonical;
use crate::{sha256_hex, Phase, MANIFEST_NAMESPACE};

/// `type` of a manifest.
pub const MANIFEST_TYPE: &str = "tether.manifest.v1";
/// The longest manifest accepted by a verifier.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;

/// Which approval let the command run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRef {
    /// SHA-256 (hex) of the exact re-derived bytes that verified.
    pub sha256: String,
    /// Its id.
    pub approval_id: String,
    /// `SHA256:…` of the customer key that signed it.
    pub signer: String,
}

/// The program that ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Its resolved, canonical path.
    pub path: String,
    /// SHA-256 (hex) of the file.
    pub sha256: String,
}

/// The user it ran as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    /// The user name.
    pub user: String,
    /// Its uid.
    pub uid: u32,
}

/// How the command ended: `{"exited": 0}`, `{"failed": "timed_out"}`,
/// `{"refused": "approval_replayed"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// It ran and exited with this code.
    Exited(i32),
    /// It started and ended without an exit code (a `CommandFailure` name).
    Failed(String),
    /// It never started (a `CommandFailure` name).
    Refused(String),
}

/// Byte count and SHA-256 of one output stream, hashed as it streamed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDigest {
    /// Bytes produced.
    pub bytes: u64,
    /// SHA-256 (hex) over them, in order.
    pub sha256: String,
}

impl StreamDigest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> StreamDigest {
        StreamDigest {
            bytes: data.len() as u64,
            sha256: sha256_hex(data),
        }
    }
}

/// A streaming [`StreamDigest`].
#[derive(Clone, Default)]
pub struct StreamHasher {
    bytes: u64,
    hash: sha2::Sha256,
}

impl StreamHasher {
    /// Add a chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        use sha2::Digest;
        self.bytes += chunk.len() as u64;
        self.hash.update(chunk);
    }

    /// The digest so far.
    pub fn finish(self) -> StreamDigest {
        use sha2::Digest;
        StreamDigest {
            bytes: self.bytes,
            sha256: hex::encode(self.hash.finalize()),
        }
    }
}

/// A manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_TYPE`].
    #[serde(rename = "type")]
    pub doc_type: String,
    /// Which appliance, and the key that signs this.
    pub appliance: ApplianceRef,
    /// 1 for the appliance's first manifest, then +1.
    pub seq: u64,
    /// SHA-256 (hex) of the previous manifest's bytes, `""` for the first.
    pub prev_sha256: String,
    /// The vendor's request id (from the approval, or `""`).
    pub request_id: String,
    /// The command's id on the session.
    pub command_id: u64,
    /// The approval that let it run, `null` if none was needed or it was refused first.
    pub approval: Option<ApprovalRef>,
    /// Its phase, `null` if it was refused before classification.
    pub phase: Option<Phase>,
    /// SHA-256 of the policy that decided, `""` if none could be read.
    pub policy_sha256: String,
    /// The command as received.
    pub exec: ExecSpec,
    /// What ran, `null` if nothing did.
    pub program: Option<Program>,
    /// As whom, `null` if nothing ran.
    pub run_as: Option<RunAs>,
    /// When it started (agent's clock).
    pub started_ms: i64,
    /// When it ended.
    pub finished_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// Stdout.
    pub stdout: StreamDigest,
    /// Stderr.
    pub stderr: StreamDigest,
    /// The agent's version.
    pub agent_version: String,
}

impl Manifest {
    /// The canonical bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        canonical::encode(self).unwrap_or_default()
    }

    /// Parse `bytes` strictly.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = canonical::parse(bytes, MAX_MANIFEST_LEN).map_err(|e| e.to_string())?;
        if m.doc_type != MANIFEST_TYPE {
            return Err(format!("type is {:?}, not {MANIFEST_TYPE:?}", m.doc_type));
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

/// The per-appliance manifest chain: the next sequence number and previous hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// The last manifest's sequence number (0 before the first).
    pub seq: u64,
    /// The last manifest's SHA-256, `""` before the first.
    pub head: String,
}

impl Chain {
    /// `(seq, prev_sha256)` for the next manifest.
    pub fn next(&self) -> (u64, String) {
        (self.seq + 1, self.head.clone())
    }

    /// Advance past a manifest with `seq` and `bytes`.
    pub fn advance(&mut self, seq: u64, bytes: &[u8]) {
        self.seq = seq;
        self.head = sha256_hex(bytes);
    }
}
