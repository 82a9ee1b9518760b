//! Appliances: register, list, show, disable, enable, revoke, trigger a manual renewal,
//! and create a one-time enrollment token — for the operator API (the HTTP layer) and the
//! command line alike.
//!
//! The operator API authenticates every route with [`crate::domain::operators::authorize`]
//! first (reads need `viewer`, changes `operator`), so a refused caller learns nothing
//! about the fleet; the command line acts as the local admin ([`Caller::LocalAdmin`]).
//! Every change goes
//! through the store method that writes its [`AuditEvent`] (actor: the caller) in the
//! same transaction; a change the store refuses (`not_found`, `conflict`) or one refused
//! here after authorization is recorded as refused with its code.
//!
//! - `POST /v1/appliances` `{"id", "tenant"?, "binding"}` → 201 [`ApplianceSummary`];
//!   400 `invalid_appliance_id` / `bad_request`, 409 `conflict`.
//! - `GET /v1/appliances?status=&tenant=&trust_state=&after=&limit=` →
//!   [`ApplianceList`], ordered by id; `next` is the `after` of the next page (`null` on
//!   the last). `limit` 1..=[`MAX_LIST_LIMIT`], default [`DEFAULT_LIST_LIMIT`].
//! - `GET /v1/appliances/{id}` → [`ApplianceDetail`] (every certificate); 404 `not_found`.
//! - `POST /v1/appliances/{id}/disable|enable|revoke` → [`StatusResponse`]. A revoked
//!   appliance is neither disabled nor enabled (409 `appliance_revoked`): it comes back
//!   only by enrolling again with a fresh proof.
//! - `POST /v1/appliances/{id}/renew` → [`RenewResponse`] (the generation is bumped).
//! - `POST /v1/appliances/{id}/tokens` `{"ttl_secs"?}` → [`TokenResponse`]: the token is
//!   in the answer only; the store keeps its hash, the audit log a reference to the hash.
//!
//! The request and answer bodies are declared in [`tether_api::appliances`].

use std::time::Duration;

use tether_api::appliances::{
    ApplianceDetail, ApplianceList, ApplianceStatus, ApplianceSummary, CertificateInfo,
    CurrentCertificate, ListQuery, PlatformBinding, RegisterRequest, RenewResponse, StatusResponse,
    TokenResponse, DEFAULT_LIST_LIMIT, DEFAULT_TENANT, MAX_LIST_LIMIT, MAX_TOKEN_TTL,
};
use tether_audit::{self as audit, action, AuditEvent};
use tether_identity::ApplianceId;
use tracing::info;

use crate::domain::operators::Caller;
use crate::domain::token::Token;
use crate::domain::trust::evaluate;
use crate::domain::{internal, refuse, rfc3339, Error, ErrorKind, Registry};
use crate::store::{Appliance, ApplianceFilter, CertRecord, CertState, StoreError, UnixSeconds};

/// Longest tenant name and binding field, in bytes.
pub const MAX_FIELD_LEN: usize = 256;

fn bad(code: &'static str, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::BadRequest, code, message)
}

fn check_id(id: &str) -> Result<(), Error> {
    ApplianceId::new(id)
        .map(drop)
        .map_err(|e| bad("invalid_appliance_id", e.to_string()))
}

