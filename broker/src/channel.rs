//! The control channel (control mode): one long-lived connection to control that carries
//! the allowlist down and presence and command events up. The contract is
//! [`tether_proto::cluster`].
//!
//! [`ControlSync::run`] dials control's HTTPS port with the broker's certificate (the
//! current one from the [`CertStore`](crate::tls::CertStore), so a renewal applies to the
//! next connection), upgrades `GET /v1/brokers/channel` to `tether-cluster/1`, and then:
//!
//! - sends `Hello` with its name, QUIC address, allowlist version and every live session;
//! - applies a snapshot whole at `SnapshotEnd` and each delta as it comes, through
//!   [`crate::apply_change`] (the same path as the file source: live sessions of removed
//!   fingerprints are closed as revoked), answers `Applied`, and has the snapshot written
//!   to the data directory in the background ([`SnapshotWriter`]);
//! - treats a delta whose version is not the current one plus one as a protocol error:
//!   it drops the channel and reconnects, and control resends from its version;
//! - forwards session up/down as they happen and the latest heartbeat of each session at
//!   most once a second ([`PresenceRx`]);
//! - records manual-renewal generations, closes sessions on request, and runs commands,
//!   each in its own task so a slow one never holds the channel;
//! - pings after [`CHANNEL_PING_SECS`] of quiet and gives up after
//!   [`CHANNEL_IDLE_TIMEOUT_SECS`] without a frame from control.
//!
//! When the channel ends it reconnects with full-jitter exponential backoff
//! ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]); meanwhile the broker enforces the allowlist it
//! holds, and `tether_broker_allowlist_stale` is 1.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tether_proto::cluster::{
    self, HeartbeatSummary, SessionReport, ToBroker, ToControl, CHANNEL_IDLE_TIMEOUT_SECS,
    CHANNEL_PATH, CHANNEL_PING_SECS, MAX_FRAME_LEN,
};
use tether_proto::CommandFailure;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::allowlist::{ApplianceId, Change, Entry, Fingerprint};
use crate::control_tls::{client_config, ControlVerifier};
use crate::datadir::{check_control_url, BrokerIdentity};
use crate::presence::{Presence, PresenceEvent, PresenceRx};
use crate::server::{Broker, CommandEvent, CommandSpec};
use crate::snapshot::SnapshotWriter;

/// First reconnect delay bound.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest reconnect delay bound.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Time limit of TCP connect, TLS handshake and upgrade together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of heartbeat batches.
pub const HEARTBEAT_BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Most sessions in `Hello` (the rest follow as `SessionUp`, so `Hello` stays well under
/// [`MAX_FRAME_LEN`] on a broker with a large fleet).
pub const HELLO_MAX_SESSIONS: usize = 5_000;
/// Most summaries in one `Heartbeats` frame.
pub const HEARTBEATS_MAX_ITEMS: usize = 5_000;
/// Command events waiting to be sent (command tasks wait when it is full; the channel
/// does not).
pub const COMMAND_QUEUE: usize = 256;
/// Largest error body read from a refused upgrade.
const MAX_ERROR_BODY: usize = 16 * 1024;

type Channel = Framed<TokioIo<hyper::upgrade::Upgraded>, LengthDelimitedCodec>;

/// Why a channel ended. Counted in `tether_broker_control_channel_errors_total{reason}`
/// with [`ChannelError::reason`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// TCP connect failed or timed out (control down or unreachable; retrying helps).
    #[error("cannot connect to control: {0}")]
    Connect(String),
    /// The TLS handshake failed (often: control's certificate was refused, or control
    /// refused ours).
    #[error("TLS handshake with control failed: {0}")]
    Tls(String),
    /// Control answered the upgrade with an error.
    #[error("control refused the channel ({status}): {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Control's error code.
        code: String,
        /// Control's message.
        message: String,
    },
    /// The HTTP exchange failed.
    #[error("channel upgrade failed: {0}")]
    Http(String),
    /// Control closed the channel.
    #[error("control closed the channel")]
    Closed,
    /// Nothing from control for [`CHANNEL_IDLE_TIMEOUT_SECS`].
    #[error("no frame from control for {CHANNEL_IDLE_TIMEOUT_SECS}s")]
    Idle,
    /// Reading or writing failed, or a frame was too large.
    #[error("channel I/O failed: {0}")]
    Io(String),
    /// Control sent something the protocol does not allow (control's fault).
    #[error("protocol error from control: {0}")]
    Protocol(String),
    /// A delta that does not follow the version in force.
    #[error("delta to version {got} does not follow version {have}")]
    VersionGap {
        /// The version in force.
        have: u64,
        /// The delta's version.
        got: u64,
    },
    /// A delta whose digest is not the one its changes chain to from the digest in force:
    /// control's history is not the one this broker followed. The channel is dropped; the
    /// next `Hello` names the digest in force and control answers with a snapshot.
    #[error("delta to version {version} does not chain to the digest in force")]
    DigestMismatch {
        /// The delta's version.
        version: u64,
    },
    /// The allowlist refused a change (a corrupt source); the previous one stays.
    #[error("allowlist change refused: {0}")]
    Apply(String),
    /// Presence events were dropped; a fresh `Hello` resynchronises control.
    #[error("presence queue overflowed: resynchronising")]
    Resync,
    /// Control said it is shutting down ([`ToBroker::GoingAway`]).
    #[error("control is shutting down")]
    GoingAway,
}

