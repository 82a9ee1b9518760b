//! The appliance routes of the operator API: register, list, show, disable, enable,
//! revoke, trigger a manual renewal, and create a one-time enrollment token.
//!
//! Every route authenticates with [`authorize`] first (reads need `viewer`, changes
//! `operator`), so a refused caller learns nothing about the fleet. Every change goes
//! through the store method that writes its [`AuditEvent`] (actor: the operator) in the
//! same transaction; a change the store refuses (`not_found`, `conflict`) or one refused
//! here after authorization is recorded as refused with its code.
//!
//! - `POST /v1/appliances` `{"id", "tenant"?, "binding"}` → 201 [`ApplianceSummary`];
//!   400 `invalid_appliance_id` / `bad_request`, 409 `conflict`.
//! - `GET /v1/appliances?status=&tenant=&trust_state=&after=&limit=` →
//!   [`ApplianceList`], ordered by id; `next` is the `after` of the next page (`null` on
//!   the last). `limit` 1..=[`MAX_LIST_LIMIT`], default [`DEFAULT_LIST_LIMIT`].
//! - `GET /v1/appliances/{id}` → [`ApplianceDetail`] (every certificate); 404 `not_found`.
//! - `POST /v1/appliances/{id}/disable|enable|revoke` → [`StatusResponse`]. A revoked
//!   appliance is neither disabled nor enabled (409 `appliance_revoked`): it comes back
//!   only by enrolling again with a fresh proof.
//! - `POST /v1/appliances/{id}/renew` → [`RenewResponse`] (the generation is bumped).
//! - `POST /v1/appliances/{id}/tokens` `{"ttl_secs"?}` → [`TokenResponse`]: the token is
//!   in the answer only; the store keeps its hash, the audit log a reference to the hash.
//!
//! The request and answer bodies are declared in [`tether_api::appliances`].

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::appliances::{
    ApplianceDetail, ApplianceList, ApplianceStatus, ApplianceSummary, CertificateInfo,
    CurrentCertificate, ListQuery, PlatformBinding, RegisterRequest, RenewResponse, StatusResponse,
    TokenRequest, TokenResponse, DEFAULT_LIST_LIMIT, DEFAULT_TENANT, MAX_LIST_LIMIT, MAX_TOKEN_TTL,
};
use tether_api::operators::Role;
use tether_audit::{self as audit, action, AuditEvent, Outcome};
use tether_identity::ApplianceId;
use tracing::info;

use crate::api::{json_rejection, ApiError, AppState};
use crate::enroll::{internal, record_refusal, rfc3339};
use crate::operators::{authorize, VerifiedOperator};
use crate::server::PeerCertificate;
use crate::store::{Appliance, ApplianceFilter, CertRecord, CertState, StoreError, UnixSeconds};
use crate::token::Token;
use crate::trust::evaluate;

/// Longest tenant name and binding field, in bytes.
pub const MAX_FIELD_LEN: usize = 256;

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    ApplianceId::new(id)
        .map(drop)
        .map_err(|e| bad("invalid_appliance_id", e.to_string()))
}

