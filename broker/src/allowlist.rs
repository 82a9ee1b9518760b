//! The allowlist: which certificate fingerprints may authenticate, and as which appliance.
//!
//! A [`Snapshot`] is immutable and lives behind an [`ArcSwap`]: a handshake does one atomic
//! load, one map lookup and no locking, and a change never blocks a handshake. The map is a
//! persistent HAMT (`imbl`), so applying a change copies only the touched path — O(change ×
//! log n), not O(fleet) — and the old snapshot stays valid for readers still holding it.
//!
//! Changes come from an [`AllowlistSource`]: the standalone broker reads a text file
//! ([`FileSource`]); the control-plane sync plugs in behind the same trait. Every applied
//! change reports the `(appliance, fingerprint)` pairs it removed, so the caller can close
//! exactly the live sessions that used them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;

pub use tether_identity::{
    ApplianceId, Fingerprint, FingerprintHasher, MAX_NAME_LEN as MAX_APPLIANCE_ID_LEN,
};

type Map = imbl::GenericHashMap<
    Fingerprint,
    ApplianceId,
    FingerprintHasher,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// One immutable version of the allowlist.
#[derive(Clone, Debug)]
pub struct Snapshot {
    version: u64,
    by_fingerprint: Map,
}

impl Snapshot {
    /// An empty snapshot at version 0.
    pub fn empty() -> Snapshot {
        Snapshot {
            version: 0,
            by_fingerprint: Map::with_hasher(FingerprintHasher),
        }
    }

    /// The appliance a fingerprint was recorded for, if any.
    #[inline]
    pub fn lookup(&self, fp: &Fingerprint) -> Option<&ApplianceId> {
        self.by_fingerprint.get(fp)
    }

    /// Version of this snapshot (file reloads count up from 1; control sets its own).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of fingerprints.
    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    /// Whether no fingerprint is allowed.
    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&Fingerprint, &ApplianceId)> {
        self.by_fingerprint.iter()
    }
}

/// One allowed certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The appliance the certificate names.
    pub appliance: ApplianceId,
    /// SHA-256 of the leaf DER.
    pub fingerprint: Fingerprint,
}

/// A change to apply.
#[derive(Clone, Debug)]
pub enum Change {
    /// Replace everything with these entries (a file reload, a full sync).
    Replace {
        /// New version; `None` means "previous + 1".
        version: Option<u64>,
        /// The complete new contents.
        entries: Vec<Entry>,
    },
    /// Add and remove some fingerprints (a control delta).
    Delta {
        /// New version; `None` means "previous + 1".
        version: Option<u64>,
        /// Fingerprints to allow.
        add: Vec<Entry>,
        /// Fingerprints to remove.
        remove: Vec<Fingerprint>,
    },
}

/// What an applied change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Version now in force.
    pub version: u64,
    /// Entries added.
    pub added: usize,
    /// Entries removed, with the appliance each was recorded for.
    pub removed: Vec<Entry>,
}

/// A change that cannot be applied. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// One fingerprint recorded for two appliances: a certificate names one appliance, so
    /// this is a corrupt source.
    #[error("fingerprint {fingerprint} is recorded for both {first} and {second}")]
    FingerprintConflict {
        /// The fingerprint.
        fingerprint: Fingerprint,
        /// The appliance it was recorded for first.
        first: ApplianceId,
        /// The other appliance.
        second: ApplianceId,
    },
}

/// The allowlist in force. Readers call [`Allowlist::snapshot`]; one writer (the source
/// driver) calls [`Allowlist::apply`].
#[derive(Debug)]
pub struct Allowlist {
    current: ArcSwap<Snapshot>,
}

impl Default for Allowlist {
    fn default() -> Self {
        Self::new()
    }
}

impl Allowlist {
    /// An empty allowlist: nothing is admitted.
    pub fn new() -> Allowlist {
        Allowlist {
            current: ArcSwap::from_pointee(Snapshot::empty()),
        }
    }

