//! Broker configuration: a TOML file, overridden by command-line flags and `TETHER_BROKER_*`
//! environment variables (flags win over the environment, which wins over the file).
//!
//! Relative paths in the file resolve against the file's folder. Durations are strings such
//! as `"15s"` or `"250ms"`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default admin listen address (loopback only).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7444";
/// Default heartbeat interval announced to agents: the protocol's default (25 s).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = tether_proto::session::DEFAULT_HEARTBEAT_INTERVAL;
/// Default time an agent has to open its session stream and send `Hello`.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default handshakes processed at once. Beyond this, new connections wait in the queue.
///
/// A handshake holds its permit across a round trip to a client that, in a storm, is busy
/// with its own handshakes, so the permits bound the rate at about permits / round trip.
/// QUIC storms of 5,000 appliances on 2 cores (simulator and broker sharing them), in A/B
/// sets: with 128, 0.78–1.12 of bare quinn's handshake rate (eleven runs, median 0.84;
/// Tether's own rate 1,514–1,723/s, median 1,604), the broker's CPU per connect a median
/// 1.12× bare quinn's, broker and simulator both idling between small batches; with
/// 2,048, 0.68–1.14 (eight runs, median 0.99; 1,840/s, one run of 1,022/s with the CPU a
/// third idle, unexplained) and 0.97×. More is not better: with 8,192 a 10,000 storm runs
/// every handshake at once, each takes longer than the clients wait, and the rate falls
/// to bare quinn's (810–870/s against 1,540–1,670/s with 2,048). 2,048 in flight at this
/// machine's ~1,600 handshakes/s is about 1.3 s per handshake, well inside the 10 s
/// handshake timeout.
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 2048;
/// Upper bound of `limits.max_concurrent_handshakes + limits.max_pending_handshakes`.
pub const MAX_ADMISSION_PLACES: usize = 1 << 20;
/// Default bound of the queue of connections waiting for a handshake slot; beyond it new
/// connections are refused at once (the agent backs off with jitter). A refused agent
/// backs off exponentially and may come back when the broker is idle, so the queue holds
/// what one core serves within [`DEFAULT_PENDING_TIMEOUT`] (~1,100 handshakes/s) and
/// more: a 10,000-appliance storm measured 225 handshakes/s with 2,048 queued for 3 s,
/// 1,086/s with 8,192 for 5 s.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 8192;
/// Default time a queued connection may wait for a slot before it is refused: inside the
/// agent's 10 s connect timeout with 2 s left for the handshake, so a connection served
/// late still completes. A refusal is pure waste when the client would have waited (it
/// backs off and does its whole handshake again, on the same cores in a storm): with 5 s a
/// 10,000-appliance TCP storm on 2 cores refused about 4,000 and reached 0.70, 0.85 and
/// 0.84 of bare TLS's handshake rate; with 8 s it refused about 2,000 and reached 0.96 and
/// 0.89.
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(8);
/// Default limit on one handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest command deadline the admin API accepts.
pub const DEFAULT_MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default drain time on SIGTERM before remaining sessions are closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default upper bound of the jittered reconnect delay sent in `GoAway`.
pub const DEFAULT_RECONNECT_JITTER: Duration = Duration::from_secs(5);
/// Default per-stream receive window (bytes): two maximum frames.
pub const DEFAULT_STREAM_RECEIVE_WINDOW: u32 = 128 * 1024;
/// Default per-connection receive window (bytes).
pub const DEFAULT_RECEIVE_WINDOW: u32 = 256 * 1024;
/// Default per-connection send buffer (bytes).
pub const DEFAULT_SEND_WINDOW: u64 = 256 * 1024;
/// Default UDP receive buffer requested from the kernel (bytes): 32 MiB.
pub const DEFAULT_UDP_RECV_BUFFER: usize = 32 * 1024 * 1024;
/// Default QUIC idle timeout; agents heartbeat well within it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of QUIC endpoints (UDP sockets on the listen address, one accept loop
/// each): one. A second did not raise the handshake rate on 2 cores: a 10,000-appliance
/// storm from 32 client sockets (so that `SO_REUSEPORT` spreads them) averaged 1,225
/// handshakes/s either way over seven alternating pairs (medians 1,157 and 1,218/s; pairs
/// from -15 % to +10 %), connect p99 median 8.0 s and 7.6 s, broker CPU 733 and 728 µs per
/// connect; load average 1.3-3.9. With one endpoint both tokio workers were already ~50 %
/// busy each and the machine ~4 % idle: the broker was short of CPU, not serialized
/// behind its endpoint.
pub const DEFAULT_ENDPOINTS: usize = 1;
/// Most QUIC endpoints `transport.endpoints` may ask for.
pub const MAX_ENDPOINTS: usize = 64;

