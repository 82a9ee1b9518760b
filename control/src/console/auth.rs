//! Sign-in and sign-out pages: the login hint, the login link's page (its script reads
//! the secret from the fragment), the preview ("Continue as …", spends nothing), the
//! exchange (a session cookie, 303 to the Fleet) and logout.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form, Json};
use serde::Deserialize;

use super::assets::{assets, Assets};
use super::view::{bare_error_of, html};
use super::{Authed, ConsoleState, COOKIE};
use crate::domain::console::{self, Client, Secret};
use crate::http::rate_limit::RemoteAddr;
use crate::http::status_of;

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    assets: &'static Assets,
    link: Option<String>,
}

/// `GET /console/login` — how to sign in.
pub async fn login_hint() -> Response {
    html(
        StatusCode::OK,
        &LoginPage {
            assets: assets(),
            link: None,
        },
    )
}

/// Whether `id` looks like a link id (so it can go into a URL of the page as is).
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `GET /console/login/{id}` — the link's page; its script reads the fragment.
pub async fn login_page(Path(id): Path<String>) -> Response {
    if !valid_id(&id) {
        return login_hint().await;
    }
    html(
        StatusCode::OK,
        &LoginPage {
            assets: assets(),
            link: Some(id),
        },
    )
}

/// The login forms' body.
#[derive(Deserialize)]
pub struct SecretForm {
    #[serde(default)]
    secret: String,
}

/// `POST /console/login/{id}/preview` — whose link this is (JSON), spending nothing.
pub async fn preview(
    State(s): State<ConsoleState>,
    Path(id): Path<String>,
    Form(form): Form<SecretForm>,
) -> Response {
    let now = crate::now_unix();
    let secret = Secret::from_client(&form.secret);
    match console::preview_link(s.app.domain.store.as_ref(), &id, &secret, now).await {
        Ok(p) => Json(serde_json::json!({"operator": p.operator, "role": p.role.as_str()}))
            .into_response(),
        Err(e) => (
            status_of(e.kind),
            Json(serde_json::json!({"error": e.code, "message": e.message})),
        )
            .into_response(),
    }
}

fn client(headers: &HeaderMap, remote: Option<Extension<RemoteAddr>>) -> Client {
    Client {
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        ip: remote
            .map(|Extension(r)| r.0.ip().to_string())
            .unwrap_or_default(),
    }
}

/// The session cookie carrying `token` for `max_secs`.
pub fn session_cookie(token: &Secret, max_secs: u64) -> String {
    format!(
        "{COOKIE}={}; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_secs}",
        token.expose()
    )
}

/// `POST /console/login/{id}` — exchange the link for a session: cookie, 303 to Fleet.
pub async fn exchange(
    State(s): State<ConsoleState>,
    Path(id): Path<String>,
    remote: Option<Extension<RemoteAddr>>,
    headers: HeaderMap,
    Form(form): Form<SecretForm>,
) -> Response {
    let now = crate::now_unix();
    let secret = Secret::from_client(&form.secret);
    let client = client(&headers, remote);
    match console::exchange_link(
        s.app.domain.store.as_ref(),
        &id,
        &secret,
        s.policy,
        &client,
        now,
    )
    .await
    {
        Ok((token, _session)) => {
            let mut resp = Redirect::to("/console/").into_response();
            if let Ok(v) = HeaderValue::from_str(&session_cookie(&token, s.policy.max.as_secs())) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => bare_error_of(e),
    }
}

/// `POST /console/logout` — end this session; back to the login page.
pub async fn logout(State(s): State<ConsoleState>, Extension(a): Extension<Authed>) -> Response {
    let now = crate::now_unix();
    if let Err(e) = console::logout(s.app.domain.store.as_ref(), &a.session, now).await {
        return bare_error_of(e);
    }
    s.hub.session_ended(&a.session.token_sha256);
    signed_out()
}

/// `POST /console/logout-all` — end every session of this operator, in every browser
/// ("Log out everywhere"); back to the login page.
pub async fn logout_all(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
) -> Response {
    let now = crate::now_unix();
    match console::logout_everywhere(s.app.domain.store.as_ref(), &a.session, now).await {
        Ok(ended) => {
            for h in &ended {
                s.hub.session_ended(h);
            }
            signed_out()
        }
        Err(e) => bare_error_of(e),
    }
}

/// To the login page, the session cookie cleared.
fn signed_out() -> Response {
    let mut resp = Redirect::to("/console/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
        ))
        .expect("a valid header"),
    );
    resp
}