fn check_field(name: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_FIELD_LEN || value.chars().any(char::is_control) {
        return Err(bad(
            "bad_request",
            format!("{name} must be 1-{MAX_FIELD_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Refuse a binding control could never verify a proof against.
fn check_binding(binding: &PlatformBinding) -> Result<(), ApiError> {
    match binding {
        PlatformBinding::Aws { role_arn } => {
            if !crate::proof::aws::is_role_arn(role_arn) {
                return Err(bad(
                    "bad_request",
                    "binding.role_arn is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
                ));
            }
        }
        PlatformBinding::Gcp {
            project,
            service_account,
        } => {
            check_field("binding.project", project)?;
            check_field("binding.service_account", service_account)?;
        }
        PlatformBinding::K8s {
            issuer,
            namespace,
            service_account,
        } => {
            check_field("binding.issuer", issuer)?;
            check_field("binding.namespace", namespace)?;
            check_field("binding.service_account", service_account)?;
        }
        PlatformBinding::TokenOnly => {}
    }
    Ok(())
}

/// Record `event` as refused with `e`'s code (failed for a 5xx) and return `e`.
pub(crate) async fn refuse(
    s: &AppState,
    event: AuditEvent,
    e: ApiError,
    now: UnixSeconds,
) -> ApiError {
    let outcome = if e.status.is_server_error() {
        Outcome::Failed
    } else {
        Outcome::Refused
    };
    let event = event.with_outcome(outcome).with("code", e.code);
    record_refusal(s, &event, now).await;
    e
}

/// The answer for a store refusal of a change to appliance `id`.
fn store_error(id: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no appliance {id}"),
        ),
        StoreError::Conflict(_) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("appliance {id} already exists"),
        ),
        other => internal(other),
    }
}

fn not_found(id: &str) -> ApiError {
    store_error(id, StoreError::NotFound(String::new()))
}

fn current_of(cert: &CertRecord) -> CurrentCertificate {
    CurrentCertificate {
        serial: cert.serial.clone(),
        fingerprint: cert.fingerprint.clone(),
        not_after: rfc3339(cert.not_after),
    }
}

fn summary(
    a: Appliance,
    current: Option<&CertRecord>,
    s: &AppState,
    now: UnixSeconds,
) -> ApplianceSummary {
    ApplianceSummary {
        trust_state: evaluate(a.status, current, now, &s.config.trust),
        certificate: current.map(current_of),
        created_at: rfc3339(a.created_at),
        id: a.id,
        tenant: a.tenant,
        binding: a.binding,
        status: a.status,
        manual_renewal_generation: a.manual_renewal_generation,
    }
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
    let op = authorize(
        &s,
        &peer,
        Role::Operator,
        action::APPLIANCE_REGISTER,
        "",
        now,
    )
    .await?;
    let Json(req) = body.map_err(json_rejection)?;
    let target = audit::clip(&req.id, audit::MAX_TARGET_LEN);
    let event = AuditEvent::success(op.actor(), action::APPLIANCE_REGISTER, target);
    let tenant = req.tenant.unwrap_or_else(|| DEFAULT_TENANT.to_owned());
    let checked = check_id(&req.id)
        .and_then(|()| check_field("tenant", &tenant))
        .and_then(|()| check_binding(&req.binding));
    if let Err(e) = checked {
        return Err(refuse(&s, event, e, now).await);
    }
    let binding = serde_json::to_value(&req.binding).map_err(internal)?;
    let event = event
        .with("tenant", tenant.as_str())
        .with("binding", binding);
    let appliance = Appliance {
        id: req.id,
        tenant,
        binding: req.binding,
        status: ApplianceStatus::Active,
        manual_renewal_generation: 0,
        created_at: now,
    };
    if let Err(e) = s.store.register_appliance(&appliance, &event).await {
        let e = store_error(&appliance.id, e);
        return Err(refuse(&s, event, e, now).await);
    }
    info!(by = op.name(), appliance = %appliance.id, tenant = %appliance.tenant, "appliance registered");
    Ok((StatusCode::CREATED, Json(summary(appliance, None, &s, now))))
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
    authorize(&s, &peer, Role::Viewer, action::APPLIANCE_LIST, "", now).await?;
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(bad(
            "invalid_query",
            format!("limit must be 1..={MAX_LIST_LIMIT}"),
        ));
    }
    // One more than the page, to know whether another page follows.
    let want = limit as usize + 1;
    let scan = if q.trust_state.is_some() {
        MAX_LIST_LIMIT
    } else {
        limit + 1
    };
    let mut out = Vec::new();
    let mut after = q.after;
    'pages: loop {
        let page = s
            .store
            .list_appliances(&ApplianceFilter {
                status: q.status,
                tenant: q.tenant.clone(),
                after: after.clone(),
                limit: scan,
            })
            .await
            .map_err(internal)?;
        let done = page.len() < scan as usize;
        after = page.last().map(|a| a.id.clone());
        for a in page {
            let current = s.store.current_certificate(&a.id).await.map_err(internal)?;
            let item = summary(a, current.as_ref(), &s, now);
            if q.trust_state.is_some_and(|t| t != item.trust_state) {
                continue;
            }
            out.push(item);
            if out.len() == want {
                break 'pages;
            }
        }
        if done {
            break;
        }
    }
    let next = if out.len() > limit as usize {
        out.truncate(limit as usize);
        out.last().map(|a| a.id.clone())
    } else {
        None
    };
    Ok(Json(ApplianceList {
        appliances: out,
        next,
    }))
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
    authorize(&s, &peer, Role::Viewer, action::APPLIANCE_SHOW, target, now).await?;
    check_id(&id)?;
    let a = s
        .store
        .get_appliance(&id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(&id))?;
    let certs = s
        .store
        .certificates(&id)
        .await
        .map_err(|e| store_error(&id, e))?;
    let current = certs.iter().find(|c| c.state == CertState::Current);
    let appliance = summary(a, current, &s, now);
    let certificates = certs
        .iter()
        .map(|c| {
            let (state, previous_until) = match c.state {
                CertState::Current => ("current", None),
                CertState::PreviousUntil(t) => ("previous", Some(rfc3339(t))),
                CertState::Revoked => ("revoked", None),
            };
            CertificateInfo {
                serial: c.serial.clone(),
                fingerprint: c.fingerprint.clone(),
                not_before: rfc3339(c.not_before),
                not_after: rfc3339(c.not_after),
                state: state.to_owned(),
                previous_until,
            }
        })
        .collect();
    Ok(Json(ApplianceDetail {
        appliance,
        certificates,
        connection: s.cluster.presence(&id),
    }))
}

