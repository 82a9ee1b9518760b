//! Break glass (design §3): the customer-approved tunnel's approval document, its
//! re-derivation and the admission check.
//!
//! The document is the exec approval's twin: the same `type`, header fields, appliance,
//! phase and SSHSIG namespace ([`crate::APPROVAL_NAMESPACE`]), but a `break_glass`
//! object instead of `exec`. Both types refuse unknown fields, so neither kind of
//! approval ever parses as the other.
//!
//! The vendor names only what `TunnelOpen` carries ([`TunnelRequest`]): a resource and a
//! privilege **by name**, the duration, the connection limit, the idle timeout and the
//! operator's one-time recipient. The agent puts in everything else from its own view
//! ([`TunnelExpected::resolve`]): its identity and manifest key, the resource's phase,
//! its `target` and the privilege's `mint`/`revoke` commands from the customer's
//! `policy.toml`, and the constant network. From the approval it received it copies only
//! the signer's choices (id, approver, window, request id, reason). The signature is
//! checked over **those** bytes: a vendor who proposed another target, a minting command
//! of its own, a longer session, more connections or its own recipient (to have the
//! credential sealed to itself) has changed the bytes, and the check fails.
//!
//! Refusals reuse the signed-operations codes ([`CommandFailure`]): an undeclared
//! resource or privilege, or more connections than `limits.max_connections`, is
//! `denied_by_policy`; a closed phase (or one that needs no approvals) is
//! `phase_disabled`; a malformed request (zero duration, an idle timeout of zero or
//! longer than the session, a recipient without a credential to seal or none where one
//! is minted) is `invalid`; everything about the document and its signature is
//! `approval_invalid`, `approval_expired` or `approval_too_long` as for commands.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::approval::{
    admit, invalid, new_approval_id, ApplianceRef, Header, Verified, APPROVAL_TYPE,
    DECISION_APPROVE, MAX_APPROVAL_LEN,
};
use crate::approvers::{Approvers, Scope};
use crate::canonical::{self, MAX_SAFE_INTEGER};
use crate::policy::{
    check_credential_command, valid_name, ApprovalMode, Policy, Target, MAX_NAME_LEN,
};
use crate::{CommandFailure, Phase, Refusal};

/// `break_glass.network`: the appliance's own outbound QUIC connection, the only
/// provider in v1 (bound anyway, so another cannot be substituted).
pub const NETWORK_TETHER_TUNNEL: &str = "tether-tunnel";
/// The longest `break_glass.recipient`.
pub const MAX_RECIPIENT_LEN: usize = 512;

/// A mint or revoke command, exactly as the customer's policy declares it
/// (`{ argv = [...], deadline_ms = N }`) and the approval carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialCommand {
    /// The arguments (`{duration_s}`, `{credential_id}` are the agent's to substitute).
    pub argv: Vec<String>,
    /// Its deadline.
    pub deadline_ms: u64,
}

/// How the session's ephemeral credential is made and removed (the privilege's policy
/// entry); `null` in the document when the privilege has neither.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Its stdout is the credential; `null` when the policy has none.
    pub mint: Option<CredentialCommand>,
    /// Run at teardown; `null` when the policy has none.
    pub revoke: Option<CredentialCommand>,
}

/// The tunnel, as the appliance will open it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassSpec {
    /// The resource's name in the customer policy.
    pub resource: String,
    /// The privilege's name under that resource.
    pub privilege: String,
    /// `host:port` from the customer policy.
    pub target: String,
    /// Session length from activation, in seconds (capped by the policy).
    pub duration_s: u64,
    /// The most TCP connections at once.
    pub max_connections: u32,
    /// Per-connection idle timeout, in seconds.
    pub idle_timeout_s: u64,
    /// [`NETWORK_TETHER_TUNNEL`].
    pub network: String,
    /// The operator's one-time public key the credential is sealed to (`age1…`); `""`
    /// when nothing is minted.
    pub recipient: String,
    /// The privilege's mint and revoke commands from the customer policy.
    pub credential: Option<Credential>,
}

