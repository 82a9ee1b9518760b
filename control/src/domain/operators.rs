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
//! (`spiffe://<td>/operator/<name>`, [`crate::domain::ca::CertificateSettings::operator`])
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
//! list, revoke) need `admin`; appliance changes and tokens ([`crate::domain::appliances`]) need
//! `operator`; `GET /v1/fleet/trust` and appliance reads need `viewer`.
//!
//! The request and answer bodies ([`Role`], [`Bundle`], [`LoginRequest`], …) are declared
//! in [`tether_api::operators`].

use std::time::Duration;

use tether_api::operators::{
    Bundle, InviteRequest, LoginRequest, LoginResponse, Operator, OperatorList, OperatorStatus,
    RevokeResponse, Role, DEFAULT_INVITE_TTL, MAX_INVITE_TTL,
};
use tether_audit::{self as audit, Actor, AuditEvent};
use tracing::{info, warn};

use tether_identity::OperatorName;

use crate::domain::identity::{identify, PeerIdentity};
use crate::domain::token::Token;
use crate::domain::{
    internal, record_refusal, refuse, rfc3339, Context, Error, ErrorKind, Registry,
};
use crate::store::{InviteRefusal, OperatorCertificate, Store, StoreError, UnixSeconds};

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
    /// The console session it came through (its short reference), if any.
    session: Option<String>,
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

    /// The console session's short reference, when the request came through the console.
    pub fn console_session(&self) -> Option<&str> {
        self.session.as_deref()
    }
}

/// Who is asking, before [`authorize`] checked it: the client certificate of an API
/// request (rustls verified its chain; `None` when the client sent none), or a console
/// session the console's session check found live ([`ConsoleSession`]).
#[derive(Clone, Copy, Debug)]
pub enum Principal<'a> {
    /// The API over mutual TLS: the leaf certificate's DER.
    Certificate(Option<&'a [u8]>),
    /// The web console: a live session.
    Console(&'a ConsoleSession),
}

/// A live console session as read on this request: the operator it belongs to, with the
/// role and status the store holds *now* (re-read on every request), and the session's
/// short reference (for audit details). Made only by
/// [`crate::domain::console::check_session`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSession {
    pub(crate) operator: String,
    pub(crate) role: Role,
    pub(crate) status: OperatorStatus,
    pub(crate) session_ref: String,
    pub(crate) token_sha256: String,
}

impl ConsoleSession {
    /// The operator's name.
    pub fn operator(&self) -> &str {
        &self.operator
    }
    /// Its role now.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The session's short reference (the first hex digits of its token's hash).
    pub fn session_ref(&self) -> &str {
        &self.session_ref
    }
}

/// Audit details of the console: every console action is recorded under the API's action
/// name with `via: "console"` and the session's short reference.
pub const VIA_CONSOLE: &str = "console";

fn with_console(mut event: AuditEvent, session: Option<&str>) -> AuditEvent {
    if let Some(session) = session {
        event.set("via", VIA_CONSOLE);
        event.set("session", session);
    }
    event
}

/// Who an operation is done by: an operator [`authorize`] verified, or the local admin
/// (the `tether-control` command line on the data directory, the recovery path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An operator with a verified certificate or console session.
    Operator(VerifiedOperator),
    /// The command line on the data directory.
    LocalAdmin,
}

impl Caller {
    /// The caller as an audit actor.
    pub fn actor(&self) -> Actor {
        match self {
            Caller::Operator(op) => op.actor(),
            Caller::LocalAdmin => Actor::system(audit::system::LOCAL_ADMIN),
        }
    }

    /// The success entry of `action` on `target` by this caller (with `via` and
    /// `session` when it came through the console).
    pub fn event(&self, action: &str, target: impl Into<String>) -> AuditEvent {
        self.annotate(AuditEvent::success(self.actor(), action, target))
    }

    /// The refusal entry of `action` on `target` by this caller, with `code`.
    pub fn refused(&self, action: &str, target: impl Into<String>, code: &str) -> AuditEvent {
        self.annotate(AuditEvent::refused(self.actor(), action, target, code))
    }

