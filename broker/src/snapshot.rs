//! The allowlist snapshot a control-mode broker keeps on disk (`<data-dir>/allowlist.snapshot`),
//! so that it restarts and keeps enforcing while control is unreachable.
//!
//! Format: one header line `tether-allowlist-snapshot/1 version=<v> saved_at=<unix-secs>`,
//! then the allowlist text format (`<appliance-id> <sha256-hex>` per line, see
//! [`crate::allowlist::parse`]). Written atomically ([`crate::datadir::write_atomic`]): a
//! reader sees the old file or the new one, never a mix.
//!
//! [`SnapshotWriter`] writes in the background, coalesced: after a change it writes the
//! snapshot in force *at that moment*, then waits [`WRITE_INTERVAL`] before the next write,
//! so a burst of deltas costs one write a second and the file always ends at the latest.
//!
//! Removals do not wait for it: [`SnapshotWriter::record_removed`] appends each removed
//! fingerprint with its version to the revocation journal (`allowlist.revoked`) and syncs
//! it before the broker acknowledges the version. At start the broker drops from the
//! snapshot every fingerprint journaled at a later version, so even a `kill -9` right
//! after a revocation cannot readmit the certificate (a later re-add — an appliance
//! enabled again — waits for control: failing closed). Each snapshot write drops the
//! journal lines it covers.
//!
//! The journal stays bounded: it is compacted ([`compact_journal`]: only lines after the
//! snapshot's version, one per fingerprint at its latest version, rewritten atomically
//! with [`crate::datadir::write_atomic`]) at start, by every snapshot write, and when it
//! grows past [`JOURNAL_COMPACT_LINES`] between snapshot writes (snapshots failing while
//! revocations keep coming). Compaction keeps exactly what a start needs: for any
//! snapshot version at or after the one it compacted against, the fingerprints
//! journaled later are the same before and after.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::Notify;

use crate::allowlist::{parse, Allowlist, Entry, Fingerprint, ParseError, Snapshot};

/// First token of the header line.
pub const HEADER: &str = "tether-allowlist-snapshot/1";
/// Least time between two background writes.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// A snapshot read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSnapshot {
    /// The allowlist version it holds.
    pub version: u64,
    /// When it was written (Unix seconds).
    pub saved_at: u64,
    /// The entries.
    pub entries: Vec<Entry>,
}

/// A snapshot file that cannot be used. The broker then starts with an empty allowlist.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The header line is missing or malformed.
    #[error("not an allowlist snapshot: bad header line")]
    Header,
    /// An entry line is malformed.
    #[error("allowlist snapshot: {0}")]
    Entries(#[from] ParseError),
    /// A revocation journal line (not the last) is malformed.
    #[error("revocation journal: line {line} is not `<version> <sha256-hex>`")]
    Journal {
        /// 1-based line number.
        line: usize,
    },
}

/// Serialize `snapshot`.
pub fn encode(snapshot: &Snapshot, saved_at: u64) -> Vec<u8> {
    // ~80 bytes per entry.
    let mut out = String::with_capacity(64 + snapshot.len() * 80);
    let _ = writeln!(
        out,
        "{HEADER} version={} saved_at={saved_at}",
        snapshot.version()
    );
    for (fp, id) in snapshot.entries() {
        let _ = writeln!(out, "{id} {fp}");
    }
    out.into_bytes()
}

/// Parse a snapshot file's bytes.
pub fn decode(bytes: &[u8]) -> Result<SavedSnapshot, SnapshotError> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| SnapshotError::Header)?;
    let mut fields = header.split_whitespace();
    if fields.next() != Some(HEADER) {
        return Err(SnapshotError::Header);
    }
    let mut version = None;
    let mut saved_at = None;
    for field in fields {
        let (k, v) = field.split_once('=').ok_or(SnapshotError::Header)?;
        let v: u64 = v.parse().map_err(|_| SnapshotError::Header)?;
        match k {
            "version" => version = Some(v),
            "saved_at" => saved_at = Some(v),
            // Later versions of this format may add fields.
            _ => {}
        }
    }
    let (Some(version), Some(saved_at)) = (version, saved_at) else {
        return Err(SnapshotError::Header);
    };
    let rest = bytes.get(nl + 1..).unwrap_or(&[]);
    Ok(SavedSnapshot {
        version,
        saved_at,
        entries: parse(rest)?,
    })
}

