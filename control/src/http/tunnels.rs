//! Break-glass tunnels over the API (docs/PROTOCOL.md §12.5). Control relays; the
//! appliance decides.
//!
//! - `POST /v1/appliances/{id}/tunnels` (operator+): with `"plan": true`, the approval
//!   document the appliance expects (200 [`TunnelPlan`]); else open the session the
//!   customer's approval allows (201 [`TunnelSession`]). The appliance's refusals come
//!   back as 403 with its reason (`approval_invalid`, `approval_replayed`,
//!   `denied_by_policy`, ...) or 409 (`limit`, `not_active`); 409 `offline` or
//!   `broker_unsupported` when no broker can take it.
//! - `GET /v1/tunnels`, `GET /v1/tunnels/{id}` (viewer+): the sessions control relays.
//! - `POST /v1/tunnels/{id}/credential` (operator+, only the operator who opened it):
//!   the credential still sealed to their one-time key, once; 409
//!   `credential_already_fetched` after that. Control keeps no copy, sealed or not.
//! - `DELETE /v1/tunnels/{id}` (operator+): the vendor's close.
//! - `GET /v1/tunnels/{id}/connect` (operator+, the opener; `Upgrade: tether-tunnel/1`):
//!   one TCP connection through the session. Control asks the broker holding the
//!   appliance to dial back (`GET /v1/brokers/tunnels/{conn}`, broker certificate), then
//!   copies bytes between the two upgraded connections without reading them.
//!
//! Every open, plan, refusal, credential hand-over, close and end is an audit entry
//! (`appliance.tunnel.*`); refused connections and listings are audited too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hyper_util::rt::TokioIo;
use tether_api::operators::Role;
use tether_api::tunnels::{SealedCredential, TunnelList, TunnelPlan, TunnelRequest, TunnelSession};
use tether_audit::{self as audit, action, AuditEvent};
use tether_proto::cluster::TunnelAnswer;
use tether_proto::relay;
use tracing::{info, warn};

use crate::cluster::tunnel::{self as tunnels, CredentialError, Record, RouteError};
use crate::domain::{self, Error, ErrorKind};
use crate::http::appliances::operator;
use crate::http::server::PeerCertificate;
use crate::http::{body_error, ApiError, AppState};
use crate::metrics::{DirectionLabel, EventLabel};

/// The error for a request control could not route.
fn route_error(e: RouteError, appliance: &str) -> Error {
    match e {
        RouteError::Offline => Error::new(
            ErrorKind::Conflict,
            e.code(),
            format!("appliance {appliance} is not connected to any broker"),
        ),
        RouteError::BrokerUnsupported => Error::new(
            ErrorKind::Conflict,
            e.code(),
            "the broker holding the appliance does not relay tunnels (upgrade it)",
        ),
        RouteError::BrokerLost => Error::new(
            ErrorKind::Upstream,
            e.code(),
            "the broker holding the appliance went away",
        ),
        RouteError::TimedOut => Error::new(
            ErrorKind::Upstream,
            e.code(),
            "no answer from the appliance in time",
        ),
    }
}

