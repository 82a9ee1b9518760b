//! Operators: roles, one-time invites (enrollment bundles), login, and the check every
//! operator route runs.
//!
//! # Invites and login
//!
//! An invite is a one-time token for a name and a [`Role`], expiring, stored hashed
//! ([`crate::store::Store::create_invite`]); it travels as a [`Bundle`] (control URL, root
//! CA, token, name, role). `tether-control init` writes the first admin's bundle;
//! `tether-control operator invite` and `POST /v1/operators/invites` (admin) make more.
//! `POST /v1/operators/login` (no client certificate needed) takes the token and a CSR;
//! the invite is checked (unknown, used, cancelled, expired → 403 `invite_*`), the CSR
//! checked (→ 400 `csr_*`, the invite is not burned), an operator certificate
//! (`spiffe://<td>/operator/<name>`, [`crate::config::CertificateSettings::operator`])
//! issued, and then, in one transaction, the invite is redeemed, the operator created (or
//! re-activated with the invite's role) and the certificate's fingerprint recorded.
//!
//! # Authentication and roles
//!
//! [`authorize`] is the only way to a [`VerifiedOperator`], and every operator route takes
//! one. In order: a client certificate (rustls verified the chain) → else 401
//! `client_certificate_required`; it names an operator → else 403 `operator_required`
//! (appliance and broker certificates never pass); its fingerprint is a recorded
//! certificate of an *active* operator → else 403 `operator_unknown` (a revoked operator's
//! fingerprints are dropped: its next call is refused); not past its `not_after` → else
//! 403 `certificate_expired`; the operator's role covers the route → else 403
//! `role_forbidden`. Every denial is one audit entry (the route's action, outcome
//! `refused`, `code`), by the identity the certificate names.
//!
//! Roles: `admin` ⊇ `operator` ⊇ `viewer` ([`RoleExt::allows`]). Routes: operators (invite,
//! list, revoke) need `admin`; appliance changes and tokens ([`crate::appliances`]) need
//! `operator`; `GET /v1/fleet/trust` and appliance reads need `viewer`.
//!
//! The request and answer bodies ([`Role`], [`Bundle`], [`LoginRequest`], …) are declared
//! in [`tether_api::operators`].

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use tether_api::operators::{
    Bundle, InviteRequest, LoginRequest, LoginResponse, Operator, OperatorList, OperatorStatus,
    RevokeResponse, Role, DEFAULT_INVITE_TTL, MAX_INVITE_TTL,
};
use tether_audit::{self as audit, Actor, AuditEvent};
use tracing::{info, warn};

use tether_identity::OperatorName;

use crate::api::{ApiError, AppState};
use crate::enroll::{internal, outcome_of, record_refusal, rfc3339};
use crate::identity::{identify, PeerIdentity};
use crate::server::PeerCertificate;
use crate::store::{Store, StoreError, UnixSeconds};
use crate::token::Token;

/// Lifetime of the first admin's bundle written by `tether-control init`: 7 days.
pub const ADMIN_BUNDLE_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Name of the first admin.
pub const FIRST_ADMIN: &str = "admin";

/// The audit actions of operators and operator routes.
pub mod action {
    /// An invite was created.
    pub const INVITE: &str = "operator.invite";
    /// An operator redeemed an invite and got a certificate (or was refused).
    pub const LOGIN: &str = "operator.login";
    /// An operator was revoked.
    pub const REVOKE: &str = "operator.revoke";
    /// The operator list was read (recorded only when refused).
    pub const LIST: &str = "operator.list";
    /// The fleet trust summary was read (recorded only when refused).
    pub const FLEET_TRUST: &str = "fleet.trust";
}

/// What a role may do: control's rule over [`Role`] (which lives in `tether_api`, names
/// only). Roles nest: `admin` ⊇ `operator` ⊇ `viewer`.
pub trait RoleExt {
    /// Whether this role may call a route that needs `needed`.
    fn allows(self, needed: Role) -> bool;
}

impl RoleExt for Role {
    fn allows(self, needed: Role) -> bool {
        rank(self) >= rank(needed)
    }
}