impl BreakGlassSpec {
    /// The rules that do not depend on the agent: names, target form, durations,
    /// limits, network, recipient (present exactly when a credential is minted), and the
    /// credential commands.
    pub fn check(&self) -> Result<(), String> {
        for (what, name) in [("resource", &self.resource), ("privilege", &self.privilege)] {
            if !valid_name(name) {
                return Err(format!(
                    "break_glass.{what} must be 1 to {MAX_NAME_LEN} of a-z, 0-9, _ and -"
                ));
            }
        }
        Target::parse(&self.target).map_err(|e| format!("break_glass.target: {e}"))?;
        let max = u64::try_from(MAX_SAFE_INTEGER).unwrap_or(u64::MAX);
        if !(1..=max).contains(&self.duration_s) {
            return Err("break_glass.duration_s must be at least 1 (and below 2^53)".into());
        }
        if self.max_connections == 0 {
            return Err("break_glass.max_connections must be at least 1".into());
        }
        if !(1..=self.duration_s).contains(&self.idle_timeout_s) {
            return Err(
                "break_glass.idle_timeout_s must be at least 1 and at most duration_s".into(),
            );
        }
        if self.network != NETWORK_TETHER_TUNNEL {
            return Err(format!(
                "break_glass.network is {:?}, not {NETWORK_TETHER_TUNNEL:?}",
                self.network
            ));
        }
        if self.recipient.len() > MAX_RECIPIENT_LEN
            || !self.recipient.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "break_glass.recipient must be at most {MAX_RECIPIENT_LEN} printable ASCII characters without spaces"
            ));
        }
        let mints = self.credential.as_ref().is_some_and(|c| c.mint.is_some());
        if mints && self.recipient.is_empty() {
            return Err(
                "break_glass.recipient is empty, and the privilege mints a credential to seal to it"
                    .into(),
            );
        }
        if !mints && !self.recipient.is_empty() {
            return Err(
                "break_glass.recipient must be empty: the privilege mints no credential".into(),
            );
        }
        if let Some(c) = &self.credential {
            if c.mint.is_none() && c.revoke.is_none() {
                return Err("break_glass.credential without mint or revoke must be null".into());
            }
            for (what, cmd) in [("mint", &c.mint), ("revoke", &c.revoke)] {
                if let Some(cmd) = cmd {
                    check_credential_command(cmd)
                        .map_err(|e| format!("break_glass.credential.{what}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

/// A break-glass approval document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelApproval {
    /// [`APPROVAL_TYPE`].
    #[serde(rename = "type")]
    pub doc_type: String,
    /// 32 lowercase hex characters; what single use is keyed on.
    pub approval_id: String,
    /// The customer's label for who approved.
    pub approver: String,
    /// [`DECISION_APPROVE`].
    pub decision: String,
    /// The session may be activated from (agent's clock, ms since the epoch).
    pub not_before_ms: i64,
    /// The session may be activated until.
    pub not_after_ms: i64,
    /// The vendor's request id.
    pub request_id: String,
    /// Why (ticket, incident).
    pub reason: String,
    /// For which appliance.
    pub appliance: ApplianceRef,
    /// The resource's phase in the appliance's policy.
    pub phase: Phase,
    /// The tunnel.
    pub break_glass: BreakGlassSpec,
}

/// What the vendor asks for (`TunnelOpen`): names and numbers, nothing the agent would
/// take as a target or a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelRequest<'a> {
    /// The resource's name.
    pub resource: &'a str,
    /// The privilege's name.
    pub privilege: &'a str,
    /// Session length asked for, in seconds.
    pub duration_s: u64,
    /// Connections asked for.
    pub max_connections: u32,
    /// Per-connection idle timeout, in seconds.
    pub idle_timeout_s: u64,
    /// The operator's one-time recipient (`""` when nothing is minted).
    pub recipient: &'a str,
}

/// The agent's own view of a requested tunnel: its identity, and the phase, target and
/// credential commands its policy declares for the resource and privilege.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelExpected<'a> {
    /// Its own identity and manifest key.
    pub appliance: &'a ApplianceRef,
    /// The resource's phase.
    pub phase: Phase,
    /// The tunnel: the request's names and numbers, the policy's target and credential.
    pub break_glass: BreakGlassSpec,
    /// The Unix user of the phase (what mint and revoke run as).
    pub run_as: String,
}

impl<'a> TunnelExpected<'a> {
    /// Resolve `request` under the agent's own `policy` at `now_ms`: the resource and
    /// privilege must be declared (`denied_by_policy`), the resource's phase open and
    /// requiring approvals (`phase_disabled`), the request well formed (`invalid`) and
    /// within `limits.max_connections` (`denied_by_policy`).
    pub fn resolve(
        appliance: &'a ApplianceRef,
        policy: &Policy,
        request: &TunnelRequest<'_>,
        now_ms: i64,
    ) -> Result<TunnelExpected<'a>, Refusal> {
        let resource = policy.resource(request.resource).ok_or_else(|| {
            Refusal::new(
                CommandFailure::DeniedByPolicy,
                format!(
                    "the customer policy declares no break-glass resource {:?}",
                    request.resource
                ),
            )
        })?;
        let privilege = resource.privileges.get(request.privilege).ok_or_else(|| {
            Refusal::new(
                CommandFailure::DeniedByPolicy,
                format!(
                    "the customer policy declares no privilege {:?} for resource {:?}",
                    request.privilege, resource.name
                ),
            )
        })?;
        let phase = resource.phase;
        let rule = match policy.phase(phase) {
            Some(rule) if policy.is_open(phase, now_ms) => rule,
            _ => {
                return Err(Refusal::new(
                    CommandFailure::PhaseDisabled,
                    format!(
                        "the customer policy has phase {phase} (of resource {:?}) disabled",
                        resource.name
                    ),
                ))
            }
        };
        if rule.approval != ApprovalMode::Required {
            return Err(Refusal::new(
                CommandFailure::PhaseDisabled,
                format!(
                    "break glass always needs an approval, and the customer policy's phase {phase} (of resource {:?}) has approval = \"none\"",
                    resource.name
                ),
            ));
        }
        let credential =
            (privilege.mint.is_some() || privilege.revoke.is_some()).then(|| Credential {
                mint: privilege.mint.clone(),
                revoke: privilege.revoke.clone(),
            });
        let break_glass = BreakGlassSpec {
            resource: resource.name.clone(),
            privilege: request.privilege.to_owned(),
            target: resource.target.as_str().to_owned(),
            duration_s: request.duration_s,
            max_connections: request.max_connections,
            idle_timeout_s: request.idle_timeout_s,
            network: NETWORK_TETHER_TUNNEL.to_owned(),
            recipient: request.recipient.to_owned(),
            credential,
        };
        break_glass
            .check()
            .map_err(|e| Refusal::new(CommandFailure::Invalid, e))?;
        if break_glass.max_connections > policy.limits.max_connections {
            return Err(Refusal::new(
                CommandFailure::DeniedByPolicy,
                format!(
                    "{} connections asked for; the customer policy allows at most {} (limits.max_connections)",
                    break_glass.max_connections, policy.limits.max_connections
                ),
            ));
        }
        Ok(TunnelExpected {
            appliance,
            phase,
            break_glass,
            run_as: rule.run_as.clone(),
        })
    }
}

/// A break-glass approval that passed every check but single use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelVerified {
    /// Id, approver, window end, digest of the re-derived bytes and signer, as for
    /// commands (single use and the manifest take them from here).
    pub approval: Verified,
    /// The tunnel as verified: the policy's target and credential commands.
    pub break_glass: BreakGlassSpec,
    /// The resource's phase.
    pub phase: Phase,
    /// The phase's Unix user (mint and revoke run as it).
    pub run_as: String,
    /// The session length from activation: `duration_s`, capped by the policy's
    /// `limits.max_break_glass_duration`.
    pub duration: Duration,
    /// Whether the policy's cap shortened it.
    pub capped: bool,
}

