//! Enrollment: an appliance with no certificate proves who it is and gets one.
//!
//! 1. `challenge` hands out a nonce (single use, short expiry).
//! 2. `enroll` takes the appliance id, a CSR (key generated on the appliance), the nonce
//!    and one proof. In order: the id must be registered and not disabled; the nonce is
//!    consumed; the CSR must parse and prove possession of its key (checked before the
//!    proof, so a bad CSR never burns a one-time token); the proof is verified and
//!    consumed; the certificate is issued with the subject and SAN from the record (never
//!    from the CSR), recorded, and its fingerprint allowed (allowlist version bumped).
//!
//! Proofs: `token` (one-time, hashed, expiring, bound to one appliance) and the platform
//! proofs of [`crate::domain::proof`] (`aws`, `gcp`, `k8s`), each checked against the appliance's
//! recorded binding and recorded as used.
//!
//! # Audit
//!
//! A success is one `appliance.enroll` entry (proof kind, serial, fingerprint, allowlist
//! version), written with the certificate in one transaction; a token redemption is a
//! `token.redeem` entry written with the redemption. Every refusal is one
//! `appliance.enroll` entry with outcome `refused` (`failed` for a 5xx) and details
//! `{"code", "proof_kind"}`: one small row per request, never the CSR or the proof. If
//! that entry cannot be written the refusal is still answered, and the failure logged at
//! error.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_api::enroll::{Challenge, EnrollRequest, EnrollResponse, Proof};
use tether_audit::{self as audit, action, Actor, AuditEvent};
use tracing::{info, warn};

use tether_identity::ApplianceId;

use crate::domain::proof::Verified;
use crate::domain::token::Token;
use crate::domain::{internal, record_refusal, rfc3339, Context, Error, ErrorKind};
use crate::store::{CertRecord, CertState, Issue, Receipt, ReceiptKind, StoreError, TokenRefusal};

/// Default lifetime of an enrollment nonce: 5 minutes.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(300);
/// Default lifetime of an enrollment token: 24 hours.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default overlap after a renewal during which the previous certificate stays allowed.
pub const DEFAULT_RENEWAL_OVERLAP: Duration = Duration::from_secs(86_400);

/// `[enroll]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollSettings {
    /// Nonce lifetime. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub nonce_ttl: Duration,
    /// Default token lifetime (`token create --ttl` overrides). Default 24 h.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Overlap after renewal. Default 24 h.
    #[serde(with = "humantime_serde")]
    pub renewal_overlap: Duration,
    /// How often `serve` removes previous certificates whose overlap ended. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub overlap_sweep: Duration,
}

impl Default for EnrollSettings {
    fn default() -> Self {
        Self {
            nonce_ttl: DEFAULT_NONCE_TTL,
            token_ttl: DEFAULT_TOKEN_TTL,
            renewal_overlap: DEFAULT_RENEWAL_OVERLAP,
            overlap_sweep: Duration::from_secs(30),
        }
    }
}

/// Hand out a nonce.
pub async fn challenge(s: &Context, now: i64) -> Result<Challenge, Error> {
    let nonce = crate::domain::token::nonce();
    let expires_at = now + s.settings.enroll.nonce_ttl.as_secs() as i64;
    s.store
        .create_nonce(&nonce, expires_at)
        .await
        .map_err(internal)?;
    Ok(Challenge {
        nonce,
        expires_at: rfc3339(expires_at),
    })
}

/// Check a platform proof against the appliance's binding. A proof of a kind other than
/// the binding's is refused before any verifier runs (no network call for it).
async fn verify_platform(
    s: &Context,
    proof: &Proof,
    binding: &PlatformBinding,
    nonce: &str,
    now: i64,
) -> Result<Verified, Error> {
    match (proof, binding) {
        (Proof::Aws(p), PlatformBinding::Aws { role_arn }) => {
            s.proofs.aws.verify(p, nonce, role_arn).await
        }
        (
            Proof::Gcp { jwt },
            PlatformBinding::Gcp {
                project,
                service_account,
            },
        ) => {
            s.proofs
                .gcp
                .verify(jwt, nonce, project, service_account, now)
                .await
        }
        (
            Proof::K8s { jwt },
            PlatformBinding::K8s {
                issuer,
                namespace,
                service_account,
            },
        ) => {
            s.proofs
                .k8s
                .verify(jwt, issuer, namespace, service_account, now)
                .await
        }
        (Proof::Token { .. }, _) => unreachable!("tokens are redeemed by the caller"),
        (_, binding) => Err(Error::new(
            ErrorKind::Forbidden,
            "proof_kind_mismatch",
            format!(
                "this appliance is bound to {}; a proof of another kind cannot enroll it",
                binding_kind(binding)
            ),
        )),
    }
}