fn rank(role: Role) -> u8 {
    match role {
        Role::Admin => 2,
        Role::Operator => 1,
        Role::Viewer => 0,
    }
}

/// The operator a recorded certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorCredential {
    /// Operator name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its status.
    pub status: OperatorStatus,
    /// The certificate's `notAfter`, Unix seconds.
    pub not_after: UnixSeconds,
}

/// An operator certificate to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorCertificate {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Operator name.
    pub operator: String,
    /// `notAfter`, Unix seconds.
    pub not_after: UnixSeconds,
}

/// A stored invite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The operator name it is for.
    pub name: String,
    /// The role it grants.
    pub role: Role,
    /// Valid while `now < expires_at`.
    pub expires_at: UnixSeconds,
    /// When it was redeemed.
    pub used_at: Option<UnixSeconds>,
    /// Cancelled by revoking its operator.
    pub cancelled: bool,
}

impl Invite {
    /// Why it cannot be redeemed at `now`, if it cannot.
    pub fn refusal(&self, now: UnixSeconds) -> Option<InviteRefusal> {
        if self.used_at.is_some() {
            Some(InviteRefusal::Used)
        } else if self.cancelled {
            Some(InviteRefusal::Cancelled)
        } else if now >= self.expires_at {
            Some(InviteRefusal::Expired)
        } else {
            None
        }
    }
}

/// Why an invite could not be redeemed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InviteRefusal {
    /// No invite with that token.
    Unknown,
    /// Already redeemed.
    Used,
    /// Expired.
    Expired,
    /// Cancelled (its operator was revoked).
    Cancelled,
}

impl InviteRefusal {
    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            InviteRefusal::Unknown => "invite_unknown",
            InviteRefusal::Used => "invite_used",
            InviteRefusal::Expired => "invite_expired",
            InviteRefusal::Cancelled => "invite_cancelled",
        }
    }

    fn message(self) -> &'static str {
        match self {
            InviteRefusal::Unknown => "no such invite",
            InviteRefusal::Used => "this bundle was already used; ask an admin for a new one",
            InviteRefusal::Expired => "this bundle expired; ask an admin for a new one",
            InviteRefusal::Cancelled => {
                "this bundle was cancelled (its operator was revoked); ask an admin for a new one"
            }
        }
    }
}

/// Control's URL as configured: `https://<first DNS name, else first IP>:<listen port>`.
pub fn control_url(cfg: &crate::config::ControlConfig) -> String {
    let port = cfg.listen.port();
    match (cfg.dns_names.first(), cfg.ips.first()) {
        (Some(dns), _) => format!("https://{dns}:{port}"),
        (None, Some(std::net::IpAddr::V6(ip))) => format!("https://[{ip}]:{port}"),
        (None, Some(ip)) => format!("https://{ip}:{port}"),
        (None, None) => format!("https://{}", cfg.listen),
    }
}

/// Create an invite for `name` with `role`, valid for `ttl`, recorded as done by
/// `actor`; returns the bundle (the token is in it, and nowhere else).
#[allow(clippy::too_many_arguments)]
pub async fn create_invite(
    store: &dyn Store,
    control_url: String,
    ca_pem: String,
    name: &str,
    role: Role,
    ttl: Duration,
    actor: Actor,
    now: UnixSeconds,
) -> Result<Bundle, StoreError> {
    let token = Token::generate();
    let hash = token.hash();
    let expires_at = now.saturating_add(ttl.as_secs().min(i64::MAX as u64) as i64);
    let event = AuditEvent::success(actor, action::INVITE, name)
        .with("role", role.as_str())
        .with("token_ref", audit::token_ref(&hash))
        .with("expires_at", expires_at);
    store
        .create_invite(&hash, name, role, expires_at, now, &event)
        .await?;
    Ok(Bundle {
        control_url,
        ca_pem,
        token: token.expose().to_owned(),
        name: name.to_owned(),
        role,
        expires_at: rfc3339(expires_at),
    })
}

