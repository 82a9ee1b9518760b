//! Kubernetes proof: a projected ServiceAccount token.
//!
//! The pod mounts a token projected for the audience control expects
//! ([`K8sCluster::audience`], default `tether`); the agent sends it as is. It cannot carry
//! the nonce, so freshness and single use stand in for it: control accepts the token when
//! the appliance's recorded issuer is a configured cluster, the signature verifies with
//! that cluster's keys ([`super::jwks`]), `iss` is that issuer, `aud` holds the audience,
//! it has not expired, it was issued at most [`K8sSettings::max_age`] ago, and namespace,
//! service account and `sub` are the recorded ones. Its `jti` (or the SHA-256 of the token
//! when it has none) is recorded until `exp`, so it enrolls once.
//!
//! Project the token with `expirationSeconds: 600`: the kubelet then rotates it before it
//! is 10 minutes old, the default `max_age`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::ErrorKind;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::jwks::{self, code, refuse, Audience, JwksCache, JwksSource, JwksTiming};
use super::{Error, Verified};
use crate::domain::InvalidSetting;

/// Default audience of the projected token.
pub const DEFAULT_K8S_AUDIENCE: &str = "tether";
/// Default largest age of a token (`now - iat`): 10 min.
pub const DEFAULT_K8S_MAX_AGE: Duration = Duration::from_secs(600);
/// Largest `max_age` a config may set: 24 h.
pub const MAX_K8S_MAX_AGE: Duration = Duration::from_secs(86_400);
/// Default clock leeway for `exp`, `nbf` and `iat`: 30 s.
pub const DEFAULT_K8S_LEEWAY: Duration = Duration::from_secs(30);

/// `[[proofs.k8s.clusters]]`: one cluster whose ServiceAccount tokens control trusts.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sCluster {
    /// The cluster's service-account issuer (`--service-account-issuer`), exactly as in
    /// the tokens' `iss` and in `appliance register --k8s-issuer`. Required.
    pub issuer: String,
    /// The audience the token is projected for. Default `tether`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// URL of the cluster's JWKS (e.g. `<issuer>/openid/v1/jwks`; HTTPS, plain HTTP only
    /// to a loopback host). One of `jwks_url` and `jwks_file` is required.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A JWKS file (e.g. `kubectl get --raw /openid/v1/jwks`), re-read on refresh.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// PEM roots to verify `jwks_url` with instead of the built-in webpki roots (a private
    /// cluster CA). Default: none.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
}

fn default_audience() -> String {
    DEFAULT_K8S_AUDIENCE.to_owned()
}

impl Default for K8sCluster {
    /// An empty issuer (which `validate` refuses) and the default audience, for struct
    /// update syntax.
    fn default() -> Self {
        K8sCluster {
            issuer: String::new(),
            audience: default_audience(),
            jwks_url: None,
            jwks_file: None,
            jwks_ca_file: None,
        }
    }
}

impl fmt::Debug for K8sCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let K8sCluster {
            issuer,
            audience,
            jwks_url,
            jwks_file,
            jwks_ca_file,
        } = self;
        f.debug_struct("K8sCluster")
            .field("issuer", issuer)
            .field("audience", audience)
            .field("jwks_url", jwks_url)
            .field("jwks_file", jwks_file)
            .field("jwks_ca_file", jwks_ca_file)
            .finish()
    }
}

/// `[proofs.k8s]`
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct K8sSettings {
    /// The trusted clusters. Default: none (every Kubernetes proof is refused).
    pub clusters: Vec<K8sCluster>,
    /// Largest age of a token (`now - iat`). Default 10 min, at most 24 h.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Clock leeway for `exp`, `nbf` and `iat`. Default 30 s, at most 5 min.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Age after which a cluster's keys are fetched again. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// Least time between two fetches of one cluster's keys (an unknown `kid` refreshes at
    /// most this often). Default 1 min, at least 1 s.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refetch: Duration,
}

impl Default for K8sSettings {
    fn default() -> Self {
        K8sSettings {
            clusters: Vec::new(),
            max_age: DEFAULT_K8S_MAX_AGE,
            leeway: DEFAULT_K8S_LEEWAY,
            jwks_max_age: jwks::DEFAULT_JWKS_MAX_AGE,
            jwks_min_refetch: jwks::DEFAULT_JWKS_MIN_REFETCH,
        }
    }
}

impl fmt::Debug for K8sSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let K8sSettings {
            clusters,
            max_age,
            leeway,
            jwks_max_age,
            jwks_min_refetch,
        } = self;
        f.debug_struct("K8sSettings")
            .field("clusters", clusters)
            .field("max_age", max_age)
            .field("leeway", leeway)
            .field("jwks_max_age", jwks_max_age)
            .field("jwks_min_refetch", jwks_min_refetch)
            .finish()
    }
}

impl K8sSettings {
    fn timing(&self) -> JwksTiming {
        JwksTiming {
            max_age: self.jwks_max_age,
            min_refetch: self.jwks_min_refetch,
        }
    }

    fn sources(&self) -> Result<Vec<JwksSource>, InvalidSetting> {
        self.clusters
            .iter()
            .map(|c| {
                JwksSource::from_config(
                    "proofs.k8s.clusters",
                    c.jwks_url.as_deref(),
                    c.jwks_file.as_deref(),
                    c.jwks_ca_file.as_deref(),
                )
            })
            .collect()
    }

