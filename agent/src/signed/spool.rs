//! The manifest spool: signed manifests whose delivery to a broker is not yet confirmed.
//!
//! A manifest is spooled (written and fsynced, one file per manifest) before it is sent on
//! its command stream. It leaves the spool when the broker's QUIC stack acknowledged every
//! byte of that stream (`SendStream::stopped` after `finish`), or, for a manifest re-sent
//! on the session stream after a reconnect (`ManifestBacklog`), when the broker answers
//! `ManifestAck`. So a connection lost in the middle of a command leaves its manifest
//! here, and the next session (with a broker that lists `manifest-backlog/1`) delivers
//! it: the vendor's copy becomes complete, as the customer's (the appliance audit log,
//! which holds every manifest) is by construction.
//!
//! The spool is bounded ([`MAX_SPOOLED`]): beyond it the oldest entries are dropped with
//! a warning; they stay in the appliance audit log.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_proto::{CommandManifest, ManifestBacklog};

/// The spool's directory under the agent's state directory.
pub const SPOOL_DIR: &str = "manifest-spool";
/// The most manifests kept for re-sending.
pub const MAX_SPOOLED: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    seq: u64,
    command_id: u64,
    manifest: String,
    sig: String,
}

/// Manifests not yet confirmed delivered, one file each (`<seq>.json`, mode 0600).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max: usize,
}

impl Spool {
    /// The spool in `dir` (created on first use, mode 0700).
    pub fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            max: MAX_SPOOLED,
        }
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    /// Keep manifest `seq` of command `command_id` until its delivery is confirmed.
    pub fn put(&self, seq: u64, command_id: u64, manifest: &[u8], sig: &str) -> io::Result<()> {
        create_private_dir(&self.dir)?;
        let entry = Entry {
            seq,
            command_id,
            manifest: String::from_utf8_lossy(manifest).into_owned(),
            sig: sig.to_owned(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        tether_identity::fs::write_atomic(&self.path(seq), &bytes, 0o600)?;
        self.trim();
        Ok(())
    }

    /// Manifest `seq` was delivered.
    pub fn remove(&self, seq: u64) {
        match std::fs::remove_file(self.path(seq)) {
            Ok(()) => tracing::debug!(seq, "manifest delivered; out of the spool"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(seq, error = %e, "cannot remove a delivered manifest"),
        }
    }

    /// The spooled manifests, oldest first. An entry that cannot be read is removed (it
    /// is in the appliance audit log).
    pub fn list(&self) -> Vec<ManifestBacklog> {
        let mut out = Vec::new();
        for (seq, path) in self.files() {
            let entry = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
                .filter(|e| e.seq == seq);
            match entry {
                Some(e) => out.push(ManifestBacklog {
                    seq: e.seq,
                    manifest: CommandManifest {
                        command_id: e.command_id,
                        manifest: e.manifest.into_bytes().into(),
                        sig: e.sig.into_bytes().into(),
                    },
                }),
                None => {
                    tracing::warn!(path = %path.display(), "unreadable spooled manifest; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// `(seq, path)` of every spooled manifest, by `seq`.
    fn files(&self) -> Vec<(u64, PathBuf)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(u64, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let seq = name.to_str()?.strip_suffix(".json")?.parse().ok()?;
                Some((seq, e.path()))
            })
            .collect();
        files.sort_unstable_by_key(|(seq, _)| *seq);
        files
    }

    fn trim(&self) {
        let files = self.files();
        if files.len() <= self.max {
            return;
        }
        for (seq, path) in &files[..files.len() - self.max] {
            tracing::warn!(
                seq,
                "manifest spool full: dropping the oldest (it stays in the audit log)"
            );
            let _ = std::fs::remove_file(path);
        }
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_list_remove_and_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(dir.path().join(SPOOL_DIR));
        spool.max = 4;
        assert!(spool.list().is_empty(), "no directory yet: empty");
        spool.put(2, 7, b"{\"m\":2}", "sig2").unwrap();
        spool.put(1, 5, b"{\"m\":1}", "sig1").unwrap();
        let l = spool.list();
        assert_eq!(l.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(l[0].manifest.command_id, 5);
        assert_eq!(&l[1].manifest.manifest[..], b"{\"m\":2}");
        assert_eq!(&l[1].manifest.sig[..], b"sig2");
        spool.remove(1);
        spool.remove(1);
        assert_eq!(spool.list().len(), 1);
        // A damaged entry is dropped, not re-sent forever.
        std::fs::write(spool.path(9), b"not json").unwrap();
        assert_eq!(spool.list().len(), 1);
        assert!(!spool.path(9).exists());
        for seq in 10..16 {
            spool.put(seq, seq, b"{}", "s").unwrap();
        }
        let l = spool.list();
        assert_eq!(
            l.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [12, 13, 14, 15]
        );
    }
}
