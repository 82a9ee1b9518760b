//! Audit exports: the whole log and its signed checkpoints as JSON lines
//! ([`ExportLine`]; control's `write_export` and `tether audit export` write them), and
//! the offline verifier ([`ExportVerifier`], [`verify_export`]).
//!
//! # The export format (version 1)
//!
//! UTF-8, one JSON object per line, each line ended by `\n` (a `\r\n` is accepted), at
//! most [`MAX_LINE_LEN`] bytes per line. Three kinds of line:
//!
//! - a header, only as the first line and optional:
//!   `{"tether_audit_export": 1, "trust_domain": "...", "root_pem": "..."}`. It is
//!   **information only**: the verifier never trusts a root taken from the file (it is
//!   given the root separately), and only checks that `trust_domain`, if the header is
//!   there, is the one it expects;
//! - an entry: the [`AuditEntry`] object, as `tether-control audit list` prints it
//!   (`{"seq", "at", "actor": {"kind", "name"}, "action", "target", "outcome", "details",
//!   "prev_hash", "hash"}`), in `seq` order from 1;
//! - a checkpoint: `{"checkpoint": {"seq", "head_hash", "at", "signature",
//!   "signer_chain_pem"}}` (see [`crate::checkpoint`]), right after the entry it vouches
//!   for, checkpoints in increasing `seq`.
//!
//! # What verifying an export proves
//!
//! [`ExportVerifier`] checks the chain from entry 1 ([`ChainVerifier::from_genesis`]),
//! every checkpoint's signer and signature, that each checkpoint's `head_hash` is the hash
//! of the entry at its `seq`, and that the export reaches the last checkpoint. So it finds:
//!
//! - an edited, removed or reordered entry (the chain names it);
//! - a rewritten log, even with every hash after the change recomputed: the first
//!   checkpoint at or after the change no longer matches (the verifier names that
//!   checkpoint's entry; the change is at or before it);
//! - entries cut from the end, up to the last checkpoint in the export;
//! - a checkpoint forged, altered, or signed by anyone but control's own certificate from
//!   the trusted root.
//!
//! It cannot find:
//!
//! - entries cut after the last checkpoint: they were never vouched for. With the
//!   default `checkpoint_every` of 60 s that is at most about a minute of the newest
//!   entries (plus whatever was written while `serve` was not running);
//! - checkpoints removed together with the entries they cover (a database writer can
//!   delete both): compare the head with a checkpoint you kept from an earlier export,
//!   e.g. `verify` prints `head <seq> <hash>`; an export whose head is older than one you
//!   saw signed was cut;
//! - a history rewritten by someone holding control's key (the control leaf's key lives
//!   in the data directory, `ca/control.key`): checkpoints protect against someone who can
//!   write the database, not against someone who owns control.

use std::collections::VecDeque;
use std::io::{BufRead, Read};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::chain::{ChainError, ChainVerifier};
use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointVerifier, VerifiedCheckpoint};
use crate::entry::AuditEntry;

/// The export format version in the header.
pub const EXPORT_VERSION: u32 = 1;
/// Longest line of an export, bytes (an entry is at most about 5 KiB, a checkpoint with
/// its chain about 2 KiB).
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// The optional first line of an export: information for a reader, never trusted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportHeader {
    /// The format version, [`EXPORT_VERSION`].
    pub tether_audit_export: u32,
    /// The trust domain of the control that wrote it.
    pub trust_domain: String,
    /// Its root certificate, PEM (for information: verify with a root you hold).
    pub root_pem: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointLine {
    checkpoint: Checkpoint,
}

/// One line of an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportLine {
    /// The header.
    Header(ExportHeader),
    /// An entry.
    Entry(AuditEntry),
    /// A checkpoint.
    Checkpoint(Checkpoint),
}

impl ExportLine {
    /// Parse one line (without its `\n`). The error says why it is not an export line.
    pub fn parse(line: &[u8]) -> Result<ExportLine, String> {
        let value: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let Value::Object(map) = &value else {
            return Err("not a JSON object".into());
        };
        if map.contains_key("tether_audit_export") {
            serde_json::from_value(value)
                .map(ExportLine::Header)
                .map_err(|e| format!("header: {e}"))
        } else if map.contains_key("checkpoint") {
            serde_json::from_value::<CheckpointLine>(value)
                .map(|c| ExportLine::Checkpoint(c.checkpoint))
                .map_err(|e| format!("checkpoint: {e}"))
        } else {
            serde_json::from_value(value)
                .map(ExportLine::Entry)
                .map_err(|e| format!("entry: {e}"))
        }
    }

