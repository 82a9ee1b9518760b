//! The checks before a command runs on an appliance: the id, the request (argv, kind,
//! deadline) and the appliance's status; and the outcome of commands whose replica died
//! ([`abandon_lost`]). Routing the command to the broker that holds
//! the appliance is the cluster layer's (`Cluster::exec`); streaming its
//! events to the caller is the HTTP layer's.

use std::time::Duration;

use tether_api::appliances::ApplianceStatus;
use tether_api::exec::ExecRequest;
use tether_identity::ApplianceId;
use tether_proto::cluster::SignedCommand;
use tether_proto::frame::{
    MAX_APPROVAL_LEN, MAX_APPROVAL_SIG_LEN, MAX_MESSAGE_LEN, MAX_REQUEST_ID_LEN,
};
use tether_proto::{CommandFailure, CommandKind};

use tether_audit::{action, AuditEvent, Outcome};

use crate::domain::{internal, Error, ErrorKind};
use crate::store::{CommandInFlight, Store, StoreError};

/// Deadline when the request gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest deadline accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most argv entries.
pub const MAX_ARGS: usize = 256;

/// A checked command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// What to run.
    pub argv: Vec<String>,
    /// Exec or shell.
    pub kind: CommandKind,
    /// Environment variables the agent may pass through.
    pub env_allowlist: Vec<String>,
    /// The deadline.
    pub timeout: Duration,
    /// Signed operations: the approval, request id, reason, plan request (empty if none).
    pub signed: SignedCommand,
}

/// Check appliance id `id`: 400 `invalid_id`.
pub fn check_id(id: &str) -> Result<(), Error> {
    ApplianceId::new(id)
        .map(drop)
        .map_err(|e| Error::new(ErrorKind::BadRequest, "invalid_id", e.to_string()))
}

/// Check a command request: 1 to [`MAX_ARGS`] argv entries, a deadline of at most
/// [`MAX_TIMEOUT`] (default [`DEFAULT_TIMEOUT`]), kind `exec` or `shell`; else 400
/// `invalid_command`.
pub fn check_request(req: ExecRequest) -> Result<Command, Error> {
    let timeout = req
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TIMEOUT);
    let kind = req
        .kind
        .as_deref()
        .map_or(Some(CommandKind::Exec), CommandKind::from_name);
    let problem = if req.argv.is_empty() || req.argv.len() > MAX_ARGS {
        Some(format!("argv must hold 1 to {MAX_ARGS} entries"))
    } else if timeout.is_zero() || timeout > MAX_TIMEOUT {
        Some("timeout_ms must be 1 to 3600000".into())
    } else if kind.is_none() {
        Some("kind must be exec or shell".into())
    } else if req
        .approval
        .as_ref()
        .is_some_and(|a| a.len() > MAX_APPROVAL_LEN)
        || req
            .approval_sig
            .as_ref()
            .is_some_and(|a| a.len() > MAX_APPROVAL_SIG_LEN)
    {
        Some(format!(
            "approval must be at most {MAX_APPROVAL_LEN} bytes and approval_sig at most {MAX_APPROVAL_SIG_LEN}"
        ))
    } else if req
        .request_id
        .as_ref()
        .is_some_and(|r| r.len() > MAX_REQUEST_ID_LEN)
        || req
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > MAX_MESSAGE_LEN)
    {
        Some(format!(
            "request_id must be at most {MAX_REQUEST_ID_LEN} bytes and reason at most {MAX_MESSAGE_LEN}"
        ))
    } else {
        None
    };
    if let Some(message) = problem {
        return Err(Error::new(
            ErrorKind::BadRequest,
            "invalid_command",
            message,
        ));
    }
    Ok(Command {
        argv: req.argv,
        kind: kind.unwrap_or_default(),
        env_allowlist: req.env_allowlist,
        timeout,
        signed: SignedCommand {
            request_id: req.request_id.unwrap_or_default(),
            reason: req.reason.unwrap_or_default(),
            approval: req.approval.unwrap_or_default(),
            approval_sig: req.approval_sig.unwrap_or_default(),
            plan: req.plan,
        },
    })
}

/// Check that appliance `id` exists and is active: 404 `not_found`, 409
/// `appliance_disabled` / `appliance_revoked`; a store failure is `internal`.
pub async fn check_appliance(store: &dyn Store, id: &str) -> Result<(), Error> {
    let conflict = |code, message| Error::new(ErrorKind::Conflict, code, message);
    match store.get_appliance(id).await {
        Ok(Some(a)) => match a.status {
            ApplianceStatus::Active => Ok(()),
            ApplianceStatus::Disabled => {
                Err(conflict("appliance_disabled", "the appliance is disabled"))
            }
            ApplianceStatus::Revoked => {
                Err(conflict("appliance_revoked", "the appliance is revoked"))
            }
        },
        Ok(None) => Err(Error::new(
            ErrorKind::NotFound,
            "not_found",
            format!("no appliance {id}"),
        )),
        Err(e) => Err(internal(e)),
    }
}

/// Give every command in flight whose replica is lost — its heartbeat older than
/// `lost_after_secs` (database clock) or not registered; `None`: every command in flight,
/// for a single node starting (SQLite: rows left by a crashed previous process) — its
/// outcome: an `appliance.exec` entry, outcome `failed`, code `replica_lost`, naming the
/// lost replica and `abandoned_by` (this replica). Idempotent and safe to race: the
/// store appends an outcome only with the row's delete, so each command gets exactly
/// one. Returns how many this call abandoned.
pub async fn abandon_lost(
    store: &dyn Store,
    lost_after_secs: Option<i64>,
    by: &str,
    now: i64,
) -> Result<u64, StoreError> {
    let mut abandoned = 0;
    for c in store.lost_commands(lost_after_secs).await? {
        if store
            .command_ended(&c.id, &lost_outcome(&c, by), now)
            .await?
        {
            tracing::warn!(command = %c.id, command_id = c.command_id, replica = %c.replica,
                appliance = %c.appliance, broker = %c.broker,
                "command abandoned: its replica is lost (replica_lost)");
            abandoned += 1;
        }
    }
    Ok(abandoned)
}

/// The outcome entry of command `c`, whose replica was lost, written by replica `by`.
fn lost_outcome(c: &CommandInFlight, by: &str) -> AuditEvent {
    AuditEvent::success(
        c.actor.clone(),
        action::APPLIANCE_EXEC,
        c.appliance.as_str(),
    )
    .with_outcome(Outcome::Failed)
    .with("broker", c.broker.as_str())
    .with("command_id", c.command_id)
    .with("code", CommandFailure::ReplicaLost.name())
    .with("replica", c.replica.as_str())
    .with("abandoned_by", by)
}