/// Authorize a change to appliance `id` as `what` (operator+), then check the id; a bad
/// id is recorded as refused. Returns the operator and the success event to record.
async fn begin_change(
    s: &AppState,
    peer: &PeerCertificate,
    id: &str,
    what: &str,
    now: UnixSeconds,
) -> Result<(VerifiedOperator, AuditEvent), ApiError> {
    let target = audit::clip(id, audit::MAX_TARGET_LEN);
    let op = authorize(s, peer, Role::Operator, what, target, now).await?;
    let event = AuditEvent::success(op.actor(), what, target);
    match check_id(id) {
        Ok(()) => Ok((op, event)),
        Err(e) => Err(refuse(s, event, e, now).await),
    }
}

async fn change_status(
    s: AppState,
    peer: PeerCertificate,
    id: String,
    status: ApplianceStatus,
) -> Result<Json<StatusResponse>, ApiError> {
    let now = crate::now_unix();
    let what = match status {
        ApplianceStatus::Active => action::APPLIANCE_ENABLE,
        ApplianceStatus::Disabled => action::APPLIANCE_DISABLE,
        ApplianceStatus::Revoked => action::APPLIANCE_REVOKE,
    };
    let (op, event) = begin_change(&s, &peer, &id, what, now).await?;
    if status != ApplianceStatus::Revoked {
        let current = s.store.get_appliance(&id).await.map_err(internal)?;
        let refusal = match current {
            None => Some(not_found(&id)),
            Some(a) if a.status == ApplianceStatus::Revoked => Some(ApiError::new(
                StatusCode::CONFLICT,
                "appliance_revoked",
                format!(
                    "appliance {id} is revoked: it comes back only by enrolling again with a \
                     fresh proof (e.g. `tether token create {id}`)"
                ),
            )),
            Some(_) => None,
        };
        if let Some(e) = refusal {
            return Err(refuse(&s, event, e, now).await);
        }
    }
    let deltas = match s.store.set_status(&id, status, now, &event).await {
        Ok(d) => d,
        Err(e) => {
            let e = store_error(&id, e);
            return Err(refuse(&s, event, e, now).await);
        }
    };
    let allowlist_version = match deltas.last() {
        Some(d) => d.version,
        None => s.store.allowlist_version().await.map_err(internal)?,
    };
    info!(by = op.name(), appliance = %id, ?status, changes = deltas.len(), allowlist_version, "appliance status changed");
    Ok(Json(StatusResponse {
        id,
        status,
        allowlist_version,
    }))
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
    let (op, event) = begin_change(&s, &peer, &id, action::APPLIANCE_REQUEST_RENEWAL, now).await?;
    let generation = match s.store.bump_manual_renewal(&id, now, &event).await {
        Ok(g) => g,
        Err(e) => {
            let e = store_error(&id, e);
            return Err(refuse(&s, event, e, now).await);
        }
    };
    info!(by = op.name(), appliance = %id, generation, "manual renewal requested");
    s.cluster
        .broadcast(tether_proto::cluster::ToBroker::Renewals {
            generations: vec![(id.clone(), generation.max(0) as u64)],
        });
    Ok(Json(RenewResponse {
        id,
        manual_renewal_generation: generation,
    }))
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
    let (op, event) = begin_change(&s, &peer, &id, action::TOKEN_CREATE, now).await?;
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return Err(refuse(&s, event, json_rejection(e), now).await),
    };
    let ttl = req
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(s.config.enroll.token_ttl);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        let e = bad(
            "invalid_ttl",
            format!("ttl_secs must be 1..={}", MAX_TOKEN_TTL.as_secs()),
        );
        return Err(refuse(&s, event, e, now).await);
    }
    let token = Token::generate();
    let hash = token.hash();
    let expires_at = now.saturating_add(ttl.as_secs() as i64);
    let event = event
        .with("token_ref", audit::token_ref(&hash))
        .with("expires_at", expires_at);
    if let Err(e) = s
        .store
        .create_token(&id, &hash, expires_at, now, &event)
        .await
    {
        let e = store_error(&id, e);
        return Err(refuse(&s, event, e, now).await);
    }
    info!(by = op.name(), appliance = %id, expires_at, "enrollment token created");
    Ok(Json(TokenResponse {
        token: token.expose().to_owned(),
        expires_at: rfc3339(expires_at),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_are_checked() {
        let aws = |arn: &str| PlatformBinding::Aws {
            role_arn: arn.into(),
        };
        assert!(check_binding(&aws("arn:aws:iam::123456789012:role/app")).is_ok());
        assert_eq!(check_binding(&aws("nope")).unwrap_err().code, "bad_request");
        let k8s = PlatformBinding::K8s {
            issuer: String::new(),
            namespace: "n".into(),
            service_account: "s".into(),
        };
        assert_eq!(check_binding(&k8s).unwrap_err().code, "bad_request");
        assert!(check_binding(&PlatformBinding::TokenOnly).is_ok());
    }
}
