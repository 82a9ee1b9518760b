//! Renewal: an appliance with a valid, still-allowed certificate gets a new one.
//!
//! `POST /v1/renew` over mTLS (the certificate arrives here as its DER), body `{"csr_pem": "..."}`. In order:
//! 1. a client certificate was presented (rustls verified the chain to our root, the
//!    validity window and clientAuth before this runs) — else 401;
//! 2. it names an appliance of our trust domain (an operator or broker certificate can
//!    never renew as an appliance) — else 403 `not_an_appliance`;
//! 3. the appliance is active — else 403 `appliance_disabled` / `appliance_revoked`;
//! 4. its SHA-256 is a certificate we issued to that appliance and is in the allowlist
//!    now (current, or previous within its overlap) — a revoked or expired-out
//!    certificate cannot renew — else 403 `certificate_not_allowed`;
//! 5. it has not expired *now* (rustls checked that at the handshake only, and a
//!    keep-alive connection or a resumed TLS session outlives the handshake) — else 403
//!    `certificate_expired`;
//! 6. the CSR proves possession of a key of an allowed type — else 400 `csr_*`.
//!
//! The new certificate becomes current; the one presented (and any other current one)
//! stays allowed for the overlap window (`enroll.renewal_overlap`, default 24 h), after
//! which [`sweep_overlaps`] removes it (the `overlap_sweep` job, `crate::jobs`).
//!
//! Audit: a renewal is one `appliance.renew` entry (serial, fingerprint, the presented
//! `previous_fingerprint`, allowlist version) written with the certificate; a refusal is
//! one `appliance.renew` entry `{"code", "presented_fingerprint"}` by the identity the
//! certificate names (an appliance, or an operator or broker trying to renew), or by
//! `system/unknown` without one. As for enrollment, a refusal whose entry cannot be
//! written is still answered, and the failure logged at error.

use tether_api::appliances::ApplianceStatus;
use tether_api::enroll::{EnrollResponse, RenewRequest};
use tether_audit::{self as audit, action, Actor, AuditEvent};
use tracing::{info, warn};

use crate::domain::enroll::{answer_retry, issue_and_record, Recording, Retry};
use crate::domain::identity::{identify, PeerIdentity};
use crate::domain::{internal, record_refusal, Context, Error, ErrorKind};
use crate::store::{ReceiptKind, Store};

/// Renew the certificate the caller authenticated with. Every refusal is recorded in the
/// audit log (see the module docs).
pub async fn renew(
    s: &Context,
    peer: Option<&[u8]>,
    req: RenewRequest,
    now: i64,
) -> Result<EnrollResponse, Error> {
    let result = renew_checked(s, peer, &req, now).await;
    if let Err(e) = &result {
        let der = peer;
        let (actor, target) = match der.map(|der| identify(der, s.ca.trust_domain())) {
            Some(Ok(PeerIdentity::Appliance(id))) => (Actor::appliance(id.clone()), id),
            Some(Ok(PeerIdentity::Operator(name))) => {
                (Actor::operator(name), audit::system::UNKNOWN.to_owned())
            }
            Some(Ok(PeerIdentity::Broker(name))) => {
                (Actor::broker(name), audit::system::UNKNOWN.to_owned())
            }
            _ => (
                Actor::system(audit::system::UNKNOWN),
                audit::system::UNKNOWN.to_owned(),
            ),
        };
        let mut event = AuditEvent::refused(actor, action::APPLIANCE_RENEW, target, e.code)
            .with_outcome(e.outcome());
        if let Some(der) = der {
            event.set(
                "presented_fingerprint",
                crate::domain::ca::fingerprint_hex(der),
            );
        }
        record_refusal(s.store.as_ref(), &event, now).await;
    }
    result
}