/// `POST /v1/appliances/{id}/tunnels`.
#[utoipa::path(post, path = "/v1/appliances/{id}/tunnels", tag = "tunnels", request_body = TunnelRequest,
    params(("id" = String, Path, description = "Appliance id")),
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
        (status = 200, description = "a plan: the approval document to sign", body = TunnelPlan),
        (status = 201, description = "the session is active", body = TunnelSession),
        (status = 400, description = "`invalid_tunnel`, `invalid_id`; `invalid`: the appliance found the request malformed (a recipient for a privilege that mints nothing)", body = tether_api::ErrorBody),
        (status = 403, description = "not an operator; or the appliance refused: `approval_invalid`, `approval_replayed`, `approval_expired`, `denied_by_policy`, `phase_disabled`, ...", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance", body = tether_api::ErrorBody),
        (status = 409, description = "`offline`, `broker_unsupported`, `appliance_disabled`, `appliance_revoked`, `limit`, `not_active`", body = tether_api::ErrorBody),
        (status = 502, description = "`broker_lost`, `timed_out`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn open(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(appliance): Path<String>,
    body: Result<Json<TunnelRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&appliance, audit::MAX_TARGET_LEN).to_owned();
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_TUNNEL_OPEN,
        &target,
        now,
    )
    .await?;
    let mut event = AuditEvent::success(by.actor(), action::APPLIANCE_TUNNEL_OPEN, &target);
    let checked = async {
        domain::exec::check_id(&appliance)?;
        let Json(req) = body.map_err(body_error)?;
        let req = domain::tunnel::check_request(req)?;
        domain::exec::check_appliance(s.domain.store.as_ref(), &appliance).await?;
        Ok::<_, Error>(req)
    };
    let req = match checked.await {
        Ok(r) => r,
        Err(e) if e.kind.is_server_fault() => return Err(e.into()),
        Err(e) => return Err(refuse(&s, event, e, now).await),
    };
    event = event
        .with("request_id", req.request_id.as_str())
        .with("reason", audit::clip(&req.reason, 512))
        .with("resource", req.resource.as_str())
        .with("privilege", req.privilege.as_str())
        .with("duration_s", i64::from(req.duration_s))
        .with("max_connections", i64::from(req.max_connections));
    if req.plan {
        event.set("plan", true);
    } else {
        event.set(
            "approval_sha256",
            crate::domain::token::sha256_hex(req.approval.as_bytes()),
        );
    }
    let id = tunnels::new_id();
    let (plan, recipient) = (req.plan, req.recipient.clone());
    let (request_id, reason) = (req.request_id.clone(), req.reason.clone());
    let (resource, privilege) = (req.resource.clone(), req.privilege.clone());
    let (broker, answer) = match s.cluster.tunnel_open(&appliance, &id, req).await {
        Ok(x) => x,
        Err(e) => {
            s.metrics.tunnel_event("failed");
            return Err(refuse(&s, event, route_error(e, &appliance), now).await);
        }
    };
    event.set("broker", broker.as_str());
    match answer {
        TunnelAnswer::Plan { document } if plan => {
            s.metrics.tunnel_event("planned");
            record(&s, &event).await;
            Ok((StatusCode::OK, Json(TunnelPlan { document, broker })).into_response())
        }
        TunnelAnswer::Ready {
            session_id,
            expires_at_ms,
            sealed_credential,
        } if !plan => {
            let view = TunnelSession {
                id: id.clone(),
                appliance: appliance.clone(),
                broker,
                operator: by.to_string(),
                request_id,
                reason,
                resource,
                privilege,
                session_id,
                opened_at: now,
                expires_at_ms,
                state: "active".into(),
                ended: None,
                credential: !sealed_credential.is_empty(),
                credential_fetched: false,
                connections: 0,
                bytes_up: 0,
                bytes_down: 0,
            };
            event = event
                .with("tunnel", id.as_str())
                .with("session_id", session_id.to_string())
                .with("expires_at_ms", expires_at_ms)
                .with("credential", view.credential);
            s.cluster
                .tunnel_insert(Record::new(view.clone(), recipient, sealed_credential));
            s.metrics.tunnel_event("opened");
            s.metrics
                .tunnels_active
                .set(s.cluster.tunnels_active() as i64);
            record(&s, &event).await;
            info!(by = %by, %appliance, tunnel = %id, session_id, "tunnel session active");
            Ok((StatusCode::CREATED, Json(view)).into_response())
        }
        TunnelAnswer::Ended {
            reason,
            code,
            message,
        } => {
            s.metrics.tunnel_event("refused");
            let e = domain::tunnel::refusal(&reason, &code, &message);
            Err(refuse(&s, event, e, now).await)
        }
        other => {
            s.metrics.tunnel_event("failed");
            warn!(answer = ?other, "the broker answered a tunnel request out of turn");
            let e = Error::new(
                ErrorKind::Upstream,
                "protocol_error",
                "the broker answered something else than was asked",
            );
            Err(refuse(&s, event, e, now).await)
        }
    }
}

/// Refuse with `e`: audit it (code and outcome) and answer it.
async fn refuse(s: &AppState, event: AuditEvent, e: Error, now: i64) -> ApiError {
    domain::refuse(s.domain.store.as_ref(), event, e, now)
        .await
        .into()
}

/// Write a success entry; a failure to write is counted and logged, not hidden.
async fn record(s: &AppState, event: &AuditEvent) {
    if let Err(e) = s.domain.store.append_audit(event, crate::now_unix()).await {
        s.metrics.audit_failures.inc();
        tracing::error!(error = %e, action = %event.action, "cannot audit a tunnel event");
    }
}

fn not_found(id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        "not_found",
        format!("no tunnel session {id}"),
    )
}

/// `GET /v1/tunnels`.
#[utoipa::path(get, path = "/v1/tunnels", tag = "tunnels",
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator (not a broker for the dial-back), or role too low", body = tether_api::ErrorBody),(status = 200, description = "live sessions first, then recently ended ones", body = TunnelList)),
    security(("operator_certificate" = [])))]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<TunnelList>, ApiError> {
    let now = crate::now_unix();
    operator(
        &s,
        &peer,
        Role::Viewer,
        action::APPLIANCE_TUNNEL_LIST,
        "",
        now,
    )
    .await?;
    Ok(Json(TunnelList {
        items: s.cluster.tunnels(),
    }))
}

