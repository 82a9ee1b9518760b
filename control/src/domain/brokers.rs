//! Brokers of the edge cluster: one-time bundles, enrollment, renewal, listing,
//! revocation, and the broker addresses handed to appliances. The operator API
//! (the HTTP layer) and the command line call these operations.
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
//! - `POST /v1/brokers/{name}/drain` (admin) → the broker drains as on SIGTERM (`GoAway`
//!   with a jittered reconnect delay to every session, then it stops); `GET /v1/brokers`
//!   shows it `draining` meanwhile.

use std::time::Duration;

use serde::Serialize;
use tether_api::brokers::{AddBroker, BrokerInfo, BrokerList, BrokerStatus};
use tether_api::brokers::{
    BrokerBundle, BrokerCredential, BrokerEnrollRequest, BrokerRenewRequest,
};
use tether_audit::{self as audit, action, Actor, AuditEvent};
use tether_identity::BrokerName;
use tracing::{info, warn};

use crate::domain::identity::{identify, PeerIdentity};
use crate::domain::operators::Caller;
use crate::domain::token::Token;
use crate::domain::{internal, refuse, rfc3339, Context, Error, ErrorKind, Registry};
use crate::store::{BrokerRefusal, Store, StoreError, UnixSeconds};

/// A broker's channel as control holds it (see [`crate::domain::Fleet::links`]).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LinkInfo {
    /// Broker name.
    pub broker: String,
    /// Where agents reach it.
    pub quic_addr: String,
    /// When the channel opened (Unix seconds).
    pub connected_at: u64,
    /// The allowlist version the broker last said it applied.
    pub allowlist_version: u64,
    /// Sessions it holds.
    pub sessions: usize,
    /// Sessions it holds by transport (`quic`, `tcp`).
    pub sessions_by_transport: std::collections::BTreeMap<String, usize>,
    /// How many control replicas it holds a channel to (it says so on each; 1 when it
    /// does not).
    pub replicas_connected: usize,
    /// It is draining (it said so, or this replica asked it to).
    pub draining: bool,
}

/// Why a broker cannot be asked to drain (see [`drain`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DrainRefusal {
    /// The broker holds no channel to this replica: nothing can carry the request.
    /// Retrying through another replica, or once the broker is back, can help.
    #[error("the broker holds no channel to this control replica")]
    NotConnected,
    /// The broker is older than the drain request: drain it with SIGTERM.
    #[error("the broker does not take drain requests (older version): send it SIGTERM")]
    Unsupported,
}

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
pub async fn addresses(s: &Registry) -> Vec<String> {
    if !s.settings.brokers.is_empty() {
        return s.settings.brokers.clone();
    }
    // Runs on every enrollment: only the addresses, no per-session counting.
    let mut out = s.fleet.quic_addrs();
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

fn bad(code: &'static str, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::BadRequest, code, message)
}

fn check_name(name: &str) -> Result<(), Error> {
    BrokerName::new(name)
        .map(drop)
        .map_err(|e| bad(e.code(), e.to_string()))
}

/// Create broker `req.name` with a bundle carrying `ca_pem` for `trust_domain`, valid
/// `req.ttl_secs` (default [`DEFAULT_BUNDLE_TTL`]). `conflict` when an active broker has
/// the name.
pub async fn create(
    s: &Registry,
    by: &Caller,
    ca_pem: String,
    trust_domain: &str,
    req: &AddBroker,
    now: UnixSeconds,
) -> Result<BrokerBundle, Error> {
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
        s.settings.control_url.clone(),
        ca_pem,
        trust_domain,
        &req.name,
        ttl,
        by.actor(),
        now,
    )
    .await
    .map_err(|e| match e {
        StoreError::Conflict(_) => Error::new(
            ErrorKind::Conflict,
            "conflict",
            format!("an active broker is named {}", req.name),
        ),
        other => internal(other),
    })?;
    info!(by = %by, broker = %req.name, "broker bundle created");
    Ok(bundle)
}

