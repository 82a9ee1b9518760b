//! `GET /v1/audit?after=SEQ&limit=N` (mTLS, an operator certificate, role viewer+): a page
//! of the audit log with the signed checkpoints it contains, for `tether audit export`
//! ([`crate::domain::audit::page`]).
//!
//! The answer is `{"entries": [...], "checkpoints": [...]}`: the entries with
//! `seq > after`, oldest first, at most `limit` (default and maximum
//! [`crate::store::sql::DEFAULT_AUDIT_LIMIT`]); the checkpoints with `after < seq <=` the
//! page's last entry. A page with no entry (the end of the log) carries every checkpoint
//! with `seq > after`: there should be none, and any there is vouches for an entry the
//! log no longer has (its tail was cut), which a client writing the export format
//! ([`tether_audit::export`]) puts at the end for the verifier to find. Checkpoints are
//! read before entries, so one signed meanwhile never looks like a cut. The answer's
//! shape is [`tether_audit::page::AuditPage`], which `tether audit export` reads.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::audit::AuditQuery;
use tether_api::operators::Role;
use tether_audit::action;
use tether_audit::page::AuditPage;

use crate::domain;
use crate::http::appliances::operator;
use crate::http::server::PeerCertificate;
use crate::http::{ApiError, AppState};

/// `GET /v1/audit` (viewer+).
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "a page of the audit log and its checkpoints", body = AuditPage),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let now = crate::now_unix();
    operator(&s, &peer, Role::Viewer, action::AUDIT_LIST, "", now).await?;
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    Ok(Json(
        domain::audit::page(s.domain.store.as_ref(), q.after, q.limit).await?,
    ))
}
