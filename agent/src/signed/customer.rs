//! The customer directory: `approvers.toml` and `policy.toml`, read but never written by
//! the agent, and trusted only if nobody but the customer could have written them.
//!
//! Strict modes (as sshd's `StrictModes`): the directory and each file must not be
//! group- or world-writable, must not be writable by a user the policy runs commands as,
//! and, when the agent runs unprivileged, must not be writable by the agent's own user —
//! a command running there could otherwise append its own key or open a phase. A file
//! that fails is not used: a bad `policy.toml` refuses every command, a bad
//! `approvers.toml` refuses every approval (observe commands keep working).
//!
//! Changes take effect without a restart: [`CustomerFiles::current`] re-`stat`s the
//! directory and both files (inode, size, mtime, mode, owner) and re-reads them when any
//! changed, so a missed file-system event can never leave an old policy in force.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tether_ops::approvers::Approvers;
use tether_ops::policy::Policy;
use tether_ops::Phase;

/// The pinned keys' file name.
pub const APPROVERS_FILE: &str = "approvers.toml";
/// The policy's file name.
pub const POLICY_FILE: &str = "policy.toml";

/// What identifies a version of a file for the re-stat check.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, u64, i64, i64, u32, u32)>);

fn stamp(path: &Path) -> Stamp {
    Stamp(std::fs::metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.mode(),
            m.uid(),
        )
    }))
}

/// The customer's files as loaded: each usable, or the reason it is not.
#[derive(Debug)]
pub struct Loaded {
    stamps: [Stamp; 3],
    /// The policy, or why there is none.
    pub policy: Result<Arc<Policy>, String>,
    /// The pinned keys, or why none can be used.
    pub approvers: Result<Arc<Approvers>, String>,
}

impl Loaded {
    /// Whether `phase` is open now under this policy (a missing policy opens nothing).
    pub fn phase_open(&self, phase: Phase, now_ms: i64) -> bool {
        self.policy.as_ref().is_ok_and(|p| p.is_open(phase, now_ms))
    }
}

/// The customer directory and the version of its files in force.
#[derive(Debug)]
pub struct CustomerFiles {
    dir: PathBuf,
    agent_uid: u32,
    loaded: Mutex<Arc<Loaded>>,
    /// Bumped at every re-read: what `Status` reported last is compared with it.
    generation: std::sync::atomic::AtomicU64,
}

impl CustomerFiles {
    /// Watch `dir` for an agent running as `agent_uid`; loads the files now.
    pub fn new(dir: PathBuf, agent_uid: u32) -> CustomerFiles {
        let loaded = Mutex::new(Arc::new(load(&dir, agent_uid)));
        CustomerFiles {
            dir,
            agent_uid,
            loaded,
            generation: Default::default(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn stamps(&self) -> [Stamp; 3] {
        [
            stamp(&self.dir),
            stamp(&self.dir.join(APPROVERS_FILE)),
            stamp(&self.dir.join(POLICY_FILE)),
        ]
    }

    /// The files in force now: re-read if any changed since they were loaded. The bool
    /// says whether they were re-read.
    pub fn current(&self) -> (Arc<Loaded>, bool) {
        let stamps = self.stamps();
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.stamps == stamps {
            return (loaded.clone(), false);
        }
        let fresh = Arc::new(load(&self.dir, self.agent_uid));
        *loaded = fresh.clone();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (fresh, true)
    }

    /// How many times the files were re-read (after [`CustomerFiles::current`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Refuse `meta` (of `path`) if someone other than the customer could write it.
fn strict(
    path: &Path,
    meta: &std::fs::Metadata,
    agent_uid: u32,
    command_uids: &[u32],
) -> Result<(), String> {
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} is group- or world-writable (mode {:o}); only the customer may be able to write it",
            path.display(),
            mode & 0o7777
        ));
    }
    let owner = meta.uid();
    if mode & 0o200 != 0 {
        if command_uids.contains(&owner) {
            return Err(format!(
                "{} is writable by uid {owner}, a user the policy runs commands as",
                path.display()
            ));
        }
        if agent_uid != 0 && owner == agent_uid {
            return Err(format!(
                "{} is writable by the agent's own user (uid {owner}); the customer directory must belong to someone else",
                path.display()
            ));
        }
    }
    Ok(())
}

