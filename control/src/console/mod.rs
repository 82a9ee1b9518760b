//! The operators' web console: server-rendered pages on their own listener.
//!
//! # Design
//!
//! - **Same operations as the API.** Every page and action authorizes through
//!   [`crate::domain::operators::authorize`] with a [`Principal::Console`] and calls the
//!   domain functions the JSON API calls, so roles, refusals and audit entries are the
//!   same; console entries add `via: "console"` and the session's short reference.
//! - **Sign-in** ([`auth`]): `tether console` mints a single-use link over mutual TLS
//!   (`POST /v1/console/login-links`); the login page exchanges it for a session stored in
//!   the database (`__Host-tether_console` cookie: Secure, HttpOnly, SameSite=Strict), so
//!   any replica serves any page. See [`crate::domain::console`].
//! - **Safe by construction** ([`guard`]): every state-changing request must come from
//!   the console's own origin (`Sec-Fetch-Site: same-origin`, or no fetch metadata and an
//!   `Origin` equal to [`ConsoleSettings::origin`]) and carry the session's synchronizer
//!   token (`csrf` form field or `x-csrf-token` header); refusals are audited as
//!   `console.csrf_refused`. Every answer carries a strict CSP (no inline script) and the
//!   other security headers ([`SECURITY_HEADERS`]); askama escapes all output.
//! - **Live** ([`events`]): server-sent events render the same row partial the table
//!   uses.
//! - **Listener** ([`server`]): server-only TLS (no client-certificate request), h2 and
//!   HTTP/1.1.
//!
//! # Layout
//!
//! `auth.rs` sign-in and logout; `pages.rs` the read pages; `actions.rs` the forms that
//! change something; `alerts.rs` trust findings; `events.rs` SSE; `view.rs` the templates'
//! data; `assets.rs` embedded CSS/JS; `server.rs` the listener.

pub mod actions;
pub mod alerts;
pub mod assets;
pub mod auth;
pub mod events;
pub mod pages;
pub mod server;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tether_audit::{self as audit, Actor, AuditEvent};
use tracing::{debug, warn};

use crate::domain::console::SessionPolicy;
use crate::domain::console::{action, check_session, constant_time_eq, csrf_token, Secret};
use crate::domain::operators::{ConsoleSession, Principal, VIA_CONSOLE};
use crate::domain::{record_refusal, InvalidSetting};
use crate::http::rate_limit::RemoteAddr;
use crate::http::AppState;

/// Default idle timeout of a session: 30 minutes.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// Default absolute lifetime of a session: 12 hours.
pub const DEFAULT_SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
/// The console's address in `tether up`.
pub const UP_LISTEN: &str = "127.0.0.1:8445";
/// The session cookie.
pub const COOKIE: &str = "__Host-tether_console";
/// The header htmx-style requests carry the synchronizer token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The form field plain forms carry it in.
pub const CSRF_FIELD: &str = "csrf";
/// How long the body of a form may take to arrive.
const FORM_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest form body the console reads.
pub const MAX_FORM: usize = 64 * 1024;

/// The Content-Security-Policy of every answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
base-uri 'none'";

/// Headers on every console answer.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("strict-transport-security", "max-age=31536000"),
];

/// `[console]` in `control.toml`. Absent `listen`: no console.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Where the console listens (HTTPS). Default: none (no console); `tether up` sets
    /// `127.0.0.1:8445`.
    pub listen: Option<SocketAddr>,
    /// The origin browsers see (`https://host[:port]`), which the Origin check compares
    /// with and login links name. Default `https://<listen>`.
    pub origin: Option<String>,
    /// The console's certificate chain (PEM). Default: control's own server certificate
    /// (browsers will not trust Tether's private root: use a public or enterprise one).
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM); with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// A session ends after this long without a request. Default 30m.
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// A session ends this long after sign-in. Default 12h.
    #[serde(with = "humantime_serde")]
    pub session_max: Duration,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            listen: None,
            origin: None,
            tls_cert: None,
            tls_key: None,
            session_idle: DEFAULT_SESSION_IDLE,
            session_max: DEFAULT_SESSION_MAX,
        }
    }
}

impl std::fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ConsoleSettings {
            listen,
            origin,
            tls_cert,
            tls_key,
            session_idle,
            session_max,
        } = self;
        f.debug_struct("ConsoleSettings")
            .field("listen", listen)
            .field("origin", origin)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("session_idle", session_idle)
            .field("session_max", session_max)
            .finish()
    }
}

