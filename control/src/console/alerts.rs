//! Trust findings for the Trust Alerts page and the appliance Trust tab, each with a
//! severity, since when, and one suggested action.
//!
//! - `renewal_due` / `expired`: [`crate::domain::trust::fleet_trust`]'s alerts;
//! - `renewal_not_done`: a renewal was requested (`appliance.request_renewal`, among the
//!   newest [`RECENT_REQUESTS`] requests) more than [`RENEWAL_GRACE_SECS`] ago and no
//!   certificate was issued since;
//! - `superseded_churn`: control closed one of two sessions of the appliance on different
//!   brokers at least [`SUPERSEDE_ALERT`] times (a shared or cloned certificate);
//! - `trust_mismatch`: the trust state the agent reports in its heartbeats differs from
//!   control's;
//! - `allowlist_lag`: a broker says it applied an older allowlist version than the
//!   store's.

use std::collections::BTreeMap;

use tether_api::appliances::ApplianceStatus;
use tether_api::trust::{FleetTrust, TrustState};
use tether_audit::action;

use super::view::when;
use crate::domain::ca::BACKDATE;
use crate::domain::trust::fleet_scan;
use crate::http::AppState;
use crate::store::{AuditSearch, CertRecord, StoreError, UnixSeconds};

/// A requested renewal not done after this long is an alert: 10 minutes.
pub const RENEWAL_GRACE_SECS: i64 = 600;
/// How many of the newest renewal requests the alerts look at.
pub const RECENT_REQUESTS: u32 = 1_000;
/// Superseded this often from two places: an alert.
pub const SUPERSEDE_ALERT: u32 = 3;

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// `renewal_due`, `expired`, `renewal_not_done`, `superseded_churn`,
    /// `trust_mismatch`, `allowlist_lag`.
    pub kind: &'static str,
    /// `critical` or `warning`.
    pub severity: &'static str,
    /// Since when (text).
    pub since: String,
    /// The appliance it is about, if one.
    pub appliance: Option<String>,
    /// Otherwise what it is about (a broker).
    pub subject: String,
    /// Short title.
    pub title: String,
    /// What was found.
    pub detail: String,
    /// The one suggested action.
    pub action: String,
    /// Trigger Renewal is the action.
    pub renew: bool,
}

/// The time a certificate was issued (its `notBefore` is backdated by [`BACKDATE`]).
pub fn issued_at(cert: &CertRecord) -> i64 {
    cert.not_before + BACKDATE.as_secs() as i64
}

/// When the latest renewal of `id` was requested, if ever.
pub async fn last_renewal_request(app: &AppState, id: &str) -> Result<Option<i64>, StoreError> {
    Ok(app
        .domain
        .store
        .audit_search(&AuditSearch {
            target: Some(id.to_owned()),
            action_prefix: Some(action::APPLIANCE_REQUEST_RENEWAL.to_owned()),
            success_only: true,
            limit: 1,
            ..AuditSearch::default()
        })
        .await?
        .into_iter()
        .find(|e| e.outcome == tether_audit::Outcome::Success)
        .map(|e| e.at))
}

/// Whether the renewal requested at `requested` was done by certificate `current`.
pub fn renewal_done(requested: i64, current: Option<&CertRecord>) -> bool {
    current.is_some_and(|c| issued_at(c) >= requested)
}

