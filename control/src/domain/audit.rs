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
//! - [`archive`] moves the oldest entries to a segment file (see "Archiving").
//!
//! # Archiving
//!
//! `tether-control audit archive --before SEQ --out FILE` keeps the live table bounded.
//! It writes the entries after the last archive up to `SEQ - 1` (with their checkpoints,
//! in the export format, led by the previous archive's last checkpoint when there is
//! one) to `FILE`, checking every line as `tether audit verify` would
//! ([`tether_audit::export::ExportVerifier::after`] the previous anchor), and the segment
//! must end at a signed checkpoint of entry `SEQ - 1`: when none is stored, it signs one
//! (control's own key, as `audit checkpoint` does; the entries up to it were just checked
//! to extend every earlier checkpoint), because an operator picks `SEQ` by age, not by
//! where the minute's checkpoint happened to land. The file is synced and renamed into
//! place (an existing file is never overwritten) before one transaction
//! ([`Store::archive_audit`]) records the archive, deletes those entries and the
//! checkpoints before the last one, and appends an `audit.archive` entry. The last
//! archive is the live log's anchor: the live log starts at its `seq + 1`, chained to
//! its hash, and its checkpoint stays in the table, so an export of the live log starts
//! with that checkpoint ([`tether_audit::export::ExportVerifier::live`] accepts it) and
//! `tether audit verify SEG1 SEG2 ... LIVE` checks it all end to end. Archives never
//! overlap or skip (the store refuses one that does not start right after the last),
//! and the database triggers let only archived entries be deleted.

use std::collections::VecDeque;
use std::io::Write;
use std::time::Duration;

use std::path::{Path, PathBuf};

use tether_audit::checkpoint::{Checkpoint, CheckpointSigner, CheckpointVerifier, SignError};
use tether_audit::export::{ExportHeader, ExportLine, ExportSummary, ExportVerifier, VerifyError};
use tether_audit::page::AuditPage;
use tether_audit::{action, Actor, AuditEvent, ChainError, ChainVerifier};

use crate::domain::internal;
use crate::store::sql::DEFAULT_AUDIT_LIMIT;
use thiserror::Error;

use crate::domain::ca::Ca;
use crate::store::{AuditArchive, Store, StoreError};

/// Default interval between signed audit checkpoints: 60 s.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);
/// Default number of entries automatic archiving keeps live: 100,000.
pub const DEFAULT_ARCHIVE_KEEP: u64 = 100_000;
/// Default interval between automatic archive runs: 1 h.
pub const DEFAULT_ARCHIVE_EVERY: Duration = Duration::from_secs(3600);

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
    /// Where `serve` writes archive segments automatically (see "Archiving"); a relative
    /// path is under the data directory. Default none: no automatic archiving (run
    /// `tether-control audit archive` yourself). With several replicas, one replica runs
    /// each archive: give them a shared directory.
    pub archive_dir: Option<std::path::PathBuf>,
    /// How many of the newest checkpointed entries automatic archiving keeps live.
    /// Default 100,000 ([`DEFAULT_ARCHIVE_KEEP`]); at least 1.
    pub archive_keep: u64,
    /// How often automatic archiving runs. Default 1 h ([`DEFAULT_ARCHIVE_EVERY`]); at
    /// least 1 s.
    #[serde(with = "humantime_serde")]
    pub archive_every: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            archive_dir: None,
            archive_keep: DEFAULT_ARCHIVE_KEEP,
            archive_every: DEFAULT_ARCHIVE_EVERY,
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
                .filter(|e| e.seq == cp.seq);
            match entry {
                Some(entry) => {
                    if entry.hash != cp.head_hash || entry.computed_hash().ok() != Some(entry.hash)
                    {
                        return Err(tampered(ChainError::HashMismatch { seq: cp.seq }));
                    }
                }
                // Archived: the anchor vouches for it instead.
                None => match store.audit_archive().await? {
                    Some(a) if a.seq == cp.seq && a.hash == cp.head_hash => {}
                    _ => {
                        return Err(tampered(ChainError::OutOfSequence {
                            expected: cp.seq,
                            found: 0,
                        }))
                    }
                },
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
    let summary = write_lines(store, header, None, &mut |l: ExportLine| {
        out.write_all(l.to_json().as_bytes())?;
        out.write_all(b"\n")
    })
    .await?;
    Ok(summary)
}

