//! The edge cluster as control sees it: one channel per broker (see
//! `tether_proto::cluster` for the conversation), where each appliance is connected, and
//! the commands in flight.
//!
//! - [`channel`] is the handler of `GET /v1/brokers/channel`: it authenticates the broker
//!   (its certificate must be the one recorded for an active broker), upgrades the
//!   connection and runs [`run_link`].
//! - A link has a reader (presence, command events) and a writer (allowlist versions as
//!   soon as the store commits them, renewals, closes, commands, pings). The writer wakes
//!   on [`crate::store::Store::allowlist_watch`] and also polls the version every second,
//!   so commits made by another control replica reach the brokers too.
//! - Presence lives in memory: brokers send every session they hold when their channel
//!   opens, so a restarted control knows the fleet again within one reconnect.
//! - When an appliance comes up on a broker while control knows it on another one (or
//!   under another session), the older session is closed as `superseded`.
//! - Commands: [`Cluster::exec`] sends the command down the link of the broker that holds
//!   the appliance and returns a channel of events; the last one is always `Exit` or
//!   `Failed`. A link that ends fails its commands with `broker_lost`; the caller's own
//!   deadline guard fails them with `timed_out`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tether_api::appliances::Presence;
use tether_proto::cluster::{
    self, HeartbeatSummary, SessionReport, ToBroker, ToControl, CHANNEL_IDLE_TIMEOUT_SECS,
    CHANNEL_PING_SECS, MAX_FRAME_LEN, SNAPSHOT_CHUNK,
};
use tether_proto::{CloseCode, CommandFailure, CommandKind, OutputStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::api::{ApiError, AppState};
use crate::identity::{identify, PeerIdentity};
use crate::metrics::Reason;
use crate::server::PeerCertificate;
use crate::store::UnixSeconds;

/// Versions behind after which a reconnecting broker gets a snapshot instead of deltas.
pub const MAX_DELTAS_ON_RESUME: usize = 100_000;
/// Time a broker has to send `Hello` after the upgrade.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one broker before senders wait.
const LINK_QUEUE: usize = 1024;

/// A broker's channel as control holds it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LinkInfo {
    /// Broker name.
    pub broker: String,
    /// Where agents reach it.
    pub quic_addr: String,
    /// When the channel opened (Unix seconds).
    pub connected_at: u64,
    /// The allowlist version the broker last said it applied.
    pub allowlist_version: u64,
    /// Sessions it holds.
    pub sessions: usize,
}

struct Link {
    id: u64,
    tx: mpsc::Sender<ToBroker>,
    quic_addr: String,
    connected_at: u64,
    applied: Arc<AtomicU64>,
    ended: CancellationToken,
}

/// What a command produces, as [`Cluster::exec`] hands it to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output; `data` is the bytes in standard base64.
    Output {
        /// `stdout` or `stderr`.
        stream: OutputStream,
        /// Base64.
        data: String,
    },
    /// Exit code.
    Exit(i32),
    /// No exit code: `offline`, `timed_out`, `connection_lost`, `broker_lost`, ...
    Failed {
        /// Why.
        code: CommandFailure,
        /// Detail.
        message: String,
    },
}

struct InFlight {
    link: u64,
    tx: mpsc::UnboundedSender<ExecEvent>,
    /// Output bytes delivered and not yet taken by the caller.
    queued: Arc<AtomicUsize>,
}

/// Output a command may have waiting for a slow caller before it is stopped
/// (`output_overflow`).
pub const MAX_QUEUED_OUTPUT: usize = 16 * 1024 * 1024;

/// The events of one command, in the order its broker sent them.
#[derive(Debug)]
pub struct ExecEvents {
    rx: mpsc::UnboundedReceiver<ExecEvent>,
    queued: Arc<AtomicUsize>,
}

impl ExecEvents {
    /// The next event; `None` when the command was forgotten without a final event.
    pub async fn recv(&mut self) -> Option<ExecEvent> {
        let ev = self.rx.recv().await?;
        if let ExecEvent::Output { data, .. } = &ev {
            self.queued.fetch_sub(data.len(), Ordering::Relaxed);
        }
        Some(ev)
    }
}

