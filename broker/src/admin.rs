//! The local admin listener (HTTP, default `127.0.0.1:7444`).
//!
//! - `GET /metrics` — Prometheus text format.
//! - `GET /healthz` — `{"status": "ok"|"draining", "sessions": N, "allowlist_version": V,
//!   "allowlist_entries": E}`.
//! - `GET /v1/sessions` — JSON array of live sessions.
//! - `POST /v1/sessions/{appliance_id}/commands` — run a command; the response streams
//!   NDJSON lines `{"stream": "stdout"|"stderr", "data": "..."}` and ends with
//!   `{"exit_code": N}` or `{"error": "<code>", "message": "..."}`. 404 when the appliance
//!   is not connected, 400 for an invalid request. Signed operations (agents announcing
//!   `signed-ops/1`): the body may carry `approval` (the document's exact bytes),
//!   `approval_sig` (its armor), `request_id`, `reason` and `plan`; the answer then has
//!   `{"manifest": "<exact bytes>", "manifest_sig": "<armor>"}` before the final line
//!   (`{"plan": "<document>", "approval_required": B}` for a plan), and a refusal's final
//!   line names the reason (`approval_required`, `approval_invalid`, ...).
//! - `POST /v1/sessions/{appliance_id}/tunnels` — break glass (agents announcing
//!   `tunnel/1`): `{"resource", "privilege", "duration_s", "max_connections",
//!   "idle_timeout_s", "recipient", "approval", "approval_sig", "request_id", "reason",
//!   "plan"}`. 200 `{"session_id", "listen", "expires_at_ms"}`: the broker listens on
//!   that loopback address, one tunnel connection per TCP connection; 200 `{"plan"}` for
//!   a plan; 403 `{"error": "<reason>", "reason": "refused"|..., "message"}` when the
//!   agent refused or ended it.
//! - `GET /v1/tunnels` — the tunnels opened here: session id, appliance, listen address,
//!   expiry, why it ended and why each connection closed.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tether_proto::{CommandKind, OutputStream};
use tokio_util::sync::CancellationToken;

use crate::server::{Broker, CommandError, CommandEvent, CommandSpec};
use tether_proto::codec::Codec as _;

/// Largest admin request body: 64 KiB.
pub const MAX_BODY: usize = 64 * 1024;
/// Default command deadline when the request gives none: 30 s.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One row of `GET /v1/sessions`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionView {
    /// The appliance.
    pub appliance_id: String,
    /// Broker-assigned session id.
    pub session_id: u64,
    /// RFC 3339 time the session was established.
    pub connected_at: String,
    /// SHA-256 of the certificate, lowercase hex.
    pub fingerprint: String,
    /// The agent's address.
    pub remote: String,
    /// The transport the session uses: `quic` or `tcp`.
    #[serde(default = "tether_api::brokers::default_transport")]
    pub transport: String,
    /// Agent version.
    pub agent_version: String,
    /// Capabilities the agent announced in `Hello` (`exec`, `shell`, `max_frame_len`).
    pub capabilities: Vec<String>,
    /// Certificate `notAfter`, ms since the epoch.
    pub cert_not_after_ms: i64,
    /// Last heartbeat, ms since the epoch (0 = none yet).
    pub last_heartbeat_ms: i64,
    /// Trust state reported by the agent.
    pub trust_state: String,
    /// The agent's last `Status` entries (signed operations: policy, phases, approvers,
    /// privsep, audit head).
    #[serde(default)]
    pub agent_status: std::collections::BTreeMap<String, String>,
}

/// Body of `POST /v1/sessions/{appliance_id}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Deadline in ms (default 30000).
    pub timeout_ms: Option<u64>,
    /// `exec` (default) or `shell`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Environment variable names the command may inherit from the agent.
    #[serde(default)]
    pub env: Vec<String>,
    /// Signed operations: the customer's approval document, its exact bytes.
    #[serde(default)]
    pub approval: Option<String>,
    /// Signed operations: the approval's SSHSIG armor (`approval.json.sig`).
    #[serde(default)]
    pub approval_sig: Option<String>,
    /// Signed operations: the vendor's request id.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Signed operations: why.
    #[serde(default)]
    pub reason: Option<String>,
    /// Signed operations: classify only and answer the approval document to sign
    /// (`{"plan": "<document>", "approval_required": bool}`); run nothing.
    #[serde(default)]
    pub plan: bool,
}

