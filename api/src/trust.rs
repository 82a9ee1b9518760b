//! Trust states and `GET /v1/fleet/trust`. How a state is computed (from the status and
//! the current certificate's `notAfter`) is control's business; here are the names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An appliance's trust state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TrustState {
    /// Certificate valid for longer than the recommendation threshold.
    Trusted,
    /// Should renew soon.
    RenewalRecommended,
    /// Should have renewed already.
    RenewalDue,
    /// Certificate expired.
    Expired,
    /// Never enrolled.
    NotEnrolled,
    /// Revoked.
    TrustRevoked,
}

impl TrustState {
    /// Every state, in display order.
    pub const ALL: [TrustState; 6] = [
        TrustState::Trusted,
        TrustState::RenewalRecommended,
        TrustState::RenewalDue,
        TrustState::Expired,
        TrustState::NotEnrolled,
        TrustState::TrustRevoked,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TrustState::Trusted => "trusted",
            TrustState::RenewalRecommended => "renewal_recommended",
            TrustState::RenewalDue => "renewal_due",
            TrustState::Expired => "expired",
            TrustState::NotEnrolled => "not_enrolled",
            TrustState::TrustRevoked => "trust_revoked",
        }
    }
}

impl std::fmt::Display for TrustState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One appliance that needs attention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TrustAlert {
    /// The appliance.
    pub appliance_id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its state (`renewal_due` or `expired`).
    pub state: TrustState,
    /// Its certificate's `notAfter`, RFC 3339.
    pub not_after: String,
    /// What it means.
    pub message: String,
}

/// `GET /v1/fleet/trust`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetTrust {
    /// Appliances registered.
    pub total: u64,
    /// Count per trust state (every state present, zeros included).
    pub counts: BTreeMap<String, u64>,
    /// Appliances disabled (counted in `counts` under their trust state as well).
    pub disabled: u64,
    /// Active trust alerts (enabled appliances only), most urgent first.
    pub alerts: Vec<TrustAlert>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_spell_as_in_json() {
        for s in TrustState::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
    }
}
