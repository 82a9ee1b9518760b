//! Control configuration: `DATA_DIR/control.toml`, written by `tether-control init` and
//! read by every other command; flags and `TETHER_CONTROL_*` variables override it.
//!
//! This is top-level wiring: each layer declares its own settings (`[enroll]`, `[trust]`,
//! `[proofs]`, `[certificates]` and `[audit]` in [`crate::domain`]; `[http]` and
//! `[shutdown]` in [`crate::http`]) and [`ControlConfig`] composes them into one file.
//! No layer imports this module.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::audit::AuditSettings;
use crate::domain::ca::{CaConfig, CertificateSettings};
use crate::domain::enroll::EnrollSettings;
use crate::domain::proof::ProofSettings;
use crate::domain::trust::TrustSettings;
use crate::domain::{InvalidSetting, Settings};
use crate::http::{HttpSettings, ShutdownSettings, MAX_SHUTDOWN_GRACE};

/// File name of the config inside the data directory.
pub const CONFIG_FILE: &str = "control.toml";
/// Default HTTPS listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// Default metrics listen address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:8444";

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
    /// The web console's listen address (`[console] listen`).
    pub const CONSOLE_LISTEN: &str = "TETHER_CONTROL_CONSOLE_LISTEN";
    /// The web console's origin (`[console] origin`).
    pub const CONSOLE_ORIGIN: &str = "TETHER_CONTROL_CONSOLE_ORIGIN";
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
    pub proofs: ProofSettings,
    /// Trust-state thresholds.
    pub trust: TrustSettings,
    /// Validity of the certificates control issues.
    pub certificates: CertificateSettings,
    /// Limits of the HTTPS listener.
    pub http: HttpSettings,
    /// Signed checkpoints of the audit log.
    pub audit: AuditSettings,
    /// How `serve` stops on SIGTERM.
    pub shutdown: ShutdownSettings,
    /// This replica among several sharing one database.
    pub replica: crate::domain::replica::ReplicaSettings,
    /// The operators' web console (off unless `listen` is set).
    pub console: crate::console::ConsoleSettings,
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
            proofs: ProofSettings::default(),
            trust: TrustSettings::default(),
            certificates: CertificateSettings::default(),
            http: HttpSettings::default(),
            audit: AuditSettings::default(),
            shutdown: ShutdownSettings::default(),
            replica: Default::default(),
            console: Default::default(),
        }
    }
}

impl From<InvalidSetting> for ConfigError {
    fn from(e: InvalidSetting) -> ConfigError {
        ConfigError::Invalid {
            field: e.field,
            reason: e.reason,
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
        ControlConfig::parse(&text, &path)
    }

    /// Parse and validate the text of a `control.toml`; `path` only names the file in
    /// errors. What [`ControlConfig::load`] does after reading the file (and the entry
    /// point of the `control_config` fuzz target).
    pub fn parse(text: &str, path: &Path) -> Result<ControlConfig, ConfigError> {
        let cfg: ControlConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
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

    /// The CA settings of this config.
    pub fn ca_config(&self) -> CaConfig {
        CaConfig {
            trust_domain: self.trust_domain.clone(),
            control_dns_names: self.dns_names.clone(),
            control_ips: self.ips.clone(),
            appliance_validity: self.certificates.appliance,
            broker_validity: self.certificates.broker,
            operator_validity: self.certificates.operator,
            ..CaConfig::default()
        }
    }

    /// Control's URL as configured: `https://<first DNS name, else first IP>:<listen
    /// port>`.
    pub fn control_url(&self) -> String {
        let port = self.listen.port();
        match (self.dns_names.first(), self.ips.first()) {
            (Some(dns), _) => format!("https://{dns}:{port}"),
            (None, Some(IpAddr::V6(ip))) => format!("https://[{ip}]:{port}"),
            (None, Some(ip)) => format!("https://{ip}:{port}"),
            (None, None) => format!("https://{}", self.listen),
        }
    }

    /// The settings of the domain's operations.
    pub fn domain_settings(&self) -> Settings {
        Settings {
            enroll: self.enroll.clone(),
            trust: self.trust.clone(),
            brokers: self.brokers.clone(),
            control_url: self.control_url(),
        }
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
        if self.trust.allowlist_history == 0 {
            return Err(ConfigError::Invalid {
                field: "trust.allowlist_history",
                reason: "must be at least 1".into(),
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
        if self.audit.archive_keep == 0 {
            return Err(ConfigError::Invalid {
                field: "audit.archive_keep",
                reason: "must be at least 1".into(),
            });
        }
        if self.audit.archive_every < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                field: "audit.archive_every",
                reason: "must be at least 1s".into(),
            });
        }
        if self.replica.abandon_commands_every.is_zero() {
            return Err(ConfigError::Invalid {
                field: "replica.abandon_commands_every",
                reason: "must be positive".into(),
            });
        }
        if self.replica.lost_after <= crate::domain::replica::HEARTBEAT_EVERY {
            return Err(ConfigError::Invalid {
                field: "replica.lost_after",
                reason: format!(
                    "must be longer than the heartbeat interval ({:?})",
                    crate::domain::replica::HEARTBEAT_EVERY
                ),
            });
        }
        if self.enroll.nonce_ttl.is_zero() {
            return Err(ConfigError::Invalid {
                field: "enroll.nonce_ttl",
                reason: "must be positive".into(),
            });
        }
        self.console.validate()?;
        if self.shutdown.grace > MAX_SHUTDOWN_GRACE {
            return Err(ConfigError::Invalid {
                field: "shutdown.grace",
                reason: "must be at most 10m".into(),
            });
        }
        Ok(())
    }
}