/// Proof that a request comes from an active operator whose role covers the route. Only
/// [`authorize`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedOperator {
    name: String,
    role: Role,
}

impl VerifiedOperator {
    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The operator as an audit actor.
    pub fn actor(&self) -> Actor {
        Actor::operator(self.name.clone())
    }
}

/// Authenticate the operator behind `peer` and check that its role covers `needed` (see
/// the module docs). A denial is recorded as `action` on `target`, refused, with its code.
pub async fn authorize(
    s: &AppState,
    peer: &PeerCertificate,
    needed: Role,
    action: &str,
    target: &str,
    now: UnixSeconds,
) -> Result<VerifiedOperator, ApiError> {
    let der = peer.0.as_deref();
    let identity = der.map(|d| identify(d, s.ca.trust_domain()));
    let result = authorize_checked(s, der, identity.as_ref(), needed, now).await;
    if let Err((e, role)) = &result {
        let actor = match &identity {
            Some(Ok(PeerIdentity::Operator(n))) => Actor::operator(n.clone()),
            Some(Ok(PeerIdentity::Appliance(id))) => Actor::appliance(id.clone()),
            Some(Ok(PeerIdentity::Broker(n))) => Actor::broker(n.clone()),
            _ => Actor::system(audit::system::UNKNOWN),
        };
        warn!(code = e.code, actor = %actor, action, "operator route refused");
        let mut event =
            AuditEvent::refused(actor, action, target, e.code).with_outcome(outcome_of(e));
        if let Some(der) = der {
            event.set("presented_fingerprint", crate::ca::fingerprint_hex(der));
        }
        if let Some(role) = role {
            event.set("role", role.as_str());
            event.set("needed", needed.as_str());
        }
        record_refusal(s, &event, now).await;
    }
    result.map_err(|(e, _)| e)
}

async fn authorize_checked(
    s: &AppState,
    der: Option<&[u8]>,
    identity: Option<&Result<PeerIdentity, crate::identity::IdentityError>>,
    needed: Role,
    now: UnixSeconds,
) -> Result<VerifiedOperator, (ApiError, Option<Role>)> {
    let refuse =
        |code, message: String| (ApiError::new(StatusCode::FORBIDDEN, code, message), None);
    let (Some(der), Some(identity)) = (der, identity) else {
        return Err((
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_required",
                "this route needs an operator certificate (mutual TLS); run `tether login`",
            ),
            None,
        ));
    };
    let name = match identity {
        Ok(PeerIdentity::Operator(name)) => name,
        _ => {
            return Err(refuse(
                "operator_required",
                "this route is for operators".into(),
            ))
        }
    };
    let cred = s
        .store
        .operator_by_fingerprint(&crate::ca::fingerprint_hex(der))
        .await
        .map_err(|e| (internal(e), None))?;
    let cred = match cred {
        Some(c) if c.name == *name && c.status == OperatorStatus::Active => c,
        _ => {
            return Err(refuse(
                "operator_unknown",
                format!(
                    "this certificate of operator {name} is not honoured (revoked, or never \
                     recorded); log in again with a new bundle"
                ),
            ))
        }
    };
    if now >= cred.not_after {
        return Err(refuse(
            "certificate_expired",
            format!("this certificate of operator {name} has expired; log in again"),
        ));
    }
    if !cred.role.allows(needed) {
        return Err((
            ApiError::new(
                StatusCode::FORBIDDEN,
                "role_forbidden",
                format!(
                    "operator {name} has role {}; this route needs {}",
                    cred.role.as_str(),
                    needed.as_str()
                ),
            ),
            Some(cred.role),
        ));
    }
    Ok(VerifiedOperator {
        name: cred.name,
        role: cred.role,
    })
}