/// Environment variable names, next to their defaults above.
pub mod env {
    /// Config file path.
    pub const CONFIG: &str = "TETHER_BROKER_CONFIG";
    /// `listen`.
    pub const LISTEN: &str = "TETHER_BROKER_LISTEN";
    /// `admin_listen`.
    pub const ADMIN_LISTEN: &str = "TETHER_BROKER_ADMIN_LISTEN";
    /// `trust_domain`.
    pub const TRUST_DOMAIN: &str = "TETHER_BROKER_TRUST_DOMAIN";
    /// `tls.ca`.
    pub const TLS_CA: &str = "TETHER_BROKER_TLS_CA";
    /// `tls.cert`.
    pub const TLS_CERT: &str = "TETHER_BROKER_TLS_CERT";
    /// `tls.key`.
    pub const TLS_KEY: &str = "TETHER_BROKER_TLS_KEY";
    /// `allowlist.file`.
    pub const ALLOWLIST_FILE: &str = "TETHER_BROKER_ALLOWLIST_FILE";
    /// `drain.timeout`.
    pub const DRAIN_TIMEOUT: &str = "TETHER_BROKER_DRAIN_TIMEOUT";
    /// `drain.reconnect_jitter`.
    pub const RECONNECT_JITTER: &str = "TETHER_BROKER_RECONNECT_JITTER";
    /// `session.heartbeat_interval`.
    pub const HEARTBEAT_INTERVAL: &str = "TETHER_BROKER_HEARTBEAT_INTERVAL";
    /// `control.data_dir`.
    pub const DATA_DIR: &str = "TETHER_BROKER_DATA_DIR";
    /// `control.bundle`.
    pub const BUNDLE: &str = "TETHER_BROKER_BUNDLE";
    /// `control.advertise`.
    pub const ADVERTISE: &str = "TETHER_BROKER_ADVERTISE";
    /// `transport.endpoints`.
    pub const ENDPOINTS: &str = "TETHER_BROKER_ENDPOINTS";
    /// `transport.tcp` (`true` or `false`).
    pub const TCP: &str = "TETHER_BROKER_TCP";
    /// `transport.tcp_listen`.
    pub const TCP_LISTEN: &str = "TETHER_BROKER_TCP_LISTEN";
    /// Log format, `text` or `json`.
    pub const LOG_FORMAT: &str = "TETHER_BROKER_LOG_FORMAT";
}

/// The whole broker configuration.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// QUIC (UDP) listen address. Default `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Admin HTTP listen address (`/metrics`, `/healthz`, `/v1/...`). Default
    /// `127.0.0.1:7444`; keep it on loopback or a management network.
    pub admin_listen: SocketAddr,
    /// SPIFFE trust domain of appliance identities. Required in standalone mode; in control
    /// mode it comes from the stored credential (if set, it must match).
    pub trust_domain: String,
    /// Certificates and keys.
    pub tls: TlsConfig,
    /// Where the allowlist comes from.
    pub allowlist: AllowlistConfig,
    /// Session protocol settings.
    pub session: SessionConfig,
    /// Admission control and limits.
    pub limits: LimitsConfig,
    /// Graceful shutdown.
    pub drain: DrainConfig,
    /// QUIC transport tuning.
    pub transport: TransportSettings,
    /// Control mode: the allowlist, the certificates and the trust domain come from
    /// control instead of files.
    pub control: ControlConfig,
}

