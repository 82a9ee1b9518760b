//! Agent settings: every tunable with its default as a named constant, `#[serde(default)]`
//! for the TOML file, and a [`AgentConfig::validate`] that names the bad field.
//!
//! Durations are written in the TOML file as humantime strings (`"500ms"`, `"30s"`,
//! `"5m"`). The `tether-agent` binary layers command-line flags and `TETHER_AGENT_*`
//! environment variables (names below) over the file.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default for [`AgentConfig::max_concurrent_commands`]: 4 commands at once.
pub const DEFAULT_MAX_CONCURRENT_COMMANDS: usize = 4;
/// Default for [`AgentConfig::allow_shell`]: shell commands are refused.
pub const DEFAULT_ALLOW_SHELL: bool = false;
/// Default for [`AgentConfig::output_chunk_bytes`]: 16 KiB per output frame.
pub const DEFAULT_OUTPUT_CHUNK_BYTES: usize = 16 * 1024;
/// Default for [`AgentConfig::max_frame_len`]: the protocol default (64 KiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = tether_proto::DEFAULT_MAX_FRAME_LEN;
/// Default for [`AgentConfig::backoff_initial`]: 500 ms.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Default for [`AgentConfig::backoff_max`]: 30 s.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default for [`AgentConfig::revoked_backoff`]: 5 min.
pub const DEFAULT_REVOKED_BACKOFF: Duration = Duration::from_secs(5 * 60);
/// Default for [`AgentConfig::connect_timeout`]: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`AgentConfig::quic_fallback_after`]: 3 s.
pub const DEFAULT_QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// Default for [`AgentConfig::quic_retry_every`]: 5 min.
pub const DEFAULT_QUIC_RETRY_EVERY: Duration = Duration::from_secs(300);
/// Environment variable setting [`AgentConfig::transport`].
pub const ENV_TRANSPORT: &str = "TETHER_AGENT_TRANSPORT";

/// How the agent reaches its brokers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC first; TLS over TCP when no QUIC handshake completes within
    /// [`AgentConfig::quic_fallback_after`], remembered, with QUIC tried again now and
    /// then ([`AgentConfig::quic_retry_every`]) and the session moved back once it works.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only (through the egress proxy, if one is set).
    Tcp,
}

impl TransportMode {
    /// Its name: `auto`, `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportMode::Auto => "auto",
            TransportMode::Quic => "quic",
            TransportMode::Tcp => "tcp",
        }
    }
}

impl std::str::FromStr for TransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TransportMode::Auto),
            "quic" => Ok(TransportMode::Quic),
            "tcp" => Ok(TransportMode::Tcp),
            other => Err(format!("unknown transport {other:?} (auto, quic or tcp)")),
        }
    }
}

/// Most commands an agent may be configured to run at once.
pub const MAX_MAX_CONCURRENT_COMMANDS: usize = 1024;
/// Largest frame limit an agent may be configured with: 16 MiB.
pub const MAX_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Environment variable overriding the state directory.
pub const ENV_STATE_DIR: &str = "TETHER_AGENT_STATE_DIR";
/// Environment variable overriding the broker list (comma-separated `HOST:PORT`).
pub const ENV_BROKERS: &str = "TETHER_AGENT_BROKERS";
/// Environment variable naming the TOML config file.
pub const ENV_CONFIG: &str = "TETHER_AGENT_CONFIG";
/// Environment variable selecting the log format (`text` or `json`).
pub const ENV_LOG_FORMAT: &str = "TETHER_AGENT_LOG_FORMAT";
/// Environment variable overriding [`AgentConfig::max_concurrent_commands`].
pub const ENV_MAX_CONCURRENT_COMMANDS: &str = "TETHER_AGENT_MAX_CONCURRENT_COMMANDS";
/// Environment variable overriding [`AgentConfig::allow_shell`].
pub const ENV_ALLOW_SHELL: &str = "TETHER_AGENT_ALLOW_SHELL";
/// Environment variable overriding [`AgentConfig::output_chunk_bytes`].
pub const ENV_OUTPUT_CHUNK_BYTES: &str = "TETHER_AGENT_OUTPUT_CHUNK_BYTES";
/// Environment variable overriding [`AgentConfig::max_frame_len`].
pub const ENV_MAX_FRAME_LEN: &str = "TETHER_AGENT_MAX_FRAME_LEN";
/// Environment variable overriding [`AgentConfig::backoff_initial`].
pub const ENV_BACKOFF_INITIAL: &str = "TETHER_AGENT_BACKOFF_INITIAL";
/// Environment variable overriding [`AgentConfig::backoff_max`].
pub const ENV_BACKOFF_MAX: &str = "TETHER_AGENT_BACKOFF_MAX";
/// Environment variable overriding [`AgentConfig::revoked_backoff`].
pub const ENV_REVOKED_BACKOFF: &str = "TETHER_AGENT_REVOKED_BACKOFF";
/// Environment variable overriding [`AgentConfig::connect_timeout`].
pub const ENV_CONNECT_TIMEOUT: &str = "TETHER_AGENT_CONNECT_TIMEOUT";
/// Environment variable setting [`AgentConfig::customer_dir`].
pub const ENV_CUSTOMER_DIR: &str = "TETHER_AGENT_CUSTOMER_DIR";
/// Environment variable setting [`AgentConfig::audit_log`].
pub const ENV_AUDIT_LOG: &str = "TETHER_AGENT_AUDIT_LOG";
/// Environment variable giving the egress proxy URL, as `--proxy` (wins over
/// `HTTPS_PROXY`; see [`crate::proxy`]).
pub const ENV_PROXY: &str = "TETHER_AGENT_PROXY";

