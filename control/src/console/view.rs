//! What the templates show: the signed-in operator, rows, tiles, and the error pages.
//! Every template is an askama template under `control/templates/console/`, checked at
//! build time; askama escapes every value (HTML), so a tenant named `<script>` is text.

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tether_api::operators::Role;

use super::assets::{assets, Assets};
use super::Authed;
use crate::domain::operators::RoleExt;
use crate::http::status_of;

/// The signed-in operator as the pages show it.
#[derive(Clone, Debug)]
pub struct Me {
    /// Name.
    pub name: String,
    /// Role.
    pub role: &'static str,
    /// The synchronizer token for forms.
    pub csrf: String,
    /// Admin: the Operators page.
    pub is_admin: bool,
    /// Operator or admin: action buttons.
    pub can_act: bool,
}

impl Me {
    /// The operator of `a`.
    pub fn of(a: &Authed) -> Me {
        let role = a.session.role();
        Me {
            name: a.session.operator().to_owned(),
            role: role.as_str(),
            csrf: a.csrf.clone(),
            is_admin: role.allows(Role::Admin),
            can_act: role.allows(Role::Operator),
        }
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ`.
pub fn when(unix: i64) -> String {
    crate::domain::rfc3339(unix).replacen('T', " ", 1)
}

/// Unix seconds as a time and how far from `now` (`… (in 3d 4h)` / `(2h 5m ago)`).
pub fn when_rel(unix: i64, now: i64) -> String {
    let d = unix - now;
    let s = d.unsigned_abs();
    let (days, hours, minutes) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    let span = match (days, hours, minutes) {
        (0, 0, 0) => return format!("{} (now)", when(unix)),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    };
    if d >= 0 {
        format!("{} (in {span})", when(unix))
    } else {
        format!("{} ({span} ago)", when(unix))
    }
}

/// Render `t` as an HTML answer with `status`.
pub fn html<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(body) => {
            let mut resp = (status, body).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "console template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "console/bare_error.html")]
struct BareError<'a> {
    assets: &'static Assets,
    title: &'a str,
    code: &'a str,
    message: &'a str,
}

/// An error page without the navigation (no session).
pub fn bare_error(status: StatusCode, title: &str, code: &str, message: &str) -> Response {
    html(
        status,
        &BareError {
            assets: assets(),
            title,
            code,
            message,
        },
    )
}

/// A domain error as a bare error page.
pub fn bare_error_of(e: crate::domain::Error) -> Response {
    bare_error(status_of(e.kind), "Refused", e.code, &e.message)
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    assets: &'static Assets,
    me: &'a Me,
    active: &'static str,
    live: Option<String>,
    title: &'a str,
    code: &'a str,
    message: &'a str,
}

/// A refused or failed console request, as a page with the navigation.
#[derive(Debug)]
pub struct PageError {
    /// The operator, when signed in.
    pub me: Option<Me>,
    /// The domain error.
    pub error: crate::domain::Error,
}

impl PageError {
    /// `e` for `me`.
    pub fn new(me: &Me, error: crate::domain::Error) -> PageError {
        PageError {
            me: Some(me.clone()),
            error,
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = status_of(self.error.kind);
        let title = match status {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::CONFLICT => "Not possible now",
            StatusCode::BAD_REQUEST => "Bad request",
            _ => "Control failed",
        };
        match &self.me {
            Some(me) => html(
                status,
                &ErrorPage {
                    assets: assets(),
                    me,
                    active: "",
                    live: None,
                    title,
                    code: self.error.code,
                    message: &self.error.message,
                },
            ),
            None => bare_error(status, title, self.error.code, &self.error.message),
        }
    }
}

/// A tile of the Fleet header.
#[derive(Clone, Debug)]
pub struct Tile {
    /// What it counts.
    pub label: &'static str,
    /// `data-trust-state`, for the trust states.
    pub trust_state: Option<&'static str>,
    /// `data-tile`, for the others (`disabled`, `connected`, `offline`, `alerts`).
    pub tile: Option<&'static str>,
    /// The count.
    pub count: u64,
    /// The filtered table (or the alerts page).
    pub href: String,
    /// The table is filtered by it now.
    pub current: bool,
}

/// The header tiles, alone (the live `summary` event).
#[derive(Template)]
#[template(path = "console/tiles.html")]
pub struct TilesTemplate {
    /// The tiles.
    pub tiles: Vec<Tile>,
}

/// One appliance row of the Fleet table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Status.
    pub status: &'static str,
    /// Trust state.
    pub trust_state: &'static str,
    /// The broker holding its session.
    pub broker: Option<String>,
    /// Since when.
    pub connected_since: Option<String>,
    /// Its latest heartbeat.
    pub last_heartbeat: Option<String>,
    /// Its current certificate's expiry.
    pub expires: Option<String>,
    /// The agent's version.
    pub agent_version: String,
}

/// One row, alone (the live `row` event), exactly as the table renders it.
#[derive(Template)]
#[template(path = "console/row.html")]
pub struct RowTemplate<'a> {
    /// The row.
    pub row: &'a Row,
    /// With its selection box.
    pub can_act: bool,
}

/// The Trust Alerts table, alone (the live `alerts` event), exactly as the page renders it.
#[derive(Template)]
#[template(path = "console/alerts_table.html")]
pub struct AlertsTemplate<'a> {
    /// The active alerts.
    pub alerts: &'a [super::alerts::Alert],
    /// With Trigger Renewal buttons.
    pub can_act: bool,
    /// The session's synchronizer token for those buttons' forms.
    pub csrf: &'a str,
}

/// An `<option>` of a filter.
#[derive(Clone, Debug)]
pub struct Opt {
    /// Its value.
    pub value: &'static str,
    /// Chosen now.
    pub selected: bool,
}
