//! Trust states: how close each appliance is to losing its identity, and the fleet view.
//!
//! Per appliance, from its status and its current certificate's `notAfter`:
//! - `trust_revoked` — revoked by an operator; it must enroll again with a fresh proof;
//! - `not_enrolled` — registered, no certificate yet;
//! - `expired` — the certificate ran out (the agent re-enrolls with a platform proof, or
//!   needs a new token);
//! - `renewal_due` — under [`TrustSettings::renewal_due`] left (default 1 day): the agent
//!   should have renewed by now; an alert;
//! - `renewal_recommended` — under [`TrustSettings::renewal_recommended`] (default 3 days);
//! - `trusted` — otherwise.
//!
//! `disabled` is not a trust state: it is a reversible status counted on its own; the
//! appliance keeps its trust state underneath.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tether_api::appliances::ApplianceStatus;
use tether_api::trust::{FleetTrust, TrustAlert, TrustState};

use crate::store::{Appliance, ApplianceFilter, CertRecord, Store, StoreError};

/// `[trust]` in `control.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustSettings {
    /// Below this much validity left: `renewal_recommended`. Default 3 days.
    #[serde(with = "humantime_serde")]
    pub renewal_recommended: Duration,
    /// Below this much validity left: `renewal_due` (and an alert). Default 1 day.
    #[serde(with = "humantime_serde")]
    pub renewal_due: Duration,
    /// Allowlist versions whose changes the store keeps for brokers to resume from
    /// (the `allowlist_prune` job removes older ones every minute). A broker further
    /// behind gets a full snapshot instead of deltas, as one more than
    /// [`crate::cluster::MAX_DELTAS_ON_RESUME`] changes behind always does. Default
    /// [`DEFAULT_ALLOWLIST_HISTORY`]; at least 1.
    pub allowlist_history: u64,
}

/// [`TrustSettings::allowlist_history`]'s default: as many versions as the changes a
/// resuming broker may be sent ([`crate::cluster::MAX_DELTAS_ON_RESUME`]; a version has
/// one change or more), so keeping more would never spare a snapshot.
pub const DEFAULT_ALLOWLIST_HISTORY: u64 = crate::cluster::MAX_DELTAS_ON_RESUME as u64;

impl Default for TrustSettings {
    fn default() -> Self {
        TrustSettings {
            renewal_recommended: Duration::from_secs(3 * 86_400),
            renewal_due: Duration::from_secs(86_400),
            allowlist_history: DEFAULT_ALLOWLIST_HISTORY,
        }
    }
}

/// Whether an appliance in `state` needs someone's attention (a trust alert).
pub fn is_alert(state: TrustState) -> bool {
    matches!(state, TrustState::RenewalDue | TrustState::Expired)
}

/// The trust state of an appliance with status `status` whose current certificate (if
/// any) is `current`, at `now`.
pub fn evaluate(
    status: ApplianceStatus,
    current: Option<&CertRecord>,
    now: i64,
    settings: &TrustSettings,
) -> TrustState {
    if status == ApplianceStatus::Revoked {
        return TrustState::TrustRevoked;
    }
    let Some(cert) = current else {
        return TrustState::NotEnrolled;
    };
    let left = cert.not_after - now;
    if left <= 0 {
        TrustState::Expired
    } else if left < settings.renewal_due.as_secs() as i64 {
        TrustState::RenewalDue
    } else if left < settings.renewal_recommended.as_secs() as i64 {
        TrustState::RenewalRecommended
    } else {
        TrustState::Trusted
    }
}

/// Page size used to walk the fleet.
const PAGE: u32 = 1_000;

/// Every appliance, in id order.
pub async fn all_appliances(store: &dyn Store) -> Result<Vec<Appliance>, StoreError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_appliances(&ApplianceFilter {
                after: after.clone(),
                limit: PAGE,
                ..ApplianceFilter::default()
            })
            .await?;
        let done = page.len() < PAGE as usize;
        after = page.last().map(|a| a.id.clone());
        out.extend(page);
        if done || after.is_none() {
            return Ok(out);
        }
    }
}

/// The fleet's trust summary at `now`.
pub async fn fleet_trust(
    store: &dyn Store,
    settings: &TrustSettings,
    now: i64,
) -> Result<FleetTrust, StoreError> {
    Ok(fleet_scan(store, settings, now).await?.summary)
}