/// Tunables of one agent. Construct with `AgentConfig::default()` and override fields.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Commands run at once; a request over the limit is answered `Failed{Busy}`.
    /// Default [`DEFAULT_MAX_CONCURRENT_COMMANDS`] (4); 1 to [`MAX_MAX_CONCURRENT_COMMANDS`].
    pub max_concurrent_commands: usize,
    /// Whether `CommandKind::Shell` requests (run through `/bin/sh -c`) are accepted.
    /// Default [`DEFAULT_ALLOW_SHELL`] (false).
    pub allow_shell: bool,
    /// Largest chunk of command output per `CommandOutput` frame, in bytes (also capped by
    /// what fits in `max_frame_len` and in the broker's limit announced in `Welcome`).
    /// Default [`DEFAULT_OUTPUT_CHUNK_BYTES`] (16 KiB).
    pub output_chunk_bytes: usize,
    /// Hard maximum of one received or sent frame, in bytes (frames sent are also kept
    /// within the broker's limit announced in `Welcome`). Default
    /// [`DEFAULT_MAX_FRAME_LEN`] (64 KiB); from [`tether_proto::MIN_MAX_FRAME_LEN`] to
    /// [`MAX_MAX_FRAME_LEN`].
    pub max_frame_len: usize,
    /// Upper bound of the first reconnect delay; doubles per failed attempt (full jitter).
    /// Default [`DEFAULT_BACKOFF_INITIAL`] (500 ms).
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Cap of the reconnect delay. Default [`DEFAULT_BACKOFF_MAX`] (30 s).
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Delay after a broker refused the certificate (revoked, unauthorized, TLS alert).
    /// Default [`DEFAULT_REVOKED_BACKOFF`] (5 min).
    #[serde(with = "humantime_serde")]
    pub revoked_backoff: Duration,
    /// Time allowed for the QUIC handshake, and then for the broker's `Welcome`.
    /// Default [`DEFAULT_CONNECT_TIMEOUT`] (10 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How the agent reaches brokers: `auto` (default), `quic` or `tcp`.
    pub transport: TransportMode,
    /// `auto`: how long a QUIC handshake may take before TLS over TCP is tried. Default
    /// [`DEFAULT_QUIC_FALLBACK_AFTER`] (3 s).
    #[serde(with = "humantime_serde")]
    pub quic_fallback_after: Duration,
    /// `auto`, on TCP: how often QUIC is tried again. Default
    /// [`DEFAULT_QUIC_RETRY_EVERY`] (5 min).
    #[serde(with = "humantime_serde")]
    pub quic_retry_every: Duration,
    /// Signed operations: the customer-owned directory with `approvers.toml` and
    /// `policy.toml`. Set, every command is decided by the customer's policy and signed
    /// approvals, and the agent announces `signed-ops/1`. Default: none (unsigned mode).
    pub customer_dir: Option<std::path::PathBuf>,
    /// Signed operations: the appliance audit log. Default `<state_dir>/audit.jsonl`.
    pub audit_log: Option<std::path::PathBuf>,
    /// Egress: how to reach control (renewal, re-enrollment) and brokers over TCP — direct,
    /// or through an HTTP proxy. Not read from the TOML file: `tether-agent run` sets it
    /// from `--proxy`, `HTTPS_PROXY` and `NO_PROXY`. Default: direct.
    #[serde(skip)]
    pub proxy: crate::proxy::ProxyConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_concurrent_commands: DEFAULT_MAX_CONCURRENT_COMMANDS,
            allow_shell: DEFAULT_ALLOW_SHELL,
            output_chunk_bytes: DEFAULT_OUTPUT_CHUNK_BYTES,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            revoked_backoff: DEFAULT_REVOKED_BACKOFF,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            transport: TransportMode::Auto,
            quic_fallback_after: DEFAULT_QUIC_FALLBACK_AFTER,
            quic_retry_every: DEFAULT_QUIC_RETRY_EVERY,
            customer_dir: None,
            audit_log: None,
            proxy: crate::proxy::ProxyConfig::direct(),
        }
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructure so that a new field cannot be forgotten here.
        let Self {
            max_concurrent_commands,
            allow_shell,
            output_chunk_bytes,
            max_frame_len,
            backoff_initial,
            backoff_max,
            revoked_backoff,
            connect_timeout,
            transport,
            quic_fallback_after,
            quic_retry_every,
            customer_dir,
            audit_log,
            proxy,
        } = self;
        f.debug_struct("AgentConfig")
            .field("max_concurrent_commands", max_concurrent_commands)
            .field("allow_shell", allow_shell)
            .field("output_chunk_bytes", output_chunk_bytes)
            .field("max_frame_len", max_frame_len)
            .field("backoff_initial", backoff_initial)
            .field("backoff_max", backoff_max)
            .field("revoked_backoff", revoked_backoff)
            .field("connect_timeout", connect_timeout)
            .field("transport", transport)
            .field("quic_fallback_after", quic_fallback_after)
            .field("quic_retry_every", quic_retry_every)
            .field("customer_dir", customer_dir)
            .field("audit_log", audit_log)
            .field("proxy", &format_args!("{proxy}"))
            .finish()
    }
}