impl ChannelError {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            ChannelError::Connect(_) => "connect",
            ChannelError::Tls(_) => "tls",
            ChannelError::Refused { .. } => "refused",
            ChannelError::Http(_) => "http",
            ChannelError::Closed => "closed",
            ChannelError::Idle => "idle",
            ChannelError::Io(_) => "io",
            ChannelError::Protocol(_) => "protocol",
            ChannelError::VersionGap { .. } => "version_gap",
            ChannelError::DigestMismatch { .. } => "digest_mismatch",
            ChannelError::Apply(_) => "apply",
            ChannelError::Resync => "resync",
            ChannelError::GoingAway => "going_away",
        }
    }
}

/// The snapshot being received.
#[derive(Debug)]
struct PendingSnapshot {
    version: u64,
    expected: u64,
    entries: Vec<Entry>,
}

/// Turns `ToBroker` allowlist messages into changes, checking order and completeness.
/// Sans-IO: `apply` is called with each complete change and the version in force.
#[derive(Debug, Default)]
pub struct SyncState {
    pending: Option<PendingSnapshot>,
    /// The digest of the version in force (lowercase hex; empty: unknown).
    held: String,
    /// The digest of the change last returned, until [`SyncState::applied`].
    staged: String,
}

/// What a `ToBroker` allowlist message asks for.
#[derive(Debug)]
pub enum SyncStep {
    /// Nothing yet (a snapshot is being collected).
    Continue,
    /// Apply this change.
    Apply(Change),
}

impl SyncState {
    /// A state whose version in force has digest `held` (empty: unknown).
    pub fn with_digest(held: String) -> Self {
        SyncState {
            held,
            ..Self::default()
        }
    }

    /// The change last returned was applied: its digest is now the one in force (empty
    /// when control sent none). Returns it.
    pub fn applied(&mut self) -> &str {
        self.held = std::mem::take(&mut self.staged);
        &self.held
    }

