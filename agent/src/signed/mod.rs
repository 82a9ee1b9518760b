//! Signed operations on the appliance: the agent, not the vendor, decides what runs.
//!
//! With a customer directory (`tether-agent run --customer-dir DIR`) every command goes
//! through [`SignedOps::admit`] before anything is spawned, in the order of the
//! customer-trust design §1.5:
//!
//! 1. the customer files in force (re-`stat`ed now; a broken policy refuses everything);
//! 2. the program resolved on the agent's own `PATH` and canonicalised — the path that
//!    rules match is the path that runs;
//! 3. deny rules, classification into a phase, the phase open (`tether_ops::policy`);
//! 4. if the phase needs one (or one is attached), the approval re-derived from what the
//!    agent knows and verified under a pinned key, its window on the agent's own clock,
//!    and single use (`tether_ops::approval`, `tether_ops::ledger`);
//! 5. the user the phase runs as (never silently the agent's own: only where the policy
//!    says `allow_same_uid`, reported as `privsep=off`);
//! 6. `approval.consumed` appended and `fsync`ed to the appliance audit log — only then
//!    does the command start.
//!
//! Every command, refusals included, ends with a manifest signed by the appliance's
//! manifest key, appended to the log and (to a broker that speaks `signed-ops/1`) sent
//! before the result. While a command runs, its phase is re-checked four times a second:
//! closed by the customer, the command is killed with `phase_revoked`.

pub mod applog;
pub mod customer;
pub mod lockdown;
pub mod spool;
pub mod tunnel;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tether_audit::AuditEvent;
use tether_ops::approval::{self, ApplianceRef, Approval, ExecSpec, Expected};
use tether_ops::ledger::Ledger;
use tether_ops::manifest::{self, Manifest, Outcome, Program, RunAs, StreamDigest, MANIFEST_TYPE};
use tether_ops::policy;
use tether_ops::ssh_key::PrivateKey;
use tether_ops::{CommandFailure, Phase, Refusal};
use tether_proto::{CommandKind, CommandRequest};

use self::applog::{action, agent_actor, AppLog};
use self::customer::{CustomerFiles, Loaded};

/// How often a session looks for a change of the customer's files to report in `Status`.
pub const STATUS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The appliance audit log's default file name in the state directory.
pub const AUDIT_LOG_FILE: &str = "audit.jsonl";
/// How long a plan's document is valid for by default (the customer may narrow it).
pub const PLAN_VALIDITY_MS: i64 = 15 * 60 * 1000;
/// The placeholder approver of a plan (the signer sets their own label).
pub const PLAN_APPROVER: &str = "customer";

/// Milliseconds since the epoch on the agent's own clock — the only clock that decides.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Where signed operations keep their state.
#[derive(Clone, Debug)]
pub struct SignedOpsConfig {
    /// The customer directory (`approvers.toml`, `policy.toml`).
    pub customer_dir: PathBuf,
    /// The appliance audit log.
    pub audit_log: PathBuf,
    /// Manifests not yet confirmed delivered ([`spool::Spool`]).
    pub spool_dir: PathBuf,
    /// Where `tether-agent session end` leaves its requests
    /// (`crate::tunnel::END_DIR`).
    pub tunnel_end_dir: PathBuf,
}

/// Who the command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunUser {
    /// The user name (the agent's own under `allow_same_uid`).
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Whether the agent switches to it (false: the agent's own user, `privsep=off`).
    pub switch: bool,
}

/// A command the customer's rules let run.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// The canonical program path to execute.
    pub program: PathBuf,
    /// Its SHA-256.
    pub program_sha256: String,
    /// Its phase.
    pub phase: Phase,
    /// As whom.
    pub user: RunUser,
    /// The approval that let it run.
    pub approval: Option<manifest::ApprovalRef>,
    /// The policy that decided.
    pub policy_sha256: String,
}

/// What admission decided.
#[derive(Debug)]
pub enum Decision {
    /// Run it.
    Run(Admitted),
    /// A plan was asked: the document to sign and whether it is needed.
    Plan {
        /// The approval document the agent would expect.
        document: Vec<u8>,
        /// Whether the phase needs an approval.
        approval_required: bool,
    },
}