impl CommandBody {
    /// The signed-ops part, if the body has any.
    fn signed(&self) -> Option<tether_proto::SignedOps> {
        let any = self.approval.is_some()
            || self.approval_sig.is_some()
            || self.request_id.is_some()
            || self.reason.is_some()
            || self.plan;
        any.then(|| {
            tether_proto::cluster::SignedCommand {
                request_id: self.request_id.clone().unwrap_or_default(),
                reason: self.reason.clone().unwrap_or_default(),
                approval: self.approval.clone().unwrap_or_default(),
                approval_sig: self.approval_sig.clone().unwrap_or_default(),
                plan: self.plan,
            }
            .to_wire()
        })
    }
}

/// Body of `POST /v1/sessions/{appliance_id}/tunnels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelBody {
    /// The customer's name of the resource.
    pub resource: String,
    /// The privilege, by the customer's name.
    pub privilege: String,
    /// Session length from activation, in seconds.
    pub duration_s: u32,
    /// Most connections at once (default 1).
    #[serde(default = "one")]
    pub max_connections: u16,
    /// Idle limit per connection, in seconds (default 300).
    #[serde(default = "five_minutes")]
    pub idle_timeout_s: u32,
    /// The operator's one-time key the credential is sealed to (default none).
    #[serde(default)]
    pub recipient: String,
    /// The customer's approval document, its exact bytes.
    #[serde(default)]
    pub approval: String,
    /// Its SSHSIG armor.
    #[serde(default)]
    pub approval_sig: String,
    /// The vendor's request id.
    #[serde(default)]
    pub request_id: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Answer the approval document to sign; open nothing.
    #[serde(default)]
    pub plan: bool,
}

fn one() -> u16 {
    1
}

fn five_minutes() -> u32 {
    300
}

/// A JSON error body `{"error": code, "message": ...}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

/// The admin router.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/{appliance_id}/commands", post(command))
        .route("/v1/sessions/{appliance_id}/tunnels", post(tunnel))
        .route("/v1/tunnels", get(tunnels))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(broker)
}

/// Serve the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(broker))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(b): State<Arc<Broker>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.metrics().render(),
    )
        .into_response()
}

async fn healthz(State(b): State<Arc<Broker>>) -> Response {
    let snap = b.allowlist().snapshot();
    let status = if b.is_draining() { "draining" } else { "ok" };
    let code = if b.is_draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(serde_json::json!({
            "status": status,
            "sessions": b.sessions().len(),
            "allowlist_version": snap.version(),
            "allowlist_entries": snap.len(),
        })),
    )
        .into_response()
}

async fn sessions(State(b): State<Arc<Broker>>) -> Json<Vec<SessionView>> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rows: Vec<SessionView> = b
        .sessions()
        .list()
        .into_iter()
        .map(|s| SessionView {
            appliance_id: s.appliance.to_string(),
            session_id: s.session_id,
            connected_at: humantime::format_rfc3339_millis(s.connected_at).to_string(),
            fingerprint: s.fingerprint.to_hex(),
            remote: s.remote.to_string(),
            transport: s.connection.transport().as_str().to_owned(),
            agent_version: s.agent_version.clone(),
            capabilities: s.capabilities.clone(),
            cert_not_after_ms: s.cert_not_after_ms.load(Relaxed),
            last_heartbeat_ms: s.last_heartbeat_ms.load(Relaxed),
            trust_state: format!("{:?}", s.trust_state()),
            agent_status: s
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .iter()
                .cloned()
                .collect(),
        })
        .collect();
    rows.sort_by(|a, b| a.appliance_id.cmp(&b.appliance_id));
    Json(rows)
}