/// The cluster state shared by every handler.
#[derive(Default)]
pub struct Cluster {
    links: Mutex<HashMap<String, Link>>,
    presence: Mutex<HashMap<String, Presence>>,
    commands: Mutex<HashMap<u64, InFlight>>,
    next_id: AtomicU64,
    /// Cancelled when control shuts down: every link says `GoingAway` and ends.
    going_away: CancellationToken,
    /// The links' tasks, so shutdown can wait for them to say it.
    link_tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("links", &self.links.lock().map(|l| l.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (single inserts and
    // removes); keep serving rather than poison the whole cluster view.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// An empty cluster.
    pub fn new() -> Cluster {
        Cluster::default()
    }

    /// Tell every broker channel that control is going away ([`ToBroker::GoingAway`]),
    /// and wait up to `limit` for the links to say it and close. New channels opened
    /// after this are told at once.
    pub async fn go_away(&self, limit: Duration) -> bool {
        self.going_away.cancel();
        self.link_tasks.close();
        tokio::time::timeout(limit, self.link_tasks.wait())
            .await
            .is_ok()
    }

    /// Record a new link for `name` (closing an older one of the same broker) and the
    /// sessions its `Hello` reported; returns the link's id.
    fn register_link(&self, name: &str, mut link: Link, sessions: Vec<SessionReport>) -> u64 {
        let link_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        link.id = link_id;
        if let Some(old) = lock(&self.links).insert(name.to_owned(), link) {
            info!("a newer channel of the same broker replaces the older one");
            old.ended.cancel();
        }
        self.forget_broker(name);
        for r in sessions {
            let appliance = r.appliance.clone();
            if let Some(older) = self.session_up(name, r) {
                self.supersede(&appliance, older);
            }
        }
        link_id
    }

    /// Where `appliance` is connected, if a broker reported it.
    pub fn presence(&self, appliance: &str) -> Option<Presence> {
        lock(&self.presence).get(appliance).cloned()
    }

    /// Every broker channel that is up, by name.
    pub fn links(&self) -> Vec<LinkInfo> {
        let sessions = {
            let p = lock(&self.presence);
            let mut counts: HashMap<String, usize> = HashMap::new();
            for pr in p.values() {
                *counts.entry(pr.broker.clone()).or_default() += 1;
            }
            counts
        };
        let mut out: Vec<LinkInfo> = lock(&self.links)
            .iter()
            .map(|(name, l)| LinkInfo {
                broker: name.clone(),
                quic_addr: l.quic_addr.clone(),
                connected_at: l.connected_at,
                allowlist_version: l.applied.load(Ordering::Relaxed),
                sessions: sessions.get(name).copied().unwrap_or(0),
            })
            .collect();
        out.sort_by(|a, b| a.broker.cmp(&b.broker));
        out
    }

    /// Where agents reach the brokers whose channel is up, by name (cheap: no session
    /// counts, unlike [`Cluster::links`]).
    pub fn quic_addrs(&self) -> Vec<String> {
        let links = lock(&self.links);
        let mut named: Vec<(&String, &Link)> = links.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named
            .into_iter()
            .map(|(_, l)| l.quic_addr.clone())
            .collect()
    }

    /// Queue `msg` for every connected broker (renewal generations).
    pub fn broadcast(&self, msg: ToBroker) {
        for (name, link) in lock(&self.links).iter() {
            if link.tx.try_send(msg.clone()).is_err() {
                warn!(broker = %name, "broker channel queue full; it will get the change on its next connection");
                link.ended.cancel();
            }
        }
    }

    /// Close broker `name`'s channel (it was revoked).
    pub fn disconnect(&self, name: &str) {
        if let Some(link) = lock(&self.links).get(name) {
            link.ended.cancel();
        }
    }

    /// Run a command on `appliance` through the broker that holds it. `Err` when it
    /// cannot even be sent: `offline` (no broker reports it) or `broker_lost`.
    pub async fn exec(
        &self,
        appliance: &str,
        argv: Vec<String>,
        kind: CommandKind,
        env_allowlist: Vec<String>,
        timeout: Duration,
    ) -> Result<(String, u64, ExecEvents), CommandFailure> {
        let presence = self.presence(appliance).ok_or(CommandFailure::Offline)?;
        let (link_id, tx) = {
            let links = lock(&self.links);
            let link = links.get(&presence.broker).ok_or(CommandFailure::Offline)?;
            (link.id, link.tx.clone())
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        lock(&self.commands).insert(
            id,
            InFlight {
                link: link_id,
                tx: events_tx,
                queued: queued.clone(),
            },
        );
        let msg = ToBroker::Command {
            id,
            appliance: appliance.to_owned(),
            argv,
            kind,
            env_allowlist,
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        };
        if tx.send(msg).await.is_err() {
            lock(&self.commands).remove(&id);
            return Err(CommandFailure::BrokerLost);
        }
        Ok((
            presence.broker,
            id,
            ExecEvents {
                rx: events_rx,
                queued,
            },
        ))
    }

    /// Register broker `broker`'s link as [`run_link`] does after `Hello` (holding
    /// `sessions`), without a network channel, and return the receiving end of its queue:
    /// what the link's writer would send. For benches of the routing path in-process.
    #[doc(hidden)]
    pub fn attach_link(
        &self,
        broker: &str,
        sessions: Vec<SessionReport>,
    ) -> mpsc::Receiver<ToBroker> {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let link = Link {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            tx,
            quic_addr: String::new(),
            connected_at: 0,
            applied: Arc::new(AtomicU64::new(0)),
            ended: CancellationToken::new(),
        };
        if let Some(old) = lock(&self.links).insert(broker.to_owned(), link) {
            old.ended.cancel();
        }
        self.forget_broker(broker);
        for r in sessions {
            let appliance = r.appliance.clone();
            if let Some(older) = self.session_up(broker, r) {
                self.supersede(&appliance, older);
            }
        }
        rx
    }

    /// Forget command `id` and tell its broker to stop it (the caller went away).
    pub fn cancel(&self, id: u64) {
        let Some(inflight) = lock(&self.commands).remove(&id) else {
            return;
        };
        self.cancel_on_link(inflight.link, id);
    }

    /// Hand a command event from link `link_id` to the caller, in order, without waiting
    /// (the reader serves every command of the broker). Events for a command sent down
    /// another broker's link are dropped: a broker speaks only for its own commands.
    fn deliver(&self, link_id: u64, id: u64, event: ExecEvent, last: bool) -> bool {
        let mut commands = lock(&self.commands);
        let Some(c) = commands.get(&id).filter(|c| c.link == link_id) else {
            return false;
        };
        if let ExecEvent::Output { data, .. } = &event {
            if c.queued.fetch_add(data.len(), Ordering::Relaxed) + data.len() > MAX_QUEUED_OUTPUT {
                let c = commands.remove(&id).expect("present");
                drop(commands);
                let _ = c.tx.send(ExecEvent::Failed {
                    code: CommandFailure::OutputOverflow,
                    message: format!(
                        "the caller did not read {MAX_QUEUED_OUTPUT} bytes of output in time"
                    ),
                });
                self.cancel_on_link(c.link, id);
                return true;
            }
        }
        let _ = c.tx.send(event);
        if last {
            commands.remove(&id);
        }
        true
    }

    fn cancel_on_link(&self, link_id: u64, id: u64) {
        let links = lock(&self.links);
        if let Some(link) = links.values().find(|l| l.id == link_id) {
            let _ = link.tx.try_send(ToBroker::CancelCommand { id });
        }
    }

    /// Record a session `broker` reports. When control knows the appliance on another
    /// broker, the older of the two sessions must go: returns it (broker, session id).
    /// A broker re-announcing, after a reconnect, a session older than the one control
    /// knows elsewhere (a zombie the appliance already left) does not displace it.
    fn session_up(&self, broker: &str, r: SessionReport) -> Option<(String, u64)> {
        let mut presence = lock(&self.presence);
        let known = presence
            .get(&r.appliance)
            .filter(|p| p.broker != broker)
            .map(|p| (p.broker.clone(), p.session_id, p.connected_at));
        if let Some((_, _, known_at)) = &known {
            if r.connected_at < *known_at {
                return Some((broker.to_owned(), r.session_id));
            }
        }
        presence.insert(
            r.appliance.clone(),
            Presence {
                broker: broker.to_owned(),
                session_id: r.session_id,
                connected_at: r.connected_at,
                fingerprint: r.fingerprint,
                agent_version: r.agent_version,
                cert_not_after: r.cert_not_after,
                last_heartbeat: None,
                trust_state: None,
            },
        );
        // Only another broker's session needs closing from here; a broker supersedes its
        // own sessions itself.
        known.map(|(b, id, _)| (b, id))
    }

    fn supersede(&self, appliance: &str, (broker, session_id): (String, u64)) {
        let links = lock(&self.links);
        if let Some(link) = links.get(&broker) {
            info!(%appliance, %broker, session_id, "closing the older of two sessions on different brokers as superseded");
            let _ = link.tx.try_send(ToBroker::CloseSession {
                appliance: appliance.to_owned(),
                session_id,
                code: CloseCode::Superseded,
            });
        }
    }

    fn session_down(&self, broker: &str, appliance: &str, session_id: u64) {
        let mut presence = lock(&self.presence);
        if presence
            .get(appliance)
            .is_some_and(|p| p.broker == broker && p.session_id == session_id)
        {
            presence.remove(appliance);
        }
    }

    fn heartbeats(&self, broker: &str, items: Vec<HeartbeatSummary>) {
        let mut presence = lock(&self.presence);
        for h in items {
            if let Some(p) = presence.get_mut(&h.appliance) {
                if p.broker == broker && p.session_id == h.session_id {
                    p.last_heartbeat = Some(h.at);
                    p.trust_state = Some(h.trust_state);
                    p.cert_not_after = h.cert_not_after;
                }
            }
        }
    }

    fn forget_broker(&self, broker: &str) {
        lock(&self.presence).retain(|_, p| p.broker != broker);
    }

    fn session_count(&self) -> i64 {
        lock(&self.presence).len() as i64
    }
}

/// `GET /v1/brokers/channel`: a broker's certificate, `Upgrade: tether-cluster/1`.
#[utoipa::path(get, path = "/v1/brokers/channel", tag = "brokers", responses(
        (status = 101, description = "switching to the cluster channel (length-prefixed JSON frames, see `tether_proto::cluster`)"),
        (status = 401, description = "no client certificate", body = tether_api::ErrorBody),
        (status = 403, description = "not the current certificate of an active broker", body = tether_api::ErrorBody),
        (status = 408, description = "the request took longer than `http.request_timeout`", body = tether_api::ErrorBody),
        (status = 426, description = "`upgrade_required`: the request did not ask for `Upgrade: tether-cluster/1`", body = tether_api::ErrorBody),
    ),
    security(("broker_certificate" = []))
)]
pub async fn channel(
    State(s): State<AppState>,
    Extension(peer): Extension<PeerCertificate>,
    mut req: Request,
) -> Response {
    let now = crate::now_unix();
    let name = match authenticate_broker(&s, &peer, now).await {
        Ok(n) => n,
        Err(e) => {
            s.metrics
                .channel_errors
                .get_or_create(&Reason { reason: e.code })
                .inc();
            warn!(code = e.code, "broker channel refused");
            return e.into_response();
        }
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(cluster::UPGRADE));
    if !wants {
        return ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("send Upgrade: {}", cluster::UPGRADE),
        )
        .into_response();
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                run_link(s, name, io).await;
            }
            Err(e) => warn!(broker = %name, error = %e, "broker channel upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, cluster::UPGRADE)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The active broker whose current (or overlapping previous) certificate `peer` is.
pub async fn authenticate_broker(
    s: &AppState,
    peer: &PeerCertificate,
    now: UnixSeconds,
) -> Result<String, ApiError> {
    let der = peer.0.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "certificate_required",
            "a broker certificate is required",
        )
    })?;
    let forbidden = |code: &'static str, msg: &str| ApiError::new(StatusCode::FORBIDDEN, code, msg);
    let name = match identify(der, s.ca.trust_domain()) {
        Ok(PeerIdentity::Broker(n)) => n,
        _ => return Err(forbidden("broker_required", "not a broker certificate")),
    };
    let fp = crate::ca::fingerprint_hex(der);
    match s.store.broker_by_fingerprint(&fp, now).await {
        Ok(Some(b)) if b.name == name => Ok(name),
        Ok(_) => Err(forbidden(
            "broker_unknown",
            "not the certificate of an active broker",
        )),
        Err(e) => Err(crate::enroll::internal(e)),
    }
}