/// Read the snapshot at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<SavedSnapshot>, SnapshotError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SnapshotError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Write `snapshot` to `path` atomically (blocking).
pub fn save(path: &Path, snapshot: &Snapshot, saved_at: u64) -> std::io::Result<()> {
    crate::datadir::write_atomic(path, &encode(snapshot, saved_at), None)
}

/// Read the revocation journal at `path`: `(version, fingerprint)` per line; empty when
/// there is none. A torn last line (a crash mid-append) is ignored; any other bad line
/// makes the whole journal unusable.
pub fn load_journal(path: &Path) -> Result<Vec<(u64, Fingerprint)>, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SnapshotError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let parsed = line
            .split_once(' ')
            .and_then(|(v, fp)| Some((v.parse::<u64>().ok()?, Fingerprint::from_hex(fp)?)));
        match parsed {
            Some(p) => out.push(p),
            None if i + 1 == lines.len() && !complete => {}
            None => return Err(SnapshotError::Journal { line: i + 1 }),
        }
    }
    Ok(out)
}

/// The fingerprints journaled at a version after `version`.
pub fn removals_after(journal: &[(u64, Fingerprint)], version: u64) -> Vec<Fingerprint> {
    journal
        .iter()
        .filter(|(v, _)| *v > version)
        .map(|(_, fp)| *fp)
        .collect()
}