fn binding_kind(b: &PlatformBinding) -> &'static str {
    match b {
        PlatformBinding::Aws { .. } => "aws",
        PlatformBinding::Gcp { .. } => "gcp",
        PlatformBinding::K8s { .. } => "k8s",
        PlatformBinding::TokenOnly => "token-only",
    }
}

/// Longest appliance id, bytes (the name rule of [`tether_identity::name`]).
pub const MAX_APPLIANCE_ID_LEN: usize = tether_identity::MAX_NAME_LEN;

/// Enroll an appliance. Every refusal is recorded in the audit log (see the module docs).
pub async fn enroll(s: &Context, req: EnrollRequest, now: i64) -> Result<EnrollResponse, Error> {
    let result = enroll_checked(s, &req, now).await;
    if let Err(e) = &result {
        let id = req.appliance_id.as_str();
        let (actor, target) = if ApplianceId::is_valid(id) {
            (Actor::appliance(id), id)
        } else {
            // Whatever the caller sent, bounded.
            (
                Actor::system(audit::system::UNKNOWN),
                audit::clip(id, MAX_APPLIANCE_ID_LEN),
            )
        };
        let event = AuditEvent::refused(actor, action::APPLIANCE_ENROLL, target, e.code)
            .with_outcome(e.outcome())
            .with("proof_kind", req.proof.kind());
        record_refusal(s.store.as_ref(), &event, now).await;
    }
    result
}

async fn enroll_checked(
    s: &Context,
    req: &EnrollRequest,
    now: i64,
) -> Result<EnrollResponse, Error> {
    let id = req.appliance_id.as_str();
    let refused = |kind, code, message: String| {
        warn!(appliance = id, code, reason = %message, "enrollment refused");
        Error::new(kind, code, message)
    };
    if let Err(e) = ApplianceId::new(id) {
        return Err(refused(
            ErrorKind::BadRequest,
            "invalid_appliance_id",
            e.to_string(),
        ));
    }
    let appliance = s
        .store
        .get_appliance(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            refused(
                ErrorKind::NotFound,
                "unknown_appliance",
                format!("appliance {id} is not registered"),
            )
        })?;
    if appliance.status == ApplianceStatus::Disabled {
        return Err(refused(
            ErrorKind::Forbidden,
            "appliance_disabled",
            format!("appliance {id} is disabled"),
        ));
    }
    match s.store.consume_nonce(&req.nonce, now).await {
        Ok(()) => {}
        Err(StoreError::Replay(_)) => {
            return Err(refused(
                ErrorKind::Conflict,
                "nonce_replayed",
                "nonce was already used; ask for a new challenge".into(),
            ))
        }
        Err(StoreError::NonceInvalid) => {
            return Err(refused(
                ErrorKind::BadRequest,
                "nonce_invalid",
                "nonce unknown or expired; ask for a new challenge".into(),
            ))
        }
        Err(e) => return Err(internal(e)),
    }
    let csr_key =
        s.ca.check_csr(&req.csr_pem)
            .map_err(|e| refused(ErrorKind::BadRequest, e.code(), e.to_string()))?
            .key_sha256();
    let audit = AuditEvent::success(Actor::appliance(id), action::APPLIANCE_ENROLL, id)
        .with("proof_kind", req.proof.kind());
    match &req.proof {
        Proof::Token { token } => {
            let hash = Token::from_secret(token).hash();
            let retry = Retry {
                kind: ReceiptKind::Enroll,
                subject: &hash,
                csr_key_sha256: csr_key,
            };
            match s.store.check_token(id, &hash, now).await {
                Ok(()) => {}
                Err(StoreError::Token(TokenRefusal::AlreadyUsed)) => {
                    // Used: by this very client, whose answer was lost?
                    if let Some(answer) = answer_retry(s, &retry, audit, now).await? {
                        return Ok(answer);
                    }
                    return Err(refused_token(TokenRefusal::AlreadyUsed));
                }
                Err(StoreError::Token(r)) => return Err(refused_token(r)),
                Err(e) => return Err(internal(e)),
            }
            let redeemed = AuditEvent::success(Actor::appliance(id), action::TOKEN_REDEEM, id)
                .with("token_ref", audit::token_ref(&hash));
            let how = Recording {
                token: Some((&hash, redeemed)),
                retry: Some(retry),
            };
            return issue_and_record(
                s,
                id,
                &req.csr_pem,
                now,
                0,
                audit,
                "appliance enrolled",
                how,
            )
            .await;
        }
        platform => {
            let verified = verify_platform(s, platform, &appliance.binding, &req.nonce, now)
                .await
                .map_err(|e| refused(e.kind, e.code, e.message))?;
            match s
                .store
                .record_proof(verified.kind, &verified.proof_id, verified.remember_until)
                .await
            {
                Ok(()) => {}
                Err(StoreError::Replay(_)) => {
                    return Err(refused(
                        ErrorKind::Conflict,
                        "proof_replayed",
                        "this proof was already used; make a fresh one".into(),
                    ))
                }
                Err(e) => return Err(internal(e)),
            }
        }
    }
    issue_and_record(
        s,
        id,
        &req.csr_pem,
        now,
        0,
        audit,
        "appliance enrolled",
        Recording::default(),
    )
    .await
}