    /// The line as written (without the `\n`).
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail (string keys, no floats, no maps with
        // non-string keys).
        match self {
            ExportLine::Header(h) => serde_json::to_string(h),
            ExportLine::Entry(e) => serde_json::to_string(e),
            ExportLine::Checkpoint(c) => serde_json::to_string(&CheckpointLine {
                checkpoint: c.clone(),
            }),
        }
        .unwrap_or_default()
    }
}

/// What an export holds (written, or verified).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Entries.
    pub entries: u64,
    /// Checkpoints.
    pub checkpoints: u64,
    /// The last entry's seq and hash.
    pub head: Option<(i64, String)>,
    /// The last checkpoint's seq.
    pub last_checkpoint: Option<i64>,
}

/// Why an export does not verify. [`VerifyError::first_bad_seq`] names the entry where
/// it goes wrong, when it is about an entry.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Reading the file failed (not a fault of its contents).
    #[error("reading the export: {0}")]
    Read(String),
    /// A line is longer than [`MAX_LINE_LEN`].
    #[error("line {line}: longer than {MAX_LINE_LEN} bytes")]
    LineTooLong {
        /// 1-based line number.
        line: u64,
    },
    /// A line is not an export line.
    #[error("line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: u64,
        /// Why.
        reason: String,
    },
    /// A header anywhere but on the first line.
    #[error("line {line}: a header is only allowed on the first line")]
    MisplacedHeader {
        /// 1-based line number.
        line: u64,
    },
    /// The header names an export version this verifier does not know.
    #[error("export format version {0} is not supported (expected {EXPORT_VERSION})")]
    UnsupportedVersion(u32),
    /// The header names another trust domain than the one expected.
    #[error("the export is from trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain {
        /// Expected.
        expected: String,
        /// In the header.
        found: String,
    },
    /// The chain breaks (an entry edited, removed or reordered).
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A checkpoint is not genuine.
    #[error("checkpoint at entry {seq}: {error}")]
    Checkpoint {
        /// The checkpoint's seq.
        seq: i64,
        /// Why.
        error: CheckpointError,
    },
    /// A checkpoint is not where it belongs: not after the previous checkpoint, or after
    /// entries that follow the one it vouches for.
    #[error("checkpoint at entry {seq} is out of place (after entry {after})")]
    CheckpointOutOfPlace {
        /// The checkpoint's seq.
        seq: i64,
        /// The entry or checkpoint it follows.
        after: i64,
    },
    /// A genuine checkpoint vouches for another hash at its seq than the export holds:
    /// the log was rewritten at or before that entry (hashes recomputed).
    #[error("entry {seq} is not the one the checkpoint signed (signed hash {signed}, found {found}): the log was rewritten at or before it")]
    CheckpointMismatch {
        /// The checkpoint's seq.
        seq: i64,
        /// The hash it signed.
        signed: String,
        /// The hash of the export's entry.
        found: String,
    },
    /// The export ends before an entry a checkpoint vouches for: the tail was cut.
    #[error("the export ends at entry {last_entry} but a checkpoint vouches for entry {checkpoint}: entries from {} on were cut", last_entry + 1)]
    Truncated {
        /// The checkpoint's seq.
        checkpoint: i64,
        /// The last entry in the export (0: none).
        last_entry: i64,
    },
    /// The export holds no entry (a control log always starts with `control.init`).
    #[error("the export holds no audit entry")]
    Empty,
    /// The export starts after entry 1, at a signed checkpoint (an archive anchor): the
    /// entries before it were archived, and only the archive segments before it can show
    /// they are intact.
    #[error("the export starts at entry {first}: the entries before it were archived; verify the archive segments with it, in order (tether audit verify ARCHIVE... EXPORT)")]
    StartsAfterArchive {
        /// Its first entry.
        first: i64,
    },
    /// A segment does not continue the one before it: it starts after another entry than
    /// the one the previous file ends with (a segment missing, or files out of order).
    #[error("the file continues after entry {found} but the file before it ends at entry {expected}: a segment is missing or the files are out of order")]
    NotContinued {
        /// The last entry of the file before.
        expected: i64,
        /// The entry this file says it follows.
        found: i64,
    },
    /// A segment starts after the right seq, but not after the entry the file before ends
    /// with (its anchor or its first `prev_hash` names another hash): a segment from
    /// another log, or one rewritten.
    #[error("the file does not continue entry {seq} of the file before it (another hash): a segment from another log, or rewritten")]
    ContinuityBroken {
        /// The last entry of the file before.
        seq: i64,
    },
    /// An archive segment (any file but the last) must end at a signed checkpoint, as
    /// `tether-control audit archive` writes it; this one does not, so entries may have
    /// been cut from its end.
    #[error("the archive segment ends at entry {last_entry}, not at a signed checkpoint (last checkpoint: {last_checkpoint}): entries may have been cut from its end")]
    SegmentNotClosed {
        /// Its last entry.
        last_entry: i64,
        /// Its last checkpoint (0: none).
        last_checkpoint: i64,
    },
}

