//! The web console's handlers (`tether_control::console`), through its real router called
//! in-process on a real SQLite store, with sessions signed in the way a browser does:
//! a link minted over the API with a real operator certificate, exchanged on the login
//! route. The rules each test defends are in its name: no session → the login page; the
//! role matrix and audited denials; the CSRF matrix; the exact security headers;
//! escaping; single-use, expiring links; session expiry; revoking an operator ends its
//! sessions; a presence change reaches an open live stream as a `row` event.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tether_api::appliances::{PlatformBinding, RegisterRequest};
use tether_api::console::LoginLink;
use tether_api::operators::Role;
use tether_audit::{Actor, AuditEntry, AuditEvent};
use tether_control::config::ControlConfig;
use tether_control::console::{self, ConsoleState, CSP};
use tether_control::domain::ca::Ca;
use tether_control::domain::console::{check_session, exchange_link, Client, Secret};
use tether_control::domain::operators::{self, Caller};
use tether_control::http::server::PeerCertificate;
use tether_control::http::AppState;
use tether_control::store::sql::SqlStore;
use tether_control::store::{AuditSearch, OperatorCertificate, Store};
use tether_proto::cluster::SessionReport;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const ORIGIN: &str = "https://console.test:8445";
const TRUST_DOMAIN: &str = "example.com";

