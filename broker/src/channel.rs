//! The control channels (control mode): one long-lived connection to each control
//! replica, each carrying the allowlist down and presence and command events up. The
//! contract is [`tether_proto::cluster`].
//!
//! [`ControlSync::run`] first dials the bundle's URL (often a load balancer). Each
//! channel's upgrade answer names its replica (`tether-control-replica`); once a replica
//! lists the live ones ([`ToBroker::Replicas`], kept by [`crate::replicas::Fleet`] in the
//! data directory), one slot per replica nobody holds dials that replica's `advertise`
//! address, and a second channel landing on a held replica is closed before its `Hello`.
//! Every channel sees the same presence (a fan-out copy each); backlog manifests and
//! tunnel ends go out on one of them. Versions are applied once, whichever channel brings
//! them first ([`SyncState`], [`DigestLog`]): a duplicate with the recorded digest is
//! ignored, a gap or a mismatch drops only that channel. A command runs for the channel
//! it came on, and its events go back on it.
//!
//! Each channel dials control's HTTPS port with the broker's certificate (the
//! current one from the [`CertStore`](crate::tls::CertStore), so a renewal applies to the
//! next connection), upgrades `GET /v1/brokers/channel` to `tether-cluster/1`, and then:
//!
//! - sends `Hello` with its name, QUIC address, allowlist version and every live session;
//! - applies a snapshot whole at `SnapshotEnd` and each delta as it comes, through
//!   [`crate::apply_change`] (the same path as the file source: live sessions of removed
//!   fingerprints are closed as revoked), answers `Applied`, and has the snapshot written
//!   to the data directory in the background ([`SnapshotWriter`]);
//! - treats a delta whose version is not the current one plus one (and not a duplicate)
//!   as an error: it drops that channel and reconnects, and control resends from its
//!   version;
//! - forwards session up/down as they happen and the latest heartbeat of each session at
//!   most once a second ([`PresenceRx`]);
//! - records manual-renewal generations, closes sessions on request, and runs commands,
//!   each in its own task so a slow one never holds the channel;
//! - pings after [`CHANNEL_PING_SECS`] of quiet and gives up after
//!   [`CHANNEL_IDLE_TIMEOUT_SECS`] without a frame from control, or when a frame it
//!   sends is not taken within as long (a black-holed link whose buffers filled: the
//!   wait for the write would otherwise keep the idle check from ever running).
//!
//! When a channel ends it reconnects with full-jitter exponential backoff
//! ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]); while no channel is synced the broker enforces
//! the allowlist it holds, and `tether_broker_allowlist_stale` is 1.

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
    self, HeartbeatSummary, ReplicaAddr, SessionReport, ToBroker, ToControl,
    CHANNEL_IDLE_TIMEOUT_SECS, CHANNEL_PATH, CHANNEL_PING_SECS, MAX_FRAME_LEN,
};
use tether_proto::CommandFailure;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::allowlist::{ApplianceId, Change, Entry, Fingerprint};
use crate::control_tls::{client_config, ControlVerifier};
use crate::datadir::{check_control_url, BrokerIdentity};
use crate::presence::{Presence, PresenceEvent, PresenceRx};
use crate::replicas::{Fanned, Fanout, Fleet};
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
/// The header naming the control replica that answered.
pub const REPLICA_HEADER: &str = "tether-control-replica";
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
    /// Control took no byte of a frame for [`CHANNEL_IDLE_TIMEOUT_SECS`]: the link is
    /// black-holed or control stopped reading (retrying elsewhere helps).
    #[error("control took no frame for {CHANNEL_IDLE_TIMEOUT_SECS}s")]
    WriteStalled,
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
    /// The channel landed on a replica another channel of this broker holds: closed
    /// before `Hello` (one channel per replica).
    #[error("replica {replica} is held by another channel")]
    Duplicate {
        /// The replica.
        replica: String,
    },
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
            ChannelError::WriteStalled => "write_stalled",
            ChannelError::Io(_) => "io",
            ChannelError::Protocol(_) => "protocol",
            ChannelError::VersionGap { .. } => "version_gap",
            ChannelError::DigestMismatch { .. } => "digest_mismatch",
            ChannelError::Apply(_) => "apply",
            ChannelError::Resync => "resync",
            ChannelError::GoingAway => "going_away",
            ChannelError::Duplicate { .. } => "duplicate",
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