type Channel<T> = Framed<T, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Why a link ended with an error.
#[derive(Debug)]
struct LinkError {
    reason: &'static str,
    detail: String,
}

fn link_error(reason: &'static str, detail: impl ToString) -> LinkError {
    LinkError {
        reason,
        detail: detail.to_string(),
    }
}

/// What a broker said in its `Hello`.
struct Hello {
    quic_addr: String,
    since: u64,
    sessions: Vec<SessionReport>,
}

/// Serve one broker channel until it ends (or control goes away), in a span naming the
/// broker.
pub async fn run_link<T>(s: AppState, name: String, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let span = tracing::info_span!("broker_link", broker = %name);
    let tracker = s.cluster.link_tasks.clone();
    tracker
        .track_future(link(s, name, io))
        .instrument(span)
        .await
}

async fn link<T>(s: AppState, name: String, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let framed: Channel<T> = Framed::new(io, codec());
    let (mut sink, mut stream) = framed.split();
    let hello = match read_hello(&mut stream, &name).await {
        Ok(h) => h,
        Err(e) => return end_with(&s, &name, e),
    };
    let now = crate::now_unix();
    if let Err(e) = s.store.broker_seen(&name, &hello.quic_addr, now).await {
        warn!(error = %e, "cannot record the broker's address");
    }
    let (tx, rx) = mpsc::channel::<ToBroker>(LINK_QUEUE);
    let ended = CancellationToken::new();
    let applied = Arc::new(AtomicU64::new(hello.since));
    let link_id = s.cluster.register_link(
        &name,
        Link {
            id: 0,
            tx,
            quic_addr: hello.quic_addr,
            connected_at: now.max(0) as u64,
            applied: applied.clone(),
            ended: ended.clone(),
        },
        hello.sessions,
    );
    s.metrics
        .brokers_connected
        .set(lock(&s.cluster.links).len() as i64);
    s.metrics.sessions.set(s.cluster.session_count());

    let writer = write_loop(&s, &mut sink, hello.since, rx, &ended);
    let reader = read_loop(&s, &name, &mut stream, link_id, &applied);
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
        _ = ended.cancelled() => Ok(()),
    };
    ended.cancel();
    unregister_link(&s, &name, link_id);
    match result {
        Ok(()) => info!("broker channel ended"),
        Err(e) => end_with(&s, &name, e),
    }
}

