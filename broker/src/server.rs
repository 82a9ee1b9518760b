//! The QUIC server: admission control, per-connection drivers, drain, and commands.
//!
//! # Admission
//!
//! After a broker restart tens of thousands of agents come back at once. The accept loop
//! takes a handshake permit *before* doing any TLS work; at most
//! `limits.max_concurrent_handshakes` run at once. Connections that find no permit wait in
//! a bounded queue (`limits.max_pending_handshakes`, each for at most
//! `limits.pending_timeout`); beyond it QUIC connections are refused at once with a
//! `CONNECTION_REFUSED`, which costs one packet and no crypto, and agents back off with full
//! jitter. A TCP connection beyond it is not refused: the TCP accept loop stops accepting
//! until the queue has room, and the connections wait in the kernel's listen backlog
//! (a refusal there costs the agent a back-off and a second handshake, and the backlog
//! costs the broker nothing; `tether_tcp_accept_paused_total` counts the pauses).
//! Everything refused is counted in `tether_incoming_refused_total{reason}`.
//!
//! With `transport.endpoints` above 1 the listen address is served by that many quinn
//! endpoints on `SO_REUSEPORT` sockets, one accept loop each; the loops share one
//! `Admission` (permits and queue), so the limits above hold for the broker as a whole.
//!
//! # A connection's life
//!
//! 1. The handshake runs the [`ApplianceVerifier`]; failures are counted by reason.
//! 2. The verified leaf is identified again ([`ApplianceVerifier::identify`]) into a
//!    [`VerifiedAppliance`], closing the window where a revocation lands mid-handshake.
//! 3. The agent opens the session stream; a [`BrokerSession`] state machine handles
//!    `Hello`/`Welcome`/heartbeats; this driver, a task of its own that idle sessions pay
//!    for (kept within a 1 KiB tokio task), only moves bytes and sleeps until
//!    `poll_timeout`.
//! 4. On `Hello` the allowlist is checked again (a certificate revoked since the handshake
//!    is closed as revoked and supersedes nothing), the session enters the
//!    [`SessionTable`], superseding an older one, and the allowlist is checked once more (a
//!    revocation applied between the check and the insert would otherwise miss it).
//! 5. Any other stream the agent opens, any undecodable frame or protocol violation closes
//!    the connection with [`CloseCode::ProtocolError`]; so does the session stream ending
//!    abnormally. The connection never outlives its session driver.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tether_proto::{
    encode_frame, BrokerEvent, BrokerSession, BrokerSessionConfig, CloseCode, CommandFailure,
    CommandKind, CommandOutcome, CommandRequest, Frame, FrameDecoder, GoAwayReason, Now,
    OutputStream, ProtocolViolation,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::allowlist::Allowlist;
use crate::config::Config;
use crate::config::LimitsConfig;
use crate::metrics::{EndpointIndex, Kind, Metrics, Outcome, Reason};
use crate::presence::{Generations, Presence};
use crate::sessions::{close, SessionInfo, SessionTable};
use crate::tls::CertStore;
use crate::verifier::{ApplianceVerifier, Rejection, VerifiedAppliance};

/// TLS alert `certificate_required` (RFC 8446): the client sent no certificate.
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
/// TLS alert `no_application_protocol`: ALPN mismatch.
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;
/// Extra time past a command's deadline for the agent to report the kill: the protocol's
/// one grace constant (`docs/PROTOCOL.md` §6).
const COMMAND_GRACE: Duration = tether_proto::COMMAND_DEADLINE_GRACE;
/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Streams a TCP connection may have open at once (yamux refuses more): the session
/// stream, the agent's control stream, commands and tunnel connections.
const TCP_MAX_STREAMS: usize = 256;
/// Attempts at finding one port number free on both UDP and TCP when `listen` asks for
/// any port (`:0`).
const PORT_ATTEMPTS: usize = 16;

/// The TLS acceptor of the TCP transport.
struct Acceptor(tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// The UDP sockets (and the buffer size granted) and, when TCP is on, the TCP listener. With
/// `listen` on port 0 and no `tcp_listen`, TCP takes the port number UDP got.
fn bind_sockets(
    config: &Config,
) -> anyhow::Result<(
    Vec<std::net::UdpSocket>,
    usize,
    Option<std::net::TcpListener>,
)> {
    let t = &config.transport;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (sockets, granted) =
            crate::tls::bind_udp_group(config.listen, t.endpoints, t.udp_recv_buffer)?;
        let Some(mut tcp_addr) = t.tcp_addr(config.listen) else {
            return Ok((sockets, granted, None));
        };
        if t.tcp_listen.is_none() {
            tcp_addr.set_port(sockets[0].local_addr()?.port());
        }
        match bind_tcp(tcp_addr) {
            Ok(l) => return Ok((sockets, granted, Some(l))),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && config.listen.port() == 0
                    && t.tcp_listen.is_none()
                    && attempt < PORT_ATTEMPTS =>
            {
                continue
            }
            Err(e) => anyhow::bail!("cannot listen on TCP {tcp_addr}: {e}"),
        }
    }
}

/// A non-blocking TCP listener with a backlog deep enough for a reconnect storm.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The current time, for the sans-IO session.
pub(crate) fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: unix_ms(SystemTime::now()),
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A running broker: the endpoints and everything connections share.
#[derive(Debug)]
pub struct Broker {
    config: Arc<Config>,
    /// `transport.endpoints` quinn endpoints on one address (never empty).
    endpoints: Vec<quinn::Endpoint>,
    /// The TCP listener until `serve` takes it (`transport.tcp`).
    tcp: std::sync::Mutex<Option<std::net::TcpListener>>,
    /// The bound TCP address, when TCP is on.
    tcp_addr: Option<SocketAddr>,
    /// TLS over TCP: the same configuration as QUIC's.
    tls: Acceptor,
    verifier: Arc<ApplianceVerifier>,
    allowlist: Arc<Allowlist>,
    sessions: Arc<SessionTable>,
    metrics: Arc<Metrics>,
    /// Cancelled when the broker starts draining; every session driver sends `GoAway`.
    draining: CancellationToken,
    command_ids: AtomicU64,
    cert: Arc<CertStore>,
    presence: Presence,
    generations: Arc<Generations>,
    tunnels: Arc<crate::tunnel::TunnelTable>,
}

/// Everything a broker is built from besides its configuration. [`Broker::bind`] fills it
/// from the configured files (standalone mode); control mode fills it from the data
/// directory and the control channel.
#[derive(Debug)]
pub struct BrokerParts {
    /// CA certificates appliance certificates chain to.
    pub ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The broker's own certificate (swappable).
    pub cert: Arc<CertStore>,
    /// The allowlist, holding its initial snapshot.
    pub allowlist: Arc<Allowlist>,
    /// The session table.
    pub sessions: Arc<SessionTable>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Where session drivers report presence.
    pub presence: Presence,
    /// Manual-renewal generations by appliance.
    pub generations: Arc<Generations>,
}

/// A command to run on an appliance.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Exec (default) or shell.
    pub kind: CommandKind,
    /// Environment variable names the command may inherit from the agent.
    pub env_allowlist: Vec<String>,
    /// Deadline.
    pub timeout: Duration,
    /// Signed operations: the request id, reason, the customer's approval and its
    /// signature, or a plan request. Agents that announced `signed-ops/1` get the
    /// extension on every request (empty when `None`); others cannot be sent one.
    pub signed: Option<tether_proto::SignedOps>,
}