/// Digests of the last versions applied kept, so a delta another channel delivered first
/// is recognised as the same one and ignored.
pub const DIGESTS_KEPT: usize = 1024;

/// The digests of the versions applied lately (lowercase hex), shared by every channel:
/// the broker applies a version once, whichever replica sends it first.
#[derive(Debug, Default)]
pub struct DigestLog {
    recent: std::collections::VecDeque<(u64, String)>,
}

impl DigestLog {
    /// The digest recorded for `version`, if it is among the last [`DIGESTS_KEPT`] and
    /// control sent one.
    pub fn get(&self, version: u64) -> Option<&str> {
        self.recent
            .iter()
            .rev()
            .find(|(v, _)| *v == version)
            .map(|(_, d)| d.as_str())
            .filter(|d| !d.is_empty())
    }

    /// `version` was applied with `digest` after the versions recorded.
    pub fn record(&mut self, version: u64, digest: String) {
        self.recent.retain(|(v, _)| *v < version);
        self.recent.push_back((version, digest));
        while self.recent.len() > DIGESTS_KEPT {
            self.recent.pop_front();
        }
    }

    /// A snapshot replaced the allowlist: only its version is known.
    pub fn reset(&mut self, version: u64, digest: String) {
        self.recent.clear();
        self.recent.push_back((version, digest));
    }
}

/// Turns one channel's `ToBroker` allowlist messages into changes, checking order and
/// completeness against the version in force and the [`DigestLog`] every channel shares.
/// Sans-IO: [`SyncState::handle`] is called with each message, the version in force and
/// the log (held locked until [`SyncState::applied`]).
#[derive(Debug, Default)]
pub struct SyncState {
    pending: Option<PendingSnapshot>,
    /// The change last returned (version, digest, whether a snapshot), until
    /// [`SyncState::applied`].
    staged: Option<(u64, String, bool)>,
}

/// What a `ToBroker` allowlist message asks for.
#[derive(Debug)]
pub enum SyncStep {
    /// Nothing yet (a snapshot is being collected).
    Continue,
    /// Apply this change.
    Apply(Change),
    /// This version is applied already (another channel delivered it first, with the same
    /// digest): nothing to do.
    Duplicate {
        /// Its version.
        version: u64,
    },
}

impl SyncState {
    /// The change last returned was applied: record its digest in `log`.
    pub fn applied(&mut self, log: &mut DigestLog) {
        match self.staged.take() {
            Some((v, d, true)) => log.reset(v, d),
            Some((v, d, false)) => log.record(v, d),
            None => {}
        }
    }

