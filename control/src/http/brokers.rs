//! The broker routes: bundles (`POST /v1/brokers`, operator+), the list
//! (`GET /v1/brokers`, viewer+), revocation (`POST /v1/brokers/{name}/revoke`, admin),
//! drain (`POST /v1/brokers/{name}/drain`, admin),
//! enrollment with a bundle's token (`POST /v1/brokers/enroll`, rate limited) and renewal
//! with the current certificate (`POST /v1/brokers/renew`). The rules are
//! [`crate::domain::brokers`]'s; the channel is [`crate::http::channel`].

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::brokers::{AddBroker, BrokerList};
use tether_api::brokers::{
    BrokerBundle, BrokerCredential, BrokerEnrollRequest, BrokerRenewRequest,
};
use tether_api::operators::Role;
use tether_audit::{self as audit, action};

use crate::domain::brokers;
use crate::http::appliances::operator;
use crate::http::server::PeerCertificate;
use crate::http::{json_rejection, ApiError, AppState};

/// `POST /v1/brokers` (operator+).
#[utoipa::path(post, path = "/v1/brokers", tag = "brokers", request_body = AddBroker, responses(
        (status = 200, description = "a one-time broker bundle (JSON: name, trust_domain, control_url, ca_pem, token, expires_at)"),
        (status = 400, description = "bad input", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "`conflict`: an active broker has that name", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn create(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<AddBroker>, JsonRejection>,
) -> Result<Json<BrokerBundle>, ApiError> {
    let now = crate::now_unix();
    let by = operator(
        &s,
        &peer,
        Role::Operator,
        action::BROKER_ADD,
        "brokers",
        now,
    )
    .await?;
    let Json(req) = body.map_err(json_rejection)?;
    let (ca_pem, td) = (s.domain.ca.root_pem(), s.domain.ca.trust_domain());
    let registry = s.domain.registry();
    Ok(Json(
        brokers::create(&registry, &by, ca_pem, td, &req, now).await?,
    ))
}

/// `GET /v1/brokers` (viewer+).
#[utoipa::path(get, path = "/v1/brokers", tag = "brokers", responses(
        (status = 200, description = "every broker", body = BrokerList),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<BrokerList>, ApiError> {
    let now = crate::now_unix();
    operator(&s, &peer, Role::Viewer, action::BROKER_LIST, "brokers", now).await?;
    Ok(Json(brokers::list(&s.domain.registry(), now).await?))
}

/// `POST /v1/brokers/{name}/revoke` (admin).
#[utoipa::path(post, path = "/v1/brokers/{name}/revoke", tag = "brokers",
    params(("name" = String, Path, description = "Broker name")),
    responses(
        (status = 204, description = "revoked; its channel is closed"),
        (status = 400, description = "bad input", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an admin", body = tether_api::ErrorBody),
        (status = 404, description = "no such broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&name, audit::MAX_TARGET_LEN);
    let by = operator(&s, &peer, Role::Admin, action::BROKER_REVOKE, target, now).await?;
    brokers::revoke(&s.domain.registry(), &by, &name, now).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/brokers/{name}/drain` (admin).
#[utoipa::path(post, path = "/v1/brokers/{name}/drain", tag = "brokers",
    params(("name" = String, Path, description = "Broker name")),
    responses(
        (status = 204, description = "the broker was asked to drain as on SIGTERM (GoAway with a jittered reconnect delay to every session, then it stops); `GET /v1/brokers` shows it `draining`"),
        (status = 400, description = "bad input", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an admin", body = tether_api::ErrorBody),
        (status = 404, description = "`not_found`: no such broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "`broker_not_connected`: the broker holds no channel to this replica; `drain_unsupported`: the broker is too old to take the request", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn drain(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&name, audit::MAX_TARGET_LEN);
    let by = operator(&s, &peer, Role::Admin, action::BROKER_DRAIN, target, now).await?;
    brokers::drain(&s.domain.registry(), &by, &name, now).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/brokers/enroll` (no client certificate; the bundle's token).
#[utoipa::path(post, path = "/v1/brokers/enroll", tag = "brokers", request_body(content_type = "application/json", description = "`{name, token, csr_pem}`"), responses(
        (status = 200, description = "the broker's certificate (JSON: name, chain_pem, ca_pem, not_after)"),
        (status = 400, description = "bad input or CSR", body = tether_api::ErrorBody),
        (status = 403, description = "`token_unknown`, `token_expired` or `token_used`", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
        (status = 429, description = "`rate_limited`", body = tether_api::ErrorBody),
    ),
)]
pub async fn enroll(
    State(s): State<AppState>,
    body: Result<Json<BrokerEnrollRequest>, JsonRejection>,
) -> Result<Json<BrokerCredential>, ApiError> {
    let now = crate::now_unix();
    let Json(req) = body.map_err(json_rejection)?;
    Ok(Json(brokers::enroll(&s.domain, &req, now).await?))
}

/// `POST /v1/brokers/renew` (the broker's current certificate).
#[utoipa::path(post, path = "/v1/brokers/renew", tag = "brokers", request_body(content_type = "application/json", description = "`{csr_pem}`"), responses(
        (status = 200, description = "the broker's new certificate (JSON: name, chain_pem, ca_pem, not_after)"),
        (status = 400, description = "bad input or CSR", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "not the current certificate of an active broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
    ),
    security(("broker_certificate" = []))
)]
pub async fn renew(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<BrokerRenewRequest>, JsonRejection>,
) -> Result<Json<BrokerCredential>, ApiError> {
    let now = crate::now_unix();
    let name = brokers::authenticate(&s.domain, peer.der(), now).await?;
    let Json(req) = body.map_err(json_rejection)?;
    let presented = peer.der().unwrap_or_default();
    Ok(Json(
        brokers::renew(&s.domain, &name, presented, &req, now).await?,
    ))
}