/// What a running command reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandEvent {
    /// A chunk of output.
    Output {
        /// Stdout or stderr.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
    },
    /// The process exited.
    Exit(i32),
    /// The command ended without an exit code.
    Failed {
        /// Why (`timed_out`, `connection_lost`, ...).
        code: CommandFailure,
        /// Detail.
        message: String,
    },
    /// Signed operations: the appliance's signed manifest (just before the end).
    Manifest {
        /// The manifest's exact bytes.
        manifest: Bytes,
        /// Its SSHSIG armor.
        sig: Bytes,
    },
    /// Signed operations: the answer to a plan request (just before the end).
    Plan {
        /// Whether the command's phase needs an approval.
        approval_required: bool,
        /// The approval document the appliance expects.
        document: Bytes,
    },
}

/// Why a command could not be started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// No live session for that appliance on this broker.
    #[error("appliance {0} is not connected")]
    NotConnected(String),
    /// The request is unusable.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// A shell command for an agent that did not announce the `shell` capability: refused
    /// by the broker, nothing is sent to the agent.
    #[error("appliance {0} does not allow shell commands (its agent did not announce the \"shell\" capability)")]
    ShellNotAllowed(String),
    /// The stream could not be opened or written.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

impl CommandError {
    /// Why, in the shared vocabulary (what the cluster channel's `command_failed` says).
    pub fn failure(&self) -> CommandFailure {
        match self {
            CommandError::NotConnected(_) => CommandFailure::Offline,
            CommandError::Invalid(_) => CommandFailure::Invalid,
            CommandError::ShellNotAllowed(_) => CommandFailure::ShellNotAllowed,
            CommandError::ConnectionLost(_) => CommandFailure::ConnectionLost,
        }
    }

    /// The stable error code of the broker's admin API: [`CommandError::failure`]'s name,
    /// except `not_connected` (the admin API's spelling since before the vocabulary).
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::NotConnected(_) => "not_connected",
            other => other.failure().name(),
        }
    }
}

/// Admission state every accept loop shares, so the limits hold for the broker as a
/// whole however many endpoints feed it.
#[derive(Debug)]
struct Admission {
    /// `limits.max_concurrent_handshakes` permits; a handshake holds one.
    permits: Arc<Semaphore>,
    /// Places in admission, handshaking or waiting for a permit:
    /// `limits.max_concurrent_handshakes + limits.max_pending_handshakes`. A connection
    /// takes one before anything else and holds it until its handshake ends, so with every
    /// permit taken at most `limits.max_pending_handshakes` wait.
    places: Arc<Semaphore>,
    /// `limits.pending_timeout`.
    pending_timeout: Duration,
}

impl Admission {
    fn new(limits: &LimitsConfig) -> Admission {
        Admission {
            permits: Arc::new(Semaphore::new(limits.max_concurrent_handshakes)),
            places: Arc::new(Semaphore::new(
                limits.max_concurrent_handshakes + limits.max_pending_handshakes,
            )),
            pending_timeout: limits.pending_timeout,
        }
    }

    /// A place if one is free.
    fn try_place(&self) -> Option<OwnedSemaphorePermit> {
        self.places.clone().try_acquire_owned().ok()
    }
}

/// What an admitted connection holds until its handshake ends: a handshake permit and its
/// place in admission.
struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    _place: OwnedSemaphorePermit,
}