/// The fleet summary and every finding at `now`.
pub async fn collect(
    app: &AppState,
    now: UnixSeconds,
) -> Result<(FleetTrust, Vec<Alert>), StoreError> {
    let store = app.domain.store.as_ref();
    let settings = &app.domain.settings.trust;
    let scan = fleet_scan(store, settings, now).await?;
    let summary = scan.summary;
    let mut out = Vec::new();
    for a in &summary.alerts {
        let expired = a.state == TrustState::Expired;
        // Expired since its notAfter; due since the renewal-due threshold before it.
        let not_after = time::OffsetDateTime::parse(
            &a.not_after,
            &time::format_description::well_known::Rfc3339,
        )
        .map_or(now, |t| t.unix_timestamp());
        // A certificate issued with less than the threshold left was due from its issue.
        let issued = scan
            .current
            .get(&a.appliance_id)
            .map_or(i64::MIN, issued_at);
        let since = if expired {
            not_after
        } else {
            (not_after - settings.renewal_due.as_secs() as i64).max(issued)
        };
        out.push(Alert {
            kind: a.state.as_str(),
            severity: if expired { "critical" } else { "warning" },
            since: when(since),
            appliance: Some(a.appliance_id.clone()),
            subject: a.tenant.clone(),
            title: if expired {
                "Certificate expired".into()
            } else {
                "Renewal due".into()
            },
            detail: a.message.clone(),
            action: if expired {
                "Create an enrollment token (token-only) or let the agent re-enroll with its platform proof".into()
            } else {
                "Trigger a renewal; if it does not happen, check the agent".into()
            },
            renew: !expired,
        });
    }
    // Requested renewals not done: the latest request per appliance, from the newest requests in the log (one read,
    // however large the fleet).
    let mut requests: BTreeMap<String, i64> = BTreeMap::new();
    for e in store
        .audit_search(&AuditSearch {
            action_prefix: Some(action::APPLIANCE_REQUEST_RENEWAL.to_owned()),
            success_only: true,
            limit: RECENT_REQUESTS,
            ..AuditSearch::default()
        })
        .await?
    {
        if e.outcome == tether_audit::Outcome::Success {
            requests.entry(e.target.clone()).or_insert(e.at);
        }
    }
    for (id, requested) in requests {
        if now - requested < RENEWAL_GRACE_SECS {
            continue;
        }
        if renewal_done(requested, scan.current.get(&id)) {
            continue;
        }
        if scan.states.get(&id).map(|s| s.0) != Some(ApplianceStatus::Active) {
            continue;
        }
        out.push(Alert {
            kind: "renewal_not_done",
            severity: "warning",
            since: when(requested),
            appliance: Some(id.clone()),
            subject: String::new(),
            title: "Renewal requested but not done".into(),
            detail: "a renewal was requested and no new certificate was issued since".into(),
            action: "Check that the appliance is connected and its agent is healthy; trigger the renewal again".into(),
            renew: true,
        });
    }
    // Superseded from two places.
    for (id, s) in app.cluster.superseded() {
        if s.count < SUPERSEDE_ALERT {
            continue;
        }
        out.push(Alert {
            kind: "superseded_churn",
            severity: "critical",
            since: when(s.first_at as i64),
            appliance: Some(id),
            subject: String::new(),
            title: "Connecting from two places".into(),
            detail: format!(
                "control closed one of two sessions on different brokers {} times (last {}): a likely shared or cloned certificate",
                s.count,
                when(s.last_at as i64)
            ),
            action: "Revoke the appliance and enroll it again with a fresh proof".into(),
            renew: false,
        });
    }
    // Agent-reported trust state differs from control's.
    let reported: BTreeMap<String, String> = app.cluster.reported_trust().into_iter().collect();
    for (id, agent) in reported {
        let Some(&(_, ours)) = scan.states.get(&id) else {
            continue;
        };
        if ours.as_str() == agent || ours == TrustState::TrustRevoked {
            continue;
        }
        out.push(Alert {
            kind: "trust_mismatch",
            severity: "warning",
            since: "last heartbeat".into(),
            appliance: Some(id),
            subject: String::new(),
            title: "Agent disagrees on trust".into(),
            detail: format!("the agent reports {agent}; control computes {}", ours.as_str()),
            action: "Trigger a renewal so both sides hold the same certificate; check the appliance's clock".into(),
            renew: true,
        });
    }
    // Brokers whose allowlist lags.
    let version = store.allowlist_version().await?;
    for link in app.cluster.links() {
        if (link.allowlist_version as i64) < version {
            out.push(Alert {
                kind: "allowlist_lag",
                severity: "warning",
                since: when(link.connected_at as i64),
                appliance: None,
                subject: link.broker.clone(),
                title: "Broker allowlist lags".into(),
                detail: format!(
                    "broker {} applied allowlist version {}; the store is at {version}",
                    link.broker, link.allowlist_version
                ),
                action: "Check the broker's channel to control (tether broker list); drain and restart it if it stays behind".into(),
                renew: false,
            });
        }
    }
    Ok((summary, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CertState;

    #[test]
    fn a_renewal_is_done_by_a_certificate_issued_after_the_request() {
        let cert = |issued: i64| CertRecord {
            serial: "01".into(),
            appliance_id: "a".into(),
            fingerprint: "00".into(),
            not_before: issued - BACKDATE.as_secs() as i64,
            not_after: issued + 1000,
            state: CertState::Current,
        };
        assert!(renewal_done(100, Some(&cert(100))));
        assert!(renewal_done(100, Some(&cert(150))));
        assert!(!renewal_done(100, Some(&cert(99))));
        assert!(!renewal_done(100, None));
    }
}