/// `[control]`: set `data_dir` to run in control mode.
#[derive(Clone, Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Folder of the broker's credential and cached allowlist (created if missing). Setting
    /// it selects control mode, where `tls.*` and `allowlist.file` are not used. No
    /// default.
    pub data_dir: Option<PathBuf>,
    /// One-time bundle from `tether broker add NAME`, used to enroll when `data_dir` holds
    /// no credential yet (ignored, with a log line, once it does). No default.
    pub bundle: Option<PathBuf>,
    /// `host:port` agents reach this broker at, reported to control. Default: the bound
    /// QUIC address, with an unspecified IP (`0.0.0.0`, `::`) replaced by `127.0.0.1`.
    pub advertise: Option<String>,
}
/// `[tls]`
#[derive(Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of the CA certificates appliance certificates chain to (root and
    /// intermediates). Required.
    pub ca: PathBuf,
    /// PEM chain of the broker's own certificate (leaf first). Required.
    pub cert: PathBuf,
    /// PEM private key of the broker's certificate (PKCS#8, SEC1 or PKCS#1). Required.
    pub key: PathBuf,
}

/// `[allowlist]`
#[derive(Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AllowlistConfig {
    /// Text file of `<appliance-id> <sha256-hex>` lines, reloaded on change and SIGHUP.
    pub file: Option<PathBuf>,
}

/// `[session]`
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Heartbeat interval announced to agents; a session is idle after three are missed.
    /// Default 15 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Time to open the session stream and send `Hello`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Largest frame accepted or sent, in bytes. Default 65536.
    pub max_frame_len: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            max_frame_len: tether_proto::DEFAULT_MAX_FRAME_LEN,
        }
    }
}

/// `[limits]`
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Handshakes processed at once. Default 128.
    pub max_concurrent_handshakes: usize,
    /// Connections that may wait for a handshake slot; beyond it they are refused.
    /// Default 8192.
    pub max_pending_handshakes: usize,
    /// Longest wait in that queue. Default 8 s.
    #[serde(with = "humantime_serde")]
    pub pending_timeout: Duration,
    /// Longest handshake. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Longest command deadline accepted by the admin API. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub max_command_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            pending_timeout: DEFAULT_PENDING_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_command_timeout: DEFAULT_MAX_COMMAND_TIMEOUT,
        }
    }
}

/// `[drain]`
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// After SIGTERM, how long sessions get to leave after `GoAway`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `GoAway` tells each agent to reconnect after a random delay in `[0, this]`, so a
    /// drained broker's fleet does not land on the others at once. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_jitter: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_DRAIN_TIMEOUT,
            reconnect_jitter: DEFAULT_RECONNECT_JITTER,
        }
    }
}

/// `[transport]`: QUIC settings sized for small control traffic.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    /// Per-stream receive window, bytes. Default 131072.
    pub stream_receive_window: u32,
    /// Per-connection receive window, bytes. Default 262144.
    pub receive_window: u32,
    /// Per-connection send buffer, bytes. Default 262144.
    pub send_window: u64,
    /// UDP receive buffer to request, bytes. Default 32 MiB; the kernel caps it at
    /// `net.core.rmem_max` (raise that sysctl to get it).
    pub udp_recv_buffer: usize,
    /// QUIC idle timeout. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Use UDP generic segmentation offload (GSO) to send bursts in one syscall. Off by
    /// default: it makes every connection keep a ~13 KB send buffer. Default false.
    pub segmentation_offload: bool,
    /// QUIC endpoints serving the listen address, each a UDP socket with its own quinn
    /// endpoint and accept loop; the admission limits (`[limits]`) stay global. Above 1 the
    /// sockets share the port with `SO_REUSEPORT` (Linux only) and the kernel spreads
    /// clients over them by a hash of the client's address and port (a few client addresses
    /// may all land on one endpoint). On 2 cores a second endpoint measured no faster (see
    /// [`DEFAULT_ENDPOINTS`]); try it where the broker has cores to spare. Each socket gets
    /// its own `udp_recv_buffer`. A client whose address changes mid-connection (NAT
    /// rebinding) may reach another endpoint, which resets the connection, and the agent
    /// reconnects. Any process of the same user may join the port with `SO_REUSEPORT` too.
    /// Default 1, at most 64.
    pub endpoints: usize,
    /// Serve TLS over TCP beside QUIC, for networks that drop UDP or allow egress only
    /// through an HTTP proxy: the same certificates, verifier, ALPN and protocol, streams
    /// multiplexed by yamux (`docs/PROTOCOL.md` §13). Default true.
    pub tcp: bool,
    /// Where TCP listens when it is on. Default: the `listen` address (the same port
    /// number over TCP).
    pub tcp_listen: Option<SocketAddr>,
}

