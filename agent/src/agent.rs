//! [`Agent`]: the connect / session / reconnect loop over a list of brokers.
//!
//! Brokers are tried in list order starting at a random index. Between attempts the agent
//! sleeps:
//!
//! - after a `GoAway`: the delay the broker asked for (spent on the old connection, which
//!   stays open until the session on the **next** broker is welcomed: make before break);
//! - after the broker refused the certificate ([`DisconnectReason::is_refusal`]):
//!   `revoked_backoff` (minus up to 20 % jitter), logged as an error;
//! - otherwise: full-jitter exponential backoff ([`Backoff`]), whose window is reset
//!   after a session that lasted at least [`STABLE_SESSION`].

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::command::CommandRunner;
use crate::config::{AgentConfig, TransportMode};
use crate::credentials::Credentials;
use crate::error::{AgentError, ConnectError};
use crate::event::{AgentEvent, DisconnectReason};
use crate::session::{
    connect, connect_tcp, run_session, Handover, Kept, QuicProbe, SessionContext, SessionEnd,
};
use tether_identity::Backoff;
use tether_transport::Connection;

/// A session that was welcomed and lasted this long resets the backoff window: 10 s.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Capacity of the event channel; slow subscribers miss the oldest events. Kept small:
/// the buffer (88 bytes a slot) is allocated up front per agent, and a simulator runs tens
/// of thousands of agents (32 slots were the largest single allocation each simulated
/// appliance held, 2.9 KB). No subscriber needs every event to be correct: renewal
/// requests, which must not be lost, also go on a watch channel
/// ([`Agent::renewal_requests`]); an agent emits two or three events per connection
/// attempt, seconds apart.
pub const EVENT_CHANNEL_CAPACITY: usize = 8;
/// Fraction of `revoked_backoff` that jitter may remove.
const REVOKED_JITTER: f64 = 0.2;

/// Where a broker is: an address, or a `HOST:PORT` resolved before each attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BrokerAddr {
    /// A resolved address.
    Addr(SocketAddr),
    /// A host name and port, resolved with `tokio::net::lookup_host` at each attempt.
    Name {
        /// The host name.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

impl BrokerAddr {
    /// Resolve to the first address the resolver returns.
    pub async fn resolve(&self) -> Result<SocketAddr, ConnectError> {
        match self {
            BrokerAddr::Addr(a) => Ok(*a),
            BrokerAddr::Name { host, port } => {
                let mut addrs = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| ConnectError::Resolve {
                        host: self.to_string(),
                        reason: e.to_string(),
                    })?;
                addrs.next().ok_or_else(|| ConnectError::Resolve {
                    host: self.to_string(),
                    reason: "no address".into(),
                })
            }
        }
    }

    /// The name sent as TLS SNI: the host name if it is a valid DNS name, else the IP
    /// address `resolved` to. (It is not verified: brokers are identified by SPIFFE URI.)
    pub fn server_name(&self, resolved: SocketAddr) -> String {
        match self {
            BrokerAddr::Name { host, .. }
                if rustls::pki_types::ServerName::try_from(host.as_str()).is_ok() =>
            {
                host.clone()
            }
            _ => resolved.ip().to_string(),
        }
    }
}

impl From<SocketAddr> for BrokerAddr {
    fn from(a: SocketAddr) -> Self {
        BrokerAddr::Addr(a)
    }
}

impl FromStr for BrokerAddr {
    type Err = AgentError;