/// A configuration value is out of range. Fix the named field; retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The field's value is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The config field (as spelled in the TOML file).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl AgentConfig {
    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_commands == 0
            || self.max_concurrent_commands > MAX_MAX_CONCURRENT_COMMANDS
        {
            return Err(invalid(
                "max_concurrent_commands",
                format!("must be between 1 and {MAX_MAX_CONCURRENT_COMMANDS}"),
            ));
        }
        if self.max_frame_len < tether_proto::MIN_MAX_FRAME_LEN
            || self.max_frame_len > MAX_MAX_FRAME_LEN
        {
            return Err(invalid(
                "max_frame_len",
                format!(
                    "must be between {} and {MAX_MAX_FRAME_LEN} bytes",
                    tether_proto::MIN_MAX_FRAME_LEN
                ),
            ));
        }
        if self.output_chunk_bytes == 0 {
            return Err(invalid("output_chunk_bytes", "must be at least 1 byte"));
        }
        if self.backoff_initial.is_zero() {
            return Err(invalid("backoff_initial", "must be greater than zero"));
        }
        if self.backoff_max < self.backoff_initial {
            return Err(invalid("backoff_max", "must be at least backoff_initial"));
        }
        if self.revoked_backoff.is_zero() {
            return Err(invalid("revoked_backoff", "must be greater than zero"));
        }
        if self.quic_fallback_after.is_zero() {
            return Err(invalid("quic_fallback_after", "must be greater than zero"));
        }
        if self.quic_retry_every < Duration::from_secs(1) {
            return Err(invalid("quic_retry_every", "must be at least 1s"));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be greater than zero"));
        }
        Ok(())
    }

    /// Largest output chunk that fits both `output_chunk_bytes` and one frame.
    pub fn effective_output_chunk(&self) -> usize {
        self.output_chunk_bytes
            .min(self.max_frame_len.saturating_sub(COMMAND_OUTPUT_OVERHEAD))
            .max(1)
    }
}

