//! Break-glass admission on the appliance (customer-trust design §3): a `TunnelOpen` is
//! decided like a signed command. The agent resolves the resource, its target, phase and
//! credential commands from the customer's own policy, re-derives the approval from
//! that, verifies the customer's signature over those bytes (`tether_ops::tunnel`),
//! records the approval as used, and caps the session's length by the policy. While the
//! session lives, [`SignedOps::tunnel_allowed`] re-asks the customer's current files.

use tether_audit::AuditEvent;
use tether_ops::session::SessionManifest;
use tether_ops::tunnel::{self, TunnelApproval, TunnelExpected, TunnelRequest, TunnelVerified};
use tether_ops::{CommandFailure, Phase, Refusal};
use tether_proto::TunnelOpen;

use super::applog::{action, agent_actor};
use super::{now_ms, SignedOps, PLAN_APPROVER, PLAN_VALIDITY_MS};

/// Next to the appliance audit log: session manifests too long for a log entry.
pub const SESSION_MANIFEST_DIR: &str = "session-manifests";

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

    /// How long a tunnel session may outlive the appliance's last broker session: the
    /// customer's `limits.teardown_on_disconnect_after` (its default when the policy is
    /// unusable: then the session ends as not allowed anyway).
    pub fn teardown_on_disconnect_after(&self) -> std::time::Duration {
        let (loaded, _) = self.customer.current();
        loaded
            .policy
            .as_ref()
            .map_or(tether_ops::policy::DEFAULT_TEARDOWN_AFTER, |p| {
                p.limits.teardown_on_disconnect_after
            })
    }

    /// This appliance as documents name it (id, trust domain, manifest key).
    pub fn appliance(&self) -> &tether_ops::approval::ApplianceRef {
        &self.appliance
    }

    /// Sign a session's manifest with the appliance's manifest key and append it to the
    /// appliance audit log (`session.manifest`, with a checkpoint). A manifest too long
    /// for a log entry is written next to the log (`session-manifests/ID.json` and
    /// `.json.sig`) and the entry names the file. Returns its bytes and signature; `None`
    /// if it could not be signed (the agent's log says why).
    pub fn log_session_manifest(
        &self,
        request_id: &str,
        session_id: u64,
        manifest: &SessionManifest,
    ) -> Option<(Vec<u8>, String)> {
        let (bytes, sig) = match manifest.sign(&self.key) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(session_id, error = %e, "cannot sign the session manifest");
                return None;
            }
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let entry = |inline: Option<String>, file: Option<String>| {
            let mut e = AuditEvent::success(
                agent_actor(&self.appliance.id),
                action::SESSION_MANIFEST,
                request_id,
            )
            .with("session_id", session_id.to_string())
            .with("sha256", tether_ops::sha256_hex(&bytes))
            .with("sig", sig.clone());
            if let Some(m) = inline {
                e.set("manifest", m);
            }
            if let Some(f) = file {
                e.set("file", f);
            }
            e
        };
        let mut st = self.state();
        let Ok(log) = &mut st.log else {
            tracing::error!(
                session_id,
                "cannot log the session manifest: the audit log is unusable"
            );
            return Some((bytes, sig));
        };
        let cp = super::checkpoint(&self.key, log);
        let with_cp = |mut e: AuditEvent| {
            if let Some(cp) = &cp {
                e.set("checkpoint", cp.clone());
            }
            e
        };
        let mut event = with_cp(entry(Some(text), None));
        if event.validate().is_err() {
            let dir = self.audit_log.with_file_name(SESSION_MANIFEST_DIR);
            let file = dir.join(format!("{session_id}.json"));
            let written = std::fs::create_dir_all(&dir)
                .and_then(|()| tether_identity::fs::write_atomic(&file, &bytes, 0o640))
                .and_then(|()| {
                    tether_identity::fs::write_atomic(
                        &tether_ops::sig::sig_path(&file),
                        sig.as_bytes(),
                        0o640,
                    )
                });
            if let Err(e) = written {
                tracing::error!(session_id, error = %e, "cannot write the session manifest");
            }
            event = with_cp(entry(None, Some(file.display().to_string())));
        }
        if let Err(e) = log.append(&event) {
            tracing::error!(session_id, error = %e, "cannot log the session manifest");
        }
        Some((bytes, sig))
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