    /// Feed one allowlist message with the version in force. Errors are protocol errors:
    /// the channel is dropped.
    pub fn handle(&mut self, msg: ToBroker, current: u64) -> Result<SyncStep, ChannelError> {
        let protocol = |m: &str| Err(ChannelError::Protocol(m.to_owned()));
        match msg {
            ToBroker::SnapshotBegin { version, entries } => {
                if self.pending.is_some() {
                    return protocol("snapshot_begin inside a snapshot");
                }
                self.pending = Some(PendingSnapshot {
                    version,
                    expected: entries,
                    // Bounded: a hostile count must not reserve memory.
                    entries: Vec::with_capacity(entries.min(1 << 20) as usize),
                });
                Ok(SyncStep::Continue)
            }
            ToBroker::SnapshotChunk { entries } => {
                let Some(p) = self.pending.as_mut() else {
                    return protocol("snapshot_chunk outside a snapshot");
                };
                if p.entries.len() as u64 + entries.len() as u64 > p.expected {
                    return protocol("snapshot has more entries than announced");
                }
                for (a, f) in entries {
                    p.entries.push(parse_entry(&a, &f)?);
                }
                Ok(SyncStep::Continue)
            }
            ToBroker::SnapshotEnd { version, digest } => {
                let Some(p) = self.pending.take() else {
                    return protocol("snapshot_end outside a snapshot");
                };
                if p.version != version {
                    return protocol("snapshot_end version differs from snapshot_begin");
                }
                if p.entries.len() as u64 != p.expected {
                    return Err(ChannelError::Protocol(format!(
                        "snapshot announced {} entries, sent {}",
                        p.expected,
                        p.entries.len()
                    )));
                }
                self.staged = digest;
                Ok(SyncStep::Apply(Change::Replace {
                    version: Some(version),
                    entries: p.entries,
                }))
            }
            ToBroker::Delta {
                version,
                add,
                remove,
                digest,
            } => {
                if self.pending.is_some() {
                    return protocol("delta inside a snapshot");
                }
                if Some(version) != current.checked_add(1) {
                    return Err(ChannelError::VersionGap {
                        have: current,
                        got: version,
                    });
                }
                if !digest.is_empty() && !self.held.is_empty() {
                    let expected =
                        cluster::allowlist_digest_hex(&self.held, version, &add, &remove);
                    if expected.as_deref() != Some(digest.as_str()) {
                        return Err(ChannelError::DigestMismatch { version });
                    }
                }
                self.staged = digest;
                let add = add
                    .iter()
                    .map(|(a, f)| parse_entry(a, f))
                    .collect::<Result<Vec<_>, _>>()?;
                let remove = remove
                    .iter()
                    .map(|f| {
                        Fingerprint::from_hex(f).ok_or_else(|| {
                            ChannelError::Protocol(format!("invalid fingerprint {f:?}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(SyncStep::Apply(Change::Delta {
                    version: Some(version),
                    add,
                    remove,
                }))
            }
            _ => Ok(SyncStep::Continue),
        }
    }

    /// Whether a snapshot is being received.
    pub fn in_snapshot(&self) -> bool {
        self.pending.is_some()
    }
}

fn parse_entry(appliance: &str, fingerprint: &str) -> Result<Entry, ChannelError> {
    let appliance = ApplianceId::new(appliance)
        .map_err(|e| ChannelError::Protocol(format!("appliance {appliance:?}: {e}")))?;
    let fingerprint = Fingerprint::from_hex(fingerprint)
        .ok_or_else(|| ChannelError::Protocol(format!("invalid fingerprint {fingerprint:?}")))?;
    Ok(Entry {
        appliance,
        fingerprint,
    })
}

/// What a command task hands the channel.
#[derive(Debug)]
enum Outgoing {
    Frame(ToControl),
    Done(u64),
}

/// Dials control: TCP, TLS with the broker's certificate, then an HTTP/1.1 upgrade (the
/// cluster channel, and each tunnel connection's dial-back).
#[derive(Clone)]
struct Dialer {
    identity: BrokerIdentity,
    verifier: Arc<ControlVerifier>,
    broker: Arc<Broker>,
}

impl Dialer {
    /// `GET path` with `Upgrade: token`; the upgraded connection on `101`.
    async fn upgrade(
        &self,
        path: &str,
        token: &str,
    ) -> Result<hyper::upgrade::Upgraded, ChannelError> {
        let (host, port) =
            check_control_url(&self.identity.control_url).map_err(ChannelError::Connect)?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| ChannelError::Connect(format!("{host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = client_config(
            self.verifier.clone(),
            Some(self.broker.cert().clone()),
            crate::tls::provider(),
        )
        .map_err(|e| ChannelError::Tls(e.to_string()))?;
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| ChannelError::Connect(format!("{host}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(server_name, tcp)
            .await
            .map_err(|e| ChannelError::Tls(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ChannelError::Http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "control HTTP connection ended");
            }
        });
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let req = Request::get(path)
            .header(HOST, authority)
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, token)
            .body(Empty::<Bytes>::new())
            .map_err(|e| ChannelError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ChannelError::Http(crate::credential::error_chain(&e)))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ERROR_BODY)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let (code, message) = crate::credential::error_body(&body);
            return Err(ChannelError::Refused {
                status,
                code,
                message,
            });
        }
        hyper::upgrade::on(resp)
            .await
            .map_err(|e| ChannelError::Http(e.to_string()))
    }
}

/// Control's tunnel connection tokens: 32 lowercase hex digits (they go into a path).
fn valid_conn(conn: &str) -> bool {
    conn.len() == 32 && conn.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The channel task. Build it, then [`ControlSync::run`] it.
pub struct ControlSync {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Who we are and where control is.
    pub identity: BrokerIdentity,
    /// Verifies control's certificate.
    pub verifier: Arc<ControlVerifier>,
    /// Presence events from the session drivers.
    pub presence: PresenceRx,
    /// Writes the snapshot to the data directory.
    pub writer: SnapshotWriter,
    /// The QUIC address reported to control.
    pub quic_addr: String,
    /// When the allowlist loaded at start was saved (Unix seconds), if one was.
    pub snapshot_saved_at: Option<u64>,
    /// The allowlist version last applied from control and its digest (empty: unknown;
    /// kept in memory only, so a restarted broker resumes without one).
    pub allowlist_digest: (u64, String),
}

impl ControlSync {
    /// Hold the channel until `shutdown`, reconnecting with backoff; then save the
    /// allowlist in force if the snapshot file is behind it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.hold(&shutdown).await;
        self.writer.flush().await;
    }

    async fn hold(&mut self, shutdown: &CancellationToken) {
        let metrics = self.broker.metrics().clone();
        metrics.allowlist_stale.set(1);
        metrics.control_connected.set(0);
        let mut backoff = tether_identity::Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut ever_synced = false;
        loop {
            let span = tracing::info_span!("control_channel", control = %self.identity.control_url);
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.connect().instrument(span.clone()) => r,
            };
            let mut synced = false;
            let result = match outcome {
                Ok(channel) => {
                    info!(control = %self.identity.control_url, "control channel up");
                    metrics.control_connected.set(1);
                    let r = self
                        .session(channel, shutdown, &mut synced)
                        .instrument(span)
                        .await;
                    metrics.control_connected.set(0);
                    metrics.allowlist_stale.set(1);
                    r
                }
                Err(e) => Err(e),
            };
            if shutdown.is_cancelled() {
                return;
            }
            ever_synced |= synced;
            if synced || matches!(result, Err(ChannelError::GoingAway)) {
                // A channel that synced, or a control that left in order: come back at
                // once rather than after the failures that came before.
                backoff.reset();
            }
            if let Err(e) = &result {
                metrics.channel_error(e.reason());
                let snap = self.broker.allowlist().snapshot();
                if ever_synced {
                    warn!(error = %e, reason = e.reason(), version = snap.version(),
                        "control channel lost; enforcing the allowlist in force until it is back");
                } else if snap.version() == 0 && snap.is_empty() {
                    warn!(error = %e, reason = e.reason(),
                        "control unreachable and no allowlist snapshot on disk: admitting no one \
                         until control answers");
                } else {
                    warn!(error = %e, reason = e.reason(), version = snap.version(),
                        entries = snap.len(), saved_at = self.snapshot_saved_at.unwrap_or(0),
                        "control unreachable: enforcing the stale allowlist snapshot from disk");
                }
            }
            let delay = backoff.next_delay();
            debug!(delay = ?delay, attempt = backoff.failures(), "reconnecting to control");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// TCP, TLS with our certificate, and the upgrade.
    async fn connect(&self) -> Result<Channel, ChannelError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner())
            .await
            .unwrap_or_else(|_| {
                Err(ChannelError::Connect(format!(
                    "timed out after {CONNECT_TIMEOUT:?}"
                )))
            })
    }

