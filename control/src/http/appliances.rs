//! The appliance routes of the operator API (see [`crate::domain::appliances`] for the
//! rules) and `GET /v1/fleet/trust`.
//!
//! - `POST /v1/appliances` `{"id", "tenant"?, "binding"}` → 201 [`ApplianceSummary`];
//!   400 `invalid_appliance_id` / `bad_request`, 409 `conflict`.
//! - `GET /v1/appliances?status=&tenant=&trust_state=&after=&limit=` →
//!   [`ApplianceList`]; 400 `invalid_query`.
//! - `GET /v1/appliances/{id}` → [`ApplianceDetail`]; 404 `not_found`.
//! - `POST /v1/appliances/{id}/disable|enable|revoke` → [`StatusResponse`]; 409
//!   `appliance_revoked`.
//! - `POST /v1/appliances/{id}/renew` → [`RenewResponse`].
//! - `POST /v1/appliances/{id}/tokens` `{"ttl_secs"?}` → [`TokenResponse`].
//!
//! Every route authenticates the operator first (reads need `viewer`, changes
//! `operator`), so a refused caller learns nothing about the fleet.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::appliances::{
    ApplianceDetail, ApplianceList, ApplianceStatus, ApplianceSummary, ListQuery, RegisterRequest,
    RenewResponse, StatusResponse, TokenRequest, TokenResponse,
};
use tether_api::operators::Role;
use tether_api::trust::FleetTrust;
use tether_api::ErrorBody;
use tether_audit::{self as audit, action, AuditEvent};

use crate::domain::operators::{authorize, Caller, Principal};
use crate::domain::{self, appliances};
use crate::http::server::PeerCertificate;
use crate::http::{body_error, internal, json_rejection, ApiError, AppState};
use crate::store::UnixSeconds;

/// Authenticate the operator behind `peer` for `what` on `target` with at least `role`.
pub(crate) async fn operator(
    s: &AppState,
    peer: &PeerCertificate,
    role: Role,
    what: &str,
    target: &str,
    now: UnixSeconds,
) -> Result<Caller, ApiError> {
    let op = authorize(
        &s.domain,
        Principal::Certificate(peer.der()),
        role,
        what,
        target,
        now,
    )
    .await?;
    Ok(Caller::Operator(op))
}

/// Authenticate an operator (operator+) for a change to appliance `id` as `what`, then
/// start the change ([`appliances::begin_change`]).
async fn begin_change(
    s: &AppState,
    peer: &PeerCertificate,
    id: &str,
    what: &str,
    now: UnixSeconds,
) -> Result<(Caller, AuditEvent), ApiError> {
    let target = audit::clip(id, audit::MAX_TARGET_LEN);
    let by = operator(s, peer, Role::Operator, what, target, now).await?;
    let event = appliances::begin_change(&s.domain.registry(), &by, id, what, now).await?;
    Ok((by, event))
}

async fn change_status(
    s: AppState,
    peer: PeerCertificate,
    id: String,
    status: ApplianceStatus,
) -> Result<Json<StatusResponse>, ApiError> {
    let now = crate::now_unix();
    let what = appliances::status_action(status);
    let (by, event) = begin_change(&s, &peer, &id, what, now).await?;
    let registry = s.domain.registry();
    Ok(Json(
        appliances::change_status(&registry, &by, event, &id, status, now).await?,
    ))
}

/// `POST /v1/appliances` (operator+).
#[utoipa::path(
    post,
    path = "/v1/appliances",
    tag = "appliances",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "registered", body = ApplianceSummary),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn register(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ApplianceSummary>), ApiError> {
    let now = crate::now_unix();
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_REGISTER,
        "",
        now,
    )
    .await?;
    let Json(req) = body.map_err(json_rejection)?;
    let summary = appliances::register(&s.domain.registry(), &by, req, now).await?;
    Ok((StatusCode::CREATED, Json(summary)))
}