    fn annotate(&self, event: AuditEvent) -> AuditEvent {
        match self {
            Caller::Operator(op) => with_console(event, op.console_session()),
            Caller::LocalAdmin => event,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Operator(op) => f.write_str(op.name()),
            Caller::LocalAdmin => f.write_str(audit::system::LOCAL_ADMIN),
        }
    }
}

/// Authenticate the operator behind `principal` and check that its role covers `needed`
/// (see the module docs). A denial is recorded as `action` on `target`, refused, with its
/// code; through the console, with `via` and `session` as well.
pub async fn authorize(
    s: &Context,
    principal: Principal<'_>,
    needed: Role,
    action: &str,
    target: &str,
    now: UnixSeconds,
) -> Result<VerifiedOperator, Error> {
    match principal {
        Principal::Certificate(der) => {
            authorize_certificate(s, der, needed, action, target, now).await
        }
        Principal::Console(session) => {
            let result = authorize_session(session, needed);
            if let Err((e, role)) = &result {
                warn!(code = e.code, operator = %session.operator, action, "console action refused");
                let mut event = with_console(
                    AuditEvent::refused(
                        Actor::operator(session.operator.clone()),
                        action,
                        target,
                        e.code,
                    )
                    .with_outcome(e.outcome()),
                    Some(&session.session_ref),
                );
                if let Some(role) = role {
                    event.set("role", role.as_str());
                    event.set("needed", needed.as_str());
                }
                record_refusal(s.store.as_ref(), &event, now).await;
            }
            result.map_err(|(e, _)| e)
        }
    }
}

fn authorize_session(
    session: &ConsoleSession,
    needed: Role,
) -> Result<VerifiedOperator, (Error, Option<Role>)> {
    let name = &session.operator;
    if session.status != OperatorStatus::Active {
        return Err((
            Error::new(
                ErrorKind::Forbidden,
                "operator_unknown",
                format!("operator {name} is revoked"),
            ),
            None,
        ));
    }
    check_role(name, session.role, needed)?;
    Ok(VerifiedOperator {
        name: name.clone(),
        role: session.role,
        session: Some(session.session_ref.clone()),
    })
}

fn check_role(name: &str, role: Role, needed: Role) -> Result<(), (Error, Option<Role>)> {
    if role.allows(needed) {
        return Ok(());
    }
    Err((
        Error::new(
            ErrorKind::Forbidden,
            "role_forbidden",
            format!(
                "operator {name} has role {}; this route needs {}",
                role.as_str(),
                needed.as_str()
            ),
        ),
        Some(role),
    ))
}

async fn authorize_certificate(
    s: &Context,
    der: Option<&[u8]>,
    needed: Role,
    action: &str,
    target: &str,
    now: UnixSeconds,
) -> Result<VerifiedOperator, Error> {
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
            AuditEvent::refused(actor, action, target, e.code).with_outcome(e.outcome());
        if let Some(der) = der {
            event.set(
                "presented_fingerprint",
                crate::domain::ca::fingerprint_hex(der),
            );
        }
        if let Some(role) = role {
            event.set("role", role.as_str());
            event.set("needed", needed.as_str());
        }
        record_refusal(s.store.as_ref(), &event, now).await;
    }
    result.map_err(|(e, _)| e)
}