impl TransportSettings {
    /// The TCP address to serve, if TCP is on.
    pub fn tcp_addr(&self, listen: SocketAddr) -> Option<SocketAddr> {
        self.tcp.then(|| self.tcp_listen.unwrap_or(listen))
    }
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            stream_receive_window: DEFAULT_STREAM_RECEIVE_WINDOW,
            receive_window: DEFAULT_RECEIVE_WINDOW,
            send_window: DEFAULT_SEND_WINDOW,
            udp_recv_buffer: DEFAULT_UDP_RECV_BUFFER,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            segmentation_offload: false,
            endpoints: DEFAULT_ENDPOINTS,
            tcp: true,
            tcp_listen: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            trust_domain: String::new(),
            tls: TlsConfig::default(),
            allowlist: AllowlistConfig::default(),
            session: SessionConfig::default(),
            limits: LimitsConfig::default(),
            drain: DrainConfig::default(),
            transport: TransportSettings::default(),
            control: ControlConfig::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            listen,
            admin_listen,
            trust_domain,
            tls,
            allowlist,
            session,
            limits,
            drain,
            transport,
            control,
        } = self;
        let TlsConfig { ca, cert, key } = tls;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("admin_listen", admin_listen)
            .field("trust_domain", trust_domain)
            .field("tls.ca", ca)
            .field("tls.cert", cert)
            .field("tls.key", key)
            .field("allowlist.file", &allowlist.file)
            .field("session.heartbeat_interval", &session.heartbeat_interval)
            .field("session.hello_timeout", &session.hello_timeout)
            .field("session.max_frame_len", &session.max_frame_len)
            .field(
                "limits.max_concurrent_handshakes",
                &limits.max_concurrent_handshakes,
            )
            .field(
                "limits.max_pending_handshakes",
                &limits.max_pending_handshakes,
            )
            .field("limits.pending_timeout", &limits.pending_timeout)
            .field("limits.handshake_timeout", &limits.handshake_timeout)
            .field("limits.max_command_timeout", &limits.max_command_timeout)
            .field("drain.timeout", &drain.timeout)
            .field("drain.reconnect_jitter", &drain.reconnect_jitter)
            .field(
                "transport.stream_receive_window",
                &transport.stream_receive_window,
            )
            .field("transport.receive_window", &transport.receive_window)
            .field("transport.send_window", &transport.send_window)
            .field("transport.udp_recv_buffer", &transport.udp_recv_buffer)
            .field("transport.idle_timeout", &transport.idle_timeout)
            .field(
                "transport.segmentation_offload",
                &transport.segmentation_offload,
            )
            .field("transport.endpoints", &transport.endpoints)
            .field("transport.tcp", &transport.tcp)
            .field("transport.tcp_listen", &transport.tcp_listen)
            .field("control.data_dir", &control.data_dir)
            .field("control.bundle", &control.bundle)
            .field("control.advertise", &control.advertise)
            .finish()
    }
}

