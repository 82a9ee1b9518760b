//! The operator routes: `POST /v1/operators/login` (no client certificate; a one-time
//! bundle token and a CSR), and, for admins, `POST /v1/operators/invites`,
//! `GET /v1/operators`, `POST /v1/operators/{name}/revoke`. The rules are
//! [`crate::domain::operators`]'s.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use tether_api::operators::{
    Bundle, InviteRequest, LoginRequest, LoginResponse, OperatorList, RevokeResponse, Role,
};
use tether_audit as audit;

use crate::domain::operators::{self, action};
use crate::http::appliances::operator;
use crate::http::server::PeerCertificate;
use crate::http::{json_rejection, ApiError, AppState};

/// `POST /v1/operators/login`.
#[utoipa::path(
    post,
    path = "/v1/operators/login",
    tag = "operators",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "an operator certificate", body = LoginResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this client address (`http.public_rate_per_sec`); `Retry-After` says after how many seconds to retry", body = tether_api::ErrorBody)
    )
)]
pub async fn login(
    State(s): State<AppState>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Json<LoginResponse>, ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    let now = crate::now_unix();
    Ok(Json(operators::login(&s.domain, &req, now).await?))
}

/// `POST /v1/operators/invites` (admin): a new bundle.
#[utoipa::path(
    post,
    path = "/v1/operators/invites",
    tag = "operators",
    request_body = InviteRequest,
    responses(
        (status = 200, description = "a one-time enrollment bundle", body = Bundle),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn invite(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<InviteRequest>, JsonRejection>,
) -> Result<Json<Bundle>, ApiError> {
    let now = crate::now_unix();
    let by = operator(&s, &peer, Role::Admin, action::INVITE, "", now).await?;
    let Json(req) = body.map_err(json_rejection)?;
    let registry = s.domain.registry();
    let ca_pem = s.domain.ca.root_pem();
    Ok(Json(
        operators::invite(&registry, &by, ca_pem, &req, now).await?,
    ))
}

/// `GET /v1/operators` (admin).
#[utoipa::path(
    get,
    path = "/v1/operators",
    tag = "operators",
    responses(
        (status = 200, description = "every operator", body = OperatorList),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<OperatorList>, ApiError> {
    let now = crate::now_unix();
    operator(&s, &peer, Role::Admin, action::LIST, "", now).await?;
    Ok(Json(operators::list(&s.domain.registry()).await?))
}

/// `POST /v1/operators/{name}/revoke` (admin).
#[utoipa::path(
    post,
    path = "/v1/operators/{name}/revoke",
    tag = "operators",
    params(("name" = String, Path, description = "Operator name: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "revoked", body = RevokeResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "`last_admin`: the last active admin cannot be revoked", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&name, audit::MAX_TARGET_LEN);
    let by = operator(&s, &peer, Role::Admin, action::REVOKE, target, now).await?;
    Ok(Json(
        operators::revoke(&s.domain.registry(), &by, &name, now).await?,
    ))
}