    /// Feed one allowlist message with the version in force. Errors drop this channel
    /// (only this one): a delta after a gap, or one whose digest does not match the
    /// history this broker followed.
    ///
    /// A delta is applied when its version is the current one plus one (and chains to
    /// the digest in force when both are known); ignored as a duplicate when its version
    /// is applied already and its digest is the one recorded for that version; anything
    /// else is a gap or a mismatch. A snapshot older than the version in force whose
    /// digest is the one recorded is a duplicate too (a slower replica's); any other
    /// snapshot is applied.
    pub fn handle(
        &mut self,
        msg: ToBroker,
        current: u64,
        log: &DigestLog,
    ) -> Result<SyncStep, ChannelError> {
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
                if version < current && !digest.is_empty() && log.get(version) == Some(&digest) {
                    return Ok(SyncStep::Duplicate { version });
                }
                self.staged = Some((version, digest, true));
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
                if version <= current {
                    return match log.get(version) {
                        Some(d) if !digest.is_empty() && d == digest => {
                            Ok(SyncStep::Duplicate { version })
                        }
                        Some(_) if !digest.is_empty() => {
                            Err(ChannelError::DigestMismatch { version })
                        }
                        _ => Err(ChannelError::VersionGap {
                            have: current,
                            got: version,
                        }),
                    };
                }
                if Some(version) != current.checked_add(1) {
                    return Err(ChannelError::VersionGap {
                        have: current,
                        got: version,
                    });
                }
                if let (false, Some(held)) = (digest.is_empty(), log.get(current)) {
                    let expected = cluster::allowlist_digest_hex(held, version, &add, &remove);
                    if expected.as_deref() != Some(digest.as_str()) {
                        return Err(ChannelError::DigestMismatch { version });
                    }
                }
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
                self.staged = Some((version, digest, false));
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
    /// Control's HTTPS base URL (the bundle's, or one replica's).
    url: String,
    verifier: Arc<ControlVerifier>,
    broker: Arc<Broker>,
}

impl Dialer {
    /// `GET path` with `Upgrade: token`; the upgraded connection on `101`, and the
    /// replica that answered if it said (`tether-control-replica`).
    async fn upgrade(
        &self,
        path: &str,
        token: &str,
    ) -> Result<(hyper::upgrade::Upgraded, Option<String>), ChannelError> {
        let (host, port) = check_control_url(&self.url).map_err(ChannelError::Connect)?;
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
        let replica = resp
            .headers()
            .get(REPLICA_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ChannelError::Http(e.to_string()))?;
        Ok((upgraded, replica))
    }
}

/// Control's tunnel connection tokens: 32 lowercase hex digits (they go into a path).
fn valid_conn(conn: &str) -> bool {
    conn.len() == 32 && conn.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The channels' task. Build it, then [`ControlSync::run`] it.
pub struct ControlSync {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Who we are and where control is (the bootstrap URL, often a load balancer).
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
    /// Where the live replicas are kept ([`crate::replicas::REPLICAS_FILE`] in the data
    /// directory).
    pub replicas_file: std::path::PathBuf,
    /// Cancelled when control asks the broker to drain ([`ToBroker::Drain`]): the same
    /// trigger as SIGTERM ([`crate::Running::serve`] wires it).
    pub drain: CancellationToken,
}

/// What every channel of the broker shares.
struct Shared {
    broker: Arc<Broker>,
    identity: BrokerIdentity,
    verifier: Arc<ControlVerifier>,
    writer: SnapshotWriter,
    quic_addr: String,
    snapshot_saved_at: Option<u64>,
    /// Held while a version is checked and applied: one channel at a time.
    digests: tokio::sync::Mutex<DigestLog>,
    fanout: Arc<Fanout>,
    backlog_accepted: Arc<std::sync::atomic::AtomicBool>,
    fleet: Fleet,
    /// Some channel has synced since start.
    ever_synced: std::sync::atomic::AtomicBool,
    /// Cancelled to drain, as on SIGTERM.
    drain: CancellationToken,
}

/// How often the channel supervisor looks for replicas nobody holds.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Where a slot dials.
#[derive(Clone, Debug)]
enum Target {
    /// The bundle's URL: the first channel, and any replica not reached directly.
    Bootstrap,
    /// One replica's `advertise` address.
    Replica(ReplicaAddr),
}

impl ControlSync {
    /// Hold a channel to every control replica until `shutdown`, reconnecting each with
    /// backoff; then save the allowlist in force if the snapshot file is behind it.
    ///
    /// The first channel goes to the bundle's URL. Once a replica lists the live ones
    /// ([`ToBroker::Replicas`]), one slot per replica nobody holds dials its `advertise`
    /// address; the bootstrap slot rests while every listed replica is held.
    pub async fn run(self, shutdown: CancellationToken) {
        let metrics = self.broker.metrics().clone();
        metrics.allowlist_stale.set(1);
        metrics.control_connected.set(0);
        metrics.control_channels.set(0);
        let backlog_accepted = self.presence.backlog_switch();
        let fanout = Fanout::spawn(self.presence, shutdown.clone());
        let shared = Arc::new(Shared {
            broker: self.broker,
            identity: self.identity,
            verifier: self.verifier,
            writer: self.writer,
            quic_addr: self.quic_addr,
            snapshot_saved_at: self.snapshot_saved_at,
            digests: tokio::sync::Mutex::new(DigestLog::default()),
            fanout,
            backlog_accepted,
            fleet: Fleet::new(self.replicas_file, metrics),
            ever_synced: Default::default(),
            drain: self.drain,
        });
        let slots = tokio_util::task::TaskTracker::new();
        let mut next_slot = 0u64;
        let mut spawn = |target: Target| {
            next_slot += 1;
            let slot = Slot {
                shared: shared.clone(),
                id: next_slot,
                target,
            };
            let span = tracing::info_span!("control_channel", slot = next_slot);
            slots.spawn(slot.hold(shutdown.clone()).instrument(span));
        };
        spawn(Target::Bootstrap);
        loop {
            for r in shared.fleet.to_dial() {
                info!(replica = %r.id, advertise = %r.advertise, "dialing control replica");
                spawn(Target::Replica(r));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = shared.fleet.changed.notified() => {}
                _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
            }
        }
        slots.close();
        slots.wait().await;
        shared.writer.flush().await;
    }
}

/// One slot: dials its target until shutdown (a direct slot ends when its replica is no
/// longer listed, or another slot holds it).
struct Slot {
    shared: Arc<Shared>,
    id: u64,
    target: Target,
}

impl Slot {
    fn url(&self) -> String {
        match &self.target {
            Target::Bootstrap => self.shared.identity.control_url.clone(),
            Target::Replica(r) => crate::replicas::replica_url(&r.advertise),
        }
    }

    async fn hold(self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let metrics = shared.broker.metrics().clone();
        let url = self.url();
        let mut backoff = tether_identity::Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            match &self.target {
                Target::Replica(r) => {
                    if !shared.fleet.keep_dialing(&r.id, self.id) {
                        debug!(replica = %r.id, "replica no longer listed or held by another channel");
                        shared.fleet.changed.notify_waiters();
                        return;
                    }
                }
                Target::Bootstrap => {
                    while shared.fleet.all_held() {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = shared.fleet.changed.notified() => {}
                            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
                        }
                    }
                }
            }
            let dialer = Dialer {
                url: url.clone(),
                verifier: shared.verifier.clone(),
                broker: shared.broker.clone(),
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = connect(&dialer) => r,
            };
            let mut synced = false;
            let result = match outcome {
                Ok((channel, replica)) => {
                    let mut chan = Chan {
                        shared: shared.clone(),
                        slot: self.id,
                        dialer,
                        replica: None,
                        takes_channels: false,
                        takes_draining: false,
                    };
                    let r = match replica.map(|id| chan.claim(id)).transpose() {
                        Ok(_) => {
                            info!(control = %url, replica = chan.replica.as_deref().unwrap_or("-"), "control channel up");
                            shared.fleet.channel_up();
                            let r = chan.session(channel, &shutdown, &mut synced).await;
                            shared.fleet.channel_down(synced);
                            r
                        }
                        Err(e) => Err(e),
                    };
                    if let Some(id) = &chan.replica {
                        shared.fleet.release(id, self.id);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if shutdown.is_cancelled() {
                return;
            }
            if synced || matches!(result, Err(ChannelError::GoingAway)) {
                // A channel that synced, or a control that left in order: come back at
                // once rather than after the failures that came before.
                backoff.reset();
            }
            if let Err(e) = &result {
                metrics.channel_error(e.reason());
                shared.log_loss(e, &url);
                if matches!(
                    (&self.target, e),
                    (Target::Replica(_), ChannelError::Duplicate { .. })
                ) {
                    // Another slot holds it: back to the top, which ends this slot and
                    // forgets it as dialed, so the replica is dialed again once released.
                    continue;
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
}

impl Shared {
    /// Say why a channel ended, and what the broker enforces meanwhile.
    fn log_loss(&self, e: &ChannelError, url: &str) {
        if let ChannelError::Duplicate { replica } = e {
            debug!(%replica, control = %url, "a second channel to a replica already held: closed");
            return;
        }
        let others = self.fleet.channels_up();
        let snap = self.broker.allowlist().snapshot();
        if others > 0 {
            warn!(error = %e, reason = e.reason(), control = %url, channels = others,
                "control channel lost; the other channels carry on");
        } else if self.ever_synced.load(std::sync::atomic::Ordering::Relaxed) {
            warn!(error = %e, reason = e.reason(), control = %url, version = snap.version(),
                "control channel lost; enforcing the allowlist in force until it is back");
        } else if snap.version() == 0 && snap.is_empty() {
            warn!(error = %e, reason = e.reason(), control = %url,
                "control unreachable and no allowlist snapshot on disk: admitting no one \
                 until control answers");
        } else {
            warn!(error = %e, reason = e.reason(), control = %url, version = snap.version(),
                entries = snap.len(), saved_at = self.snapshot_saved_at.unwrap_or(0),
                "control unreachable: enforcing the stale allowlist snapshot from disk");
        }
    }
}

/// TCP, TLS with our certificate, and the upgrade; the replica that answered, if it said.
async fn connect(dialer: &Dialer) -> Result<(Channel, Option<String>), ChannelError> {
    let inner = async {
        let (upgraded, replica) = dialer.upgrade(CHANNEL_PATH, cluster::UPGRADE).await?;
        let codec = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME_LEN)
            .new_codec();
        Ok((Framed::new(TokioIo::new(upgraded), codec), replica))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, inner)
        .await
        .unwrap_or_else(|_| {
            Err(ChannelError::Connect(format!(
                "timed out after {CONNECT_TIMEOUT:?}"
            )))
        })
}

/// One channel's life, from `Hello` to its end.
struct Chan {
    shared: Arc<Shared>,
    slot: u64,
    /// Dials the replica at the other end (tunnel dial-backs go to the same replica).
    dialer: Dialer,
    /// The replica at the other end, once it said.
    replica: Option<String>,
    /// Control sent [`ToBroker::Replicas`]: it takes [`ToControl::Channels`].
    takes_channels: bool,
    /// Control listed [`cluster::ACCEPTS_DRAINING`] in `Synced`: it takes
    /// [`ToControl::Draining`].
    takes_draining: bool,
}

impl Chan {
    /// This channel is to replica `id`: take it, or end as a duplicate.
    fn claim(&mut self, id: String) -> Result<(), ChannelError> {
        if crate::replicas::check_id(&id).is_err() {
            return Err(ChannelError::Protocol(format!("invalid replica id {id:?}")));
        }
        if !self.shared.fleet.claim(&id, self.slot) {
            return Err(ChannelError::Duplicate { replica: id });
        }
        self.replica = Some(id);
        Ok(())
    }

    async fn session(
        &mut self,
        mut channel: Channel,
        shutdown: &CancellationToken,
        synced: &mut bool,
    ) -> Result<(), ChannelError> {
        let broker = self.shared.broker.clone();
        // Copies of presence from now on; the session list below covers what came before.
        let (mut events, mut heartbeat_rx) = self.shared.fanout.subscribe();
        let mut held_ids = self.shared.fleet.held_ids();
        let mut sessions: Vec<SessionReport> = broker
            .sessions()
            .list()
            .iter()
            .map(|s| Presence::report(s))
            .collect();
        let rest = sessions.split_off(sessions.len().min(HELLO_MAX_SESSIONS));
        let (version, digest) = {
            let log = self.shared.digests.lock().await;
            let version = broker.allowlist().snapshot().version();
            (version, log.get(version).unwrap_or_default().to_owned())
        };
        let mut last_tx = Instant::now();
        send(
            &mut channel,
            &ToControl::Hello {
                name: self.shared.identity.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                quic_addr: self.shared.quic_addr.clone(),
                allowlist_version: version,
                allowlist_digest: digest,
                sessions,
                features: vec![
                    cluster::FEATURE_TUNNEL.to_owned(),
                    cluster::FEATURE_REPLICAS.to_owned(),
                    cluster::FEATURE_DRAIN.to_owned(),
                ],
            },
        )
        .await?;
        let ups: Vec<ToControl> = rest.into_iter().map(ToControl::SessionUp).collect();
        for chunk in ups.chunks(HELLO_MAX_SESSIONS) {
            send_all(&mut channel, chunk).await?;
        }
        debug!(allowlist_version = version, "hello sent");

        let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(COMMAND_QUEUE);
        let mut commands: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
        let mut sync = SyncState::default();
        let mut heartbeats: HashMap<u64, HeartbeatSummary> = HashMap::new();
        let mut batch = tokio::time::interval(HEARTBEAT_BATCH_INTERVAL);
        batch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ping = Duration::from_secs(CHANNEL_PING_SECS);
        let idle = Duration::from_secs(CHANNEL_IDLE_TIMEOUT_SECS);
        let mut last_rx = Instant::now();
        let fanout = self.shared.fanout.clone();
        // Control says it takes `Draining` in `Synced`; it is sent once per channel.
        let mut draining_told = false;

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
                ev = events.recv() => match ev {
                    Ok(Fanned::Events(batch)) => {
                        out.extend(batch.iter().filter_map(|ev| match ev {
                            PresenceEvent::Up(r) => Some(ToControl::SessionUp(r.clone())),
                            PresenceEvent::Down { appliance, session_id, reason } => {
                                Some(ToControl::SessionDown {
                                    appliance: appliance.clone(),
                                    session_id: *session_id,
                                    reason: (*reason).to_owned(),
                                })
                            }
                            _ => None,
                        }));
                    }
                    Ok(Fanned::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        break Err(ChannelError::Resync);
                    }
                    Err(broadcast::error::RecvError::Closed) => break Ok(()),
                },
                ev = async { fanout.backlog.lock().await.recv().await } => match ev {
                    Some(PresenceEvent::Manifest { appliance, command_id, manifest, sig }) => {
                        out.push(ToControl::ManifestBacklog { appliance, command_id, manifest, sig });
                    }
                    Some(PresenceEvent::TunnelEnded { id, reason, message, manifest, manifest_sig }) => {
                        out.push(ToControl::TunnelEnded { id, reason, message, manifest, manifest_sig });
                    }
                    Some(_) => {}
                    None => break Ok(()),
                },
                // Summaries come in batches (the fan-out takes them from the drivers'
                // queue twice a second): waking this task for every heartbeat of the fleet
                // cost a cross-thread wake-up each, 6.5 % of a held fleet's broker CPU.
                batch_in = heartbeat_rx.recv() => match batch_in {
                    Ok(batch_in) => {
                        for hb in batch_in.iter() {
                            let mut hb = hb.clone();
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
                    }
                    // Summaries are replaced by the next ones anyway.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        debug!(batches = n, "heartbeat summaries skipped");
                    }
                    Err(broadcast::error::RecvError::Closed) => break Ok(()),
                },
                _ = batch.tick() => {
                    let mut items: Vec<HeartbeatSummary> = heartbeats.drain().map(|(_, v)| v).collect();
                    while !items.is_empty() {
                        let rest = items.split_off(items.len().min(HEARTBEATS_MAX_ITEMS));
                        out.push(ToControl::Heartbeats { items });
                        items = rest;
                    }
                }
                changed = held_ids.changed(), if self.takes_channels => {
                    if changed.is_ok() {
                        let replicas = held_ids.borrow_and_update().clone();
                        out.push(ToControl::Channels { replicas });
                    }
                }
                o = out_rx.recv() => match o {
                    Some(Outgoing::Frame(m)) => out.push(m),
                    Some(Outgoing::Done(id)) => { commands.remove(&id); }
                    None => {}
                },
                _ = broker.draining_started(), if !draining_told && self.takes_draining => {
                    draining_told = true;
                    out.push(ToControl::Draining);
                }
                _ = tokio::time::sleep_until(last_tx + ping) => out.push(ToControl::Ping),
                _ = tokio::time::sleep_until(last_rx + idle) => break Err(ChannelError::Idle),
            }
            if !out.is_empty() {
                if let Err(e) = send_all(&mut channel, &out).await {
                    break Err(e);
                }
                last_tx = Instant::now();
            }
        };
        // Commands run for the replica that sent them: they end with its channel.
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
        let broker = &self.shared.broker;
        let metrics = broker.metrics();
        match msg {
            ToBroker::SnapshotBegin { .. }
            | ToBroker::SnapshotChunk { .. }
            | ToBroker::SnapshotEnd { .. }
            | ToBroker::Delta { .. } => {
                // One channel at a time checks and applies a version.
                let mut log = self.shared.digests.lock().await;
                let current = broker.allowlist().snapshot().version();
                let change = match sync.handle(msg, current, &log)? {
                    SyncStep::Continue => return Ok(None),
                    SyncStep::Duplicate { version } => {
                        debug!(
                            version,
                            current, "version applied already (another channel)"
                        );
                        metrics.allowlist_duplicates.inc();
                        return Ok(Some(ToControl::Applied {
                            version: current,
                            sessions_closed: 0,
                        }));
                    }
                    SyncStep::Apply(change) => change,
                };
                let report = crate::apply_change(broker, "control", change)
                    .map_err(|e| ChannelError::Apply(e.to_string()))?;
                sync.applied(&mut log);
                // Removals reach the disk now (the snapshot itself is coalesced), so a
                // crash right after a revocation cannot bring the certificate back.
                self.shared
                    .writer
                    .record_removed(report.version, &report.removed)
                    .await;
                drop(log);
                self.shared.writer.changed();
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
                self.takes_draining = accepts
                    .iter()
                    .any(|a| a == tether_proto::cluster::ACCEPTS_DRAINING);
                self.shared.backlog_accepted.store(
                    accepts
                        .iter()
                        .any(|a| a == tether_proto::cluster::ACCEPTS_MANIFEST_BACKLOG),
                    std::sync::atomic::Ordering::Relaxed,
                );
                let current = broker.allowlist().snapshot().version();
                // Another channel may have applied newer versions meanwhile.
                if version > current || sync.in_snapshot() {
                    return Err(ChannelError::Protocol(format!(
                        "synced at version {version} but version {current} is in force"
                    )));
                }
                if !*synced {
                    *synced = true;
                    self.shared.fleet.channel_synced();
                    self.shared
                        .ever_synced
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
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
            ToBroker::Replicas { self_id, replicas } => {
                if let Err(e) = crate::replicas::check_replicas(&replicas) {
                    warn!(error = %e, "replica list from control ignored");
                    return Ok(None);
                }
                match &self.replica {
                    None => self.claim(self_id.clone())?,
                    Some(held) if *held != self_id => {
                        warn!(header = %held, frame = %self_id, "control named two replica ids for one channel");
                    }
                    Some(_) => {}
                }
                if let Some(advertise) = replicas
                    .iter()
                    .find(|r| r.id == self_id)
                    .map(|r| r.advertise.clone())
                {
                    // Tunnel dial-backs must reach this replica, not the load balancer.
                    self.dialer.url = crate::replicas::replica_url(&advertise);
                }
                self.shared.fleet.set_known(replicas);
                self.takes_channels = true;
                Ok(Some(ToControl::Channels {
                    replicas: self.shared.fleet.held_ids().borrow().clone(),
                }))
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
                let dialer = self.dialer.clone();
                let span = tracing::info_span!("tunnel_connection", tunnel = %id, %appliance);
                tokio::spawn(
                    async move {
                        let path = format!("{}{conn}", cluster::TUNNEL_DIAL_PATH);
                        match dialer.upgrade(&path, tether_proto::relay::UPGRADE).await {
                            Ok((io, _)) => {
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
            ToBroker::Drain => {
                if !self.shared.drain.is_cancelled() {
                    info!("control asked this broker to drain: draining as on SIGTERM");
                    self.shared.drain.cancel();
                }
                Ok(None)
            }
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
    send_all(channel, std::slice::from_ref(msg)).await
}

/// Send `msgs` in order, as frames of one flush: a batch of presence events costs one TLS
/// write, not one each.
async fn send_all(channel: &mut Channel, msgs: &[ToControl]) -> Result<(), ChannelError> {
    let write = async {
        for msg in msgs {
            let json = serde_json::to_vec(msg).map_err(|e| ChannelError::Io(e.to_string()))?;
            channel
                .feed(Bytes::from(json))
                .await
                .map_err(|e| ChannelError::Io(e.to_string()))?;
        }
        SinkExt::<Bytes>::flush(channel)
            .await
            .map_err(|e| ChannelError::Io(e.to_string()))
    };
    match tokio::time::timeout(Duration::from_secs(CHANNEL_IDLE_TIMEOUT_SECS), write).await {
        Ok(sent) => sent,
        Err(_) => Err(ChannelError::WriteStalled),
    }
}

fn unix_now() -> u64 {
    crate::presence::unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `msg` with nothing recorded.
    fn h(s: &mut SyncState, msg: ToBroker, current: u64) -> Result<SyncStep, ChannelError> {
        s.handle(msg, current, &DigestLog::default())
    }

    fn fp(b: u8) -> String {
        format!("{b:02x}").repeat(32)
    }

    #[test]
    fn a_snapshot_is_applied_whole_at_its_end() {
        let mut s = SyncState::default();
        assert!(matches!(
            h(
                &mut s,
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
            h(
                &mut s,
                ToBroker::SnapshotChunk {
                    entries: vec![("a".into(), fp(1))]
                },
                0
            ),
            Ok(SyncStep::Continue)
        ));
        assert!(matches!(
            h(
                &mut s,
                ToBroker::SnapshotChunk {
                    entries: vec![("b".into(), fp(2))]
                },
                0
            ),
            Ok(SyncStep::Continue)
        ));
        match h(
            &mut s,
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
        h(
            &mut s,
            ToBroker::SnapshotBegin {
                version: 3,
                entries: 1,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            h(
                &mut s,
                ToBroker::SnapshotChunk {
                    entries: vec![("a".into(), fp(1)), ("b".into(), fp(2))]
                },
                0
            ),
            Err(ChannelError::Protocol(_))
        ));
        let mut s = SyncState::default();
        h(
            &mut s,
            ToBroker::SnapshotBegin {
                version: 3,
                entries: 1,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            h(
                &mut s,
                ToBroker::SnapshotEnd {
                    version: 3,
                    digest: String::new(),
                },
                0
            ),
            Err(ChannelError::Protocol(_))
        ));
        let mut s = SyncState::default();
        h(
            &mut s,
            ToBroker::SnapshotBegin {
                version: 3,
                entries: 0,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            h(
                &mut s,
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
            h(
                &mut s,
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
        match h(&mut s, delta(6), 5).unwrap() {
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
            h(&mut s, delta(7), 5),
            Err(ChannelError::VersionGap { have: 5, got: 7 })
        ));
        assert!(matches!(
            h(&mut s, delta(5), 5),
            Err(ChannelError::VersionGap { have: 5, got: 5 })
        ));
        h(
            &mut s,
            ToBroker::SnapshotBegin {
                version: 9,
                entries: 0,
            },
            5,
        )
        .unwrap();
        assert!(matches!(
            h(&mut s, delta(6), 5),
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
        let mut log = DigestLog::default();
        log.record(5, held.clone());
        let mut s = SyncState::default();
        // Same version and content on another history: refused.
        let other = cluster::allowlist_digest_hex(&cluster::to_hex(&[8; 32]), 6, &add, &[]);
        assert!(matches!(
            s.handle(delta(&other.unwrap()), 5, &log),
            Err(ChannelError::DigestMismatch { version: 6 })
        ));
        assert!(matches!(
            s.handle(delta(&good), 5, &log),
            Ok(SyncStep::Apply(_))
        ));
        s.applied(&mut log);
        assert_eq!(log.get(6), Some(good.as_str()));
        // Nothing held: the first digest is taken as it comes.
        let mut log = DigestLog::default();
        let mut s = SyncState::default();
        assert!(matches!(
            s.handle(delta(&good), 5, &log),
            Ok(SyncStep::Apply(_))
        ));
        s.applied(&mut log);
        assert_eq!(log.get(6), Some(good.as_str()));
    }

    #[test]
    fn a_duplicate_delta_from_another_replica_is_ignored_and_a_forged_one_refused() {
        let g = cluster::to_hex(&cluster::ALLOWLIST_GENESIS_DIGEST);
        let add = vec![("a".to_owned(), fp(1))];
        let d1 = cluster::allowlist_digest_hex(&g, 1, &add, &[]).unwrap();
        let delta = |digest: &str| ToBroker::Delta {
            version: 1,
            add: add.clone(),
            remove: vec![],
            digest: digest.to_owned(),
        };
        let mut log = DigestLog::default();
        log.record(0, g.clone());
        // Channel A brings version 1 first.
        let mut a = SyncState::default();
        assert!(matches!(
            a.handle(delta(&d1), 0, &log),
            Ok(SyncStep::Apply(_))
        ));
        a.applied(&mut log);
        // Channel B brings the same version with the same digest: once is enough.
        let mut b = SyncState::default();
        assert!(matches!(
            b.handle(delta(&d1), 1, &log),
            Ok(SyncStep::Duplicate { version: 1 })
        ));
        // The same version with another digest (another history), or with none: dropped.
        let other = cluster::to_hex(&[9; 32]);
        assert!(matches!(
            b.handle(delta(&other), 1, &log),
            Err(ChannelError::DigestMismatch { version: 1 })
        ));
        assert!(matches!(
            b.handle(delta(""), 1, &log),
            Err(ChannelError::VersionGap { have: 1, got: 1 })
        ));
        // Older than the digests kept: a gap, not a duplicate.
        for v in 2..=(DIGESTS_KEPT as u64 + 1) {
            log.record(v, cluster::to_hex(&[v as u8; 32]));
        }
        assert_eq!(log.get(1), None);
        assert!(matches!(
            b.handle(delta(&d1), DIGESTS_KEPT as u64 + 1, &log),
            Err(ChannelError::VersionGap { .. })
        ));
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
            h(&mut s, bad_id, 0),
            Err(ChannelError::Protocol(_))
        ));
        let bad_fp = ToBroker::Delta {
            version: 1,
            add: vec![],
            remove: vec!["zz".into()],
            digest: String::new(),
        };
        assert!(matches!(
            h(&mut s, bad_fp, 0),
            Err(ChannelError::Protocol(_))
        ));
    }
}