/// A configuration that cannot be used. Names the field.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A field has an invalid value.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field, as written in the file.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Parse TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, base, path)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(f) = self.allowlist.file.as_mut() {
            fix(f);
        }
        if let Some(f) = self.control.data_dir.as_mut() {
            fix(f);
        }
        if let Some(f) = self.control.bundle.as_mut() {
            fix(f);
        }
    }

    /// Whether the broker runs in control mode (`control.data_dir` is set).
    pub fn control_mode(&self) -> bool {
        self.control.data_dir.is_some()
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.control_mode() {
            self.validate_control()?;
        } else {
            self.validate_standalone()?;
        }
        self.validate_common()
    }

    fn validate_control(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        if !self.trust_domain.is_empty()
            && !tether_identity::TrustDomain::is_valid(&self.trust_domain)
        {
            return Err(invalid(
                "trust_domain",
                "lowercase letters, digits, '.', '-', '_'",
            ));
        }
        let unused = "not used in control mode (the broker's certificate and CA come from control)";
        if !self.tls.ca.as_os_str().is_empty() {
            return Err(invalid("tls.ca", unused));
        }
        if !self.tls.cert.as_os_str().is_empty() {
            return Err(invalid("tls.cert", unused));
        }
        if !self.tls.key.as_os_str().is_empty() {
            return Err(invalid("tls.key", unused));
        }
        if self.allowlist.file.is_some() {
            return Err(invalid(
                "allowlist.file",
                "not used in control mode (control is the allowlist's source)",
            ));
        }
        if let Some(a) = &self.control.advertise {
            if !valid_host_port(a) {
                return Err(invalid("control.advertise", "must be host:port"));
            }
        }
        Ok(())
    }

    fn validate_standalone(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        if self.control.bundle.is_some() {
            return Err(invalid(
                "control.bundle",
                "needs control.data_dir (--data-dir), where the credential is stored",
            ));
        }
        if self.control.advertise.is_some() {
            return Err(invalid(
                "control.advertise",
                "needs control.data_dir (--data-dir)",
            ));
        }
        if !tether_identity::TrustDomain::is_valid(&self.trust_domain) {
            return Err(invalid(
                "trust_domain",
                "required; lowercase letters, digits, '.', '-', '_'",
            ));
        }
        if self.tls.ca.as_os_str().is_empty() {
            return Err(invalid("tls.ca", "required"));
        }
        if self.tls.cert.as_os_str().is_empty() {
            return Err(invalid("tls.cert", "required"));
        }
        if self.tls.key.as_os_str().is_empty() {
            return Err(invalid("tls.key", "required"));
        }
        if self.allowlist.file.is_none() {
            return Err(invalid(
                "allowlist.file",
                "required (the standalone broker admits only pinned certificates)",
            ));
        }
        Ok(())
    }

    fn validate_common(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        if self.session.heartbeat_interval < Duration::from_millis(100) {
            return Err(invalid(
                "session.heartbeat_interval",
                "must be at least 100ms",
            ));
        }
        if self.session.max_frame_len < tether_proto::MIN_MAX_FRAME_LEN
            || self.session.max_frame_len > 16 * 1024 * 1024
        {
            return Err(invalid(
                "session.max_frame_len",
                "must be between 1024 and 16777216 bytes",
            ));
        }
        if self.limits.max_concurrent_handshakes == 0 {
            return Err(invalid(
                "limits.max_concurrent_handshakes",
                "must be at least 1",
            ));
        }
        if self
            .limits
            .max_concurrent_handshakes
            .saturating_add(self.limits.max_pending_handshakes)
            > MAX_ADMISSION_PLACES
        {
            return Err(invalid(
                "limits.max_pending_handshakes",
                "together with limits.max_concurrent_handshakes at most 1048576",
            ));
        }
        if (self.transport.stream_receive_window as usize) < self.session.max_frame_len {
            return Err(invalid(
                "transport.stream_receive_window",
                "must be at least session.max_frame_len",
            ));
        }
        if self.transport.receive_window < self.transport.stream_receive_window {
            return Err(invalid(
                "transport.receive_window",
                "must be at least transport.stream_receive_window",
            ));
        }
        if self.transport.idle_timeout <= self.session.heartbeat_interval {
            return Err(invalid(
                "transport.idle_timeout",
                "must be longer than session.heartbeat_interval",
            ));
        }
        if self.transport.endpoints == 0 || self.transport.endpoints > MAX_ENDPOINTS {
            return Err(invalid(
                "transport.endpoints",
                &format!("must be between 1 and {MAX_ENDPOINTS}"),
            ));
        }
        if self.transport.endpoints > 1 && !cfg!(target_os = "linux") {
            return Err(invalid(
                "transport.endpoints",
                "above 1 needs Linux (SO_REUSEPORT spreads UDP clients over sockets only there)",
            ));
        }
        Ok(())
    }
}