fn append_journal(path: &Path, version: u64, removed: &[Fingerprint]) -> std::io::Result<()> {
    use std::io::Write;
    let mut text = String::with_capacity(removed.len() * 80);
    for fp in removed {
        let _ = writeln!(text, "{version} {fp}");
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Journal lines after which [`SnapshotWriter::record_removed`] compacts the journal
/// even though no snapshot write did.
pub const JOURNAL_COMPACT_LINES: usize = 4096;

/// What a start needs of `journal` when the snapshot on disk holds `version`: the lines
/// after it, one per fingerprint (at its latest version), in version order.
pub fn compacted(journal: &[(u64, Fingerprint)], version: u64) -> Vec<(u64, Fingerprint)> {
    let mut latest: std::collections::BTreeMap<Fingerprint, u64> = Default::default();
    for (v, fp) in journal.iter().filter(|(v, _)| *v > version) {
        let e = latest.entry(*fp).or_insert(*v);
        *e = (*e).max(*v);
    }
    let mut out: Vec<(u64, Fingerprint)> = latest.into_iter().map(|(fp, v)| (v, fp)).collect();
    out.sort_unstable();
    out
}

/// Rewrite the journal at `path` with only what a start needs once the snapshot on disk
/// holds `version` ([`compacted`]), atomically; returns the lines kept. A journal that
/// cannot be read is left alone (the start refuses it and admits no one until control
/// answers; a snapshot write replaces it).
pub fn compact_journal(path: &Path, version: u64) -> std::io::Result<usize> {
    let journal = match load_journal(path) {
        Ok(j) => j,
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    rewrite_journal(path, &journal, version)
}

fn rewrite_journal(
    path: &Path,
    journal: &[(u64, Fingerprint)],
    version: u64,
) -> std::io::Result<usize> {
    if journal.is_empty() && !path.exists() {
        return Ok(0);
    }
    let kept = compacted(journal, version);
    if kept.len() == journal.len() && path.exists() {
        // Nothing to drop; a torn last line is dropped by the next rewrite.
        return Ok(kept.len());
    }
    let mut text = String::with_capacity(kept.len() * 80);
    for (v, fp) in &kept {
        let _ = writeln!(text, "{v} {fp}");
    }
    crate::datadir::write_atomic(path, text.as_bytes(), None)?;
    Ok(kept.len())
}

/// Keep only the journal lines after `version` (the snapshot now covers the rest).
fn trim_journal(path: &Path, version: u64) -> std::io::Result<usize> {
    // An unreadable journal is replaced: the snapshot just written covers it.
    let journal = load_journal(path).unwrap_or_default();
    rewrite_journal(path, &journal, version)
}

/// The background writer's handle: call [`SnapshotWriter::changed`] after every applied
/// version, and [`SnapshotWriter::flush`] before the process exits.
#[derive(Debug, Clone)]
pub struct SnapshotWriter {
    dirty: Arc<Notify>,
    inner: Arc<WriterInner>,
}

#[derive(Debug)]
struct WriterInner {
    path: PathBuf,
    journal: PathBuf,
    allowlist: Arc<Allowlist>,
    /// The version the file holds; writes take it, so the background task and
    /// [`SnapshotWriter::flush`] never write at once.
    written: tokio::sync::Mutex<u64>,
    /// Lines in the journal since it was last rewritten (at most; a guess at start).
    journal_lines: std::sync::atomic::AtomicUsize,
}

impl WriterInner {
    /// Write the snapshot in force now.
    async fn write(&self, written: &mut u64) {
        let snap = self.allowlist.snapshot_full();
        let path = self.path.clone();
        let version = snap.version();
        let entries = snap.len();
        let saved_at = crate::presence::unix_secs(std::time::SystemTime::now());
        let journal = self.journal.clone();
        let result = tokio::task::spawn_blocking(move || {
            save(&path, &snap, saved_at)?;
            trim_journal(&journal, version)
        })
        .await;
        match result {
            Ok(Ok(kept)) => {
                self.journal_lines
                    .store(kept, std::sync::atomic::Ordering::Relaxed);
                *written = version;
                tracing::debug!(version, entries, "allowlist snapshot saved")
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, version, "cannot save the allowlist snapshot")
            }
            Err(e) => tracing::error!(error = %e, "allowlist snapshot writer failed"),
        }
    }
}

impl SnapshotWriter {
    /// Start the writer task for `path`, reading the allowlist in force at each write. The
    /// allowlist in force now is taken to be what the file holds (it was loaded from it,
    /// or there is none and nothing to save yet).
    pub fn spawn(path: PathBuf, journal: PathBuf, allowlist: Arc<Allowlist>) -> SnapshotWriter {
        let dirty = Arc::new(Notify::new());
        let wake = dirty.clone();
        let written = allowlist.snapshot().version();
        let inner = Arc::new(WriterInner {
            path,
            journal,
            allowlist,
            written: tokio::sync::Mutex::new(written),
            journal_lines: std::sync::atomic::AtomicUsize::new(0),
        });
        let task = inner.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                task.write(&mut *task.written.lock().await).await;
                tokio::time::sleep(WRITE_INTERVAL).await;
            }
        });
        SnapshotWriter { dirty, inner }
    }

    /// Append the fingerprints `version` removed to the revocation journal and sync it
    /// (before the version is acknowledged). A failure is logged loudly: the snapshot
    /// writer still covers it within [`WRITE_INTERVAL`].
    pub async fn record_removed(&self, version: u64, removed: &[Fingerprint]) {
        if removed.is_empty() {
            return;
        }
        // Serialized with snapshot writes, which trim the journal.
        let guard = self.inner.written.lock().await;
        let path = self.inner.journal.clone();
        let removed = removed.to_vec();
        let lines = self
            .inner
            .journal_lines
            .fetch_add(removed.len(), std::sync::atomic::Ordering::Relaxed)
            + removed.len();
        // Snapshot writes are failing (or lagging) while revocations keep coming: keep
        // the journal to what a start needs against the snapshot on disk.
        let compact_against = (lines > JOURNAL_COMPACT_LINES).then_some(*guard);
        let result = tokio::task::spawn_blocking(move || {
            append_journal(&path, version, &removed)?;
            match compact_against {
                Some(v) => compact_journal(&path, v).map(Some),
                None => Ok(None),
            }
        })
        .await;
        match result {
            Ok(Ok(Some(kept))) => {
                self.inner
                    .journal_lines
                    .store(kept, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(kept, "revocation journal compacted");
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, version, "cannot journal revoked fingerprints")
            }
            Err(e) => tracing::error!(error = %e, "revocation journal writer failed"),
        }
    }

    /// A new version is in force: write it soon.
    pub fn changed(&self) {
        self.dirty.notify_one();
    }

    /// Write the version in force now unless the file already holds it: on shutdown, so a
    /// version applied during the coalescing interval (a revocation) is not lost to a
    /// restart while control is away.
    pub async fn flush(&self) {
        let mut written = self.inner.written.lock().await;
        if *written != self.inner.allowlist.snapshot().version() {
            self.inner.write(&mut written).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allowlist::{ApplianceId, Change, Fingerprint};

    fn entry(id: &str, b: u8) -> Entry {
        Entry {
            appliance: ApplianceId::new(id).unwrap(),
            fingerprint: Fingerprint([b; 32]),
        }
    }

    #[test]
    fn round_trip_keeps_version_time_and_entries() {
        let list = Allowlist::new();
        list.apply(Change::Replace {
            version: Some(42),
            entries: vec![entry("a", 1), entry("b", 2), entry("a", 3)],
        })
        .unwrap();
        let bytes = encode(&list.snapshot(), 1_700_000_000);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.version, 42);
        assert_eq!(back.saved_at, 1_700_000_000);
        let mut got = back.entries.clone();
        got.sort_by_key(|e| e.fingerprint);
        assert_eq!(got, vec![entry("a", 1), entry("b", 2), entry("a", 3)]);
    }

    #[test]
    fn an_empty_snapshot_round_trips() {
        let bytes = encode(&Snapshot::empty(), 5);
        let back = decode(&bytes).unwrap();
        assert_eq!((back.version, back.saved_at, back.entries.len()), (0, 5, 0));
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        assert!(matches!(decode(b""), Err(SnapshotError::Header)));
        assert!(matches!(
            decode(b"hello version=1 saved_at=2\n"),
            Err(SnapshotError::Header)
        ));
        assert!(matches!(
            decode(b"tether-allowlist-snapshot/1 version=x saved_at=2\n"),
            Err(SnapshotError::Header)
        ));
        assert!(matches!(
            decode(b"tether-allowlist-snapshot/1 saved_at=2\n"),
            Err(SnapshotError::Header)
        ));
        assert!(matches!(
            decode(b"tether-allowlist-snapshot/1 version=1 saved_at=2\na nothex\n"),
            Err(SnapshotError::Entries(ParseError::InvalidFingerprint {
                line: 1
            }))
        ));
        assert!(matches!(decode(b"\xff\xfe"), Err(SnapshotError::Header)));
    }

    #[test]
    fn save_replaces_the_file_atomically_and_load_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.snapshot");
        assert!(load(&path).unwrap().is_none());
        let list = Allowlist::new();
        list.apply(Change::Replace {
            version: Some(1),
            entries: vec![entry("a", 1)],
        })
        .unwrap();
        save(&path, &list.snapshot(), 10).unwrap();
        list.apply(Change::Delta {
            version: Some(2),
            add: vec![entry("b", 2)],
            remove: vec![Fingerprint([1; 32])],
        })
        .unwrap();
        save(&path, &list.snapshot(), 11).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.version, 2);
        assert_eq!(back.entries, vec![entry("b", 2)]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["allowlist.snapshot".to_owned()]);
    }

    #[tokio::test]
    async fn the_writer_ends_at_the_latest_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.snapshot");
        let list = Arc::new(Allowlist::new());
        let writer = SnapshotWriter::spawn(
            path.clone(),
            dir.path().join("allowlist.revoked"),
            list.clone(),
        );
        for v in 1..=5u8 {
            list.apply(Change::Delta {
                version: Some(u64::from(v)),
                add: vec![entry("a", v)],
                remove: vec![],
            })
            .unwrap();
            writer.changed();
        }
        // Wait for the file to reach version 5 (bounded by the coalescing interval).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = load(&path) {
                if s.version == 5 {
                    assert_eq!(s.entries.len(), 5);
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn flush_saves_a_version_applied_during_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.snapshot");
        let list = Arc::new(Allowlist::new());
        let writer = SnapshotWriter::spawn(
            path.clone(),
            dir.path().join("allowlist.revoked"),
            list.clone(),
        );
        // Nothing applied: nothing to save.
        writer.flush().await;
        assert!(load(&path).unwrap().is_none());
        let apply = |v: u8, remove: Vec<Fingerprint>| {
            list.apply(Change::Delta {
                version: Some(u64::from(v)),
                add: vec![entry("a", v)],
                remove,
            })
            .unwrap();
            writer.changed();
        };
        apply(1, vec![]);
        // The first write is at once; wait for it, then the writer sleeps its interval.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !matches!(load(&path), Ok(Some(ref s)) if s.version == 1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot not written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A revocation lands during the interval; the process is about to exit.
        apply(2, vec![Fingerprint([1; 32])]);
        writer.flush().await;
        let saved = load(&path).unwrap().unwrap();
        assert_eq!(saved.version, 2);
        assert_eq!(saved.entries, vec![entry("a", 2)]);
    }

    #[tokio::test]
    async fn revocations_are_journaled_at_once_and_trimmed_by_the_next_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.snapshot");
        let journal = dir.path().join("allowlist.revoked");
        let list = Arc::new(Allowlist::new());
        list.apply(Change::Delta {
            version: Some(1),
            add: vec![entry("a", 1), entry("b", 2)],
            remove: vec![],
        })
        .unwrap();
        save(&path, &list.snapshot_full(), 0).unwrap();
        let writer = SnapshotWriter::spawn(path.clone(), journal.clone(), list.clone());
        // A revocation is on disk as soon as `record_removed` returns, before any
        // snapshot write: a crash now still keeps `b` out at the next start.
        list.apply(Change::Delta {
            version: Some(2),
            add: vec![],
            remove: vec![Fingerprint([2; 32])],
        })
        .unwrap();
        writer.record_removed(2, &[Fingerprint([2; 32])]).await;
        let saved = load(&path).unwrap().unwrap();
        assert_eq!(saved.version, 1, "the snapshot itself is not rewritten yet");
        let j = load_journal(&journal).unwrap();
        assert_eq!(
            removals_after(&j, saved.version),
            vec![Fingerprint([2; 32])]
        );
        assert!(removals_after(&j, 2).is_empty());
        // The next snapshot write covers it and trims the journal.
        writer.changed();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !matches!(load(&path), Ok(Some(ref s)) if s.version == 2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot not written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.flush().await;
        assert!(load_journal(&journal).unwrap().is_empty());
    }

    #[test]
    fn compaction_keeps_exactly_what_a_start_needs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.revoked");
        let (a, b, c) = (
            Fingerprint([1; 32]),
            Fingerprint([2; 32]),
            Fingerprint([3; 32]),
        );
        // `a` revoked twice (re-added in between), `b` covered by the snapshot (v3), `c`
        // after it; then a torn last line from a crash mid-append.
        let full = [(2, a), (3, b), (5, a), (6, c), (9, a)];
        let mut text: String = full.iter().map(|(v, fp)| format!("{v} {fp}\n")).collect();
        text.push_str(&format!("10 {}", &c.to_hex()[..7]));
        std::fs::write(&path, text).unwrap();
        assert_eq!(compact_journal(&path, 3).unwrap(), 2);
        let after = load_journal(&path).unwrap();
        assert_eq!(after, vec![(6, c), (9, a)]);
        // Whatever snapshot version a start finds from 3 on, it removes the same set.
        for version in 3..=10 {
            let mut want = removals_after(&full, version);
            want.sort();
            want.dedup();
            let mut got = removals_after(&after, version);
            got.sort();
            assert_eq!(got, want, "snapshot version {version}");
        }
        // Compacting again changes nothing; an unreadable journal is left alone.
        assert_eq!(compact_journal(&path, 3).unwrap(), 2);
        std::fs::write(&path, "garbage\nmore\n").unwrap();
        assert!(compact_journal(&path, 3).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage\nmore\n");
    }

    #[tokio::test]
    async fn the_journal_is_compacted_past_its_bound_without_a_snapshot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.snapshot");
        let journal = dir.path().join("allowlist.revoked");
        let list = Arc::new(Allowlist::new());
        let writer = SnapshotWriter::spawn(path, journal.clone(), list);
        // No `changed()`: no snapshot write trims it. The same fingerprint revoked again
        // and again (an appliance re-enabled and revoked) collapses to one line.
        let fp = Fingerprint([7; 32]);
        for v in 1..=(JOURNAL_COMPACT_LINES as u64 + 10) {
            writer.record_removed(v, &[fp]).await;
        }
        let lines = load_journal(&journal).unwrap();
        assert!(
            lines.len() <= JOURNAL_COMPACT_LINES,
            "{} lines",
            lines.len()
        );
        assert_eq!(
            removals_after(&lines, 0)
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>(),
            [fp].into_iter().collect()
        );
        assert_eq!(lines.last().unwrap().0, JOURNAL_COMPACT_LINES as u64 + 10);
    }

    #[test]
    fn a_torn_last_journal_line_is_ignored_and_garbage_elsewhere_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowlist.revoked");
        let fp = Fingerprint([3; 32]);
        std::fs::write(&path, format!("4 {fp}\n5 {}", &fp.to_hex()[..10])).unwrap();
        assert_eq!(load_journal(&path).unwrap(), vec![(4, fp)]);
        std::fs::write(&path, format!("x {fp}\n5 {fp}\n")).unwrap();
        assert!(matches!(
            load_journal(&path),
            Err(SnapshotError::Journal { line: 1 })
        ));
        assert!(load_journal(&dir.path().join("none")).unwrap().is_empty());
    }
}