impl VerifyError {
    /// The first entry that is wrong or missing, when the error is about entries.
    pub fn first_bad_seq(&self) -> Option<i64> {
        match self {
            VerifyError::Chain(e) => Some(e.first_bad_seq()),
            VerifyError::CheckpointMismatch { seq, .. } => Some(*seq),
            VerifyError::Truncated { last_entry, .. } => Some(last_entry + 1),
            VerifyError::StartsAfterArchive { first } => Some(*first),
            VerifyError::NotContinued { expected, .. } => Some(expected + 1),
            VerifyError::ContinuityBroken { seq } => Some(seq + 1),
            VerifyError::SegmentNotClosed { last_entry, .. } => Some(*last_entry),
            _ => None,
        }
    }
}

/// Verifies an export line by line (module docs, "What verifying an export proves").
/// Sans-IO: feed [`ExportVerifier::push_line`], then [`ExportVerifier::finish`]; or let
/// [`verify_export`] read a file.
#[derive(Debug)]
pub struct ExportVerifier {
    checkpoints: CheckpointVerifier,
    start: Start,
    chain: ChainVerifier,
    /// Verified checkpoints whose entry has not come yet.
    pending: VecDeque<VerifiedCheckpoint>,
    last_checkpoint: Option<i64>,
    checkpoints_checked: u64,
    lines: u64,
}

/// Where the entries of the export must start (see [`ExportVerifier`]'s constructors).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Start {
    /// At entry 1.
    Genesis,
    /// At entry 1, or after the entry a leading signed checkpoint (the archive anchor)
    /// vouches for.
    GenesisOrAnchor,
    /// After entry `.0` with hash `.1`: the head of the segment before.
    After(i64, String),
}

impl ExportVerifier {
    /// A verifier of a whole log from entry 1, checking checkpoints with `checkpoints`.
    /// An export that starts at a later entry is refused; one that starts at an archive
    /// anchor with [`VerifyError::StartsAfterArchive`].
    pub fn new(checkpoints: CheckpointVerifier) -> Self {
        Self::starting(checkpoints, Start::Genesis)
    }

    /// A verifier of the live log of a keeper that may have archived its start: the
    /// export starts at entry 1, or with a checkpoint (the anchor: the last archived
    /// entry, signed) followed by the entry after it. Such an export vouches only for the
    /// entries after the anchor; the archive segments vouch for the rest
    /// ([`verify_segments`]).
    pub fn live(checkpoints: CheckpointVerifier) -> Self {
        Self::starting(checkpoints, Start::GenesisOrAnchor)
    }

    /// A verifier of a segment that continues one already verified, whose last entry was
    /// `seq` with `hash`: the export's first entry must be `seq + 1` and chain to `hash`,
    /// and a leading anchor checkpoint, if there is one, must vouch for exactly that entry.
    pub fn after(checkpoints: CheckpointVerifier, seq: i64, hash: String) -> Self {
        Self::starting(checkpoints, Start::After(seq, hash))
    }

    fn starting(checkpoints: CheckpointVerifier, start: Start) -> Self {
        let chain = match &start {
            Start::Genesis | Start::GenesisOrAnchor => ChainVerifier::from_genesis(),
            Start::After(seq, hash) => ChainVerifier::after(*seq, hash.clone()),
        };
        ExportVerifier {
            checkpoints,
            start,
            chain,
            pending: VecDeque::new(),
            last_checkpoint: None,
            checkpoints_checked: 0,
            lines: 0,
        }
    }

