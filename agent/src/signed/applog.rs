//! The appliance audit log, kept for the customer: hash-chained JSON lines in the same
//! entry format as control's audit chain (`tether-audit`), appended and `fsync`ed at each
//! decision, before the decision takes effect.
//!
//! It is also the single-use store of approvals: at start the agent replays every
//! `approval.consumed` entry into its ledger, so an approval used once is refused after
//! a restart too. A log that does not verify, or cannot be written, means nothing runs
//! (`audit_unavailable`): what cannot be recorded does not happen.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tether_audit::{entry_hash, Actor, AuditEntry, AuditEvent, ChainVerifier, GENESIS_HASH};

/// Entry actions the agent writes.
pub mod action {
    /// The customer files were (re)loaded; details say which is usable.
    pub const CUSTOMER_LOADED: &str = "customer.loaded";
    /// A command arrived; details: command id, request id, argv, kind.
    pub const COMMAND_RECEIVED: &str = "command.received";
    /// An approval passed every check and is now used (written before the command
    /// starts).
    pub const APPROVAL_CONSUMED: &str = "approval.consumed";
    /// A command was refused; details: the reason code.
    pub const COMMAND_REFUSED: &str = "command.refused";
    /// A command's signed manifest.
    pub const COMMAND_MANIFEST: &str = "command.manifest";
    /// A break-glass tunnel was asked for; details: resource, privilege, request id.
    pub const TUNNEL_REQUESTED: &str = "tunnel.requested";
    /// A tunnel was refused; details: the reason code.
    pub const TUNNEL_REFUSED: &str = "tunnel.refused";
    /// A tunnel session became active (written before the vendor is told); details:
    /// session id, target, pinned addresses, expiry.
    pub const SESSION_ACTIVATED: &str = "session.activated";
    /// A tunnel connection closed; details: bytes each way, duration, reason.
    pub const CONNECTION_CLOSED: &str = "connection.closed";
    /// A tunnel session ended; details: the reason.
    pub const SESSION_ENDED: &str = "session.ended";
    /// A tunnel's credential was revoked at teardown; details: its id.
    pub const CREDENTIAL_REVOKED: &str = "credential.revoked";
    /// A tunnel's revoke command failed; details: the error, the attempt (it is
    /// retried).
    pub const TEARDOWN_FAILED: &str = "teardown.failed";
    /// A tunnel's sealed credential was handed to the vendor (in `TunnelReady`);
    /// details: its id and the recipient it is sealed to.
    pub const CREDENTIAL_DELIVERED: &str = "credential.delivered";
    /// A tunnel session lost its session-control stream (with the broker connection);
    /// it lives on while the appliance has a broker session, within the customer's
    /// `teardown_on_disconnect_after`.
    pub const SESSION_DETACHED: &str = "session.detached";
    /// A tunnel session's signed manifest (before its `session.ended`); details: its
    /// SHA-256, signature, and the manifest itself (or the file holding it when too long
    /// for an entry).
    pub const SESSION_MANIFEST: &str = "session.manifest";
}

/// An open log and its head.
#[derive(Debug)]
pub struct AppLog {
    path: PathBuf,
    file: File,
    seq: i64,
    head: String,
}

fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl AppLog {
    /// Open (or create, 0640) the log at `path`, verifying the whole chain; `replay` sees
    /// every entry in order.
    pub fn open(path: &Path, mut replay: impl FnMut(&AuditEntry)) -> Result<AppLog, String> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut chain = ChainVerifier::from_genesis();
        for (n, line) in BufReader::new(&file).lines().enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let entry: AuditEntry = serde_json::from_str(&line).map_err(|e| {
                format!("{} line {}: not an audit entry: {e}", path.display(), n + 1)
            })?;
            chain
                .push(&entry)
                .map_err(|e| format!("{} does not verify: {e}", path.display()))?;
            replay(&entry);
        }
        let (seq, head) = chain
            .head()
            .map_or((0, GENESIS_HASH.to_owned()), |(s, h)| (s, h.to_owned()));
        Ok(AppLog {
            path: path.to_path_buf(),
            file,
            seq,
            head,
        })
    }

    /// Append `event` and `fsync` it. Nothing is appended on error.
    pub fn append(&mut self, event: &AuditEvent) -> Result<&str, String> {
        event.validate().map_err(|e| e.to_string())?;
        let seq = self.seq + 1;
        let at = unix_secs();
        let hash = entry_hash(seq, at, event, &self.head).map_err(|e| e.to_string())?;
        let entry = AuditEntry {
            seq,
            at,
            actor: event.actor.clone(),
            action: event.action.clone(),
            target: event.target.clone(),
            outcome: event.outcome,
            details: event.details.clone(),
            prev_hash: self.head.clone(),
            hash: hash.clone(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let len = self.file.metadata().map(|m| m.len()).ok();
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no half line behind: the next append must still chain.
            if let Some(len) = len {
                let _ = self.file.set_len(len);
            }
            return Err(format!("{}: {e}", self.path.display()));
        }
        self.seq = seq;
        self.head = hash;
        Ok(&self.head)
    }

    /// `<seq>:<hash>` of the last entry.
    pub fn head(&self) -> String {
        format!("{}:{}", self.seq, self.head)
    }

    /// The last entry's `seq` and `hash` (0 and the genesis hash before any).
    pub fn head_parts(&self) -> (i64, &str) {
        (self.seq, &self.head)
    }
}

/// The agent as an audit actor.
pub fn agent_actor(appliance: &str) -> Actor {
    Actor::appliance(appliance)
}

/// What [`verify_file`] found.
#[derive(Debug)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// `<seq>:<hash>` of the last.
    pub head: String,
    /// Checkpoints whose signature verified under the appliance key given.
    pub checkpoints: u64,
    /// The last entry a verified checkpoint vouches for (0 if none).
    pub vouched_seq: i64,
}

/// Check a log file offline (`tether-agent audit verify FILE`): the whole chain from
/// entry 1, and, with the appliance's manifest key, every checkpoint: each manifest entry
/// carries a signature over the `seq` and `hash` of the entry before it, so a log cut or
/// rewritten by someone without that key fails at the first checkpoint after the change.
pub fn verify_file(
    path: &Path,
    appliance_key: Option<&tether_ops::ssh_key::PublicKey>,
) -> Result<Verified, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut chain = ChainVerifier::from_genesis();
    let (mut prev_seq, mut prev_hash) = (0i64, GENESIS_HASH.to_owned());
    let (mut checkpoints, mut vouched_seq) = (0u64, 0i64);
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        let entry: AuditEntry = serde_json::from_str(&line)
            .map_err(|e| format!("line {}: not an audit entry: {e}", n + 1))?;
        chain.push(&entry).map_err(|e| e.to_string())?;
        if let (Some(cp), Some(key)) = (entry.details.get("checkpoint"), appliance_key) {
            check_checkpoint(cp, prev_seq, &prev_hash, key)
                .map_err(|e| format!("entry {}: checkpoint: {e}", entry.seq))?;
            checkpoints += 1;
            vouched_seq = prev_seq;
        }
        prev_seq = entry.seq;
        prev_hash = entry.hash.clone();
    }
    let head = chain
        .head()
        .map_or_else(|| format!("0:{GENESIS_HASH}"), |(s, h)| format!("{s}:{h}"));
    Ok(Verified {
        entries: chain.checked(),
        head,
        checkpoints,
        vouched_seq,
    })
}

/// A checkpoint `cp` must name entry `seq` with `hash` (the one before it) and be signed
/// by `key`.
fn check_checkpoint(
    cp: &serde_json::Value,
    seq: i64,
    hash: &str,
    key: &tether_ops::ssh_key::PublicKey,
) -> Result<(), String> {
    if cp.get("seq").and_then(|v| v.as_i64()) != Some(seq)
        || cp.get("hash").and_then(|v| v.as_str()) != Some(hash)
    {
        return Err("it names another entry than the one before it".into());
    }
    let sig = cp.get("sig").and_then(|v| v.as_str()).unwrap_or_default();
    let signer = tether_ops::sig::verify(
        sig.as_bytes(),
        tether_ops::CHECKPOINT_NAMESPACE,
        tether_ops::checkpoint_message(seq, hash).as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    if signer.key.key_data() != key.key_data() {
        return Err("signed by another key than the appliance's".into());
    }
    Ok(())
}
