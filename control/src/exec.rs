//! `POST /v1/appliances/{id}/exec` (operator+): run a command on an appliance through the
//! broker that holds it, streaming what happens as NDJSON, one event per line:
//!
//! - `{"type":"started","broker":"edge-1"}` first;
//! - `{"type":"output","stream":"stdout"|"stderr","data":"<base64>"}` as output arrives;
//! - exactly one last line: `{"type":"exit","code":N}` or
//!   `{"type":"failed","code":"...","message":"..."}` where `code` is `timed_out` (no
//!   answer by the deadline), `connection_lost` (the appliance went away mid-command),
//!   `broker_lost` (the broker or its channel went away), `offline` (the broker no longer
//!   holds the appliance), or what the agent refused with.
//!
//! Refusals before anything runs are ordinary JSON errors: 404 `not_found`, 409
//! `offline` (no broker reports the appliance), 409 `appliance_disabled` /
//! `appliance_revoked`, 400 for a bad body. The request and its outcome are each one
//! audit entry (`appliance.exec`).

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use tether_api::appliances::ApplianceStatus;
use tether_api::exec::{ExecLine, ExecRequest};
use tether_api::operators::Role;
use tether_audit::{self as audit, action, AuditEvent, Outcome};
use tracing::info;

use crate::api::{json_rejection, ApiError, AppState};
use crate::cluster::ExecEvent;
use tether_identity::ApplianceId;
use tether_proto::{CommandFailure, CommandKind};

use crate::enroll::internal;
use crate::metrics::Reason;
use crate::operators::authorize;
use crate::server::PeerCertificate;

/// Deadline when the request gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest deadline accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Time past the deadline control waits for the broker's own verdict before saying
/// `timed_out` itself: the protocol's grace ([`tether_proto::COMMAND_DEADLINE_GRACE`], what
/// the broker waits for the agent) plus [`RELAY_MARGIN`] for the verdict to travel the
/// cluster channel. 3 s, as before; one constant defines the grace, this only adds to it.
pub const DEADLINE_GRACE: Duration =
    tether_proto::COMMAND_DEADLINE_GRACE.saturating_add(RELAY_MARGIN);
/// What control adds to the broker's grace: the broker's own `timed_out` must reach control
/// before control's timer gives up.
pub const RELAY_MARGIN: Duration = Duration::from_secs(1);
/// Most argv entries.
pub const MAX_ARGS: usize = 256;
/// Failure codes counted under their own label in `tether_control_commands_total`.
const OUTCOME_LABELS: [CommandFailure; 6] = [
    CommandFailure::TimedOut,
    CommandFailure::ConnectionLost,
    CommandFailure::BrokerLost,
    CommandFailure::Offline,
    CommandFailure::Cancelled,
    CommandFailure::OutputOverflow,
];

fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, message)
}