/// The export's lines to `emit`: all of the live log, or (`upto`) its entries and
/// checkpoints up to entry `upto` (an archive segment).
async fn write_lines<F: FnMut(ExportLine) -> std::io::Result<()>>(
    store: &dyn Store,
    header: Option<&ExportHeader>,
    upto: Option<i64>,
    emit: &mut F,
) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    // Read before any entry: every checkpoint up to here covers an entry that exists.
    let known = store.last_audit_checkpoint().await?.map_or(0, |c| c.seq);
    if let Some(h) = header {
        emit(ExportLine::Header(h.clone()))?;
    }
    // An archived start: the anchor's checkpoint first, then the entries after it.
    let mut checkpoints_after = 0;
    if let Some(anchor) = anchor_checkpoint(store).await? {
        checkpoints_after = anchor.seq;
        summary.checkpoints += 1;
        summary.last_checkpoint = Some(anchor.seq);
        emit(ExportLine::Checkpoint(anchor))?;
    }
    let mut checkpoints: VecDeque<Checkpoint> = VecDeque::new();
    let mut checkpoints_done = false;
    let mut after = 0;
    'pages: loop {
        let page = store.audit_entries(after, PAGE).await?;
        let Some(tail) = page.last() else { break };
        after = tail.seq;
        for entry in page {
            let seq = entry.seq;
            if upto.is_some_and(|u| seq > u) {
                break 'pages;
            }
            summary.head = Some((seq, entry.hash.clone()));
            summary.entries += 1;
            emit(ExportLine::Entry(entry))?;
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
                    emit(ExportLine::Checkpoint(c))?;
                }
            }
        }
    }
    // Checkpoints beyond the last entry: the log was cut under them. Written, so the
    // verifier sees it; those newer than `known` may just be new, and are left out.
    while upto.is_none() {
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
                emit(ExportLine::Checkpoint(c))?;
            }
            _ => break,
        }
    }
    Ok(summary)
}

/// The checkpoint of the live log's anchor (the last archived entry), if entries were
/// archived. An archive without its checkpoint cannot be: `archive_audit` keeps it.
async fn anchor_checkpoint(store: &dyn Store) -> Result<Option<Checkpoint>, StoreError> {
    let Some(a) = store.audit_archive().await? else {
        return Ok(None);
    };
    let cp = store
        .audit_checkpoints(a.seq - 1, 1)
        .await?
        .into_iter()
        .next();
    match cp {
        Some(cp) if cp.seq == a.seq => Ok(Some(cp)),
        _ => Err(StoreError::Database(format!(
            "the checkpoint of archived entry {} is missing",
            a.seq
        ))),
    }
}

/// A chain verifier for the live log: from entry 1, or after the last archived entry
/// when entries were archived (the anchor, see "Archiving").
pub async fn live_chain(store: &dyn Store) -> Result<ChainVerifier, StoreError> {
    Ok(match store.audit_archive().await? {
        None => ChainVerifier::from_genesis(),
        Some(a) => ChainVerifier::after(a.seq, a.hash),
    })
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

/// What [`archive`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// The first entry archived.
    pub first: i64,
    /// The last entry archived (the new anchor).
    pub last: i64,
    /// Its hash.
    pub hash: String,
    /// What the segment file holds (its checkpoints include the leading anchor).
    pub file: ExportSummary,
    /// Whether a checkpoint of `last` had to be signed.
    pub signed: bool,
    /// Entries deleted from the live table.
    pub deleted: u64,
}

/// Why [`archive`] archived nothing (the live log is unchanged).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// Nothing before entry `before` to archive.
    #[error("nothing to archive before entry {0}")]
    Nothing(i64),
    /// The range starts inside what was archived before: archives never overlap.
    #[error("entries up to {archived} are already archived; --before must be above {}", archived + 1)]
    AlreadyArchived {
        /// The last entry archived.
        archived: i64,
    },
    /// The entry to end at is not in the log (yet).
    #[error("entry {0} is not in the audit log: --before must be at most the head's seq + 1")]
    BeyondHead(i64),
    /// The output file exists: an archive is never overwritten.
    #[error("{} exists: an archive segment is never overwritten; choose another file", .0.display())]
    Exists(PathBuf),
    /// The entries or checkpoints to archive do not verify: the log was tampered with.
    #[error("the entries to archive do not verify, nothing archived: {0}")]
    Tampered(VerifyError),
    /// The store failed, or refused (another archive ran meanwhile); retrying may help.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing the closing checkpoint failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// Writing the file failed.
    #[error("writing the archive segment: {0}")]
    Io(#[from] std::io::Error),
}

