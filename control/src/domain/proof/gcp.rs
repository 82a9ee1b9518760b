//! GCP proof: a Compute Engine instance-identity token.
//!
//! The agent asks its metadata server for an identity token in full format with the
//! enrollment nonce as audience; Google signs it (RS256). Control accepts it when:
//! the signature verifies with a key from Google's JWKS ([`super::jwks`]), the issuer is
//! Google, it has not expired (with [`GcpSettings::leeway`]), `aud` is the nonce, `email`
//! (verified) is the recorded service account and `google.compute_engine.project_id` is the
//! recorded project. The nonce binds the token to this one enrollment; the proof id (the
//! SHA-256 of the signature) is recorded as well.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::ErrorKind;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::jwks::{self, code, refuse, Audience, JwksCache, JwksSource, JwksTiming};
use super::{Error, Verified};
use crate::domain::InvalidSetting;

/// Google's OAuth2 signing keys.
pub const DEFAULT_GCP_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
/// Default clock leeway for `exp` and `iat`: 30 s.
pub const DEFAULT_GCP_LEEWAY: Duration = Duration::from_secs(30);
/// The issuers Google identity tokens carry.
pub const GCP_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];

/// `[proofs.gcp]`
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcpSettings {
    /// URL of Google's JWKS (HTTPS; plain HTTP only to a loopback host). Default
    /// `https://www.googleapis.com/oauth2/v3/certs` unless `jwks_file` is set.
    pub jwks_url: Option<String>,
    /// A JWKS file to read instead of the URL (re-read on refresh). Default: none.
    pub jwks_file: Option<PathBuf>,
    /// PEM roots to verify `jwks_url` with instead of the built-in webpki roots. Default:
    /// none.
    pub jwks_ca_file: Option<PathBuf>,
    /// Clock leeway for `exp` and `iat`. Default 30 s, at most 5 min.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Age after which Google's keys are fetched again. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// Least time between two fetches of the keys (an unknown `kid` refreshes at most this
    /// often). Default 1 min, at least 1 s.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refetch: Duration,
}

impl Default for GcpSettings {
    fn default() -> Self {
        GcpSettings {
            jwks_url: None,
            jwks_file: None,
            jwks_ca_file: None,
            leeway: DEFAULT_GCP_LEEWAY,
            jwks_max_age: jwks::DEFAULT_JWKS_MAX_AGE,
            jwks_min_refetch: jwks::DEFAULT_JWKS_MIN_REFETCH,
        }
    }
}

impl fmt::Debug for GcpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let GcpSettings {
            jwks_url,
            jwks_file,
            jwks_ca_file,
            leeway,
            jwks_max_age,
            jwks_min_refetch,
        } = self;
        f.debug_struct("GcpSettings")
            .field("jwks_url", jwks_url)
            .field("jwks_file", jwks_file)
            .field("jwks_ca_file", jwks_ca_file)
            .field("leeway", leeway)
            .field("jwks_max_age", jwks_max_age)
            .field("jwks_min_refetch", jwks_min_refetch)
            .finish()
    }
}

impl GcpSettings {
    fn timing(&self) -> JwksTiming {
        JwksTiming {
            max_age: self.jwks_max_age,
            min_refetch: self.jwks_min_refetch,
        }
    }

    fn source(&self) -> Result<JwksSource, InvalidSetting> {
        let url = match (&self.jwks_url, &self.jwks_file) {
            (None, None) => Some(DEFAULT_GCP_JWKS_URL),
            (url, _) => url.as_deref(),
        };
        JwksSource::from_config(
            "proofs.gcp",
            url,
            self.jwks_file.as_deref(),
            self.jwks_ca_file.as_deref(),
        )
    }

    /// Check every field (the key source is built, not fetched).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.leeway > jwks::MAX_LEEWAY {
            return Err(InvalidSetting {
                field: "proofs.gcp.leeway",
                reason: "at most 5m".into(),
            });
        }
        self.timing().validate("proofs.gcp")?;
        self.source().map(|_| ())
    }
}

/// Verifies GCP instance-identity tokens.
#[derive(Debug)]
pub struct GcpVerifier {
    keys: JwksCache,
    leeway: i64,
}

/// The claims of a full-format identity token that are checked.
#[derive(Deserialize)]
struct GcpClaims {
    iss: String,
    aud: Audience,
    exp: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
    #[serde(default)]
    google: Option<GoogleClaims>,
}

#[derive(Deserialize)]
struct GoogleClaims {
    #[serde(default)]
    compute_engine: Option<ComputeEngineClaims>,
}

#[derive(Deserialize)]
struct ComputeEngineClaims {
    project_id: String,
}

impl GcpVerifier {
    /// Build from settings (validated here; the keys are fetched on first use).
    pub fn new(settings: &GcpSettings) -> anyhow::Result<GcpVerifier> {
        settings.validate()?;
        Ok(GcpVerifier {
            keys: JwksCache::new(settings.source()?, settings.timing()),
            leeway: jwks::secs(settings.leeway),
        })
    }

    /// Verify `jwt` for `nonce` against the recorded `project` and `service_account`
    /// (email) at `now` (Unix seconds). A refusal is logged at warn.
    pub async fn verify(
        &self,
        jwt: &str,
        nonce: &str,
        project: &str,
        service_account: &str,
        now: i64,
    ) -> Result<Verified, Error> {
        let result = self.check(jwt, nonce, project, service_account, now).await;
        if let Err(e) = &result {
            warn!(kind = "gcp", code = e.code, reason = %e.message, "platform proof refused");
        }
        result
    }

    async fn check(
        &self,
        jwt: &str,
        nonce: &str,
        project: &str,
        service_account: &str,
        now: i64,
    ) -> Result<Verified, Error> {
        let signed = jwks::verify_rs256::<GcpClaims>(jwt, &self.keys, now).await?;
        let c = &signed.claims;
        if !GCP_ISSUERS.contains(&c.iss.as_str()) {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::JWT_WRONG_ISSUER,
                "the token was not issued by Google",
            ));
        }
        let exp = jwks::check_times(c.exp, c.nbf, c.iat, self.leeway, now)?;
        if !c.aud.contains(nonce) {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::JWT_WRONG_AUDIENCE,
                "the token's audience is not this enrollment's nonce",
            ));
        }
        let email_ok =
            c.email.as_deref() == Some(service_account) && c.email_verified == Some(true);
        let token_project = c
            .google
            .as_ref()
            .and_then(|g| g.compute_engine.as_ref())
            .map(|ce| ce.project_id.as_str());
        if !email_ok || token_project != Some(project) {
            warn!(
                token_email = ?c.email,
                token_email_verified = ?c.email_verified,
                token_project = ?token_project,
                recorded_service_account = service_account,
                recorded_project = project,
                "GCP identity does not match the binding"
            );
            return Err(refuse(
                ErrorKind::Forbidden,
                code::GCP_IDENTITY_MISMATCH,
                "the token's project or service account is not this appliance's binding \
                 (a full-format Compute Engine token with a verified email is needed)",
            ));
        }
        Ok(Verified {
            kind: "gcp",
            proof_id: crate::domain::token::sha256_hex(&signed.signature),
            remember_until: exp.saturating_add(self.leeway),
        })
    }
}
