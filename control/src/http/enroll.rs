//! The routes of appliances without an operator: `POST /v1/enroll/challenge`,
//! `POST /v1/enroll` (see [`crate::domain::enroll`]) and `POST /v1/renew` (see
//! [`crate::domain::renew`]).

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::{Extension, Json};
use tether_api::enroll::{Challenge, EnrollRequest, EnrollResponse, RenewRequest};
use tether_api::ErrorBody;

use crate::domain;
use crate::http::server::PeerCertificate;
use crate::http::{json_rejection, ApiError, AppState};

/// `POST /v1/enroll/challenge`.
#[utoipa::path(post, path = "/v1/enroll/challenge", tag = "enrollment", responses(
        (status = 200, description = "a nonce to bind the proof to", body = Challenge),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this client address (`http.public_rate_per_sec`); `Retry-After` says after how many seconds to retry", body = ErrorBody),
))]
pub async fn challenge(State(s): State<AppState>) -> Result<Json<Challenge>, ApiError> {
    Ok(Json(
        domain::enroll::challenge(&s.domain, crate::now_unix()).await?,
    ))
}

/// `POST /v1/enroll`.
#[utoipa::path(post, path = "/v1/enroll", tag = "enrollment", request_body = EnrollRequest, responses(
        (status = 200, description = "the certificate chain, CA and brokers", body = EnrollResponse),
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 403, description = "refused (see `error`)", body = ErrorBody),
        (status = 404, description = "no such appliance", body = ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = ErrorBody),
        (status = 409, description = "replayed nonce or token", body = ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this client address (`http.public_rate_per_sec`); `Retry-After` says after how many seconds to retry", body = ErrorBody),
        (status = 502, description = "an upstream identity service (STS, JWKS) failed", body = ErrorBody),
))]
pub async fn enroll(
    State(s): State<AppState>,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    Ok(Json(
        domain::enroll::enroll(&s.domain, req, crate::now_unix()).await?,
    ))
}

/// `POST /v1/renew` (the appliance's current certificate).
#[utoipa::path(post, path = "/v1/renew", tag = "enrollment", request_body = RenewRequest, responses(
        (status = 200, description = "the new certificate chain, CA and brokers", body = EnrollResponse),
        (status = 400, description = "bad input", body = ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = ErrorBody),
        (status = 403, description = "refused (see `error`)", body = ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = ErrorBody),
), security(("appliance_certificate" = [])))]
pub async fn renew(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    Ok(Json(
        domain::renew::renew(&s.domain, peer.der(), req, crate::now_unix()).await?,
    ))
}
