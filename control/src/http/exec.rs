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
//! `appliance_revoked`, 503 `no_channel` with `Retry-After: 1` (a broker holds the
//! appliance but this replica has no channel to it), 400 for a bad body. The request and
//! its outcome are each one audit entry (`appliance.exec`); between the two the command
//! is a `commands_in_flight` row, so if this replica dies mid-command another one writes
//! the outcome, `failed` with code `replica_lost` (the `abandon_commands` job), and the
//! caller's stream ends without a last line.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use tether_api::exec::{ExecLine, ExecRequest};
use tether_api::operators::Role;
use tether_audit::{self as audit, action, AuditEvent, Outcome};
use tether_proto::CommandFailure;
use tokio::sync::mpsc;
use tracing::info;

use crate::cluster::{ExecEvent, ExecEvents};
use crate::domain::operators::Caller;
use crate::domain::{self, Error, ErrorKind};
use crate::http::appliances::operator;
use crate::http::server::PeerCertificate;
use crate::http::{body_error, internal, ApiError, AppState};
use crate::metrics::Reason;
use crate::store::CommandInFlight;

/// Time past the deadline control waits for the broker's own verdict before saying
/// `timed_out` itself: the protocol's grace ([`tether_proto::COMMAND_DEADLINE_GRACE`], what
/// the broker waits for the agent) plus [`RELAY_MARGIN`] for the verdict to travel the
/// cluster channel. 3 s, as before; one constant defines the grace, this only adds to it.
pub const DEADLINE_GRACE: Duration =
    tether_proto::COMMAND_DEADLINE_GRACE.saturating_add(RELAY_MARGIN);
/// What control adds to the broker's grace: the broker's own `timed_out` must reach control
/// before control's timer gives up.
pub const RELAY_MARGIN: Duration = Duration::from_secs(1);
/// Failure codes counted under their own label in `tether_control_commands_total` (with
/// [`CommandFailure::SIGNED_OPS_REFUSALS`]).
const OUTCOME_LABELS: [CommandFailure; 6] = [
    CommandFailure::TimedOut,
    CommandFailure::ConnectionLost,
    CommandFailure::BrokerLost,
    CommandFailure::Offline,
    CommandFailure::Cancelled,
    CommandFailure::OutputOverflow,
];

type Lines = mpsc::Sender<Result<bytes::Bytes, std::io::Error>>;

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
        (status = 503, description = "`no_channel`: a broker holds the appliance but this replica has no channel to it; `Retry-After: 1` (another replica, through the load balancer, may have one)", body = tether_api::ErrorBody),
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
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_EXEC,
        &target,
        now,
    )
    .await?;
    let event = AuditEvent::success(by.actor(), action::APPLIANCE_EXEC, &target);
    let checked = async {
        domain::exec::check_id(&id)?;
        let Json(req) = body.map_err(body_error)?;
        let command = domain::exec::check_request(req)?;
        domain::exec::check_appliance(s.domain.store.as_ref(), &id).await?;
        Ok::<_, Error>(command)
    };
    let command = match checked.await {
        Ok(c) => c,
        Err(e) if e.kind.is_server_fault() => return Err(e.into()),
        Err(e) => return Err(refuse(&s, event, e, now).await),
    };
    let timeout = command.timeout;
    let argv_text = audit::clip(&command.argv.join(" "), 1024).to_owned();
    let mut event = event
        .with("argv", argv_text)
        .with("timeout_ms", timeout.as_millis() as i64);
    if !command.signed.approval.is_empty() {
        event.set(
            "approval_sha256",
            crate::domain::token::sha256_hex(command.signed.approval.as_bytes()),
        );
    }
    if command.signed.plan {
        event.set("plan", true);
    }
    if !command.signed.request_id.is_empty() {
        event.set("request_id", command.signed.request_id.as_str());
    }
    let resend = command.clone();
    let sent = s
        .cluster
        .exec_signed(
            &id,
            command.argv,
            command.kind,
            command.env_allowlist,
            timeout,
            command.signed,
        )
        .await;
    let (broker, command_id, events) = match sent {
        Ok(x) => x,
        Err(code) => {
            let (kind, message) = match code {
                CommandFailure::Offline => (
                    ErrorKind::Conflict,
                    format!("appliance {id} is not connected to any broker"),
                ),
                CommandFailure::NoChannel => (
                    ErrorKind::Unavailable,
                    format!(
                        "this control replica has no channel to the broker holding appliance \
                         {id}; retry (another replica may have one)"
                    ),
                ),
                _ => (
                    ErrorKind::Conflict,
                    format!("the broker holding appliance {id} went away"),
                ),
            };
            let e = Error::new(kind, code.name(), message);
            return Err(refuse(&s, event, e, now).await);
        }
    };
    let event = event.with("broker", broker.as_str());
    // In flight until its outcome: if this replica dies first, another one writes the
    // outcome (`replica_lost`, the abandon_commands job).
    let in_flight = CommandInFlight {
        id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        replica: s.replica_id.to_string(),
        appliance: target.clone(),
        started_at: now,
        actor: by.actor(),
        broker: broker.clone(),
        command_id: i64::try_from(command_id).unwrap_or(i64::MAX),
    };
    if let Err(e) = s
        .domain
        .store
        .command_started(&in_flight, &event, now)
        .await
    {
        // The command is already on its way; say so loudly rather than hide it.
        s.metrics.audit_failures.inc();
        tracing::error!(error = %e, appliance = %id, "cannot audit a command");
    }
    info!(by = %by, appliance = %id, %broker, command_id, "command sent");
    let relay = Relay {
        s,
        by,
        target,
        broker,
        command_id,
        in_flight: in_flight.id,
        timeout,
        manifest: std::sync::Mutex::new(None),
        appliance: id,
        resend: Some(resend),
        rerouted_from: None,
    };
    relay.start(events)
}

