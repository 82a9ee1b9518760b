//! The offline check either party runs on an approval, a manifest and the output
//! (`tether ops verify`, design §1.9). Every check has a name; the first that fails is
//! the answer.

use crate::approval::Approval;
use crate::approvers::{Approvers, Scope};
use crate::manifest::{Manifest, StreamDigest};
use crate::{sha256_hex, sig, APPROVAL_NAMESPACE, MANIFEST_NAMESPACE};

/// The inputs, as bytes read from files.
pub struct Evidence<'a> {
    /// The approval document.
    pub approval: &'a [u8],
    /// Its signature (armor).
    pub approval_sig: &'a [u8],
    /// The manifest.
    pub manifest: &'a [u8],
    /// Its signature.
    pub manifest_sig: &'a [u8],
    /// The customer's pinned keys.
    pub approvers: &'a Approvers,
    /// The clock skew allowed between the approval's window and the start.
    pub skew_ms: i64,
    /// The command's stdout, if given.
    pub stdout: Option<&'a [u8]>,
    /// Its stderr, if given.
    pub stderr: Option<&'a [u8]>,
}

/// A failed check: its name and what was wrong.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {detail}")]
pub struct Failed {
    /// The check's name.
    pub check: &'static str,
    /// What was wrong.
    pub detail: String,
}

fn fail(check: &'static str, detail: impl Into<String>) -> Failed {
    Failed {
        check,
        detail: detail.into(),
    }
}

/// What verified.
#[derive(Debug)]
pub struct Report {
    /// The approval.
    pub approval: Approval,
    /// The manifest.
    pub manifest: Manifest,
    /// The pinned key's label.
    pub key_id: String,
    /// The checks that passed, in order.
    pub passed: Vec<&'static str>,
}

/// Run every check in order.
pub fn verify(e: &Evidence<'_>) -> Result<Report, Failed> {
    let mut passed = Vec::new();
    let approval = Approval::parse(e.approval).map_err(|d| fail("approval_canonical", d))?;
    passed.push("approval_canonical");
    let signer = sig::verify(e.approval_sig, APPROVAL_NAMESPACE, e.approval)
        .map_err(|d| fail("approval_signature", d.to_string()))?;
    passed.push("approval_signature");
    let pinned = e
        .approvers
        .authorize(&signer, approval.not_before_ms, Scope::Exec)
        .map_err(|d| fail("approval_key", d.to_string()))?;
    passed.push("approval_key");
    let manifest = Manifest::parse(e.manifest).map_err(|d| fail("manifest_canonical", d))?;
    passed.push("manifest_canonical");
    let msigner = sig::verify(e.manifest_sig, MANIFEST_NAMESPACE, e.manifest)
        .map_err(|d| fail("manifest_signature", d.to_string()))?;
    let appliance_key = ssh_key::PublicKey::from_openssh(&approval.appliance.key).map_err(|d| {
        fail(
            "manifest_signature",
            format!("the approval's appliance.key: {d}"),
        )
    })?;
    if msigner.key.key_data() != appliance_key.key_data() {
        return Err(fail(
            "manifest_signature",
            "the manifest is signed by another key than the approval's appliance.key",
        ));
    }
    passed.push("manifest_signature");
    let bound = manifest
        .approval
        .as_ref()
        .ok_or_else(|| fail("approval_hash", "the manifest names no approval"))?;
    if bound.sha256 != sha256_hex(e.approval) || bound.approval_id != approval.approval_id {
        return Err(fail("approval_hash", "the manifest binds another approval"));
    }
    passed.push("approval_hash");
    if manifest.exec != approval.exec
        || manifest.phase != Some(approval.phase)
        || manifest.appliance != approval.appliance
    {
        return Err(fail(
            "same_command",
            "the manifest's command, phase or appliance differs from the approval's",
        ));
    }
    passed.push("same_command");
    if manifest.started_ms < approval.not_before_ms - e.skew_ms
        || manifest.started_ms > approval.not_after_ms + e.skew_ms
    {
        return Err(fail(
            "started_in_window",
            "the command started outside the approval's window",
        ));
    }
    passed.push("started_in_window");
    for (name, data, digest) in [
        ("stdout", e.stdout, &manifest.stdout),
        ("stderr", e.stderr, &manifest.stderr),
    ] {
        if let Some(data) = data {
            if &StreamDigest::of(data) != digest {
                return Err(fail(
                    if name == "stdout" { "stdout" } else { "stderr" },
                    format!("the {name} file does not match the manifest's byte count and SHA-256"),
                ));
            }
            passed.push(if name == "stdout" { "stdout" } else { "stderr" });
        }
    }
    Ok(Report {
        approval,
        manifest,
        key_id: pinned.id.clone(),
        passed,
    })
}