    async fn connect_inner(&self) -> Result<Channel, ChannelError> {
        let upgraded = self
            .dialer()
            .upgrade(CHANNEL_PATH, cluster::UPGRADE)
            .await?;
        let codec = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME_LEN)
            .new_codec();
        Ok(Framed::new(TokioIo::new(upgraded), codec))
    }

    fn dialer(&self) -> Dialer {
        Dialer {
            identity: self.identity.clone(),
            verifier: self.verifier.clone(),
            broker: self.broker.clone(),
        }
    }

    /// One channel's life, from `Hello` to its end.
    async fn session(
        &mut self,
        mut channel: Channel,
        shutdown: &CancellationToken,
        synced: &mut bool,
    ) -> Result<(), ChannelError> {
        let broker = self.broker.clone();
        let metrics = broker.metrics().clone();
        // Everything queued predates the session list below, which replaces it; backlog
        // manifests are not presence and go after it.
        let kept = self.presence.discard();
        let mut sessions: Vec<SessionReport> = broker
            .sessions()
            .list()
            .iter()
            .map(|s| Presence::report(s))
            .collect();
        let rest = sessions.split_off(sessions.len().min(HELLO_MAX_SESSIONS));
        let version = broker.allowlist().snapshot().version();
        let digest = match &self.allowlist_digest {
            (v, d) if *v == version => d.clone(),
            _ => String::new(),
        };
        let mut last_tx = Instant::now();
        send(
            &mut channel,
            &ToControl::Hello {
                name: self.identity.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                quic_addr: self.quic_addr.clone(),
                allowlist_version: version,
                allowlist_digest: digest.clone(),
                sessions,
                features: vec![cluster::FEATURE_TUNNEL.to_owned()],
            },
        )
        .await?;
        for s in rest {
            send(&mut channel, &ToControl::SessionUp(s)).await?;
        }
        for ev in kept {
            let m = match ev {
                PresenceEvent::Manifest {
                    appliance,
                    command_id,
                    manifest,
                    sig,
                } => ToControl::ManifestBacklog {
                    appliance,
                    command_id,
                    manifest,
                    sig,
                },
                PresenceEvent::TunnelEnded {
                    id,
                    reason,
                    message,
                    manifest,
                    manifest_sig,
                } => ToControl::TunnelEnded {
                    id,
                    reason,
                    message,
                    manifest,
                    manifest_sig,
                },
                PresenceEvent::Up(_) | PresenceEvent::Down { .. } => continue,
            };
            send(&mut channel, &m).await?;
        }
        debug!(allowlist_version = version, "hello sent");

        let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(COMMAND_QUEUE);
        let mut commands: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
        let mut sync = SyncState::with_digest(digest);
        let mut heartbeats: HashMap<u64, HeartbeatSummary> = HashMap::new();
        let mut batch = tokio::time::interval(HEARTBEAT_BATCH_INTERVAL);
        batch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ping = Duration::from_secs(CHANNEL_PING_SECS);
        let idle = Duration::from_secs(CHANNEL_IDLE_TIMEOUT_SECS);
        let mut last_rx = Instant::now();

        let result = loop {
            let mut out: Vec<ToControl> = Vec::new();
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                frame = channel.next() => {
                    let bytes = match frame {
                        None => break Err(ChannelError::Closed),
                        Some(Err(e)) => break Err(ChannelError::Io(e.to_string())),
                        Some(Ok(b)) => b,
                    };
                    last_rx = Instant::now();
                    let msg: ToBroker = match cluster::decode(&bytes) {
                        Ok(m) => m,
                        Err(e) => break Err(ChannelError::Protocol(e.to_string())),
                    };
                    match self
                        .handle(msg, &mut sync, &mut commands, &out_tx, synced)
                        .await
                    {
                        Ok(Some(reply)) => out.push(reply),
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    }
                }
                ev = self.presence.events.recv() => {
                    if let Some(ev) = ev {
                        out.push(match ev {
                            PresenceEvent::Up(r) => ToControl::SessionUp(r),
                            PresenceEvent::Down { appliance, session_id, reason } => {
                                ToControl::SessionDown { appliance, session_id, reason: reason.to_owned() }
                            }
                            PresenceEvent::Manifest { appliance, command_id, manifest, sig } => {
                                ToControl::ManifestBacklog { appliance, command_id, manifest, sig }
                            }
                            PresenceEvent::TunnelEnded { id, reason, message, manifest, manifest_sig } => {
                                ToControl::TunnelEnded { id, reason, message, manifest, manifest_sig }
                            }
                        });
                    }
                }
                _ = batch.tick() => {
                    if self.presence.resync() {
                        break Err(ChannelError::Resync);
                    }
                    // Summaries are taken once a batch, not as they come: waiting on the
                    // queue would wake this task for every heartbeat of the fleet (a
                    // cross-thread wake-up each, 6.5 % of a held fleet's broker CPU).
                    while let Ok(mut hb) = self.presence.heartbeats.try_recv() {
                        // The newest summary of a session wins, but an agent status it
                        // replaces still goes out (it is sent once, when it changed).
                        match heartbeats.entry(hb.session_id) {
                            std::collections::hash_map::Entry::Occupied(mut older) => {
                                if hb.status.is_empty() {
                                    hb.status = std::mem::take(&mut older.get_mut().status);
                                }
                                older.insert(hb);
                            }
                            std::collections::hash_map::Entry::Vacant(slot) => {
                                slot.insert(hb);
                            }
                        }
                    }
                    let mut items: Vec<HeartbeatSummary> = heartbeats.drain().map(|(_, v)| v).collect();
                    while !items.is_empty() {
                        let rest = items.split_off(items.len().min(HEARTBEATS_MAX_ITEMS));
                        out.push(ToControl::Heartbeats { items });
                        items = rest;
                    }
                }
                o = out_rx.recv() => match o {
                    Some(Outgoing::Frame(m)) => out.push(m),
                    Some(Outgoing::Done(id)) => { commands.remove(&id); }
                    None => {}
                },
                _ = tokio::time::sleep_until(last_tx + ping) => out.push(ToControl::Ping),
                _ = tokio::time::sleep_until(last_rx + idle) => break Err(ChannelError::Idle),
            }
            let mut failed = None;
            for m in out {
                if let Err(e) = send(&mut channel, &m).await {
                    failed = Some(e);
                    break;
                }
                last_tx = Instant::now();
            }
            if let Some(e) = failed {
                break Err(e);
            }
        };
        for (_, h) in commands {
            h.abort();
        }
        if shutdown.is_cancelled() {
            // A clean end (TLS close_notify), so control logs a departure, not an error.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                SinkExt::<Bytes>::close(&mut channel),
            )
            .await;
        }
        metrics.control_connected.set(0);
        result
    }

    /// One message from control; returns the reply to send, if any.
    async fn handle(
        &mut self,
        msg: ToBroker,
        sync: &mut SyncState,
        commands: &mut HashMap<u64, tokio::task::AbortHandle>,
        out_tx: &mpsc::Sender<Outgoing>,
        synced: &mut bool,
    ) -> Result<Option<ToControl>, ChannelError> {
        let broker = &self.broker;
        let metrics = broker.metrics();
        match msg {
            ToBroker::SnapshotBegin { .. }
            | ToBroker::SnapshotChunk { .. }
            | ToBroker::SnapshotEnd { .. }
            | ToBroker::Delta { .. } => {
                let current = broker.allowlist().snapshot().version();
                let SyncStep::Apply(change) = sync.handle(msg, current)? else {
                    return Ok(None);
                };
                let report = crate::apply_change(broker, "control", change)
                    .map_err(|e| ChannelError::Apply(e.to_string()))?;
                self.allowlist_digest = (report.version, sync.applied().to_owned());
                // Removals reach the disk now (the snapshot itself is coalesced), so a
                // crash right after a revocation cannot bring the certificate back.
                self.writer
                    .record_removed(report.version, &report.removed)
                    .await;
                self.writer.changed();
                if *synced {
                    metrics
                        .allowlist_synced_timestamp_seconds
                        .set(unix_now() as i64);
                }
                Ok(Some(ToControl::Applied {
                    version: report.version,
                    sessions_closed: report.sessions_closed as u64,
                }))
            }
            ToBroker::Synced { version, accepts } => {
                self.presence.set_backlog_accepted(
                    accepts
                        .iter()
                        .any(|a| a == tether_proto::cluster::ACCEPTS_MANIFEST_BACKLOG),
                );
                let current = broker.allowlist().snapshot().version();
                if version != current || sync.in_snapshot() {
                    return Err(ChannelError::Protocol(format!(
                        "synced at version {version} but version {current} is in force"
                    )));
                }
                *synced = true;
                metrics.allowlist_stale.set(0);
                metrics
                    .allowlist_synced_timestamp_seconds
                    .set(unix_now() as i64);
                info!(
                    version,
                    entries = broker.allowlist().snapshot().len(),
                    "allowlist in sync with control"
                );
                Ok(None)
            }
            ToBroker::Renewals { generations } => {
                let invalid = broker.generations().apply(&generations, broker.sessions());
                if !invalid.is_empty() {
                    warn!(
                        count = invalid.len(),
                        "renewal generations for invalid appliance ids ignored"
                    );
                }
                debug!(count = generations.len(), "renewal generations updated");
                Ok(None)
            }
            ToBroker::CloseSession {
                appliance,
                session_id,
                code,
            } => {
                let closed = broker
                    .sessions()
                    .close_if(&appliance, session_id, code, metrics);
                info!(%appliance, session_id, code = code.as_str(), closed, "close requested by control");
                Ok(None)
            }
            ToBroker::Command {
                id,
                appliance,
                argv,
                kind,
                env_allowlist,
                timeout_ms,
                signed,
            } => {
                if commands.contains_key(&id) {
                    return Ok(Some(ToControl::CommandFailed {
                        id,
                        code: CommandFailure::Invalid,
                        message: "a command with this id is running".into(),
                    }));
                }
                let spec = CommandSpec {
                    argv,
                    kind,
                    env_allowlist,
                    timeout: Duration::from_millis(timeout_ms),
                    signed: signed.as_ref().map(|s| s.to_wire()),
                };
                // Manifests and plans go back only to a control that sent `signed` (an
                // older control would not know those frames).
                let relay_signed = signed.is_some();
                let tx = out_tx.clone();
                let broker = broker.clone();
                let span = tracing::info_span!("control_command", id, %appliance);
                let task = tokio::spawn(
                    async move {
                        run_command(&broker, id, &appliance, spec, relay_signed, &tx).await;
                        let _ = tx.send(Outgoing::Done(id)).await;
                    }
                    .instrument(span),
                );
                commands.insert(id, task.abort_handle());
                Ok(None)
            }
            ToBroker::CancelCommand { id } => {
                if let Some(h) = commands.remove(&id) {
                    h.abort();
                    debug!(id, "command cancelled by control");
                }
                Ok(None)
            }
            ToBroker::TunnelOpen {
                id,
                appliance,
                open,
            } => {
                let tx = out_tx.clone();
                let broker = broker.clone();
                let span = tracing::info_span!("control_tunnel", tunnel = %id, %appliance);
                tokio::spawn(
                    async move {
                        let answer = broker
                            .open_tunnel_for_control(id.clone(), &appliance, open.to_wire())
                            .await;
                        let _ = tx
                            .send(Outgoing::Frame(ToControl::TunnelAnswer { id, answer }))
                            .await;
                    }
                    .instrument(span),
                );
                Ok(None)
            }
            ToBroker::TunnelConnect {
                id,
                appliance,
                session_id,
                conn,
            } => {
                if !valid_conn(&conn) {
                    return Err(ChannelError::Protocol(format!(
                        "tunnel_connect with an invalid token {conn:?}"
                    )));
                }
                let dialer = self.dialer();
                let span = tracing::info_span!("tunnel_connection", tunnel = %id, %appliance);
                tokio::spawn(
                    async move {
                        let path = format!("{}{conn}", cluster::TUNNEL_DIAL_PATH);
                        match dialer.upgrade(&path, tether_proto::relay::UPGRADE).await {
                            Ok(io) => {
                                let reason = dialer
                                    .broker
                                    .relay_tunnel(&appliance, session_id, TokioIo::new(io))
                                    .await;
                                debug!(%reason, "tunnel connection closed");
                            }
                            Err(e) => warn!(error = %e, "tunnel dial-back to control failed"),
                        }
                    }
                    .instrument(span),
                );
                Ok(None)
            }
            ToBroker::TunnelClose {
                id,
                appliance,
                session_id,
            } => {
                let held = broker.tunnels().close_control(&id);
                info!(tunnel = %id, held, "tunnel close requested by control");
                if !held && !appliance.is_empty() {
                    // Detached (its stream was lost, here or on another broker): ask the
                    // agent itself.
                    let broker = broker.clone();
                    let span = tracing::info_span!("tunnel_close", tunnel = %id, %appliance);
                    tokio::spawn(
                        async move {
                            broker
                                .close_detached_tunnel(id, &appliance, session_id)
                                .await;
                        }
                        .instrument(span),
                    );
                }
                Ok(None)
            }
            ToBroker::Ping => Ok(None),
            ToBroker::GoingAway => Err(ChannelError::GoingAway),
        }
    }
}

