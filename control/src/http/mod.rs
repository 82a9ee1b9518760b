//! The HTTP layer: control's HTTPS API over the domain ([`crate::domain`]).
//!
//! # Design
//!
//! Handlers are thin: extract (JSON body, path, query, the verified client certificate),
//! authenticate (operators through [`operators::authorize`]), call one
//! domain operation, and answer. A [`crate::domain::Error`] becomes an [`ApiError`]: its
//! kind picks the status, its code and message are the body. Nothing here decides who may
//! do what.
//!
//! # Routes
//!
//! - `POST /v1/enroll/challenge` → `{"nonce": "...", "expires_at": <unix s>}`
//! - `POST /v1/enroll` → certificate chain, CA, brokers, expiry (see
//!   [`crate::domain::enroll`]).
//! - `POST /v1/renew` (mTLS with the current appliance certificate) → the same answer as
//!   enrollment (see [`crate::domain::renew`]).
//! - `GET /v1/fleet/trust` (mTLS, an operator certificate, role viewer+) → counts by
//!   trust state and the active alerts (see [`crate::domain::trust`]).
//! - `POST /v1/operators/login` (no client certificate; a one-time bundle token and a CSR)
//!   → an operator certificate; `POST /v1/operators/invites`, `GET /v1/operators`,
//!   `POST /v1/operators/{name}/revoke` (admin). Every operator route authenticates with
//!   [`operators::authorize`] (401, then 403 `operator_required` /
//!   `operator_unknown` / `certificate_expired` / `role_forbidden`).
//! - Appliances (mTLS, an operator certificate; reads viewer+, changes operator+):
//!   `POST /v1/appliances`, `GET /v1/appliances`, `GET /v1/appliances/{id}`,
//!   `POST /v1/appliances/{id}/disable|enable|revoke|renew|tokens|exec`.
//! - Brokers: `POST /v1/brokers`, `GET /v1/brokers`, `POST /v1/brokers/enroll`,
//!   `POST /v1/brokers/renew`, `POST /v1/brokers/{name}/revoke`,
//!   `POST /v1/brokers/{name}/drain`, and
//!   `GET /v1/brokers/channel` (the upgrade to the cluster channel).
//! - `GET /v1/audit?after=&limit=` (mTLS, an operator certificate, role viewer+) → a page
//!   of the audit log with its signed checkpoints.
//! - `GET /healthz`
//! - `GET /openapi.json` (no authentication): the OpenAPI 3.1 document of all of the
//!   above (see [`openapi`]).
//!
//! Every request runs in a `request` span carrying a `request_id`, which the answer
//! returns in [`REQUEST_ID_HEADER`].
//!
//! Errors are JSON `{"error": "<stable_code>", "message": "..."}` with the HTTP status that
//! fits (400 bad input, 403 refused, 404 unknown id, 409 replay, 429 `rate_limited` with
//! `Retry-After` on the routes open without credentials, 500 internal).
//!
//! # Modules
//!
//! - this file — [`router`], [`AppState`], [`ApiError`], the settings of the listener
//!   ([`HttpSettings`], [`ShutdownSettings`]) and the middleware (request id, deadline,
//!   body limit, metrics).
//! - [`server`] — the HTTPS listener (rustls), its limits and its drain on shutdown; the
//!   client certificate it verified travels as [`server::PeerCertificate`].
//! - [`rate_limit`] — the per-client-IP limit of the routes open without credentials.
//! - [`openapi`] — the OpenAPI document.
//! - [`enroll`] — challenge, enrollment and renewal of appliances.
//! - [`appliances`], [`operators`], [`brokers`], [`audit`], [`exec`] — the operator routes.
//! - [`channel`] — the broker channel's upgrade.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tether_api::health::Health;
use tether_api::ErrorBody;

use crate::cluster::link::LinkState;
use crate::cluster::Cluster;
use crate::domain::{Context, ErrorKind};
use crate::metrics::Metrics;

pub mod appliances;
pub mod audit;
pub mod brokers;
pub mod channel;
pub mod console;
pub mod control;
pub mod enroll;
pub mod exec;
pub mod openapi;
pub mod operators;
pub mod rate_limit;
pub mod server;
pub mod tunnels;

/// Default time in-flight requests and command streams get to finish on SIGTERM: 10 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest shutdown grace accepted: 10 minutes (a supervisor's kill timeout is shorter).
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);

