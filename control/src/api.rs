//! The control HTTP API (served over HTTPS by [`crate::server`]).
//!
//! - `POST /v1/enroll/challenge` → `{"nonce": "...", "expires_at": <unix s>}`
//! - `POST /v1/enroll` → certificate chain, CA, brokers, expiry (see [`crate::enroll`]).
//! - `POST /v1/renew` (mTLS with the current appliance certificate) → the same answer as
//!   enrollment (see [`crate::renew`]).
//! - `GET /v1/fleet/trust` (mTLS, an operator certificate, role viewer+) → counts by
//!   trust state and the active alerts (see [`crate::trust`]).
//! - `POST /v1/operators/login` (no client certificate; a one-time bundle token and a CSR)
//!   → an operator certificate; `POST /v1/operators/invites`, `GET /v1/operators`,
//!   `POST /v1/operators/{name}/revoke` (admin). See [`crate::operators`]: every operator
//!   route authenticates with [`crate::operators::authorize`] (401, then 403
//!   `operator_required` / `operator_unknown` / `certificate_expired` / `role_forbidden`).
//! - Appliances (mTLS, an operator certificate; reads viewer+, changes operator+):
//!   `POST /v1/appliances`, `GET /v1/appliances`, `GET /v1/appliances/{id}`,
//!   `POST /v1/appliances/{id}/disable|enable|revoke|renew|tokens` (see
//!   [`crate::appliances`]).
//! - `GET /v1/audit?after=&limit=` (mTLS, an operator certificate, role viewer+) → a page
//!   of the audit log with its signed checkpoints (see [`crate::audit_http`]).
//! - `GET /healthz`
//! - `GET /openapi.json` (no authentication): the OpenAPI 3.1 document of all of the
//!   above (see [`crate::openapi`]).
//!
//! Every request runs in a `request` span carrying a `request_id`, which the answer
//! returns in [`REQUEST_ID_HEADER`].
//!
//! Errors are JSON `{"error": "<stable_code>", "message": "..."}` with the HTTP status that
//! fits (400 bad input, 403 refused, 404 unknown id, 409 replay, 429 `rate_limited` with
//! `Retry-After` on the routes open without credentials, 500 internal).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tether_api::enroll::{Challenge, EnrollRequest, EnrollResponse, RenewRequest};
use tether_api::health::Health;
use tether_api::trust::FleetTrust;
use tether_api::ErrorBody;

use crate::ca::Ca;
use crate::config::ControlConfig;
use crate::enroll;
use crate::store::Store;

/// Largest request body: 64 KiB (a CSR is at most 8 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// The configuration.
    pub config: Arc<ControlConfig>,
    /// Platform proof verifiers.
    pub proofs: Arc<crate::proof::Verifiers>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Brokers' channels, where appliances are connected, commands in flight.
    pub cluster: Arc<crate::cluster::Cluster>,
}

/// An error answered to the client: a status, a stable code, a short message. Details
/// stay in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message (no secrets).
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

/// The error code of an answer, for the metrics middleware.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.code.to_owned(),
                message: self.message,
            }),
        )
            .into_response();
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

/// The router. The routes open without credentials are rate limited per client IP
/// (`http.public_rate_per_sec`, see [`crate::rate_limit`]); each call builds a fresh limit.
pub fn router(state: AppState) -> Router {
    let limit = Arc::new(crate::rate_limit::PublicRateLimit::new(&state.config.http));
    let public = Router::new()
        .route("/v1/enroll/challenge", post(challenge))
        .route("/v1/enroll", post(enroll_handler))
        .route("/v1/operators/login", post(crate::operators::login))
        .route("/v1/brokers/enroll", post(crate::brokers::enroll))
        .route_layer(axum::middleware::from_fn_with_state(
            limit,
            crate::rate_limit::limit,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(crate::openapi::serve))
        .merge(public)
        .route("/v1/renew", post(renew_handler))
        .route("/v1/fleet/trust", get(fleet_trust_handler))
        .route("/v1/audit", get(crate::audit_http::list))
        .route(
            "/v1/appliances",
            post(crate::appliances::register).get(crate::appliances::list),
        )
        .route("/v1/appliances/{id}", get(crate::appliances::show))
        .route(
            "/v1/appliances/{id}/disable",
            post(crate::appliances::disable),
        )
        .route(
            "/v1/appliances/{id}/enable",
            post(crate::appliances::enable),
        )
        .route(
            "/v1/appliances/{id}/revoke",
            post(crate::appliances::revoke),
        )
        .route("/v1/appliances/{id}/renew", post(crate::appliances::renew))
        .route(
            "/v1/appliances/{id}/tokens",
            post(crate::appliances::create_token),
        )
        .route("/v1/appliances/{id}/exec", post(crate::exec::exec))
        .route(
            "/v1/brokers",
            post(crate::brokers::create).get(crate::brokers::list),
        )
        .route("/v1/brokers/renew", post(crate::brokers::renew))
        .route(
            tether_proto::cluster::CHANNEL_PATH,
            get(crate::cluster::channel),
        )
        .route("/v1/brokers/{name}/revoke", post(crate::brokers::revoke))
        .route("/v1/operators/invites", post(crate::operators::invite))
        .route("/v1/operators", get(crate::operators::list))
        .route(
            "/v1/operators/{name}/revoke",
            post(crate::operators::revoke),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::record,
        ))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(state)
}