    /// An allowlist starting from `snapshot` (a cached copy, a benchmark fixture).
    pub fn from_snapshot(snapshot: Snapshot) -> Allowlist {
        Allowlist {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The snapshot in force. Lock-free; cheap enough for every handshake.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The snapshot in force, as an owned `Arc` (to keep across an `await`).
    pub fn snapshot_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Whether `fp` is currently allowed for `appliance`.
    #[inline]
    pub fn allows(&self, appliance: &ApplianceId, fp: &Fingerprint) -> bool {
        self.current.load().lookup(fp) == Some(appliance)
    }

    /// Apply a change and swap it in. Must be called from one task at a time (it is a
    /// read-modify-write of the current snapshot).
    pub fn apply(&self, change: Change) -> Result<Applied, ChangeError> {
        let old = self.current.load_full();
        let (next, applied) = compute(&old, change)?;
        self.current.store(Arc::new(next));
        Ok(applied)
    }
}

fn compute(old: &Snapshot, change: Change) -> Result<(Snapshot, Applied), ChangeError> {
    match change {
        Change::Replace { version, entries } => {
            let mut map = Map::with_hasher(FingerprintHasher);
            let mut added = 0;
            for e in entries {
                if let Some(prev) = map.get(&e.fingerprint) {
                    if *prev != e.appliance {
                        return Err(ChangeError::FingerprintConflict {
                            fingerprint: e.fingerprint,
                            first: prev.clone(),
                            second: e.appliance,
                        });
                    }
                    continue;
                }
                if old.lookup(&e.fingerprint) != Some(&e.appliance) {
                    added += 1;
                }
                map.insert(e.fingerprint, e.appliance);
            }
            // An entry whose appliance changed counts as removed (sessions that used it
            // as the old appliance must go).
            let removed = old
                .by_fingerprint
                .iter()
                .filter(|(fp, id)| map.get(*fp) != Some(*id))
                .map(|(fp, id)| Entry {
                    appliance: id.clone(),
                    fingerprint: *fp,
                })
                .collect();
            let version = version.unwrap_or(old.version + 1);
            Ok((
                Snapshot {
                    version,
                    by_fingerprint: map,
                },
                Applied {
                    version,
                    added,
                    removed,
                },
            ))
        }
        Change::Delta {
            version,
            add,
            remove,
        } => {
            let mut map = old.by_fingerprint.clone();
            let mut removed = Vec::with_capacity(remove.len());
            for fp in remove {
                if let Some(id) = map.remove(&fp) {
                    removed.push(Entry {
                        appliance: id,
                        fingerprint: fp,
                    });
                }
            }
            let mut added = 0;
            for e in add {
                match map.get(&e.fingerprint) {
                    Some(prev) if *prev == e.appliance => {}
                    Some(prev) => {
                        return Err(ChangeError::FingerprintConflict {
                            fingerprint: e.fingerprint,
                            first: prev.clone(),
                            second: e.appliance,
                        })
                    }
                    None => {
                        map.insert(e.fingerprint, e.appliance);
                        added += 1;
                    }
                }
            }
            let version = version.unwrap_or(old.version + 1);
            Ok((
                Snapshot {
                    version,
                    by_fingerprint: map,
                },
                Applied {
                    version,
                    added,
                    removed,
                },
            ))
        }
    }
}

/// A line of an allowlist file that cannot be used. The whole file is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A line does not have exactly two fields.
    #[error("line {line}: expected `<appliance-id> <sha256-hex>`, found {fields} field(s)")]
    FieldCount {
        /// 1-based line number.
        line: usize,
        /// Fields found.
        fields: usize,
    },
    /// The appliance id breaks the name rule (see `tether_identity::name`).
    #[error("line {line}: {reason}")]
    InvalidId {
        /// 1-based line number.
        line: usize,
        /// The part of the rule it breaks.
        reason: tether_identity::NameError,
    },
    /// The fingerprint is not 64 hex digits.
    #[error("line {line}: fingerprint must be 64 hex digits (SHA-256 of the certificate DER)")]
    InvalidFingerprint {
        /// 1-based line number.
        line: usize,
    },
    /// The same fingerprint appears for two appliances.
    #[error("line {line}: fingerprint already recorded for appliance {other}")]
    Conflict {
        /// 1-based line number.
        line: usize,
        /// The appliance it was recorded for first.
        other: String,
    },
    /// The file is not UTF-8.
    #[error("file is not valid UTF-8")]
    NotUtf8,
}

/// Parse the text format: `<appliance-id> <sha256-hex>` per line; `#` starts a comment;
/// blank lines are ignored; an appliance may have several lines (several certificates).
pub fn parse(text: &[u8]) -> Result<Vec<Entry>, ParseError> {
    let text = std::str::from_utf8(text).map_err(|_| ParseError::NotUtf8)?;
    let mut entries = Vec::new();
    let mut seen: std::collections::HashMap<Fingerprint, usize> = Default::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let mut fields = content.split_whitespace();
        let (Some(id), Some(fp), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(ParseError::FieldCount {
                line,
                fields: content.split_whitespace().count(),
            });
        };
        let appliance =
            ApplianceId::new(id).map_err(|reason| ParseError::InvalidId { line, reason })?;
        let fingerprint =
            Fingerprint::from_hex(fp).ok_or(ParseError::InvalidFingerprint { line })?;
        if let Some(&at) = seen.get(&fingerprint) {
            let other: &Entry = &entries[at];
            if other.appliance != appliance {
                return Err(ParseError::Conflict {
                    line,
                    other: other.appliance.to_string(),
                });
            }
            continue;
        }
        seen.insert(fingerprint, entries.len());
        entries.push(Entry {
            appliance,
            fingerprint,
        });
    }
    Ok(entries)
}