/// The broker's first frame, which must be a `Hello` naming the broker its certificate
/// names, within [`HELLO_TIMEOUT`].
async fn read_hello<S>(stream: &mut S, name: &str) -> Result<Hello, LinkError>
where
    S: futures_util::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(frame))) => cluster::decode::<ToControl>(&frame),
        Ok(Some(Err(e))) => Err(cluster::FrameError::Malformed(e.to_string())),
        Ok(None) => Err(cluster::FrameError::Malformed("closed before Hello".into())),
        Err(_) => Err(cluster::FrameError::Malformed("no Hello in time".into())),
    };
    match hello {
        Ok(ToControl::Hello {
            name: said,
            quic_addr,
            allowlist_version,
            sessions,
            version,
        }) if said == name => {
            info!(%quic_addr, allowlist_version, sessions = sessions.len(), broker_version = %version, "broker channel up");
            Ok(Hello {
                quic_addr,
                since: allowlist_version,
                sessions,
            })
        }
        Ok(other) => Err(link_error(
            "bad_hello",
            format!("expected Hello naming {name}, got {other:?}"),
        )),
        Err(e) => Err(link_error("bad_hello", e)),
    }
}

/// The writer: the initial sync, then versions as they are committed, queued messages
/// and pings; [`ToBroker::GoingAway`] when control shuts down.
async fn write_loop<S>(
    s: &AppState,
    sink: &mut S,
    since: u64,
    mut rx: mpsc::Receiver<ToBroker>,
    ended: &CancellationToken,
) -> Result<(), LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let mut sent = sync_from(s, sink, since).await?;
    send(sink, &ToBroker::Synced { version: sent }).await?;
    let generations = s
        .store
        .renewal_generations()
        .await
        .map_err(|e| link_error("store", e))?;
    let generations = generations
        .into_iter()
        .map(|(id, g)| (id, g.max(0) as u64))
        .collect();
    send(sink, &ToBroker::Renewals { generations }).await?;
    let mut watch = s.store.allowlist_watch();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = Duration::from_secs(CHANNEL_PING_SECS);
    let mut last_sent = tokio::time::Instant::now();
    let going_away = s.cluster.going_away.clone();
    loop {
        tokio::select! {
            _ = ended.cancelled() => return Ok(()),
            _ = going_away.cancelled() => {
                send(sink, &ToBroker::GoingAway).await?;
                let _ = sink.close().await;
                info!("told the broker control is going away");
                return Ok(());
            }
            changed = watch.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                sent = push_new_versions(s, sink, sent, &mut last_sent).await?;
            }
            _ = poll.tick() => {
                sent = push_new_versions(s, sink, sent, &mut last_sent).await?;
                // Say something at least every `ping`, so the broker knows the channel
                // is alive.
                if last_sent.elapsed() >= ping {
                    send(sink, &ToBroker::Ping).await?;
                    last_sent = tokio::time::Instant::now();
                }
            }
            msg = rx.recv() => match msg {
                Some(m) => {
                    send(sink, &m).await?;
                    last_sent = tokio::time::Instant::now();
                }
                None => return Ok(()),
            },
        }
    }
}