/// The response header carrying the id of the request, as control's logs name it.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id control gave a request: 16 random hex digits, in the request's span
/// (`request_id`), in its extensions, and in the [`REQUEST_ID_HEADER`] of the answer, so
/// an operator can quote it and the logs find it. A client's own header is not trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Run each request in a span with its id, method and path, and return the id.
async fn request_span(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let id = format!("{:016x}", fastrand::u64(..));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", tag = "health", responses(
        (status = 200, description = "control is up", body = Health),
))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// `POST /v1/enroll/challenge`.
#[utoipa::path(post, path = "/v1/enroll/challenge", tag = "enrollment", responses(
        (status = 200, description = "a nonce to bind the proof to", body = Challenge),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this client address (`http.public_rate_per_sec`); `Retry-After` says after how many seconds to retry", body = ErrorBody),
))]
async fn challenge(State(s): State<AppState>) -> Result<Json<Challenge>, ApiError> {
    enroll::challenge(&s, crate::now_unix()).await.map(Json)
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
async fn enroll_handler(
    State(s): State<AppState>,
    body: Result<Json<EnrollRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    enroll::enroll(&s, req, crate::now_unix()).await.map(Json)
}

/// Answer 408 to a request not done within `http.request_timeout` (body included: a
/// client dribbling its body byte by byte is cut off). It is longer than every limit
/// inside (store, STS, JWKS), so only a stalled client or an overloaded control reaches it.
async fn request_deadline(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = s.config.http.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {limit:?}"),
        )
        .into_response(),
    }
}

/// Bodies declared larger than this are refused without reading them (the connection is
/// then closed under the client); between [`MAX_BODY`] and this, the body is read and
/// dropped first so the client sees the 413 instead of a broken pipe.
pub const DRAIN_MAX: usize = 1024 * 1024;

/// Refuse a body declared larger than [`MAX_BODY`] with 413 before parsing it.
async fn refuse_large_bodies(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_BODY as u64 => {
            if n <= DRAIN_MAX as u64 {
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_MAX).await;
            }
            too_large().into_response()
        }
        _ => next.run(req).await,
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {MAX_BODY} bytes"),
    )
}

/// A body axum could not turn into JSON: too large (413) or malformed (400).
pub(crate) fn json_rejection(e: axum::extract::rejection::JsonRejection) -> ApiError {
    // Served through hyper-util directly, axum cannot always classify the limit error by
    // type (it then answers 400 with this text), so look at both.
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE
        || e.body_text().contains("length limit exceeded")
    {
        too_large()
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
    }
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
async fn renew_handler(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<crate::server::PeerCertificate>,
    body: Result<Json<RenewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let Json(req) = body.map_err(json_rejection)?;
    crate::renew::renew(&s, &peer, req, crate::now_unix())
        .await
        .map(Json)
}

/// `GET /v1/fleet/trust` (viewer+).
#[utoipa::path(get, path = "/v1/fleet/trust", tag = "fleet", responses(
        (status = 200, description = "counts by trust state and the active alerts", body = FleetTrust),
        (status = 401, description = "no client certificate, or one control did not issue", body = ErrorBody),
        (status = 403, description = "refused (see `error`)", body = ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = ErrorBody),
), security(("operator_certificate" = [])))]
async fn fleet_trust_handler(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<crate::server::PeerCertificate>,
) -> Result<Json<FleetTrust>, ApiError> {
    crate::operators::authorize(
        &s,
        &peer,
        tether_api::operators::Role::Viewer,
        crate::operators::action::FLEET_TRUST,
        "",
        crate::now_unix(),
    )
    .await?;
    crate::trust::fleet_trust(s.store.as_ref(), &s.config.trust, crate::now_unix())
        .await
        .map(Json)
        .map_err(crate::enroll::internal)
}