impl TunnelApproval {
    /// A complete document for `expected` (what `tether tunnel request` writes for the
    /// customer to read and sign): a fresh id, the activation window given.
    pub fn plan(
        expected: &TunnelExpected<'_>,
        request_id: &str,
        reason: &str,
        approver: &str,
        not_before_ms: i64,
        not_after_ms: i64,
    ) -> TunnelApproval {
        TunnelApproval {
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
            break_glass: expected.break_glass.clone(),
        }
    }

    /// Parse `bytes` strictly (canonical, schema, sizes, constants).
    pub fn parse(bytes: &[u8]) -> Result<TunnelApproval, String> {
        let a: TunnelApproval =
            canonical::parse(bytes, MAX_APPROVAL_LEN).map_err(|e| e.to_string())?;
        a.check_fields()?;
        Ok(a)
    }

    /// The field rules that do not depend on the agent.
    pub fn check_fields(&self) -> Result<(), String> {
        self.header().check()?;
        self.break_glass.check()
    }

    fn header(&self) -> Header<'_> {
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
    pub fn derive(&self, expected: &TunnelExpected<'_>) -> TunnelApproval {
        TunnelApproval {
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
            break_glass: expected.break_glass.clone(),
        }
    }

    /// The canonical bytes (what is signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Only strings, bounded integers, arrays and nulls: encoding cannot fail.
        canonical::encode(self).unwrap_or_default()
    }
}