/// Every broker, with its channel if it is up.
pub async fn list(s: &Registry, now: UnixSeconds) -> Result<BrokerList, Error> {
    let links = s.fleet.links();
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
                sessions_by_transport: link.map(|l| l.sessions_by_transport.clone()),
                replicas_connected: link.map(|l| l.replicas_connected),
                draining: link.is_some_and(|l| l.draining),
                name: b.name,
            }
        })
        .collect();
    let allowlist_version = s.store.allowlist_version().await.map_err(internal)?;
    Ok(BrokerList {
        brokers,
        allowlist_version: u64::try_from(allowlist_version).unwrap_or(0),
    })
}

/// Revoke broker `name`: refused everywhere from now on, its channel closed.
pub async fn revoke(s: &Registry, by: &Caller, name: &str, now: UnixSeconds) -> Result<(), Error> {
    check_name(name)?;
    let target = audit::clip(name, audit::MAX_TARGET_LEN);
    let event = by.event(action::BROKER_REVOKE, target);
    match s.store.revoke_broker(name, now, &event).await {
        Ok(()) => {}
        Err(StoreError::NotFound(_)) => {
            return Err(Error::new(
                ErrorKind::NotFound,
                "not_found",
                format!("no broker {name}"),
            ))
        }
        Err(e) => return Err(internal(e)),
    }
    s.fleet.disconnect(name);
    info!(by = %by, broker = %name, "broker revoked");
    Ok(())
}

/// Ask broker `name` to drain, exactly as SIGTERM does, through its channel to this
/// replica; audited as `broker.drain`. `not_found` for a broker never added,
/// `broker_not_connected` (409) when it holds no channel here, `drain_unsupported` (409)
/// for a broker too old to take the request.
pub async fn drain(s: &Registry, by: &Caller, name: &str, now: UnixSeconds) -> Result<(), Error> {
    check_name(name)?;
    let known = s
        .store
        .list_brokers()
        .await
        .map_err(internal)?
        .into_iter()
        .any(|b| b.name == name);
    if !known {
        return Err(Error::new(
            ErrorKind::NotFound,
            "not_found",
            format!("no broker {name}"),
        ));
    }
    let target = audit::clip(name, audit::MAX_TARGET_LEN);
    if let Err(refusal) = s.fleet.drain(name) {
        let code = match refusal {
            DrainRefusal::NotConnected => "broker_not_connected",
            DrainRefusal::Unsupported => "drain_unsupported",
        };
        let event = by.refused(action::BROKER_DRAIN, target, code);
        crate::domain::record_refusal(s.store.as_ref(), &event, now).await;
        return Err(Error::new(ErrorKind::Conflict, code, refusal.to_string()));
    }
    let event = by.event(action::BROKER_DRAIN, target);
    s.store.append_audit(&event, now).await.map_err(internal)?;
    info!(by = %by, broker = %name, "broker asked to drain");
    Ok(())
}

/// The active broker whose current (or overlapping previous) certificate `peer` (DER) is.
pub async fn authenticate(
    s: &Context,
    peer: Option<&[u8]>,
    now: UnixSeconds,
) -> Result<String, Error> {
    let der = peer.ok_or_else(|| {
        Error::new(
            ErrorKind::Unauthenticated,
            "certificate_required",
            "a broker certificate is required",
        )
    })?;
    let forbidden = |code: &'static str, msg: &str| Error::new(ErrorKind::Forbidden, code, msg);
    let name = match identify(der, s.ca.trust_domain()) {
        Ok(PeerIdentity::Broker(n)) => n,
        _ => return Err(forbidden("broker_required", "not a broker certificate")),
    };
    let fp = crate::domain::ca::fingerprint_hex(der);
    match s.store.broker_by_fingerprint(&fp, now).await {
        Ok(Some(b)) if b.name == name => Ok(name),
        Ok(_) => Err(forbidden(
            "broker_unknown",
            "not the certificate of an active broker",
        )),
        Err(e) => Err(internal(e)),
    }
}