/// The reader: presence and command events, until the broker closes or falls silent for
/// [`CHANNEL_IDLE_TIMEOUT_SECS`].
async fn read_loop<S>(
    s: &AppState,
    name: &str,
    stream: &mut S,
    link_id: u64,
    applied: &AtomicU64,
) -> Result<(), LinkError>
where
    S: futures_util::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let cluster = &s.cluster;
    let idle = Duration::from_secs(CHANNEL_IDLE_TIMEOUT_SECS);
    loop {
        let frame = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return Err(link_error("idle", "no frame from the broker in time")),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(link_error("framing", e)),
            Ok(Some(Ok(f))) => f,
        };
        let msg = cluster::decode::<ToControl>(&frame).map_err(|e| link_error("malformed", e))?;
        let (id, event, last) = match msg {
            ToControl::Hello { .. } => return Err(link_error("protocol", "a second Hello")),
            ToControl::Applied {
                version,
                sessions_closed,
            } => {
                applied.store(version, Ordering::Relaxed);
                debug!(version, sessions_closed, "broker applied version");
                continue;
            }
            ToControl::SessionUp(r) => {
                let appliance = r.appliance.clone();
                if let Some(older) = cluster.session_up(name, r) {
                    cluster.supersede(&appliance, older);
                }
                s.metrics.sessions.set(cluster.session_count());
                continue;
            }
            ToControl::SessionDown {
                appliance,
                session_id,
                reason,
            } => {
                debug!(%appliance, session_id, %reason, "session down");
                cluster.session_down(name, &appliance, session_id);
                s.metrics.sessions.set(cluster.session_count());
                continue;
            }
            ToControl::Heartbeats { items } => {
                cluster.heartbeats(name, items);
                continue;
            }
            ToControl::Ping => continue,
            ToControl::CommandOutput { id, stream, data } => {
                (id, ExecEvent::Output { stream, data }, false)
            }
            ToControl::CommandExit { id, code } => (id, ExecEvent::Exit(code), true),
            ToControl::CommandFailed { id, code, message } => {
                (id, ExecEvent::Failed { code, message }, true)
            }
        };
        if !cluster.deliver(link_id, id, event, last) {
            foreign_command(s, name, id);
        }
    }
}

