//! Control's side of the audit log. The format, the chain, checkpoints and the export
//! lines are [`tether_audit`]'s; the store writes entries (with the change each records,
//! see [`crate::store::Store`]); `GET /v1/audit` is served by the HTTP layer. Here, what
//! needs the store or control's key:
//!
//! - [`write_checkpoint`] signs the log's head with control's own leaf
//!   ([`checkpoint_signer`]) only after checking that the entries since the last
//!   checkpoint extend it (so control never vouches for a history that does not contain
//!   what it vouched for before), and writes nothing when no entry is new.
//!   `tether-control serve` calls it every `[audit] checkpoint_every`
//!   ([`checkpoint_now`], the `audit_checkpoint` job of `crate::jobs`, on one replica
//!   per period); `tether-control audit checkpoint` once.
//! - [`write_export`] writes the whole log and its checkpoints in the export format
//!   ([`tether_audit::export`]), for `tether-control audit export`.

use std::collections::VecDeque;
use std::io::Write;
use std::time::Duration;

use tether_audit::checkpoint::{Checkpoint, CheckpointSigner, SignError};
use tether_audit::export::{ExportHeader, ExportLine, ExportSummary};
use tether_audit::page::AuditPage;
use tether_audit::{ChainError, ChainVerifier};

use crate::domain::internal;
use crate::store::sql::DEFAULT_AUDIT_LIMIT;
use thiserror::Error;

use crate::domain::ca::Ca;
use crate::store::{Store, StoreError};

/// Default interval between signed audit checkpoints: 60 s.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// `[audit]`: signed checkpoints of the audit log (see this module and `tether_audit::checkpoint`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// How often `serve` signs a checkpoint of the log's head, when entries were added
    /// since the last one. Entries newer than the last checkpoint can be cut from the log
    /// undetected, so this bounds that window. Default 60 s
    /// ([`DEFAULT_CHECKPOINT_EVERY`]); at least 1 s.
    #[serde(with = "humantime_serde")]
    pub checkpoint_every: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        }
    }
}

/// Page size when reading the store (the entries a new checkpoint covers, an export).
const PAGE: u32 = 1000;

/// The checkpoint signer of control's current leaf.
pub fn checkpoint_signer(ca: &Ca) -> Result<CheckpointSigner, SignError> {
    CheckpointSigner::new(&ca.control_key_pem(), &ca.control_chain_pem())
}

/// Why [`write_checkpoint`] wrote nothing.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WriteCheckpointError {
    /// The store failed; retrying may help.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log does not extend the last checkpoint (or its entries do not chain): it was
    /// tampered with. Control refuses to vouch for it; retrying cannot help.
    #[error("the audit log does not extend the last checkpoint (seq {checkpoint}): {error}")]
    Tampered {
        /// The last checkpoint's seq (0: none).
        checkpoint: i64,
        /// The first thing that does not fit.
        error: ChainError,
    },
    /// The signer refused.
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// Sign the log's head at `now` and store the checkpoint, after checking that the entries
/// since the last checkpoint (all of them if none) extend it. `Ok(None)` when no entry is
/// newer than the last checkpoint (or the log is empty).
pub async fn write_checkpoint(
    store: &dyn Store,
    signer: &CheckpointSigner,
    now: i64,
) -> Result<Option<Checkpoint>, WriteCheckpointError> {
    let last = store.last_audit_checkpoint().await?;
    let (mut chain, mut after, anchor) = match &last {
        None => (ChainVerifier::from_genesis(), 0, 0),
        Some(cp) => {
            // The checkpointed entry itself must still be there, unchanged.
            let tampered = |error| WriteCheckpointError::Tampered {
                checkpoint: cp.seq,
                error,
            };
            let entry = store
                .audit_entries(cp.seq - 1, 1)
                .await?
                .into_iter()
                .next()
                .filter(|e| e.seq == cp.seq)
                .ok_or_else(|| {
                    tampered(ChainError::OutOfSequence {
                        expected: cp.seq,
                        found: 0,
                    })
                })?;
            if entry.hash != cp.head_hash || entry.computed_hash().ok() != Some(entry.hash) {
                return Err(tampered(ChainError::HashMismatch { seq: cp.seq }));
            }
            (
                ChainVerifier::after(cp.seq, cp.head_hash.clone()),
                cp.seq,
                cp.seq,
            )
        }
    };
    loop {
        let page = store.audit_entries(after, PAGE).await?;
        let Some(tail) = page.last() else { break };
        after = tail.seq;
        for e in &page {
            chain
                .push(e)
                .map_err(|error| WriteCheckpointError::Tampered {
                    checkpoint: anchor,
                    error,
                })?;
        }
    }
    let Some((seq, hash)) = chain.head() else {
        return Ok(None);
    };
    let cp = signer.sign(seq, hash, now)?;
    // Another replica may have checkpointed the same head meanwhile: one is enough.
    store.add_audit_checkpoint(&cp).await?;
    Ok(Some(cp))
}

