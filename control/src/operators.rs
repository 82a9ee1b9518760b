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
//! Roles: `admin` ⊇ `operator` ⊇ `viewer` ([`Role::allows`]). Routes: operators (invite,
//! list, revoke) need `admin`; appliance changes and tokens ([`crate::appliances`]) need
//! `operator`; `GET /v1/fleet/trust` and appliance reads need `viewer`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use tether_audit::{self as audit, Actor, AuditEvent};
use tracing::{info, warn};

use tether_identity::OperatorName;

use crate::api::{ApiError, AppState};
use crate::enroll::{internal, outcome_of, record_refusal, rfc3339};
use crate::identity::{identify, PeerIdentity};
use crate::server::PeerCertificate;
use crate::store::{Store, StoreError, UnixSeconds};
use crate::token::Token;

/// Lifetime of an invite when none is given: 24 hours.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest invite lifetime: 30 days.
pub const MAX_INVITE_TTL: Duration = Duration::from_secs(30 * 86_400);
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

/// What an operator may do. `admin` may do everything, `operator` works with appliances,
/// commands and tokens, `viewer` only reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, operators included.
    Admin,
    /// Appliances, commands, tokens.
    Operator,
    /// Read-only.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    /// The name used in the store, the API and bundles.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// The role named `s`, if any.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn rank(self) -> u8 {
        match self {
            Role::Admin => 2,
            Role::Operator => 1,
            Role::Viewer => 0,
        }
    }

    /// Whether this role may call a route that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self.rank() >= needed.rank()
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (admin, operator, viewer)"))
    }
}

/// Status of an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperatorStatus {
    /// May call operator routes with a recorded certificate.
    Active,
    /// Refused everywhere; a new invite for the name re-activates it.
    Revoked,
}

impl OperatorStatus {
    /// The name used in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorStatus::Active => "active",
            OperatorStatus::Revoked => "revoked",
        }
    }

    /// The status named `s`, if any.
    pub fn parse(s: &str) -> Option<OperatorStatus> {
        match s {
            "active" => Some(OperatorStatus::Active),
            "revoked" => Some(OperatorStatus::Revoked),
            _ => None,
        }
    }
}

/// An operator, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operator {
    /// Name (`[A-Za-z0-9._-]{1,128}`).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Status.
    pub status: OperatorStatus,
    /// When it first logged in, Unix seconds.
    pub created_at: UnixSeconds,
    /// Recorded (honoured) certificates.
    pub certificates: i64,
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

/// What [`Store::revoke_operator`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revoked {
    /// Certificates no longer honoured.
    pub certificates_removed: u64,
    /// Unredeemed invites cancelled.
    pub invites_cancelled: u64,
}

/// A one-time enrollment bundle: everything `tether login --bundle FILE` needs. `Debug`
/// redacts the token.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bundle {
    /// Control's HTTPS URL.
    pub control_url: String,
    /// The root CA, PEM (pinned by the CLI).
    pub ca_pem: String,
    /// The one-time token.
    pub token: String,
    /// The operator name.
    pub name: String,
    /// The role.
    pub role: Role,
    /// When the token expires, RFC 3339.
    pub expires_at: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            control_url,
            ca_pem: _,
            token: _,
            name,
            role,
            expires_at,
        } = self;
        f.debug_struct("Bundle")
            .field("control_url", control_url)
            .field("token", &"<redacted>")
            .field("name", name)
            .field("role", role)
            .field("expires_at", expires_at)
            .finish_non_exhaustive()
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

/// Body of `POST /v1/operators/login`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The bundle's one-time token.
    pub token: String,
    /// PKCS#10 CSR, PEM (key generated by the operator).
    pub csr_pem: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginRequest(<redacted>)")
    }
}

/// Answer to a login.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoginResponse {
    /// Leaf then intermediate, PEM.
    pub certificate_pem: String,
    /// The root CA, PEM.
    pub ca_pem: String,
    /// Operator name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Certificate `notAfter`, RFC 3339.
    pub expires_at: String,
}

/// `POST /v1/operators/login`.
#[utoipa::path(
    post,
    path = "/v1/operators/login",
    tag = "operators",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "an operator certificate", body = LoginResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = crate::api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = crate::api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = crate::api::ErrorBody),
        (status = 409, description = "conflict with the current state", body = crate::api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = crate::api::ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this client address (`http.public_rate_per_sec`); `Retry-After` says after how many seconds to retry", body = crate::api::ErrorBody)
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

/// Body of `POST /v1/operators/invites`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// Operator name.
    pub name: String,
    /// Role to grant.
    pub role: Role,
    /// Lifetime in seconds [default: [`DEFAULT_INVITE_TTL`]; at most [`MAX_INVITE_TTL`]].
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/operators/invites` (admin): a new bundle.
#[utoipa::path(
    post,
    path = "/v1/operators/invites",
    tag = "operators",
    request_body = InviteRequest,
    responses(
        (status = 200, description = "a one-time enrollment bundle", body = Bundle),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = crate::api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = crate::api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = crate::api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = crate::api::ErrorBody),
        (status = 413, description = "request body larger than 64 KiB", body = crate::api::ErrorBody)
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

/// Answer to `GET /v1/operators`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperatorList {
    /// Every operator, by name.
    pub operators: Vec<Operator>,
}

/// `GET /v1/operators` (admin).
#[utoipa::path(
    get,
    path = "/v1/operators",
    tag = "operators",
    responses(
        (status = 200, description = "every operator", body = OperatorList),
        (status = 401, description = "no client certificate, or one control did not issue", body = crate::api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = crate::api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = crate::api::ErrorBody)
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

/// Answer to `POST /v1/operators/{name}/revoke`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevokeResponse {
    /// The operator.
    pub name: String,
    /// What changed.
    #[serde(flatten)]
    pub revoked: Revoked,
}

/// `POST /v1/operators/{name}/revoke` (admin).
#[utoipa::path(
    post,
    path = "/v1/operators/{name}/revoke",
    tag = "operators",
    params(("name" = String, Path, description = "Operator name: 1-128 of `[A-Za-z0-9._-]`")),
    responses(
        (status = 200, description = "revoked", body = RevokeResponse),
        (status = 400, description = "bad input (malformed JSON, bad field, bad query)", body = crate::api::ErrorBody),
        (status = 401, description = "no client certificate, or one control did not issue", body = crate::api::ErrorBody),
        (status = 403, description = "refused: not an operator certificate, unknown or revoked operator, expired certificate, or role too low", body = crate::api::ErrorBody),
        (status = 404, description = "no such appliance or operator", body = crate::api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = crate::api::ErrorBody),
        (status = 409, description = "`last_admin`: the last active admin cannot be revoked", body = crate::api::ErrorBody)
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

    #[test]
    fn bundle_debug_redacts_the_token() {
        let b = Bundle {
            control_url: "https://x:1".into(),
            ca_pem: String::new(),
            token: "tt_secret".into(),
            name: "a".into(),
            role: Role::Admin,
            expires_at: String::new(),
        };
        assert!(!format!("{b:?}").contains("tt_secret"));
    }
}
