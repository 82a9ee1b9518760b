//! Brokers of the edge cluster as operators see them: `POST /v1/brokers`, `GET
//! /v1/brokers`. The bodies a broker itself exchanges with control (the bundle
//! `POST /v1/brokers` answers, enrollment, renewal) are the broker's wire format and live
//! in `tether_proto::cluster` (`BrokerBundle`, `BrokerEnrollRequest`,
//! `BrokerRenewRequest`, `BrokerCredential`), next to the cluster channel.

use serde::{Deserialize, Serialize};

/// Status of a broker record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BrokerStatus {
    /// Added; its one-time bundle has not been used yet.
    Pending,
    /// Enrolled: its certificate is honoured.
    Active,
    /// Revoked: refused everywhere.
    Revoked,
}

impl BrokerStatus {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerStatus::Pending => "pending",
            BrokerStatus::Active => "active",
            BrokerStatus::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for BrokerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Body of `POST /v1/brokers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddBroker {
    /// Broker name: 1-128 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Bundle lifetime in seconds (default 86400, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// One broker in `GET /v1/brokers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BrokerInfo {
    /// Name.
    pub name: String,
    /// `pending`, `active` or `revoked`.
    pub status: BrokerStatus,
    /// When it was added (RFC 3339).
    pub created_at: String,
    /// Its certificate's `notAfter` (RFC 3339).
    pub cert_not_after: Option<String>,
    /// Where agents reach it, as it last said.
    pub quic_addr: Option<String>,
    /// When its channel was last up (RFC 3339).
    pub last_seen: Option<String>,
    /// Whether its channel is up now.
    pub connected: bool,
    /// The allowlist version it applied (when connected).
    pub allowlist_version: Option<u64>,
    /// Sessions it holds (when connected).
    pub sessions: Option<usize>,
}

/// Answer of `GET /v1/brokers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BrokerList {
    /// Brokers by name.
    pub brokers: Vec<BrokerInfo>,
    /// The allowlist's current version in the store: a connected broker whose
    /// `allowlist_version` is this enforces every change made so far.
    pub allowlist_version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_spell_as_in_json() {
        for s in [
            BrokerStatus::Pending,
            BrokerStatus::Active,
            BrokerStatus::Revoked,
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
    }
}