/// The break-glass admission check (design §1.5 for `TunnelOpen`; single use, target
/// resolution and minting come after): resolve `request` under the agent's own `policy`
/// ([`TunnelExpected::resolve`]), parse `approval` strictly, re-derive it, verify `sig`
/// over the re-derived bytes under a key `approvers` pins for break glass at `now_ms`,
/// check the window on the agent's clock, and cap the session at the policy's
/// `max_break_glass_duration`. The first failure is the answer.
pub fn check(
    approval: &[u8],
    sig: &[u8],
    request: &TunnelRequest<'_>,
    appliance: &ApplianceRef,
    policy: &Policy,
    approvers: &Approvers,
    now_ms: i64,
) -> Result<TunnelVerified, Refusal> {
    let expected = TunnelExpected::resolve(appliance, policy, request, now_ms)?;
    let received =
        TunnelApproval::parse(approval).map_err(|e| invalid(format!("approval: {e}")))?;
    let derived = received.derive(&expected);
    let verified = admit(
        approval,
        &derived.to_bytes(),
        &derived.header(),
        sig,
        || first_difference(&received, &derived),
        approvers,
        Scope::BreakGlass,
        &policy.limits,
        now_ms,
    )?;
    let asked = Duration::from_secs(derived.break_glass.duration_s);
    let cap = policy.limits.max_break_glass_duration;
    Ok(TunnelVerified {
        approval: verified,
        break_glass: derived.break_glass,
        phase: derived.phase,
        run_as: expected.run_as,
        duration: asked.min(cap),
        capped: asked > cap,
    })
}

/// The first field the vendor's document has that this appliance would not accept, for
/// the refusal's text (the signature decides; this only explains).
fn first_difference(received: &TunnelApproval, derived: &TunnelApproval) -> &'static str {
    let (r, d) = (&received.break_glass, &derived.break_glass);
    if received.appliance.id != derived.appliance.id
        || received.appliance.trust_domain != derived.appliance.trust_domain
    {
        "appliance"
    } else if received.appliance.key != derived.appliance.key {
        "appliance.key"
    } else if received.phase != derived.phase {
        "phase"
    } else if r.resource != d.resource {
        "break_glass.resource"
    } else if r.privilege != d.privilege {
        "break_glass.privilege"
    } else if r.target != d.target {
        "break_glass.target"
    } else if r.credential != d.credential {
        "break_glass.credential"
    } else if r.duration_s != d.duration_s {
        "break_glass.duration_s"
    } else if r.max_connections != d.max_connections {
        "break_glass.max_connections"
    } else if r.idle_timeout_s != d.idle_timeout_s {
        "break_glass.idle_timeout_s"
    } else if r.recipient != d.recipient {
        "break_glass.recipient"
    } else if r.network != d.network {
        "break_glass.network"
    } else {
        "the encoding"
    }
}