/// One pass over the fleet: the summary, and what it was computed from per appliance.
#[derive(Clone, Debug)]
pub struct FleetScan {
    /// The summary ([`fleet_trust`]).
    pub summary: FleetTrust,
    /// Each appliance's status and trust state.
    pub states: BTreeMap<String, (ApplianceStatus, TrustState)>,
    /// Each appliance's current certificate.
    pub current: BTreeMap<String, CertRecord>,
}

/// [`fleet_trust`] with the per-appliance states and certificates it read.
pub async fn fleet_scan(
    store: &dyn Store,
    settings: &TrustSettings,
    now: i64,
) -> Result<FleetScan, StoreError> {
    let appliances = all_appliances(store).await?;
    let current: BTreeMap<String, CertRecord> = store
        .current_certificates()
        .await?
        .into_iter()
        .map(|c| (c.appliance_id.clone(), c))
        .collect();
    let mut counts: BTreeMap<String, u64> = TrustState::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    let mut disabled = 0;
    let mut alerts = Vec::new();
    let mut states = BTreeMap::new();
    for a in &appliances {
        let cert = current.get(&a.id);
        let state = evaluate(a.status, cert, now, settings);
        states.insert(a.id.clone(), (a.status, state));
        *counts.entry(state.as_str().to_owned()).or_default() += 1;
        if a.status == ApplianceStatus::Disabled {
            disabled += 1;
            continue;
        }
        if let (true, Some(cert)) = (is_alert(state), cert) {
            let message = match state {
                TrustState::Expired => format!(
                    "certificate expired; the appliance must re-enroll ({})",
                    binding_hint(a)
                ),
                _ => "certificate expires within the renewal-due threshold and was not renewed"
                    .to_owned(),
            };
            alerts.push((
                cert.not_after,
                TrustAlert {
                    appliance_id: a.id.clone(),
                    tenant: a.tenant.clone(),
                    state,
                    not_after: crate::domain::rfc3339(cert.not_after),
                    message,
                },
            ));
        }
    }
    alerts.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1.appliance_id.cmp(&b.1.appliance_id))
    });
    Ok(FleetScan {
        summary: FleetTrust {
            total: appliances.len() as u64,
            counts,
            disabled,
            alerts: alerts.into_iter().map(|(_, a)| a).collect(),
        },
        states,
        current,
    })
}

fn binding_hint(a: &Appliance) -> &'static str {
    match a.binding {
        tether_api::appliances::PlatformBinding::TokenOnly => {
            "token-only: create a new enrollment token for it"
        }
        _ => "its agent re-enrolls on its own with a fresh platform proof",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CertState;

    fn cert(not_after: i64) -> CertRecord {
        CertRecord {
            serial: "01".into(),
            appliance_id: "a".into(),
            fingerprint: "00".into(),
            not_before: 0,
            not_after,
            state: CertState::Current,
        }
    }

    #[test]
    fn thresholds() {
        let s = TrustSettings::default();
        let day = 86_400;
        let now = 1_000_000;
        let st = |left: i64| evaluate(ApplianceStatus::Active, Some(&cert(now + left)), now, &s);
        assert_eq!(st(10 * day), TrustState::Trusted);
        assert_eq!(st(3 * day), TrustState::Trusted);
        assert_eq!(st(3 * day - 1), TrustState::RenewalRecommended);
        assert_eq!(st(day), TrustState::RenewalRecommended);
        assert_eq!(st(day - 1), TrustState::RenewalDue);
        assert_eq!(st(1), TrustState::RenewalDue);
        assert_eq!(st(0), TrustState::Expired);
        assert_eq!(st(-day), TrustState::Expired);
        assert_eq!(
            evaluate(ApplianceStatus::Active, None, now, &s),
            TrustState::NotEnrolled
        );
        assert_eq!(
            evaluate(
                ApplianceStatus::Revoked,
                Some(&cert(now + 10 * day)),
                now,
                &s
            ),
            TrustState::TrustRevoked
        );
        // Disabled keeps its trust state underneath.
        assert_eq!(
            evaluate(
                ApplianceStatus::Disabled,
                Some(&cert(now + 10 * day)),
                now,
                &s
            ),
            TrustState::Trusted
        );
    }
}