impl ConsoleSettings {
    /// The origin in force for a console bound at `bound`.
    pub fn origin_for(&self, bound: SocketAddr) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| format!("https://{bound}"))
            .trim_end_matches('/')
            .to_owned()
    }

    /// How long sessions live.
    pub fn policy(&self) -> SessionPolicy {
        SessionPolicy {
            idle: self.session_idle,
            max: self.session_max,
        }
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |field, reason: &str| {
            Err(InvalidSetting {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.session_idle.is_zero() {
            return bad("console.session_idle", "must be positive");
        }
        if self.session_max < self.session_idle {
            return bad(
                "console.session_max",
                "must not be shorter than session_idle",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("console.tls_cert", "tls_cert and tls_key go together");
        }
        if self.origin.is_none() && self.listen.is_some_and(|l| l.ip().is_unspecified()) {
            // The default origin is the bound address, which no browser sends for a
            // wildcard: every form would be refused as cross-site.
            return bad(
                "console.origin",
                "required when console.listen is a wildcard address (0.0.0.0 or [::]): \
                 the https://host[:port] browsers use to reach the console",
            );
        }
        if let Some(o) = &self.origin {
            let ok = o
                .strip_prefix("https://")
                .is_some_and(|rest| !rest.is_empty() && !rest.trim_end_matches('/').contains('/'));
            if !ok {
                return bad(
                    "console.origin",
                    "must be https://host[:port], without a path",
                );
            }
        }
        Ok(())
    }
}

/// What the console's handlers share.
#[derive(Clone, Debug)]
pub struct ConsoleState {
    /// The API's state: the domain, the cluster, metrics.
    pub app: AppState,
    /// The origin browsers see.
    pub origin: Arc<str>,
    /// How long sessions live.
    pub policy: SessionPolicy,
    /// Live updates.
    pub hub: Arc<events::Hub>,
    /// Requests no live session vouches for (sign-in pages, refused forms) are rate
    /// limited per address as the API's unauthenticated routes are: each may write an
    /// audit entry, so an anonymous client must not grow the database at will.
    pub limit: Arc<crate::http::rate_limit::PublicRateLimit>,
}

impl ConsoleState {
    /// The console over `app`, at `origin`; starts the live-update hub (until `stop`).
    pub fn new(
        app: AppState,
        origin: String,
        policy: SessionPolicy,
        stop: tokio_util::sync::CancellationToken,
    ) -> ConsoleState {
        let hub = events::Hub::start(&app, stop);
        let limit = Arc::new(crate::http::rate_limit::PublicRateLimit::new(&app.http));
        ConsoleState {
            limit,
            app,
            origin: Arc::from(origin),
            policy,
            hub,
        }
    }
}

/// The signed-in operator of a request ([`guard`] puts it in the extensions).
#[derive(Clone, Debug)]
pub struct Authed {
    /// The live session.
    pub session: ConsoleSession,
    /// Its synchronizer token.
    pub csrf: String,
}

impl Authed {
    /// As a principal for [`crate::domain::operators::authorize`].
    pub fn principal(&self) -> Principal<'_> {
        Principal::Console(&self.session)
    }
}

/// The console's router (every path under `/console/`).
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(pages::fleet))
        .route("/console/alerts", get(pages::alerts))
        .route("/console/appliances/{id}", get(pages::appliance))
        .route(
            "/console/appliances/{id}/revoke",
            get(pages::revoke_form).post(actions::revoke),
        )
        .route("/console/appliances/{id}/renew", post(actions::renew))
        .route("/console/appliances/{id}/disable", post(actions::disable))
        .route("/console/appliances/{id}/enable", post(actions::enable))
        .route("/console/appliances/{id}/tokens", post(actions::token))
        .route("/console/bulk", post(actions::bulk))
        .route("/console/brokers", get(pages::brokers))
        .route("/console/operators", get(pages::operators))
        .route("/console/audit", get(pages::audit))
        .route("/console/audit/export", get(pages::audit_export))
        .route("/console/account", get(pages::account))
        .route("/console/events", get(events::stream))
        .route("/console/login", get(auth::login_hint))
        .route(
            "/console/login/{id}",
            get(auth::login_page).post(auth::exchange),
        )
        .route("/console/login/{id}/preview", post(auth::preview))
        .route("/console/logout", post(auth::logout))
        .route("/console/logout-all", post(auth::logout_all))
        .route("/console/assets/{file}", get(assets::serve))
        .fallback(|| async {
            view::bare_error(
                StatusCode::NOT_FOUND,
                "Not found",
                "not_found",
                "no such page",
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// Add [`SECURITY_HEADERS`] to every answer, and `Cache-Control: no-store` to all but
/// the immutable assets.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        h.insert(*name, HeaderValue::from_static(value));
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why a state-changing request is refused as cross-site, if it is.
pub fn cross_site(headers: &HeaderMap, origin: &str) -> Option<&'static str> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match get("sec-fetch-site") {
        Some("same-origin") => None,
        Some(_) => Some("fetch_site"),
        None => {
            let any_fetch_metadata = headers.keys().any(|k| k.as_str().starts_with("sec-fetch-"));
            match get("origin") {
                _ if any_fetch_metadata => Some("fetch_site"),
                Some(o) if o == origin => None,
                Some(_) => Some("origin"),
                None => Some("no_origin"),
            }
        }
    }
}

/// The cookie's secret, if the request carries the session cookie.
pub fn session_cookie(headers: &HeaderMap) -> Option<Secret> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| Secret::from_client(v))
}

