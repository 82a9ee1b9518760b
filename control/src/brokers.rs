//! Brokers of the edge cluster: one-time bundles, enrollment, renewal, listing, revocation.
//!
//! - `POST /v1/brokers` (operator+) `{"name": "...", "ttl_secs": 86400}` → a
//!   [`BrokerBundle`] (`tether broker add NAME` writes it to a file; `tether-control broker
//!   add` does the same on the data directory).
//! - `POST /v1/brokers/enroll` (no client certificate, rate limited) with the bundle's
//!   token and a CSR → the broker's certificate (`spiffe://<td>/broker/<name>`, serverAuth
//!   and clientAuth). The token works once.
//! - `POST /v1/brokers/renew` (the broker's current certificate) with a new CSR → a new
//!   certificate; the old one stays accepted for `enroll.renewal_overlap`.
//! - `GET /v1/brokers` (viewer+) → every broker, with its channel if it is up.
//! - `POST /v1/brokers/{name}/revoke` (admin) → refused everywhere from now on; its channel
//!   is closed.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::brokers::{AddBroker, BrokerInfo, BrokerList, BrokerStatus};
use tether_api::operators::Role;
use tether_audit::{self as audit, action, Actor, AuditEvent};
use tether_identity::BrokerName;
use tether_proto::cluster::{
    BrokerBundle, BrokerCredential, BrokerEnrollRequest, BrokerRenewRequest,
};
use tracing::{info, warn};

use crate::api::{json_rejection, ApiError, AppState};
use crate::enroll::{internal, rfc3339};
use crate::operators::authorize;
use crate::server::PeerCertificate;
use crate::store::{BrokerRefusal, Store, StoreError, UnixSeconds};
use crate::token::Token;

/// Default lifetime of a broker bundle.
pub const DEFAULT_BUNDLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime of a broker bundle.
pub const MAX_BUNDLE_TTL: Duration = Duration::from_secs(30 * 86_400);

/// Create broker `name` (or give a pending/revoked one a new bundle), recorded as done by
/// `actor`. `Conflict` when an active broker has the name.
#[allow(clippy::too_many_arguments)]
pub async fn add(
    store: &dyn Store,
    control_url: String,
    ca_pem: String,
    trust_domain: &str,
    name: &str,
    ttl: Duration,
    actor: Actor,
    now: UnixSeconds,
) -> Result<BrokerBundle, StoreError> {
    let token = Token::generate();
    let hash = token.hash();
    let expires_at = now.saturating_add(ttl.as_secs().min(i64::MAX as u64) as i64);
    let event = AuditEvent::success(actor, action::BROKER_ADD, name)
        .with("token_ref", audit::token_ref(&hash))
        .with("expires_at", expires_at);
    store
        .add_broker(name, &hash, expires_at, now, &event)
        .await?;
    Ok(BrokerBundle {
        name: name.to_owned(),
        trust_domain: trust_domain.to_owned(),
        control_url,
        ca_pem,
        token: token.expose().to_owned(),
        expires_at: expires_at.max(0) as u64,
    })
}

