//! The forms that change something: Trigger renewal, Disable, Enable, Revoke (typed id
//! and a reason), Create enrollment token, and the Fleet's bulk renew / disable. Each
//! authorizes as the API route does (operator+) and calls the same domain function, so
//! the audit entry is the API's, plus `via: "console"` and the session.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use tether_api::appliances::ApplianceStatus;
use tether_api::operators::Role;
use tether_audit::{self as audit, action, AuditEvent};

use super::assets::{assets, Assets};
use super::pages::allow;
use super::view::{html, Me, PageError};
use super::{Authed, ConsoleState};
use crate::domain::operators::Caller;
use crate::domain::{appliances, refuse, Error, ErrorKind};

/// Most appliances one bulk action takes.
pub const MAX_BULK: usize = 1_000;
/// Longest revoke reason kept, in bytes.
pub const MAX_REASON: usize = 500;

/// Authorize (operator+) and start a change to `id` as `what`.
async fn begin(
    s: &ConsoleState,
    a: &Authed,
    id: &str,
    what: &str,
    now: i64,
) -> Result<(Me, Caller, AuditEvent), PageError> {
    let target = audit::clip(id, audit::MAX_TARGET_LEN);
    let (me, by) = allow(s, a, Role::Operator, what, target, now).await?;
    let event = appliances::begin_change(&s.app.domain.registry(), &by, id, what, now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    Ok((me, by, event))
}

fn back_to(id: &str, tab: &str) -> Response {
    let q = serde_urlencoded::to_string([("tab", tab)]).unwrap_or_default();
    Redirect::to(&format!("/console/appliances/{id}?{q}")).into_response()
}

async fn renew_one(s: &ConsoleState, a: &Authed, id: &str, now: i64) -> Result<i64, PageError> {
    let (me, by, event) = begin(s, a, id, action::APPLIANCE_REQUEST_RENEWAL, now).await?;
    let r = appliances::request_renewal(&s.app.domain.registry(), &by, event, id, now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    Ok(r.manual_renewal_generation)
}

async fn status_one(
    s: &ConsoleState,
    a: &Authed,
    id: &str,
    status: ApplianceStatus,
    now: i64,
) -> Result<(), PageError> {
    let what = appliances::status_action(status);
    let (me, by, event) = begin(s, a, id, what, now).await?;
    appliances::change_status(&s.app.domain.registry(), &by, event, id, status, now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    Ok(())
}

/// `POST /console/appliances/{id}/renew` — Trigger renewal.
pub async fn renew(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    renew_one(&s, &a, &id, crate::now_unix()).await?;
    Ok(back_to(&id, "trust"))
}

/// `POST /console/appliances/{id}/disable`.
pub async fn disable(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    status_one(&s, &a, &id, ApplianceStatus::Disabled, crate::now_unix()).await?;
    Ok(back_to(&id, "overview"))
}

/// `POST /console/appliances/{id}/enable`.
pub async fn enable(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    status_one(&s, &a, &id, ApplianceStatus::Active, crate::now_unix()).await?;
    Ok(back_to(&id, "overview"))
}

/// The revoke form.
#[derive(Debug, serde::Deserialize)]
pub struct RevokeForm {
    /// The id as the operator typed it.
    #[serde(default)]
    pub confirm_id: String,
    /// Why (into the audit entry).
    #[serde(default)]
    pub reason: String,
}

/// `POST /console/appliances/{id}/revoke` — refused unless the typed id is the id and a
/// reason is given; the reason goes into the audit entry.
pub async fn revoke(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Path(id): Path<String>,
    Form(form): Form<RevokeForm>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, by, event) = begin(&s, &a, &id, action::APPLIANCE_REVOKE, now).await?;
    let reason = form.reason.trim();
    let event = event.with("reason", audit::clip(reason, MAX_REASON));
    let store = s.app.domain.store.as_ref();
    if form.confirm_id.trim() != id {
        let e = Error::new(
            ErrorKind::BadRequest,
            "confirm_mismatch",
            "the typed id is not this appliance's id; nothing was revoked",
        );
        return Err(PageError::new(
            &me,
            refuse(
                store,
                event.with("typed", audit::clip(&form.confirm_id, 128)),
                e,
                now,
            )
            .await,
        ));
    }
    if reason.is_empty() {
        let e = Error::new(
            ErrorKind::BadRequest,
            "reason_required",
            "give a reason for the audit log; nothing was revoked",
        );
        return Err(PageError::new(&me, refuse(store, event, e, now).await));
    }
    appliances::change_status(
        &s.app.domain.registry(),
        &by,
        event,
        &id,
        ApplianceStatus::Revoked,
        now,
    )
    .await
    .map_err(|e| PageError::new(&me, e))?;
    Ok(back_to(&id, "overview"))
}

#[derive(Template)]
#[template(path = "console/done.html")]
struct DonePage {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    title: String,
    lines: Vec<String>,
    secret: Option<String>,
    back: String,
}

/// `POST /console/appliances/{id}/tokens` — a one-time enrollment token, shown once.
pub async fn token(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let (me, by, event) = begin(&s, &a, &id, action::TOKEN_CREATE, now).await?;
    let t = appliances::create_token(&s.app.domain.registry(), &by, event, &id, None, now)
        .await
        .map_err(|e| PageError::new(&me, e))?;
    Ok(html(
        StatusCode::OK,
        &DonePage {
            assets: assets(),
            me,
            active: "fleet",
            live: None,
            title: format!("Enrollment token for {id}"),
            lines: vec![format!(
                "A one-time enrollment token for {id}, valid until {}.",
                t.expires_at.replacen('T', " ", 1)
            )],
            secret: Some(t.token),
            back: format!("/console/appliances/{id}"),
        },
    ))
}

#[derive(Template)]
#[template(path = "console/bulk_confirm.html")]
struct BulkConfirm {
    assets: &'static Assets,
    me: Me,
    active: &'static str,
    live: Option<String>,
    title: String,
    question: String,
    button: String,
    action: String,
    ids: Vec<String>,
    back: String,
}

/// `POST /console/bulk` — `action` (`renew` / `disable`) on every `ids`: first a
/// confirmation stating the count, then (with `confirm` = the count) the actions.
pub async fn bulk(
    State(s): State<ConsoleState>,
    Extension(a): Extension<Authed>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Result<Response, PageError> {
    let now = crate::now_unix();
    let me = Me::of(&a);
    let field = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut ids: Vec<String> = fields
        .iter()
        .filter(|(k, _)| k == "ids")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    ids.sort();
    ids.dedup();
    let act = field("action");
    let back = match field("back") {
        b if b.starts_with("/console/") => b,
        _ => "/console/".to_owned(),
    };
    let (verb, button) = match act.as_str() {
        "renew" => ("Trigger renewal", "Trigger renewal"),
        "disable" => ("Disable", "Disable"),
        _ => {
            return Err(PageError::new(
                &me,
                Error::new(ErrorKind::BadRequest, "bad_request", "unknown bulk action"),
            ))
        }
    };
    if ids.is_empty() || ids.len() > MAX_BULK {
        return Err(PageError::new(
            &me,
            Error::new(
                ErrorKind::BadRequest,
                "bad_request",
                format!("select 1 to {MAX_BULK} appliances"),
            ),
        ));
    }
    let n = ids.len();
    let noun = if n == 1 { "appliance" } else { "appliances" };
    if field("confirm") != n.to_string() {
        // Check the role before asking (a viewer is refused here, audited).
        let what = if act == "renew" {
            action::APPLIANCE_REQUEST_RENEWAL
        } else {
            action::APPLIANCE_DISABLE
        };
        let (me, _) = allow(&s, &a, Role::Operator, what, "", now).await?;
        return Ok(html(
            StatusCode::OK,
            &BulkConfirm {
                assets: assets(),
                me,
                active: "fleet",
                live: None,
                title: format!("{verb}: {n} {noun}"),
                question: format!("{verb} for {n} {noun}?"),
                button: format!("{button} {n} {noun}"),
                action: act,
                ids,
                back,
            },
        ));
    }
    let mut done = 0;
    let mut failed = Vec::new();
    for id in &ids {
        let r = if act == "renew" {
            renew_one(&s, &a, id, now).await.map(drop)
        } else {
            status_one(&s, &a, id, ApplianceStatus::Disabled, now).await
        };
        match r {
            Ok(()) => done += 1,
            Err(e) => {
                if e.error.kind == ErrorKind::Forbidden {
                    return Err(e);
                }
                failed.push(format!("{id}: {}", e.error.message));
            }
        }
    }
    let mut lines = vec![format!("{verb}: done for {done} of {n} {noun}.")];
    lines.extend(failed);
    Ok(html(
        StatusCode::OK,
        &DonePage {
            assets: assets(),
            me,
            active: "fleet",
            live: None,
            title: format!("{verb}: {n} {noun}"),
            lines,
            secret: None,
            back,
        },
    ))
}