/// `POST /v1/operators/login`.
#[utoipa::path(
    post,
    path = "/v1/operators/login",
    tag = "operators",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "an operator certificate", body = LoginResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this client address (`http.public_rate_per_sec`); `Retry-After` says after how many seconds to retry", body = tether_api::ErrorBody)
    )
)]
pub async fn login(
    State(s): State<AppState>,
    body: Result<Json<LoginRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<LoginResponse>, ApiError> {
    let Json(req) = body.map_err(crate::api::json_rejection)?;
    let now = crate::now_unix();
    let hash = Token::from_secret(&req.token).hash();
    let mut who: Option<String> = None;
    let result = login_checked(&s, &req, &hash, now, &mut who).await;
    if let Err(e) = &result {
        let (actor, target) = match &who {
            Some(n) => (Actor::operator(n.clone()), n.clone()),
            None => (
                Actor::system(audit::system::UNKNOWN),
                audit::system::UNKNOWN.to_owned(),
            ),
        };
        warn!(code = e.code, operator = ?who, "operator login refused");
        let event = AuditEvent::refused(actor, action::LOGIN, target, e.code)
            .with_outcome(outcome_of(e))
            .with("token_ref", audit::token_ref(&hash));
        record_refusal(&s, &event, now).await;
    }
    result.map(Json)
}

async fn login_checked(
    s: &AppState,
    req: &LoginRequest,
    hash: &str,
    now: UnixSeconds,
    who: &mut Option<String>,
) -> Result<LoginResponse, ApiError> {
    let refused = |r: InviteRefusal| ApiError::new(StatusCode::FORBIDDEN, r.code(), r.message());
    let invite = s
        .store
        .find_invite(hash)
        .await
        .map_err(internal)?
        .ok_or(refused(InviteRefusal::Unknown))?;
    *who = Some(invite.name.clone());
    if let Some(r) = invite.refusal(now) {
        return Err(refused(r));
    }
    // A bad CSR does not burn the invite: checked before anything is issued.
    s.ca.check_csr(&req.csr_pem)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    let ca = s.ca.clone();
    let csr = req.csr_pem.clone();
    let name = invite.name.clone();
    let issued = tokio::task::spawn_blocking(move || {
        ca.issue_operator(&name, &csr, time::OffsetDateTime::now_utc())
    })
    .await
    .map_err(internal)?
    .map_err(|e| match e {
        crate::ca::CaError::Csr(c) => {
            ApiError::new(StatusCode::BAD_REQUEST, c.code(), c.to_string())
        }
        other => internal(other),
    })?;
    let cert = OperatorCertificate {
        fingerprint: issued.fingerprint_hex.clone(),
        serial: issued.serial_hex.clone(),
        operator: invite.name.clone(),
        not_after: issued.not_after,
    };
    let event = AuditEvent::success(
        Actor::operator(invite.name.clone()),
        action::LOGIN,
        invite.name.as_str(),
    )
    .with("token_ref", audit::token_ref(hash))
    .with("serial", cert.serial.as_str())
    .with("fingerprint", cert.fingerprint.as_str())
    .with("not_after", cert.not_after);
    let invite = match s
        .store
        .redeem_invite(hash, &cert, now, &event)
        .await
        .map_err(internal)?
    {
        Ok(i) => i,
        Err(r) => return Err(refused(r)),
    };
    info!(operator = %invite.name, role = invite.role.as_str(), serial = %cert.serial, "operator logged in");
    Ok(LoginResponse {
        certificate_pem: issued.chain_pem,
        ca_pem: s.ca.root_pem(),
        name: invite.name,
        role: invite.role,
        expires_at: rfc3339(issued.not_after),
    })
}

/// `POST /v1/operators/invites` (admin): a new bundle.
#[utoipa::path(
    post,
    path = "/v1/operators/invites",
    tag = "operators",
    request_body = InviteRequest,
    responses(
        (status = 200, description = "a one-time enrollment bundle", body = Bundle),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn invite(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    body: Result<Json<InviteRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Bundle>, ApiError> {
    let now = crate::now_unix();
    let op = authorize(&s, &peer, Role::Admin, action::INVITE, "", now).await?;
    let Json(req) = body.map_err(crate::api::json_rejection)?;
    if let Err(e) = OperatorName::new(&req.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            e.code(),
            e.to_string(),
        ));
    }
    let ttl = req
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_INVITE_TTL);
    if ttl.is_zero() || ttl > MAX_INVITE_TTL {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
            format!("ttl_secs must be 1..={}", MAX_INVITE_TTL.as_secs()),
        ));
    }
    let bundle = create_invite(
        s.store.as_ref(),
        control_url(&s.config),
        s.ca.root_pem(),
        &req.name,
        req.role,
        ttl,
        op.actor(),
        now,
    )
    .await
    .map_err(internal)?;
    info!(by = op.name(), operator = %req.name, role = req.role.as_str(), "operator invite created");
    Ok(Json(bundle))
}