/// `POST /v1/appliances/{id}/exec`.
#[utoipa::path(post, path = "/v1/appliances/{id}/exec", tag = "appliances", request_body = ExecRequest,
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "NDJSON lines (`application/x-ndjson`), see the module docs: started, output…, then exit or failed", content_type = "application/x-ndjson"),
        (status = 400, description = "bad input", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "`offline`, `appliance_disabled` or `appliance_revoked`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn exec(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&id, audit::MAX_TARGET_LEN).to_owned();
    let op = authorize(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_EXEC,
        &target,
        now,
    )
    .await?;
    let event = AuditEvent::success(op.actor(), action::APPLIANCE_EXEC, &target);
    let refused_event = event.clone();
    let refuse = |e: ApiError| {
        let s = s.clone();
        let event = refused_event.clone();
        async move {
            s.metrics
                .commands
                .get_or_create(&Reason { reason: e.code })
                .inc();
            crate::appliances::refuse(&s, event, e, now).await
        }
    };
    if let Err(e) = ApplianceId::new(&id) {
        return Err(refuse(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            e.to_string(),
        ))
        .await);
    }
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return Err(refuse(json_rejection(e)).await),
    };
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
    } else {
        None
    };
    let kind = kind.unwrap_or_default();
    if let Some(message) = problem {
        return Err(refuse(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_command",
            message,
        ))
        .await);
    }
    let appliance = match s.store.get_appliance(&id).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(refuse(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no appliance {id}"),
            ))
            .await)
        }
        Err(e) => return Err(internal(e)),
    };
    match appliance.status {
        ApplianceStatus::Active => {}
        ApplianceStatus::Disabled => {
            return Err(refuse(conflict("appliance_disabled", "the appliance is disabled")).await)
        }
        ApplianceStatus::Revoked => {
            return Err(refuse(conflict("appliance_revoked", "the appliance is revoked")).await)
        }
    }
    let argv_text = audit::clip(&req.argv.join(" "), 1024).to_owned();
    let event = event
        .with("argv", argv_text)
        .with("timeout_ms", timeout.as_millis() as i64);
    let (broker, command_id, mut events) = match s
        .cluster
        .exec(&id, req.argv, kind, req.env_allowlist, timeout)
        .await
    {
        Ok(x) => x,
        Err(code) => {
            let message = if code == CommandFailure::Offline {
                format!("appliance {id} is not connected to any broker")
            } else {
                format!("the broker holding appliance {id} went away")
            };
            return Err(refuse(conflict(code.name(), message)).await);
        }
    };
    let event = event.with("broker", broker.as_str());
    if let Err(e) = s.store.append_audit(&event, now).await {
        // The command is already on its way; say so loudly rather than hide it.
        s.metrics.audit_failures.inc();
        tracing::error!(error = %e, appliance = %id, "cannot audit a command");
    }
    info!(by = op.name(), appliance = %id, %broker, command_id, "command sent");

    // Stream lines until the last event; guard the deadline ourselves so a broker that
    // never answers cannot hold the caller.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(64);
    let deadline = tokio::time::Instant::now() + timeout + DEADLINE_GRACE;
    tokio::spawn(async move {
        let line = |l: &ExecLine| {
            let mut v = serde_json::to_vec(l).unwrap_or_default();
            v.push(b'\n');
            Ok(bytes::Bytes::from(v))
        };
        let _ = tx
            .send(line(&ExecLine::Started {
                broker: broker.clone(),
            }))
            .await;
        let last = loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tokio::time::sleep_until(deadline) => None,
                _ = tx.closed() => {
                    // The caller went away: stop the command.
                    s.cluster.cancel(command_id);
                    break ExecLine::Failed { code: CommandFailure::Cancelled, message: "the caller went away".into() };
                }
            };
            match ev {
                Some(ExecEvent::Output { stream, data }) => {
                    if tx
                        .send(line(&ExecLine::Output { stream, data }))
                        .await
                        .is_err()
                    {
                        s.cluster.cancel(command_id);
                        break ExecLine::Failed {
                            code: CommandFailure::Cancelled,
                            message: "the caller went away".into(),
                        };
                    }
                }
                Some(ExecEvent::Exit(code)) => break ExecLine::Exit { code },
                Some(ExecEvent::Failed { code, message }) => {
                    break ExecLine::Failed { code, message }
                }
                None => {
                    s.cluster.cancel(command_id);
                    break ExecLine::Failed {
                        code: CommandFailure::TimedOut,
                        message: format!("no result within {timeout:?}"),
                    };
                }
            }
        };
        let mut end = AuditEvent::success(op.actor(), action::APPLIANCE_EXEC, &target)
            .with("broker", broker.as_str())
            .with("command_id", command_id as i64);
        // The metric label: `exit`, a known failure code, or `failed` for anything else
        // (an agent's own codes must not grow the label set without bound).
        let label = match &last {
            ExecLine::Failed { code, .. } => {
                end = end.with_outcome(Outcome::Failed).with("code", code.name());
                if OUTCOME_LABELS.contains(code) {
                    code.name()
                } else {
                    "failed"
                }
            }
            ExecLine::Exit { code } => {
                end = end.with("exit_code", *code as i64);
                "exit"
            }
            ExecLine::Started { .. } | ExecLine::Output { .. } => "failed",
        };
        s.metrics
            .commands
            .get_or_create(&Reason { reason: label })
            .inc();
        if let Err(e) = s.store.append_audit(&end, crate::now_unix()).await {
            s.metrics.audit_failures.inc();
            tracing::error!(error = %e, "cannot audit a command's outcome");
        }
        let _ = tx.send(line(&last)).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(internal)
}