/// Sign a broker leaf off the async threads (a KMS key signs over the network).
async fn issue(s: &Context, name: &str, csr_pem: &str) -> Result<crate::domain::ca::Issued, Error> {
    let ca = s.ca.clone();
    let (name, csr) = (name.to_owned(), csr_pem.to_owned());
    tokio::task::spawn_blocking(move || {
        ca.issue_broker(&name, &csr, &[], &[], time::OffsetDateTime::now_utc())
    })
    .await
    .map_err(internal)?
    .map_err(|e| match e {
        crate::domain::ca::CaError::Csr(c) => bad(c.code(), c.to_string()),
        other => internal(other),
    })
}

fn credential(name: &str, issued: &crate::domain::ca::Issued, s: &Context) -> BrokerCredential {
    BrokerCredential {
        name: name.to_owned(),
        chain_pem: issued.chain_pem.clone(),
        ca_pem: s.ca.root_pem(),
        not_after: issued.not_after.max(0) as u64,
    }
}

async fn refused(s: &Context, event: AuditEvent, e: Error, now: UnixSeconds) -> Error {
    warn!(action = %event.action, target = %event.target, code = e.code, "broker request refused");
    refuse(s.store.as_ref(), event, e, now).await
}

/// Enroll a broker with its bundle's token and a CSR (no client certificate). The token
/// works once.
pub async fn enroll(
    s: &Context,
    req: &BrokerEnrollRequest,
    now: UnixSeconds,
) -> Result<BrokerCredential, Error> {
    let target = audit::clip(&req.name, audit::MAX_TARGET_LEN);
    let event = AuditEvent::success(Actor::broker(target), action::BROKER_ENROLL, target);
    if let Err(e) = check_name(&req.name) {
        return Err(refused(s, event, e, now).await);
    }
    let issued = match issue(s, &req.name, &req.csr_pem).await {
        Ok(i) => i,
        Err(e) => return Err(refused(s, event, e, now).await),
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
            let e = Error::new(ErrorKind::Forbidden, code, msg);
            return Err(refused(s, event, e, now).await);
        }
        Err(e) => return Err(refused(s, event, internal(e), now).await),
    }
    info!(broker = %req.name, fingerprint = %issued.fingerprint_hex, "broker enrolled");
    Ok(credential(&req.name, &issued, s))
}

/// Renew broker `name`'s certificate (it authenticated with `presented`, its current
/// certificate's DER, see [`authenticate`]); the old one stays accepted for
/// `enroll.renewal_overlap`.
pub async fn renew(
    s: &Context,
    name: &str,
    presented: &[u8],
    req: &BrokerRenewRequest,
    now: UnixSeconds,
) -> Result<BrokerCredential, Error> {
    let event = AuditEvent::success(Actor::broker(name), action::BROKER_RENEW, name);
    let issued = match issue(s, name, &req.csr_pem).await {
        Ok(i) => i,
        Err(e) => return Err(refused(s, event, e, now).await),
    };
    let presented = crate::domain::ca::fingerprint_hex(presented);
    let overlap = s
        .settings
        .enroll
        .renewal_overlap
        .as_secs()
        .min(i64::MAX as u64) as i64;
    let event = event.with("fingerprint", issued.fingerprint_hex.as_str());
    match s
        .store
        .renew_broker(
            name,
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
            let e = Error::new(
                ErrorKind::Forbidden,
                "certificate_not_current",
                "only the broker's current certificate can renew",
            );
            return Err(refused(s, event, e, now).await);
        }
        Err(e) => return Err(refused(s, event, internal(e), now).await),
    }
    info!(broker = %name, fingerprint = %issued.fingerprint_hex, "broker renewed its certificate");
    Ok(credential(name, &issued, s))
}
