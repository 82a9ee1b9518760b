//! The web console's sign-in: single-use login links and server-side sessions.
//!
//! - `tether console` asks for a link over mutual TLS ([`create_link`], any role): a
//!   random id and a 256-bit secret, only the secret's SHA-256 stored, good once within
//!   [`LINK_TTL`]. The URL carries the secret in its fragment, so it never reaches a
//!   server log or a `Referer`.
//! - The login page shows whose link it is ([`preview_link`], which spends nothing), and
//!   continuing exchanges it ([`exchange_link`]) for a session: a 256-bit cookie secret,
//!   the row keyed by its SHA-256. The link is spent, the operator checked active and the
//!   session created in one transaction.
//! - Every request checks the session ([`check_session`]): it ends after
//!   [`SessionPolicy::idle`] without use and [`SessionPolicy::max`] after sign-in;
//!   `last_seen_at` is written at most once per [`TOUCH_EVERY_SECS`]; the operator's role
//!   and status are read afresh. Revoking an operator deletes its sessions.
//!
//! Audit: `operator.console_link`, `console.login`, `console.login_refused`,
//! `console.logout` ([`action`]).

use std::time::Duration;

use tether_api::operators::{OperatorStatus, Role};
use tether_audit::{self as audit, Actor, AuditEvent};
use tracing::{info, warn};

use crate::domain::operators::{Caller, ConsoleSession, VerifiedOperator, VIA_CONSOLE};
use crate::domain::token::{nonce, sha256_hex};
use crate::domain::{internal, record_refusal, Error, ErrorKind};
use crate::store::{NewConsoleLink, NewConsoleSession, Store, UnixSeconds};

/// How long a login link is good for: 60 s.
pub const LINK_TTL: Duration = Duration::from_secs(60);
/// `last_seen_at` (and the idle expiry) is written at most this often.
pub const TOUCH_EVERY_SECS: i64 = 60;
/// Hex digits of a session's short reference in audit details and on the Account page.
pub const SESSION_REF_LEN: usize = 12;
/// Longest `User-Agent` kept with a session, in bytes.
pub const MAX_USER_AGENT: usize = 200;

/// The audit actions of the console's sign-in.
pub mod action {
    /// A login link was minted (`POST /v1/console/login-links`).
    pub const LINK: &str = "operator.console_link";
    /// A link was exchanged for a session.
    pub const LOGIN: &str = "console.login";
    /// A link was refused (unknown, wrong secret, used, expired, operator revoked).
    pub const LOGIN_REFUSED: &str = "console.login_refused";
    /// A session was ended by its operator.
    pub const LOGOUT: &str = "console.logout";
    /// A state-changing console request failed the Origin / Fetch-Metadata / token check.
    pub const CSRF_REFUSED: &str = "console.csrf_refused";
}

/// How long sessions live (`[console] session_idle`, `session_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Ends after this long without a request.
    pub idle: Duration,
    /// Ends this long after sign-in, whatever happens.
    pub max: Duration,
}

/// A secret in clear (a link's or a session's). `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// 256 random bits, hex.
    pub fn generate() -> Secret {
        Secret(nonce())
    }
    /// A secret a client sent.
    pub fn from_client(s: &str) -> Secret {
        Secret(s.trim().to_owned())
    }
    /// The secret, to hand out once.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// What the store keeps.
    pub fn hash(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }
}

/// A login link as minted: the id (path) and the secret (fragment).
#[derive(Debug)]
pub struct LoginLink {
    /// Its id.
    pub id: String,
    /// Its secret.
    pub secret: Secret,
    /// Good while `now < expires_at`.
    pub expires_at: UnixSeconds,
}

/// Mint a login link for `by` (an operator authorized with any role).
pub async fn create_link(
    store: &dyn Store,
    by: &VerifiedOperator,
    now: UnixSeconds,
) -> Result<LoginLink, Error> {
    let id = nonce()[..32].to_owned();
    let secret = Secret::generate();
    let expires_at = now + LINK_TTL.as_secs() as i64;
    let link = NewConsoleLink {
        id: id.clone(),
        secret_sha256: secret.hash(),
        operator: by.name().to_owned(),
        expires_at,
    };
    let event = Caller::Operator(by.clone())
        .event(action::LINK, by.name())
        .with("link", id.as_str())
        .with("expires_at", expires_at);
    store
        .create_console_link(&link, now, &event)
        .await
        .map_err(internal)?;
    info!(operator = %by.name(), link = %id, "console login link minted");
    Ok(LoginLink {
        id,
        secret,
        expires_at,
    })
}