/// The broker addresses handed to appliances: `brokers` from the config when set (a load
/// balancer, DNS names); otherwise every active broker's own address, those whose channel
/// is up first.
pub async fn addresses(s: &AppState) -> Vec<String> {
    if !s.config.brokers.is_empty() {
        return s.config.brokers.clone();
    }
    // Runs on every enrollment: only the addresses, no per-session counting.
    let mut out = s.cluster.quic_addrs();
    match s.store.list_brokers().await {
        Ok(all) => {
            for b in all {
                if b.status == BrokerStatus::Active {
                    if let Some(addr) = b.quic_addr {
                        if !out.contains(&addr) {
                            out.push(addr);
                        }
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot list brokers for an enrollment answer"),
    }
    out
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    BrokerName::new(name)
        .map(drop)
        .map_err(|e| bad(e.code(), e.to_string()))
}

/// `POST /v1/brokers` (operator+).
#[utoipa::path(post, path = "/v1/brokers", tag = "brokers", request_body = AddBroker, responses(
        (status = 200, description = "a one-time broker bundle (JSON: name, trust_domain, control_url, ca_pem, token, expires_at)"),
        (status = 400, description = "bad input", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "`conflict`: an active broker has that name", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn create(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<AddBroker>, JsonRejection>,
) -> Result<Json<BrokerBundle>, ApiError> {
    let now = crate::now_unix();
    let op = authorize(
        &s,
        &peer,
        Role::Operator,
        action::BROKER_ADD,
        "brokers",
        now,
    )
    .await?;
    let Json(req) = body.map_err(json_rejection)?;
    check_name(&req.name)?;
    let ttl = req
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_BUNDLE_TTL);
    if ttl.is_zero() || ttl > MAX_BUNDLE_TTL {
        return Err(bad("invalid_ttl", "ttl_secs must be 1 s to 30 days"));
    }
    let bundle = add(
        s.store.as_ref(),
        crate::operators::control_url(&s.config),
        s.ca.root_pem(),
        s.ca.trust_domain(),
        &req.name,
        ttl,
        op.actor(),
        now,
    )
    .await
    .map_err(|e| match e {
        StoreError::Conflict(_) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("an active broker is named {}", req.name),
        ),
        other => internal(other),
    })?;
    info!(by = op.name(), broker = %req.name, "broker bundle created");
    Ok(Json(bundle))
}

/// `GET /v1/brokers` (viewer+).
#[utoipa::path(get, path = "/v1/brokers", tag = "brokers", responses(
        (status = 200, description = "every broker", body = BrokerList),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<BrokerList>, ApiError> {
    let now = crate::now_unix();
    authorize(&s, &peer, Role::Viewer, action::BROKER_LIST, "brokers", now).await?;
    let links = s.cluster.links();
    let brokers = s
        .store
        .list_brokers()
        .await
        .map_err(internal)?
        .into_iter()
        .map(|b| {
            let link = links.iter().find(|l| l.broker == b.name);
            BrokerInfo {
                status: b.status,
                created_at: rfc3339(b.created_at),
                cert_not_after: b.not_after.map(rfc3339),
                quic_addr: link.map(|l| l.quic_addr.clone()).or(b.quic_addr),
                last_seen: if link.is_some() {
                    Some(rfc3339(now))
                } else {
                    b.last_seen.map(rfc3339)
                },
                connected: link.is_some(),
                allowlist_version: link.map(|l| l.allowlist_version),
                sessions: link.map(|l| l.sessions),
                name: b.name,
            }
        })
        .collect();
    let allowlist_version = s.store.allowlist_version().await.map_err(internal)?;
    Ok(Json(BrokerList {
        brokers,
        allowlist_version: u64::try_from(allowlist_version).unwrap_or(0),
    }))
}

/// `POST /v1/brokers/{name}/revoke` (admin).
#[utoipa::path(post, path = "/v1/brokers/{name}/revoke", tag = "brokers",
    params(("name" = String, Path, description = "Broker name")),
    responses(
        (status = 204, description = "revoked; its channel is closed"),
        (status = 400, description = "bad input", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an admin", body = tether_api::ErrorBody),
        (status = 404, description = "no such broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
    ),
    security(("operator_certificate" = []))
)]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&name, audit::MAX_TARGET_LEN);
    let op = authorize(&s, &peer, Role::Admin, action::BROKER_REVOKE, target, now).await?;
    check_name(&name)?;
    let event = AuditEvent::success(op.actor(), action::BROKER_REVOKE, target);
    match s.store.revoke_broker(&name, now, &event).await {
        Ok(()) => {}
        Err(StoreError::NotFound(_)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no broker {name}"),
            ))
        }
        Err(e) => return Err(internal(e)),
    }
    s.cluster.disconnect(&name);
    info!(by = op.name(), broker = %name, "broker revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Sign a broker leaf off the async threads (a KMS key signs over the network).
async fn issue(s: &AppState, name: &str, csr_pem: &str) -> Result<crate::ca::Issued, ApiError> {
    let ca = s.ca.clone();
    let (name, csr) = (name.to_owned(), csr_pem.to_owned());
    tokio::task::spawn_blocking(move || {
        ca.issue_broker(&name, &csr, &[], &[], time::OffsetDateTime::now_utc())
    })
    .await
    .map_err(internal)?
    .map_err(|e| match e {
        crate::ca::CaError::Csr(c) => bad(c.code(), c.to_string()),
        other => internal(other),
    })
}

fn credential(name: &str, issued: &crate::ca::Issued, s: &AppState) -> BrokerCredential {
    BrokerCredential {
        name: name.to_owned(),
        chain_pem: issued.chain_pem.clone(),
        ca_pem: s.ca.root_pem(),
        not_after: issued.not_after.max(0) as u64,
    }
}

async fn refused(s: &AppState, event: AuditEvent, e: ApiError, now: UnixSeconds) -> ApiError {
    warn!(action = %event.action, target = %event.target, code = e.code, "broker request refused");
    crate::appliances::refuse(s, event, e, now).await
}

/// `POST /v1/brokers/enroll` (no client certificate; the bundle's token).
#[utoipa::path(post, path = "/v1/brokers/enroll", tag = "brokers", request_body(content_type = "application/json", description = "`{name, token, csr_pem}`"), responses(
        (status = 200, description = "the broker's certificate (JSON: name, chain_pem, ca_pem, not_after)"),
        (status = 400, description = "bad input or CSR", body = tether_api::ErrorBody),
        (status = 403, description = "`token_unknown`, `token_expired` or `token_used`", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
        (status = 429, description = "`rate_limited`", body = tether_api::ErrorBody),
    ),
)]
pub async fn enroll(
    State(s): State<AppState>,
    body: Result<Json<BrokerEnrollRequest>, JsonRejection>,
) -> Result<Json<BrokerCredential>, ApiError> {
    let now = crate::now_unix();
    let Json(req) = body.map_err(json_rejection)?;
    let target = audit::clip(&req.name, audit::MAX_TARGET_LEN);
    let event = AuditEvent::success(Actor::broker(target), action::BROKER_ENROLL, target);
    if let Err(e) = check_name(&req.name) {
        return Err(refused(&s, event, e, now).await);
    }
    let issued = match issue(&s, &req.name, &req.csr_pem).await {
        Ok(i) => i,
        Err(e) => return Err(refused(&s, event, e, now).await),
    };
    let hash = Token::from_secret(&req.token).hash();
    let event = event
        .with("token_ref", audit::token_ref(&hash))
        .with("fingerprint", issued.fingerprint_hex.as_str());
    match s
        .store
        .enroll_broker(
            &req.name,
            &hash,
            &issued.fingerprint_hex,
            issued.not_after,
            now,
            &event,
        )
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            let (code, msg) = match why {
                BrokerRefusal::Unknown => ("token_unknown", "no such broker bundle"),
                BrokerRefusal::Expired => ("token_expired", "the broker bundle expired"),
                BrokerRefusal::AlreadyUsed => ("token_used", "the broker bundle was already used"),
            };
            let e = ApiError::new(StatusCode::FORBIDDEN, code, msg);
            return Err(refused(&s, event, e, now).await);
        }
        Err(e) => return Err(refused(&s, event, internal(e), now).await),
    }
    info!(broker = %req.name, fingerprint = %issued.fingerprint_hex, "broker enrolled");
    Ok(Json(credential(&req.name, &issued, &s)))
}