/// The `tether-agent` TOML file: `state_dir`, `brokers`, `log_format`, plus every
/// [`AgentConfig`] field at top level. Unknown keys are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// Directory holding the credential files.
    pub state_dir: Option<std::path::PathBuf>,
    /// Brokers as `HOST:PORT` strings.
    pub brokers: Vec<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// The agent tunables.
    pub agent: AgentConfig,
}

impl FileConfig {
    /// Parse the TOML text of a config file.
    pub fn from_toml(text: &str) -> Result<FileConfig, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            field: "config file",
            reason: e.message().to_owned(),
        })?;
        let state_dir = match table.remove("state_dir") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.into()),
            Some(_) => return Err(invalid("state_dir", "must be a string")),
        };
        let brokers = match table.remove("brokers") {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    _ => Err(invalid(
                        "brokers",
                        "must be a list of \"HOST:PORT\" strings",
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(invalid(
                    "brokers",
                    "must be a list of \"HOST:PORT\" strings",
                ))
            }
        };
        let log_format = match table.remove("log_format") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(_) => return Err(invalid("log_format", "must be \"text\" or \"json\"")),
        };
        let agent = AgentConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::Invalid {
                field: "config file",
                reason: e.message().to_owned(),
            }
        })?;
        Ok(FileConfig {
            state_dir,
            brokers,
            log_format,
            agent,
        })
    }
}

/// Bytes of a `CommandOutput` frame besides its data: type (1), command id (8), stream (1),
/// data length (4).
pub(crate) const COMMAND_OUTPUT_OVERHEAD: usize = tether_proto::frame::COMMAND_OUTPUT_OVERHEAD;

/// Serde for durations as humantime strings (`"500ms"`, `"30s"`).
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_named() {
        let cfg = AgentConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.max_concurrent_commands, 4);
        assert!(!cfg.allow_shell);
        assert_eq!(cfg.output_chunk_bytes, 16 * 1024);
        assert_eq!(cfg.backoff_initial, Duration::from_millis(500));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let cfg = AgentConfig {
            backoff_max: Duration::from_millis(1),
            ..AgentConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                field: "backoff_max",
                ..
            })
        ));
        let cfg = AgentConfig {
            max_frame_len: 10,
            ..AgentConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                field: "max_frame_len",
                ..
            })
        ));
        let cfg = AgentConfig {
            max_concurrent_commands: 0,
            ..AgentConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                field: "max_concurrent_commands",
                ..
            })
        ));
    }

    #[test]
    fn toml_uses_humantime_and_defaults() {
        let cfg: AgentConfig =
            toml::from_str("allow_shell = true\nbackoff_max = \"1m\"\n").expect("parse");
        assert!(cfg.allow_shell);
        assert_eq!(cfg.backoff_max, Duration::from_secs(60));
        assert_eq!(cfg.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(toml::from_str::<AgentConfig>("alow_shell = true").is_err());
    }

    #[test]
    fn file_config_splits_agent_fields() {
        let f = FileConfig::from_toml(
            "state_dir = \"/var/lib/tether\"\nbrokers = [\"b1:4433\", \"10.0.0.1:4433\"]\n\
             max_concurrent_commands = 2\nconnect_timeout = \"3s\"\n",
        )
        .expect("parse");
        assert_eq!(
            f.state_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/tether"))
        );
        assert_eq!(f.brokers.len(), 2);
        assert_eq!(f.agent.max_concurrent_commands, 2);
        assert_eq!(f.agent.connect_timeout, Duration::from_secs(3));
        assert!(FileConfig::from_toml("bogus = 1").is_err());
        assert!(matches!(
            FileConfig::from_toml("brokers = \"b1:1\""),
            Err(ConfigError::Invalid {
                field: "brokers",
                ..
            })
        ));
    }

    #[test]
    fn output_chunk_fits_in_a_frame() {
        let cfg = AgentConfig {
            output_chunk_bytes: 1 << 20,
            max_frame_len: 4096,
            ..AgentConfig::default()
        };
        assert_eq!(cfg.effective_output_chunk(), 4096 - COMMAND_OUTPUT_OVERHEAD);
    }
}
