//! The async driver of one connection: connect, open the session stream, drive
//! [`tether_proto::AgentSession`], serve broker-opened command streams, and report how it
//! ended as a [`SessionEnd`].
//!
//! The protocol logic is in the sans-IO state machine; this file only moves bytes and time
//! in and out of it, inside a span carrying the broker address and connection id.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tether_proto::{
    AgentSession, AgentSessionConfig, CloseCode, CommandOutcome, Frame, FrameDecoder, GoAway, Now,
    ProtocolViolation,
};
use tether_transport::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::command::{failed, CommandRunner};
use crate::config::AgentConfig;
use crate::credentials::Credentials;
use crate::error::ConnectError;
use crate::event::{AgentEvent, DisconnectReason};

/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 16 * 1024;
/// Time the broker has to send a command request after opening its stream: 10 s.
pub const COMMAND_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long running commands get to end (process killed, manifest signed and spooled)
/// once their connection is gone.
const COMMAND_WIND_DOWN: Duration = Duration::from_secs(5);
/// How long to wait for the broker to acknowledge a command stream that carried a
/// manifest before leaving it in the spool for the next session.
const DELIVERY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Capabilities every agent announces.
pub const CAPABILITY_EXEC: &str = tether_proto::capability::EXEC;
/// Capability announced when shell commands are allowed.
pub const CAPABILITY_SHELL: &str = tether_proto::capability::SHELL;
/// Capability every agent announces: it reads the broker's frame limit from `Welcome`.
pub const CAPABILITY_MAX_FRAME_LEN: &str = tether_proto::capability::MAX_FRAME_LEN;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// The broker address.
    pub broker: SocketAddr,
    /// The session id from `Welcome`, if the broker welcomed us.
    pub session_id: Option<u64>,
    /// Time from the QUIC handshake's completion to the end.
    pub duration: Duration,
    /// Why it ended.
    pub reason: DisconnectReason,
    /// The `GoAway` the broker sent, if any.
    pub go_away: Option<GoAway>,
    /// When the `GoAway` arrived (its delay counts from then).
    pub go_away_received: Option<Instant>,
}

/// How a session left its connection: the connection kept open after a `GoAway` or a
/// move to QUIC (closed by the caller once the next session is up), and the QUIC
/// connection to the same broker that a session on TCP found working again, which the
/// next session runs on (make before break).
#[derive(Default)]
pub(crate) struct Handover {
    pub kept: Option<Kept>,
    pub next: Option<Connection>,
}

/// A connection left open after its session moved on, with its session stream: dropping
/// the stream would finish it, which the broker takes for the agent leaving, and the
/// appliance would be unreachable until the next session is welcomed.
pub(crate) struct Kept {
    pub conn: Connection,
    pub session_stream: Option<(SendStream, RecvStream)>,
}

impl Kept {
    /// Close the connection with `normal`, then let the stream go.
    pub fn close(self) {
        self.conn.close(
            VarInt::from_u32(CloseCode::Normal.code()),
            CloseCode::Normal.as_str().as_bytes(),
        );
        drop(self.session_stream);
    }
}

impl SessionEnd {
    /// Whether the broker welcomed the agent.
    pub fn was_established(&self) -> bool {
        self.session_id.is_some()
    }
}

/// What a session needs besides the connection. Built by [`crate::Agent`] or by
/// [`connect_once`].
#[derive(Clone)]
pub(crate) struct SessionContext {
    pub creds: Credentials,
    pub cfg: AgentConfig,
    pub runner: Arc<CommandRunner>,
    pub events: broadcast::Sender<AgentEvent>,
    /// The highest renewal generation relayed ([`crate::Agent::renewal_requests`]).
    pub renewal: watch::Sender<u64>,
    /// `auto` transport: how a session on TCP tries QUIC again.
    pub probe: Option<QuicProbe>,
}

/// What a session on TCP needs to try QUIC to its broker again (`auto` transport).
#[derive(Clone)]
pub(crate) struct QuicProbe {
    pub endpoint: quinn::Endpoint,
    pub client_config: quinn::ClientConfig,
}

/// Keep the highest renewal generation relayed; receivers are woken only when it rises
/// (a broker repeats the generation it already sent on a later heartbeat answer).
fn note_renewal(renewal: &watch::Sender<u64>, generation: u64) {
    renewal.send_if_modified(|highest| {
        let newer = generation > *highest;
        *highest = (*highest).max(generation);
        newer
    });
}

/// Yamux settings of the agent's side of a TCP connection: the broker opens a stream per
/// command and tunnel connection.
const TCP_SETTINGS: tether_transport::tcp::Settings = tether_transport::tcp::Settings {
    max_streams: 256,
    protocol_error: CloseCode::ProtocolError.code() as u64,
};