/// `POST /v1/brokers/renew` (the broker's current certificate).
#[utoipa::path(post, path = "/v1/brokers/renew", tag = "brokers", request_body(content_type = "application/json", description = "`{csr_pem}`"), responses(
        (status = 200, description = "the broker's new certificate (JSON: name, chain_pem, ca_pem, not_after)"),
        (status = 400, description = "bad input or CSR", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "not the current certificate of an active broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
    ),
    security(("broker_certificate" = []))
)]
pub async fn renew(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<BrokerRenewRequest>, JsonRejection>,
) -> Result<Json<BrokerCredential>, ApiError> {
    let now = crate::now_unix();
    let name = crate::cluster::authenticate_broker(&s, &peer, now).await?;
    let Json(req) = body.map_err(json_rejection)?;
    let event = AuditEvent::success(Actor::broker(name.clone()), action::BROKER_RENEW, &name);
    let issued = match issue(&s, &name, &req.csr_pem).await {
        Ok(i) => i,
        Err(e) => return Err(refused(&s, event, e, now).await),
    };
    let presented = crate::ca::fingerprint_hex(peer.0.as_deref().unwrap_or_default());
    let overlap = s
        .config
        .enroll
        .renewal_overlap
        .as_secs()
        .min(i64::MAX as u64) as i64;
    let event = event.with("fingerprint", issued.fingerprint_hex.as_str());
    match s
        .store
        .renew_broker(
            &name,
            &presented,
            &issued.fingerprint_hex,
            issued.not_after,
            now.saturating_add(overlap),
            now,
            &event,
        )
        .await
    {
        Ok(()) => {}
        Err(StoreError::NotFound(_)) => {
            let e = ApiError::new(
                StatusCode::FORBIDDEN,
                "certificate_not_current",
                "only the broker's current certificate can renew",
            );
            return Err(refused(&s, event, e, now).await);
        }
        Err(e) => return Err(refused(&s, event, internal(e), now).await),
    }
    info!(broker = %name, fingerprint = %issued.fingerprint_hex, "broker renewed its certificate");
    Ok(Json(credential(&name, &issued, &s)))
}