/// Why a source could not produce a change. The snapshot in force stays.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is malformed.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ParseError,
    },
}

/// Where allowlist changes come from.
pub trait AllowlistSource: Send + 'static {
    /// A short name for logs (`file`, `control`).
    fn name(&self) -> &'static str;
    /// Wait for the next change. `None` when the source has ended.
    fn next_change(
        &mut self,
    ) -> impl std::future::Future<Output = Option<Result<Change, SourceError>>> + Send;
}

/// Read and parse an allowlist file.
pub fn load_file(path: &Path) -> Result<Vec<Entry>, SourceError> {
    let bytes = std::fs::read(path).map_err(|source| SourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes).map_err(|source| SourceError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// The standalone source: a text file, reloaded when it changes (inotify on its folder, so
/// editors that replace the file by rename are seen) and on SIGHUP.
pub struct FileSource {
    path: PathBuf,
    events: tokio::sync::mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Quiet period after a file event before reloading, so one save is read once and a
/// half-written file is not read mid-write.
pub const FILE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(20);

impl FileSource {
    /// Watch `path`. A watcher that cannot be set up is logged; SIGHUP still works.
    pub fn new(path: PathBuf) -> FileSource {
        use notify::Watcher;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let file_name = path.file_name().map(|n| n.to_owned());
        let watch_tx = tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            let relevant =
                event.kind.is_modify() || event.kind.is_create() || event.kind.is_remove();
            let ours = event
                .paths
                .iter()
                .any(|p| p.file_name() == file_name.as_deref());
            if relevant && ours {
                let _ = watch_tx.try_send(());
            }
        });
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let watcher = match watcher {
            Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch allowlist folder; reload with SIGHUP");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create file watcher; reload with SIGHUP");
                None
            }
        };
        #[cfg(unix)]
        {
            let hup_tx = tx;
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(mut hup) => {
                    tokio::spawn(async move {
                        while hup.recv().await.is_some() {
                            tracing::info!("SIGHUP: reloading allowlist");
                            if hup_tx.send(()).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
            }
        }
        FileSource {
            path,
            events: rx,
            _watcher: watcher,
        }
    }
}

impl AllowlistSource for FileSource {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn next_change(&mut self) -> Option<Result<Change, SourceError>> {
        self.events.recv().await?;
        // Debounce: wait until no event arrived for FILE_DEBOUNCE.
        loop {
            match tokio::time::timeout(FILE_DEBOUNCE, self.events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return None,
                Err(_) => break,
            }
        }
        Some(load_file(&self.path).map(|entries| Change::Replace {
            version: None,
            entries,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }
    fn id(s: &str) -> ApplianceId {
        ApplianceId::new(s).unwrap()
    }

    #[test]
    fn parse_accepts_comments_and_several_fingerprints() {
        let text = format!(
            "# fleet\n\napp-1 {}\napp-1 {}  # renewed\n  app-2\t{}\n",
            fp(1).to_hex(),
            fp(2).to_hex().to_uppercase(),
            fp(3).to_hex()
        );
        let entries = parse(text.as_bytes()).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].fingerprint, fp(2));
        assert_eq!(entries[2].appliance, id("app-2"));
    }

    #[test]
    fn parse_refuses_with_line_numbers() {
        assert_eq!(
            parse(b"app-1 abc\n"),
            Err(ParseError::InvalidFingerprint { line: 1 })
        );
        let t = format!("ok {}\nbad/id {}\n", fp(1).to_hex(), fp(2).to_hex());
        assert!(matches!(
            parse(t.as_bytes()),
            Err(ParseError::InvalidId { line: 2, .. })
        ));
        let t = format!("ok {}\n.. {}\n", fp(1).to_hex(), fp(2).to_hex());
        assert!(matches!(
            parse(t.as_bytes()),
            Err(ParseError::InvalidId {
                line: 2,
                reason: tether_identity::NameError::Dots { .. }
            })
        ));
        assert_eq!(
            parse(b"\n\njust-one-field\n"),
            Err(ParseError::FieldCount { line: 3, fields: 1 })
        );
        let t = format!("a {}\nb {}\n", fp(1).to_hex(), fp(1).to_hex());
        assert_eq!(
            parse(t.as_bytes()),
            Err(ParseError::Conflict {
                line: 2,
                other: "a".into()
            })
        );
        assert_eq!(parse(&[0xff, 0xfe]), Err(ParseError::NotUtf8));
    }

    #[test]
    fn replace_reports_removed_and_changed_owner() {
        let list = Allowlist::new();
        let e = |a: &str, n| Entry {
            appliance: id(a),
            fingerprint: fp(n),
        };
        let applied = list
            .apply(Change::Replace {
                version: None,
                entries: vec![e("a", 1), e("b", 2)],
            })
            .unwrap();
        assert_eq!(applied.version, 1);
        assert_eq!(applied.added, 2);
        let applied = list
            .apply(Change::Replace {
                version: None,
                entries: vec![e("a", 1), e("c", 2)],
            })
            .unwrap();
        assert_eq!(applied.removed, vec![e("b", 2)]);
        assert!(list.allows(&id("c"), &fp(2)));
        assert!(!list.allows(&id("b"), &fp(2)));
    }

    #[test]
    fn delta_is_applied_without_touching_other_entries() {
        let list = Allowlist::new();
        let entries: Vec<Entry> = (0..=200u8)
            .map(|n| Entry {
                appliance: id(&format!("a{n}")),
                fingerprint: fp(n),
            })
            .collect();
        list.apply(Change::Replace {
            version: Some(10),
            entries,
        })
        .unwrap();
        let before = list.snapshot();
        let applied = list
            .apply(Change::Delta {
                version: None,
                add: vec![],
                remove: vec![fp(7), Fingerprint([0xfe; 32])],
            })
            .unwrap();
        assert_eq!(applied.version, 11);
        assert_eq!(applied.removed.len(), 1);
        assert_eq!(list.snapshot().len(), 200);
        // Readers holding the old snapshot still see it whole.
        assert_eq!(before.len(), 201);
        assert!(before.lookup(&fp(7)).is_some());
    }

    #[test]
    fn conflicting_delta_changes_nothing() {
        let list = Allowlist::new();
        let entry = |a: &str| Entry {
            appliance: id(a),
            fingerprint: fp(1),
        };
        list.apply(Change::Delta {
            version: None,
            add: vec![entry("a")],
            remove: vec![],
        })
        .unwrap();
        let err = list
            .apply(Change::Delta {
                version: None,
                add: vec![entry("b")],
                remove: vec![],
            })
            .unwrap_err();
        assert!(matches!(err, ChangeError::FingerprintConflict { .. }));
        assert_eq!(list.snapshot().version(), 1);
        assert!(list.allows(&id("a"), &fp(1)));
    }

    #[test]
    fn fingerprint_hex_round_trip() {
        let f = Fingerprint::of(b"hello");
        assert_eq!(Fingerprint::from_hex(&f.to_hex()), Some(f));
        assert_eq!(
            f.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }
}
