//! The appliance routes of the operator API (`/v1/appliances...`): registration, listing,
//! one appliance with its certificates and connection, status changes, manual renewal and
//! one-time enrollment tokens. The exec route has its own module, [`crate::exec`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::trust::TrustState;

/// Page size of `GET /v1/appliances` when none is given.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// Largest page of `GET /v1/appliances`.
pub const MAX_LIST_LIMIT: u32 = 1_000;
/// Longest enrollment token lifetime: 30 days.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Tenant used when a registration names none.
pub const DEFAULT_TENANT: &str = "default";

/// How an appliance proves who it is when it enrolls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlatformBinding {
    /// AWS: the IAM role the appliance's instance runs as.
    Aws {
        /// `arn:aws:iam::<account>:role/<name>`.
        role_arn: String,
    },
    /// GCP: the project and service account of the instance.
    Gcp {
        /// Project id.
        project: String,
        /// Service-account email.
        service_account: String,
    },
    /// Kubernetes: the cluster issuer, namespace and service account.
    K8s {
        /// OIDC issuer URL of the cluster.
        issuer: String,
        /// Namespace.
        namespace: String,
        /// Service-account name.
        service_account: String,
    },
    /// No platform identity: one-time tokens only.
    TokenOnly,
}

/// Lifecycle status of an appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApplianceStatus {
    /// May enroll, renew and connect.
    Active,
    /// Temporarily barred: its fingerprints are out of the allowlist until enabled.
    Disabled,
    /// Barred until it re-enrolls with a fresh proof; its certificates are revoked.
    Revoked,
}

impl ApplianceStatus {
    /// Every status.
    pub const ALL: [ApplianceStatus; 3] = [
        ApplianceStatus::Active,
        ApplianceStatus::Disabled,
        ApplianceStatus::Revoked,
    ];

    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplianceStatus::Active => "active",
            ApplianceStatus::Disabled => "disabled",
            ApplianceStatus::Revoked => "revoked",
        }
    }

    /// The status named `s`, if any.
    pub fn parse(s: &str) -> Option<ApplianceStatus> {
        ApplianceStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for ApplianceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Body of `POST /v1/appliances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Appliance id: 1-128 of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Tenant [default: [`DEFAULT_TENANT`]].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Platform binding.
    pub binding: PlatformBinding,
}

/// An appliance's current certificate, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CurrentCertificate {
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// `notAfter`, RFC 3339.
    pub not_after: String,
}

/// An appliance as `GET /v1/appliances` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// The `trust_state` text below is part of the OpenAPI document, link and all: it names the
// function in control that computes it.
#[allow(rustdoc::broken_intra_doc_links)]
pub struct ApplianceSummary {
    /// Appliance id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Platform binding.
    pub binding: PlatformBinding,
    /// Lifecycle status.
    pub status: ApplianceStatus,
    /// Trust state now ([`crate::trust::evaluate`]).
    pub trust_state: TrustState,
    /// Manual-renewal generation.
    pub manual_renewal_generation: i64,
    /// Registration time, RFC 3339.
    pub created_at: String,
    /// Current certificate, if any.
    pub certificate: Option<CurrentCertificate>,
}

/// Answer of `GET /v1/appliances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplianceList {
    /// The page, by id.
    pub appliances: Vec<ApplianceSummary>,
    /// `after` for the next page; `null` when this is the last.
    pub next: Option<String>,
}

/// One certificate of an appliance, as shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertificateInfo {
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// `notBefore`, RFC 3339.
    pub not_before: String,
    /// `notAfter`, RFC 3339.
    pub not_after: String,
    /// `current`, `previous` (allowed until `previous_until`) or `revoked`.
    pub state: String,
    /// End of a previous certificate's overlap, RFC 3339.
    pub previous_until: Option<String>,
}

/// Where an appliance is connected, as its broker reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Presence {
    /// The broker holding the session.
    pub broker: String,
    /// The broker's session id.
    pub session_id: u64,
    /// When the session came up (Unix seconds).
    pub connected_at: u64,
    /// When the session came up (Unix milliseconds, as its broker reported it).
    #[serde(default)]
    pub connected_at_ms: u64,
    /// Fingerprint of the certificate the session authenticated with.
    pub fingerprint: String,
    /// The agent's version.
    pub agent_version: String,
    /// The transport the session uses: `quic` or `tcp`.
    #[serde(default = "crate::brokers::default_transport")]
    pub transport: String,
    /// The session certificate's `notAfter` (Unix seconds).
    pub cert_not_after: u64,
    /// When its latest heartbeat arrived (Unix seconds).
    pub last_heartbeat: Option<u64>,
    /// The trust state the agent reported in it.
    pub trust_state: Option<String>,
    /// The capabilities the agent announced; `signed-ops/1` means the appliance decides
    /// every command under its customer's policy and signed approvals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// The agent's last `Status` report, read only (signed operations: `policy.sha256`,
    /// `policy.phases`, `approvers`, `privsep`, `audit.head`, `appliance.key`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub agent_status: std::collections::BTreeMap<String, String>,
}

/// Answer of `GET /v1/appliances/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplianceDetail {
    /// The appliance.
    #[serde(flatten)]
    pub appliance: ApplianceSummary,
    /// Every certificate, newest first.
    pub certificates: Vec<CertificateInfo>,
    /// Where it is connected now, as its broker reports (absent when offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<Presence>,
}

/// Answer of `POST /v1/appliances/{id}/disable|enable|revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusResponse {
    /// Appliance id.
    pub id: String,
    /// Its status now.
    pub status: ApplianceStatus,
    /// The allowlist version after the change.
    pub allowlist_version: i64,
}

/// Answer of `POST /v1/appliances/{id}/renew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewResponse {
    /// Appliance id.
    pub id: String,
    /// The new generation (the agent renews when it sees it change).
    pub manual_renewal_generation: i64,
}

/// Body of `POST /v1/appliances/{id}/tokens`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime in seconds [default: `[enroll] token_ttl`; at most [`MAX_TOKEN_TTL`]].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Answer of `POST /v1/appliances/{id}/tokens`. `Debug` redacts the token.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenResponse {
    /// The one-time token (shown once).
    pub token: String,
    /// When it expires, RFC 3339.
    pub expires_at: String,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            token: _,
            expires_at,
        } = self;
        f.debug_struct("TokenResponse")
            .field("token", &"<redacted>")
            .field("expires_at", expires_at)
            .finish()
    }
}

/// Query of `GET /v1/appliances`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
#[serde(default, deny_unknown_fields)]
pub struct ListQuery {
    /// Only this status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ApplianceStatus>,
    /// Only this tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only this trust state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_state: Option<TrustState>,
    /// Ids after this one (the previous page's `next`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Page size, 1..=[`MAX_LIST_LIMIT`] [default: [`DEFAULT_LIST_LIMIT`]].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_response_debug_redacts() {
        let t = TokenResponse {
            token: "tt_secret".into(),
            expires_at: String::new(),
        };
        assert!(!format!("{t:?}").contains("tt_secret"));
    }

    #[test]
    fn statuses_spell_as_in_json() {
        for s in ApplianceStatus::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(ApplianceStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn bindings_are_tagged_by_kind() {
        let b = PlatformBinding::Aws {
            role_arn: "arn:aws:iam::1:role/a".into(),
        };
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"kind":"aws","role_arn":"arn:aws:iam::1:role/a"}"#
        );
        assert_eq!(
            serde_json::to_string(&PlatformBinding::TokenOnly).unwrap(),
            r#"{"kind":"token_only"}"#
        );
    }
}