/// `GET /v1/tunnels/{id}`.
#[utoipa::path(get, path = "/v1/tunnels/{id}", tag = "tunnels",
    params(("id" = String, Path, description = "Tunnel session id")),
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator (not a broker for the dial-back), or role too low", body = tether_api::ErrorBody),
        (status = 200, description = "the session", body = TunnelSession),
        (status = 404, description = "no such session", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = [])))]
pub async fn show(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<TunnelSession>, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&id, audit::MAX_TARGET_LEN);
    operator(
        &s,
        &peer,
        Role::Viewer,
        action::APPLIANCE_TUNNEL_LIST,
        target,
        now,
    )
    .await?;
    s.cluster
        .tunnel(&id)
        .map(Json)
        .ok_or_else(|| not_found(&id).into())
}

/// `POST /v1/tunnels/{id}/credential`.
#[utoipa::path(post, path = "/v1/tunnels/{id}/credential", tag = "tunnels",
    params(("id" = String, Path, description = "Tunnel session id")),
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 200, description = "the credential sealed to the operator's one-time key (once)", body = SealedCredential),
        (status = 403, description = "`not_your_tunnel`: another operator opened it", body = tether_api::ErrorBody),
        (status = 404, description = "`not_found`, or `no_credential`: the appliance minted none", body = tether_api::ErrorBody),
        (status = 409, description = "`credential_already_fetched`, or `not_active`: the session ended first", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = [])))]
pub async fn credential(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<SealedCredential>, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&id, audit::MAX_TARGET_LEN).to_owned();
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_TUNNEL_CREDENTIAL,
        &target,
        now,
    )
    .await?;
    let event = AuditEvent::success(by.actor(), action::APPLIANCE_TUNNEL_CREDENTIAL, &target);
    match s.cluster.tunnel_take_credential(&id, &by.to_string()) {
        Ok((recipient, sealed)) => {
            record(&s, &event.with("recipient", recipient.as_str())).await;
            info!(by = %by, tunnel = %id, "sealed credential handed over");
            Ok(Json(SealedCredential {
                id,
                recipient,
                sealed,
            }))
        }
        Err(e) => {
            let e = match e {
                CredentialError::NotFound => not_found(&id),
                CredentialError::NotYours => Error::new(
                    ErrorKind::Forbidden,
                    "not_your_tunnel",
                    "only the operator who opened the session may fetch its credential",
                ),
                CredentialError::NoCredential => Error::new(
                    ErrorKind::NotFound,
                    "no_credential",
                    "the appliance minted no credential for this session",
                ),
                CredentialError::SessionEnded => Error::new(
                    ErrorKind::Conflict,
                    "not_active",
                    "the session ended before its credential was fetched; control kept no copy",
                ),
                CredentialError::AlreadyFetched => Error::new(
                    ErrorKind::Conflict,
                    "credential_already_fetched",
                    "the credential was handed over once already; control keeps no copy",
                ),
            };
            Err(refuse(&s, event, e, now).await)
        }
    }
}

/// `DELETE /v1/tunnels/{id}`.
#[utoipa::path(delete, path = "/v1/tunnels/{id}", tag = "tunnels",
    params(("id" = String, Path, description = "Tunnel session id")),
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator (not a broker for the dial-back), or role too low", body = tether_api::ErrorBody),
        (status = 202, description = "the broker was told to close it; the appliance ends it as `closed`", body = TunnelSession),
        (status = 404, description = "no such session", body = tether_api::ErrorBody),
        (status = 409, description = "`not_active`: it ended already, or its broker is unreachable", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = [])))]
pub async fn close(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&id, audit::MAX_TARGET_LEN).to_owned();
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_TUNNEL_CLOSE,
        &target,
        now,
    )
    .await?;
    let event = AuditEvent::success(by.actor(), action::APPLIANCE_TUNNEL_CLOSE, &target);
    let Some(t) = s.cluster.tunnel(&id) else {
        return Err(refuse(&s, event, not_found(&id), now).await);
    };
    if !s.cluster.tunnel_close(&id) {
        let e = Error::new(
            ErrorKind::Conflict,
            "not_active",
            "the session ended already, or its broker is unreachable (the appliance's timer still ends it)",
        );
        return Err(refuse(&s, event, e, now).await);
    }
    s.metrics.tunnel_event("closed");
    record(&s, &event.with("appliance", t.appliance.as_str())).await;
    Ok((StatusCode::ACCEPTED, Json(t)).into_response())
}

fn upgrade_required() -> Response {
    ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        "upgrade_required",
        format!("send Upgrade: {}", relay::UPGRADE),
    )
    .into_response()
}

fn wants_upgrade(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(relay::UPGRADE))
}