/// Whose a link is, as its login page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPreview {
    /// The operator it signs in.
    pub operator: String,
    /// Its role now.
    pub role: Role,
}

fn link_refusal(code: &'static str, message: &str) -> Error {
    Error::new(ErrorKind::Forbidden, code, message)
}

fn link_used() -> Error {
    link_refusal(
        "link_used",
        "this login link was already used; run `tether console` again",
    )
}

async fn check_link(
    store: &dyn Store,
    id: &str,
    secret: &Secret,
    now: UnixSeconds,
) -> Result<LinkPreview, (Error, Option<String>)> {
    let unknown = || {
        link_refusal(
            "link_unknown",
            "this login link is not valid; run `tether console` again",
        )
    };
    let link = store
        .find_console_link(id)
        .await
        .map_err(|e| (internal(e), None))?
        .ok_or_else(|| (unknown(), None))?;
    if !constant_time_eq(link.secret_sha256.as_bytes(), secret.hash().as_bytes()) {
        return Err((unknown(), None));
    }
    let who = Some(link.operator.clone());
    if link.used {
        return Err((link_used(), who));
    }
    if now >= link.expires_at {
        return Err((
            link_refusal(
                "link_expired",
                "this login link expired (links last a minute); run `tether console` again",
            ),
            who,
        ));
    }
    if link.status != OperatorStatus::Active {
        return Err((
            link_refusal("operator_unknown", "this operator is revoked"),
            who,
        ));
    }
    Ok(LinkPreview {
        operator: link.operator,
        role: link.role,
    })
}

/// Whose link `id` is, if `secret` is its secret and it is still good; spends nothing
/// and records nothing (the exchange records).
pub async fn preview_link(
    store: &dyn Store,
    id: &str,
    secret: &Secret,
    now: UnixSeconds,
) -> Result<LinkPreview, Error> {
    check_link(store, id, secret, now).await.map_err(|(e, _)| e)
}

/// Where a sign-in came from, kept with the session.
#[derive(Clone, Debug, Default)]
pub struct Client {
    /// `User-Agent` (clipped to [`MAX_USER_AGENT`]).
    pub user_agent: String,
    /// The client's address.
    pub ip: String,
}

/// Exchange link `id` + `secret` for a new session: the cookie's secret and the session.
/// Every refusal is recorded as `console.login_refused`.
pub async fn exchange_link(
    store: &dyn Store,
    id: &str,
    secret: &Secret,
    policy: SessionPolicy,
    client: &Client,
    now: UnixSeconds,
) -> Result<(Secret, ConsoleSession), Error> {
    let result = exchange_checked(store, id, secret, policy, client, now).await;
    if let Err((e, who)) = &result {
        let (actor, target) = match who {
            Some(n) => (Actor::operator(n.clone()), n.clone()),
            None => (
                Actor::system(audit::system::UNKNOWN),
                audit::system::UNKNOWN.to_owned(),
            ),
        };
        warn!(code = e.code, operator = ?who, "console login refused");
        let event = AuditEvent::refused(actor, action::LOGIN_REFUSED, target, e.code)
            .with_outcome(e.outcome())
            .with("via", VIA_CONSOLE)
            .with("link", audit::clip(id, 64))
            .with("ip", client.ip.as_str());
        record_refusal(store, &event, now).await;
    }
    result.map_err(|(e, _)| e)
}

async fn exchange_checked(
    store: &dyn Store,
    id: &str,
    secret: &Secret,
    policy: SessionPolicy,
    client: &Client,
    now: UnixSeconds,
) -> Result<(Secret, ConsoleSession), (Error, Option<String>)> {
    let preview = check_link(store, id, secret, now).await?;
    let token = Secret::generate();
    let token_sha256 = token.hash();
    let session_ref = token_sha256[..SESSION_REF_LEN].to_owned();
    let abs_expires_at = now.saturating_add(policy.max.as_secs() as i64);
    let session = NewConsoleSession {
        token_sha256: token_sha256.clone(),
        operator: preview.operator.clone(),
        idle_expires_at: now
            .saturating_add(policy.idle.as_secs() as i64)
            .min(abs_expires_at),
        abs_expires_at,
        user_agent: audit::clip(&client.user_agent, MAX_USER_AGENT).to_owned(),
        ip: client.ip.clone(),
    };
    let event = AuditEvent::success(
        Actor::operator(preview.operator.clone()),
        action::LOGIN,
        preview.operator.as_str(),
    )
    .with("via", VIA_CONSOLE)
    .with("session", session_ref.as_str())
    .with("link", id)
    .with("ip", client.ip.as_str());
    let who = Some(preview.operator.clone());
    let spent = store
        .redeem_console_link(id, &session, now, &event)
        .await
        .map_err(|e| (internal(e), who.clone()))?;
    if !spent {
        // Another request spent it between the check and now (or it just expired).
        return Err((link_used(), who));
    }
    info!(operator = %preview.operator, session = %session_ref, "console session started");
    Ok((
        token,
        ConsoleSession {
            operator: preview.operator,
            role: preview.role,
            status: OperatorStatus::Active,
            session_ref,
            token_sha256,
        },
    ))
}