async fn command(
    State(b): State<Arc<Broker>>,
    Path(appliance_id): Path<String>,
    body: Result<Json<CommandBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let kind = match body.kind.as_deref() {
        None | Some("exec") => CommandKind::Exec,
        Some("shell") => CommandKind::Shell,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("unknown kind {other:?}; use \"exec\" or \"shell\""),
            )
        }
    };
    let signed = body.signed();
    let spec = CommandSpec {
        signed,
        argv: body.argv,
        kind,
        env_allowlist: body.env,
        timeout: body
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_COMMAND_TIMEOUT),
    };
    let rx = match b.run_command(&appliance_id, spec).await {
        Ok(rx) => rx,
        Err(CommandError::NotConnected(id)) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_connected",
                format!("appliance {id} has no live session on this broker"),
            )
        }
        Err(CommandError::Invalid(m)) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
        Err(e @ CommandError::ShellNotAllowed(_)) => {
            return error(StatusCode::CONFLICT, e.code(), e.to_string())
        }
        Err(e @ CommandError::ConnectionLost(_)) => {
            return error(StatusCode::BAD_GATEWAY, e.code(), e.to_string())
        }
    };
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let line = match ev {
            CommandEvent::Output { stream, data } => serde_json::json!({
                "stream": match stream { OutputStream::Stdout => "stdout", OutputStream::Stderr => "stderr" },
                "data": String::from_utf8_lossy(&data),
            }),
            CommandEvent::Exit(code) => serde_json::json!({ "exit_code": code }),
            CommandEvent::Failed { code, message } => {
                serde_json::json!({ "error": code, "message": message })
            }
            // Canonical JSON and SSHSIG armor are UTF-8: the strings carry the exact bytes.
            CommandEvent::Manifest { manifest, sig } => serde_json::json!({
                "manifest": String::from_utf8_lossy(&manifest),
                "manifest_sig": String::from_utf8_lossy(&sig),
            }),
            CommandEvent::Plan {
                approval_required,
                document,
            } => serde_json::json!({
                "plan": String::from_utf8_lossy(&document),
                "approval_required": approval_required,
            }),
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn tunnel(
    State(b): State<Arc<Broker>>,
    Path(appliance_id): Path<String>,
    body: Result<Json<TunnelBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let open = tether_proto::TunnelOpen {
        request_id: body.request_id,
        reason: body.reason,
        resource: body.resource,
        privilege: body.privilege,
        duration_s: body.duration_s,
        max_connections: body.max_connections,
        idle_timeout_s: body.idle_timeout_s,
        recipient: body.recipient,
        approval: body.approval.into_bytes().into(),
        approval_sig: body.approval_sig.into_bytes().into(),
        plan_only: body.plan,
    };
    if let Err(e) = tether_proto::Frame::TunnelOpen(open.clone()).check() {
        return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
    }
    match b.open_tunnel(&appliance_id, open).await {
        Ok(crate::tunnel::Opened::Ready(v)) => Json(serde_json::json!({
            "session_id": v.session_id,
            "listen": v.listen,
            "expires_at_ms": v.expires_at_ms,
            "sealed_credential": v.sealed_credential,
        }))
        .into_response(),
        Ok(crate::tunnel::Opened::Plan(doc)) => Json(serde_json::json!({
            "plan": String::from_utf8_lossy(&doc),
        }))
        .into_response(),
        Ok(crate::tunnel::Opened::Ended(reason, code, message)) => (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({
                "error": if code.is_empty() { reason.clone() } else { code },
                "reason": reason,
                "message": message,
            })),
        )
            .into_response(),
        Err(CommandError::NotConnected(id)) => error(
            StatusCode::NOT_FOUND,
            "not_connected",
            format!("appliance {id} has no live session on this broker"),
        ),
        Err(CommandError::Invalid(m)) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.code(), e.to_string()),
    }
}

async fn tunnels(State(b): State<Arc<Broker>>) -> Json<Vec<crate::tunnel::TunnelView>> {
    Json(b.tunnels().list())
}