/// Start a TLS-over-TCP connection to `broker` and wait for the handshake (at most
/// `timeout`). `tcp` is the connected socket's future (direct, or through a proxy).
pub async fn connect_tcp<F>(
    tcp: F,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Connection, ConnectError>
where
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
{
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| {
        ConnectError::Handshake(DisconnectReason::Transport(format!(
            "bad server name {server_name:?}: {e}"
        )))
    })?;
    let handshake = async {
        let tcp = tcp.await.map_err(|e| {
            ConnectError::Handshake(DisconnectReason::Transport(format!("tcp: {e}")))
        })?;
        if let Err(e) = tether_transport::tcp::tune(&tcp, crate::tls::IDLE_TIMEOUT) {
            tracing::debug!(error = %e, "cannot set TCP options");
        }
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Handshake(tls_failure(&e)))?;
        Ok(Connection::from(tether_transport::tcp::Connection::client(
            tls,
            TCP_SETTINGS,
        )))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// A TLS handshake failure over TCP, in the words QUIC's would have.
fn tls_failure(e: &std::io::Error) -> DisconnectReason {
    match tether_transport::tcp::alert_received(e) {
        Some(closed) => DisconnectReason::from_connection_error(&closed, None),
        None => DisconnectReason::Transport(format!("tls: {e}")),
    }
}

/// Try QUIC to `broker` every `every` until a handshake completes; never without `probe`.
async fn quic_probe(
    probe: Option<&QuicProbe>,
    broker: SocketAddr,
    every: Duration,
    timeout: Duration,
) -> Connection {
    let Some(p) = probe else {
        return std::future::pending().await;
    };
    let server_name = broker.ip().to_string();
    loop {
        tokio::time::sleep(every).await;
        match connect(
            &p.endpoint,
            broker,
            &server_name,
            p.client_config.clone(),
            timeout,
        )
        .await
        {
            Ok(c) => return c,
            Err(e) => tracing::debug!(error = %e, "QUIC still unavailable; staying on TCP"),
        }
    }
}

fn now() -> Now {
    Now {
        instant: Instant::now().into_std(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0),
    }
}

/// Start a QUIC connection to `broker` and wait for the handshake (at most `timeout`).
///
/// `server_name` is only used for SNI; the broker is identified by its certificate's SPIFFE
/// URI ([`crate::BrokerVerifier`]).
pub async fn connect(
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    server_name: &str,
    client_config: quinn::ClientConfig,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let connecting = endpoint.connect_with(client_config, broker, server_name)?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn.into()),
        Ok(Err(e)) => Err(ConnectError::Handshake(
            DisconnectReason::from_connection_error(&e, None),
        )),
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// One attempt: connect to `broker`, run the session until it ends or `shutdown` fires,
/// and report how it ended. Commands run with a runner private to this attempt.
pub async fn connect_once(
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    client_config: quinn::ClientConfig,
    creds: &Credentials,
    cfg: &AgentConfig,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, ConnectError> {
    let ctx = SessionContext {
        creds: creds.clone(),
        cfg: cfg.clone(),
        runner: Arc::new(CommandRunner::new(cfg)),
        events: broadcast::channel(16).0,
        renewal: watch::Sender::new(0),
        probe: None,
    };
    let server_name = broker.ip().to_string();
    let conn = tokio::select! {
        r = connect(endpoint, broker, &server_name, client_config, cfg.connect_timeout) => r?,
        _ = shutdown.cancelled() => return Err(ConnectError::Shutdown),
    };
    let (end, handover) = run_session(conn, broker, &ctx, shutdown).await;
    if let Some(old) = handover.kept {
        old.close();
    }
    if let Some(next) = handover.next {
        next.close(
            VarInt::from_u32(CloseCode::Normal.code()),
            CloseCode::Normal.as_str().as_bytes(),
        );
    }
    Ok(end)
}

/// Drive a session on an established connection until it ends.
///
/// `broker` is the address dialled; it names the broker in events and logs (the
/// connection's remote address may be its IPv4-mapped IPv6 form).
///
/// After a `GoAway` the session is left when the broker's delay has passed, but the
/// connection is returned open (make before break): the caller closes it with `normal`
/// once the session on the next broker is welcomed, or its attempt failed, so the
/// appliance stays reachable while it moves.
pub(crate) async fn run_session(
    conn: Connection,
    broker: SocketAddr,
    ctx: &SessionContext,
    shutdown: &CancellationToken,
) -> (SessionEnd, Handover) {
    let span = tracing::info_span!("session", %broker, conn_id = conn.stable_id());
    async {
        let started = Instant::now();
        let mut driver = Driver {
            conn: conn.clone(),
            broker,
            ctx,
            session_id: None,
            go_away: None,
            go_away_received: None,
            local_close: None,
            commands: JoinSet::new(),
            draining: CancellationToken::new(),
            handed_over: false,
            upgrade: None,
            session_stream: None,
            peer_max_frame_len: watch::channel(0).0,
            status_generation: None,
            tunnel_status: Vec::new(),
            tunnel_status_at: None,
        };
        let reason = driver.run(shutdown).await;
        if driver.session_id.is_some() {
            // Break glass: tunnel sessions count the time without any broker session.
            if let Some(tunnels) = ctx.runner.tunnels() {
                tunnels.broker_down(conn.stable_id());
            }
        }
        if !driver.handed_over {
            // The connection is closed: each running command sees that, kills its process
            // and signs its manifest (kept in the spool for the next session). Let them.
            let wind_down = async { while driver.commands.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(COMMAND_WIND_DOWN, wind_down).await;
        }
        driver.commands.abort_all();
        let reason = match reason {
            Some(r) => r,
            None => DisconnectReason::Local(driver.local_close.unwrap_or(CloseCode::Normal)),
        };
        let kept = driver.handed_over.then(|| Kept {
            conn: driver.conn.clone(),
            session_stream: driver.session_stream.take(),
        });
        let end = SessionEnd {
            broker,
            session_id: driver.session_id,
            duration: started.elapsed(),
            reason,
            go_away: driver.go_away,
            go_away_received: driver.go_away_received,
        };
        let next = driver.upgrade.take();
        (end, Handover { kept, next })
    }
    .instrument(span)
    .await
}

struct Driver<'a> {
    conn: Connection,
    broker: SocketAddr,
    ctx: &'a SessionContext,
    session_id: Option<u64>,
    go_away: Option<GoAway>,
    go_away_received: Option<Instant>,
    local_close: Option<CloseCode>,
    commands: JoinSet<()>,
    /// Fired on `GoAway`: new commands are refused.
    draining: CancellationToken,
    /// Left after a `GoAway` with the connection still open, for the caller to close.
    handed_over: bool,
    /// A QUIC connection found working while this session ran on TCP.
    upgrade: Option<Connection>,
    /// The session stream, kept open after a hand-over.
    session_stream: Option<(SendStream, RecvStream)>,
    /// The broker's frame limit from `Welcome` (0 until it arrives): every frame sent on
    /// this connection fits it.
    peer_max_frame_len: watch::Sender<usize>,
    /// Signed operations: the version of the customer's files last reported in `Status`.
    status_generation: Option<u64>,
    /// Break glass: the tunnel entries last reported in `Status`, and when.
    tunnel_status: Vec<(String, String)>,
    tunnel_status_at: Option<Instant>,
}

impl Driver<'_> {
    /// Signed operations: report the customer's rules in `Status` (read only: no frame
    /// writes them) when they changed since the last report, once the session is up; and
    /// the tunnel entries when a session started or ended or a teardown failed (at once),
    /// or when only the counters moved (at most every
    /// [`crate::tunnel::COUNTERS_REPORT_EVERY`]).
    fn report_status(&mut self, session: &mut AgentSession) {
        let Some(ops) = self.ctx.runner.signed_ops() else {
            return;
        };
        if self.session_id.is_none() {
            return;
        }
        let generation = ops.customer_generation();
        let tunnel = self
            .ctx
            .runner
            .tunnels()
            .map(|t| t.status())
            .unwrap_or_default();
        let tunnel_changed = tunnel != self.tunnel_status;
        let significant = |entries: &[(String, String)]| {
            entries
                .iter()
                .filter(|(k, _)| k == "tunnel.active" || k == "tunnel.teardown_failed")
                .cloned()
                .collect::<Vec<_>>()
        };
        let tunnel_due = tunnel_changed
            && (significant(&tunnel) != significant(&self.tunnel_status)
                || self
                    .tunnel_status_at
                    .is_none_or(|at| at.elapsed() >= crate::tunnel::COUNTERS_REPORT_EVERY));
        if self.status_generation == Some(generation) && !tunnel_due {
            return;
        }
        self.status_generation = Some(generation);
        let mut entries = ops.status();
        entries.extend(tunnel.iter().cloned());
        self.tunnel_status = tunnel;
        self.tunnel_status_at = Some(Instant::now());
        entries.truncate(tether_proto::frame::MAX_STATUS_ENTRIES);
        session.send_status(tether_proto::Status { entries });
    }

    /// Signed operations: re-send the manifests whose delivery was never confirmed (a
    /// connection lost mid-command), to a broker whose `Welcome` takes them.
    fn send_backlog(&mut self, session: &mut AgentSession) {
        let Some(ops) = self.ctx.runner.signed_ops() else {
            return;
        };
        if !session.accepts_backlog() {
            return;
        }
        let backlog = ops.spool().list();
        if !backlog.is_empty() {
            tracing::info!(
                manifests = backlog.len(),
                "re-sending undelivered manifests"
            );
        }
        for m in backlog {
            session.send_backlog(m);
        }
    }

    /// Leave after a `GoAway`'s delay without closing: see [`run_session`].
    fn hand_over(&mut self) -> Option<DisconnectReason> {
        self.handed_over = true;
        self.local_close = Some(CloseCode::Normal);
        Some(DisconnectReason::Local(CloseCode::Normal))
    }

    fn close(&mut self, code: CloseCode) -> Option<DisconnectReason> {
        self.conn
            .close(VarInt::from_u32(code.code()), code.as_str().as_bytes());
        self.local_close = Some(code);
        Some(DisconnectReason::Local(code))
    }

    fn lost(&self, e: &quinn::ConnectionError) -> Option<DisconnectReason> {
        Some(DisconnectReason::from_connection_error(e, self.local_close))
    }

    /// Run until the session ends; the reason (None means "closed locally").
    async fn run(&mut self, shutdown: &CancellationToken) -> Option<DisconnectReason> {
        let (mut send, mut recv) = tokio::select! {
            r = self.conn.open_bi() => match r {
                Ok(s) => s,
                Err(e) => return self.lost(&e),
            },
            _ = shutdown.cancelled() => return self.close(CloseCode::Normal),
        };
        let creds = &self.ctx.creds;
        let mut session = self.new_session();
        let mut decoder = FrameDecoder::new(self.ctx.cfg.max_frame_len);
        let mut out = BytesMut::new();
        // Deadline for leaving after a GoAway: running commands get until then.
        let mut leave_at: Option<Instant> = None;
        // Signed operations: how often to look for a change of the customer's files to
        // report (a lockdown shows in control within about a second).
        let mut status_check = self.ctx.runner.signed_ops().map(|_| {
            let mut i = tokio::time::interval(crate::signed::STATUS_CHECK_EVERY);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        // `auto` on TCP: try QUIC now and then; once it works, move (make before break).
        let cfg = &self.ctx.cfg;
        let probing = self.conn.transport() == tether_transport::Transport::Tcp
            && cfg.transport == crate::config::TransportMode::Auto;
        let probe = quic_probe(
            self.ctx.probe.as_ref().filter(|_| probing),
            self.broker,
            cfg.quic_retry_every,
            cfg.quic_fallback_after.max(cfg.connect_timeout),
        );
        tokio::pin!(probe);

        loop {
            // 1. Write whatever the state machine queued.
            if let ControlFlow::Break(reason) = self
                .flush(&mut session, &mut out, &mut send, shutdown)
                .await
            {
                return reason;
            }

            // 2. React to what happened.
            self.on_events(&mut session, &mut leave_at);

            let timeout = session.poll_timeout();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    tracing::info!("shutting down session");
                    return self.close(CloseCode::Normal);
                }
                chunk = recv.read_chunk(READ_CHUNK) => {
                    if let ControlFlow::Break(reason) =
                        self.on_read(chunk, &mut decoder, &mut session)
                    {
                        return reason;
                    }
                }
                _ = sleep_until_std(timeout) => {
                    let t = now();
                    session.set_certificate(creds.not_after_ms(), creds.trust_state(t.unix_ms));
                    if let Some(code) = session.handle_timeout(t) {
                        tracing::warn!(%code, "broker went silent");
                        return self.close(code);
                    }
                }
                stream = self.conn.accept_bi() => {
                    match stream {
                        Ok((send, recv)) => self.spawn_command(send, recv),
                        Err(e) => return self.lost(&e),
                    }
                }
                Some(_) = self.commands.join_next(), if !self.commands.is_empty() => {}
                _ = tick(&mut status_check), if status_check.is_some() => {
                    self.report_status(&mut session);
                }
                quic = &mut probe, if self.session_id.is_some() && leave_at.is_none() => {
                    tracing::info!("QUIC works again: moving the session to QUIC (make before break)");
                    self.upgrade = Some(quic);
                    self.session_stream = Some((send, recv));
                    return self.hand_over();
                }
                _ = sleep_until(leave_at), if leave_at.is_some() => {
                    // Stay until the delay the broker asked for has passed (it spreads
                    // its fleet's reconnections), then move to the next broker while
                    // this connection stays open.
                    if !self.commands.is_empty() {
                        tracing::info!(running = self.commands.len(),
                            "goaway delay passed with commands still running; leaving");
                    }
                    self.session_stream = Some((send, recv));
                    return self.hand_over();
                }
            }
        }
    }

    /// The session state machine, announcing this agent's version, capabilities and
    /// certificate.
    fn new_session(&self) -> AgentSession {
        let creds = &self.ctx.creds;
        let cfg = &self.ctx.cfg;
        let mut capabilities = vec![CAPABILITY_EXEC.to_owned()];
        if cfg.allow_shell {
            capabilities.push(CAPABILITY_SHELL.to_owned());
        }
        capabilities.push(CAPABILITY_MAX_FRAME_LEN.to_owned());
        if self.ctx.runner.signed_ops().is_some() {
            capabilities.push(tether_proto::capability::SIGNED_OPS.to_owned());
            capabilities.push(tether_proto::capability::MANIFEST_BACKLOG.to_owned());
            capabilities.push(tether_proto::capability::TUNNEL.to_owned());
        }
        // Where the transport itself notices a silent broker, answers to heartbeats are
        // not needed, only news is: QUIC acknowledges each heartbeat and ends a connection
        // idle for its idle timeout; direct TCP does the same with `TCP_USER_TIMEOUT`
        // (unacknowledged data) and keep-alive probes. Not through an egress proxy, which
        // acknowledges for a broker that may be gone.
        let transport_notices = match self.conn.transport() {
            tether_transport::Transport::Quic => true,
            tether_transport::Transport::Tcp => cfg.proxy.proxy().is_none(),
        };
        if transport_notices {
            capabilities.push(tether_proto::capability::SPARSE_HEARTBEAT_ACKS.to_owned());
            capabilities.push(tether_proto::capability::QUIET_HEARTBEATS.to_owned());
        }
        // QUIC's keep-alive PING (every `tls::KEEP_ALIVE_INTERVAL` of silence) keeps the
        // path alive between sparse heartbeats; it wakes nothing but the broker's QUIC
        // stack. Over TCP a keep-alive probe crosses no proxy and reaches no broker task.
        if self.conn.transport() == tether_transport::Transport::Quic {
            capabilities.push(tether_proto::capability::SPARSE_HEARTBEATS.to_owned());
        }
        let t0 = now();
        AgentSession::new(
            AgentSessionConfig {
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                capabilities,
                cert_not_after_ms: creds.not_after_ms(),
                trust_state: creds.trust_state(t0.unix_ms),
                welcome_timeout: cfg.connect_timeout,
                missed_heartbeats: tether_proto::session::DEFAULT_MISSED_HEARTBEATS,
                manual_renewal_generation: 0,
            },
            t0,
        )
    }

    /// Write the frames the state machine queued; `Break` with the reason when the session
    /// ended meanwhile.
    async fn flush(
        &mut self,
        session: &mut AgentSession,
        out: &mut BytesMut,
        send: &mut SendStream,
        shutdown: &CancellationToken,
    ) -> ControlFlow<Option<DisconnectReason>> {
        // Within the broker's limit too (`Status` can be larger than a small limit).
        let limit = self.ctx.cfg.max_frame_len.min(session.peer_max_frame_len());
        while let Some(frame) = session.poll_transmit() {
            if let Err(e) = tether_proto::encode_frame(&frame, out, limit) {
                tracing::error!(error = %e, "cannot encode session frame");
                return ControlFlow::Break(self.close(CloseCode::Internal));
            }
        }
        if !out.is_empty() {
            let write = send.write_all(out);
            let r = tokio::select! {
                r = write => r,
                _ = shutdown.cancelled() => return ControlFlow::Break(self.close(CloseCode::Normal)),
            };
            if let Err(e) = r {
                return ControlFlow::Break(match e {
                    quinn::WriteError::ConnectionLost(e) => self.lost(&e),
                    other => {
                        tracing::warn!(error = %other, "session stream closed by broker");
                        self.close(CloseCode::ProtocolError)
                    }
                });
            }
            out.clear();
        }
        ControlFlow::Continue(())
    }

    /// Act on the state machine's events: report the `Welcome`, relay renewal requests,
    /// start draining on `GoAway` (setting `leave_at` on the first).
    fn on_events(&mut self, session: &mut AgentSession, leave_at: &mut Option<Instant>) {
        while let Some(event) = session.poll_event() {
            match event {
                tether_proto::AgentEvent::Welcome(w) => {
                    tracing::info!(
                        session_id = w.session_id,
                        heartbeat_ms = w.heartbeat_interval_ms,
                        broker_max_frame_len = w.peer_max_frame_len(),
                        "session established"
                    );
                    self.peer_max_frame_len.send_replace(w.peer_max_frame_len());
                    self.session_id = Some(w.session_id);
                    if let Some(tunnels) = self.ctx.runner.tunnels() {
                        tunnels.broker_up(self.conn.stable_id());
                    }
                    self.status_generation = None;
                    self.report_status(session);
                    self.send_backlog(session);
                    let _ = self.ctx.events.send(AgentEvent::Connected {
                        broker: self.broker,
                        session_id: w.session_id,
                    });
                }
                tether_proto::AgentEvent::ManifestAck(seq) => {
                    if let Some(ops) = self.ctx.runner.signed_ops() {
                        ops.spool().remove(seq);
                    }
                }
                tether_proto::AgentEvent::HeartbeatAck(ack) => {
                    tracing::trace!(seq = ack.seq, "heartbeat acknowledged");
                }
                tether_proto::AgentEvent::RenewalRequested { generation } => {
                    tracing::info!(
                        generation,
                        "broker relays a request to renew the certificate"
                    );
                    note_renewal(&self.ctx.renewal, generation);
                    let _ = self
                        .ctx
                        .events
                        .send(AgentEvent::RenewalRequested { generation });
                }
                tether_proto::AgentEvent::GoAway(g) => {
                    tracing::info!(reason = ?g.reason, reconnect_after_ms = g.reconnect_after_ms,
                        message = %g.message, "broker sent goaway; draining");
                    let _ = self.ctx.events.send(AgentEvent::GoAway {
                        broker: self.broker,
                        reason: g.reason,
                        reconnect_after: Duration::from_millis(u64::from(g.reconnect_after_ms)),
                    });
                    self.draining.cancel();
                    if leave_at.is_none() {
                        self.go_away_received = Some(Instant::now());
                        *leave_at = Some(
                            Instant::now() + Duration::from_millis(u64::from(g.reconnect_after_ms)),
                        );
                    }
                    self.go_away = Some(g);
                }
            }
        }
    }

    /// Feed what the session stream read to the state machine; `Break` with the reason
    /// when the session ended.
    fn on_read(
        &mut self,
        chunk: Result<Option<bytes::Bytes>, quinn::ReadError>,
        decoder: &mut FrameDecoder,
        session: &mut AgentSession,
    ) -> ControlFlow<Option<DisconnectReason>> {
        match chunk {
            Ok(Some(chunk)) => {
                decoder.push(&chunk);
                let t = now();
                loop {
                    match decoder.poll_frame() {
                        Ok(Some(frame)) => {
                            if let Err(v) = session.handle_frame(frame, t) {
                                return ControlFlow::Break(self.violation(&v));
                            }
                        }
                        Ok(None) => return ControlFlow::Continue(()),
                        Err(e) => {
                            return ControlFlow::Break(
                                self.violation(&ProtocolViolation::Decode(e)),
                            )
                        }
                    }
                }
            }
            Ok(None) => {
                tracing::warn!("broker finished the session stream");
                ControlFlow::Break(self.close(CloseCode::ProtocolError))
            }
            Err(quinn::ReadError::ConnectionLost(e)) => ControlFlow::Break(self.lost(&e)),
            Err(e) => {
                tracing::warn!(error = %e, "session stream failed");
                ControlFlow::Break(self.close(CloseCode::ProtocolError))
            }
        }
    }

    fn violation(&mut self, v: &ProtocolViolation) -> Option<DisconnectReason> {
        tracing::warn!(error = %v, kind = v.kind(), "broker broke the protocol");
        self.close(CloseCode::ProtocolError)
    }

    fn spawn_command(&mut self, send: SendStream, recv: RecvStream) {
        let conn = self.conn.clone();
        let runner = self.ctx.runner.clone();
        let events = self.ctx.events.clone();
        let limits = FrameLimits {
            own: self.ctx.cfg.max_frame_len,
            peer: self.peer_max_frame_len.subscribe(),
        };
        let draining = self.draining.clone();
        let span = tracing::info_span!("command", stream = %send.id());
        self.commands.spawn(
            serve_command(conn, runner, events, limits, draining, send, recv).instrument(span),
        );
    }
}

/// The frame limits of one command stream.
struct FrameLimits {
    /// The agent's own `max_frame_len`: what it reads.
    own: usize,
    /// The broker's, from `Welcome` (0 until it arrives).
    peer: watch::Receiver<usize>,
}

impl FrameLimits {
    /// The largest frame to send: the broker's limit once its `Welcome` was read. A
    /// command stream can overtake the `Welcome` on the session stream (QUIC orders bytes
    /// within a stream only), so wait for it; the broker opens command streams only after
    /// it sent `Welcome`. Should it not come, fall back to the smallest limit a broker
    /// may have.
    async fn for_sending(&mut self) -> usize {
        let peer =
            match tokio::time::timeout(COMMAND_REQUEST_TIMEOUT, self.peer.wait_for(|m| *m != 0))
                .await
            {
                Ok(Ok(m)) => *m,
                _ => tether_proto::MIN_MAX_FRAME_LEN,
            };
        peer.min(self.own)
    }
}

/// Serve one broker-opened command stream: read the request, run it, finish the stream.
/// Whatever happens, the stream ends with a `CommandResult` and FIN, or with
/// RESET_STREAM when the result cannot be written: never with FIN and no result.
async fn serve_command(
    conn: Connection,
    runner: Arc<CommandRunner>,
    events: broadcast::Sender<AgentEvent>,
    mut limits: FrameLimits,
    draining: CancellationToken,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let max_frame_len = limits.own;
    let first = tokio::time::timeout(
        COMMAND_REQUEST_TIMEOUT,
        read_first_frame(&mut recv, max_frame_len),
    )
    .await;
    // Break glass: the same streams carry tunnels to an agent that announced `tunnel/1`.
    let first = match (first, runner.tunnels()) {
        (Ok(Ok(Frame::TunnelOpen(open))), Some(tunnels)) => {
            let limit = limits.for_sending().await;
            return tunnels
                .serve_open(conn.stable_id(), open, send, recv, limit)
                .await;
        }
        (Ok(Ok(Frame::TunnelClose(close))), Some(tunnels)) => {
            let limit = limits.for_sending().await;
            return tunnels
                .serve_close(conn.stable_id(), close, send, limit)
                .await;
        }
        (Ok(Ok(Frame::TunnelConnect(connect))), Some(tunnels)) => {
            let limit = limits.for_sending().await;
            return tunnels
                .serve_connect(conn.stable_id(), connect, send, recv, limit)
                .await;
        }
        (Ok(Ok(Frame::CommandRequest(req))), _) => Ok(Ok(req)),
        (Ok(Ok(other)), _) => Ok(Err(RequestError::Violation(
            ProtocolViolation::UnexpectedFrame {
                frame: other.frame_type(),
                state: "awaiting command request",
            },
        ))),
        (Ok(Err(e)), _) => Ok(Err(e)),
        (Err(e), _) => Err(e),
    };
    let req = match first {
        Ok(Ok(req)) => req,
        Ok(Err(RequestError::Violation(v))) => {
            tracing::warn!(error = %v, "invalid command stream");
            let code = CloseCode::ProtocolError;
            conn.close(VarInt::from_u32(code.code()), code.as_str().as_bytes());
            return;
        }
        Ok(Err(RequestError::Stream(e))) => {
            tracing::debug!(error = %e, "command stream failed before the request");
            // Dropping `send` would finish it: a FIN without a result.
            let _ = send.reset(VarInt::from_u32(0));
            return;
        }
        Err(_) => {
            tracing::warn!("no command request in time; resetting the stream");
            let _ = send.reset(VarInt::from_u32(0));
            return;
        }
    };
    let command_id = req.command_id;
    tracing::info!(command_id, kind = ?req.kind, argc = req.argv.len(), "command requested");

    let cancel = CancellationToken::new();
    // Cancel when the broker stops our send side, resets its own, or the connection ends.
    let stopped = send.stopped();
    let watch_cancel = cancel.clone();
    let watcher = tokio::spawn(async move {
        tokio::select! {
            _ = stopped => {}
            _ = wait_reset(&mut recv) => {}
        }
        watch_cancel.cancel();
    });

    let send_limit = limits.for_sending().await;
    let mut spooled = None;
    let result = if draining.is_cancelled() {
        let outcome = failed(tether_proto::FailureReason::Refused, "agent is draining");
        write_result(&mut send, send_limit, command_id, &outcome)
            .await
            .map(|()| outcome)
    } else {
        runner
            .run_spooling(&req, &mut send, &cancel, send_limit, &mut spooled)
            .await
    };
    watcher.abort();
    match result {
        Ok(outcome) => {
            let _ = send.finish();
            if let (Some(seq), Some(ops)) = (spooled, runner.signed_ops()) {
                confirm_delivery(&send, ops, seq).await;
            }
            let _ = events.send(AgentEvent::CommandFinished {
                command_id,
                outcome,
            });
        }
        Err(e) => {
            tracing::info!(command_id, error = %e, "command stream ended early");
            // Reset, not finish (which dropping the stream would do): a stream finished
            // without a result is a protocol error on the broker's side.
            let _ = send.reset(VarInt::from_u32(0));
            let outcome = failed(tether_proto::FailureReason::Cancelled, e.to_string());
            let _ = events.send(AgentEvent::CommandFinished {
                command_id,
                outcome,
            });
        }
    }
}

/// Drop manifest `seq` from the spool once the broker acknowledged every byte of its
/// command stream (QUIC acknowledgements: it holds the manifest). A stream stopped, a
/// connection lost or no answer in time keeps it for the next session's backlog.
async fn confirm_delivery(send: &SendStream, ops: &crate::signed::SignedOps, seq: u64) {
    match tokio::time::timeout(DELIVERY_CONFIRM_TIMEOUT, send.stopped()).await {
        Ok(Ok(None)) => ops.spool().remove(seq),
        other => tracing::info!(
            seq,
            ?other,
            "manifest delivery not confirmed; kept for re-sending"
        ),
    }
}

async fn write_result(
    send: &mut SendStream,
    max_frame_len: usize,
    command_id: u64,
    outcome: &CommandOutcome,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    tether_proto::encode_frame(
        &Frame::CommandResult(tether_proto::CommandResult {
            command_id,
            outcome: outcome.clone(),
        }),
        &mut buf,
        max_frame_len,
    )
    .map_err(std::io::Error::other)?;
    send.write_all(&buf).await.map_err(std::io::Error::from)
}

enum RequestError {
    Violation(ProtocolViolation),
    Stream(String),
}

/// Read exactly the first frame of a broker-opened stream (bounded by `max_frame_len`)
/// and not one byte more: on a tunnel connection stream raw bytes follow it.
async fn read_first_frame(
    recv: &mut RecvStream,
    max_frame_len: usize,
) -> Result<Frame, RequestError> {
    let truncated = || {
        RequestError::Violation(ProtocolViolation::Decode(
            tether_proto::DecodeError::Truncated("first frame"),
        ))
    };
    let read_err = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::FinishedEarly(_) => truncated(),
        quinn::ReadExactError::ReadError(e) => RequestError::Stream(e.to_string()),
    };
    let mut buf = BytesMut::zeroed(tether_proto::FRAME_HEADER_LEN);
    recv.read_exact(&mut buf).await.map_err(read_err)?;
    // The header alone: refused here when `len` is zero or over the limit.
    if let Err(e) = tether_proto::decode_frame(&mut buf.clone(), max_frame_len) {
        return Err(RequestError::Violation(ProtocolViolation::Decode(e)));
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    buf.resize(tether_proto::FRAME_HEADER_LEN + len, 0);
    recv.read_exact(&mut buf[tether_proto::FRAME_HEADER_LEN..])
        .await
        .map_err(read_err)?;
    match tether_proto::decode_frame(&mut buf, max_frame_len) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(truncated()),
        Err(e) => Err(RequestError::Violation(ProtocolViolation::Decode(e))),
    }
}