/// Run one command and forward its events as channel frames.
async fn run_command(
    broker: &Arc<Broker>,
    id: u64,
    appliance: &str,
    spec: CommandSpec,
    relay_signed: bool,
    tx: &mpsc::Sender<Outgoing>,
) {
    let failed = |code: CommandFailure, message: String| {
        Outgoing::Frame(ToControl::CommandFailed { id, code, message })
    };
    let mut rx = match broker.run_command(appliance, spec).await {
        Ok(rx) => rx,
        Err(e) => {
            let _ = tx.send(failed(e.failure(), e.to_string())).await;
            return;
        }
    };
    while let Some(ev) = rx.recv().await {
        let (frame, last) = match ev {
            CommandEvent::Output { stream, data } => (
                ToControl::CommandOutput {
                    id,
                    stream,
                    data: base64::engine::general_purpose::STANDARD.encode(&data),
                },
                false,
            ),
            CommandEvent::Exit(code) => (ToControl::CommandExit { id, code }, true),
            CommandEvent::Failed { code, message } => {
                (ToControl::CommandFailed { id, code, message }, true)
            }
            CommandEvent::Manifest { manifest, sig } if relay_signed => (
                ToControl::CommandManifest {
                    id,
                    manifest: String::from_utf8_lossy(&manifest).into_owned(),
                    sig: String::from_utf8_lossy(&sig).into_owned(),
                },
                false,
            ),
            CommandEvent::Plan {
                approval_required,
                document,
            } if relay_signed => (
                ToControl::CommandPlan {
                    id,
                    approval_required,
                    document: String::from_utf8_lossy(&document).into_owned(),
                },
                false,
            ),
            // An older control: the appliance's audit log keeps the manifest.
            CommandEvent::Manifest { .. } | CommandEvent::Plan { .. } => continue,
        };
        if tx.send(Outgoing::Frame(frame)).await.is_err() || last {
            return;
        }
    }
    let _ = tx
        .send(failed(
            CommandFailure::ConnectionLost,
            "the command ended without a result".into(),
        ))
        .await;
}