/// Unregister a link that ended (unless a newer channel of the same broker took the
/// slot), forget its sessions and fail its commands with `broker_lost`.
fn unregister_link(s: &AppState, name: &str, link_id: u64) {
    let cluster = &s.cluster;
    {
        let mut links = lock(&cluster.links);
        if links.get(name).is_some_and(|l| l.id == link_id) {
            links.remove(name);
            drop(links);
            cluster.forget_broker(name);
        }
    }
    s.metrics
        .brokers_connected
        .set(lock(&cluster.links).len() as i64);
    s.metrics.sessions.set(cluster.session_count());
    let lost: Vec<InFlight> = {
        let mut commands = lock(&cluster.commands);
        let ids: Vec<u64> = commands
            .iter()
            .filter(|(_, c)| c.link == link_id)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| commands.remove(&id))
            .collect()
    };
    for c in lost {
        let _ = c.tx.send(ExecEvent::Failed {
            code: CommandFailure::BrokerLost,
            message: format!("the channel to broker {name} ended mid-command"),
        });
    }
}

/// A command event for no command of this broker: one that ended (its deadline passed,
/// its caller left) or one the broker was never sent. Counted and logged, never delivered.
fn foreign_command(s: &AppState, name: &str, id: u64) {
    s.metrics
        .channel_errors
        .get_or_create(&Reason {
            reason: "unknown_command",
        })
        .inc();
    debug!(broker = %name, command_id = id, "event for a command this broker does not run");
}