/// `host:port` with a non-empty host (an IPv6 host in brackets) and a valid port.
pub fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_file_folder() {
        let text = r#"
            listen = "127.0.0.1:7443"
            admin_listen = "127.0.0.1:7444"
            trust_domain = "example.test"
            [tls]
            ca = "ca.pem"
            cert = "/abs/broker.pem"
            key = "broker.key"
            [allowlist]
            file = "allowlist.txt"
            [session]
            heartbeat_interval = "2s"
        "#;
        let cfg = Config::from_toml(text, Path::new("/etc/tether"), Path::new("x")).unwrap();
        assert_eq!(cfg.tls.ca, Path::new("/etc/tether/ca.pem"));
        assert_eq!(cfg.tls.cert, Path::new("/abs/broker.pem"));
        assert_eq!(
            cfg.allowlist.file.as_deref(),
            Some(Path::new("/etc/tether/allowlist.txt"))
        );
        assert_eq!(cfg.session.heartbeat_interval, Duration::from_secs(2));
        cfg.validate().unwrap();
    }

    #[test]
    fn validate_names_the_field() {
        let cfg = Config::default();
        let err = cfg.validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                field: "trust_domain",
                ..
            }
        ));
        let text = "trust_domain = \"t\"\nbogus = 1\n";
        let err = Config::from_toml(text, Path::new("."), Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn admission_places_are_bounded() {
        let base = "listen = \"127.0.0.1:7443\"\ntrust_domain = \"t\"\n[tls]\nca = \"ca.pem\"\n\
                    cert = \"b.pem\"\nkey = \"b.key\"\n[allowlist]\nfile = \"a.txt\"\n[limits]\n";
        let parse = |limits: &str| {
            Config::from_toml(
                &format!("{base}{limits}"),
                Path::new("/etc"),
                Path::new("x"),
            )
            .unwrap()
            .validate()
        };
        parse("max_concurrent_handshakes = 2048\nmax_pending_handshakes = 8192\n").unwrap();
        let huge = format!("max_pending_handshakes = {}\n", i64::MAX);
        for limits in [huge.as_str(), "max_concurrent_handshakes = 1048576\n"] {
            let err = parse(limits).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        field: "limits.max_pending_handshakes",
                        ..
                    }
                ),
                "{limits}: {err}"
            );
        }
    }

    #[test]
    fn control_mode_needs_no_files_and_refuses_them() {
        let text = r#"
            [control]
            data_dir = "state"
            bundle = "bundle.json"
            advertise = "edge-1.example.test:7443"
        "#;
        let cfg = Config::from_toml(text, Path::new("/etc/tether"), Path::new("x")).unwrap();
        assert!(cfg.control_mode());
        assert_eq!(
            cfg.control.data_dir.as_deref(),
            Some(Path::new("/etc/tether/state"))
        );
        assert_eq!(
            cfg.control.bundle.as_deref(),
            Some(Path::new("/etc/tether/bundle.json"))
        );
        cfg.validate().unwrap();
        let mut with_file = cfg.clone();
        with_file.allowlist.file = Some("a.txt".into());
        assert!(matches!(
            with_file.validate(),
            Err(ConfigError::Invalid {
                field: "allowlist.file",
                ..
            })
        ));
        let mut with_cert = cfg.clone();
        with_cert.tls.cert = "c.pem".into();
        assert!(matches!(
            with_cert.validate(),
            Err(ConfigError::Invalid {
                field: "tls.cert",
                ..
            })
        ));
        let mut bad = cfg;
        bad.control.advertise = Some("no-port".into());
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                field: "control.advertise",
                ..
            })
        ));
    }

    #[test]
    fn endpoints_default_to_one_and_are_bounded() {
        let base = "trust_domain = \"t\"\n[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
                    [allowlist]\nfile = \"a\"\n";
        let cfg = Config::from_toml(base, Path::new("."), Path::new("x")).unwrap();
        assert_eq!(cfg.transport.endpoints, DEFAULT_ENDPOINTS);
        cfg.validate().unwrap();
        let two = format!("{base}[transport]\nendpoints = 2\n");
        let cfg = Config::from_toml(&two, Path::new("."), Path::new("x")).unwrap();
        assert_eq!(cfg.transport.endpoints, 2);
        if cfg!(target_os = "linux") {
            cfg.validate().unwrap();
        }
        for bad in [0, MAX_ENDPOINTS + 1] {
            let mut cfg = cfg.clone();
            cfg.transport.endpoints = bad;
            assert!(matches!(
                cfg.validate(),
                Err(ConfigError::Invalid {
                    field: "transport.endpoints",
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_bundle_without_a_data_dir_is_refused() {
        let text = "trust_domain = \"t\"\n[control]\nbundle = \"b.json\"\n";
        let cfg = Config::from_toml(text, Path::new("."), Path::new("x")).unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                field: "control.bundle",
                ..
            })
        ));
    }
}