fn read_checked(path: &Path, agent_uid: u32, command_uids: &[u32]) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    strict(path, &meta, agent_uid, command_uids)?;
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The uids of the users `policy` runs commands as (those that exist).
fn command_uids(policy: &Policy) -> Vec<u32> {
    Phase::ALL
        .iter()
        .filter_map(|&p| policy.phase(p))
        .filter_map(|r| nix::unistd::User::from_name(&r.run_as).ok().flatten())
        .map(|u| u.uid.as_raw())
        .collect()
}

fn load(dir: &Path, agent_uid: u32) -> Loaded {
    let stamps = [
        stamp(dir),
        stamp(&dir.join(APPROVERS_FILE)),
        stamp(&dir.join(POLICY_FILE)),
    ];
    // The policy names the command users the strict check needs; parse it first, then
    // check everything against them.
    let policy_path = dir.join(POLICY_FILE);
    let parsed = std::fs::read(&policy_path)
        .map_err(|e| format!("{}: {e}", policy_path.display()))
        .and_then(|b| Policy::parse(&b));
    let uids = parsed.as_ref().map(command_uids).unwrap_or_default();
    let dir_ok = std::fs::metadata(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|m| strict(dir, &m, agent_uid, &uids));
    let policy = dir_ok
        .clone()
        .and_then(|()| read_checked(&policy_path, agent_uid, &uids))
        .and_then(|b| Policy::parse(&b))
        .map(Arc::new);
    let approvers_path = dir.join(APPROVERS_FILE);
    let approvers = dir_ok
        .and_then(|()| read_checked(&approvers_path, agent_uid, &uids))
        .and_then(|b| {
            String::from_utf8(b).map_err(|_| format!("{} is not UTF-8", approvers_path.display()))
        })
        .and_then(|t| Approvers::parse(&t))
        .map(Arc::new);
    match (&policy, &approvers) {
        (Ok(p), _) => {
            tracing::info!(policy_sha256 = %p.sha256, phases = %p.phases_summary(), "customer policy in force")
        }
        (Err(e), _) => {
            tracing::error!(error = %e, "customer policy unusable: every command is refused")
        }
    }
    if let Err(e) = &approvers {
        tracing::error!(error = %e, "customer approvers unusable: every approval is refused");
    }
    Loaded {
        stamps,
        policy,
        approvers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const POLICY: &str =
        "[phases.observe]\nenabled = true\napproval = \"none\"\nrun_as = \"nobody\"\n";

    #[test]
    fn strict_modes_and_reload_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.join(POLICY_FILE), POLICY).unwrap();
        std::fs::write(d.join(APPROVERS_FILE), "").unwrap();
        for f in [POLICY_FILE, APPROVERS_FILE] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        // As if the agent ran as some uid other than the files' owner.
        let files = CustomerFiles::new(d.to_path_buf(), 4_000_000);
        let (l, _) = files.current();
        assert!(l.policy.is_ok() && l.approvers.is_ok(), "{l:?}");
        // Group-writable approvers: refused, policy still fine.
        std::fs::set_permissions(
            d.join(APPROVERS_FILE),
            std::fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        let (l, reread) = files.current();
        assert!(reread);
        assert!(l.policy.is_ok());
        assert!(l
            .approvers
            .as_ref()
            .unwrap_err()
            .contains("group- or world-writable"));
        // Owned by the agent's own (unprivileged) user: refused.
        let own = CustomerFiles::new(d.to_path_buf(), nix::unistd::getuid().as_raw().max(1));
        std::fs::set_permissions(
            d.join(APPROVERS_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        if nix::unistd::getuid().as_raw() != 0 {
            assert!(own.current().0.policy.is_err());
        }
        // A world-writable directory poisons both.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (l, _) = files.current();
        assert!(l.policy.is_err() && l.approvers.is_err());
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A broken policy: refused whole.
        std::fs::write(d.join(POLICY_FILE), "[phases.observe]\nenabled = maybe\n").unwrap();
        assert!(files.current().0.policy.is_err());
        // Unchanged files are not re-read.
        assert!(!files.current().1);
    }
}