/// `GET /v1/operators` (admin).
#[utoipa::path(
    get,
    path = "/v1/operators",
    tag = "operators",
    responses(
        (status = 200, description = "every operator", body = OperatorList),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn list(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
) -> Result<Json<OperatorList>, ApiError> {
    let now = crate::now_unix();
    authorize(&s, &peer, Role::Admin, action::LIST, "", now).await?;
    let operators = s.store.list_operators().await.map_err(internal)?;
    Ok(Json(OperatorList { operators }))
}

/// `POST /v1/operators/{name}/revoke` (admin).
#[utoipa::path(
    post,
    path = "/v1/operators/{name}/revoke",
    tag = "operators",
    params(("name" = String, Path, description = "Operator name: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "revoked", body = RevokeResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = tether_api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = tether_api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = tether_api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 409, description = "`last_admin`: the last active admin cannot be revoked", body = tether_api::ErrorBody)
    ),
    security(("operator_certificate" = []))
)]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let now = crate::now_unix();
    let target = audit::clip(&name, audit::MAX_TARGET_LEN);
    let op = authorize(&s, &peer, Role::Admin, action::REVOKE, target, now).await?;
    if let Err(e) = OperatorName::new(&name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            e.code(),
            e.to_string(),
        ));
    }
    let event = AuditEvent::success(op.actor(), action::REVOKE, name.as_str());
    // Never lock the fleet out: the last active admin cannot be revoked (invite and log
    // in another admin first). A local `tether-control` on the data directory remains
    // the recovery path.
    let operators = s.store.list_operators().await.map_err(internal)?;
    let is_active_admin =
        |o: &Operator| o.role == Role::Admin && o.status == OperatorStatus::Active;
    if operators
        .iter()
        .any(|o| o.name == name && is_active_admin(o))
        && operators.iter().filter(|o| is_active_admin(o)).count() == 1
    {
        let e = ApiError::new(
            StatusCode::CONFLICT,
            "last_admin",
            format!("{name} is the last active admin; invite another admin first"),
        );
        let event = event
            .with_outcome(audit::Outcome::Refused)
            .with("code", e.code);
        record_refusal(&s, &event, now).await;
        return Err(e);
    }
    match s.store.revoke_operator(&name, now, &event).await {
        Ok(revoked) => {
            info!(by = op.name(), operator = %name, ?revoked, "operator revoked");
            Ok(Json(RevokeResponse { name, revoked }))
        }
        Err(StoreError::NotFound(_)) => {
            let e = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no operator or pending invite named {name}"),
            );
            let event = event
                .with_outcome(audit::Outcome::Refused)
                .with("code", e.code);
            record_refusal(&s, &event, now).await;
            Err(e)
        }
        Err(e) => Err(internal(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Viewer));
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Operator.allows(Role::Admin));
        assert!(!Role::Viewer.allows(Role::Operator));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn invite_refusals_in_order() {
        let i = Invite {
            name: "a".into(),
            role: Role::Viewer,
            expires_at: 10,
            used_at: None,
            cancelled: false,
        };
        assert_eq!(i.refusal(9), None);
        assert_eq!(i.refusal(10), Some(InviteRefusal::Expired));
        let used = Invite {
            used_at: Some(5),
            ..i.clone()
        };
        assert_eq!(used.refusal(20), Some(InviteRefusal::Used));
        let cancelled = Invite {
            cancelled: true,
            ..i
        };
        assert_eq!(cancelled.refusal(1), Some(InviteRefusal::Cancelled));
    }
}