async fn authorize_checked(
    s: &Context,
    der: Option<&[u8]>,
    identity: Option<&Result<PeerIdentity, crate::domain::identity::IdentityError>>,
    needed: Role,
    now: UnixSeconds,
) -> Result<VerifiedOperator, (Error, Option<Role>)> {
    let refuse = |code, message: String| (Error::new(ErrorKind::Forbidden, code, message), None);
    let (Some(der), Some(identity)) = (der, identity) else {
        return Err((
            Error::new(
                ErrorKind::Unauthenticated,
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
        .operator_by_fingerprint(&crate::domain::ca::fingerprint_hex(der))
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
    check_role(name, cred.role, needed)?;
    Ok(VerifiedOperator {
        name: cred.name,
        role: cred.role,
        session: None,
    })
}

/// Redeem an invite: check it, check the CSR, issue an operator certificate and record
/// the operator (see the module docs). Every refusal is recorded in the audit log.
pub async fn login(
    s: &Context,
    req: &LoginRequest,
    now: UnixSeconds,
) -> Result<LoginResponse, Error> {
    let hash = Token::from_secret(&req.token).hash();
    let mut who: Option<String> = None;
    let result = login_checked(s, req, &hash, now, &mut who).await;
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
            .with_outcome(e.outcome())
            .with("token_ref", audit::token_ref(&hash));
        record_refusal(s.store.as_ref(), &event, now).await;
    }
    result
}

async fn login_checked(
    s: &Context,
    req: &LoginRequest,
    hash: &str,
    now: UnixSeconds,
    who: &mut Option<String>,
) -> Result<LoginResponse, Error> {
    let refused = |r: InviteRefusal| Error::new(ErrorKind::Forbidden, r.code(), r.message());
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
        .map_err(|e| Error::new(ErrorKind::BadRequest, e.code(), e.to_string()))?;
    let ca = s.ca.clone();
    let csr = req.csr_pem.clone();
    let name = invite.name.clone();
    let issued = tokio::task::spawn_blocking(move || {
        ca.issue_operator(&name, &csr, time::OffsetDateTime::now_utc())
    })
    .await
    .map_err(internal)?
    .map_err(|e| match e {
        crate::domain::ca::CaError::Csr(c) => {
            Error::new(ErrorKind::BadRequest, c.code(), c.to_string())
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

/// Make a new bundle for `req.name` with `req.role`, carrying `ca_pem` (the caller is an
/// admin, see [`authorize`]).
pub async fn invite(
    s: &Registry,
    by: &Caller,
    ca_pem: String,
    req: &InviteRequest,
    now: UnixSeconds,
) -> Result<Bundle, Error> {
    if let Err(e) = OperatorName::new(&req.name) {
        return Err(Error::new(ErrorKind::BadRequest, e.code(), e.to_string()));
    }
    let ttl = req
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_INVITE_TTL);
    if ttl.is_zero() || ttl > MAX_INVITE_TTL {
        return Err(Error::new(
            ErrorKind::BadRequest,
            "invalid_ttl",
            format!("ttl_secs must be 1..={}", MAX_INVITE_TTL.as_secs()),
        ));
    }
    let bundle = create_invite(
        s.store.as_ref(),
        s.settings.control_url.clone(),
        ca_pem,
        &req.name,
        req.role,
        ttl,
        by.actor(),
        now,
    )
    .await
    .map_err(internal)?;
    info!(by = %by, operator = %req.name, role = req.role.as_str(), "operator invite created");
    Ok(bundle)
}

/// Every operator.
pub async fn list(s: &Registry) -> Result<OperatorList, Error> {
    let operators = s.store.list_operators().await.map_err(internal)?;
    Ok(OperatorList { operators })
}

/// Revoke operator `name` (the caller is an admin): its certificates stop being honoured and
/// its pending invites are cancelled. The last active admin cannot be revoked.
pub async fn revoke(
    s: &Registry,
    by: &Caller,
    name: &str,
    now: UnixSeconds,
) -> Result<RevokeResponse, Error> {
    if let Err(e) = OperatorName::new(name) {
        return Err(Error::new(ErrorKind::BadRequest, e.code(), e.to_string()));
    }
    let event = by.event(action::REVOKE, name);
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
        let e = Error::new(
            ErrorKind::Conflict,
            "last_admin",
            format!("{name} is the last active admin; invite another admin first"),
        );
        return Err(refuse(s.store.as_ref(), event, e, now).await);
    }
    match s.store.revoke_operator(name, now, &event).await {
        Ok(revoked) => {
            info!(by = %by, operator = %name, ?revoked, "operator revoked");
            Ok(RevokeResponse {
                name: name.to_owned(),
                revoked,
            })
        }
        Err(StoreError::NotFound(_)) => {
            let e = Error::new(
                ErrorKind::NotFound,
                "not_found",
                format!("no operator or pending invite named {name}"),
            );
            Err(refuse(s.store.as_ref(), event, e, now).await)
        }
        Err(e) => Err(internal(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Invite;

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