/// The refusal of a token that cannot be redeemed.
fn refused_token(r: TokenRefusal) -> Error {
    let (code, msg) = match r {
        TokenRefusal::Unknown => ("token_unknown", "no such enrollment token"),
        TokenRefusal::WrongAppliance => (
            "token_wrong_appliance",
            "the token was issued for another appliance",
        ),
        TokenRefusal::Expired => ("token_expired", "the token expired; create a new one"),
        TokenRefusal::AlreadyUsed => ("token_used", "the token was already used; create a new one"),
    };
    warn!(code, reason = msg, "enrollment refused");
    Error::new(ErrorKind::Forbidden, code, msg.to_owned())
}

/// What a retry of an enrollment or renewal must match: the request and the new key.
#[derive(Debug)]
pub(crate) struct Retry<'a> {
    /// Enrollment (by token) or renewal (by presented certificate).
    pub kind: ReceiptKind,
    /// The token's hash or the presented certificate's fingerprint.
    pub subject: &'a str,
    /// SHA-256 of the CSR's public key ([`crate::domain::ca::VerifiedCsr::key_sha256`]).
    pub csr_key_sha256: String,
}

/// What [`issue_and_record`] records with the certificate, in the same transaction.
#[derive(Debug, Default)]
pub(crate) struct Recording<'a> {
    /// Redeem this token (its hash), with this entry.
    pub token: Option<(&'a str, AuditEvent)>,
    /// Keep a receipt so that this retry gets the same certificate.
    pub retry: Option<Retry<'a>>,
}

/// If `retry` matches a live receipt whose certificate is still current, answer with
/// that certificate and record `audit` (with `"retry": true`).
pub(crate) async fn answer_retry(
    s: &Context,
    retry: &Retry<'_>,
    audit: AuditEvent,
    now: i64,
) -> Result<Option<EnrollResponse>, Error> {
    let Some((receipt, cert)) = s
        .store
        .find_receipt(retry.kind, retry.subject, &retry.csr_key_sha256, now)
        .await
        .map_err(internal)?
    else {
        return Ok(None);
    };
    let audit = audit
        .with("serial", cert.serial.as_str())
        .with("fingerprint", cert.fingerprint.as_str())
        .with("not_after", cert.not_after)
        .with("retry", true);
    s.store.append_audit(&audit, now).await.map_err(internal)?;
    info!(
        appliance = %cert.appliance_id,
        serial = %cert.serial,
        "retry with the same key: the certificate recorded for it is answered again"
    );
    Ok(Some(EnrollResponse {
        appliance_id: cert.appliance_id.clone(),
        certificate_pem: receipt.chain_pem,
        expires_at: rfc3339(cert.not_after),
        ca_pem: s.ca.root_pem(),
        brokers: crate::domain::brokers::addresses(&s.registry()).await,
        fingerprint: cert.fingerprint,
        not_after: cert.not_after,
    }))
}