/// The middleware every console request goes through: the cross-site check on unsafe
/// methods; then, except for sign-in and assets, the session (none: 303 to
/// `/console/login`) and, on unsafe methods, its synchronizer token.
async fn guard(State(s): State<ConsoleState>, req: Request, next: Next) -> Response {
    let now = crate::now_unix();
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let unsafe_method = is_unsafe(&method);
    let open = path.starts_with("/console/login") || path.starts_with("/console/assets/");
    let store = s.app.domain.store.clone();
    let token = session_cookie(req.headers());
    let session = match &token {
        Some(t) => match check_session(store.as_ref(), t, s.policy, now).await {
            Ok(session) => session,
            Err(e) => return view::bare_error_of(e),
        },
        None => None,
    };
    if session.is_none() && (unsafe_method || path.starts_with("/console/login/")) {
        if let Some(RemoteAddr(remote)) = req.extensions().get::<RemoteAddr>().copied() {
            if let Err(limited) = s.limit.check(remote.ip()) {
                let secs = limited.retry_after.as_secs().max(1);
                debug!(%remote, retry_after = secs, "console request rate limited");
                let mut resp = view::bare_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many requests",
                    "rate_limited",
                    "too many requests from this address; wait a moment",
                );
                if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                    resp.headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, v);
                }
                return resp;
            }
        }
    }
    if unsafe_method {
        if let Some(reason) = cross_site(req.headers(), &s.origin) {
            let sec_fetch_site = req
                .headers()
                .get("sec-fetch-site")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let origin = req
                .headers()
                .get("origin")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            return csrf_refused(
                &s,
                session.as_ref(),
                &path,
                reason,
                &origin,
                &sec_fetch_site,
                now,
            )
            .await;
        }
    }
    if open {
        return next.run(req).await;
    }
    let (Some(token), Some(session)) = (token, session) else {
        return Redirect::to("/console/login").into_response();
    };
    let csrf = csrf_token(&token);
    let mut req = req;
    if unsafe_method {
        let (parts, body) = req.into_parts();
        // A form arrives at once or not at all: a slow body must not hold the connection.
        let read = tokio::time::timeout(FORM_READ_TIMEOUT, axum::body::to_bytes(body, MAX_FORM));
        let bytes = match read.await {
            Ok(Ok(b)) => b,
            Err(_) => {
                return view::bare_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "Too slow",
                    "request_timeout",
                    "the form took too long to arrive",
                )
            }
            Ok(Err(_)) => {
                return view::bare_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Too large",
                    "payload_too_large",
                    "the form is too large",
                )
            }
        };
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| form_urlencoded_field(&bytes, CSRF_FIELD));
        let ok = sent.is_some_and(|t| constant_time_eq(t.as_bytes(), csrf.as_bytes()));
        if !ok {
            return csrf_refused(&s, Some(&session), &path, "token", "", "", now).await;
        }
        req = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
    req.extensions_mut().insert(Authed { session, csrf });
    next.run(req).await
}

/// The first value of `name` in an `application/x-www-form-urlencoded` body.
pub fn form_urlencoded_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

async fn csrf_refused(
    s: &ConsoleState,
    session: Option<&ConsoleSession>,
    path: &str,
    reason: &'static str,
    origin: &str,
    fetch_site: &str,
    now: i64,
) -> Response {
    let actor = match session {
        Some(s) => Actor::operator(s.operator().to_owned()),
        None => Actor::system(audit::system::UNKNOWN),
    };
    warn!(path, reason, actor = %actor, "console request refused as cross-site");
    let mut event = AuditEvent::refused(
        actor,
        action::CSRF_REFUSED,
        audit::clip(path, audit::MAX_TARGET_LEN),
        "csrf_refused",
    )
    .with("via", VIA_CONSOLE)
    .with("reason", reason);
    if !origin.is_empty() {
        event.set("origin", audit::clip(origin, 200));
    }
    if !fetch_site.is_empty() {
        event.set("sec_fetch_site", audit::clip(fetch_site, 40));
    }
    if let Some(session) = session {
        event.set("session", session.session_ref());
    }
    record_refusal(s.app.domain.store.as_ref(), &event, now).await;
    view::bare_error(
        StatusCode::FORBIDDEN,
        "Refused",
        "csrf_refused",
        "this request did not come from the console's own pages",
    )
}