/// `[shutdown]`: how `serve` stops. On SIGTERM it stops accepting, lets in-flight requests
/// and command streams finish for up to `grace`, tells every broker channel it is going
/// away, then exits 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// Time in-flight requests get to finish. Default 10 s
    /// ([`DEFAULT_SHUTDOWN_GRACE`]); at most [`MAX_SHUTDOWN_GRACE`].
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// `[http]`: limits that keep slow or idle clients from holding control's connections.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Time to send a request's header; also closes a keep-alive connection idle that
    /// long. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time for a whole request, body included (answered 408). Default 60 s: longer than
    /// every limit inside (store, STS, JWKS).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue. Default 4096.
    pub max_connections: usize,
    /// Requests per second each client IP (an IPv6 client: its /64) may make to the
    /// routes open without credentials (`POST /v1/enroll/challenge`, `POST /v1/enroll`,
    /// `POST /v1/operators/login`), sustained; more are answered 429 `rate_limited` with
    /// `Retry-After`. Default 20 ([`DEFAULT_PUBLIC_RATE_PER_SEC`]); 0 turns the limit off.
    /// See [`rate_limit`].
    pub public_rate_per_sec: u32,
    /// Requests a client IP may make at once to those routes before the rate applies.
    /// Default 40 ([`DEFAULT_PUBLIC_BURST`]); at least 1 unless the limit is off.
    pub public_burst: u32,
}

/// Default of [`HttpSettings::public_rate_per_sec`]: 20 requests per second per client IP.
pub const DEFAULT_PUBLIC_RATE_PER_SEC: u32 = 20;
/// Default of [`HttpSettings::public_burst`]: 40 requests.
pub const DEFAULT_PUBLIC_BURST: u32 = 40;

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 4096,
            public_rate_per_sec: DEFAULT_PUBLIC_RATE_PER_SEC,
            public_burst: DEFAULT_PUBLIC_BURST,
        }
    }
}

/// Largest request body: 64 KiB (a CSR is at most 8 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The domain's operations and what they need.
    pub domain: Context,
    /// Limits of the listener.
    pub http: Arc<HttpSettings>,
    /// How serving stops.
    pub shutdown: ShutdownSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Brokers' channels, where appliances are connected, commands in flight (also the
    /// domain's [`crate::domain::Fleet`]).
    pub cluster: Arc<Cluster>,
    /// This replica's id, named by every answer's `tether-control-replica` header (empty
    /// until [`crate::run::Started::bind`] sets it: no header).
    pub replica_id: Arc<str>,
    /// The web console's origin (`https://host:port`) when it is on: login links name it
    /// (`POST /v1/console/login-links` answers 409 `console_disabled` otherwise).
    pub console_origin: Option<Arc<str>>,
}

impl AppState {
    /// What a broker channel needs.
    pub fn link_state(&self) -> LinkState {
        LinkState {
            cluster: self.cluster.clone(),
            store: self.domain.store.clone(),
            metrics: self.metrics.clone(),
        }
    }
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

impl From<crate::domain::Error> for ApiError {
    fn from(e: crate::domain::Error) -> ApiError {
        ApiError::new(status_of(e.kind), e.code, e.message)
    }
}

/// The status answering a domain error of `kind`.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Log `e` and answer 500 `internal` (503 `database_unavailable` for an unavailable
/// database, see [`crate::domain::internal`]).
pub(crate) fn internal<E: std::fmt::Display + 'static>(e: E) -> ApiError {
    crate::domain::internal(e).into()
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
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let headers = resp.headers_mut();
            headers.insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_UNAVAILABLE_SECS),
            );
            // The retry opens a new connection, which an L4 load balancer may send to
            // another replica (a kept-alive one would come back here).
            headers.insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

/// The `Retry-After` (seconds) of every 503 answer, which also closes its connection:
/// what is missing (a channel to a broker) is back, or reachable through another replica
/// on a new connection, within about a second.
pub const RETRY_AFTER_UNAVAILABLE_SECS: u64 = 1;