/// The live session the cookie secret `token` names at `now`, or `None` (unknown,
/// logged out, idle or past its maximum, operator revoked). An expired row is deleted;
/// a used one has its idle expiry moved on, at most once per [`TOUCH_EVERY_SECS`].
pub async fn check_session(
    store: &dyn Store,
    token: &Secret,
    policy: SessionPolicy,
    now: UnixSeconds,
) -> Result<Option<ConsoleSession>, Error> {
    let hash = token.hash();
    let Some(rec) = store.console_session(&hash).await.map_err(internal)? else {
        return Ok(None);
    };
    if now >= rec.idle_expires_at || now >= rec.abs_expires_at {
        store.drop_console_session(&hash).await.map_err(internal)?;
        return Ok(None);
    }
    if rec.status != OperatorStatus::Active {
        return Ok(None);
    }
    if now - rec.last_seen_at >= TOUCH_EVERY_SECS {
        let idle = now
            .saturating_add(policy.idle.as_secs() as i64)
            .min(rec.abs_expires_at);
        store
            .touch_console_session(&hash, now, idle)
            .await
            .map_err(internal)?;
    }
    Ok(Some(ConsoleSession {
        session_ref: hash[..SESSION_REF_LEN].to_owned(),
        operator: rec.operator,
        role: rec.role,
        status: rec.status,
        token_sha256: hash,
    }))
}

/// End `session` (its operator logged out).
pub async fn logout(
    store: &dyn Store,
    session: &ConsoleSession,
    now: UnixSeconds,
) -> Result<(), Error> {
    let event = AuditEvent::success(
        Actor::operator(session.operator.clone()),
        action::LOGOUT,
        session.operator.as_str(),
    )
    .with("via", VIA_CONSOLE)
    .with("session", session.session_ref.as_str());
    store
        .end_console_session(&session.token_sha256, now, &event)
        .await
        .map_err(internal)?;
    info!(operator = %session.operator, session = %session.session_ref, "console session ended");
    Ok(())
}

/// End every console session of `session`'s operator ("Log out everywhere"), each with
/// its own audit entry (`all=true`); the token hashes of those ended, this one included.
pub async fn logout_everywhere(
    store: &dyn Store,
    session: &ConsoleSession,
    now: UnixSeconds,
) -> Result<Vec<String>, Error> {
    let mut ended = Vec::new();
    for r in store
        .console_sessions(&session.operator)
        .await
        .map_err(internal)?
    {
        let event = AuditEvent::success(
            Actor::operator(session.operator.clone()),
            action::LOGOUT,
            session.operator.as_str(),
        )
        .with("via", VIA_CONSOLE)
        .with("session", &r.token_sha256[..SESSION_REF_LEN])
        .with("by_session", session.session_ref.as_str())
        .with("all", true);
        if store
            .end_console_session(&r.token_sha256, now, &event)
            .await
            .map_err(internal)?
        {
            ended.push(r.token_sha256);
        }
    }
    info!(operator = %session.operator, sessions = ended.len(), "every console session ended");
    Ok(ended)
}

/// The synchronizer token of the session whose cookie secret is `token`: derived from
/// the secret, so only a holder of the cookie can compute it, and nothing is stored.
pub fn csrf_token(token: &Secret) -> String {
    sha256_hex(format!("tether-console-csrf:{}", token.expose()).as_bytes())
}

/// Compare without leaking where two byte strings first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_compared_in_constant_time() {
        let s = Secret::generate();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.expose().len(), 64);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_ne!(csrf_token(&s), s.hash());
    }
}