/// A manifest signed and logged.
#[derive(Debug)]
pub struct SignedManifest {
    /// Its `seq` (per appliance).
    pub seq: u64,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
    /// Its SSHSIG armor.
    pub sig: String,
}

/// What is known about a refused command, for its manifest.
#[derive(Debug, Default)]
struct Partial {
    phase: Option<Phase>,
    policy_sha256: String,
    program: Option<Program>,
}

struct State {
    log: Result<AppLog, String>,
    ledger: Ledger,
    chain: manifest::Chain,
}

/// Signed operations for one appliance (shared by its sessions).
pub struct SignedOps {
    customer: CustomerFiles,
    key: PrivateKey,
    appliance: ApplianceRef,
    agent_uid: u32,
    state: Mutex<State>,
    spool: spool::Spool,
    tunnel_end_dir: PathBuf,
    audit_log: PathBuf,
}

impl std::fmt::Debug for SignedOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedOps")
            .field("customer_dir", &self.customer.dir())
            .field("appliance", &self.appliance)
            .finish_non_exhaustive()
    }
}

impl SignedOps {
    /// Signed operations for appliance `id` of `trust_domain`, signing with `key`.
    /// A log that does not open or verify is kept as an error: every command is then
    /// refused `audit_unavailable`.
    pub fn new(cfg: &SignedOpsConfig, id: &str, trust_domain: &str, key: PrivateKey) -> SignedOps {
        let mut ledger = Ledger::new();
        let mut chain = manifest::Chain::default();
        let log = AppLog::open(&cfg.audit_log, |e| match e.action.as_str() {
            action::APPROVAL_CONSUMED => {
                if let (Some(id), Some(until)) = (
                    e.details.get("approval_id").and_then(|v| v.as_str()),
                    e.details.get("not_after_ms").and_then(|v| v.as_i64()),
                ) {
                    ledger.record(id, until);
                }
            }
            action::COMMAND_MANIFEST => {
                if let (Some(seq), Some(sha)) = (
                    e.details.get("seq").and_then(|v| v.as_u64()),
                    e.details.get("sha256").and_then(|v| v.as_str()),
                ) {
                    chain.seq = seq;
                    chain.head = sha.to_owned();
                }
            }
            _ => {}
        });
        if let Err(e) = &log {
            tracing::error!(error = %e, "appliance audit log unusable: every command is refused");
        }
        SignedOps {
            customer: CustomerFiles::new(cfg.customer_dir.clone(), nix::unistd::geteuid().as_raw()),
            appliance: ApplianceRef {
                id: id.to_owned(),
                trust_domain: trust_domain.to_owned(),
                key: crate::manifest_key::public_line(&key),
            },
            key,
            agent_uid: nix::unistd::geteuid().as_raw(),
            state: Mutex::new(State { log, ledger, chain }),
            spool: spool::Spool::new(cfg.spool_dir.clone()),
            tunnel_end_dir: cfg.tunnel_end_dir.clone(),
            audit_log: cfg.audit_log.clone(),
        }
    }

    /// Manifests not yet confirmed delivered.
    pub fn spool(&self) -> &spool::Spool {
        &self.spool
    }

    /// The appliance audit log's path.
    pub fn audit_log_path(&self) -> &Path {
        &self.audit_log
    }