    /// Check every field (the key sources are built, not fetched).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_age.is_zero() || self.max_age > MAX_K8S_MAX_AGE {
            return Err(InvalidSetting {
                field: "proofs.k8s.max_age",
                reason: "more than 0 and at most 24h".into(),
            });
        }
        if self.leeway > jwks::MAX_LEEWAY {
            return Err(InvalidSetting {
                field: "proofs.k8s.leeway",
                reason: "at most 5m".into(),
            });
        }
        self.timing().validate("proofs.k8s")?;
        for (i, c) in self.clusters.iter().enumerate() {
            if c.issuer.is_empty() {
                return Err(InvalidSetting {
                    field: "proofs.k8s.clusters.issuer",
                    reason: format!("cluster #{} has no issuer", i + 1),
                });
            }
            if self.clusters[..i].iter().any(|o| o.issuer == c.issuer) {
                return Err(InvalidSetting {
                    field: "proofs.k8s.clusters.issuer",
                    reason: format!("{} is configured twice", c.issuer),
                });
            }
            if c.audience.is_empty() {
                return Err(InvalidSetting {
                    field: "proofs.k8s.clusters.audience",
                    reason: format!("empty for {}", c.issuer),
                });
            }
        }
        self.sources().map(|_| ())
    }
}

struct Cluster {
    issuer: String,
    audience: String,
    keys: JwksCache,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Verifies Kubernetes ServiceAccount tokens.
#[derive(Debug)]
pub struct K8sVerifier {
    clusters: Vec<Cluster>,
    max_age: i64,
    leeway: i64,
}

/// The claims of a ServiceAccount token that are checked.
#[derive(Deserialize)]
struct K8sClaims {
    iss: String,
    aud: Audience,
    sub: String,
    exp: Option<i64>,
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: NamedClaim,
}

#[derive(Deserialize)]
struct NamedClaim {
    name: String,
}

impl K8sVerifier {
    /// Build from settings (validated here; the keys are fetched on first use).
    pub fn new(settings: &K8sSettings) -> anyhow::Result<K8sVerifier> {
        settings.validate()?;
        let clusters = settings
            .clusters
            .iter()
            .zip(settings.sources()?)
            .map(|(c, source)| Cluster {
                issuer: c.issuer.clone(),
                audience: c.audience.clone(),
                keys: JwksCache::new(source, settings.timing()),
            })
            .collect();
        Ok(K8sVerifier {
            clusters,
            max_age: jwks::secs(settings.max_age),
            leeway: jwks::secs(settings.leeway),
        })
    }

    /// Verify `jwt` against the recorded `issuer`, `namespace` and `service_account` at
    /// `now` (Unix seconds). A refusal is logged at warn.
    pub async fn verify(
        &self,
        jwt: &str,
        issuer: &str,
        namespace: &str,
        service_account: &str,
        now: i64,
    ) -> Result<Verified, Error> {
        let result = self
            .check(jwt, issuer, namespace, service_account, now)
            .await;
        if let Err(e) = &result {
            warn!(kind = "k8s", issuer, code = e.code, reason = %e.message, "platform proof refused");
        }
        result
    }

    async fn check(
        &self,
        jwt: &str,
        issuer: &str,
        namespace: &str,
        service_account: &str,
        now: i64,
    ) -> Result<Verified, Error> {
        // The cluster is chosen by the record, never by the unverified token.
        let Some(cluster) = self.clusters.iter().find(|c| c.issuer == issuer) else {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::K8S_ISSUER_NOT_CONFIGURED,
                "this appliance's cluster is not configured in control",
            ));
        };
        let signed = jwks::verify_rs256::<K8sClaims>(jwt, &cluster.keys, now).await?;
        let c = &signed.claims;
        if c.iss != cluster.issuer {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::JWT_WRONG_ISSUER,
                "the token was not issued by this appliance's cluster",
            ));
        }
        let iat = c.iat.ok_or_else(|| jwks::malformed("no iat claim"))?;
        let exp = jwks::check_times(c.exp, c.nbf, Some(iat), self.leeway, now)?;
        if now.saturating_sub(iat) > self.max_age {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::JWT_STALE,
                format!(
                    "the token was issued more than {}s ago; present a freshly rotated one",
                    self.max_age
                ),
            ));
        }
        if !c.aud.contains(&cluster.audience) {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::JWT_WRONG_AUDIENCE,
                format!(
                    "the token is not projected for audience {:?}",
                    cluster.audience
                ),
            ));
        }
        let expected_sub = format!("system:serviceaccount:{namespace}:{service_account}");
        let identity_ok = c.sub == expected_sub
            && c.kubernetes.as_ref().is_some_and(|k| {
                k.namespace == namespace && k.serviceaccount.name == service_account
            });
        if !identity_ok {
            warn!(
                token_sub = %c.sub,
                recorded_namespace = namespace,
                recorded_service_account = service_account,
                "Kubernetes identity does not match the binding"
            );
            return Err(refuse(
                ErrorKind::Forbidden,
                code::K8S_IDENTITY_MISMATCH,
                "the token's namespace or service account is not this appliance's binding",
            ));
        }
        let proof_id = match c.jti.as_deref() {
            Some(jti) if !jti.is_empty() => jti.to_owned(),
            _ => crate::domain::token::sha256_hex(jwt.as_bytes()),
        };
        Ok(Verified {
            kind: "k8s",
            proof_id,
            remember_until: exp.saturating_add(self.leeway),
        })
    }
}