fn check_field(name: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_FIELD_LEN || value.chars().any(char::is_control) {
        return Err(bad(
            "bad_request",
            format!("{name} must be 1-{MAX_FIELD_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Refuse a binding control could never verify a proof against.
fn check_binding(binding: &PlatformBinding) -> Result<(), Error> {
    match binding {
        PlatformBinding::Aws { role_arn } => {
            if !crate::domain::proof::aws::is_role_arn(role_arn) {
                return Err(bad(
                    "bad_request",
                    "binding.role_arn is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
                ));
            }
        }
        PlatformBinding::Gcp {
            project,
            service_account,
        } => {
            check_field("binding.project", project)?;
            check_field("binding.service_account", service_account)?;
        }
        PlatformBinding::K8s {
            issuer,
            namespace,
            service_account,
        } => {
            check_field("binding.issuer", issuer)?;
            check_field("binding.namespace", namespace)?;
            check_field("binding.service_account", service_account)?;
        }
        PlatformBinding::TokenOnly => {}
    }
    Ok(())
}

/// The answer for a store refusal of a change to appliance `id`.
fn store_error(id: &str, e: StoreError) -> Error {
    match e {
        StoreError::NotFound(_) => Error::new(
            ErrorKind::NotFound,
            "not_found",
            format!("no appliance {id}"),
        ),
        StoreError::Conflict(_) => Error::new(
            ErrorKind::Conflict,
            "conflict",
            format!("appliance {id} already exists"),
        ),
        other => internal(other),
    }
}

fn not_found(id: &str) -> Error {
    store_error(id, StoreError::NotFound(String::new()))
}

fn current_of(cert: &CertRecord) -> CurrentCertificate {
    CurrentCertificate {
        serial: cert.serial.clone(),
        fingerprint: cert.fingerprint.clone(),
        not_after: rfc3339(cert.not_after),
    }
}

fn summary(
    a: Appliance,
    current: Option<&CertRecord>,
    s: &Registry,
    now: UnixSeconds,
) -> ApplianceSummary {
    ApplianceSummary {
        trust_state: evaluate(a.status, current, now, &s.settings.trust),
        certificate: current.map(current_of),
        created_at: rfc3339(a.created_at),
        id: a.id,
        tenant: a.tenant,
        binding: a.binding,
        status: a.status,
        manual_renewal_generation: a.manual_renewal_generation,
    }
}

/// Register appliance `req.id` (see the module docs).
pub async fn register(
    s: &Registry,
    by: &Caller,
    req: RegisterRequest,
    now: UnixSeconds,
) -> Result<ApplianceSummary, Error> {
    let target = audit::clip(&req.id, audit::MAX_TARGET_LEN);
    let event = by.event(action::APPLIANCE_REGISTER, target);
    let tenant = req.tenant.unwrap_or_else(|| DEFAULT_TENANT.to_owned());
    let checked = check_id(&req.id)
        .and_then(|()| check_field("tenant", &tenant))
        .and_then(|()| check_binding(&req.binding));
    if let Err(e) = checked {
        return Err(refuse(s.store.as_ref(), event, e, now).await);
    }
    let binding = serde_json::to_value(&req.binding).map_err(internal)?;
    let event = event
        .with("tenant", tenant.as_str())
        .with("binding", binding);
    let appliance = Appliance {
        id: req.id,
        tenant,
        binding: req.binding,
        status: ApplianceStatus::Active,
        manual_renewal_generation: 0,
        created_at: now,
    };
    if let Err(e) = s.store.register_appliance(&appliance, &event).await {
        let e = store_error(&appliance.id, e);
        return Err(refuse(s.store.as_ref(), event, e, now).await);
    }
    info!(by = %by, appliance = %appliance.id, tenant = %appliance.tenant, "appliance registered");
    Ok(summary(appliance, None, s, now))
}

/// A page of appliances matching `q`, ordered by id.
pub async fn list(s: &Registry, q: ListQuery, now: UnixSeconds) -> Result<ApplianceList, Error> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(bad(
            "invalid_query",
            format!("limit must be 1..={MAX_LIST_LIMIT}"),
        ));
    }
    // One more than the page, to know whether another page follows.
    let want = limit as usize + 1;
    let scan = if q.trust_state.is_some() {
        MAX_LIST_LIMIT
    } else {
        limit + 1
    };
    let mut out = Vec::new();
    let mut after = q.after;
    'pages: loop {
        let page = s
            .store
            .list_appliances(&ApplianceFilter {
                status: q.status,
                tenant: q.tenant.clone(),
                after: after.clone(),
                limit: scan,
                ..ApplianceFilter::default()
            })
            .await
            .map_err(internal)?;
        let done = page.len() < scan as usize;
        after = page.last().map(|a| a.id.clone());
        for a in page {
            let current = s.store.current_certificate(&a.id).await.map_err(internal)?;
            let item = summary(a, current.as_ref(), s, now);
            if q.trust_state.is_some_and(|t| t != item.trust_state) {
                continue;
            }
            out.push(item);
            if out.len() == want {
                break 'pages;
            }
        }
        if done {
            break;
        }
    }
    let next = if out.len() > limit as usize {
        out.truncate(limit as usize);
        out.last().map(|a| a.id.clone())
    } else {
        None
    };
    Ok(ApplianceList {
        appliances: out,
        next,
    })
}

/// Appliance `id`, every certificate it had, and where it is connected.
pub async fn show(s: &Registry, id: &str, now: UnixSeconds) -> Result<ApplianceDetail, Error> {
    check_id(id)?;
    let a = s
        .store
        .get_appliance(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(id))?;
    let certs = s
        .store
        .certificates(id)
        .await
        .map_err(|e| store_error(id, e))?;
    let current = certs.iter().find(|c| c.state == CertState::Current);
    let appliance = summary(a, current, s, now);
    let certificates = certs
        .iter()
        .map(|c| {
            let (state, previous_until) = match c.state {
                CertState::Current => ("current", None),
                CertState::PreviousUntil(t) => ("previous", Some(rfc3339(t))),
                CertState::Revoked => ("revoked", None),
            };
            CertificateInfo {
                serial: c.serial.clone(),
                fingerprint: c.fingerprint.clone(),
                not_before: rfc3339(c.not_before),
                not_after: rfc3339(c.not_after),
                state: state.to_owned(),
                previous_until,
            }
        })
        .collect();
    Ok(ApplianceDetail {
        appliance,
        certificates,
        connection: s.fleet.presence(id),
    })
}

/// Start a change to appliance `id` as `what` by `by`: check the id (a bad id is recorded
/// as refused). Returns the success event to record with the change.
pub async fn begin_change(
    s: &Registry,
    by: &Caller,
    id: &str,
    what: &str,
    now: UnixSeconds,
) -> Result<AuditEvent, Error> {
    let target = audit::clip(id, audit::MAX_TARGET_LEN);
    let event = by.event(what, target);
    match check_id(id) {
        Ok(()) => Ok(event),
        Err(e) => Err(refuse(s.store.as_ref(), event, e, now).await),
    }
}

/// The audit action of a change to `status`.
pub fn status_action(status: ApplianceStatus) -> &'static str {
    match status {
        ApplianceStatus::Active => action::APPLIANCE_ENABLE,
        ApplianceStatus::Disabled => action::APPLIANCE_DISABLE,
        ApplianceStatus::Revoked => action::APPLIANCE_REVOKE,
    }
}

/// Disable, enable or revoke appliance `id` (`event` from [`begin_change`]). A revoked
/// appliance is neither disabled nor enabled: it comes back only by enrolling again.
pub async fn change_status(
    s: &Registry,
    by: &Caller,
    event: AuditEvent,
    id: &str,
    status: ApplianceStatus,
    now: UnixSeconds,
) -> Result<StatusResponse, Error> {
    if status != ApplianceStatus::Revoked {
        let current = s.store.get_appliance(id).await.map_err(internal)?;
        let refusal = match current {
            None => Some(not_found(id)),
            Some(a) if a.status == ApplianceStatus::Revoked => Some(Error::new(
                ErrorKind::Conflict,
                "appliance_revoked",
                format!(
                    "appliance {id} is revoked: it comes back only by enrolling again with a \
                     fresh proof (e.g. `tether token create {id}`)"
                ),
            )),
            Some(_) => None,
        };
        if let Some(e) = refusal {
            return Err(refuse(s.store.as_ref(), event, e, now).await);
        }
    }
    let deltas = match s.store.set_status(id, status, now, &event).await {
        Ok(d) => {
            crate::fault::after_commit("set_status");
            d
        }
        Err(e) => {
            let e = store_error(id, e);
            return Err(refuse(s.store.as_ref(), event, e, now).await);
        }
    };
    let allowlist_version = match deltas.last() {
        Some(d) => d.version,
        None => s.store.allowlist_version().await.map_err(internal)?,
    };
    info!(by = %by, appliance = %id, ?status, changes = deltas.len(), allowlist_version, "appliance status changed");
    // Also when no fingerprint moved (revoking a disabled appliance), which the
    // allowlist feed would not show.
    s.fleet.appliance_changed(id);
    Ok(StatusResponse {
        id: id.to_owned(),
        status,
        allowlist_version,
    })
}

/// Ask appliance `id` to renew now (`event` from [`begin_change`]): its generation is
/// bumped and the brokers are told.
pub async fn request_renewal(
    s: &Registry,
    by: &Caller,
    event: AuditEvent,
    id: &str,
    now: UnixSeconds,
) -> Result<RenewResponse, Error> {
    let generation = match s.store.bump_manual_renewal(id, now, &event).await {
        Ok(g) => g,
        Err(e) => {
            let e = store_error(id, e);
            return Err(refuse(s.store.as_ref(), event, e, now).await);
        }
    };
    info!(by = %by, appliance = %id, generation, "manual renewal requested");
    s.fleet.appliance_changed(id);
    s.fleet
        .broadcast(tether_proto::cluster::ToBroker::Renewals {
            generations: vec![(id.to_owned(), generation.max(0) as u64)],
        });
    Ok(RenewResponse {
        id: id.to_owned(),
        manual_renewal_generation: generation,
    })
}

/// A one-time enrollment token for appliance `id`, valid `ttl` (default
/// `enroll.token_ttl`; `event` from [`begin_change`]). The store keeps its hash only.
pub async fn create_token(
    s: &Registry,
    by: &Caller,
    event: AuditEvent,
    id: &str,
    ttl: Option<Duration>,
    now: UnixSeconds,
) -> Result<TokenResponse, Error> {
    let ttl = ttl.unwrap_or(s.settings.enroll.token_ttl);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        let e = bad(
            "invalid_ttl",
            format!("ttl_secs must be 1..={}", MAX_TOKEN_TTL.as_secs()),
        );
        return Err(refuse(s.store.as_ref(), event, e, now).await);
    }
    let token = Token::generate();
    let hash = token.hash();
    let expires_at = now.saturating_add(ttl.as_secs() as i64);
    let event = event
        .with("token_ref", audit::token_ref(&hash))
        .with("expires_at", expires_at);
    if let Err(e) = s
        .store
        .create_token(id, &hash, expires_at, now, &event)
        .await
    {
        let e = store_error(id, e);
        return Err(refuse(s.store.as_ref(), event, e, now).await);
    }
    info!(by = %by, appliance = %id, expires_at, "enrollment token created");
    Ok(TokenResponse {
        token: token.expose().to_owned(),
        expires_at: rfc3339(expires_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_are_checked() {
        let aws = |arn: &str| PlatformBinding::Aws {
            role_arn: arn.into(),
        };
        assert!(check_binding(&aws("arn:aws:iam::123456789012:role/app")).is_ok());
        assert_eq!(check_binding(&aws("nope")).unwrap_err().code, "bad_request");
        let k8s = PlatformBinding::K8s {
            issuer: String::new(),
            namespace: "n".into(),
            service_account: "s".into(),
        };
        assert_eq!(check_binding(&k8s).unwrap_err().code, "bad_request");
        assert!(check_binding(&PlatformBinding::TokenOnly).is_ok());
    }
}