fn end_with(s: &AppState, name: &str, e: LinkError) {
    s.metrics
        .channel_errors
        .get_or_create(&Reason { reason: e.reason })
        .inc();
    warn!(broker = %name, reason = e.reason, detail = %e.detail, "broker channel ended with an error");
}

async fn send<S>(sink: &mut S, msg: &ToBroker) -> Result<(), LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let frame = cluster::encode(msg).map_err(|e| link_error("encode", e))?;
    // `encode` adds the length; the codec adds it again, so strip ours.
    sink.send(bytes::Bytes::from(frame).slice(4..))
        .await
        .map_err(|e| link_error("write", e))
}

/// Bring a broker at version `since` up to date: deltas when it is close, a snapshot
/// otherwise. Returns the version it now has.
async fn sync_from<S>(s: &AppState, sink: &mut S, since: u64) -> Result<u64, LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let current = s
        .store
        .allowlist_version()
        .await
        .map_err(|e| link_error("store", e))?
        .max(0) as u64;
    if since == current {
        return Ok(current);
    }
    if since > 0 && since < current {
        let mut deltas = Vec::new();
        let mut after = since as i64;
        loop {
            let page = s
                .store
                .allowlist_changes_since(after, 10_000)
                .await
                .map_err(|e| link_error("store", e))?;
            let Some(last) = page.last() else { break };
            after = last.version;
            deltas.extend(page);
            if deltas.len() > MAX_DELTAS_ON_RESUME {
                break;
            }
        }
        if deltas.len() <= MAX_DELTAS_ON_RESUME {
            return send_deltas(sink, deltas, since).await;
        }
    }
    // Too far behind, nothing held, or ahead of us (a restored database): a snapshot.
    let (version, entries) = s
        .store
        .allowlist_snapshot()
        .await
        .map_err(|e| link_error("store", e))?;
    let version = version.max(0) as u64;
    info!(
        since,
        version,
        entries = entries.len(),
        "sending a broker a full snapshot"
    );
    send(
        sink,
        &ToBroker::SnapshotBegin {
            version,
            entries: entries.len() as u64,
        },
    )
    .await?;
    for chunk in entries.chunks(SNAPSHOT_CHUNK) {
        send(
            sink,
            &ToBroker::SnapshotChunk {
                entries: chunk.to_vec(),
            },
        )
        .await?;
    }
    send(sink, &ToBroker::SnapshotEnd { version }).await?;
    Ok(version)
}