/// Write a checkpoint of the head at `now`, logging the outcome. A log that no longer
/// extends the last checkpoint is logged at error level and not signed.
pub async fn checkpoint_now(store: &dyn Store, signer: &CheckpointSigner, now: i64) {
    match write_checkpoint(store, signer, now).await {
        Ok(Some(cp)) => {
            tracing::info!(seq = cp.seq, head = %cp.head_hash, "audit checkpoint signed")
        }
        Ok(None) => {}
        Err(e @ WriteCheckpointError::Tampered { .. }) => {
            tracing::error!(error = %e, "audit log tampered with; not signing a checkpoint")
        }
        Err(e) => tracing::warn!(error = %e, "cannot write an audit checkpoint; will retry"),
    }
}

/// Why an export could not be written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the output failed.
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// Write the whole log and its checkpoints to `out` in the export format, with `header`
/// first if given. Checkpoints written while the export runs may be left out; every
/// checkpoint that existed when it started is in it, so a log cut before one of them
/// does not verify.
pub async fn write_export(
    store: &dyn Store,
    header: Option<&ExportHeader>,
    out: &mut impl Write,
) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    // Read before any entry: every checkpoint up to here covers an entry that exists.
    let known = store.last_audit_checkpoint().await?.map_or(0, |c| c.seq);
    let line = |l: ExportLine, out: &mut dyn Write| -> std::io::Result<()> {
        out.write_all(l.to_json().as_bytes())?;
        out.write_all(b"\n")
    };
    if let Some(h) = header {
        line(ExportLine::Header(h.clone()), out)?;
    }
    let mut checkpoints: VecDeque<Checkpoint> = VecDeque::new();
    let mut checkpoints_after = 0;
    let mut checkpoints_done = false;
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, PAGE).await?;
        let Some(tail) = page.last() else { break };
        after = tail.seq;
        for entry in page {
            let seq = entry.seq;
            summary.head = Some((seq, entry.hash.clone()));
            summary.entries += 1;
            line(ExportLine::Entry(entry), out)?;
            // The checkpoints up to this entry, fetched page by page.
            loop {
                if checkpoints.is_empty() && !checkpoints_done {
                    let more = store.audit_checkpoints(checkpoints_after, PAGE).await?;
                    match more.last() {
                        Some(c) => checkpoints_after = c.seq,
                        None => checkpoints_done = true,
                    }
                    checkpoints.extend(more);
                }
                if checkpoints.front().is_none_or(|c| c.seq > seq) {
                    break;
                }
                if let Some(c) = checkpoints.pop_front() {
                    summary.checkpoints += 1;
                    summary.last_checkpoint = Some(c.seq);
                    line(ExportLine::Checkpoint(c), out)?;
                }
            }
        }
    }
    // Checkpoints beyond the last entry: the log was cut under them. Written, so the
    // verifier sees it; those newer than `known` may just be new, and are left out.
    loop {
        if checkpoints.is_empty() && !checkpoints_done {
            let more = store.audit_checkpoints(checkpoints_after, PAGE).await?;
            match more.last() {
                Some(c) => checkpoints_after = c.seq,
                None => checkpoints_done = true,
            }
            checkpoints.extend(more);
        }
        match checkpoints.pop_front() {
            Some(c) if c.seq <= known => {
                summary.checkpoints += 1;
                summary.last_checkpoint = Some(c.seq);
                line(ExportLine::Checkpoint(c), out)?;
            }
            _ => break,
        }
    }
    out.flush()?;
    Ok(summary)
}

/// A page of the audit log after entry `after`: at most `limit` entries (0: the default
/// [`DEFAULT_AUDIT_LIMIT`], at most that), and the checkpoints with `after < seq <=` the
/// page's last entry, so a reader can check each against the entries it has.
pub async fn page(
    store: &dyn Store,
    after: i64,
    limit: u32,
) -> Result<AuditPage, crate::domain::Error> {
    let limit = match limit {
        0 => DEFAULT_AUDIT_LIMIT,
        n => n.min(DEFAULT_AUDIT_LIMIT),
    };
    // Checkpoints first (see the module docs); a page of them is as long as the entries'.
    let mut checkpoints = store
        .audit_checkpoints(after, limit)
        .await
        .map_err(internal)?;
    let entries = store.audit_entries(after, limit).await.map_err(internal)?;
    if let Some(last) = entries.last() {
        checkpoints.retain(|c| c.seq <= last.seq);
    }
    Ok(AuditPage {
        entries,
        checkpoints,
    })
}
