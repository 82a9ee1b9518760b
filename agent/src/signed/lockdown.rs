//! `tether-agent lockdown`: the customer's one-step switch-off. Run by the customer's
//! admin on the appliance (the agent itself never writes the customer directory), it sets
//! `enabled = false` on every phase but `observe` (or on all of them with `--all`) in
//! `policy.toml`, keeping the file's comments and layout, its owner and its mode, and
//! replaces it atomically. The running agent enforces the result within a second:
//! commands in a closed phase are refused, and running ones are killed (`phase_revoked`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tether_ops::policy::Policy;
use tether_ops::Phase;

use super::customer::POLICY_FILE;

/// Close the phases and return the new policy's phase summary.
pub fn lockdown(customer_dir: &Path, all: bool) -> Result<String, String> {
    let path = customer_dir.join(POLICY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Refuse to edit a policy that does not parse: the customer must see the error.
    Policy::parse(text.as_bytes())?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for phase in Phase::ALL {
        if phase == Phase::Observe && !all {
            continue;
        }
        if let Some(table) = doc
            .get_mut("phases")
            .and_then(|p| p.get_mut(phase.as_str()))
            .and_then(|t| t.as_table_like_mut())
        {
            table.insert("enabled", toml_edit::value(false));
        }
    }
    let new = doc.to_string();
    let policy = Policy::parse(new.as_bytes())?;
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Same mode, then the same owner (the admin running this may not be the file's).
    tether_identity::fs::write_atomic(&path, new.as_bytes(), meta.mode() & 0o7777)
        .and_then(|()| std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid())))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(policy.phases_summary())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn closes_every_phase_but_observe_and_keeps_comments_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let text = "# the customer's note\n[phases.observe]\nenabled = true\napproval = \"none\"\nrun_as = \"nobody\"\n\n[phases.operate] # ops\nenabled = true\napproval = \"required\"\nrun_as = \"nobody\"\n";
        let path = dir.path().join(POLICY_FILE);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            lockdown(dir.path(), false).unwrap(),
            "observe=on/none,deploy=off,operate=off,install=off"
        );
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.contains("# the customer's note") && after.contains("# ops"),
            "{after}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            lockdown(dir.path(), true).unwrap(),
            "observe=off,deploy=off,operate=off,install=off"
        );
        std::fs::write(&path, "broken = [").unwrap();
        assert!(lockdown(dir.path(), false).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "broken = [");
    }
}