    /// Where `tether-agent session end` leaves its requests.
    pub fn tunnel_end_dir(&self) -> &Path {
        &self.tunnel_end_dir
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version of the customer's files in force (re-`stat`ed now): it changes
    /// whenever they were re-read, so a session knows to report them again.
    pub fn customer_generation(&self) -> u64 {
        let (loaded, reread) = self.customer.current();
        if reread {
            self.log_loaded(&loaded);
        }
        self.customer.generation()
    }

    /// Whether `phase` is still open (re-reading the customer files if they changed).
    pub fn phase_open(&self, phase: Phase) -> bool {
        let (loaded, reread) = self.customer.current();
        if reread {
            self.log_loaded(&loaded);
        }
        loaded.phase_open(phase, now_ms())
    }

    fn log_loaded(&self, loaded: &Loaded) {
        let event =
            AuditEvent::success(agent_actor(&self.appliance.id), action::CUSTOMER_LOADED, "")
                .with(
                    "policy",
                    match &loaded.policy {
                        Ok(p) => format!("{} {}", p.sha256, p.phases_summary()),
                        Err(e) => format!("unusable: {}", tether_audit::clip(e, 512)),
                    },
                )
                .with(
                    "approvers",
                    match &loaded.approvers {
                        Ok(a) => a
                            .keys()
                            .iter()
                            .map(|k| k.fingerprint())
                            .collect::<Vec<_>>()
                            .join(","),
                        Err(e) => format!("unusable: {}", tether_audit::clip(e, 512)),
                    },
                );
        if let Ok(log) = &mut self.state().log {
            let _ = log.append(&event);
        }
    }

    /// `Status` entries: policy, phases, approvers, privsep, audit head.
    pub fn status(&self) -> Vec<(String, String)> {
        let (loaded, _) = self.customer.current();
        let mut out = vec![("appliance.key".to_owned(), self.appliance.key.clone())];
        match &loaded.policy {
            Ok(p) => {
                out.push(("policy.sha256".into(), p.sha256.clone()));
                out.push(("policy.phases".into(), p.phases_summary()));
                out.push(("privsep".into(), privsep(p, self.agent_uid).into()));
            }
            Err(e) => out.push((
                "policy.error".into(),
                tether_audit::clip(e, 1000).to_owned(),
            )),
        }
        match &loaded.approvers {
            Ok(a) => out.push((
                "approvers".into(),
                tether_audit::clip(
                    &a.keys()
                        .iter()
                        .map(|k| format!("{}:{}", k.id, k.fingerprint()))
                        .collect::<Vec<_>>()
                        .join(","),
                    1000,
                )
                .to_owned(),
            )),
            Err(e) => out.push((
                "approvers.error".into(),
                tether_audit::clip(e, 1000).to_owned(),
            )),
        }
        match &self.state().log {
            Ok(log) => out.push(("audit.head".into(), log.head())),
            Err(e) => out.push(("audit.error".into(), tether_audit::clip(e, 1000).to_owned())),
        }
        out
    }

    /// The exec spec of `req`, as approvals and manifests carry it.
    pub fn exec_spec(req: &CommandRequest) -> ExecSpec {
        ExecSpec {
            kind: req.kind,
            argv: req.argv.clone(),
            env_allowlist: req.env_allowlist.clone(),
            deadline_ms: u64::from(req.deadline_ms),
            stdin_sha256: String::new(),
        }
    }

    /// Decide `req` (design §1.5). `path_env` is the `PATH` commands get.
    pub fn admit(
        &self,
        req: &CommandRequest,
        path_env: &std::ffi::OsStr,
    ) -> Result<Decision, (Refusal, PartialView)> {
        let ext = req.signed.clone().unwrap_or_default();
        let now = now_ms();
        let mut partial = Partial::default();
        fn fail<T>(r: Refusal, p: Partial) -> Result<T, (Refusal, PartialView)> {
            Err((r, PartialView(p)))
        }
        self.record(
            AuditEvent::success(
                agent_actor(&self.appliance.id),
                action::COMMAND_RECEIVED,
                &ext.request_id,
            )
            .with("command_id", req.command_id.to_string())
            .with("kind", req.kind.name())
            .with("argv", tether_audit::clip(&req.argv.join(" "), 1024)),
        )
        .or_else(|r| fail(r, Partial::default()))?;
        let (loaded, reread) = self.customer.current();
        if reread {
            self.log_loaded(&loaded);
        }
        let policy = match &loaded.policy {
            Ok(p) => p.clone(),
            Err(e) => {
                return fail(
                    Refusal::new(CommandFailure::PolicyUnavailable, e.clone()),
                    partial,
                )
            }
        };
        partial.policy_sha256 = policy.sha256.clone();
        let program = match resolve(req, path_env) {
            Ok(p) => p,
            Err(e) => return fail(Refusal::new(CommandFailure::SpawnFailed, e), partial),
        };
        let program_str = program.to_string_lossy().into_owned();
        let program_sha256 = file_sha256(&program).unwrap_or_default();
        partial.program = Some(Program {
            path: program_str.clone(),
            sha256: program_sha256.clone(),
        });
        let cmd = policy::Command {
            shell: req.kind == CommandKind::Shell,
            argv: &req.argv,
            program: &program_str,
        };
        // The phase is the agent's own classification, also for refusals that follow.
        partial.phase = Some(policy.classify(&cmd));
        let decided = match policy.evaluate(&cmd, now) {
            Ok(d) => d,
            Err(r) => return fail(r, partial),
        };
        let exec = SignedOps::exec_spec(req);
        let expected = Expected {
            appliance: &self.appliance,
            phase: decided.phase,
            exec: &exec,
        };
        if ext.plan_only {
            let doc = Approval::plan(
                &expected,
                &ext.request_id,
                &ext.reason,
                PLAN_APPROVER,
                now,
                now + PLAN_VALIDITY_MS,
            );
            return Ok(Decision::Plan {
                document: doc.to_bytes(),
                approval_required: decided.approval_required,
            });
        }
        let user = match run_user(&decided.run_as, policy.allow_same_uid, self.agent_uid) {
            Ok(u) => u,
            Err(r) => return fail(r, partial),
        };
        let approval = if decided.approval_required || !ext.approval.is_empty() {
            match self.consume_approval(&ext, &expected, &loaded, &policy, now) {
                Ok(a) => Some(a),
                Err(r) => return fail(r, partial),
            }
        } else {
            None
        };
        Ok(Decision::Run(Admitted {
            program,
            program_sha256,
            phase: decided.phase,
            user,
            approval,
            policy_sha256: policy.sha256.clone(),
        }))
    }

    /// Design §1.5 steps 3 to 7 for an attached (or required) approval: verified, in its
    /// window, unused; then recorded as used — fsynced in the audit log before anything
    /// starts, under the lock that checked it.
    fn consume_approval(
        &self,
        ext: &tether_proto::SignedOps,
        expected: &Expected<'_>,
        loaded: &Loaded,
        policy: &policy::Policy,
        now: i64,
    ) -> Result<manifest::ApprovalRef, Refusal> {
        if ext.approval.is_empty() {
            return Err(Refusal::new(
                CommandFailure::ApprovalRequired,
                format!(
                    "phase {} needs a customer approval and none came with the command",
                    expected.phase
                ),
            ));
        }
        let approvers = match &loaded.approvers {
            Ok(a) => a.clone(),
            Err(e) => return Err(Refusal::new(CommandFailure::ApprovalUnavailable, e.clone())),
        };
        let verified = approval::check(
            &ext.approval,
            &ext.approval_sig,
            expected,
            &approvers,
            &policy.limits,
            now,
        )?;
        self.consume(&verified, &ext.request_id, policy, now)?;
        Ok(manifest::ApprovalRef {
            sha256: verified.sha256,
            approval_id: verified.approval_id,
            signer: verified.signer,
        })
    }

    /// Single use (design §1.6) for an approval that passed every other check: refused
    /// if its id was seen or ends at or before the pruning horizon; else recorded —
    /// `approval.consumed` fsynced in the audit log, then the ledger — under the lock
    /// that checked it, before anything it allows starts.
    fn consume(
        &self,
        verified: &approval::Verified,
        request_id: &str,
        policy: &policy::Policy,
        now: i64,
    ) -> Result<(), Refusal> {
        let mut st = self.state();
        let skew = i64::try_from(policy.limits.clock_skew.as_millis()).unwrap_or(i64::MAX);
        st.ledger.prune(now, skew);
        st.ledger
            .check(&verified.approval_id, verified.not_after_ms)?;
        let event = AuditEvent::success(
            agent_actor(&self.appliance.id),
            action::APPROVAL_CONSUMED,
            request_id,
        )
        .with("approval_id", verified.approval_id.clone())
        .with("not_after_ms", verified.not_after_ms)
        .with("sha256", verified.sha256.clone())
        .with("signer", verified.signer.clone())
        .with("key_id", verified.key_id.clone())
        .with("approver", verified.approver.clone());
        match &mut st.log {
            Ok(log) => log
                .append(&event)
                .map_err(|e| Refusal::new(CommandFailure::AuditUnavailable, e))?,
            Err(e) => return Err(Refusal::new(CommandFailure::AuditUnavailable, e.clone())),
        };
        st.ledger
            .record(&verified.approval_id, verified.not_after_ms);
        Ok(())
    }

    /// Append `event`, or `audit_unavailable`.
    fn record(&self, event: AuditEvent) -> Result<(), Refusal> {
        match &mut self.state().log {
            Ok(log) => log
                .append(&event)
                .map(|_| ())
                .map_err(|e| Refusal::new(CommandFailure::AuditUnavailable, e)),
            Err(e) => Err(Refusal::new(CommandFailure::AuditUnavailable, e.clone())),
        }
    }

    /// Build, sign and log the manifest of a command that ran (`admitted`) or was refused
    /// (`partial`). Returns its bytes and signature; `None` if it could not be signed or
    /// logged (the result still goes out; the log's failure is in the agent's log).
    pub fn manifest(&self, req: &CommandRequest, ran: Ran<'_>) -> Option<SignedManifest> {
        let ext = req.signed.clone().unwrap_or_default();
        let mut st = self.state();
        let (seq, prev_sha256) = st.chain.next();
        let (approval, phase, policy_sha256, program, run_as) = match &ran.admitted {
            Some(a) => (
                a.approval.clone(),
                Some(a.phase),
                a.policy_sha256.clone(),
                Some(Program {
                    path: a.program.to_string_lossy().into_owned(),
                    sha256: a.program_sha256.clone(),
                }),
                Some(RunAs {
                    user: a.user.name.clone(),
                    uid: a.user.uid,
                }),
            ),
            None => {
                let p = ran.partial.map(|p| &p.0);
                (
                    None,
                    p.and_then(|p| p.phase),
                    p.map(|p| p.policy_sha256.clone()).unwrap_or_default(),
                    p.and_then(|p| p.program.clone()),
                    None,
                )
            }
        };
        let m = Manifest {
            doc_type: MANIFEST_TYPE.into(),
            appliance: self.appliance.clone(),
            seq,
            prev_sha256,
            request_id: ext.request_id.clone(),
            command_id: req.command_id,
            approval,
            phase,
            policy_sha256,
            exec: SignedOps::exec_spec(req),
            program,
            run_as,
            started_ms: ran.started_ms,
            finished_ms: now_ms(),
            outcome: ran.outcome,
            stdout: ran.stdout,
            stderr: ran.stderr,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let (bytes, sig) = match m.sign(&self.key) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the manifest");
                return None;
            }
        };
        let sha = tether_ops::sha256_hex(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let mut event = AuditEvent::success(
            agent_actor(&self.appliance.id),
            action::COMMAND_MANIFEST,
            &ext.request_id,
        )
        .with("seq", seq)
        .with("sha256", sha.clone())
        .with("sig", sig.clone());
        // The log's entries are at most 4 KiB of details: a manifest of a very long
        // command is kept by hash (the signed bytes went to the broker).
        if text.len() + sig.len() < 2 * 1024 {
            event.set("manifest", text.into_owned());
        }
        match &mut st.log {
            Ok(log) => {
                if let Some(cp) = checkpoint(&self.key, log) {
                    event.set("checkpoint", cp);
                }
                if let Err(e) = log.append(&event) {
                    tracing::error!(error = %e, "cannot log the manifest");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot log the manifest"),
        }
        st.chain.advance(seq, &bytes);
        Some(SignedManifest { seq, bytes, sig })
    }

    /// Log a refusal.
    pub fn refused(&self, req: &CommandRequest, refusal: &Refusal) {
        let ext = req.signed.clone().unwrap_or_default();
        let event = AuditEvent::refused(
            agent_actor(&self.appliance.id),
            action::COMMAND_REFUSED,
            &ext.request_id,
            refusal.code.name(),
        )
        .with("command_id", req.command_id.to_string())
        .with("detail", tether_audit::clip(&refusal.detail, 1024));
        if let Ok(log) = &mut self.state().log {
            let _ = log.append(&event);
        }
    }
}

/// A checkpoint for the next entry of `log`: the manifest key vouches for everything
/// before it (`None` if it cannot sign).
fn checkpoint(key: &PrivateKey, log: &AppLog) -> Option<serde_json::Value> {
    let (cp_seq, cp_hash) = log.head_parts();
    let message = tether_ops::checkpoint_message(cp_seq, cp_hash);
    let cp_sig =
        tether_ops::sig::sign(key, tether_ops::CHECKPOINT_NAMESPACE, message.as_bytes()).ok()?;
    Some(serde_json::json!({"seq": cp_seq, "hash": cp_hash, "sig": cp_sig}))
}

/// What is known of a refused command (opaque outside this module).
#[derive(Debug)]
pub struct PartialView(Partial);

/// How a command went, for its manifest.
pub struct Ran<'a> {
    /// Set if it was admitted.
    pub admitted: Option<&'a Admitted>,
    /// Set if it was refused.
    pub partial: Option<&'a PartialView>,
    /// When it started (or was refused).
    pub started_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// Stdout digest.
    pub stdout: StreamDigest,
    /// Stderr digest.
    pub stderr: StreamDigest,
}

/// The program `req` would run, resolved on `path_env` and canonicalised.
fn resolve(req: &CommandRequest, path_env: &std::ffi::OsStr) -> Result<PathBuf, String> {
    let name = match req.kind {
        CommandKind::Shell => crate::command::SHELL,
        _ => req.argv.first().map(String::as_str).unwrap_or_default(),
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let found = which::which_in(name, Some(path_env), cwd)
        .map_err(|e| format!("cannot find {name:?}: {e}"))?;
    std::fs::canonicalize(&found).map_err(|e| format!("{}: {e}", found.display()))
}

/// SHA-256 (hex) of a file, streamed.
fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = manifest::StreamHasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish().sha256)
}

/// `Status`'s `privsep`, from the same rule admission applies ([`run_user`]) to every
/// open phase: `on` when each runs as its own `run_as` user, `off` when one would run as
/// the agent's user (`allow_same_uid`), `unavailable` when one could not run at all.
fn privsep(policy: &policy::Policy, agent_uid: u32) -> &'static str {
    let now = now_ms();
    let users: Vec<Result<RunUser, Refusal>> = Phase::ALL
        .iter()
        .filter(|&&phase| policy.is_open(phase, now))
        .filter_map(|&phase| policy.phase(phase))
        .map(|rule| run_user(&rule.run_as, policy.allow_same_uid, agent_uid))
        .collect();
    if users.iter().any(Result::is_err) {
        "unavailable"
    } else if users.iter().flatten().any(|u| !u.switch) {
        "off"
    } else {
        "on"
    }
}

