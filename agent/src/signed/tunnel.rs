//! Break-glass admission on the appliance (customer-trust design §3): a `TunnelOpen` is
//! decided like a signed command. The agent resolves the resource, its target, phase and
//! credential commands from the customer's own policy, re-derives the approval from
//! that, verifies the customer's signature over those bytes (`tether_ops::tunnel`),
//! records the approval as used, and caps the session's length by the policy. While the
//! session lives, [`SignedOps::tunnel_allowed`] re-asks the customer's current files.

use tether_audit::AuditEvent;
use tether_ops::tunnel::{self, TunnelApproval, TunnelExpected, TunnelRequest, TunnelVerified};
use tether_ops::{CommandFailure, Phase, Refusal};
use tether_proto::TunnelOpen;

use super::applog::{action, agent_actor};
use super::{now_ms, SignedOps, PLAN_APPROVER, PLAN_VALIDITY_MS};

/// What the agent decided about a `TunnelOpen`.
#[derive(Debug)]
pub enum TunnelDecision {
    /// Open it: verified and recorded as used.
    Open(Box<TunnelVerified>),
    /// A plan was asked: the document to sign.
    Plan(Vec<u8>),
}

fn request(open: &TunnelOpen) -> TunnelRequest<'_> {
    TunnelRequest {
        resource: &open.resource,
        privilege: &open.privilege,
        duration_s: u64::from(open.duration_s),
        max_connections: u32::from(open.max_connections),
        idle_timeout_s: u64::from(open.idle_timeout_s),
        recipient: &open.recipient,
    }
}

impl SignedOps {
    /// Decide `open`: its plan, or the verified approval (recorded as used, fsynced,
    /// before this returns). Every refusal is logged in the appliance audit log.
    pub fn admit_tunnel(&self, open: &TunnelOpen) -> Result<TunnelDecision, Refusal> {
        self.record(
            AuditEvent::success(
                agent_actor(&self.appliance.id),
                action::TUNNEL_REQUESTED,
                &open.request_id,
            )
            .with("resource", open.resource.clone())
            .with("privilege", open.privilege.clone())
            .with("duration_s", i64::from(open.duration_s))
            .with("plan", open.plan_only),
        )?;
        let decided = self.decide_tunnel(open);
        if let Err(r) = &decided {
            let _ = self.record(
                AuditEvent::refused(
                    agent_actor(&self.appliance.id),
                    action::TUNNEL_REFUSED,
                    &open.request_id,
                    r.code.name(),
                )
                .with("detail", tether_audit::clip(&r.detail, 512)),
            );
        }
        decided
    }

    fn decide_tunnel(&self, open: &TunnelOpen) -> Result<TunnelDecision, Refusal> {
        let now = now_ms();
        let (loaded, reread) = self.customer.current();
        if reread {
            self.log_loaded(&loaded);
        }
        let policy = match &loaded.policy {
            Ok(p) => p.clone(),
            Err(e) => return Err(Refusal::new(CommandFailure::PolicyUnavailable, e.clone())),
        };
        let req = request(open);
        if open.plan_only {
            let expected = TunnelExpected::resolve(&self.appliance, &policy, &req, now)?;
            let doc = TunnelApproval::plan(
                &expected,
                &open.request_id,
                &open.reason,
                PLAN_APPROVER,
                now,
                now + PLAN_VALIDITY_MS,
            );
            return Ok(TunnelDecision::Plan(doc.to_bytes()));
        }
        if open.approval.is_empty() {
            return Err(Refusal::new(
                CommandFailure::ApprovalRequired,
                "a break-glass tunnel always needs the customer's approval",
            ));
        }
        let approvers = match &loaded.approvers {
            Ok(a) => a.clone(),
            Err(e) => return Err(Refusal::new(CommandFailure::ApprovalUnavailable, e.clone())),
        };
        let verified = tunnel::check(
            &open.approval,
            &open.approval_sig,
            &req,
            &self.appliance,
            &policy,
            &approvers,
            now,
        )?;
        self.consume(&verified.approval, &open.request_id, &policy, now)?;
        Ok(TunnelDecision::Open(Box::new(verified)))
    }

    /// Whether the customer's files in force (re-read if they changed) still allow a
    /// session of `resource`/`privilege` in `phase`: the phase open, the resource and the
    /// privilege still declared.
    pub fn tunnel_allowed(&self, resource: &str, privilege: &str, phase: Phase) -> bool {
        let (loaded, reread) = self.customer.current();
        if reread {
            self.log_loaded(&loaded);
        }
        loaded.policy.as_ref().is_ok_and(|p| {
            p.is_open(phase, now_ms())
                && p.resource(resource)
                    .is_some_and(|r| r.phase == phase && r.privileges.contains_key(privilege))
        })
    }

    /// The most tunnel sessions the customer's policy allows at once (none when the
    /// policy is unusable: then nothing opens anyway).
    pub fn max_tunnel_sessions(&self) -> usize {
        let (loaded, _) = self.customer.current();
        loaded
            .policy
            .as_ref()
            .map_or(0, |p| p.limits.max_tunnel_sessions as usize)
    }

    /// The user a session's credential commands run as: the phase's `run_as`, switched to
    /// as for commands (or the agent's own under `allow_same_uid`).
    pub fn credential_user(&self, run_as: &str) -> Result<super::RunUser, Refusal> {
        let (loaded, _) = self.customer.current();
        let allow_same_uid = loaded.policy.as_ref().is_ok_and(|p| p.allow_same_uid);
        super::run_user(run_as, allow_same_uid, self.agent_uid)
    }

    /// Append a tunnel event to the appliance audit log (`audit_unavailable` when it
    /// cannot be written: the activation fails closed on it; other events are logged
    /// best effort).
    pub fn log_tunnel(
        &self,
        event: &str,
        request_id: &str,
        details: &[(&str, String)],
    ) -> Result<(), Refusal> {
        let mut e = AuditEvent::success(agent_actor(&self.appliance.id), event, request_id);
        for (k, v) in details {
            e = e.with(k, v.clone());
        }
        self.record(e).inspect_err(|r| {
            tracing::error!(event, error = %r.detail, "cannot log a tunnel event");
        })
    }
}
