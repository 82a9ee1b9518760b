//! The per-client-IP rate limit of the routes open without credentials
//! (`tether_control::http::rate_limit`), through the real router called in-process with the
//! extensions `server.rs` inserts ([`RemoteAddr`], [`PeerCertificate`]): the burst passes,
//! the next request is refused 429 `rate_limited` with `Retry-After` before its handler
//! (no audit entry), other addresses and the operator routes are not affected, the
//! metrics count it, and the client is admitted again once its bucket refilled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tether_control::config::ControlConfig;
use tether_control::domain::ca::Ca;
use tether_control::http::rate_limit::RemoteAddr;
use tether_control::http::server::PeerCertificate;
use tether_control::http::{router, AppState};
use tether_control::store::sql::SqlStore;
use tower::ServiceExt;

const TRUST_DOMAIN: &str = "example.com";
const CLIENT: &str = "192.0.2.10:40000";
const OTHER_CLIENT: &str = "198.51.100.7:40000";

struct Control {
    state: AppState,
    app: Router,
    _dir: tempfile::TempDir,
}

/// Control with `public_rate_per_sec = rate`, `public_burst = burst`.
async fn control(rate: u32, burst: u32) -> Control {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControlConfig {
        trust_domain: TRUST_DOMAIN.into(),
        ..ControlConfig::default()
    };
    cfg.http.public_rate_per_sec = rate;
    cfg.http.public_burst = burst;
    cfg.validate().unwrap();
    let ca = Ca::init(
        dir.path(),
        &cfg.ca_config(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let store = SqlStore::connect(&SqlStore::sqlite_url(&dir.path().join("control.db")))
        .await
        .unwrap();
    let state = tether_control::run::app_state(
        &cfg,
        Arc::new(store),
        Arc::new(ca),
        Arc::new(tether_control::domain::proof::Verifiers::new(&Default::default()).unwrap()),
    );
    let app = router(state.clone());
    Control {
        state,
        app,
        _dir: dir,
    }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

impl Control {
    /// `method path` with `body` (JSON) from `remote`, without a client certificate.
    async fn call(&self, method: &str, path: &str, body: Option<Value>, remote: &str) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).unwrap();
        req.extensions_mut().insert(PeerCertificate(None));
        req.extensions_mut()
            .insert(RemoteAddr(remote.parse::<SocketAddr>().unwrap()));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            retry_after,
            body,
        }
    }

    /// A login with a token nobody issued (refused 403, and audited).
    async fn bad_login(&self, remote: &str) -> Answer {
        let body = json!({"token": "not-a-token", "csr_pem": csr()});
        self.call("POST", "/v1/operators/login", Some(body), remote)
            .await
    }

    async fn audit_len(&self) -> usize {
        self.state
            .domain
            .store
            .audit_entries(0, 10_000)
            .await
            .unwrap()
            .len()
    }

    fn metric(&self, sample: &str) -> Option<String> {
        self.state.metrics.render().lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.to_owned())
        })
    }
}

fn assert_rate_limited(a: &Answer) {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.body["error"], "rate_limited", "{}", a.body);
    assert!(a.body["message"].as_str().is_some_and(|m| !m.is_empty()));
    let secs: u64 = a
        .retry_after
        .as_deref()
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=3).contains(&secs), "Retry-After: {secs}");
}

/// The burst passes (each refusal audited); the next login is 429 before the handler, so
/// it writes no audit entry; another address and the operator routes still get through;
/// the metrics show the 429.
#[tokio::test]
async fn unauthenticated_flood_is_limited_per_address_before_the_handler() {
    // One request per second after a burst of 3: the four calls below take well under
    // a second, so the fourth is over the limit.
    let c = control(1, 3).await;
    let before = c.audit_len().await;
    for _ in 0..3 {
        let a = c.bad_login(CLIENT).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    }
    assert_eq!(c.audit_len().await, before + 3);

    let refused = c.bad_login(CLIENT).await;
    assert_rate_limited(&refused);
    assert_eq!(
        c.audit_len().await,
        before + 3,
        "a refused request is not audited"
    );
    // The bucket is per address and shared by the three routes.
    assert_rate_limited(&c.call("POST", "/v1/enroll/challenge", None, CLIENT).await);
    assert_rate_limited(&c.call("POST", "/v1/enroll", Some(json!({})), CLIENT).await);

    // Another client is not affected.
    let other = c.bad_login(OTHER_CLIENT).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN, "{}", other.body);
    let challenge = c
        .call("POST", "/v1/enroll/challenge", None, OTHER_CLIENT)
        .await;
    assert_eq!(challenge.status, StatusCode::OK, "{}", challenge.body);

    // Routes that need a certificate are not limited (they answer 401 here, never 429).
    for _ in 0..10 {
        let a = c.call("GET", "/v1/operators", None, CLIENT).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
        let a = c.call("POST", "/v1/renew", Some(json!({})), CLIENT).await;
        assert_ne!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    }

    let sample = |route: &str| {
        format!(
            r#"tether_control_requests_total{{route="{route}",status="429",code="rate_limited"}}"#
        )
    };
    assert_eq!(
        c.metric(&sample("/v1/operators/login")).as_deref(),
        Some("1")
    );
    assert_eq!(
        c.metric(&sample("/v1/enroll/challenge")).as_deref(),
        Some("1")
    );
    assert_eq!(c.metric(&sample("/v1/enroll")).as_deref(), Some("1"));
}

/// After the `Retry-After` it was given, a limited client is admitted again (paused
/// time; the calls are malformed logins, answered 400 without the store).
#[tokio::test]
async fn limited_client_is_admitted_after_retry_after() {
    let c = control(2, 3).await;
    tokio::time::pause();
    let malformed = || c.call("POST", "/v1/operators/login", Some(json!({})), CLIENT);
    for _ in 0..3 {
        assert_eq!(malformed().await.status, StatusCode::BAD_REQUEST);
    }
    let refused = malformed().await;
    assert_rate_limited(&refused);
    assert_eq!(refused.retry_after.as_deref(), Some("1"));

    tokio::time::advance(Duration::from_millis(400)).await;
    assert_rate_limited(&malformed().await);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(malformed().await.status, StatusCode::BAD_REQUEST);
}

/// `public_rate_per_sec = 0` turns the limit off.
#[tokio::test]
async fn zero_rate_turns_the_limit_off() {
    let c = control(0, 0).await;
    for _ in 0..50 {
        let a = c
            .call("POST", "/v1/operators/login", Some(json!({})), CLIENT)
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    }
}