/// Count a refusal under its code and record it in the audit log.
async fn refuse(s: &AppState, event: AuditEvent, e: Error, now: i64) -> ApiError {
    s.metrics
        .commands
        .get_or_create(&Reason { reason: e.code })
        .inc();
    domain::refuse(s.domain.store.as_ref(), event, e, now)
        .await
        .into()
}

/// A command on its way: streams its events to the caller as NDJSON lines until the last
/// one, guarding the deadline itself so a broker that never answers cannot hold the
/// caller, then records the outcome.
struct Relay {
    s: AppState,
    by: Caller,
    target: String,
    broker: String,
    command_id: u64,
    /// Its `commands_in_flight` row.
    in_flight: String,
    timeout: Duration,
    /// The appliance's signed manifest, kept with the outcome's audit entry.
    manifest: std::sync::Mutex<Option<(String, String)>>,
    /// The appliance id.
    appliance: String,
    /// The command, to send once more if an agent leaving a draining broker refused it
    /// unrun ([`Relay::run`]).
    resend: Option<domain::exec::Command>,
    /// The broker of that refusal, once the command was sent again.
    rerouted_from: Option<String>,
}

impl Relay {
    /// Spawn the relay and answer with the stream of its lines.
    fn start(self, events: ExecEvents) -> Result<Response, ApiError> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.run(events, tx));
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Body::from_stream(stream))
            .map_err(internal)
    }

    async fn run(mut self, events: ExecEvents, tx: Lines) {
        let started = ExecLine::Started {
            broker: self.broker.clone(),
        };
        let _ = tx.send(line(&started)).await;
        let mut forwarded = false;
        let mut last = self.relay(events, &tx, &mut forwarded).await;
        // A command that reached its agent just after the agent's broker told it to go
        // away (a drain) is refused without running: send it once more, to the session
        // the agent opens on another broker. Nothing ran, so nothing runs twice.
        if matches!(
            last,
            ExecLine::Failed {
                code: CommandFailure::Refused,
                ..
            }
        ) && !forwarded
            && self.s.cluster.broker_draining(&self.broker)
        {
            if let Some(again) = self.resend.take() {
                let sent = self
                    .s
                    .cluster
                    .exec_signed(
                        &self.appliance,
                        again.argv,
                        again.kind,
                        again.env_allowlist,
                        again.timeout,
                        again.signed,
                    )
                    .await;
                if let Ok((broker, command_id, events)) = sent {
                    info!(appliance = %self.appliance, from = %self.broker, to = %broker,
                        command_id, "command refused by an agent leaving its draining broker; sent again");
                    let _ = tx
                        .send(line(&ExecLine::Started {
                            broker: broker.clone(),
                        }))
                        .await;
                    self.rerouted_from = Some(std::mem::replace(&mut self.broker, broker));
                    self.command_id = command_id;
                    last = self.relay(events, &tx, &mut forwarded).await;
                }
            }
        }
        self.finish(&last).await;
        let _ = tx.send(line(&last)).await;
    }

    /// Forward output until the command's last event (or the deadline, or the caller
    /// leaving), and return that last line.
    /// `forwarded` is set once anything but the last line went to the caller.
    async fn relay(&self, mut events: ExecEvents, tx: &Lines, forwarded: &mut bool) -> ExecLine {
        let deadline = tokio::time::Instant::now() + self.timeout + DEADLINE_GRACE;
        let gone = || ExecLine::Failed {
            code: CommandFailure::Cancelled,
            message: "the caller went away".into(),
        };
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tokio::time::sleep_until(deadline) => None,
                _ = tx.closed() => {
                    // The caller went away: stop the command.
                    self.s.cluster.cancel(self.command_id);
                    return gone();
                }
            };
            match ev {
                Some(ExecEvent::Output { stream, data }) => {
                    *forwarded = true;
                    let out = line(&ExecLine::Output { stream, data });
                    if tx.send(out).await.is_err() {
                        self.s.cluster.cancel(self.command_id);
                        return gone();
                    }
                }
                Some(ExecEvent::Manifest { manifest, sig }) => {
                    *forwarded = true;
                    *self.manifest.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((manifest.clone(), sig.clone()));
                    let _ = tx.send(line(&ExecLine::Manifest { manifest, sig })).await;
                }
                Some(ExecEvent::Plan {
                    approval_required,
                    document,
                }) => {
                    *forwarded = true;
                    let plan = ExecLine::Plan {
                        approval_required,
                        document,
                    };
                    let _ = tx.send(line(&plan)).await;
                }
                Some(ExecEvent::Exit(code)) => return ExecLine::Exit { code },
                Some(ExecEvent::Failed { code, message }) => {
                    return ExecLine::Failed { code, message }
                }
                None => {
                    self.s.cluster.cancel(self.command_id);
                    return ExecLine::Failed {
                        code: CommandFailure::TimedOut,
                        message: format!("no result within {:?}", self.timeout),
                    };
                }
            }
        }
    }

    /// Count the outcome and record it in the audit log.
    async fn finish(&self, last: &ExecLine) {
        let mut end = AuditEvent::success(self.by.actor(), action::APPLIANCE_EXEC, &self.target)
            .with("broker", self.broker.as_str())
            .with("command_id", self.command_id as i64);
        if let Some(from) = &self.rerouted_from {
            end.set("rerouted_from", from.as_str());
        }
        // The metric label: `exit`, a known failure code, or `failed` for anything else
        // (an agent's own codes must not grow the label set without bound).
        let label = match last {
            ExecLine::Failed { code, .. } => {
                end = end.with_outcome(Outcome::Failed).with("code", code.name());
                // The signed-ops refusals are a fixed set too: the customer's decisions,
                // counted by reason.
                if OUTCOME_LABELS.contains(code)
                    || CommandFailure::SIGNED_OPS_REFUSALS.contains(code)
                {
                    code.name()
                } else {
                    "failed"
                }
            }
            ExecLine::Exit { code } => {
                end = end.with("exit_code", *code as i64);
                "exit"
            }
            ExecLine::Started { .. }
            | ExecLine::Output { .. }
            | ExecLine::Manifest { .. }
            | ExecLine::Plan { .. } => "failed",
        };
        // The appliance's signed manifest goes with the outcome: whole if it fits an
        // entry, else by hash (the appliance's own log holds every one whole).
        if let Some((manifest, sig)) = self
            .manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            end = end.with(
                "manifest_sha256",
                crate::domain::token::sha256_hex(manifest.as_bytes()),
            );
            if manifest.len() + sig.len() < 3 * 1024 {
                end = end.with("manifest", manifest).with("manifest_sig", sig);
            }
        }
        let metrics = &self.s.metrics;
        metrics
            .commands
            .get_or_create(&Reason { reason: label })
            .inc();
        match self
            .s
            .domain
            .store
            .command_ended(&self.in_flight, &end, crate::now_unix())
            .await
        {
            Ok(true) => {}
            // Declared lost by another replica (this one's heartbeat went stale): that
            // outcome stands, one per command.
            Ok(false) => tracing::warn!(
                command_id = self.command_id,
                "a command's outcome was already written (replica_lost); not recorded again"
            ),
            Err(e) => {
                metrics.audit_failures.inc();
                tracing::error!(error = %e, "cannot audit a command's outcome");
            }
        }
    }
}

/// One NDJSON line.
fn line(l: &ExecLine) -> Result<bytes::Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(l).unwrap_or_default();
    v.push(b'\n');
    Ok(bytes::Bytes::from(v))
}
