//! Control configuration: `DATA_DIR/control.toml`, written by `tether-control init` and
//! read by every other command; flags and `TETHER_CONTROL_*` variables override it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name of the config inside the data directory.
pub const CONFIG_FILE: &str = "control.toml";
/// Default HTTPS listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// Default metrics listen address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:8444";
/// Default lifetime of an enrollment nonce: 5 minutes.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(300);
/// Default lifetime of an enrollment token: 24 hours.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default overlap after a renewal during which the previous certificate stays allowed.
pub const DEFAULT_RENEWAL_OVERLAP: Duration = Duration::from_secs(86_400);

/// Environment variable names.
pub mod env {
    /// Data directory.
    pub const DATA_DIR: &str = "TETHER_CONTROL_DATA_DIR";
    /// HTTPS listen address.
    pub const LISTEN: &str = "TETHER_CONTROL_LISTEN";
    /// Metrics listen address.
    pub const METRICS_LISTEN: &str = "TETHER_CONTROL_METRICS_LISTEN";
    /// Database URL (`sqlite://...` or `postgres://...`).
    pub const DATABASE_URL: &str = "TETHER_CONTROL_DATABASE_URL";
    /// Log format.
    pub const LOG_FORMAT: &str = "TETHER_CONTROL_LOG_FORMAT";
}

/// `control.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// SPIFFE trust domain of every identity this control issues.
    pub trust_domain: String,
    /// HTTPS listen address. Default `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// Local plain-HTTP listener for `/metrics` and `/healthz`. Default `127.0.0.1:8444`.
    pub metrics_listen: SocketAddr,
    /// Database URL; default: SQLite file `control.db` in the data directory.
    pub database_url: Option<String>,
    /// Broker addresses handed to enrolled appliances (`host:port`).
    pub brokers: Vec<String>,
    /// DNS names in the control server certificate. Default `["localhost"]`.
    pub dns_names: Vec<String>,
    /// IP addresses in the control server certificate. Default `127.0.0.1`, `::1`.
    pub ips: Vec<IpAddr>,
    /// Enrollment settings.
    pub enroll: EnrollSettings,
    /// Platform proof verifiers (AWS STS endpoints, GCP and Kubernetes key sources).
    pub proofs: crate::proof::ProofSettings,
    /// Trust-state thresholds.
    pub trust: crate::trust::TrustSettings,
    /// Validity of the certificates control issues.
    pub certificates: CertificateSettings,
    /// Limits of the HTTPS listener.
    pub http: HttpSettings,
    /// Signed checkpoints of the audit log.
    pub audit: AuditSettings,
    /// How `serve` stops on SIGTERM.
    pub shutdown: ShutdownSettings,
}

/// Default time in-flight requests and command streams get to finish on SIGTERM: 10 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest shutdown grace accepted: 10 minutes (a supervisor's kill timeout is shorter).
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);

/// `[shutdown]`: how `serve` stops. On SIGTERM it stops accepting, lets in-flight requests
/// and command streams finish for up to `grace`, tells every broker channel it is going
/// away, then exits 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// Time in-flight requests get to finish. Default 10 s
    /// ([`DEFAULT_SHUTDOWN_GRACE`]); at most [`MAX_SHUTDOWN_GRACE`].
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Default interval between signed audit checkpoints: 60 s.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// `[audit]`: signed checkpoints of the audit log (see `crate::audit_log` and `tether_audit::checkpoint`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// How often `serve` signs a checkpoint of the log's head, when entries were added
    /// since the last one. Entries newer than the last checkpoint can be cut from the log
    /// undetected, so this bounds that window. Default 60 s
    /// ([`DEFAULT_CHECKPOINT_EVERY`]); at least 1 s.
    #[serde(with = "humantime_serde")]
    pub checkpoint_every: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        }
    }
}

/// `[http]`: limits that keep slow or idle clients from holding control's connections.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Time to send a request's header; also closes a keep-alive connection idle that
    /// long. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time for a whole request, body included (answered 408). Default 60 s: longer than
    /// every limit inside (store, STS, JWKS).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue. Default 4096.
    pub max_connections: usize,
    /// Requests per second each client IP (an IPv6 client: its /64) may make to the
    /// routes open without credentials (`POST /v1/enroll/challenge`, `POST /v1/enroll`,
    /// `POST /v1/operators/login`), sustained; more are answered 429 `rate_limited` with
    /// `Retry-After`. Default 20 ([`DEFAULT_PUBLIC_RATE_PER_SEC`]); 0 turns the limit off.
    /// See [`crate::rate_limit`].
    pub public_rate_per_sec: u32,
    /// Requests a client IP may make at once to those routes before the rate applies.
    /// Default 40 ([`DEFAULT_PUBLIC_BURST`]); at least 1 unless the limit is off.
    pub public_burst: u32,
}