/// The router. The routes open without credentials are rate limited per client IP
/// (`http.public_rate_per_sec`, see [`crate::http::rate_limit`]); each call builds a fresh limit.
pub fn router(state: AppState) -> Router {
    let limit = Arc::new(rate_limit::PublicRateLimit::new(&state.http));
    let public = Router::new()
        .route("/v1/enroll/challenge", post(enroll::challenge))
        .route("/v1/enroll", post(enroll::enroll))
        .route("/v1/operators/login", post(operators::login))
        .route("/v1/brokers/enroll", post(brokers::enroll))
        .route_layer(axum::middleware::from_fn_with_state(
            limit,
            rate_limit::limit,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::serve))
        .merge(public)
        .route("/v1/renew", post(enroll::renew))
        .route("/v1/fleet/trust", get(appliances::fleet_trust))
        .route("/v1/audit", get(audit::list))
        .route(
            "/v1/appliances",
            post(appliances::register).get(appliances::list),
        )
        .route("/v1/appliances/{id}", get(appliances::show))
        .route("/v1/appliances/{id}/disable", post(appliances::disable))
        .route("/v1/appliances/{id}/enable", post(appliances::enable))
        .route("/v1/appliances/{id}/revoke", post(appliances::revoke))
        .route("/v1/appliances/{id}/renew", post(appliances::renew))
        .route("/v1/appliances/{id}/tokens", post(appliances::create_token))
        .route("/v1/appliances/{id}/exec", post(exec::exec))
        .route("/v1/appliances/{id}/tunnels", post(tunnels::open))
        .route("/v1/tunnels", get(tunnels::list))
        .route(
            "/v1/tunnels/{id}",
            get(tunnels::show).delete(tunnels::close),
        )
        .route("/v1/tunnels/{id}/credential", post(tunnels::credential))
        .route("/v1/tunnels/{id}/connect", get(tunnels::connect))
        .route("/v1/brokers/tunnels/{conn}", get(tunnels::dial_back))
        .route("/v1/brokers", post(brokers::create).get(brokers::list))
        .route("/v1/brokers/renew", post(brokers::renew))
        .route(tether_proto::cluster::CHANNEL_PATH, get(channel::channel))
        .route("/v1/brokers/{name}/revoke", post(brokers::revoke))
        .route("/v1/brokers/{name}/drain", post(brokers::drain))
        .route("/v1/operators/invites", post(operators::invite))
        .route("/v1/operators", get(operators::list))
        .route("/v1/operators/{name}/revoke", post(operators::revoke))
        .route("/v1/control/replicas", get(control::replicas))
        .route("/v1/console/login-links", post(console::login_link))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .layer(axum::middleware::from_fn(request_span))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            replica_header,
        ))
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

/// Name the replica that answered ([`crate::domain::replica::REPLICA_HEADER`]), so
/// operators and tests behind a load balancer see which one it was.
async fn replica_header(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut resp = next.run(req).await;
    if !s.replica_id.is_empty() {
        if let Ok(v) = axum::http::HeaderValue::from_str(&s.replica_id) {
            resp.headers_mut()
                .insert(crate::domain::replica::REPLICA_HEADER, v);
        }
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

/// Answer 408 to a request not done within `http.request_timeout` (body included: a
/// client dribbling its body byte by byte is cut off). It is longer than every limit
/// inside (store, STS, JWKS), so only a stalled client or an overloaded control reaches it.
async fn request_deadline(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = s.http.request_timeout;
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
    body_error(e).into()
}

/// [`json_rejection`] as a domain error, for the routes that record a bad body as
/// refused.
pub(crate) fn body_error(e: axum::extract::rejection::JsonRejection) -> crate::domain::Error {
    // Served through hyper-util directly, axum cannot always classify the limit error by
    // type (it then answers 400 with this text), so look at both.
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE
        || e.body_text().contains("length limit exceeded")
    {
        crate::domain::Error::new(
            ErrorKind::TooLarge,
            "payload_too_large",
            format!("request body is larger than {MAX_BODY} bytes"),
        )
    } else {
        crate::domain::Error::new(ErrorKind::BadRequest, "bad_request", e.body_text())
    }
}

/// Middleware: count and time every answer.
async fn record_metrics(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0).unwrap_or(
        if resp.status().is_success() {
            "ok"
        } else {
            "other"
        },
    );
    s.metrics
        .request_seconds
        .get_or_create(&crate::metrics::RouteLabel {
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    s.metrics
        .requests
        .get_or_create(&crate::metrics::RequestLabels {
            route,
            status: resp.status().as_u16(),
            code,
        })
        .inc();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_answer_says_when_to_retry() {
        let e = crate::domain::Error::new(ErrorKind::Unavailable, "no_channel", "retry");
        let resp = ApiError::from(e).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[axum::http::header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[axum::http::header::CONNECTION], "close");
        let resp = ApiError::new(StatusCode::CONFLICT, "offline", "no").into_response();
        assert!(!resp.headers().contains_key(axum::http::header::RETRY_AFTER));
    }
}
