//! Brokers of the edge cluster as operators see them: `POST /v1/brokers`, `GET
//! /v1/brokers`. The bodies a broker itself exchanges with control (the bundle
//! `POST /v1/brokers` answers, enrollment, renewal) are the broker's wire format and live
//! here too: [`BrokerBundle`], [`BrokerEnrollRequest`], [`BrokerRenewRequest`] and
//! [`BrokerCredential`] (`POST /v1/brokers/enroll`, `POST /v1/brokers/renew`).

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
    /// Its sessions by transport (`quic`, `tcp`; when connected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_by_transport: Option<std::collections::BTreeMap<String, usize>>,
    /// How many control replicas it holds a channel to, as it last told the replica that
    /// answered (when connected to that replica; 1 for a broker that does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_connected: Option<usize>,
    /// Whether it is draining (`tether broker drain NAME` or SIGTERM): its sessions were
    /// told to reconnect elsewhere and it stops once they left.
    #[serde(default)]
    pub draining: bool,
}

/// The transport a record from before transports were reported used.
pub fn default_transport() -> String {
    "quic".to_owned()
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

/// A one-time broker bundle, as `tether broker add NAME` writes it and
/// `tether-broker --bundle FILE` reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerBundle {
    /// The broker's name (its certificate will say `spiffe://<td>/broker/<name>`).
    pub name: String,
    /// The trust domain.
    pub trust_domain: String,
    /// Control's base URL (`https://host:port`).
    pub control_url: String,
    /// PEM of the root CA: control's certificate and every broker's chain to it.
    pub ca_pem: String,
    /// The one-time enrollment token (secret).
    pub token: String,
    /// When the token stops working (Unix seconds).
    pub expires_at: u64,
}

/// `POST /v1/brokers/enroll` (no client certificate; the bundle's token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerEnrollRequest {
    /// The broker's name.
    pub name: String,
    /// The bundle's token.
    pub token: String,
    /// PEM CSR over a key made on the broker (P-256 or Ed25519). Only the key is used.
    pub csr_pem: String,
}

/// `POST /v1/brokers/renew` (mTLS with the broker's current certificate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRenewRequest {
    /// PEM CSR over a new key.
    pub csr_pem: String,
}

/// The answer of both broker enrollment and renewal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerCredential {
    /// The broker's name.
    pub name: String,
    /// PEM chain: the broker leaf (serverAuth + clientAuth, SAN URI
    /// `spiffe://<td>/broker/<name>`), then the intermediate.
    pub chain_pem: String,
    /// PEM of the root CA.
    pub ca_pem: String,
    /// The leaf's `notAfter` (Unix seconds).
    pub not_after: u64,
}