/// Archive the entries before `before` that are not archived yet into the segment file
/// `out`, then delete them from the live table (module docs, "Archiving"). `verifier`
/// checks the segment's checkpoints (control's root, its trust domain); `signer` signs
/// the closing checkpoint if none is stored; `actor` is recorded as the archiver.
#[allow(clippy::too_many_arguments)]
pub async fn archive(
    store: &dyn Store,
    signer: &CheckpointSigner,
    verifier: CheckpointVerifier,
    header: Option<&ExportHeader>,
    actor: Actor,
    before: i64,
    out: &Path,
    now: i64,
) -> Result<ArchiveSummary, ArchiveError> {
    let last = before.saturating_sub(1);
    if last < 1 {
        return Err(ArchiveError::Nothing(before));
    }
    let anchor = store.audit_archive().await?;
    let archived = anchor.as_ref().map_or(0, |a| a.seq);
    if last <= archived {
        return Err(ArchiveError::AlreadyArchived { archived });
    }
    let in_log = store.audit_entries(last - 1, 1).await?;
    if in_log.first().is_none_or(|e| e.seq != last) {
        return Err(ArchiveError::BeyondHead(last));
    }
    if out.exists() {
        return Err(ArchiveError::Exists(out.to_owned()));
    }
    let closing = store
        .audit_checkpoints(last - 1, 1)
        .await?
        .into_iter()
        .find(|c| c.seq == last);

    // Write and check every line; the first failed check stops the writing.
    let check = match &anchor {
        None => ExportVerifier::new(verifier),
        Some(a) => ExportVerifier::after(verifier, a.seq, a.hash.clone()),
    };
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = PathBuf::from(tmp_name);
    let mut seg = Segment {
        check,
        out: std::io::BufWriter::new(std::fs::File::create(&tmp)?),
        bad: None,
    };
    let result = seg_write(
        store,
        header,
        last,
        closing.is_none(),
        signer,
        now,
        &mut seg,
    )
    .await;
    let (file_summary, hash) = match (result, seg.bad.take()) {
        (_, Some(e)) => {
            drop(seg);
            let _ = std::fs::remove_file(&tmp);
            return Err(ArchiveError::Tampered(e));
        }
        (Err(e), None) => {
            drop(seg);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        (Ok(done), None) => done,
    };
    let Segment { check, out: w, .. } = seg;
    if let Err(e) = check.finish_segment() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ArchiveError::Tampered(e));
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    if out.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ArchiveError::Exists(out.to_owned()));
    }
    std::fs::rename(&tmp, out)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        tether_identity::fs::sync_dir(dir)?;
    }
    let signed = closing.is_none();

    let name = out.file_name().map_or_else(
        || out.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let record = AuditArchive {
        seq: last,
        hash: hash.clone(),
        first_seq: archived + 1,
        archived_at: now,
        file: tether_audit::clip(&name, tether_audit::MAX_TARGET_LEN).to_owned(),
    };
    let event = AuditEvent::success(actor, action::AUDIT_ARCHIVE, record.file.as_str())
        .with("first", record.first_seq)
        .with("last", last)
        .with("hash", hash.as_str());
    let deleted = store.archive_audit(&record, &event).await?;
    Ok(ArchiveSummary {
        first: record.first_seq,
        last,
        hash,
        file: file_summary,
        signed,
        deleted,
    })
}

/// A segment file being written, every line checked first.
struct Segment {
    check: ExportVerifier,
    out: std::io::BufWriter<std::fs::File>,
    /// Why a line did not verify (the writing stopped there).
    bad: Option<VerifyError>,
}

impl Segment {
    fn line(&mut self, l: ExportLine) -> std::io::Result<()> {
        let json = l.to_json();
        if let Err(e) = self.check.push_line(json.as_bytes()) {
            self.bad = Some(e);
            return Err(std::io::Error::other("the segment does not verify"));
        }
        self.out.write_all(json.as_bytes())?;
        self.out.write_all(b"\n")
    }
}

/// Write the segment's lines up to entry `last`, signing and storing a closing checkpoint
/// when `sign`; returns what it holds and the hash of `last`.
async fn seg_write(
    store: &dyn Store,
    header: Option<&ExportHeader>,
    last: i64,
    sign: bool,
    signer: &CheckpointSigner,
    now: i64,
    seg: &mut Segment,
) -> Result<(ExportSummary, String), ArchiveError> {
    let mut summary = match write_lines(store, header, Some(last), &mut |l| seg.line(l)).await {
        Ok(s) => s,
        Err(ExportError::Store(e)) => return Err(e.into()),
        Err(ExportError::Io(e)) => return Err(e.into()),
    };
    let hash = match &summary.head {
        Some((seq, hash)) if *seq == last => hash.clone(),
        _ => return Err(ArchiveError::BeyondHead(last)),
    };
    if sign {
        // The entries up to `last` were just checked to extend every earlier checkpoint.
        let cp = signer.sign(last, &hash, now)?;
        store.add_audit_checkpoint(&cp).await?;
        seg.line(ExportLine::Checkpoint(cp))?;
        summary.checkpoints += 1;
        summary.last_checkpoint = Some(last);
    }
    Ok((summary, hash))
}

/// Automatic archiving's run (`[audit] archive_dir`): archive everything but the newest
/// `keep` entries up to the last checkpoint into `dir`, as
/// `audit-<first>-<last>.jsonl` (12-digit seqs). `Ok(None)` when fewer than `keep`
/// checkpointed entries are live.
pub async fn archive_due(
    store: &dyn Store,
    signer: &CheckpointSigner,
    verifier: CheckpointVerifier,
    dir: &Path,
    keep: u64,
    now: i64,
) -> Result<Option<ArchiveSummary>, ArchiveError> {
    let Some(cp) = store.last_audit_checkpoint().await? else {
        return Ok(None);
    };
    let archived = store.audit_archive().await?.map_or(0, |a| a.seq);
    let last = cp
        .seq
        .saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
    if last <= archived {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!("audit-{:012}-{last:012}.jsonl", archived + 1));
    let actor = Actor::system(tether_audit::system::CONTROL);
    archive(store, signer, verifier, None, actor, last + 1, &out, now)
        .await
        .map(Some)
}