/// Completes when the broker resets its side of a command stream or the connection ends;
/// never when it merely finishes its side.
async fn wait_reset(recv: &mut RecvStream) {
    loop {
        match recv.read_chunk(READ_CHUNK).await {
            Ok(Some(_)) => continue, // nothing more is expected; discard
            Ok(None) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// The next tick of an optional interval (never without one).
async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_std(at: Option<std::time::Instant>) {
    sleep_until(at.map(Instant::from_std)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal request must reach the supervisor however many other events it missed:
    /// the broadcast keeps only the last few, the watch keeps the highest generation.
    #[tokio::test]
    async fn a_renewal_request_survives_a_lagging_subscriber() {
        let (events, mut lagging) = broadcast::channel(crate::agent::EVENT_CHANNEL_CAPACITY);
        let renewal = watch::Sender::new(0);
        let mut requests = renewal.subscribe();
        note_renewal(&renewal, 3);
        let _ = events.send(AgentEvent::RenewalRequested { generation: 3 });
        // Then a burst of command results, more than the channel holds.
        for command_id in 0..4 * crate::agent::EVENT_CHANNEL_CAPACITY as u64 {
            let _ = events.send(AgentEvent::CommandFinished {
                command_id,
                outcome: tether_proto::CommandOutcome::Exited(0),
            });
        }
        assert!(matches!(
            lagging.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        // The request is still there, once.
        assert!(requests.has_changed().unwrap());
        assert_eq!(*requests.borrow_and_update(), 3);
        // A repeat or an older generation does not wake the supervisor or lower it.
        note_renewal(&renewal, 3);
        note_renewal(&renewal, 2);
        assert!(!requests.has_changed().unwrap());
        note_renewal(&renewal, 4);
        assert_eq!(*requests.borrow_and_update(), 4);
    }
}