    /// A checkpoint before any entry, when the export may start after an anchor: take it
    /// as the anchor. `Ok(false)`: not an anchor here, handle it as any checkpoint.
    fn anchor(&mut self, cp: &VerifiedCheckpoint) -> Result<bool, VerifyError> {
        if self.chain.checked() > 0 || self.last_checkpoint.is_some() {
            return Ok(false);
        }
        match &self.start {
            Start::Genesis => return Ok(false),
            Start::GenesisOrAnchor => {
                self.chain = ChainVerifier::after(cp.seq(), cp.head_hash().to_owned());
            }
            Start::After(seq, hash) => {
                if cp.seq() != *seq {
                    return Err(VerifyError::NotContinued {
                        expected: *seq,
                        found: cp.seq(),
                    });
                }
                if cp.head_hash() != hash {
                    return Err(VerifyError::ContinuityBroken { seq: *seq });
                }
            }
        }
        self.last_checkpoint = Some(cp.seq());
        Ok(true)
    }

    /// The first entry of a segment: say how it fails to continue the file before.
    fn check_first(&self, e: &AuditEntry) -> Result<(), VerifyError> {
        if self.chain.checked() > 0 {
            return Ok(());
        }
        match &self.start {
            Start::After(seq, hash) => {
                if e.seq != seq.saturating_add(1) {
                    return Err(VerifyError::NotContinued {
                        expected: *seq,
                        found: e.seq.saturating_sub(1),
                    });
                }
                if e.prev_hash != *hash {
                    return Err(VerifyError::ContinuityBroken { seq: *seq });
                }
            }
            Start::Genesis | Start::GenesisOrAnchor => {
                // Starts at an anchor where a whole log is expected.
                let anchored = self
                    .pending
                    .front()
                    .is_some_and(|cp| cp.seq() == e.seq.saturating_sub(1));
                if e.seq != 1 && anchored {
                    return Err(VerifyError::StartsAfterArchive { first: e.seq });
                }
            }
        }
        Ok(())
    }

    /// Check the next line (without its line ending).
    pub fn push_line(&mut self, line: &[u8]) -> Result<(), VerifyError> {
        self.lines += 1;
        let n = self.lines;
        if line.len() > MAX_LINE_LEN {
            return Err(VerifyError::LineTooLong { line: n });
        }
        let parsed =
            ExportLine::parse(line).map_err(|reason| VerifyError::Malformed { line: n, reason })?;
        match parsed {
            ExportLine::Header(h) => {
                if n != 1 {
                    return Err(VerifyError::MisplacedHeader { line: n });
                }
                if h.tether_audit_export != EXPORT_VERSION {
                    return Err(VerifyError::UnsupportedVersion(h.tether_audit_export));
                }
                let expected = self.checkpoints.trust_domain();
                if h.trust_domain != expected {
                    return Err(VerifyError::WrongTrustDomain {
                        expected: expected.to_owned(),
                        found: h.trust_domain,
                    });
                }
                Ok(())
            }
            ExportLine::Entry(e) => {
                self.check_first(&e)?;
                self.chain.push(&e)?;
                if self.pending.front().is_some_and(|cp| cp.seq() == e.seq) {
                    if let Some(cp) = self.pending.pop_front() {
                        Self::matches(&cp, &e.hash)?;
                    }
                }
                Ok(())
            }
            ExportLine::Checkpoint(c) => {
                let seq = c.seq;
                let cp = self
                    .checkpoints
                    .verify(&c)
                    .map_err(|error| VerifyError::Checkpoint { seq, error })?;
                if self.anchor(&cp)? {
                    return Ok(());
                }
                let head = self.chain.head();
                let head_seq = head.map_or(0, |(s, _)| s);
                if let Some(prev) = self.last_checkpoint.filter(|p| *p >= seq) {
                    return Err(VerifyError::CheckpointOutOfPlace { seq, after: prev });
                }
                if seq < head_seq {
                    return Err(VerifyError::CheckpointOutOfPlace {
                        seq,
                        after: head_seq,
                    });
                }
                self.last_checkpoint = Some(seq);
                self.checkpoints_checked += 1;
                match head {
                    Some((s, hash)) if s == seq => Self::matches(&cp, hash),
                    _ => {
                        self.pending.push_back(cp);
                        Ok(())
                    }
                }
            }
        }
    }

    fn matches(cp: &VerifiedCheckpoint, hash: &str) -> Result<(), VerifyError> {
        if cp.head_hash() == hash {
            Ok(())
        } else {
            Err(VerifyError::CheckpointMismatch {
                seq: cp.seq(),
                signed: cp.head_hash().to_owned(),
                found: hash.to_owned(),
            })
        }
    }

