//! The approval document, its re-derivation and the admission check (design §1.2, §1.5).
//!
//! The signed bytes are the RFC 8785 form of [`Approval`]. The agent reads only the
//! signer's choices from the approval it received ([`Approval::approval_id`],
//! `approver`, `not_before_ms`, `not_after_ms`, `request_id`, `reason`) and puts
//! everything else in itself ([`Expected`]): the constants, its own identity and
//! manifest key, its own phase classification and the exact command it is about to run.
//! The signature is checked over **those** bytes, so any field a vendor changed makes it
//! fail.
//!
//! The rules of the fields every approval kind shares, and the signature, pinned-key and
//! window steps, are written once here and used by [`crate::tunnel`] as well.

use serde::{Deserialize, Serialize};
use tether_proto::CommandKind;

use crate::approvers::{Approvers, Scope};
use crate::canonical::{self, MAX_SAFE_INTEGER};
use crate::policy::Limits;
use crate::sig;
use crate::{sha256_hex, CommandFailure, Phase, Refusal, APPROVAL_NAMESPACE};

/// `type` of an approval.
pub const APPROVAL_TYPE: &str = "tether.approval.v1";
/// The one accepted `decision`.
pub const DECISION_APPROVE: &str = "approve";
/// The longest approval accepted.
pub const MAX_APPROVAL_LEN: usize = 16 * 1024;
/// The longest `approver`.
pub const MAX_APPROVER_LEN: usize = 128;
/// The longest `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// The longest `reason`.
pub const MAX_REASON_LEN: usize = 1024;

/// Who the approval is for: the appliance's certificate identity and manifest key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceRef {
    /// Its appliance id.
    pub id: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// Its manifest key, as an OpenSSH line without comment (`ssh-ed25519 AAAA…`).
    pub key: String,
}

/// The command, exactly as the runner would be handed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// `exec` or `shell`.
    pub kind: CommandKind,
    /// The arguments.
    pub argv: Vec<String>,
    /// Names of environment variables passed through.
    pub env_allowlist: Vec<String>,
    /// The command's deadline.
    pub deadline_ms: u64,
    /// SHA-256 (hex) of the stdin given, `""` when none.
    pub stdin_sha256: String,
}

/// An approval document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// [`APPROVAL_TYPE`].
    #[serde(rename = "type")]
    pub doc_type: String,
    /// 32 lowercase hex characters, chosen when the document is made; what single use
    /// is keyed on.
    pub approval_id: String,
    /// The customer's label for who approved.
    pub approver: String,
    /// [`DECISION_APPROVE`].
    pub decision: String,
    /// Valid from (agent's clock, ms since the epoch).
    pub not_before_ms: i64,
    /// Valid until.
    pub not_after_ms: i64,
    /// The vendor's request id.
    pub request_id: String,
    /// Why (ticket, incident).
    pub reason: String,
    /// For which appliance.
    pub appliance: ApplianceRef,
    /// In which phase the appliance classifies the command.
    pub phase: Phase,
    /// The command.
    pub exec: ExecSpec,
}

/// What the agent itself knows about the command it is about to run.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// Its own identity and manifest key.
    pub appliance: &'a ApplianceRef,
    /// Its own classification.
    pub phase: Phase,
    /// The command as it will be run.
    pub exec: &'a ExecSpec,
}

/// An approval that passed every check but single use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Its id.
    pub approval_id: String,
    /// Its approver label.
    pub approver: String,
    /// End of its window.
    pub not_after_ms: i64,
    /// SHA-256 (hex) of the re-derived bytes that verified (the manifest binds it).
    pub sha256: String,
    /// `SHA256:…` of the customer key that signed.
    pub signer: String,
    /// That key's label in `approvers.toml`.
    pub key_id: String,
}

