//! `POST /v1/console/login-links` (any role): a single-use sign-in link for the web
//! console, for the operator whose certificate calls (`tether console`). See
//! [`crate::domain::console`].

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::console::LoginLink;
use tether_api::operators::Role;

use crate::domain::console::{action, create_link};
use crate::domain::operators::{authorize, Principal};
use crate::domain::rfc3339;
use crate::http::server::PeerCertificate;
use crate::http::{ApiError, AppState};

/// `POST /v1/console/login-links` (viewer+).
#[utoipa::path(
    post,
    path = "/v1/console/login-links",
    tag = "console",
    responses(
        (status = 200, description = "a single-use sign-in link, good for about a minute; the secret is in its fragment", body = LoginLink),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "the console is not enabled (`[console] listen`)", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn login_link(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<LoginLink>, ApiError> {
    let now = crate::now_unix();
    let op = authorize(
        &s.domain,
        Principal::Certificate(peer.der()),
        Role::Viewer,
        action::LINK,
        "",
        now,
    )
    .await?;
    let Some(origin) = s.console_origin.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "console_disabled",
            "the web console is not enabled on this control ([console] listen)",
        ));
    };
    let link = create_link(s.domain.store.as_ref(), &op, now).await?;
    Ok(Json(LoginLink {
        url: format!(
            "{origin}/console/login/{}#{}",
            link.id,
            link.secret.expose()
        ),
        expires_at: rfc3339(link.expires_at),
    }))
}
