//! The offline check either party runs on an approval, a manifest and the output
//! (`tether ops verify`, design §1.9), and on a break-glass approval and its session
//! manifest (`tether ops verify --session`, [`verify_session`]). Every check has a name;
//! the first that fails is the answer.

use crate::approval::Approval;
use crate::approvers::{Approvers, Scope};
use crate::manifest::{Manifest, StreamDigest};
use crate::session::SessionManifest;
use crate::tunnel::TunnelApproval;
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
    signed_by_appliance(e.manifest, e.manifest_sig, &approval.appliance.key)
        .map_err(|d| fail("manifest_signature", d))?;
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

/// What a session verification found.
#[derive(Debug)]
pub struct SessionReport {
    /// The break-glass approval.
    pub approval: TunnelApproval,
    /// The session manifest.
    pub manifest: SessionManifest,
    /// The pinned key's label.
    pub key_id: String,
    /// The checks that passed, in order.
    pub passed: Vec<&'static str>,
}

/// Check a break-glass session manifest against the approval that opened it, in order:
/// `approval_canonical`, `approval_signature`, `approval_key` (pinned for break glass
/// and valid at the approval's start), `manifest_canonical`, `manifest_signature` (by
/// the appliance key the approval names), `approval_hash` (the manifest binds these
/// approval bytes), `same_tunnel` (appliance, phase, resource, privilege and target as
/// approved, no longer than approved), `activated_in_window` (activation inside the
/// approval's window, give or take `skew_ms`), `ended_in_time` (the end after the
/// activation and no later than activation + the approved duration + `skew_ms`), and
/// `connections_in_session` (every listed connection inside the session, the totals at
/// least what is listed).
pub fn verify_session(
    approval: &[u8],
    approval_sig: &[u8],
    manifest: &[u8],
    manifest_sig: &[u8],
    approvers: &Approvers,
    skew_ms: i64,
) -> Result<SessionReport, Failed> {
    let mut passed = Vec::new();
    let a = TunnelApproval::parse(approval).map_err(|d| fail("approval_canonical", d))?;
    passed.push("approval_canonical");
    let signer = sig::verify(approval_sig, APPROVAL_NAMESPACE, approval)
        .map_err(|d| fail("approval_signature", d.to_string()))?;
    passed.push("approval_signature");
    let pinned = approvers
        .authorize(&signer, a.not_before_ms, Scope::BreakGlass)
        .map_err(|d| fail("approval_key", d.to_string()))?;
    passed.push("approval_key");
    let m = SessionManifest::parse(manifest).map_err(|d| fail("manifest_canonical", d))?;
    passed.push("manifest_canonical");
    signed_by_appliance(manifest, manifest_sig, &a.appliance.key)
        .map_err(|d| fail("manifest_signature", d))?;
    passed.push("manifest_signature");
    if m.approval.sha256 != sha256_hex(approval) || m.approval.approval_id != a.approval_id {
        return Err(fail("approval_hash", "the manifest binds another approval"));
    }
    passed.push("approval_hash");
    let bg = &a.break_glass;
    let differs = if m.appliance != a.appliance {
        Some("appliance")
    } else if m.phase != a.phase {
        Some("phase")
    } else if m.resource != bg.resource {
        Some("resource")
    } else if m.privilege != bg.privilege {
        Some("privilege")
    } else if m.target != bg.target {
        Some("target")
    } else if m.duration_s > bg.duration_s {
        Some("duration_s")
    } else {
        None
    };
    if let Some(field) = differs {
        return Err(fail(
            "same_tunnel",
            format!("the manifest's {field} differs from the approval's"),
        ));
    }
    passed.push("same_tunnel");
    if m.activated_ms < a.not_before_ms.saturating_sub(skew_ms)
        || m.activated_ms > a.not_after_ms.saturating_add(skew_ms)
    {
        return Err(fail(
            "activated_in_window",
            format!(
                "the session was activated at {}, outside the approval's window {} to {}",
                crate::format_rfc3339_ms(m.activated_ms),
                crate::format_rfc3339_ms(a.not_before_ms),
                crate::format_rfc3339_ms(a.not_after_ms)
            ),
        ));
    }
    passed.push("activated_in_window");
    let approved_ms = i64::try_from(bg.duration_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let latest = m
        .activated_ms
        .saturating_add(approved_ms)
        .saturating_add(skew_ms);
    if m.ended_ms < m.activated_ms || m.ended_ms > latest {
        return Err(fail(
            "ended_in_time",
            format!(
                "the session ended {} ms after its activation; the approval allows {} s",
                m.ended_ms.saturating_sub(m.activated_ms),
                bg.duration_s
            ),
        ));
    }
    passed.push("ended_in_time");
    let listed = m.connections.len() as u64;
    let (to, from) = m.connections.iter().fold((0u64, 0u64), |(t, f), c| {
        (
            t.saturating_add(c.to_target_bytes),
            f.saturating_add(c.from_target_bytes),
        )
    });
    let outside = m.connections.iter().find(|c| {
        c.opened_ms < m.activated_ms
            || c.closed_ms < c.opened_ms
            || c.closed_ms > m.ended_ms.saturating_add(skew_ms)
    });
    if let Some(c) = outside {
        return Err(fail(
            "connections_in_session",
            format!("connection {} lies outside the session", c.n),
        ));
    }
    if m.connections_total < listed || m.to_target_bytes < to || m.from_target_bytes < from {
        return Err(fail(
            "connections_in_session",
            "the totals count less than the listed connections",
        ));
    }
    passed.push("connections_in_session");
    Ok(SessionReport {
        approval: a,
        manifest: m,
        key_id: pinned.id.clone(),
        passed,
    })
}

/// `manifest_sig` verifies over `manifest` (namespace [`MANIFEST_NAMESPACE`]) and was made
/// by `appliance_key` (the OpenSSH line the approval names), else why not.
fn signed_by_appliance(
    manifest: &[u8],
    manifest_sig: &[u8],
    appliance_key: &str,
) -> Result<(), String> {
    let signer =
        sig::verify(manifest_sig, MANIFEST_NAMESPACE, manifest).map_err(|d| d.to_string())?;
    let key = ssh_key::PublicKey::from_openssh(appliance_key)
        .map_err(|d| format!("the approval's appliance.key: {d}"))?;
    if signer.key.key_data() != key.key_data() {
        return Err(
            "the manifest is signed by another key than the approval's appliance.key".into(),
        );
    }
    Ok(())
}