/// The user a phase runs as: the policy's `run_as` if the agent can switch to it; the
/// agent's own user only under `allow_same_uid`; else `privsep_unavailable`.
pub(crate) fn run_user(
    run_as: &str,
    allow_same_uid: bool,
    agent_uid: u32,
) -> Result<RunUser, Refusal> {
    let can_switch = agent_uid == 0;
    let target = nix::unistd::User::from_name(run_as).ok().flatten();
    match target {
        Some(u) if can_switch => Ok(RunUser {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            switch: true,
        }),
        _ if allow_same_uid => {
            let me = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(agent_uid)).ok().flatten();
            Ok(RunUser {
                name: me.as_ref().map_or_else(|| agent_uid.to_string(), |u| u.name.clone()),
                uid: agent_uid,
                gid: me.map_or(nix::unistd::getegid().as_raw(), |u| u.gid.as_raw()),
                switch: false,
            })
        }
        Some(_) => Err(Refusal::new(
            CommandFailure::PrivsepUnavailable,
            format!("the agent cannot switch to user {run_as} (it is not root) and the policy does not say allow_same_uid"),
        )),
        None => Err(Refusal::new(
            CommandFailure::PrivsepUnavailable,
            format!("user {run_as} does not exist and the policy does not say allow_same_uid"),
        )),
    }
}