    /// The export ended: every checkpoint must have met its entry.
    pub fn finish(self) -> Result<ExportSummary, VerifyError> {
        let head = self.chain.head().map(|(s, h)| (s, h.to_owned()));
        if let Some(cp) = self.pending.front() {
            return Err(VerifyError::Truncated {
                checkpoint: cp.seq(),
                last_entry: head.as_ref().map_or(0, |(s, _)| *s),
            });
        }
        if head.is_none() {
            return Err(VerifyError::Empty);
        }
        Ok(ExportSummary {
            entries: self.chain.checked(),
            checkpoints: self.checkpoints_checked,
            head,
            last_checkpoint: self.last_checkpoint,
        })
    }

    /// The export ended and is an archive segment: as [`ExportVerifier::finish`], and its
    /// last entry must carry a signed checkpoint ([`VerifyError::SegmentNotClosed`]).
    pub fn finish_segment(self) -> Result<ExportSummary, VerifyError> {
        let summary = self.finish()?;
        let last_entry = summary.head.as_ref().map_or(0, |(s, _)| *s);
        let last_checkpoint = summary.last_checkpoint.unwrap_or(0);
        if last_checkpoint != last_entry {
            return Err(VerifyError::SegmentNotClosed {
                last_entry,
                last_checkpoint,
            });
        }
        Ok(summary)
    }
}

/// Why a sequence of segments does not verify: the file where it breaks and why.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{name}: {error}")]
pub struct SegmentError {
    /// The file's position in the sequence, from 0.
    pub index: usize,
    /// Its name, as the caller gave it.
    pub name: String,
    /// What is wrong in it.
    pub error: VerifyError,
}

/// Verify archive segments followed by a live export, end to end: the first file from
/// entry 1; each later file continues the one before it (its anchor checkpoint and first
/// entry follow the previous file's last entry exactly); every file but the last ends at
/// a signed checkpoint. Every file is checked as [`ExportVerifier`] checks one, so a
/// changed, removed or reordered entry, a missing or reordered file, or a forged
/// checkpoint is named with its file. The summary counts every file's entries and
/// checkpoints (an anchor repeating the checkpoint before it is not counted twice).
pub fn verify_segments<R: BufRead>(
    files: impl IntoIterator<Item = (String, R)>,
    checkpoints: &CheckpointVerifier,
) -> Result<ExportSummary, SegmentError> {
    let mut files = files.into_iter().enumerate().peekable();
    let mut total = ExportSummary::default();
    while let Some((index, (name, reader))) = files.next() {
        let verifier = match &total.head {
            None => ExportVerifier::new(checkpoints.clone()),
            Some((seq, hash)) => ExportVerifier::after(checkpoints.clone(), *seq, hash.clone()),
        };
        let last = files.peek().is_none();
        let fail = |error| SegmentError {
            index,
            name: name.clone(),
            error,
        };
        let summary = read_lines(reader, verifier)
            .and_then(|v| if last { v.finish() } else { v.finish_segment() })
            .map_err(fail)?;
        total.entries += summary.entries;
        total.checkpoints += summary.checkpoints;
        total.head = summary.head;
        total.last_checkpoint = summary.last_checkpoint;
    }
    if total.head.is_none() {
        return Err(SegmentError {
            index: 0,
            name: String::new(),
            error: VerifyError::Empty,
        });
    }
    Ok(total)
}

/// Read an export from `reader` and verify it with `verifier`; `Err` names the first
/// thing that is wrong.
pub fn verify_export(
    reader: impl BufRead,
    verifier: ExportVerifier,
) -> Result<ExportSummary, VerifyError> {
    read_lines(reader, verifier)?.finish()
}

/// Feed every line of `reader` to `verifier`.
fn read_lines(
    mut reader: impl BufRead,
    mut verifier: ExportVerifier,
) -> Result<ExportVerifier, VerifyError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let limit = MAX_LINE_LEN as u64 + 2; // the line, `\r`, `\n`
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|e| VerifyError::Read(e.to_string()))?;
        if n == 0 {
            break;
        }
        let line = match buf.strip_suffix(b"\n") {
            Some(l) => l.strip_suffix(b"\r").unwrap_or(l),
            // No line end: the last line of the file, or a line over the limit (which
            // push_line refuses by its length).
            None => &buf[..],
        };
        verifier.push_line(line)?;
    }
    Ok(verifier)
}