/// 128 random bits as 32 lowercase hex characters: a fresh approval id.
pub fn new_approval_id() -> String {
    use ssh_key::rand_core::{OsRng, RngCore};
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

impl Approval {
    /// A complete document for `expected` (what `tether exec --plan` writes for the
    /// customer to read and sign): a fresh id, the window `[now, now + valid)`.
    pub fn plan(
        expected: &Expected<'_>,
        request_id: &str,
        reason: &str,
        approver: &str,
        not_before_ms: i64,
        not_after_ms: i64,
    ) -> Approval {
        Approval {
            doc_type: APPROVAL_TYPE.into(),
            approval_id: new_approval_id(),
            approver: approver.into(),
            decision: DECISION_APPROVE.into(),
            not_before_ms,
            not_after_ms,
            request_id: request_id.into(),
            reason: reason.into(),
            appliance: expected.appliance.clone(),
            phase: expected.phase,
            exec: expected.exec.clone(),
        }
    }

    /// Parse `bytes` strictly (canonical, schema, sizes, constants).
    pub fn parse(bytes: &[u8]) -> Result<Approval, String> {
        let a: Approval = canonical::parse(bytes, MAX_APPROVAL_LEN).map_err(|e| e.to_string())?;
        a.check_fields()?;
        Ok(a)
    }

    /// The field rules that do not depend on the agent.
    pub fn check_fields(&self) -> Result<(), String> {
        self.header().check()?;
        if u64::try_from(MAX_SAFE_INTEGER).is_ok_and(|max| self.exec.deadline_ms > max) {
            return Err("exec.deadline_ms must be below 2^53".into());
        }
        Ok(())
    }

    /// The fields every approval kind shares.
    pub(crate) fn header(&self) -> Header<'_> {
        Header {
            doc_type: &self.doc_type,
            approval_id: &self.approval_id,
            approver: &self.approver,
            decision: &self.decision,
            not_before_ms: self.not_before_ms,
            not_after_ms: self.not_after_ms,
            request_id: &self.request_id,
            reason: &self.reason,
        }
    }

    /// The document the agent expects: the signer's choices copied from `self`,
    /// everything else from `expected` and the constants.
    pub fn derive(&self, expected: &Expected<'_>) -> Approval {
        Approval {
            doc_type: APPROVAL_TYPE.into(),
            approval_id: self.approval_id.clone(),
            approver: self.approver.clone(),
            decision: DECISION_APPROVE.into(),
            not_before_ms: self.not_before_ms,
            not_after_ms: self.not_after_ms,
            request_id: self.request_id.clone(),
            reason: self.reason.clone(),
            appliance: expected.appliance.clone(),
            phase: expected.phase,
            exec: expected.exec.clone(),
        }
    }

    /// The canonical bytes (what is signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Only strings, bounded integers and arrays of strings: encoding cannot fail.
        canonical::encode(self).unwrap_or_default()
    }
}

pub(crate) fn invalid(detail: impl Into<String>) -> Refusal {
    Refusal::new(CommandFailure::ApprovalInvalid, detail)
}

/// The fields every approval kind shares (`type`, id, approver, decision, window,
/// request id, reason), borrowed from an exec or a break-glass document.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header<'a> {
    pub(crate) doc_type: &'a str,
    pub(crate) approval_id: &'a str,
    pub(crate) approver: &'a str,
    pub(crate) decision: &'a str,
    pub(crate) not_before_ms: i64,
    pub(crate) not_after_ms: i64,
    pub(crate) request_id: &'a str,
    pub(crate) reason: &'a str,
}

impl Header<'_> {
    /// The rules of the shared fields that do not depend on the agent: the constants,
    /// the id's form, the lengths, times below 2^53.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.doc_type != APPROVAL_TYPE {
            return Err(format!(
                "type is {:?}, not {APPROVAL_TYPE:?}",
                self.doc_type
            ));
        }
        if self.decision != DECISION_APPROVE {
            return Err(format!(
                "decision is {:?}, not {DECISION_APPROVE:?}",
                self.decision
            ));
        }
        if self.approval_id.len() != 32
            || !self
                .approval_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("approval_id must be 32 lowercase hex characters".into());
        }
        if self.approver.is_empty() || self.approver.len() > MAX_APPROVER_LEN {
            return Err(format!("approver must be 1 to {MAX_APPROVER_LEN} bytes"));
        }
        if self.request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(format!(
                "request_id is longer than {MAX_REQUEST_ID_LEN} bytes"
            ));
        }
        if self.reason.len() > MAX_REASON_LEN {
            return Err(format!("reason is longer than {MAX_REASON_LEN} bytes"));
        }
        for t in [self.not_before_ms, self.not_after_ms] {
            if !(0..=MAX_SAFE_INTEGER).contains(&t) {
                return Err("times must be between 0 and 2^53 ms".into());
            }
        }
        Ok(())
    }
}