/// `GET /v1/appliances` (viewer+).
#[utoipa::path(
    get,
    path = "/v1/appliances",
    tag = "appliances",
    params(ListQuery),
    responses(
        (status = 200, description = "a page of appliances", body = ApplianceList),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ApplianceList>, ApiError> {
    let now = crate::now_unix();
    operator(&s, &peer, Role::Viewer, action::APPLIANCE_LIST, "", now).await?;
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    Ok(Json(appliances::list(&s.domain.registry(), q, now).await?))
}

/// `GET /v1/appliances/{id}` (viewer+).
#[utoipa::path(
    get,
    path = "/v1/appliances/{id}",
    tag = "appliances",
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "the appliance and its certificates", body = ApplianceDetail),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn show(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<ApplianceDetail>, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&id, audit::MAX_TARGET_LEN);
    operator(&s, &peer, Role::Viewer, action::APPLIANCE_SHOW, target, now).await?;
    Ok(Json(
        appliances::show(&s.domain.registry(), &id, now).await?,
    ))
}

/// `POST /v1/appliances/{id}/disable` (operator+).
#[utoipa::path(
    post,
    path = "/v1/appliances/{id}/disable",
    tag = "appliances",
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "disabled", body = StatusResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn disable(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    change_status(s, peer, id, ApplianceStatus::Disabled).await
}

/// `POST /v1/appliances/{id}/enable` (operator+).
#[utoipa::path(
    post,
    path = "/v1/appliances/{id}/enable",
    tag = "appliances",
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "enabled", body = StatusResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn enable(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    change_status(s, peer, id, ApplianceStatus::Active).await
}

/// `POST /v1/appliances/{id}/revoke` (operator+).
#[utoipa::path(
    post,
    path = "/v1/appliances/{id}/revoke",
    tag = "appliances",
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "revoked", body = StatusResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    change_status(s, peer, id, ApplianceStatus::Revoked).await
}

/// `POST /v1/appliances/{id}/renew` (operator+).
#[utoipa::path(
    post,
    path = "/v1/appliances/{id}/renew",
    tag = "appliances",
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "manual renewal triggered", body = RenewResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn renew(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
) -> Result<Json<RenewResponse>, ApiError> {
    let now = crate::now_unix();
    let what = action::APPLIANCE_REQUEST_RENEWAL;
    let (by, event) = begin_change(&s, &peer, &id, what, now).await?;
    let registry = s.domain.registry();
    Ok(Json(
        appliances::request_renewal(&registry, &by, event, &id, now).await?,
    ))
}

/// `POST /v1/appliances/{id}/tokens` (operator+).
#[utoipa::path(
    post,
    path = "/v1/appliances/{id}/tokens",
    tag = "appliances",
    request_body = TokenRequest,
    params(("id" = String, Path, description = "Appliance id: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "a one-time enrollment token", body = TokenResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn create_token(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(id): Path<String>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Json<TokenResponse>, ApiError> {
    let now = crate::now_unix();
    let (by, event) = begin_change(&s, &peer, &id, action::TOKEN_CREATE, now).await?;
    let registry = s.domain.registry();
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            let e = domain::refuse(registry.store.as_ref(), event, body_error(e), now).await;
            return Err(e.into());
        }
    };
    let ttl = req.ttl_secs.map(Duration::from_secs);
    Ok(Json(
        appliances::create_token(&registry, &by, event, &id, ttl, now).await?,
    ))
}

/// `GET /v1/fleet/trust` (viewer+).
#[utoipa::path(get, path = "/v1/fleet/trust", tag = "fleet", responses(
        (status = 200, description = "counts by trust state and the active alerts", body = FleetTrust),
        (status = 401, description = "no client certificate, or one control did not issue", body = ErrorBody),
        (status = 403, description = "refused (see `error`)", body = ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = ErrorBody),
), security(("operator_certificate" = [])))]
pub async fn fleet_trust(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<FleetTrust>, ApiError> {
    let now = crate::now_unix();
    let what = domain::operators::action::FLEET_TRUST;
    operator(&s, &peer, Role::Viewer, what, "", now).await?;
    let settings = &s.domain.settings.trust;
    domain::trust::fleet_trust(s.domain.store.as_ref(), settings, now)
        .await
        .map(Json)
        .map_err(internal)
}