fn switching() -> Response {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, relay::UPGRADE)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `GET /v1/tunnels/{id}/connect`.
#[utoipa::path(get, path = "/v1/tunnels/{id}/connect", tag = "tunnels",
    params(("id" = String, Path, description = "Tunnel session id")),
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 101, description = "switching to `tether-tunnel/1`: relay chunks (see `tether_proto::relay`), `connected` first"),
        (status = 403, description = "`not_your_tunnel`", body = tether_api::ErrorBody),
        (status = 404, description = "no such session", body = tether_api::ErrorBody),
        (status = 409, description = "`not_active`, `offline`, `broker_unsupported`", body = tether_api::ErrorBody),
        (status = 426, description = "`upgrade_required`", body = tether_api::ErrorBody),
        (status = 502, description = "`broker_lost`, `timed_out`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = [])))]
pub async fn connect(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&id, audit::MAX_TARGET_LEN).to_owned();
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_TUNNEL_CONNECT,
        &target,
        now,
    )
    .await?;
    if !wants_upgrade(&req) {
        return Ok(upgrade_required());
    }
    let event = AuditEvent::success(by.actor(), action::APPLIANCE_TUNNEL_CONNECT, &target);
    let refused = |code: &'static str| {
        s.metrics
            .tunnel_connections
            .get_or_create(&EventLabel {
                event: code.to_owned(),
            })
            .inc();
    };
    let session = match s.cluster.tunnel(&id) {
        None => return Err(refuse(&s, event, not_found(&id), now).await),
        Some(t) if t.operator != by.to_string() => {
            refused("not_your_tunnel");
            let e = Error::new(
                ErrorKind::Forbidden,
                "not_your_tunnel",
                "only the operator who opened the session may connect through it",
            );
            return Err(refuse(&s, event, e, now).await);
        }
        Some(t) if t.ended.is_some() => {
            refused("not_active");
            let e = Error::new(
                ErrorKind::Conflict,
                "not_active",
                format!(
                    "the session ended: {}",
                    t.ended.as_deref().unwrap_or_default()
                ),
            );
            return Err(refuse(&s, event, e, now).await);
        }
        Some(t) => t,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let dial = match s.cluster.tunnel_connect(&session).await {
        Ok(d) => d,
        Err(e) => {
            refused(e.code());
            return Err(refuse(&s, event, route_error(e, &session.appliance), now).await);
        }
    };
    let metrics = s.metrics.clone();
    let cluster = s.cluster.clone();
    tokio::spawn(async move {
        let mut dial = dial;
        let mut op = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                warn!(tunnel = %id, error = %e, "tunnel connection upgrade failed");
                return;
            }
        };
        metrics
            .tunnel_connections
            .get_or_create(&EventLabel {
                event: "relayed".into(),
            })
            .inc();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut op_counted = Counted(&mut op, up.clone());
        let mut dial_counted = Counted(&mut dial, down.clone());
        if let Err(e) = tokio::io::copy_bidirectional(&mut op_counted, &mut dial_counted).await {
            // An abrupt end (a TCP close without TLS close_notify) still relayed what it
            // relayed.
            tracing::debug!(tunnel = %id, error = %e, "tunnel connection ended with an error");
        }
        let (up, down) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
        metrics
            .tunnel_bytes
            .get_or_create(&DirectionLabel { direction: "up" })
            .inc_by(up);
        metrics
            .tunnel_bytes
            .get_or_create(&DirectionLabel { direction: "down" })
            .inc_by(down);
        cluster.tunnel_bytes(&id, up, down);
    });
    Ok(switching())
}

/// An upgraded connection that counts the bytes read from it.
struct Counted<'a, T>(&'a mut T, Arc<AtomicU64>);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.0).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// `GET /v1/brokers/tunnels/{conn}`: a broker dials back for a connection control asked
/// it for.
#[utoipa::path(get, path = "/v1/brokers/tunnels/{conn}", tag = "brokers",
    params(("conn" = String, Path, description = "The connection's one-time token")),
    responses(
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 101, description = "switching to `tether-tunnel/1`"),
        (status = 403, description = "not the current certificate of an active broker", body = tether_api::ErrorBody),
        (status = 404, description = "`unknown_connection`: not a connection control asked this broker for", body = tether_api::ErrorBody),
        (status = 426, description = "`upgrade_required`", body = tether_api::ErrorBody),
    ),
    security(("broker_certificate" = [])))]
pub async fn dial_back(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(conn): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let name =
        crate::domain::brokers::authenticate(&s.domain, peer.der(), crate::now_unix()).await?;
    if !wants_upgrade(&req) {
        return Ok(upgrade_required());
    }
    let Some(tx) = s.cluster.tunnel_dialed(&name, &conn) else {
        warn!(broker = %name, "dial-back for a connection nobody waits for");
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_connection",
            "control did not ask this broker for that connection (or it gave up waiting)",
        ));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(u) => {
                let _ = tx.send(TokioIo::new(u));
            }
            Err(e) => warn!(broker = %name, error = %e, "tunnel dial-back upgrade failed"),
        }
    });
    Ok(switching())
}