async fn renew_checked(
    s: &Context,
    peer: Option<&[u8]>,
    req: &RenewRequest,
    now: i64,
) -> Result<EnrollResponse, Error> {
    let refused = |kind, code, message: String| {
        warn!(code, reason = %message, "renewal refused");
        Error::new(kind, code, message)
    };
    let der = peer.ok_or_else(|| {
        refused(
            ErrorKind::Unauthenticated,
            "client_certificate_required",
            "renewal needs the appliance's current certificate (mutual TLS)".into(),
        )
    })?;
    let id = match identify(der, s.ca.trust_domain()) {
        Ok(PeerIdentity::Appliance(id)) => id,
        Ok(other) => {
            return Err(refused(
                ErrorKind::Forbidden,
                "not_an_appliance",
                format!("{other:?} cannot renew as an appliance"),
            ))
        }
        Err(e) => {
            return Err(refused(
                ErrorKind::Forbidden,
                "not_an_appliance",
                e.to_string(),
            ))
        }
    };
    let appliance = s
        .store
        .get_appliance(&id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            refused(
                ErrorKind::Forbidden,
                "certificate_not_allowed",
                format!("appliance {id} is not registered"),
            )
        })?;
    match appliance.status {
        ApplianceStatus::Active => {}
        ApplianceStatus::Disabled => {
            return Err(refused(
                ErrorKind::Forbidden,
                "appliance_disabled",
                format!("appliance {id} is disabled"),
            ))
        }
        ApplianceStatus::Revoked => {
            return Err(refused(
                ErrorKind::Forbidden,
                "appliance_revoked",
                format!("appliance {id} is revoked; it must enroll again with a fresh proof"),
            ))
        }
    }
    let fingerprint = crate::domain::ca::fingerprint_hex(der);
    match s
        .store
        .find_certificate(&fingerprint)
        .await
        .map_err(internal)?
    {
        Some((cert, true)) if cert.appliance_id == id => {
            // rustls checked the validity window at the handshake, but a keep-alive
            // connection or a resumed TLS session can outlive it: check it again now.
            if now >= cert.not_after {
                return Err(refused(
                    ErrorKind::Forbidden,
                    "certificate_expired",
                    format!(
                        "this certificate of {id} has expired; an expired certificate cannot \
                         renew, the appliance must enroll again"
                    ),
                ));
            }
        }
        _ => {
            return Err(refused(
                ErrorKind::Forbidden,
                "certificate_not_allowed",
                format!(
                    "this certificate of {id} is not allowed any more (revoked, disabled or \
                     past its overlap); the appliance must enroll again"
                ),
            ))
        }
    }
    let csr_key =
        s.ca.check_csr(&req.csr_pem)
            .map_err(|e| refused(ErrorKind::BadRequest, e.code(), e.to_string()))?
            .key_sha256();
    let overlap = s.settings.enroll.renewal_overlap.as_secs() as i64;
    let audit = AuditEvent::success(Actor::appliance(id.clone()), action::APPLIANCE_RENEW, &id)
        .with("previous_fingerprint", fingerprint.as_str());
    // The same renewal again (its answer was lost): the same certificate.
    let retry = Retry {
        kind: ReceiptKind::Renew,
        subject: &fingerprint,
        csr_key_sha256: csr_key,
    };
    if let Some(answer) = answer_retry(s, &retry, audit.clone(), now).await? {
        return Ok(answer);
    }
    let how = Recording {
        token: None,
        retry: Some(retry),
    };
    issue_and_record(
        s,
        &id,
        &req.csr_pem,
        now,
        overlap,
        audit,
        "appliance renewed",
        how,
    )
    .await
}

/// Remove previous certificates whose overlap ended by `now`, logging what went (a
/// failure is logged; the next period retries).
pub async fn sweep_overlaps(store: &dyn Store, now: i64) {
    match store.expire_overlaps(now).await {
        Ok(d) if !d.is_empty() => info!(
            removed = d.len(),
            allowlist_version = d.last().map(|d| d.version),
            "renewal overlaps ended; previous certificates removed"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot expire renewal overlaps; will retry"),
    }
}