/// Issue a certificate for appliance `id` from `csr_pem` (already checked), record it as
/// the current one (the previous stays allowed for `overlap_secs`) together with `audit`
/// (serial, fingerprint and `not_after` added to its details) and what `how` asks for,
/// in one transaction, and build the answer. A concurrent retry that recorded first is
/// answered with its certificate.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn issue_and_record(
    s: &Context,
    id: &str,
    csr_pem: &str,
    now: i64,
    overlap_secs: i64,
    audit: AuditEvent,
    what: &'static str,
    how: Recording<'_>,
) -> Result<EnrollResponse, Error> {
    let ca = s.ca.clone();
    let csr = csr_pem.to_owned();
    let owned_id = id.to_owned();
    let issued = tokio::task::spawn_blocking(move || {
        ca.issue_appliance(&owned_id, &csr, time::OffsetDateTime::now_utc())
    })
    .await
    .map_err(internal)?
    .map_err(|e| match e {
        crate::domain::ca::CaError::Csr(c) => {
            warn!(
                appliance = id,
                code = c.code(),
                "certificate request refused"
            );
            Error::new(ErrorKind::BadRequest, c.code(), c.to_string())
        }
        other => internal(other),
    })?;
    let record = CertRecord {
        serial: issued.serial_hex.clone(),
        appliance_id: id.to_owned(),
        fingerprint: issued.fingerprint_hex.clone(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        state: CertState::Current,
    };
    let recorded = audit
        .clone()
        .with("serial", record.serial.as_str())
        .with("fingerprint", record.fingerprint.as_str())
        .with("not_after", record.not_after);
    let receipt = how.retry.as_ref().map(|r| Receipt {
        kind: r.kind,
        subject: r.subject.to_owned(),
        csr_key_sha256: r.csr_key_sha256.clone(),
        chain_pem: issued.chain_pem.clone(),
        expires_at: now.saturating_add(s.settings.enroll.nonce_ttl.as_secs() as i64),
    });
    let issue = Issue {
        cert: &record,
        overlap_secs,
        audit: &recorded,
        token: how.token.as_ref().map(|(hash, event)| (*hash, event)),
        receipt: receipt.as_ref(),
    };
    let deltas = match s.store.record_issued(&issue, now).await {
        Ok(deltas) => {
            if issue.token.is_some() {
                crate::fault::after_commit("record_certificate");
            }
            deltas
        }
        // A retry of this request with this key recorded first: answer with its
        // certificate (this one was never recorded, so it is not in the allowlist).
        Err(e @ (StoreError::Replay(_) | StoreError::Token(TokenRefusal::AlreadyUsed))) => {
            if let Some(retry) = &how.retry {
                if let Some(answer) = answer_retry(s, retry, audit, now).await? {
                    return Ok(answer);
                }
            }
            return Err(match e {
                StoreError::Token(r) => refused_token(r),
                other => internal(other),
            });
        }
        Err(StoreError::Token(r)) => return Err(refused_token(r)),
        Err(e) => return Err(internal(e)),
    };
    info!(
        appliance = id,
        serial = %issued.serial_hex,
        fingerprint = %issued.fingerprint_hex,
        allowlist_version = deltas.last().map(|d| d.version),
        "{what}"
    );
    Ok(EnrollResponse {
        appliance_id: id.to_owned(),
        certificate_pem: issued.chain_pem,
        expires_at: rfc3339(issued.not_after),
        ca_pem: s.ca.root_pem(),
        brokers: crate::domain::brokers::addresses(&s.registry()).await,
        fingerprint: issued.fingerprint_hex,
        not_after: issued.not_after,
    })
}