    /// `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(BrokerAddr::Addr(a));
        }
        let bad = || AgentError::InvalidBroker(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(':') || host.contains('/') || port == 0 {
            return Err(bad());
        }
        Ok(BrokerAddr::Name {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerAddr::Addr(a) => write!(f, "{a}"),
            BrokerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One appliance's connection to the broker cluster. Many agents can share a runtime and a
/// few endpoints.
pub struct Agent {
    cfg: AgentConfig,
    creds: Credentials,
    endpoint: quinn::Endpoint,
    brokers: Vec<BrokerAddr>,
    client_config: quinn::ClientConfig,
    /// The TLS configuration of the TCP transport (the QUIC one's).
    tls: Arc<rustls::ClientConfig>,
    /// `auto`: when QUIC last failed to complete a handshake (TCP is used until
    /// `quic_retry_every` later, or until a session on TCP finds QUIC working again).
    quic_failed_at: Mutex<Option<Instant>>,
    runner: Arc<CommandRunner>,
    events: broadcast::Sender<AgentEvent>,
    /// The highest renewal generation a broker relayed (0: none).
    renewal: watch::Sender<u64>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("appliance_id", &self.creds.appliance_id())
            .field("brokers", &self.brokers)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent for `creds` that will connect through `endpoint` to `brokers`.
    ///
    /// Fails if the configuration is invalid, the broker list is empty, or the TLS
    /// configuration cannot be built.
    pub fn new<B: Into<BrokerAddr>>(
        cfg: AgentConfig,
        creds: Credentials,
        endpoint: quinn::Endpoint,
        brokers: impl IntoIterator<Item = B>,
    ) -> Result<Agent, AgentError> {
        cfg.validate()?;
        let brokers: Vec<BrokerAddr> = brokers.into_iter().map(Into::into).collect();
        if brokers.is_empty() {
            return Err(AgentError::NoBrokers);
        }
        // One TLS configuration (certificate, key, broker verifier) for both transports.
        let tls = crate::tls::tls_config(&creds)?;
        let client_config = crate::tls::quic_client_config(tls.clone(), &cfg)?;
        Ok(Agent {
            tls,
            quic_failed_at: Mutex::new(None),
            runner: Arc::new(CommandRunner::new(&cfg)),
            events: broadcast::channel(EVENT_CHANNEL_CAPACITY).0,
            renewal: watch::Sender::new(0),
            cfg,
            creds,
            endpoint,
            brokers,
            client_config,
        })
    }

    /// Decide every command under signed operations (`ops`).
    pub fn with_signed_ops(mut self, ops: Arc<crate::signed::SignedOps>) -> Agent {
        self.runner = Arc::new(CommandRunner::new(&self.cfg).with_signed_ops(ops));
        self
    }

    /// Replace the command runner (e.g. one with a fixed environment).
    pub fn with_runner(mut self, runner: CommandRunner) -> Agent {
        self.runner = Arc::new(runner);
        self
    }

    /// Subscribe to what the agent does. Subscribe before calling [`Agent::run`].
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// The highest manual-renewal generation a broker relayed (0 until one does), as
    /// [`AgentEvent::RenewalRequested`] reports it, but never lost to a lagging receiver:
    /// the supervisor renews from this.
    pub fn renewal_requests(&self) -> watch::Receiver<u64> {
        self.renewal.subscribe()
    }

    /// The agent's credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Connect, serve sessions and reconnect until `shutdown` fires; then close the live
    /// connection with `CloseCode::Normal` and return `Ok`. Returns an error only if the
    /// endpoint became unusable.
    ///
    /// The future lives as long as the appliance does, so its size is memory every
    /// appliance holds: `run` and `run_inner` are plain functions returning `async move`
    /// blocks (an `async fn` keeps its arguments twice in its state, and `self` is 0.6 KB),
    /// and the connection attempt is boxed (see [`Agent::attempt`]).
    pub fn run(
        self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = Result<(), AgentError>> + Send {
        let span = tracing::info_span!("agent", appliance = %self.creds.appliance_id());
        tracing::Instrument::instrument(self.run_inner(shutdown), span)
    }

    #[allow(clippy::manual_async_fn)] // deliberate: see `run`
    fn run_inner(
        self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = Result<(), AgentError>> + Send {
        async move {
            // Break glass: revoke the credentials of sessions a crash left without an end.
            if let Some(tunnels) = self.runner.tunnels() {
                tunnels.recover_after_crash().await;
            }
            let ctx = SessionContext {
                creds: self.creds.clone(),
                cfg: self.cfg.clone(),
                runner: self.runner.clone(),
                events: self.events.clone(),
                renewal: self.renewal.clone(),
                probe: (self.cfg.transport == TransportMode::Auto).then(|| QuicProbe {
                    endpoint: self.endpoint.clone(),
                    client_config: self.client_config.clone(),
                }),
            };
            // A QUIC connection a session on TCP found working: the next session's.
            let mut ready: Option<Connection> = None;
            let mut backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
            let mut index = fastrand::usize(..self.brokers.len());
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                brokers = self.brokers.len(),
                fingerprint = self.creds.fingerprint(),
                "agent starting"
            );

            loop {
                if shutdown.is_cancelled() {
                    break;
                }
                let target = &self.brokers[index];
                let this_index = index;
                index = (index + 1) % self.brokers.len();
                let result = self.attempt(target, &ctx, &shutdown, ready.take()).await;

                let (delay, refused) = match result {
                    Err((_, ConnectError::Shutdown)) => break,
                    Err((broker, e)) => {
                        let reason = e.reason();
                        tracing::warn!(broker = %target, error = %e, "connection attempt failed");
                        let _ = self.events.send(AgentEvent::Disconnected {
                            broker,
                            reason: reason.clone(),
                        });
                        if e.is_fatal() {
                            return Err(AgentError::Endpoint(e));
                        }
                        self.delay_after(&reason, None, &mut backoff)
                    }
                    Ok((end, Handover { kept, next })) => {
                        log_end(&end);
                        let _ = self.events.send(AgentEvent::Disconnected {
                            broker: Some(end.broker),
                            reason: end.reason.clone(),
                        });
                        if let Some(old) = kept {
                            self.close_after_next_attempt(old, &shutdown);
                        }
                        if shutdown.is_cancelled() {
                            break;
                        }
                        if let Some(next) = next {
                            // Straight onto the QUIC connection, to the same broker.
                            *self
                                .quic_failed_at
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = None;
                            ready = Some(next);
                            index = this_index;
                            continue;
                        }
                        if end.was_established() && end.duration >= STABLE_SESSION {
                            backoff.reset();
                        }
                        self.delay_after(&end.reason, Some(&end), &mut backoff)
                    }
                };
                let _ = self.events.send(AgentEvent::Backoff { delay, refused });
                tracing::info!(delay = %humantime::format_duration(round_ms(delay)), next = %self.brokers[index],
                "waiting before reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            tracing::info!("agent stopped");
            let _ = self.events.send(AgentEvent::Stopped);
            Ok(())
        }
    }

    /// The delay before the next attempt, and whether it is the refusal delay.
    fn delay_after(
        &self,
        reason: &DisconnectReason,
        end: Option<&SessionEnd>,
        backoff: &mut Backoff,
    ) -> (Duration, bool) {
        if let Some(g) = end.and_then(|e| e.go_away.as_ref()) {
            backoff.reset();
            let asked = Duration::from_millis(u64::from(g.reconnect_after_ms));
            let waited = end
                .and_then(|e| e.go_away_received)
                .map(|t| t.elapsed())
                .unwrap_or_default();
            return (asked.saturating_sub(waited), false);
        }
        if reason.is_refusal() {
            tracing::error!(%reason, retry_in = %humantime::format_duration(self.cfg.revoked_backoff),
                "the broker refused this appliance's certificate (revoked, unauthorized or rejected); \
                 the certificate must be renewed or the appliance re-enrolled");
            let jitter = 1.0 - REVOKED_JITTER * fastrand::f64();
            return (self.cfg.revoked_backoff.mul_f64(jitter), true);
        }
        (backoff.next_delay(), false)
    }

    /// Close `old` (left after a `GoAway`) with `normal` once the next attempt ends in a
    /// session or a failure, or at shutdown; at the latest after the connect timeout.
    fn close_after_next_attempt(&self, old: Kept, shutdown: &CancellationToken) {
        let mut events = self.events.subscribe();
        let shutdown = shutdown.clone();
        let limit = self.cfg.connect_timeout + Duration::from_secs(1);
        tokio::spawn(async move {
            let next = async {
                loop {
                    match events.recv().await {
                        Ok(AgentEvent::Connected { .. } | AgentEvent::Disconnected { .. })
                        | Err(broadcast::error::RecvError::Closed) => break,
                        _ => {}
                    }
                }
            };
            tokio::select! {
                _ = next => {}
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(limit) => {}
            }
            old.close();
        });
    }

    async fn attempt(
        &self,
        target: &BrokerAddr,
        ctx: &SessionContext,
        shutdown: &CancellationToken,
        ready: Option<Connection>,
    ) -> Result<(SessionEnd, Handover), (Option<SocketAddr>, ConnectError)> {
        if let Some(conn) = ready {
            let addr = conn.remote_address();
            tracing::info!(broker = %target, %addr, "continuing on QUIC");
            let _ = self.events.send(AgentEvent::Connecting { broker: addr });
            return Ok(run_session(conn, addr, ctx, shutdown).await);
        }
        let addr = tokio::select! {
            r = target.resolve() => r.map_err(|e| (None, e))?,
            _ = shutdown.cancelled() => return Err((None, ConnectError::Shutdown)),
        };
        tracing::info!(broker = %target, %addr, "connecting");
        let _ = self.events.send(AgentEvent::Connecting { broker: addr });
        let server_name = target.server_name(addr);
        // Boxed: the handshake's future (TLS state, the proxy's, QUIC's `Connecting`) is the
        // largest this agent awaits, and once connected, only the session's is needed
        // (5.8 KB of the agent's future against 2.1 KB for the session).
        let connecting = Box::pin(self.connect(target, addr, &server_name));
        let conn = tokio::select! {
            r = connecting => r.map_err(|e| (Some(addr), e))?,
            _ = shutdown.cancelled() => return Err((Some(addr), ConnectError::Shutdown)),
        };
        tracing::debug!(transport = %conn.transport(), "handshake complete");
        Ok(run_session(conn, addr, ctx, shutdown).await)
    }

    /// A connection to `addr` on the configured transport; `auto` falls back to TLS over
    /// TCP when no QUIC handshake completes within `quic_fallback_after`, and remembers.
    async fn connect(
        &self,
        target: &BrokerAddr,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, ConnectError> {
        let cfg = &self.cfg;
        // Through the egress proxy when one applies (CONNECT to the name the broker was
        // given as, so the proxy resolves it), else straight to the address.
        let host = match target {
            BrokerAddr::Name { host, .. } => host.clone(),
            BrokerAddr::Addr(a) => a.ip().to_string(),
        };
        let tcp = || {
            connect_tcp(
                cfg.proxy.connect(&host, addr.port(), cfg.connect_timeout),
                server_name,
                self.tls.clone(),
                cfg.connect_timeout,
            )
        };
        let quic = |timeout| {
            connect(
                &self.endpoint,
                addr,
                server_name,
                self.client_config.clone(),
                timeout,
            )
        };
        match cfg.transport {
            TransportMode::Quic => quic(cfg.connect_timeout).await,
            TransportMode::Tcp => tcp().await,
            TransportMode::Auto if self.quic_blocked() => tcp().await,
            TransportMode::Auto => {
                match quic(cfg.quic_fallback_after.min(cfg.connect_timeout)).await {
                    Err(e) if falls_back(&e) => {
                        tracing::warn!(error = %e,
                            after = %humantime::format_duration(cfg.quic_fallback_after),
                            retry_every = %humantime::format_duration(cfg.quic_retry_every),
                            "no QUIC handshake: using TLS over TCP (QUIC is tried again now and then)");
                        *self
                            .quic_failed_at
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                        tcp().await
                    }
                    other => other,
                }
            }
        }
    }

    /// `auto`: whether QUIC failed recently enough to go straight to TCP.
    fn quic_blocked(&self) -> bool {
        self.quic_failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < self.cfg.quic_retry_every)
    }
}

/// Whether a failed QUIC attempt says UDP does not get through (so TCP may), rather than
/// that the broker answered and refused.
fn falls_back(e: &ConnectError) -> bool {
    match e {
        ConnectError::Timeout => true,
        ConnectError::Handshake(r) => {
            matches!(
                r,
                DisconnectReason::Transport(_) | DisconnectReason::TimedOut
            )
        }
        _ => false,
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn log_end(end: &SessionEnd) {
    let duration = humantime::format_duration(round_ms(end.duration));
    match &end.reason {
        DisconnectReason::Local(tether_proto::CloseCode::Normal)
        | DisconnectReason::Broker(tether_proto::CloseCode::Normal) => {
            tracing::info!(broker = %end.broker, session_id = ?end.session_id, %duration,
                reason = %end.reason, "disconnected")
        }
        reason => tracing::warn!(broker = %end.broker, session_id = ?end.session_id, %duration,
            %reason, "disconnected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_addresses() {
        assert_eq!(
            "127.0.0.1:4433".parse::<BrokerAddr>().ok(),
            Some(BrokerAddr::Addr("127.0.0.1:4433".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:4433".parse::<BrokerAddr>().ok(),
            Some(BrokerAddr::Addr("[::1]:4433".parse().unwrap()))
        );
        assert_eq!(
            "broker-1.example:4433".parse::<BrokerAddr>().ok(),
            Some(BrokerAddr::Name {
                host: "broker-1.example".into(),
                port: 4433
            })
        );
        for bad in [
            "broker",
            "broker:",
            ":4433",
            "broker:99999",
            "a:b:1",
            "broker:0",
        ] {
            assert!(bad.parse::<BrokerAddr>().is_err(), "{bad}");
        }
    }
}