async fn send(channel: &mut Channel, msg: &ToControl) -> Result<(), ChannelError> {
    let json = serde_json::to_vec(msg).map_err(|e| ChannelError::Io(e.to_string()))?;
    channel
        .send(Bytes::from(json))
        .await
        .map_err(|e| ChannelError::Io(e.to_string()))
}

fn unix_now() -> u64 {
    crate::presence::unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> String {
        format!("{b:02x}").repeat(32)
    }

    #[test]
    fn a_snapshot_is_applied_whole_at_its_end() {
        let mut s = SyncState::default();
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotBegin {
                    version: 9,
                    entries: 2
                },
                0
            ),
            Ok(SyncStep::Continue)
        ));
        assert!(s.in_snapshot());
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotChunk {
                    entries: vec![("a".into(), fp(1))]
                },
                0
            ),
            Ok(SyncStep::Continue)
        ));
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotChunk {
                    entries: vec![("b".into(), fp(2))]
                },
                0
            ),
            Ok(SyncStep::Continue)
        ));
        match s
            .handle(
                ToBroker::SnapshotEnd {
                    version: 9,
                    digest: String::new(),
                },
                0,
            )
            .unwrap()
        {
            SyncStep::Apply(Change::Replace { version, entries }) => {
                assert_eq!(version, Some(9));
                assert_eq!(entries.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.in_snapshot());
    }

    #[test]
    fn a_snapshot_with_a_wrong_count_or_version_is_a_protocol_error() {
        let mut s = SyncState::default();
        s.handle(
            ToBroker::SnapshotBegin {
                version: 3,
                entries: 1,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotChunk {
                    entries: vec![("a".into(), fp(1)), ("b".into(), fp(2))]
                },
                0
            ),
            Err(ChannelError::Protocol(_))
        ));
        let mut s = SyncState::default();
        s.handle(
            ToBroker::SnapshotBegin {
                version: 3,
                entries: 1,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotEnd {
                    version: 3,
                    digest: String::new(),
                },
                0
            ),
            Err(ChannelError::Protocol(_))
        ));
        let mut s = SyncState::default();
        s.handle(
            ToBroker::SnapshotBegin {
                version: 3,
                entries: 0,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotEnd {
                    version: 4,
                    digest: String::new(),
                },
                0
            ),
            Err(ChannelError::Protocol(_))
        ));
        let mut s = SyncState::default();
        assert!(matches!(
            s.handle(
                ToBroker::SnapshotEnd {
                    version: 4,
                    digest: String::new(),
                },
                0
            ),
            Err(ChannelError::Protocol(_))
        ));
    }

    #[test]
    fn a_delta_must_follow_the_version_in_force() {
        let mut s = SyncState::default();
        let delta = |version| ToBroker::Delta {
            version,
            add: vec![("a".into(), fp(1))],
            remove: vec![fp(2)],
            digest: String::new(),
        };
        match s.handle(delta(6), 5).unwrap() {
            SyncStep::Apply(Change::Delta {
                version,
                add,
                remove,
            }) => {
                assert_eq!(version, Some(6));
                assert_eq!(add.len(), 1);
                assert_eq!(remove, vec![Fingerprint([2; 32])]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.handle(delta(7), 5),
            Err(ChannelError::VersionGap { have: 5, got: 7 })
        ));
        assert!(matches!(
            s.handle(delta(5), 5),
            Err(ChannelError::VersionGap { have: 5, got: 5 })
        ));
        s.handle(
            ToBroker::SnapshotBegin {
                version: 9,
                entries: 0,
            },
            5,
        )
        .unwrap();
        assert!(matches!(
            s.handle(delta(6), 5),
            Err(ChannelError::Protocol(_))
        ));
    }

    #[test]
    fn a_delta_must_chain_to_the_digest_in_force() {
        let held = cluster::to_hex(&[7; 32]);
        let add = vec![("a".to_owned(), fp(1))];
        let good = cluster::allowlist_digest_hex(&held, 6, &add, &[]).unwrap();
        let delta = |digest: &str| ToBroker::Delta {
            version: 6,
            add: add.clone(),
            remove: vec![],
            digest: digest.to_owned(),
        };
        let mut s = SyncState::with_digest(held.clone());
        // Same version and content on another history: refused.
        let other = cluster::allowlist_digest_hex(&cluster::to_hex(&[8; 32]), 6, &add, &[]);
        assert!(matches!(
            s.handle(delta(&other.unwrap()), 5),
            Err(ChannelError::DigestMismatch { version: 6 })
        ));
        assert!(matches!(s.handle(delta(&good), 5), Ok(SyncStep::Apply(_))));
        assert_eq!(s.applied(), good);
        // Nothing held: the first digest is taken as it comes.
        let mut s = SyncState::default();
        assert!(matches!(s.handle(delta(&good), 5), Ok(SyncStep::Apply(_))));
        assert_eq!(s.applied(), good);
    }

    #[test]
    fn invalid_entries_are_protocol_errors() {
        let mut s = SyncState::default();
        let bad_id = ToBroker::Delta {
            version: 1,
            add: vec![("bad id".into(), fp(1))],
            remove: vec![],
            digest: String::new(),
        };
        assert!(matches!(
            s.handle(bad_id, 0),
            Err(ChannelError::Protocol(_))
        ));
        let bad_fp = ToBroker::Delta {
            version: 1,
            add: vec![],
            remove: vec!["zz".into()],
            digest: String::new(),
        };
        assert!(matches!(
            s.handle(bad_fp, 0),
            Err(ChannelError::Protocol(_))
        ));
    }
}