impl Broker {
    /// Bind the QUIC endpoints. `allowlist` must already hold the initial snapshot.
    pub fn bind(
        config: Arc<Config>,
        allowlist: Arc<Allowlist>,
        sessions: Arc<SessionTable>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Broker>> {
        let provider = crate::tls::provider();
        let ca = crate::tls::load_certs(&config.tls.ca)?;
        let cert = Arc::new(CertStore::load(
            &config.tls.cert,
            &config.tls.key,
            &provider,
        )?);
        Broker::bind_parts(
            config,
            BrokerParts {
                ca,
                cert,
                allowlist,
                sessions,
                presence: Presence::disabled(),
                generations: Arc::new(Generations::new()),
                metrics,
            },
        )
    }

    /// Bind the QUIC endpoints from `parts`.
    pub fn bind_parts(config: Arc<Config>, parts: BrokerParts) -> anyhow::Result<Arc<Broker>> {
        let BrokerParts {
            ca,
            cert,
            allowlist,
            sessions,
            metrics,
            presence,
            generations,
        } = parts;
        let provider = crate::tls::provider();
        let verifier = Arc::new(ApplianceVerifier::new(
            &ca,
            &config.trust_domain,
            allowlist.clone(),
            metrics.clone(),
            provider.clone(),
        )?);
        let tls = crate::tls::tls_config(verifier.clone(), cert.clone(), provider)?;
        let server_config = crate::tls::server_config(&config, tls.clone())?;
        let (sockets, granted, tcp) = bind_sockets(&config)?;
        let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
        metrics
            .udp_recv_buffer_bytes
            .set(i64::try_from(granted).unwrap_or(i64::MAX));
        // Every endpoint serves the same configuration; the certificate behind it is the
        // shared `cert`, so a renewal reaches them all at once. They share one endpoint
        // config too, so one stateless-reset key: a client whose address changes (NAT
        // rebinding) may hash to another socket, which does not know its connection; the
        // reset that socket sends is then valid, and the agent reconnects at once instead
        // of waiting out the idle timeout. In control mode the key is kept in the data
        // directory, so the same holds for connections of this broker's previous life
        // after a crash or a restart on the same address.
        let endpoint_config = endpoint_config(&config);
        let endpoints = sockets
            .into_iter()
            .map(|socket| {
                quinn::Endpoint::new(
                    endpoint_config.clone(),
                    Some(server_config.clone()),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        for endpoint in 0..endpoints.len() {
            // Zero, not absent, for an endpoint nobody reached yet.
            metrics
                .incoming
                .get_or_create(&EndpointIndex { endpoint })
                .inc_by(0);
        }
        Ok(Arc::new(Broker {
            config,
            endpoints,
            tcp: std::sync::Mutex::new(tcp),
            tcp_addr,
            tls: Acceptor(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
            verifier,
            allowlist,
            sessions,
            metrics,
            draining: CancellationToken::new(),
            command_ids: AtomicU64::new(1),
            tunnels: Arc::default(),
            cert,
            presence,
            generations,
        }))
    }

    /// The bound QUIC address (every endpoint's: they share it).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoints[0].local_addr()
    }

    /// The bound TCP address, when `transport.tcp` is on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The session table.
    pub fn sessions(&self) -> &Arc<SessionTable> {
        &self.sessions
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The allowlist.
    pub fn allowlist(&self) -> &Arc<Allowlist> {
        &self.allowlist
    }

    /// The broker's own certificate.
    pub fn cert(&self) -> &Arc<CertStore> {
        &self.cert
    }

    /// Manual-renewal generations by appliance.
    pub fn generations(&self) -> &Arc<Generations> {
        &self.generations
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Whether the broker is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves once the broker starts draining (at once if it has).
    pub async fn draining_started(&self) {
        self.draining.cancelled().await
    }

    /// Accept connections until `shutdown`, then drain: `GoAway` to every session, wait up
    /// to `drain.timeout` for them to leave, close the rest with [`CloseCode::Draining`].
    pub async fn serve(self: Arc<Self>, shutdown: CancellationToken) {
        let admission = Arc::new(Admission::new(&self.config.limits));
        info!(
            listen = %self.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            endpoints = self.endpoints.len(),
            tcp = %self.tcp_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            "accepting appliance connections"
        );
        let mut loops = tokio::task::JoinSet::new();
        let tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(listener) = tcp {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    loops.spawn(self.clone().tcp_accept_loop(
                        listener,
                        admission.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => warn!(error = %e, "cannot serve TCP"),
            }
        }
        for index in 0..self.endpoints.len() {
            loops.spawn(
                self.clone()
                    .accept_loop(index, admission.clone(), shutdown.clone()),
            );
        }
        while loops.join_next().await.is_some() {}
        self.drain().await;
    }

    /// One endpoint's accept loop: a place in admission if one is free, else a refusal
    /// (`queue_full`).
    async fn accept_loop(
        self: Arc<Self>,
        index: usize,
        admission: Arc<Admission>,
        shutdown: CancellationToken,
    ) {
        let endpoint = &self.endpoints[index];
        let received = self
            .metrics
            .incoming
            .get_or_create(&EndpointIndex { endpoint: index })
            .clone();
        loop {
            let incoming = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                incoming = endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            received.inc();
            let Some(place) = admission.try_place() else {
                self.refuse(incoming, "queue_full");
                continue;
            };
            self.admit(
                &admission,
                incoming,
                place,
                Broker::handle_incoming,
                Broker::refuse,
            );
        }
    }

    /// With its `place` taken: a handshake permit for `item` if one is free, else a wait
    /// for one of at most `limits.pending_timeout`, else a refusal (`refuse` with the reason).
    fn admit<T, F, Fut>(
        self: &Arc<Self>,
        admission: &Arc<Admission>,
        item: T,
        place: OwnedSemaphorePermit,
        handle: F,
        refuse: fn(&Broker, T, &'static str),
    ) where
        T: Send + 'static,
        F: FnOnce(Arc<Broker>, T, HandshakeSlot) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match admission.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let slot = HandshakeSlot {
                    _permit: permit,
                    _place: place,
                };
                tokio::spawn(handle(self.clone(), item, slot));
            }
            Err(_) => {
                self.metrics.incoming_pending.inc();
                let this = self.clone();
                let admission = admission.clone();
                tokio::spawn(async move {
                    let permit = tokio::time::timeout(
                        admission.pending_timeout,
                        admission.permits.clone().acquire_owned(),
                    )
                    .await;
                    this.metrics.incoming_pending.dec();
                    match permit {
                        Ok(Ok(permit)) => {
                            let slot = HandshakeSlot {
                                _permit: permit,
                                _place: place,
                            };
                            handle(this, item, slot).await
                        }
                        _ => {
                            drop(place);
                            refuse(&this, item, "queue_timeout")
                        }
                    }
                });
            }
        }
    }

    /// The TCP listener's accept loop: the same admission as QUIC's (one set of permits
    /// and one queue for both transports), except that a full queue pauses accepting
    /// instead of refusing.
    async fn tcp_accept_loop(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        admission: Arc<Admission>,
        shutdown: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: let connections finish.
                    warn!(error = %e, "cannot accept a TCP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.metrics.incoming_tcp.inc();
            let place = match admission.try_place() {
                Some(place) => place,
                None => {
                    // The queue is full: accept nothing more until it has room.
                    self.metrics.tcp_accept_paused.inc();
                    debug!("handshake queue full: TCP accept paused");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        place = admission.places.clone().acquire_owned() => match place {
                            Ok(place) => place,
                            Err(_) => break,
                        },
                    }
                }
            };
            self.admit(
                &admission,
                (stream, remote),
                place,
                |this, (stream, remote), slot| this.handle_tcp(stream, remote, slot),
                |this, (_, remote), reason| this.refuse_tcp(remote, reason),
            );
        }
    }

    fn refuse_tcp(&self, remote: SocketAddr, reason: &'static str) {
        self.metrics
            .incoming_refused
            .get_or_create(&Reason { reason })
            .inc();
        debug!(%remote, reason, "incoming TCP connection refused");
    }

    /// The TLS handshake over TCP, then the same checks and session as over QUIC.
    async fn handle_tcp(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        slot: HandshakeSlot,
    ) {
        if self.is_draining() {
            drop(slot);
            return self.refuse_tcp(remote, "draining");
        }
        let started = Instant::now();
        if let Err(e) = tether_transport::tcp::tune(&stream, self.config.transport.idle_timeout) {
            debug!(%remote, error = %e, "cannot set TCP options");
        }
        self.metrics.handshakes_in_flight.inc();
        let result = tokio::time::timeout(
            self.config.limits.handshake_timeout,
            self.tls.0.accept(stream),
        )
        .await;
        self.metrics.handshakes_in_flight.dec();
        drop(slot);
        let tls = match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.tcp_handshake_failed(remote, &e),
            Err(_) => {
                return self.count_handshake_failure(remote, "timeout", "handshake timed out")
            }
        };
        // QUIC requires ALPN; TLS lets a client offer none. Ours must say `tether/1`.
        if tls.get_ref().1.alpn_protocol() != Some(tether_proto::ALPN) {
            return self.count_handshake_failure(remote, "alpn", "no tether/1 ALPN");
        }
        let verified = self.identify(tls.get_ref().1.peer_certificates());
        let conn = tether_transport::tcp::Connection::server(
            tls,
            remote,
            tether_transport::tcp::Settings {
                max_streams: TCP_MAX_STREAMS,
                protocol_error: u64::from(CloseCode::ProtocolError.code()),
            },
        );
        self.admitted(conn.into(), verified, remote, started);
    }

    fn tcp_handshake_failed(&self, remote: SocketAddr, e: &std::io::Error) {
        let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        let kind = match tls {
            Some(rustls::Error::NoCertificatesPresented) => {
                self.verifier
                    .record(&Rejection::NoCertificate, Some(remote));
                return;
            }
            Some(rustls::Error::NoApplicationProtocol) => "alpn",
            // Certificate refusals were counted and logged by the verifier.
            Some(_) => "tls",
            None if e.kind() == std::io::ErrorKind::InvalidData => "tls",
            None => "peer_closed",
        };
        self.count_handshake_failure(remote, kind, &e.to_string());
    }

    fn count_handshake_failure(&self, remote: SocketAddr, kind: &'static str, error: &str) {
        self.metrics
            .handshake_failed
            .get_or_create(&Kind { kind })
            .inc();
        debug!(%remote, kind, error, "handshake failed");
    }

    fn refuse(&self, incoming: quinn::Incoming, reason: &'static str) {
        self.metrics
            .incoming_refused
            .get_or_create(&Reason { reason })
            .inc();
        debug!(remote = %incoming.remote_address(), reason, "incoming connection refused");
        incoming.refuse();
    }

    async fn drain(&self) {
        let timeout = self.config.drain.timeout;
        info!(
            sessions = self.sessions.len(),
            timeout = ?timeout,
            "draining: sending GoAway to every session"
        );
        // No new connections from here on.
        for endpoint in &self.endpoints {
            endpoint.set_server_config(None);
        }
        self.draining.cancel();
        let deadline = Instant::now() + timeout + Duration::from_millis(200);
        while !self.sessions.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.sessions.len();
        for s in self.sessions.list() {
            s.close(CloseCode::Draining, &self.metrics);
        }
        for endpoint in &self.endpoints {
            endpoint.close(
                quinn::VarInt::from_u32(CloseCode::Draining.code()),
                CloseCode::Draining.as_str().as_bytes(),
            );
        }
        let all_idle = futures_util::future::join_all(self.endpoints.iter().map(|e| e.wait_idle()));
        let idle = tokio::time::timeout(Duration::from_secs(2), all_idle).await;
        if left == 0 {
            info!("drain finished: every session left");
        } else {
            warn!(closed = left, "drain timed out: remaining sessions closed");
        }
        if idle.is_err() {
            warn!("endpoints did not become idle within 2s");
        }
    }

    async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming, slot: HandshakeSlot) {
        if self.is_draining() {
            drop(slot);
            return self.refuse(incoming, "draining");
        }
        let remote = incoming.remote_address();
        let started = Instant::now();
        self.metrics.handshakes_in_flight.inc();
        let result = match incoming.accept() {
            Ok(connecting) => {
                match tokio::time::timeout(self.config.limits.handshake_timeout, connecting).await {
                    Ok(r) => r,
                    Err(_) => Err(quinn::ConnectionError::TimedOut),
                }
            }
            Err(e) => Err(e),
        };
        self.metrics.handshakes_in_flight.dec();
        drop(slot);
        let conn = match result {
            Ok(conn) => conn,
            Err(e) => return self.handshake_failed(remote, e),
        };
        let conn = tether_transport::Connection::from(conn);
        let verified = self.identify(conn.peer_certificates().as_deref());
        self.admitted(conn, verified, remote, started);
    }

    /// A completed handshake on either transport: identify the appliance again, then give
    /// the session a task of its own.
    fn admitted(
        self: &Arc<Self>,
        conn: tether_transport::Connection,
        verified: Result<VerifiedAppliance, Rejection>,
        remote: SocketAddr,
        started: Instant,
    ) {
        let verified = match verified {
            Ok(v) => v,
            Err(rejection) => {
                self.verifier.record(&rejection, Some(remote));
                let code = match rejection {
                    Rejection::UnknownFingerprint { .. } => CloseCode::Revoked,
                    _ => CloseCode::Unauthorized,
                };
                close(&conn, code, &self.metrics);
                return;
            }
        };
        self.metrics.handshakes_accepted.inc();
        self.metrics.handshake_on(conn.transport());
        self.metrics
            .handshake_seconds
            .observe(started.elapsed().as_secs_f64());
        let span = tracing::info_span!(
            "session",
            appliance = %verified.appliance(),
            conn = conn.stable_id(),
            transport = conn.transport().as_str(),
            %remote
        );
        // The session gets a task of its own rather than running inside this one: this
        // future also holds the handshake's state (the `quinn::Incoming` alone is 384
        // bytes), 2.2 KB in all against 0.9 KB for the session driver, and a task stays as
        // large as its largest state for as long as it lives — here the whole session.
        tokio::spawn(
            self.clone()
                .serve_connection(conn, verified)
                .instrument(span),
        );
    }

    /// Step 2 and 3 again, on the certificate rustls verified.
    fn identify(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Result<VerifiedAppliance, Rejection> {
        let certs = certs.ok_or(Rejection::NoCertificate)?;
        let leaf = certs.first().ok_or(Rejection::NoCertificate)?;
        self.verifier.identify(leaf)
    }

    fn handshake_failed(&self, remote: SocketAddr, e: quinn::ConnectionError) {
        use quinn::ConnectionError as E;
        let kind = match &e {
            E::TransportError(te)
                if te.code == quinn::TransportErrorCode::crypto(ALERT_CERTIFICATE_REQUIRED) =>
            {
                // rustls refuses an empty certificate list before the verifier runs.
                self.verifier
                    .record(&Rejection::NoCertificate, Some(remote));
                return;
            }
            E::TransportError(te)
                if te.code == quinn::TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL) =>
            {
                "alpn"
            }
            // Certificate refusals were counted and logged by the verifier.
            E::TransportError(_) => "tls",
            E::TimedOut => "timeout",
            E::ConnectionClosed(_) | E::ApplicationClosed(_) | E::Reset => "peer_closed",
            E::VersionMismatch => "version_mismatch",
            E::LocallyClosed => "locally_closed",
            E::CidsExhausted => "cids_exhausted",
        };
        self.metrics
            .handshake_failed
            .get_or_create(&Kind { kind })
            .inc();
        debug!(%remote, kind, error = %e, "handshake failed");
    }

    /// The session driver, which lives as long as the connection: its future is what an
    /// idle session costs besides quinn's own state, so it is kept small (an `async move`
    /// block rather than an `async fn`, which would hold a second copy of its arguments; no
    /// value kept across an `.await` that is not needed after it).
    #[allow(clippy::manual_async_fn)] // see above: an `async fn` here costs 104 bytes a session
    fn serve_connection(
        self: Arc<Self>,
        conn: tether_transport::Connection,
        verified: VerifiedAppliance,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let peer = Peer { conn, verified };
        async move {
            let cfg = &self.config.session;
            let Some((mut send, mut recv)) = self.accept_session_stream(&peer.conn).await else {
                return;
            };
            let session_id = self.sessions.next_session_id();
            let mut session = self.new_session(session_id, &peer.verified);
            // Between frames the decoder holds no buffer: an idle session keeps none.
            let mut decoder = FrameDecoder::new(cfg.max_frame_len);
            let mut info: Option<Arc<SessionInfo>> = None;
            let mut drain_deadline: Option<tokio::time::Instant> = None;
            // One timer for the session's next deadline and the drain deadline, whichever comes
            // first, re-armed only when that changes.
            let timer = tokio::time::sleep_until(next_deadline(&session, drain_deadline));
            tokio::pin!(timer);

            let code: Option<CloseCode> = loop {
                {
                    let deadline = next_deadline(&session, drain_deadline);
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                }
                tokio::select! {
                    chunk = recv.read_chunk(READ_CHUNK) => {
                        if let ControlFlow::Break(code) =
                            self.on_read(&peer.conn, chunk, &mut decoder, &mut session)
                        {
                            break code;
                        }
                    }
                    _ = &mut timer => {
                        if drain_deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                            break Some(CloseCode::Draining);
                        }
                        if let Some(code) = session.handle_timeout(now()) {
                            if code == CloseCode::ProtocolError {
                                self.violation(&peer.conn, "hello_timeout", "no Hello in time");
                                break None;
                            }
                            info!(code = %code, "session idle: heartbeats missed");
                            break Some(code);
                        }
                    }
                    extra = peer.conn.accept_bi() => {
                        if extra.is_ok() {
                            self.violation(&peer.conn, "extra_stream", "agent opened a second stream");
                        }
                        break None;
                    }
                    _ = self.draining.cancelled(), if drain_deadline.is_none() => {
                        let max = self.config.drain.reconnect_jitter.as_millis() as u64;
                        let delay = Duration::from_millis(fastrand::u64(0..=max));
                        session.go_away(GoAwayReason::Draining, delay, "broker draining");
                        drain_deadline = Some(tokio::time::Instant::now() + self.config.drain.timeout);
                    }
                    _ = renewal_changed(info.as_deref()) => {
                        if let Some(s) = &info {
                            let generation = s.renewal_generation.load(Ordering::Relaxed);
                            debug!(generation, "manual-renewal generation changed");
                            session.set_manual_renewal_generation(generation, now());
                        }
                    }
                }
                // Events: register on Hello, note heartbeats.
                if let ControlFlow::Break(code) =
                    self.on_events(&peer, session_id, &mut session, &mut info)
                {
                    break code;
                }
                // Frames to send, in a buffer that lives only until quinn has copied it.
                let mut out = BytesMut::new();
                while let Some(frame) = session.poll_transmit() {
                    if let Err(e) = encode_frame(&frame, &mut out, cfg.max_frame_len) {
                        warn!(error = %e, "cannot encode frame");
                    }
                }
                if !out.is_empty() {
                    let write = tokio::time::timeout(cfg.hello_timeout, send.write_all(&out)).await;
                    if !matches!(write, Ok(Ok(()))) {
                        debug!("cannot write to the session stream");
                        break None;
                    }
                }
            };

            self.end_session(&peer.conn, code, info);
            let reason = peer.conn.closed().await;
            debug!(reason = %reason, "connection closed");
        }
    }

    /// The session state machine for a new session of `verified`, before its `Hello`.
    fn new_session(&self, session_id: u64, verified: &VerifiedAppliance) -> BrokerSession {
        let cfg = &self.config.session;
        BrokerSession::new(
            BrokerSessionConfig {
                session_id,
                heartbeat_interval: cfg.heartbeat_interval,
                missed_heartbeats: tether_proto::session::DEFAULT_MISSED_HEARTBEATS,
                hello_timeout: cfg.hello_timeout,
                manual_renewal_generation: self.generations.get(verified.appliance()),
                max_frame_len: u32::try_from(cfg.max_frame_len).unwrap_or(u32::MAX),
            },
            now(),
        )
    }

    /// Feed what the session stream read to the session; `Break` with the close code when
    /// the session is over (`None`: a protocol violation or a lost stream).
    fn on_read(
        &self,
        conn: &tether_transport::Connection,
        chunk: Result<Option<Bytes>, quinn::ReadError>,
        decoder: &mut FrameDecoder,
        session: &mut BrokerSession,
    ) -> ControlFlow<Option<CloseCode>> {
        match chunk {
            Ok(Some(chunk)) => {
                decoder.push(&chunk);
                if let Err(v) = self.handle_frames(decoder, session) {
                    self.violation(conn, v.kind(), &v.to_string());
                    return ControlFlow::Break(None);
                }
                decoder.release_idle();
                ControlFlow::Continue(())
            }
            Ok(None) => {
                debug!("agent finished the session stream");
                ControlFlow::Break(Some(CloseCode::Normal))
            }
            Err(quinn::ReadError::Reset(reason)) => {
                // The agent abandoned its session: as unexpected as a frame it
                // may not send (`docs/PROTOCOL.md` §2).
                self.violation(
                    conn,
                    "session_stream_reset",
                    &format!("agent reset the session stream (error code {reason})"),
                );
                ControlFlow::Break(None)
            }
            Err(e) => {
                debug!(error = %e, "session stream ended");
                ControlFlow::Break(None)
            }
        }
    }

    /// Act on the session's events: register on `Hello`, note heartbeats; `Break` with the
    /// close code when the session must end.
    fn on_events(
        &self,
        peer: &Peer,
        session_id: u64,
        session: &mut BrokerSession,
        info: &mut Option<Arc<SessionInfo>>,
    ) -> ControlFlow<Option<CloseCode>> {
        while let Some(event) = session.poll_event() {
            match event {
                BrokerEvent::Established(hello) => {
                    self.establish(peer, session_id, hello, session, info)?;
                }
                BrokerEvent::Heartbeat(hb) => {
                    if let Some(s) = info {
                        s.last_heartbeat_ms
                            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
                        s.cert_not_after_ms
                            .store(hb.cert_not_after_ms, Ordering::Relaxed);
                        s.trust_state.store(hb.trust_state as u8, Ordering::Relaxed);
                        self.presence.heartbeat(s);
                    }
                }
                BrokerEvent::Status(status) => {
                    debug!(entries = status.entries.len(), "status report");
                    if let Some(s) = info {
                        {
                            let mut st = s.status.lock().unwrap_or_else(|e| e.into_inner());
                            st.entries = status.entries;
                            st.unsent = true;
                        }
                        // To control with the next heartbeat summary: now.
                        self.presence.heartbeat(s);
                    }
                }
                BrokerEvent::ManifestBacklog(m) => {
                    if let Some(s) = info {
                        self.backlog_manifest(s, session, m);
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// A manifest the agent re-sent after a reconnect: pass it on (to control, or to this
    /// log when standalone) and acknowledge it, so the agent drops it from its spool. When
    /// it cannot be queued, no acknowledgement: the agent sends it again next time.
    fn backlog_manifest(
        &self,
        s: &SessionInfo,
        session: &mut BrokerSession,
        m: tether_proto::ManifestBacklog,
    ) {
        let command_id = m.manifest.command_id;
        let (Ok(manifest), Ok(sig)) = (
            String::from_utf8(m.manifest.manifest.to_vec()),
            String::from_utf8(m.manifest.sig.to_vec()),
        ) else {
            // Not a manifest anyone could verify: acknowledged so it does not come back.
            warn!(seq = m.seq, "backlog manifest is not UTF-8; dropped");
            self.metrics.manifest_backlog("invalid");
            session.ack_manifest(m.seq);
            return;
        };
        info!(
            seq = m.seq,
            command_id,
            manifest_sha256 = %tether_identity::fingerprint::hex_of(manifest.as_bytes()),
            "manifest re-sent after a reconnect"
        );
        if self.presence.manifest(s, command_id, manifest, sig) {
            self.metrics.manifest_backlog("passed_on");
            session.ack_manifest(m.seq);
        } else {
            self.metrics.manifest_backlog("queue_full");
        }
    }

    /// On `Hello`: check the allowlist, enter the session table (superseding an older
    /// session), and check the allowlist again; `Break` when the certificate was revoked.
    fn establish(
        &self,
        peer: &Peer,
        session_id: u64,
        hello: tether_proto::Hello,
        session: &mut BrokerSession,
        info: &mut Option<Arc<SessionInfo>>,
    ) -> ControlFlow<Option<CloseCode>> {
        let (conn, verified) = (&peer.conn, &peer.verified);
        // A certificate revoked since the handshake never enters the table:
        // there it would supersede the appliance's live session (on a
        // renewed, still pinned certificate) before the check below.
        if !self
            .allowlist
            .allows(verified.appliance(), &verified.fingerprint())
        {
            info!("fingerprint left the allowlist before Hello");
            self.metrics.sessions_revoked.inc();
            return ControlFlow::Break(Some(CloseCode::Revoked));
        }
        let s = Arc::new(SessionInfo {
            session_id,
            appliance: verified.appliance().clone(),
            fingerprint: verified.fingerprint(),
            connected_at: SystemTime::now(),
            remote: peer.conn.remote_address(),
            agent_version: hello.agent_version,
            capabilities: hello.capabilities,
            connection: conn.clone(),
            cert_not_after_ms: hello.cert_not_after_ms.into(),
            last_heartbeat_ms: 0.into(),
            trust_state: 0.into(),
            renewal_generation: 0.into(),
            renewal_changed: tokio::sync::Notify::new(),
            close_code: crate::sessions::NOT_CLOSED.into(),
            status: Default::default(),
        });
        if let Some(old) = self.sessions.insert(s.clone()) {
            info!(old_session = old.session_id, "superseding older session");
            old.close(CloseCode::Superseded, &self.metrics);
        }
        self.metrics.sessions.inc();
        self.metrics.session_on(conn.transport(), 1);
        // Generations that changed between `Welcome` and the insert went
        // to the older session (or nowhere): take the current one now.
        let generation = self.generations.get(verified.appliance());
        s.renewal_generation.store(generation, Ordering::Relaxed);
        session.set_manual_renewal_generation(generation, now());
        self.presence.session_up(&s);
        // Debug, not info: one line per session is 4 % of a TCP handshake's CPU in a storm
        // (JSON formatting and the write), and who is connected where is already in
        // `GET /v1/sessions`, control's presence and the metrics. Info lines are for what
        // an operator acts on: supersedes, revocations, refusals.
        debug!(session_id, agent_version = %s.agent_version, "session established");
        *info = Some(s);
        // A revocation applied after the handshake but before the insert
        // found no session to close: check again now that we are visible.
        if !self
            .allowlist
            .allows(verified.appliance(), &verified.fingerprint())
        {
            info!("fingerprint left the allowlist during the handshake");
            self.metrics.sessions_revoked.inc();
            close(conn, CloseCode::Revoked, &self.metrics);
        }
        ControlFlow::Continue(())
    }

    /// Close the connection with its session (`code`; `None`: a protocol error) and take
    /// the session out of the table, recording why it ended.
    fn end_session(
        &self,
        conn: &tether_transport::Connection,
        code: Option<CloseCode>,
        info: Option<Arc<SessionInfo>>,
    ) {
        // The connection ends with its session, whatever ended the loop (a reset session
        // stream, a write that timed out): a connection outside the session table is out of
        // revocation's reach. A no-op if it is already closed.
        let peer_code = match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                CloseCode::from_code(c.error_code.into_inner())
            }
            Some(quinn::ConnectionError::TimedOut) => Some(CloseCode::IdleTimeout),
            _ => None,
        };
        close(
            conn,
            code.unwrap_or(CloseCode::ProtocolError),
            &self.metrics,
        );
        if let Some(s) = info {
            if self.sessions.remove(&s.appliance, s.session_id) {
                debug!("session removed");
            }
            self.metrics.sessions.dec();
            self.metrics.session_on(conn.transport(), -1);
            // Why it ended: a close from outside the driver (revoked, superseded, control)
            // wins over what the driver saw (a read error once the connection was closed).
            let reason = s
                .closed_with()
                .or(code)
                .or(peer_code)
                .map(CloseCode::as_str)
                .unwrap_or("connection_lost");
            self.presence.session_down(&s, reason);
        }
    }

    /// The agent opens the session stream first; `None` when it did not in time.
    async fn accept_session_stream(
        &self,
        conn: &tether_transport::Connection,
    ) -> Option<(tether_transport::SendStream, tether_transport::RecvStream)> {
        let stream = tokio::select! {
            s = conn.accept_bi() => s,
            _ = tokio::time::sleep(self.config.session.hello_timeout) => {
                self.violation(conn, "no_session_stream", "no session stream opened in time");
                return None;
            }
        };
        stream
            .map_err(|e| debug!(error = %e, "connection ended before the session stream opened"))
            .ok()
    }

    fn handle_frames(
        &self,
        decoder: &mut FrameDecoder,
        session: &mut BrokerSession,
    ) -> Result<(), ProtocolViolation> {
        while let Some(frame) = decoder.poll_frame()? {
            session.handle_frame(frame, now())?;
        }
        Ok(())
    }

    fn violation(&self, conn: &tether_transport::Connection, kind: &'static str, detail: &str) {
        self.metrics.protocol_error(kind);
        warn!(kind, detail, "protocol violation: closing connection");
        close(conn, CloseCode::ProtocolError, &self.metrics);
    }

    /// The break-glass tunnels opened through this broker.
    pub fn tunnels(&self) -> &Arc<crate::tunnel::TunnelTable> {
        &self.tunnels
    }

    /// Open a break-glass tunnel session on `appliance`'s connection (the agent decides;
    /// see [`crate::tunnel`]).
    pub async fn open_tunnel(
        self: &Arc<Self>,
        appliance: &str,
        open: tether_proto::TunnelOpen,
    ) -> Result<crate::tunnel::Opened, CommandError> {
        let session = self
            .sessions
            .get(appliance)
            .ok_or_else(|| CommandError::NotConnected(appliance.to_owned()))?;
        if !session.has_capability(tether_proto::capability::TUNNEL) {
            return Err(CommandError::Invalid(format!(
                "appliance {appliance} does not announce tunnel/1: it opens no tunnels"
            )));
        }
        crate::tunnel::open(
            session,
            open,
            self.tunnels.clone(),
            self.metrics.clone(),
            self.config.session.max_frame_len,
        )
        .await
        .map_err(|e| CommandError::ConnectionLost(e.to_string()))
    }

    /// Control mode: open (or plan) control's tunnel session `id` on `appliance` (see
    /// [`crate::tunnel::open_for_control`]).
    pub async fn open_tunnel_for_control(
        self: &Arc<Self>,
        id: String,
        appliance: &str,
        open: tether_proto::TunnelOpen,
    ) -> tether_proto::cluster::TunnelAnswer {
        let session = match self.tunnel_session(appliance) {
            Ok(s) => s,
            Err(message) => {
                return tether_proto::cluster::TunnelAnswer::Ended {
                    reason: tether_proto::TunnelCloseReason::Disconnected
                        .as_str()
                        .to_owned(),
                    code: String::new(),
                    message,
                }
            }
        };
        crate::tunnel::open_for_control(
            session,
            id,
            open,
            self.tunnels.clone(),
            self.metrics.clone(),
            self.presence.clone(),
            self.config.session.max_frame_len,
        )
        .await
    }

    /// Control mode: close control's session `id` (the agent's `session_id`) on
    /// `appliance`, whose session-control stream this broker does not hold (see
    /// [`crate::tunnel::close_detached`]).
    pub async fn close_detached_tunnel(
        self: &Arc<Self>,
        id: String,
        appliance: &str,
        session_id: u64,
    ) {
        match self.tunnel_session(appliance) {
            Ok(session) => {
                crate::tunnel::close_detached(
                    session,
                    id,
                    session_id,
                    self.metrics.clone(),
                    self.presence.clone(),
                    self.config.session.max_frame_len,
                )
                .await
            }
            Err(message) => warn!(tunnel = %id, %message, "cannot close a detached tunnel here"),
        }
    }

    /// Control mode: relay one tunnel connection of the agent's session `session_id` on
    /// `appliance` over `io` (the dial-back to control). Returns why it closed.
    pub async fn relay_tunnel<T>(
        self: &Arc<Self>,
        appliance: &str,
        session_id: u64,
        io: T,
    ) -> String
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
    {
        match self.tunnel_session(appliance) {
            Ok(session) => {
                crate::tunnel::relay(
                    session,
                    session_id,
                    io,
                    self.metrics.clone(),
                    self.config.session.max_frame_len,
                )
                .await
            }
            Err(message) => crate::tunnel::refuse_relay(io, message).await,
        }
    }

    /// The session of `appliance` if it is here and speaks `tunnel/1`.
    fn tunnel_session(&self, appliance: &str) -> Result<Arc<SessionInfo>, String> {
        let session = self
            .sessions
            .get(appliance)
            .ok_or_else(|| format!("appliance {appliance} is not connected to this broker"))?;
        if !session.has_capability(tether_proto::capability::TUNNEL) {
            return Err(format!(
                "appliance {appliance} does not announce tunnel/1: it opens no tunnels"
            ));
        }
        Ok(session)
    }

    /// Run a command on a connected appliance. Events arrive on the returned channel; the
    /// last one is `Exit` or `Failed`. Dropping the receiver cancels the command.
    pub async fn run_command(
        self: &Arc<Self>,
        appliance: &str,
        spec: CommandSpec,
    ) -> Result<mpsc::Receiver<CommandEvent>, CommandError> {
        if spec.argv.is_empty() {
            return Err(CommandError::Invalid("argv must not be empty".into()));
        }
        if spec.timeout.is_zero() || spec.timeout > self.config.limits.max_command_timeout {
            return Err(CommandError::Invalid(format!(
                "timeout must be between 1ms and {:?}",
                self.config.limits.max_command_timeout
            )));
        }
        let session = self
            .sessions
            .get(appliance)
            .ok_or_else(|| CommandError::NotConnected(appliance.to_owned()))?;
        // Never send a shell command to an agent that did not say it runs them: the
        // agent would refuse it too, but what runs on an appliance must not depend on the
        // appliance alone.
        if spec.kind == CommandKind::Shell
            && !session.has_capability(tether_proto::capability::SHELL)
        {
            self.metrics
                .commands
                .get_or_create(&Outcome {
                    result: "shell_not_allowed",
                })
                .inc();
            return Err(CommandError::ShellNotAllowed(appliance.to_owned()));
        }
        // The signed-ops extension goes to agents that understand it, always (so they
        // know this broker relays manifests and the new reasons); an approval or a plan
        // request for any other agent would be silently meaningless: refuse it.
        let signed = if session.has_capability(tether_proto::capability::SIGNED_OPS) {
            Some(spec.signed.unwrap_or_default())
        } else if spec
            .signed
            .as_ref()
            .is_some_and(|s| !s.approval.is_empty() || s.plan_only)
        {
            return Err(CommandError::Invalid(format!(
                "appliance {appliance} does not announce signed-ops/1: it runs commands unsigned and cannot check an approval or plan one"
            )));
        } else {
            None
        };
        let command_id = self.command_ids.fetch_add(1, Ordering::Relaxed);
        let request = Frame::CommandRequest(CommandRequest {
            command_id,
            kind: spec.kind,
            argv: spec.argv,
            env_allowlist: spec.env_allowlist,
            deadline_ms: u32::try_from(spec.timeout.as_millis()).unwrap_or(u32::MAX),
            signed,
        });
        let max = self.config.session.max_frame_len;
        let mut buf = BytesMut::new();
        encode_frame(&request, &mut buf, max).map_err(|e| CommandError::Invalid(e.to_string()))?;
        // The appliance grants (or withholds) stream and flow-control credit: bound the
        // wait by the command's deadline so it cannot hold the caller for ever.
        let deadline = tokio::time::Instant::now() + spec.timeout;
        let late = || {
            CommandError::ConnectionLost(
                "the appliance did not accept the command before its deadline".into(),
            )
        };
        let (mut send, recv) =
            match tokio::time::timeout_at(deadline, session.connection.open_bi()).await {
                Ok(Ok(streams)) => streams,
                Ok(Err(e)) => return Err(CommandError::ConnectionLost(e.to_string())),
                Err(_) => return Err(late()),
            };
        match tokio::time::timeout_at(deadline, send.write_all(&buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CommandError::ConnectionLost(e.to_string())),
            Err(_) => {
                // Reset, not finish: a truncated request must not reach the agent.
                let _ = send.reset(quinn::VarInt::from_u32(0));
                return Err(late());
            }
        }
        let _ = send.finish();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let deadline = spec.timeout + COMMAND_GRACE;
        let span = tracing::info_span!("command", appliance, command_id);
        tokio::spawn(
            async move {
                let (last, rest) = match tokio::time::timeout(
                    deadline,
                    relay_command(recv, &tx, command_id, max, &session, &this.metrics),
                )
                .await
                {
                    Ok(ended) => ended,
                    // Dropping the stream stops it (STOP_SENDING 0): the agent kills the
                    // process if it still runs.
                    Err(_) => (
                        CommandEvent::Failed {
                            code: CommandFailure::TimedOut,
                            message: "no result from the appliance before the deadline".into(),
                        },
                        None,
                    ),
                };
                let result = match &last {
                    CommandEvent::Exit(_) => "exited",
                    CommandEvent::Failed { code, .. } => code.name(),
                    CommandEvent::Output { .. }
                    | CommandEvent::Manifest { .. }
                    | CommandEvent::Plan { .. } => "unknown",
                };
                this.metrics
                    .commands
                    .get_or_create(&Outcome { result })
                    .inc();
                info!(result, "command finished");
                let _ = tx.send(last).await;
                drop(tx);
                if let Some((recv, decoder)) = rest {
                    expect_end(recv, decoder, &session, &this.metrics).await;
                }
            }
            .instrument(span),
        );
        Ok(rx)
    }
}

/// The connection a session driver serves and who is on the other end: one value the
/// driver's future holds, lent whole to the phases that need more than the connection.
struct Peer {
    conn: tether_transport::Connection,
    verified: VerifiedAppliance,
}

/// When the driver must wake without input: the session's next deadline or the drain
/// deadline, whichever is first (an hour from now when there is neither).
fn next_deadline(
    session: &BrokerSession,
    drain_deadline: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    let session = session.poll_timeout().map(tokio::time::Instant::from_std);
    match (session, drain_deadline) {
        (Some(a), Some(b)) => a.min(b),
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => tokio::time::Instant::now() + Duration::from_secs(3600),
    }
}

/// Resolves when `info`'s manual-renewal generation changes; never without a session.
async fn renewal_changed(info: Option<&SessionInfo>) {
    match info {
        Some(s) => s.renewal_changed.notified().await,
        None => std::future::pending().await,
    }
}

/// The stream of a command whose result arrived, with what was read after the result.
type AfterResult = Option<(tether_transport::RecvStream, FrameDecoder)>;

/// Forward a command stream's frames to `tx` until the result; returns the final event and,
/// after a result, the stream for [`expect_end`].
async fn relay_command(
    mut recv: tether_transport::RecvStream,
    tx: &mpsc::Sender<CommandEvent>,
    command_id: u64,
    max_frame_len: usize,
    session: &SessionInfo,
    metrics: &Metrics,
) -> (CommandEvent, AfterResult) {
    let mut decoder = FrameDecoder::new(max_frame_len);
    // A manifest or plan arrived: only the result may follow.
    let mut sealed = false;
    loop {
        let chunk = tokio::select! {
            c = recv.read_chunk(READ_CHUNK) => c,
            _ = tx.closed() => {
                // The caller went away: cancel on the agent, which kills the process.
                let _ = recv.stop(quinn::VarInt::from_u32(0));
                return (CommandEvent::Failed { code: CommandFailure::Cancelled, message: "caller went away".into() }, None);
            }
        };
        match chunk {
            Ok(Some(chunk)) => decoder.push(&chunk),
            Ok(None) => {
                // The agent finished its side without a result (or inside a frame): the
                // command fails; the session stays (`docs/PROTOCOL.md` §6.1).
                metrics.protocol_error("command_without_result");
                warn!("command stream ended without a result");
                return (
                    CommandEvent::Failed {
                        code: CommandFailure::ProtocolError,
                        message: "command stream ended without a result".into(),
                    },
                    None,
                );
            }
            Err(quinn::ReadError::Reset(reason)) => {
                // The agent abandoned the command (RESET_STREAM): whether it ran is unknown.
                return (
                    CommandEvent::Failed {
                        code: CommandFailure::ConnectionLost,
                        message: format!(
                            "the appliance reset the command stream (error code {reason}) without a result"
                        ),
                    },
                    None,
                );
            }
            Err(e) => {
                return (
                    CommandEvent::Failed {
                        code: CommandFailure::ConnectionLost,
                        message: e.to_string(),
                    },
                    None,
                )
            }
        }
        loop {
            let frame = match decoder.poll_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let v = ProtocolViolation::from(e);
                    metrics.protocol_error(v.kind());
                    close(&session.connection, CloseCode::ProtocolError, metrics);
                    return (
                        CommandEvent::Failed {
                            code: CommandFailure::ProtocolError,
                            message: v.to_string(),
                        },
                        None,
                    );
                }
            };
            let ev = match frame {
                Frame::CommandOutput(o) if o.command_id == command_id && !sealed => {
                    CommandEvent::Output {
                        stream: o.stream,
                        data: o.data,
                    }
                }
                // Signed operations: the manifest (or plan) comes last before the result;
                // nothing else may follow it (docs/PROTOCOL.md §11.2).
                Frame::CommandManifest(m) if m.command_id == command_id && !sealed => {
                    sealed = true;
                    CommandEvent::Manifest {
                        manifest: m.manifest,
                        sig: m.sig,
                    }
                }
                Frame::CommandPlan(p) if p.command_id == command_id && !sealed => {
                    sealed = true;
                    CommandEvent::Plan {
                        approval_required: p.approval_required,
                        document: p.document,
                    }
                }
                Frame::CommandResult(r) if r.command_id == command_id => {
                    let last = match r.outcome {
                        CommandOutcome::Exited(code) => CommandEvent::Exit(code),
                        CommandOutcome::Failed { reason, message } => CommandEvent::Failed {
                            code: CommandFailure::from(reason),
                            message,
                        },
                    };
                    return (last, Some((recv, decoder)));
                }
                other => {
                    metrics.protocol_error("unexpected_frame");
                    close(&session.connection, CloseCode::ProtocolError, metrics);
                    return (
                        CommandEvent::Failed {
                            code: CommandFailure::ProtocolError,
                            message: format!(
                                "unexpected {:?} on a command stream",
                                other.frame_type()
                            ),
                        },
                        None,
                    );
                }
            };
            if tx.send(ev).await.is_err() {
                let _ = recv.stop(quinn::VarInt::from_u32(0));
                return (
                    CommandEvent::Failed {
                        code: CommandFailure::Cancelled,
                        message: "caller went away".into(),
                    },
                    None,
                );
            }
        }
    }
}

/// After a command's result nothing may follow on its stream but the end (FIN): a byte
/// more is a protocol error that closes the connection, like any other unexpected frame
/// (the operator already has the result). An agent that neither finishes nor sends more
/// within [`COMMAND_GRACE`] gets its stream stopped (STOP_SENDING 0), which is no error.
async fn expect_end(
    mut recv: tether_transport::RecvStream,
    decoder: FrameDecoder,
    session: &SessionInfo,
    metrics: &Metrics,
) {
    let mut trailing = decoder.buffered();
    if trailing == 0 {
        let end = tokio::time::Instant::now() + COMMAND_GRACE;
        loop {
            match tokio::time::timeout_at(end, recv.read_chunk(READ_CHUNK)).await {
                Ok(Ok(Some(chunk))) if chunk.is_empty() => continue,
                Ok(Ok(Some(chunk))) => trailing = chunk.len(),
                // Finished as it should be, or reset, or the connection is gone.
                Ok(Ok(None)) | Ok(Err(_)) => {}
                Err(_) => {
                    let _ = recv.stop(quinn::VarInt::from_u32(0));
                }
            }
            break;
        }
    }
    if trailing > 0 {
        metrics.protocol_error("frame_after_result");
        warn!(
            bytes = trailing,
            "protocol violation: data after the command result; closing connection"
        );
        close(&session.connection, CloseCode::ProtocolError, metrics);
    }
}

/// The endpoints' configuration: the stateless-reset key from the data directory in
/// control mode ([`crate::datadir::reset_key`]), else a random one. A key that cannot be
/// read or stored (a full disk) is logged and replaced by a random one: resets then
/// reach only this life's connections.
fn endpoint_config(config: &Config) -> quinn::EndpointConfig {
    let Some(dir) = config.control.data_dir.as_deref() else {
        return quinn::EndpointConfig::default();
    };
    match crate::datadir::reset_key(dir) {
        Ok(seed) => {
            let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed);
            // The connection ids carry a keyed hash that the endpoint checks before it
            // answers an unknown connection with a reset: a new life must know the old
            // key, else it drops the packets and its agents wait out their idle timeout.
            let tag = ring::hmac::sign(&reset, b"tether quic connection-id key");
            let mut cid_key = [0u8; 8];
            cid_key.copy_from_slice(&tag.as_ref()[..8]);
            let cid_key = u64::from_le_bytes(cid_key);
            let mut ec = quinn::EndpointConfig::new(Arc::new(reset));
            ec.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            ec
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep the QUIC stateless-reset key: a random one for this run");
            quinn::EndpointConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` would return, without calling it.
    fn future_size<A, F: std::future::Future>(_f: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle session costs quinn's connection state plus its driver's task. (The
    /// remote address is the connection's, not a copy: 32 bytes that put the driver over
    /// once the connection became either transport's.) tokio puts a
    /// future in a 128-byte-aligned cell with 104 bytes of its own (header, ids, trailer,
    /// stage tag): a driver of at most 920 bytes fits a 1 KiB cell, one byte more takes
    /// 1,152. (Before this test: 2,184 bytes, in a 2,304-byte cell, for every session.)
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "future layouts are only meaningful optimised"
    )]
    fn the_session_driver_fits_a_one_kib_task() {
        let size = future_size(
            |(broker, conn, verified): (
                Arc<Broker>,
                tether_transport::Connection,
                VerifiedAppliance,
            )| {
                broker
                    .serve_connection(conn, verified)
                    .instrument(tracing::Span::none())
            },
        );
        assert!(size <= 920, "session driver future: {size} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_admission_bound_holds_across_accept_loops() {
        let limits = LimitsConfig {
            max_concurrent_handshakes: 1,
            max_pending_handshakes: 3,
            ..LimitsConfig::default()
        };
        let admission = Arc::new(Admission::new(&limits));
        // Eight loops race for four places (one handshaking, three waiting).
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let a = admission.clone();
                tokio::spawn(
                    async move { (0..100).filter_map(|_| a.try_place()).collect::<Vec<_>>() },
                )
            })
            .collect();
        let mut taken = Vec::new();
        for t in tasks {
            taken.extend(t.await.unwrap());
        }
        assert_eq!(taken.len(), 4);
        assert!(admission.try_place().is_none());
        // A place comes back when its holder's handshake ends.
        taken.pop();
        assert!(admission.try_place().is_some());
        let again = admission.try_place();
        assert!(again.is_some(), "the place just taken was dropped at once");
        assert!(admission.try_place().is_none());
    }
}
