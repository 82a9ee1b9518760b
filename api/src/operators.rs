//! Operators: roles, one-time enrollment bundles, login, invites, the list and revocation
//! (`/v1/operators...`). Which role a route needs is control's business; here are the
//! names and the bodies.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::UnixSeconds;

/// Lifetime of an invite when none is given: 24 hours.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest invite lifetime: 30 days.
pub const MAX_INVITE_TTL: Duration = Duration::from_secs(30 * 86_400);

/// What an operator may do. `admin` may do everything, `operator` works with appliances,
/// commands and tokens, `viewer` only reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, operators included.
    Admin,
    /// Appliances, commands, tokens.
    Operator,
    /// Read-only.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    /// The name used in the store, the API and bundles.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// The role named `s`, if any.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (admin, operator, viewer)"))
    }
}

/// Status of an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OperatorStatus {
    /// May call operator routes with a recorded certificate.
    Active,
    /// Refused everywhere; a new invite for the name re-activates it.
    Revoked,
}

impl OperatorStatus {
    /// The name used in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorStatus::Active => "active",
            OperatorStatus::Revoked => "revoked",
        }
    }

    /// The status named `s`, if any.
    pub fn parse(s: &str) -> Option<OperatorStatus> {
        match s {
            "active" => Some(OperatorStatus::Active),
            "revoked" => Some(OperatorStatus::Revoked),
            _ => None,
        }
    }
}

impl std::fmt::Display for OperatorStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// An operator, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Operator {
    /// Name (`[A-Za-z0-9._-]{1,128}`).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Status.
    pub status: OperatorStatus,
    /// When it first logged in, Unix seconds.
    pub created_at: UnixSeconds,
    /// Recorded (honoured) certificates.
    pub certificates: i64,
}

/// What [`Store::revoke_operator`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// The text above is part of the OpenAPI document, link and all: it names control's store
// method that returns this.
#[allow(rustdoc::broken_intra_doc_links)]
pub struct Revoked {
    /// Certificates no longer honoured.
    pub certificates_removed: u64,
    /// Unredeemed invites cancelled.
    pub invites_cancelled: u64,
}

/// A one-time enrollment bundle: everything `tether login --bundle FILE` needs. `Debug`
/// redacts the token.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bundle {
    /// Control's HTTPS URL.
    pub control_url: String,
    /// The root CA, PEM (pinned by the CLI).
    pub ca_pem: String,
    /// The one-time token.
    pub token: String,
    /// The operator name.
    pub name: String,
    /// The role.
    pub role: Role,
    /// When the token expires, RFC 3339.
    pub expires_at: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            control_url,
            ca_pem: _,
            token: _,
            name,
            role,
            expires_at,
        } = self;
        f.debug_struct("Bundle")
            .field("control_url", control_url)
            .field("token", &"<redacted>")
            .field("name", name)
            .field("role", role)
            .field("expires_at", expires_at)
            .finish_non_exhaustive()
    }
}

/// Body of `POST /v1/operators/login`.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The bundle's one-time token.
    pub token: String,
    /// PKCS#10 CSR, PEM (key generated by the operator).
    pub csr_pem: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginRequest(<redacted>)")
    }
}

/// Answer to a login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginResponse {
    /// Leaf then intermediate, PEM.
    pub certificate_pem: String,
    /// The root CA, PEM.
    pub ca_pem: String,
    /// Operator name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Certificate `notAfter`, RFC 3339.
    pub expires_at: String,
}

/// Body of `POST /v1/operators/invites`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// Operator name.
    pub name: String,
    /// Role to grant.
    pub role: Role,
    /// Lifetime in seconds [default: [`DEFAULT_INVITE_TTL`]; at most [`MAX_INVITE_TTL`]].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Answer to `GET /v1/operators`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperatorList {
    /// Every operator, by name.
    pub operators: Vec<Operator>,
}

/// Answer to `POST /v1/operators/{name}/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokeResponse {
    /// The operator.
    pub name: String,
    /// What changed.
    #[serde(flatten)]
    pub revoked: Revoked,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_their_names() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert_eq!(Role::parse("root"), None);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn bundle_and_login_debug_redact_the_token() {
        let b = Bundle {
            control_url: "https://c".into(),
            ca_pem: "PEM".into(),
            token: "op_secret".into(),
            name: "alice".into(),
            role: Role::Admin,
            expires_at: String::new(),
        };
        assert!(!format!("{b:?}").contains("op_secret"));
        let l = LoginRequest {
            token: "op_secret".into(),
            csr_pem: "CSR".into(),
        };
        assert!(!format!("{l:?}").contains("op_secret"));
    }

    #[test]
    fn revoke_response_is_flat() {
        let r = RevokeResponse {
            name: "bob".into(),
            revoked: Revoked {
                certificates_removed: 2,
                invites_cancelled: 1,
            },
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"name":"bob","certificates_removed":2,"invites_cancelled":1}"#
        );
    }
}