async fn push_new_versions<S>(
    s: &AppState,
    sink: &mut S,
    sent: u64,
    last_sent: &mut tokio::time::Instant,
) -> Result<u64, LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let mut sent = sent;
    loop {
        let page = s
            .store
            .allowlist_changes_since(sent as i64, 10_000)
            .await
            .map_err(|e| link_error("store", e))?;
        if page.is_empty() {
            return Ok(sent);
        }
        sent = send_deltas(sink, page, sent).await?;
        *last_sent = tokio::time::Instant::now();
    }
}

/// Send `deltas` (whole versions, in order) as one `Delta` per version.
async fn send_deltas<S>(
    sink: &mut S,
    deltas: Vec<crate::store::AllowlistDelta>,
    mut sent: u64,
) -> Result<u64, LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let mut i = 0;
    while i < deltas.len() {
        let version = deltas[i].version;
        let mut add = Vec::new();
        let mut remove = Vec::new();
        while i < deltas.len() && deltas[i].version == version {
            let d = &deltas[i];
            if d.added {
                add.push((d.appliance_id.clone(), d.fingerprint.clone()));
            } else {
                remove.push(d.fingerprint.clone());
            }
            i += 1;
        }
        let version = version.max(0) as u64;
        send(
            sink,
            &ToBroker::Delta {
                version,
                add,
                remove,
            },
        )
        .await?;
        sent = version;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(appliance: &str, session_id: u64, connected_at: u64) -> SessionReport {
        SessionReport {
            appliance: appliance.into(),
            session_id,
            fingerprint: "ab".into(),
            connected_at,
            cert_not_after: 0,
            agent_version: "t".into(),
        }
    }

    #[test]
    fn the_newer_session_wins_across_brokers() {
        let c = Cluster::new();
        assert_eq!(c.session_up("b1", report("a", 1, 100)), None);
        // The appliance moved to b2: b1's session is the older one.
        assert_eq!(
            c.session_up("b2", report("a", 7, 105)),
            Some(("b1".into(), 1))
        );
        assert_eq!(c.presence("a").unwrap().broker, "b2");
        // b1 reconnects and re-announces its zombie: it is the one to close, and
        // control keeps b2's session.
        assert_eq!(
            c.session_up("b1", report("a", 1, 100)),
            Some(("b1".into(), 1))
        );
        assert_eq!(c.presence("a").unwrap().session_id, 7);
        // The zombie's end changes nothing; the live session's end forgets it.
        c.session_down("b1", "a", 1);
        assert!(c.presence("a").is_some());
        c.session_down("b2", "a", 7);
        assert!(c.presence("a").is_none());
    }

    #[tokio::test]
    async fn a_broker_cannot_answer_for_another_brokers_command() {
        let c = Cluster::new();
        let (tx, _rx) = mpsc::channel(8);
        lock(&c.links).insert(
            "b1".into(),
            Link {
                id: 1,
                tx,
                quic_addr: "127.0.0.1:1".into(),
                connected_at: 0,
                applied: Arc::new(AtomicU64::new(0)),
                ended: CancellationToken::new(),
            },
        );
        c.session_up("b1", report("a", 1, 100));
        let (broker, id, mut events) = c
            .exec(
                "a",
                vec!["true".into()],
                CommandKind::Exec,
                vec![],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(broker, "b1");
        // Link 2 (another broker) forges the result: dropped.
        assert!(!c.deliver(2, id, ExecEvent::Exit(0), true));
        // The real broker's answer gets through.
        assert!(c.deliver(1, id, ExecEvent::Exit(3), true));
        assert_eq!(events.recv().await, Some(ExecEvent::Exit(3)));
    }

    #[test]
    fn a_broker_replacing_its_own_session_needs_no_close_from_control() {
        let c = Cluster::new();
        c.session_up("b1", report("a", 1, 100));
        assert_eq!(c.session_up("b1", report("a", 2, 101)), None);
        assert_eq!(c.presence("a").unwrap().session_id, 2);
    }
}