/// Design §1.5 steps 5 and 6 for any approval kind, once the agent has re-derived the
/// document: verify `sig` over the re-derived bytes `derived` (whose shared fields are
/// `header`) under a key `approvers` pins for `scope` at `now_ms`, then the window on
/// the agent's clock. `received` are the bytes that came; `explain` names the first
/// field where they differ from what this appliance would accept (only for the text).
#[allow(clippy::too_many_arguments)]
pub(crate) fn admit(
    received: &[u8],
    derived: &[u8],
    header: &Header<'_>,
    sig: &[u8],
    explain: impl FnOnce() -> &'static str,
    approvers: &Approvers,
    scope: Scope,
    limits: &Limits,
    now_ms: i64,
) -> Result<Verified, Refusal> {
    let signer = sig::verify(sig, APPROVAL_NAMESPACE, derived).map_err(|e| {
        invalid(if derived != received {
            format!(
                "{e} (the approval differs from what this appliance would accept: {})",
                explain()
            )
        } else {
            e.to_string()
        })
    })?;
    let pinned = approvers
        .authorize(&signer, now_ms, scope)
        .map_err(|e| invalid(e.to_string()))?;
    check_window(header.not_before_ms, header.not_after_ms, limits, now_ms)?;
    Ok(Verified {
        approval_id: header.approval_id.to_owned(),
        approver: header.approver.to_owned(),
        not_after_ms: header.not_after_ms,
        sha256: sha256_hex(derived),
        signer: signer.fingerprint(),
        key_id: pinned.id.clone(),
    })
}

/// Design §1.5 step 6: the window no longer than the policy's `max_approval_validity`
/// (`approval_too_long`), and the agent's own clock inside it give or take the policy's
/// skew (`approval_expired`).
pub(crate) fn check_window(
    not_before_ms: i64,
    not_after_ms: i64,
    limits: &Limits,
    now_ms: i64,
) -> Result<(), Refusal> {
    let skew = i64::try_from(limits.clock_skew.as_millis()).unwrap_or(i64::MAX);
    let max = i64::try_from(limits.max_approval_validity.as_millis()).unwrap_or(i64::MAX);
    if not_after_ms < not_before_ms || not_after_ms - not_before_ms > max {
        return Err(Refusal::new(
            CommandFailure::ApprovalTooLong,
            format!(
                "the approval is valid for {} ms; the customer policy allows at most {max} ms",
                not_after_ms - not_before_ms
            ),
        ));
    }
    if now_ms < not_before_ms.saturating_sub(skew) || now_ms > not_after_ms.saturating_add(skew) {
        return Err(Refusal::new(
            CommandFailure::ApprovalExpired,
            format!(
                "the approval is valid {} to {}; this appliance's clock says {}",
                crate::format_rfc3339_ms(not_before_ms),
                crate::format_rfc3339_ms(not_after_ms),
                crate::format_rfc3339_ms(now_ms)
            ),
        ));
    }
    Ok(())
}

/// The admission check of design §1.5 steps 3 to 6 (deny rules and classification come
/// before, single use and privilege after): parse `approval` strictly, re-derive it from
/// `expected`, verify `sig` over the re-derived bytes under a key `approvers` pins for
/// `now_ms`, then the window on the agent's clock. The first failure is the answer.
pub fn check(
    approval: &[u8],
    sig: &[u8],
    expected: &Expected<'_>,
    approvers: &Approvers,
    limits: &Limits,
    now_ms: i64,
) -> Result<Verified, Refusal> {
    let received = Approval::parse(approval).map_err(|e| invalid(format!("approval: {e}")))?;
    let derived = received.derive(expected);
    admit(
        approval,
        &derived.to_bytes(),
        &derived.header(),
        sig,
        || first_difference(&received, &derived),
        approvers,
        Scope::Exec,
        limits,
        now_ms,
    )
}

/// The first field the vendor's document has that this appliance would not run, for the
/// refusal's text (the signature decides; this only explains).
fn first_difference(received: &Approval, derived: &Approval) -> &'static str {
    if received.appliance.id != derived.appliance.id
        || received.appliance.trust_domain != derived.appliance.trust_domain
    {
        "appliance"
    } else if received.appliance.key != derived.appliance.key {
        "appliance.key"
    } else if received.phase != derived.phase {
        "phase"
    } else if received.exec.kind != derived.exec.kind {
        "exec.kind"
    } else if received.exec.argv != derived.exec.argv {
        "exec.argv"
    } else if received.exec.env_allowlist != derived.exec.env_allowlist {
        "exec.env_allowlist"
    } else if received.exec.deadline_ms != derived.exec.deadline_ms {
        "exec.deadline_ms"
    } else if received.exec.stdin_sha256 != derived.exec.stdin_sha256 {
        "exec.stdin_sha256"
    } else {
        "the encoding"
    }
}