struct Control {
    state: AppState,
    console: ConsoleState,
    api: Router,
    app: Router,
    _stop: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

async fn control() -> Control {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        trust_domain: TRUST_DOMAIN.into(),
        ..ControlConfig::default()
    };
    let ca = Ca::init(
        dir.path(),
        &cfg.ca_config(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let store = SqlStore::connect(&SqlStore::sqlite_url(&dir.path().join("control.db")))
        .await
        .unwrap();
    let mut state = tether_control::run::app_state(
        &cfg,
        Arc::new(store),
        Arc::new(ca),
        Arc::new(tether_control::domain::proof::Verifiers::new(&Default::default()).unwrap()),
    );
    state.console_origin = Some(Arc::from(ORIGIN));
    let stop = CancellationToken::new();
    let console = ConsoleState::new(
        state.clone(),
        ORIGIN.into(),
        cfg.console.policy(),
        stop.clone(),
    );
    Control {
        api: tether_control::http::router(state.clone()),
        app: console::router(console.clone()),
        console,
        state,
        _stop: stop.drop_guard(),
        _dir: dir,
    }
}

fn store(c: &Control) -> &dyn Store {
    c.state.domain.store.as_ref()
}

fn now() -> i64 {
    tether_control::now_unix()
}

/// Operator `name` with `role` and a recorded certificate; its leaf DER.
async fn operator(c: &Control, name: &str, role: Role) -> Vec<u8> {
    let bundle = operators::create_invite(
        store(c),
        "https://control.test".into(),
        c.state.domain.ca.root_pem(),
        name,
        role,
        Duration::from_secs(600),
        Caller::LocalAdmin.actor(),
        now(),
    )
    .await
    .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let issued = c
        .state
        .domain
        .ca
        .issue_operator(name, &csr, time::OffsetDateTime::now_utc())
        .unwrap();
    let hash = tether_control::domain::token::Token::from_secret(&bundle.token).hash();
    let cert = OperatorCertificate {
        fingerprint: issued.fingerprint_hex.clone(),
        serial: issued.serial_hex.clone(),
        operator: name.into(),
        not_after: issued.not_after,
    };
    let event = tether_audit::AuditEvent::success(
        tether_audit::Actor::operator(name),
        "operator.login",
        name,
    );
    store(c)
        .redeem_invite(&hash, &cert, now(), &event)
        .await
        .unwrap()
        .unwrap();
    issued.cert_der
}

/// A login link minted over the API by the operator holding `der`: (id, secret).
async fn mint_link(c: &Control, der: &[u8]) -> (String, String) {
    let mut req = Request::post("/v1/console/login-links")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(PeerCertificate(Some(Arc::from(der))));
    let resp = c.api.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let link: LoginLink = serde_json::from_slice(&body).unwrap();
    let rest = link
        .url
        .strip_prefix(&format!("{ORIGIN}/console/login/"))
        .expect("the link is on the console's origin");
    let (id, secret) = rest.split_once('#').expect("the secret is in the fragment");
    (id.to_owned(), secret.to_owned())
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn send(c: &Control, req: Request<Body>) -> Answer {
    let resp = c.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A same-origin form POST, as the browser sends one from the console's pages.
fn form(path: &str, cookie: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "same-origin")
        .header("origin", ORIGIN);
    if let Some(cookie) = cookie {
        b = b.header(header::COOKIE, format!("{}={cookie}", console::COOKIE));
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(cookie) = cookie {
        b = b.header(header::COOKIE, format!("{}={cookie}", console::COOKIE));
    }
    b.body(Body::empty()).unwrap()
}

/// Exchange a link as the login page does; the session cookie's value.
async fn exchange(c: &Control, id: &str, secret: &str) -> Answer {
    send(
        c,
        form(
            &format!("/console/login/{id}"),
            None,
            &format!("secret={secret}"),
        ),
    )
    .await
}

fn cookie_of(a: &Answer) -> String {
    let set = a.headers[header::SET_COOKIE].to_str().unwrap();
    let (pair, attrs) = set.split_once(';').unwrap();
    assert_eq!(
        attrs.trim(),
        format!(
            "Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            12 * 3600
        )
    );
    let (name, value) = pair.split_once('=').unwrap();
    assert_eq!(name, "__Host-tether_console");
    assert_eq!(value.len(), 64, "256 bits in hex");
    value.to_owned()
}

/// Operator `name` with `role`, signed in: its session cookie.
async fn sign_in(c: &Control, name: &str, role: Role) -> String {
    let der = operator(c, name, role).await;
    let (id, secret) = mint_link(c, &der).await;
    let a = exchange(c, &id, &secret).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(a.location(), "/console/");
    cookie_of(&a)
}

/// Record a current certificate of `id` valid from `not_before` to `not_after`, as an
/// enrollment does (serial `0a`, fingerprint `fp` repeated to 64 hex digits).
async fn enrolled(c: &Control, id: &str, fp: &str, not_before: i64, not_after: i64) {
    let cert = tether_control::store::CertRecord {
        serial: "0a".into(),
        appliance_id: id.into(),
        fingerprint: fp.repeat(32),
        not_before,
        not_after,
        state: tether_control::store::CertState::Current,
    };
    let event = Caller::LocalAdmin.event("appliance.enroll", id);
    store(c)
        .record_certificate(&cert, now(), 0, &event)
        .await
        .unwrap();
}

async fn register(c: &Control, id: &str, tenant: &str) {
    tether_control::domain::appliances::register(
        &c.state.domain.registry(),
        &Caller::LocalAdmin,
        RegisterRequest {
            id: id.into(),
            tenant: Some(tenant.into()),
            binding: PlatformBinding::TokenOnly,
        },
        now(),
    )
    .await
    .unwrap();
}

/// The synchronizer token the page's forms carry.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with the token")
        + 19;
    html[at..at + 64].to_owned()
}

async fn audit(c: &Control, action: &str) -> Vec<AuditEntry> {
    store(c)
        .audit_search(&AuditSearch {
            action_prefix: Some(action.into()),
            limit: 100,
            ..AuditSearch::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == action)
        .collect()
}

#[tokio::test]
async fn without_a_session_every_page_redirects_to_login() {
    let c = control().await;
    for path in [
        "/console/",
        "/console/alerts",
        "/console/appliances/a1",
        "/console/brokers",
        "/console/operators",
        "/console/audit",
        "/console/account",
        "/console/events?view=fleet",
    ] {
        let a = send(&c, get(path, None)).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(a.location(), "/console/login", "{path}");
        let a = send(&c, get(path, Some(&"0".repeat(64)))).await;
        assert_eq!(
            a.location(),
            "/console/login",
            "{path} with an unknown cookie"
        );
    }
    let a = send(&c, get("/console/login", None)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("tether console"));
}

#[tokio::test]
async fn every_answer_carries_the_exact_security_headers() {
    let c = control().await;
    let cookie = sign_in(&c, "alice", Role::Viewer).await;
    for (path, cookie) in [
        ("/console/login", None),
        ("/console/", Some(cookie.as_str())),
    ] {
        let a = send(&c, get(path, cookie)).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        let h = |n: &str| a.headers[n].to_str().unwrap().to_owned();
        assert_eq!(
            h("content-security-policy"),
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        );
        assert_eq!(h("content-security-policy"), CSP);
        assert_eq!(h("x-content-type-options"), "nosniff");
        assert_eq!(h("referrer-policy"), "no-referrer");
        assert_eq!(h("cache-control"), "no-store");
        assert_eq!(h("strict-transport-security"), "max-age=31536000");
        assert_eq!(h("content-type"), "text/html; charset=utf-8");
        // No inline script: every <script> names a file of the console's own.
        for (i, _) in a.body.match_indices("<script") {
            assert!(
                a.body[i..].starts_with("<script src=\"/console/assets/"),
                "{path}"
            );
        }
        for handler in [
            "onclick=",
            "onload=",
            "onsubmit=",
            "onchange=",
            "hx-on",
            "style=",
        ] {
            assert!(!a.body.contains(handler), "no {handler} on {path}");
        }
    }
    // The assets are immutable and still carry the headers.
    let page = send(&c, get("/console/login/00ff", None)).await;
    let at = page.body.find("/console/assets/login.").unwrap();
    let path = &page.body[at..at + page.body[at..].find('"').unwrap()];
    let a = send(&c, get(path, None)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.headers["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(a.headers["content-security-policy"], CSP);
}

#[tokio::test]
async fn a_login_link_is_single_use_and_its_secret_is_never_stored() {
    let c = control().await;
    let der = operator(&c, "alice", Role::Operator).await;
    let (id, secret) = mint_link(&c, &der).await;
    let link = store(&c).find_console_link(&id).await.unwrap().unwrap();
    assert_ne!(link.secret_sha256, secret);
    assert_eq!(link.secret_sha256, Secret::from_client(&secret).hash());
    assert_eq!(audit(&c, "operator.console_link").await.len(), 1);

    // The preview says whose it is and spends nothing.
    let a = send(
        &c,
        form(
            &format!("/console/login/{id}/preview"),
            None,
            &format!("secret={secret}"),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["operator"], "alice");
    assert_eq!(v["role"], "operator");

    // A wrong secret is refused and spends nothing either.
    let a = exchange(&c, &id, &"0".repeat(64)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("link_unknown"));
    let first = exchange(&c, &id, &secret).await;
    assert_eq!(first.status, StatusCode::SEE_OTHER);
    let second = exchange(&c, &id, &secret).await;
    assert_eq!(second.status, StatusCode::FORBIDDEN);
    assert!(second.body.contains("link_used"), "{}", second.body);
    assert!(second.headers.get(header::SET_COOKIE).is_none());
    let logins = audit(&c, "console.login").await;
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].details["via"], "console");
    let refused = audit(&c, "console.login_refused").await;
    let codes: Vec<_> = refused.iter().map(|e| e.details["code"].clone()).collect();
    assert_eq!(codes, ["link_used", "link_unknown"]);
}

#[tokio::test]
async fn a_login_link_expires_after_sixty_seconds() {
    let c = control().await;
    let der = operator(&c, "alice", Role::Viewer).await;
    let (id, secret) = mint_link(&c, &der).await;
    let expires = store(&c)
        .find_console_link(&id)
        .await
        .unwrap()
        .unwrap()
        .expires_at;
    let minted = expires - 60;
    assert!((minted - now()).abs() <= 2);
    let policy = c.console.policy;
    let secret = Secret::from_client(&secret);
    let e = exchange_link(
        store(&c),
        &id,
        &secret,
        policy,
        &Client::default(),
        minted + 60,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, "link_expired");
    // One second earlier it still works (once).
    exchange_link(
        store(&c),
        &id,
        &secret,
        policy,
        &Client::default(),
        minted + 59,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_login_link_of_a_revoked_operator_is_refused() {
    let c = control().await;
    operator(&c, "root", Role::Admin).await;
    let der = operator(&c, "mallory", Role::Operator).await;
    let (id, secret) = mint_link(&c, &der).await;
    operators::revoke(
        &c.state.domain.registry(),
        &Caller::LocalAdmin,
        "mallory",
        now(),
    )
    .await
    .unwrap();
    let a = exchange(&c, &id, &secret).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("operator_unknown"), "{}", a.body);
    assert!(a.headers.get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn sessions_end_when_idle_and_at_their_maximum() {
    let c = control().await;
    let cookie = sign_in(&c, "alice", Role::Viewer).await;
    let token = Secret::from_client(&cookie);
    let policy = c.console.policy;
    let idle = policy.idle.as_secs() as i64;
    let max = policy.max.as_secs() as i64;
    let start = store(&c)
        .console_session(&token.hash())
        .await
        .unwrap()
        .unwrap()
        .created_at;
    let s = store(&c);
    // Used just before the idle timeout: it lives on, and its idle expiry moves.
    let mut t = start + idle - 1;
    assert!(check_session(s, &token, policy, t).await.unwrap().is_some());
    while t + idle - 1 < start + max {
        t += idle - 1;
        assert!(
            check_session(s, &token, policy, t).await.unwrap().is_some(),
            "at {t}"
        );
    }
    // Past its maximum it is over, however recently used.
    assert!(check_session(s, &token, policy, start + max)
        .await
        .unwrap()
        .is_none());
    assert!(s.console_session(&token.hash()).await.unwrap().is_none());

    // A session left alone for the idle timeout is over.
    let cookie = sign_in(&c, "bob", Role::Viewer).await;
    let token = Secret::from_client(&cookie);
    let start = s
        .console_session(&token.hash())
        .await
        .unwrap()
        .unwrap()
        .created_at;
    assert!(check_session(s, &token, policy, start + idle)
        .await
        .unwrap()
        .is_none());
    let a = send(&c, get("/console/", Some(&cookie))).await;
    assert_eq!(a.location(), "/console/login");
}

#[tokio::test]
async fn last_seen_is_written_at_most_once_a_minute() {
    let c = control().await;
    let cookie = sign_in(&c, "alice", Role::Viewer).await;
    let token = Secret::from_client(&cookie);
    let s = store(&c);
    let policy = c.console.policy;
    let rec = s.console_session(&token.hash()).await.unwrap().unwrap();
    check_session(s, &token, policy, rec.created_at + 59)
        .await
        .unwrap();
    let same = s.console_session(&token.hash()).await.unwrap().unwrap();
    assert_eq!(same.last_seen_at, rec.created_at);
    check_session(s, &token, policy, rec.created_at + 60)
        .await
        .unwrap();
    let moved = s.console_session(&token.hash()).await.unwrap().unwrap();
    assert_eq!(moved.last_seen_at, rec.created_at + 60);
    assert_eq!(
        moved.idle_expires_at,
        rec.created_at + 60 + policy.idle.as_secs() as i64
    );
}

#[tokio::test]
async fn revoking_an_operator_ends_its_sessions() {
    let c = control().await;
    operator(&c, "root", Role::Admin).await;
    let cookie = sign_in(&c, "alice", Role::Operator).await;
    let a = send(&c, get("/console/", Some(&cookie))).await;
    assert_eq!(a.status, StatusCode::OK);
    operators::revoke(
        &c.state.domain.registry(),
        &Caller::LocalAdmin,
        "alice",
        now(),
    )
    .await
    .unwrap();
    assert!(store(&c)
        .console_sessions("alice")
        .await
        .unwrap()
        .is_empty());
    let a = send(&c, get("/console/", Some(&cookie))).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location(), "/console/login");
    let revoke = audit(&c, "operator.revoke").await;
    assert_eq!(revoke[0].details["console_sessions_ended"], 1);
}

#[tokio::test]
async fn logout_ends_the_session() {
    let c = control().await;
    let cookie = sign_in(&c, "alice", Role::Viewer).await;
    let page = send(&c, get("/console/account", Some(&cookie))).await;
    assert!(page.body.contains("Log out"));
    let csrf = csrf_of(&page.body);
    let a = send(
        &c,
        form("/console/logout", Some(&cookie), &format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location(), "/console/login");
    assert!(a.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let a = send(&c, get("/console/", Some(&cookie))).await;
    assert_eq!(a.location(), "/console/login");
    assert_eq!(audit(&c, "console.logout").await.len(), 1);
}

#[tokio::test]
async fn a_viewer_sees_no_actions_and_a_forged_post_is_refused_and_audited() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    for path in ["/console/", "/console/appliances/a1", "/console/alerts"] {
        let page = send(&c, get(path, Some(&cookie))).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        for button in [
            "Trigger renewal",
            ">Disable",
            "Revoke",
            "Create enrollment token",
        ] {
            assert!(
                !page.body.contains(button),
                "{button} on {path} for a viewer"
            );
        }
    }
    let page = send(&c, get("/console/appliances/a1", Some(&cookie))).await;
    let csrf = csrf_of(&page.body);
    for (path, body) in [
        ("/console/appliances/a1/disable", String::new()),
        ("/console/appliances/a1/renew", String::new()),
        (
            "/console/appliances/a1/revoke",
            "confirm_id=a1&reason=forged".to_owned(),
        ),
        (
            "/console/bulk",
            "action=disable&ids=a1&confirm=1".to_owned(),
        ),
    ] {
        let body = format!("csrf={csrf}&{body}");
        let a = send(&c, form(path, Some(&cookie), &body)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
        assert!(a.body.contains("role_forbidden"), "{path}");
    }
    let a = store(&c).get_appliance("a1").await.unwrap().unwrap();
    assert_eq!(a.status.as_str(), "active");
    assert_eq!(a.manual_renewal_generation, 0);
    let denied = audit(&c, "appliance.disable").await;
    assert_eq!(denied.len(), 2, "the single and the bulk disable");
    for e in &denied {
        assert_eq!(e.outcome.as_str(), "refused");
        assert_eq!(e.actor.name, "vera");
        assert_eq!(e.details["code"], "role_forbidden");
        assert_eq!(e.details["via"], "console");
        assert_eq!(e.details["role"], "viewer");
        assert_eq!(e.details["needed"], "operator");
    }
    // Not even the Operators page for a viewer.
    let a = send(&c, get("/console/operators", Some(&cookie))).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_operator_acts_with_the_apis_audit_entries_plus_via_console() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    register(&c, "a2", "acme").await;
    let cookie = sign_in(&c, "olga", Role::Operator).await;
    let page = send(&c, get("/console/appliances/a1", Some(&cookie))).await;
    for button in [
        "Trigger renewal",
        "Disable",
        "Revoke",
        "Create enrollment token",
    ] {
        assert!(page.body.contains(button), "{button}");
    }
    let csrf = csrf_of(&page.body);
    let post = |path: &str, body: &str| form(path, Some(&cookie), &format!("csrf={csrf}&{body}"));

    let a = send(&c, post("/console/appliances/a1/renew", "")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location(), "/console/appliances/a1?tab=trust");
    let a = send(&c, post("/console/appliances/a1/disable", "")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(
        store(&c)
            .get_appliance("a1")
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "disabled"
    );
    let a = send(&c, post("/console/appliances/a1/enable", "")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let a = send(&c, post("/console/appliances/a1/tokens", "")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("id=\"token-value\">tt_"));

    let session =
        store(&c).console_sessions("olga").await.unwrap()[0].token_sha256[..12].to_owned();
    for action in [
        "appliance.request_renewal",
        "appliance.disable",
        "appliance.enable",
        "token.create",
    ] {
        let e = &audit(&c, action).await[0];
        assert_eq!(e.outcome.as_str(), "success", "{action}");
        assert_eq!(e.actor.name, "olga");
        assert_eq!(e.target, "a1");
        assert_eq!(e.details["via"], "console", "{action}");
        assert_eq!(e.details["session"], session.as_str(), "{action}");
    }

    // Revoke: refused unless the typed id is the id; the reason is recorded.
    let a = send(
        &c,
        post(
            "/console/appliances/a2/revoke",
            "confirm_id=a1&reason=cloned",
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("confirm_mismatch"));
    assert_eq!(
        store(&c)
            .get_appliance("a2")
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "active"
    );
    let a = send(
        &c,
        post(
            "/console/appliances/a2/revoke",
            "confirm_id=a2&reason=cloned+certificate",
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(
        store(&c)
            .get_appliance("a2")
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "revoked"
    );
    let revokes = audit(&c, "appliance.revoke").await;
    assert_eq!(revokes[0].outcome.as_str(), "success");
    assert_eq!(revokes[0].details["reason"], "cloned certificate");
    assert_eq!(revokes[1].details["code"], "confirm_mismatch");

    // Bulk: first a confirmation stating the count, then the actions.
    let a = send(&c, post("/console/bulk", "action=renew&ids=a1&ids=a2")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body.contains("Trigger renewal for 2 appliances?"),
        "{}",
        a.body
    );
    assert_eq!(
        store(&c)
            .get_appliance("a1")
            .await
            .unwrap()
            .unwrap()
            .manual_renewal_generation,
        1
    );
    let a = send(
        &c,
        post("/console/bulk", "action=renew&ids=a1&ids=a2&confirm=2"),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        store(&c)
            .get_appliance("a1")
            .await
            .unwrap()
            .unwrap()
            .manual_renewal_generation,
        2
    );
}

#[tokio::test]
async fn state_changes_need_the_consoles_origin_and_the_session_token() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let cookie = sign_in(&c, "olga", Role::Operator).await;
    let page = send(&c, get("/console/appliances/a1", Some(&cookie))).await;
    let csrf = csrf_of(&page.body);
    let cookie_h = format!("{}={cookie}", console::COOKIE);
    let attempt = |headers: &[(&str, &str)], body: &str| {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri("/console/appliances/a1/renew")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, cookie_h.clone());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    };
    let good = format!("csrf={csrf}");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, StatusCode);
    let cases: Vec<Case> = vec![
        (
            "no Origin, no fetch metadata",
            vec![],
            good.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            "foreign Origin",
            vec![("origin", "https://evil.example")],
            good.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            "cross-site fetch",
            vec![("sec-fetch-site", "cross-site"), ("origin", ORIGIN)],
            good.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            "same-site (another subdomain)",
            vec![("sec-fetch-site", "same-site")],
            good.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            "same-origin without the token",
            vec![("sec-fetch-site", "same-origin")],
            String::new(),
            StatusCode::FORBIDDEN,
        ),
        (
            "same-origin with a wrong token",
            vec![("sec-fetch-site", "same-origin")],
            format!("csrf={}", "0".repeat(64)),
            StatusCode::FORBIDDEN,
        ),
        (
            "same-origin with the token",
            vec![("sec-fetch-site", "same-origin")],
            good.clone(),
            StatusCode::SEE_OTHER,
        ),
        (
            "the console's Origin without fetch metadata, with the token",
            vec![("origin", ORIGIN)],
            good.clone(),
            StatusCode::SEE_OTHER,
        ),
    ];
    let mut refused = 0;
    for (what, headers, body, want) in cases {
        let a = send(&c, attempt(&headers, &body)).await;
        assert_eq!(a.status, want, "{what}: {}", a.body);
        if want == StatusCode::FORBIDDEN {
            refused += 1;
            assert!(a.body.contains("csrf_refused"), "{what}");
        }
    }
    // The token also works as a header (scripts).
    let a = send(
        &c,
        attempt(
            &[("sec-fetch-site", "same-origin"), ("x-csrf-token", &csrf)],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let a = store(&c).get_appliance("a1").await.unwrap().unwrap();
    assert_eq!(
        a.manual_renewal_generation, 3,
        "only the accepted requests acted"
    );
    let entries = audit(&c, "console.csrf_refused").await;
    assert_eq!(entries.len(), refused);
    assert!(entries.iter().all(|e| e.outcome.as_str() == "refused"));
    assert!(entries.iter().all(|e| e.actor.name == "olga"));
    // The login exchange is origin-checked too.
    let a = send(
        &c,
        Request::post("/console/login/00ff")
            .header("sec-fetch-site", "cross-site")
            .body(Body::from("secret=x"))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_tenant_named_script_renders_as_text() {
    let c = control().await;
    register(&c, "a1", "<script>alert(1)</script>").await;
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    for path in [
        "/console/",
        "/console/appliances/a1",
        "/console/audit",
        "/console/?tenant=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    ] {
        let a = send(&c, get(path, Some(&cookie))).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(!a.body.contains("<script>alert"), "{path}");
        assert!(
            a.body.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
                || a.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path}: {}",
            a.body
        );
    }
}

#[tokio::test]
async fn the_fleet_header_counts_as_the_api_does() {
    let c = control().await;
    for i in 0..5 {
        register(&c, &format!("a{i}"), "acme").await;
    }
    tether_control::domain::appliances::change_status(
        &c.state.domain.registry(),
        &Caller::LocalAdmin,
        Caller::LocalAdmin.event("appliance.disable", "a0"),
        "a0",
        tether_api::appliances::ApplianceStatus::Disabled,
        now(),
    )
    .await
    .unwrap();
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    let a = send(&c, get("/console/", Some(&cookie))).await;
    let trust = tether_control::domain::trust::fleet_trust(
        store(&c),
        &c.state.domain.settings.trust,
        now(),
    )
    .await
    .unwrap();
    for (state, n) in &trust.counts {
        let tile = format!("data-trust-state=\"{state}\" data-count=\"{n}\"");
        assert!(a.body.contains(&tile), "{tile}");
    }
    assert!(a.body.contains("data-tile=\"disabled\" data-count=\"1\""));
    assert!(a.body.contains("data-tile=\"offline\" data-count=\"5\""));
    assert_eq!(a.body.matches("data-appliance-id=").count(), 5);
    assert!(a
        .body
        .contains("data-appliance-id=\"a3\" data-trust-state=\"not_enrolled\""));
    // Filters live in the URL.
    let a = send(&c, get("/console/?status=disabled", Some(&cookie))).await;
    assert_eq!(a.body.matches("data-appliance-id=").count(), 1);
    let a = send(&c, get("/console/?q=a4", Some(&cookie))).await;
    assert_eq!(a.body.matches("data-appliance-id=").count(), 1);
    assert!(a.body.contains("id=\"app-a4\""));
}

#[tokio::test]
async fn a_live_stream_gets_a_row_event_when_a_session_comes_up() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    let resp = c
        .app
        .clone()
        .oneshot(get("/console/events?view=fleet", Some(&cookie)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = String::new();
    seen.push_str(&next_frame(&mut body).await);
    assert!(seen.contains("retry: 2000"), "{seen}");
    // A broker reports a session of a1.
    let _rx = c.state.cluster.attach_link(
        "edge-1",
        vec![SessionReport {
            appliance: "a1".into(),
            session_id: 7,
            fingerprint: "00".into(),
            connected_at: now() as u64,
            connected_at_ms: 0,
            cert_not_after: 0,
            agent_version: "9.9.9".into(),
            capabilities: Vec::new(),
            transport: "quic".into(),
        }],
    );
    while !seen.contains("event: row") {
        seen.push_str(&next_frame(&mut body).await);
    }
    let row = seen.split("event: row").nth(1).unwrap();
    assert!(
        row.contains("<tr id=\"app-a1\" data-appliance-id=\"a1\""),
        "{row}"
    );
    assert!(row.contains("edge-1"), "{row}");
    assert!(row.contains("9.9.9"), "{row}");
    // Within about a second, the header tiles follow.
    while !seen.contains("event: summary") {
        seen.push_str(&next_frame(&mut body).await);
    }
    let summary = seen.split("event: summary").nth(1).unwrap();
    assert!(
        summary.contains("data-tile=\"connected\" data-count=\"1\""),
        "{summary}"
    );
    assert_eq!(c.console.hub.streams(), 1);
    drop(body);
    assert_eq!(
        c.console.hub.streams(),
        0,
        "a closed stream gives its place back"
    );
}

#[tokio::test]
async fn a_session_holds_at_most_eight_live_streams() {
    let c = control().await;
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    let mut open = Vec::new();
    for _ in 0..tether_control::console::events::MAX_PER_SESSION {
        let resp = c
            .app
            .clone()
            .oneshot(get("/console/events?view=fleet", Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp);
    }
    let resp = c
        .app
        .clone()
        .oneshot(get("/console/events?view=fleet", Some(&cookie)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another session has its own eight.
    let other = sign_in(&c, "walt", Role::Viewer).await;
    let resp = c
        .app
        .clone()
        .oneshot(get("/console/events?view=fleet", Some(&other)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    open.pop();
    let resp = c
        .app
        .clone()
        .oneshot(get("/console/events?view=fleet", Some(&cookie)))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "a closed stream frees a place"
    );
}

async fn next_frame(body: &mut Body) -> String {
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("an event within 5 s")
        .expect("the stream is open")
        .unwrap();
    String::from_utf8_lossy(&frame.into_data().unwrap()).into_owned()
}

#[tokio::test]
async fn a_certificate_near_expiry_is_a_trust_alert_with_trigger_renewal() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    register(&c, "a2", "acme").await;
    enrolled(&c, "a1", "ab", now() - 86_400, now() + 3_600).await;
    let viewer = sign_in(&c, "vera", Role::Viewer).await;
    let operator = sign_in(&c, "olga", Role::Operator).await;
    let page = send(&c, get("/console/alerts", Some(&operator))).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains("data-kind=\"renewal_due\" data-appliance-id=\"a1\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("Trigger renewal"));
    assert!(!page.body.contains("data-appliance-id=\"a2\""));
    let page = send(&c, get("/console/alerts", Some(&viewer))).await;
    assert!(page.body.contains("data-kind=\"renewal_due\""));
    assert!(!page.body.contains("Trigger renewal"));
    // The tile and the filter agree.
    let fleet = send(&c, get("/console/", Some(&viewer))).await;
    assert!(fleet
        .body
        .contains("data-trust-state=\"renewal_due\" data-count=\"1\""));
    assert!(fleet.body.contains("data-tile=\"alerts\" data-count=\"1\""));
    let due = send(&c, get("/console/?trust_state=renewal_due", Some(&viewer))).await;
    assert_eq!(due.body.matches("data-appliance-id=").count(), 1);
    assert!(due.body.contains("id=\"app-a1\""));
    // The appliance's Trust tab shows it too.
    let trust = send(&c, get("/console/appliances/a1?tab=trust", Some(&viewer))).await;
    assert!(trust.body.contains("id=\"current-serial\">0a<"));
    assert!(trust.body.contains("Renewal due"));
}

#[tokio::test]
async fn a_requested_renewal_not_done_after_ten_minutes_is_an_alert() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let record = |serial: &str, issued: i64| tether_control::store::CertRecord {
        serial: serial.into(),
        appliance_id: "a1".into(),
        fingerprint: serial.repeat(32),
        not_before: issued - tether_control::domain::ca::BACKDATE.as_secs() as i64,
        not_after: issued + 30 * 86_400,
        state: tether_control::store::CertState::Current,
    };
    let enroll = Caller::LocalAdmin.event("appliance.enroll", "a1");
    store(&c)
        .record_certificate(&record("0a", now() - 86_400), now(), 0, &enroll)
        .await
        .unwrap();
    let registry = c.state.domain.registry();
    let event = Caller::LocalAdmin.event("appliance.request_renewal", "a1");
    tether_control::domain::appliances::request_renewal(
        &registry,
        &Caller::LocalAdmin,
        event,
        "a1",
        now(),
    )
    .await
    .unwrap();
    let kinds = |alerts: Vec<console::alerts::Alert>| {
        alerts
            .into_iter()
            .map(|a| (a.kind, a.appliance.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    let (_, early) = console::alerts::collect(&c.state, now() + 60)
        .await
        .unwrap();
    assert!(kinds(early).is_empty());
    let grace = console::alerts::RENEWAL_GRACE_SECS;
    let (_, late) = console::alerts::collect(&c.state, now() + grace + 5)
        .await
        .unwrap();
    assert_eq!(kinds(late), [("renewal_not_done", "a1".to_owned())]);
    // Refused requests, which anyone can cause (a client with no certificate, a viewer),
    // neither hide the real one nor stand in for it.
    for _ in 0..3 {
        store(&c)
            .append_audit(
                &tether_audit::AuditEvent::refused(
                    tether_audit::Actor::system("unknown"),
                    "appliance.request_renewal",
                    "a1",
                    "unauthenticated",
                ),
                now() + 2,
            )
            .await
            .unwrap();
    }
    let (_, still) = console::alerts::collect(&c.state, now() + grace + 5)
        .await
        .unwrap();
    assert_eq!(
        kinds(still),
        [("renewal_not_done", "a1".to_owned())],
        "refused requests hide nothing"
    );
    assert!(
        console::alerts::last_renewal_request(&c.state, "a1")
            .await
            .unwrap()
            .is_some_and(|at| at <= now()),
        "the Trust tab's request is the operator's, not a refusal"
    );
    // A certificate issued after the request is the renewal done.
    store(&c)
        .record_certificate(&record("0b", now() + 1), now() + 1, 0, &enroll)
        .await
        .unwrap();
    let (_, done) = console::alerts::collect(&c.state, now() + grace + 5)
        .await
        .unwrap();
    assert!(kinds(done).is_empty());
}

#[tokio::test]
async fn a_revocation_through_the_api_reaches_an_open_stream() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    enrolled(&c, "a1", "cd", now() - 60, now() + 30 * 86_400).await;
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    let resp = c
        .app
        .clone()
        .oneshot(get("/console/events?view=fleet", Some(&cookie)))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut seen = next_frame(&mut body).await;
    // Not through the console: the store's allowlist change is what the stream hears.
    let registry = c.state.domain.registry();
    let event = Caller::LocalAdmin.event("appliance.revoke", "a1");
    tether_control::domain::appliances::change_status(
        &registry,
        &Caller::LocalAdmin,
        event,
        "a1",
        tether_api::appliances::ApplianceStatus::Revoked,
        now(),
    )
    .await
    .unwrap();
    while !seen.contains("event: row") {
        seen.push_str(&next_frame(&mut body).await);
    }
    assert!(
        seen.contains("data-appliance-id=\"a1\" data-trust-state=\"trust_revoked\""),
        "{seen}"
    );
}

/// An anonymous client cannot grow the audit log at will: requests no session vouches
/// for (refused forms, sign-in pages) are rate limited per address, as the API's
/// unauthenticated routes are.
#[tokio::test]
async fn anonymous_refusals_are_rate_limited_per_address() {
    let c = control().await;
    let from = |ip: &str| {
        let mut req = Request::post("/console/appliances/a1/disable")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("csrf=x"))
            .unwrap();
        let addr: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
        req.extensions_mut()
            .insert(tether_control::http::rate_limit::RemoteAddr(addr));
        req
    };
    let mut statuses = Vec::new();
    for _ in 0..200 {
        statuses.push(send(&c, from("192.0.2.7")).await.status.as_u16());
    }
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    let refused = statuses.iter().filter(|&&s| s == 403).count();
    assert!(
        limited > 100,
        "most of a burst of 200 is rate limited: {statuses:?}"
    );
    assert_eq!(limited + refused, 200, "{statuses:?}");
    let audited = audit(&c, "console.csrf_refused").await.len();
    assert_eq!(audited, refused, "only requests let through are audited");
    // Another address is not held back by the first.
    assert_eq!(send(&c, from("192.0.2.8")).await.status.as_u16(), 403);
}

/// The revoke form exists only for an appliance that does: an unknown or odd id gets a
/// 404, never a form posting to a path built from it.
#[tokio::test]
async fn the_revoke_form_is_only_for_a_known_appliance() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let cookie = sign_in(&c, "olga", Role::Operator).await;
    assert_eq!(
        send(&c, get("/console/appliances/a1/revoke", Some(&cookie)))
            .await
            .status
            .as_u16(),
        200
    );
    for odd in ["nope", "x%2Frevoke%3F", "..", "a%3Cb"] {
        let a = send(
            &c,
            get(&format!("/console/appliances/{odd}/revoke"), Some(&cookie)),
        )
        .await;
        assert_eq!(a.status.as_u16(), 404, "{odd}: {}", a.body);
        assert!(!a.body.contains("confirm_id"), "{odd}: no revoke form");
    }
}

#[tokio::test]
async fn the_trust_alerts_page_follows_changes_live() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let cookie = sign_in(&c, "olga", Role::Operator).await;
    let page = send(&c, get("/console/alerts", Some(&cookie))).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains("data-live=\"/console/events?view=alerts\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("id=\"no-alerts\""));
    let csrf = csrf_of(&page.body);
    let resp = c
        .app
        .clone()
        .oneshot(get("/console/events?view=alerts", Some(&cookie)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut seen = next_frame(&mut body).await;
    // a1 gets a certificate an hour from expiry (as an enrollment records one).
    enrolled(&c, "a1", "ab", now() - 86_400, now() + 3_600).await;
    while !seen.contains("event: alerts") {
        seen.push_str(&next_frame(&mut body).await);
    }
    let table = seen.split("event: alerts").nth(1).unwrap();
    assert!(
        table.contains("<div id=\"alerts\" data-count=\"1\">"),
        "{table}"
    );
    assert!(
        table.contains("data-kind=\"renewal_due\" data-appliance-id=\"a1\""),
        "{table}"
    );
    // Its Trigger Renewal form carries this session's token, as the page's own would.
    assert!(
        table.contains(&format!("name=\"csrf\" value=\"{csrf}\"")),
        "{table}"
    );
}

#[tokio::test]
async fn logging_out_ends_that_sessions_live_streams_at_once() {
    let c = control().await;
    let alice = sign_in(&c, "alice", Role::Viewer).await;
    let bob = sign_in(&c, "bob", Role::Viewer).await;
    let mut streams = Vec::new();
    for cookie in [&alice, &bob] {
        let resp = c
            .app
            .clone()
            .oneshot(get("/console/events?view=fleet", Some(cookie)))
            .await
            .unwrap();
        let mut body = resp.into_body();
        assert!(next_frame(&mut body).await.contains("event: hello"));
        streams.push(body);
    }
    let mut bobs = streams.pop().unwrap();
    let mut alices = streams.pop().unwrap();
    let page = send(&c, get("/console/account", Some(&alice))).await;
    let a = send(
        &c,
        form(
            "/console/logout",
            Some(&alice),
            &format!("csrf={}", csrf_of(&page.body)),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    // Told by this process, not found by the periodic check (every 5 s).
    let frame = tokio::time::timeout(Duration::from_secs(2), alices.frame())
        .await
        .expect("the logout reaches the open stream at once")
        .expect("a frame")
        .unwrap();
    let text = String::from_utf8_lossy(&frame.into_data().unwrap()).into_owned();
    assert!(
        text.contains("event: reload") && text.contains("signed out"),
        "{text}"
    );
    assert!(alices.frame().await.is_none(), "then the stream ends");
    drop(alices);
    assert_eq!(c.console.hub.streams(), 1, "bob's stream stays");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bobs.frame())
            .await
            .is_err(),
        "bob's stream hears nothing of alice's logout"
    );
}

#[tokio::test]
async fn log_out_everywhere_ends_every_session_of_that_operator_only() {
    let c = control().await;
    let der = operator(&c, "alice", Role::Operator).await;
    let mut mine = Vec::new();
    for _ in 0..2 {
        let (id, secret) = mint_link(&c, &der).await;
        mine.push(cookie_of(&exchange(&c, &id, &secret).await));
    }
    let bob = sign_in(&c, "bob", Role::Viewer).await;
    let page = send(&c, get("/console/account", Some(&mine[0]))).await;
    assert!(
        page.body.contains("Log out everywhere (2 sessions)"),
        "{}",
        page.body
    );
    // Without the page's token: refused, nothing ended.
    let a = send(&c, form("/console/logout-all", Some(&mine[0]), "csrf=00")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(store(&c).console_sessions("alice").await.unwrap().len(), 2);
    let a = send(
        &c,
        form(
            "/console/logout-all",
            Some(&mine[0]),
            &format!("csrf={}", csrf_of(&page.body)),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location(), "/console/login");
    assert!(a.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    for cookie in &mine {
        let a = send(&c, get("/console/", Some(cookie))).await;
        assert_eq!(a.location(), "/console/login", "every browser of alice");
    }
    assert!(store(&c)
        .console_sessions("alice")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        send(&c, get("/console/", Some(&bob))).await.status,
        StatusCode::OK
    );
    let ended = audit(&c, "console.logout").await;
    assert_eq!(ended.len(), 2);
    assert!(ended.iter().all(|e| e.details["all"] == true
        && e.actor.name == "alice"
        && e.details["via"] == "console"));
}

/// Two browsers (or an attacker who saw the link) racing to spend one link: one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_link_raced_from_two_browsers_signs_in_once() {
    let c = Arc::new(control().await);
    let der = operator(&c, "alice", Role::Operator).await;
    for _ in 0..5 {
        let (id, secret) = mint_link(&c, &der).await;
        let tries: Vec<_> = (0..4)
            .map(|_| {
                let (c, id, secret) = (c.clone(), id.clone(), secret.clone());
                tokio::spawn(async move { exchange(&c, &id, &secret).await })
            })
            .collect();
        let mut won = 0;
        for t in tries {
            let a = t.await.unwrap();
            if a.status == StatusCode::SEE_OTHER {
                won += 1;
                cookie_of(&a);
            } else {
                assert!(a.body.contains("link_used"), "{}: {}", a.status, a.body);
                assert!(a.headers.get(header::SET_COOKIE).is_none());
            }
        }
        assert_eq!(won, 1, "exactly one exchange of link {id} wins");
    }
    assert_eq!(store(&c).console_sessions("alice").await.unwrap().len(), 5);
    assert_eq!(audit(&c, "console.login").await.len(), 5);
    assert_eq!(audit(&c, "console.login_refused").await.len(), 15);
}

#[tokio::test]
async fn the_revoke_form_follows_the_appliance_live() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    let cookie = sign_in(&c, "olga", Role::Operator).await;
    let page = send(&c, get("/console/appliances/a1/revoke", Some(&cookie))).await;
    assert!(page.body.contains("id=\"appliance-head\""), "{}", page.body);
    assert!(page
        .body
        .contains("data-live=\"/console/events?view=appliance&#38;id=a1\""));
    assert!(page.body.contains("id=\"revoke-already\" hidden"));
}

#[tokio::test]
async fn the_signed_operations_tab_shows_policy_phases_approvers_and_manifests() {
    let c = control().await;
    register(&c, "a1", "acme").await;
    register(&c, "a2", "acme").await;
    let cookie = sign_in(&c, "vera", Role::Viewer).await;
    let report = |id: &str, caps: Vec<String>| SessionReport {
        appliance: id.into(),
        session_id: 7,
        fingerprint: "00".into(),
        connected_at: now() as u64,
        connected_at_ms: 0,
        cert_not_after: 0,
        agent_version: "9.9.9".into(),
        capabilities: caps,
        transport: "quic".into(),
    };
    let _rx = c.state.cluster.attach_link(
        "edge-1",
        vec![
            report("a1", vec![tether_proto::capability::SIGNED_OPS.into()]),
            report("a2", Vec::new()),
        ],
    );
    let policy = "5".repeat(64);
    let status = vec![
        ("appliance.key".to_owned(), "ssh-ed25519 AAAAkey".to_owned()),
        ("policy.sha256".to_owned(), policy.clone()),
        (
            "policy.phases".to_owned(),
            "observe=on/none,operate=on/required/until=2026-12-31T00:00:00.000Z,tunnel=off"
                .to_owned(),
        ),
        ("privsep".to_owned(), "setuid".to_owned()),
        (
            "approvers".to_owned(),
            "sec-lead:SHA256:ab/c+d,<script>x</script>:SHA256:def".to_owned(),
        ),
        ("audit.head".to_owned(), "12:deadbeef".to_owned()),
    ];
    c.state.cluster.heartbeats(
        "edge-1",
        vec![tether_proto::cluster::HeartbeatSummary {
            appliance: "a1".into(),
            session_id: 7,
            at: now() as u64,
            trust_state: "trusted".into(),
            cert_not_after: 0,
            status,
        }],
    );
    // A command's outcome with its signed manifest, as control records it.
    let manifest = r#"{"argv":["uptime"],"command_id":42}"#;
    let event = AuditEvent::success(Actor::operator("olga".to_owned()), "appliance.exec", "a1")
        .with("command_id", 42)
        .with("manifest_sha256", "f".repeat(64))
        .with("manifest", manifest)
        .with("manifest_sig", "-----BEGIN SSH SIGNATURE-----");
    store(&c).append_audit(&event, now()).await.unwrap();

    let tab = send(&c, get("/console/appliances/a1?tab=signed", Some(&cookie))).await;
    assert_eq!(tab.status, StatusCode::OK);
    let b = &tab.body;
    assert!(b.contains("id=\"tab-signed\""), "{b}");
    assert!(b.contains("signed-ops/1</span>). As its agent"), "{b}");
    assert!(
        b.contains(&format!("id=\"policy-digest\">{policy}<")),
        "{b}"
    );
    assert!(b.contains("data-phase=\"operate\"><td class=\"mono\">operate</td><td>on, required, until=2026-12-31T00:00:00.000Z</td>"), "{b}");
    assert!(
        b.contains("data-phase=\"tunnel\"><td class=\"mono\">tunnel</td><td>off</td>"),
        "{b}"
    );
    // Base64 fingerprints hold `/` and `+`: shown whole.
    assert!(b.contains("approver-fingerprint\">SHA256:ab/c+d<"), "{b}");
    assert!(b.contains("&#60;script&#62;x&#60;/script&#62;"), "{b}");
    assert!(!b.contains("<script>x"), "{b}");
    assert!(b.contains("12:deadbeef"), "{b}");
    assert!(b.contains(&"f".repeat(64)), "{b}");
    assert!(b.contains("{&#34;argv&#34;"), "the manifest, escaped: {b}");
    // An appliance whose agent does not announce signed operations says so plainly.
    let tab = send(&c, get("/console/appliances/a2?tab=signed", Some(&cookie))).await;
    assert!(tab.body.contains("does not announce"), "{}", tab.body);
    assert!(tab.body.contains("id=\"no-manifests\""), "{}", tab.body);
}

#[test]
fn a_wildcard_console_listener_needs_an_explicit_origin() {
    let mut s = tether_control::console::ConsoleSettings {
        listen: Some("0.0.0.0:8445".parse().unwrap()),
        ..Default::default()
    };
    let e = s.validate().unwrap_err();
    assert_eq!(e.field, "console.origin");
    assert!(e.reason.contains("wildcard"), "{}", e.reason);
    s.listen = Some("[::]:8445".parse().unwrap());
    assert!(s.validate().is_err());
    s.origin = Some("https://console.example.com:8445".into());
    s.validate().unwrap();
    s.origin = None;
    s.listen = Some("127.0.0.1:8445".parse().unwrap());
    s.validate().unwrap();
}

/// A slow or silent client cannot hold the console's listener: a TCP connection that never
/// starts TLS is closed after the handshake deadline, one that trickles its request head a
/// byte at a time is closed after the head deadline however it trickles, and a real
/// request meanwhile is answered while both still hold their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_do_not_hold_the_console() {
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let c = control().await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let tls = console::server::tls_config(&cert.pem(), &key.serialize_pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(console::server::serve(
        c.console.clone(),
        tls,
        listener,
        stop.clone(),
    ));
    let connector = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // Cut off: how long until the server closed, at most a minute.
    const GIVE_UP: Duration = Duration::from_secs(60);

    // Silent: TCP only, never a ClientHello.
    let silent = tokio::spawn(async move {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(GIVE_UP, s.read(&mut [0u8; 16])).await;
        assert!(
            closed.is_ok(),
            "a silent connection still open after {GIVE_UP:?}"
        );
        started.elapsed()
    });
    // Slowloris: TLS done, then a request head one byte every 300 ms, never ending.
    let trickle = {
        let (connector, name) = (connector.clone(), name.clone());
        tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let started = Instant::now();
            tls.write_all(b"GET /console/login HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                .await
                .unwrap();
            let mut buf = [0u8; 512];
            loop {
                assert!(
                    started.elapsed() < GIVE_UP,
                    "a trickling request head still open after {GIVE_UP:?}"
                );
                if tls.write_all(b"a").await.is_err() || tls.flush().await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await {
                    // Closed, or answered (a 408) and closed: cut off either way.
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
            started.elapsed()
        })
    };
    // Meanwhile an ordinary request is served.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /console/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !silent.is_finished() && !trickle.is_finished(),
        "the slow clients were still connected while the page was served"
    );
    let silent_for = silent.await.unwrap();
    let trickled_for = trickle.await.unwrap();
    eprintln!("silent client cut off after {silent_for:?}, trickling one after {trickled_for:?}");
    // The deadlines are 10 s each (TLS handshake, request head); trickling resets nothing.
    assert!(silent_for < Duration::from_secs(20), "{silent_for:?}");
    assert!(trickled_for < Duration::from_secs(20), "{trickled_for:?}");
    stop.cancel();
    server.await.unwrap().unwrap();
}