/// Default of [`HttpSettings::public_rate_per_sec`]: 20 requests per second per client IP.
pub const DEFAULT_PUBLIC_RATE_PER_SEC: u32 = 20;
/// Default of [`HttpSettings::public_burst`]: 40 requests.
pub const DEFAULT_PUBLIC_BURST: u32 = 40;

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 4096,
            public_rate_per_sec: DEFAULT_PUBLIC_RATE_PER_SEC,
            public_burst: DEFAULT_PUBLIC_BURST,
        }
    }
}

/// `[certificates]`: validity lengths of issued leaves (the root and intermediate are
/// fixed at init: 10 and 2 years).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertificateSettings {
    /// Appliance certificates. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub appliance: Duration,
    /// Broker certificates. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub broker: Duration,
    /// Operator certificates. Default 365 days.
    #[serde(with = "humantime_serde")]
    pub operator: Duration,
}

impl Default for CertificateSettings {
    fn default() -> Self {
        CertificateSettings {
            appliance: crate::ca::DEFAULT_APPLIANCE_VALIDITY,
            broker: crate::ca::DEFAULT_BROKER_VALIDITY,
            operator: crate::ca::DEFAULT_OPERATOR_VALIDITY,
        }
    }
}

/// `[enroll]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollSettings {
    /// Nonce lifetime. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub nonce_ttl: Duration,
    /// Default token lifetime (`token create --ttl` overrides). Default 24 h.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Overlap after renewal. Default 24 h.
    #[serde(with = "humantime_serde")]
    pub renewal_overlap: Duration,
    /// How often `serve` removes previous certificates whose overlap ended. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub overlap_sweep: Duration,
}

impl Default for EnrollSettings {
    fn default() -> Self {
        Self {
            nonce_ttl: DEFAULT_NONCE_TTL,
            token_ttl: DEFAULT_TOKEN_TTL,
            renewal_overlap: DEFAULT_RENEWAL_OVERLAP,
            overlap_sweep: Duration::from_secs(30),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            trust_domain: String::new(),
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().expect("valid default"),
            database_url: None,
            brokers: Vec::new(),
            dns_names: vec!["localhost".into()],
            ips: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
            enroll: EnrollSettings::default(),
            proofs: crate::proof::ProofSettings::default(),
            trust: crate::trust::TrustSettings::default(),
            certificates: CertificateSettings::default(),
            http: HttpSettings::default(),
            audit: AuditSettings::default(),
            shutdown: ShutdownSettings::default(),
        }
    }
}

/// A config that cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Cannot read or write the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A field is invalid.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl ControlConfig {
    /// Read `DATA_DIR/control.toml`.
    pub fn load(data_dir: &Path) -> Result<ControlConfig, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let cfg: ControlConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Write `DATA_DIR/control.toml`.
    pub fn save(&self, data_dir: &Path) -> Result<(), ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, format!("# Tether control configuration.\n{text}"))
            .map_err(|source| ConfigError::Io { path, source })
    }

    /// The database URL in force.
    pub fn database_url(&self, data_dir: &Path) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("control.db").display()
            )
        })
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = tether_identity::TrustDomain::new(&self.trust_domain) {
            return Err(ConfigError::Invalid {
                field: "trust_domain",
                reason: e.to_string(),
            });
        }
        self.proofs.aws.validate()?;
        self.proofs.gcp.validate()?;
        self.proofs.k8s.validate()?;
        if self.trust.renewal_due > self.trust.renewal_recommended {
            return Err(ConfigError::Invalid {
                field: "trust.renewal_due",
                reason: "must not be longer than trust.renewal_recommended".into(),
            });
        }
        if self.http.header_read_timeout.is_zero()
            || self.http.request_timeout.is_zero()
            || self.http.max_connections == 0
        {
            return Err(ConfigError::Invalid {
                field: "http",
                reason: "timeouts and max_connections must be positive".into(),
            });
        }
        if self.http.public_rate_per_sec > 0 && self.http.public_burst == 0 {
            return Err(ConfigError::Invalid {
                field: "http.public_burst",
                reason: "must be at least 1 while http.public_rate_per_sec is not 0".into(),
            });
        }
        if self.enroll.overlap_sweep.is_zero() {
            return Err(ConfigError::Invalid {
                field: "enroll.overlap_sweep",
                reason: "must be positive".into(),
            });
        }
        if self.audit.checkpoint_every < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                field: "audit.checkpoint_every",
                reason: "must be at least 1s".into(),
            });
        }
        if self.enroll.nonce_ttl.is_zero() {
            return Err(ConfigError::Invalid {
                field: "enroll.nonce_ttl",
                reason: "must be positive".into(),
            });
        }
        if self.shutdown.grace > MAX_SHUTDOWN_GRACE {
            return Err(ConfigError::Invalid {
                field: "shutdown.grace",
                reason: "must be at most 10m".into(),
            });
        }
        Ok(())
    }
}
