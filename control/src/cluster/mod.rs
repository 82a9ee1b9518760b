//! The edge cluster as control sees it: one channel per broker (see
//! `tether_proto::cluster` for the conversation), where each appliance is connected, and
//! the commands in flight.
//!
//! - the HTTP layer's `channel` is the handler of `GET /v1/brokers/channel`: it authenticates
//!   the broker (its certificate must be the one recorded for an active broker,
//!   [`crate::domain::brokers::authenticate`]), upgrades the connection and runs
//!   [`link::run_link`].
//! - [`link`]: a link has a reader (presence, command events) and a writer (allowlist versions as
//!   soon as the store commits them, renewals, closes, commands, pings). The writer wakes
//!   on [`crate::store::Store::allowlist_watch`] and also polls the version every second,
//!   so commits made by another control replica reach the brokers too.
//! - Presence lives in memory: brokers send every session they hold when their channel
//!   opens, so a restarted control knows the fleet again within one reconnect.
//! - When an appliance comes up on a broker while control knows it on another one (or
//!   under another session), the older session is closed as `superseded`.
//! - An appliance whose session on a draining broker ended is *leaving*: its agent is on
//!   its way to another broker, whose report of the new session may reach control after
//!   the old one's end (two channels, no order between them). Commands wait for it
//!   ([`DRAINING_ROUTE_WAIT`]) rather than answer `offline`.
//! - Commands: [`Cluster::exec`] sends the command down the link of the broker that holds
//!   the appliance and returns a channel of events; the last one is always `Exit` or
//!   `Failed`. A link that ends fails its commands with `broker_lost`; the caller's own
//!   deadline guard fails them with `timed_out`.
//! - [`Cluster`] implements [`crate::domain::Fleet`]: the domain asks it where an appliance
//!   is and tells brokers through it, without importing this module.
//!
//! # Modules
//!
//! - this file — [`Cluster`]: the links, presence (which appliance is on which broker)
//!   and command routing (commands in flight and where their events go).
//! - [`link`] — one broker's channel: `Hello`, the reader and the writer.
//! - [`tunnel`] — break-glass tunnel sessions: opens, dial-backs, the one-time credential.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_api::appliances::Presence;
use tether_proto::cluster::{HeartbeatSummary, SessionReport, SignedCommand, ToBroker};
use tether_proto::{CloseCode, CommandFailure, CommandKind, OutputStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::domain::brokers::{DrainRefusal, LinkInfo};
use crate::domain::Fleet;

pub mod link;
pub mod tunnel;

/// Versions behind after which a reconnecting broker gets a snapshot instead of deltas.
pub const MAX_DELTAS_ON_RESUME: usize = 100_000;
/// Time a broker has to send `Hello` after the upgrade.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one broker before senders wait.
const LINK_QUEUE: usize = 1024;
/// How long a command waits for its appliance to leave a draining broker (its agent got
/// `GoAway` and reconnects elsewhere within the broker's reconnect jitter, 5 s by default)
/// before it is routed anyway.
pub const DRAINING_ROUTE_WAIT: Duration = Duration::from_secs(10);
/// Fewest leaving appliances before those older than [`DRAINING_ROUTE_WAIT`] are dropped.
const LEAVING_PRUNE_MIN: usize = 1024;

struct Link {
    id: u64,
    tx: mpsc::Sender<ToBroker>,
    quic_addr: String,
    connected_at: u64,
    applied: Arc<AtomicU64>,
    ended: CancellationToken,
    /// Its `Hello` listed [`tether_proto::cluster::FEATURE_TUNNEL`].
    tunnel: bool,
    /// How many control replicas the broker said it holds a channel to
    /// ([`tether_proto::cluster::ToControl::Channels`]; 0: it has not said).
    replicas_connected: Arc<AtomicUsize>,
    /// Its `Hello` listed [`tether_proto::cluster::FEATURE_DRAIN`].
    drain: bool,
    /// It is draining: it said so ([`tether_proto::cluster::ToControl::Draining`]), or
    /// this replica asked it to.
    draining: Arc<AtomicBool>,
}

/// The live control replicas as this replica last read them from the registry, for
/// [`ToBroker::Replicas`]; empty until the first read (and in a process that registers
/// no replica).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaSet {
    /// This replica's id.
    pub self_id: String,
    /// Every live replica, sorted by id.
    pub replicas: Vec<tether_proto::cluster::ReplicaAddr>,
}

/// The registry as links see it.
struct Replicas(tokio::sync::watch::Sender<ReplicaSet>);

impl Default for Replicas {
    fn default() -> Self {
        Replicas(tokio::sync::watch::channel(ReplicaSet::default()).0)
    }
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
    /// Signed operations: the appliance's signed manifest.
    Manifest {
        /// Its exact bytes.
        manifest: String,
        /// Its SSHSIG armor.
        sig: String,
    },
    /// Signed operations: the approval document the appliance expects.
    Plan {
        /// Whether an approval is needed.
        approval_required: bool,
        /// The document.
        document: String,
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
    /// Break-glass tunnels relayed through the links.
    tunnels: tunnel::Tunnels,
    /// The live replicas, sent to brokers that take them.
    replicas: Replicas,
    /// Appliances whose presence changed (the console's live pages listen).
    changes: Changes,
    /// Per appliance: how often control closed one of two sessions from different
    /// brokers, and when first and last (Unix seconds).
    superseded: Mutex<HashMap<String, Superseded>>,
    /// Appliances whose session on a draining broker ended, not yet seen elsewhere.
    leaving: Mutex<Leaving>,
}

/// Appliances whose session on a draining broker ended, and when: make before break on
/// the agent's side is not before on control's, where the old broker's `SessionDown`
/// may arrive before the new broker's `SessionUp`.
#[derive(Default)]
struct Leaving {
    since: HashMap<String, tokio::time::Instant>,
    /// Size at which entries older than [`DRAINING_ROUTE_WAIT`] are dropped next
    /// (amortised: the live ones are kept, and the next prune waits for twice as many).
    prune_at: usize,
}

impl Leaving {
    fn insert(&mut self, appliance: String, now: tokio::time::Instant) {
        self.since.insert(appliance, now);
        if self.since.len() >= self.prune_at {
            self.since
                .retain(|_, at| now.duration_since(*at) < DRAINING_ROUTE_WAIT);
            self.prune_at = (2 * self.since.len()).max(LEAVING_PRUNE_MIN);
        }
    }

    fn contains(&self, appliance: &str) -> bool {
        self.since
            .get(appliance)
            .is_some_and(|at| at.elapsed() < DRAINING_ROUTE_WAIT)
    }
}

/// How many presence changes wait for a slow listener before it lags (and reloads).
pub const CHANGES_CAPACITY: usize = 4096;

/// A presence change: the appliance whose session came up, went down, or whose
/// heartbeat reported another trust state.
pub type Change = Arc<str>;

struct Changes(tokio::sync::broadcast::Sender<Change>);

impl Default for Changes {
    fn default() -> Self {
        Changes(tokio::sync::broadcast::channel(CHANGES_CAPACITY).0)
    }
}

/// How often an appliance was superseded from two places (a likely cloned certificate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superseded {
    /// Times.
    pub count: u32,
    /// First time (Unix seconds).
    pub first_at: u64,
    /// Last time (Unix seconds).
    pub last_at: u64,
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
        let mut draining = false;
        if let Some(old) = lock(&self.links).insert(name.to_owned(), link) {
            info!("a newer channel of the same broker replaces the older one");
            old.ended.cancel();
            draining = old.draining.load(Ordering::Relaxed);
        }
        self.forget_broker(name, draining);
        for r in sessions {
            let appliance = r.appliance.clone();
            if let Some(older) = self.session_up(name, r) {
                self.supersede(&appliance, older);
            }
        }
        link_id
    }

    /// Record the live replicas (read from the registry after each heartbeat); links
    /// tell their brokers when the set changed.
    pub fn set_replicas(
        &self,
        self_id: &str,
        mut replicas: Vec<tether_proto::cluster::ReplicaAddr>,
    ) {
        replicas.sort();
        replicas.dedup();
        let set = ReplicaSet {
            self_id: self_id.to_owned(),
            replicas,
        };
        self.replicas.0.send_if_modified(|old| {
            if *old == set {
                return false;
            }
            *old = set;
            true
        });
    }

    /// The live replicas as last recorded, and their changes.
    pub fn replicas(&self) -> tokio::sync::watch::Receiver<ReplicaSet> {
        self.replicas.0.subscribe()
    }

    /// Presence changes from now on (see [`Change`]).
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.0.subscribe()
    }

    fn changed(&self, appliance: &str) {
        if self.changes.0.receiver_count() > 0 {
            let _ = self.changes.0.send(Arc::from(appliance));
        }
    }

    /// How many appliances are connected.
    pub fn connected_count(&self) -> usize {
        lock(&self.presence).len()
    }

    /// Every connected appliance whose agent reported a trust state, with it.
    pub fn reported_trust(&self) -> Vec<(String, String)> {
        lock(&self.presence)
            .iter()
            .filter_map(|(id, p)| p.trust_state.clone().map(|t| (id.clone(), t)))
            .collect()
    }

    /// Appliances superseded from two places, with how often.
    pub fn superseded(&self) -> Vec<(String, Superseded)> {
        let mut v: Vec<_> = lock(&self.superseded)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Where `appliance` is connected, if a broker reported it.
    pub fn presence(&self, appliance: &str) -> Option<Presence> {
        lock(&self.presence).get(appliance).cloned()
    }

    /// Every broker channel that is up, by name.
    pub fn links(&self) -> Vec<LinkInfo> {
        let sessions = {
            let p = lock(&self.presence);
            let mut counts: HashMap<String, std::collections::BTreeMap<String, usize>> =
                HashMap::new();
            for pr in p.values() {
                *counts
                    .entry(pr.broker.clone())
                    .or_default()
                    .entry(pr.transport.clone())
                    .or_default() += 1;
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
                sessions: sessions.get(name).map_or(0, |t| t.values().sum()),
                sessions_by_transport: sessions.get(name).cloned().unwrap_or_default(),
                replicas_connected: l.replicas_connected.load(Ordering::Relaxed).max(1),
                draining: l.draining.load(Ordering::Relaxed),
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

    /// Ask broker `name` to drain as on SIGTERM ([`ToBroker::Drain`]) on its channel to
    /// this replica; it is shown as draining from now on.
    pub fn drain(&self, name: &str) -> Result<(), DrainRefusal> {
        let links = lock(&self.links);
        let link = links.get(name).ok_or(DrainRefusal::NotConnected)?;
        if !link.drain {
            return Err(DrainRefusal::Unsupported);
        }
        if link.tx.try_send(ToBroker::Drain).is_err() {
            warn!(broker = %name, "broker channel queue full; the drain request is dropped");
            return Err(DrainRefusal::NotConnected);
        }
        link.draining.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Close broker `name`'s channel (it was revoked).
    pub fn disconnect(&self, name: &str) {
        if let Some(link) = lock(&self.links).get(name) {
            link.ended.cancel();
        }
    }

    /// Run a command on `appliance` through the broker that holds it. `Err` when it
    /// cannot even be sent: `offline` (no broker reports it), `no_channel` (this replica
    /// holds no channel to that broker) or `broker_lost`.
    pub async fn exec(
        &self,
        appliance: &str,
        argv: Vec<String>,
        kind: CommandKind,
        env_allowlist: Vec<String>,
        timeout: Duration,
    ) -> Result<(String, u64, ExecEvents), CommandFailure> {
        self.exec_signed(
            appliance,
            argv,
            kind,
            env_allowlist,
            timeout,
            SignedCommand::default(),
        )
        .await
    }

    /// [`Cluster::exec`] with the signed-operations fields (an approval, a plan request):
    /// the broker relays them to an agent that announced `signed-ops/1`, and its manifest
    /// or plan back as [`ExecEvent::Manifest`] / [`ExecEvent::Plan`].
    pub async fn exec_signed(
        &self,
        appliance: &str,
        argv: Vec<String>,
        kind: CommandKind,
        env_allowlist: Vec<String>,
        timeout: Duration,
        signed: SignedCommand,
    ) -> Result<(String, u64, ExecEvents), CommandFailure> {
        // An agent refuses new commands on the session its draining broker told to go
        // away: route to the session it makes next, on another broker.
        self.wait_off_draining(appliance, DRAINING_ROUTE_WAIT).await;
        let presence = self.presence(appliance).ok_or(CommandFailure::Offline)?;
        let (link_id, tx) = {
            let links = lock(&self.links);
            // Presence names a broker this replica holds no channel to (it ended a moment
            // ago, or a partition): another replica may hold one.
            let link = links
                .get(&presence.broker)
                .ok_or(CommandFailure::NoChannel)?;
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
            signed: Some(signed),
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

    /// Whether broker `broker` is draining, as far as this replica knows.
    pub fn broker_draining(&self, broker: &str) -> bool {
        lock(&self.links)
            .get(broker)
            .is_some_and(|l| l.draining.load(Ordering::Relaxed))
    }

    /// Wait, up to `limit`, while `appliance` is connected to a draining broker or
    /// leaving one (it moves to another one within the drain's reconnect jitter).
    async fn wait_off_draining(&self, appliance: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let moving = match self.presence(appliance) {
                Some(p) => self.broker_draining(&p.broker),
                // Its session on a draining broker ended: the next broker's report of
                // the new one may not be here yet.
                None => lock(&self.leaving).contains(appliance),
            };
            if !moving || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Register broker `broker`'s link as [`link::run_link`] does after `Hello` (holding
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
            id: 0,
            tx,
            quic_addr: String::new(),
            connected_at: 0,
            applied: Arc::new(AtomicU64::new(0)),
            ended: CancellationToken::new(),
            tunnel: true,
            replicas_connected: Arc::default(),
            drain: true,
            draining: Arc::default(),
        };
        self.register_link(broker, link, sessions);
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
    /// broker, one of the two sessions must go: the one with the smaller
    /// (`connected_at_ms`, broker, session id) — returned (broker, session id). The rule
    /// does not depend on the order reports arrive in, so every control replica, hearing
    /// the same reports in its own order, closes the same session. A broker
    /// re-announcing, after a reconnect, a session older than the one control knows
    /// elsewhere (a zombie the appliance already left) does not displace it.
    fn session_up(&self, broker: &str, r: SessionReport) -> Option<(String, u64)> {
        let mut presence = lock(&self.presence);
        let new_key = (r.connected_ms(), broker, r.session_id);
        let known = presence
            .get(&r.appliance)
            .filter(|p| p.broker != broker)
            .map(|p| {
                let ms = if p.connected_at_ms != 0 {
                    p.connected_at_ms
                } else {
                    p.connected_at.saturating_mul(1000)
                };
                (p.broker.clone(), p.session_id, ms)
            });
        if let Some((known_broker, known_id, known_ms)) = &known {
            if new_key < (*known_ms, known_broker.as_str(), *known_id) {
                return Some((broker.to_owned(), r.session_id));
            }
        }
        lock(&self.leaving).since.remove(&r.appliance);
        presence.insert(
            r.appliance.clone(),
            Presence {
                broker: broker.to_owned(),
                session_id: r.session_id,
                connected_at_ms: r.connected_ms(),
                connected_at: r.connected_at,
                fingerprint: r.fingerprint,
                agent_version: r.agent_version,
                transport: r.transport,
                cert_not_after: r.cert_not_after,
                last_heartbeat: None,
                trust_state: None,
                capabilities: r.capabilities,
                agent_status: Default::default(),
            },
        );
        drop(presence);
        self.changed(&r.appliance);
        // Only another broker's session needs closing from here; a broker supersedes its
        // own sessions itself.
        known.map(|(b, id, _)| (b, id))
    }

    fn supersede(&self, appliance: &str, (broker, session_id): (String, u64)) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        lock(&self.superseded)
            .entry(appliance.to_owned())
            .and_modify(|s| {
                s.count += 1;
                s.last_at = now;
            })
            .or_insert(Superseded {
                count: 1,
                first_at: now,
                last_at: now,
            });
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

    /// Forget `broker`'s session `session_id` of `appliance` if it is the one control
    /// knows. On a draining broker the appliance is leaving: see [`Leaving`].
    fn session_down(&self, broker: &str, appliance: &str, session_id: u64) {
        let draining = self.broker_draining(broker);
        let mut presence = lock(&self.presence);
        if presence
            .get(appliance)
            .is_some_and(|p| p.broker == broker && p.session_id == session_id)
        {
            presence.remove(appliance);
            if draining {
                lock(&self.leaving).insert(appliance.to_owned(), tokio::time::Instant::now());
            }
            drop(presence);
            self.changed(appliance);
        }
    }

    /// `broker`'s heartbeat summaries (with any new agent status) for its sessions.
    pub fn heartbeats(&self, broker: &str, items: Vec<HeartbeatSummary>) {
        let mut changed = Vec::new();
        let mut presence = lock(&self.presence);
        for h in items {
            if let Some(p) = presence.get_mut(&h.appliance) {
                if p.broker == broker && p.session_id == h.session_id {
                    if p.trust_state.as_deref() != Some(h.trust_state.as_str()) {
                        changed.push(h.appliance.clone());
                    }
                    p.last_heartbeat = Some(h.at);
                    p.trust_state = Some(h.trust_state);
                    p.cert_not_after = h.cert_not_after;
                    if !h.status.is_empty() {
                        p.agent_status = h.status.into_iter().collect();
                    }
                }
            }
        }
        drop(presence);
        for id in changed {
            self.changed(&id);
        }
    }

    /// Forget every session of `broker` (its channel ended or was replaced); its
    /// appliances are leaving when it was `draining`.
    fn forget_broker(&self, broker: &str, draining: bool) {
        let mut gone = Vec::new();
        let mut presence = lock(&self.presence);
        presence.retain(|id, p| {
            let keep = p.broker != broker;
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        if draining && !gone.is_empty() {
            let now = tokio::time::Instant::now();
            let mut leaving = lock(&self.leaving);
            for id in &gone {
                leaving.insert(id.clone(), now);
            }
        }
        drop(presence);
        for id in gone {
            self.changed(&id);
        }
    }

    fn session_count(&self) -> i64 {
        lock(&self.presence).len() as i64
    }
}

impl Fleet for Cluster {
    fn presence(&self, id: &str) -> Option<Presence> {
        Cluster::presence(self, id)
    }
    fn appliance_changed(&self, id: &str) {
        self.changed(id);
    }
    fn quic_addrs(&self) -> Vec<String> {
        Cluster::quic_addrs(self)
    }
    fn links(&self) -> Vec<LinkInfo> {
        Cluster::links(self)
    }
    fn broadcast(&self, msg: ToBroker) {
        Cluster::broadcast(self, msg)
    }
    fn disconnect(&self, name: &str) {
        Cluster::disconnect(self, name)
    }
    fn drain(&self, name: &str) -> Result<(), DrainRefusal> {
        Cluster::drain(self, name)
    }
    fn replicas_live(&self, self_id: &str, replicas: Vec<tether_proto::cluster::ReplicaAddr>) {
        self.set_replicas(self_id, replicas)
    }
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
            connected_at_ms: 0,
            cert_not_after: 0,
            agent_version: "t".into(),
            capabilities: vec![],
            transport: "quic".into(),
        }
    }

    #[tokio::test]
    async fn a_command_for_a_broker_without_a_channel_here_is_no_channel() {
        let c = Cluster::new();
        let argv = || vec!["true".to_owned()];
        let timeout = Duration::from_secs(1);
        let sent = c
            .exec("a", argv(), CommandKind::Exec, vec![], timeout)
            .await;
        assert_eq!(sent.err(), Some(CommandFailure::Offline));
        // Presence says b1 holds it, but this replica has no channel to b1.
        assert!(c.session_up("b1", report("a", 1, 1)).is_none());
        let sent = c
            .exec("a", argv(), CommandKind::Exec, vec![], timeout)
            .await;
        assert_eq!(sent.err(), Some(CommandFailure::NoChannel));
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
    async fn a_drain_goes_down_the_brokers_link_and_commands_wait_for_the_move() {
        let c = Cluster::new();
        assert_eq!(c.drain("b1"), Err(DrainRefusal::NotConnected));
        let mut rx = c.attach_link("b1", vec![report("a", 1, 100)]);
        let _rx2 = c.attach_link("b2", vec![]);
        lock(&c.links).get_mut("b2").unwrap().drain = false;
        assert_eq!(c.drain("b2"), Err(DrainRefusal::Unsupported));
        assert!(!c.links().iter().any(|l| l.draining));
        c.drain("b1").unwrap();
        assert_eq!(rx.recv().await, Some(ToBroker::Drain));
        let draining: Vec<_> = c
            .links()
            .into_iter()
            .map(|l| (l.broker, l.draining))
            .collect();
        assert_eq!(
            draining,
            [("b1".to_owned(), true), ("b2".to_owned(), false)]
        );
        // A command for `a` waits while it is on the draining b1, and goes to b2 once the
        // appliance shows up there.
        let c = Arc::new(c);
        let moved = {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = c.session_up("b2", report("a", 2, 101));
            })
        };
        let (broker, _, _) = c
            .exec(
                "a",
                vec!["true".into()],
                CommandKind::Exec,
                vec![],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(broker, "b2");
        moved.await.unwrap();
    }

    /// `tether exec` during a drain: the agent moved to b2 (make before break), but b1's
    /// report of the old session's end came before b2's of the new one. The command
    /// waits for the move instead of answering `offline`; found by
    /// `rolling_upgrade_drains_each_broker_while_commands_run` under load.
    #[tokio::test(start_paused = true)]
    async fn a_command_waits_for_an_appliance_whose_draining_broker_reported_its_end_first() {
        let c = Arc::new(Cluster::new());
        let _b1 = c.attach_link("b1", vec![report("a", 1, 100), report("z", 3, 100)]);
        let _b2 = c.attach_link("b2", vec![report("y", 4, 100)]);
        let exec = |appliance: &'static str| {
            let c = c.clone();
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let sent = c
                    .exec(
                        appliance,
                        vec!["true".into()],
                        CommandKind::Exec,
                        vec![],
                        Duration::from_secs(5),
                    )
                    .await;
                (sent.map(|(broker, _, _)| broker), start.elapsed())
            })
        };
        // A session that ends on a broker that is not draining: offline at once.
        c.session_down("b2", "y", 4);
        assert_eq!(
            exec("y").await.unwrap(),
            (Err(CommandFailure::Offline), Duration::ZERO)
        );

        c.drain("b1").unwrap();
        let waiting = exec("a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.session_down("b1", "a", 1);
        assert!(c.presence("a").is_none());
        let late = exec("a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(c.session_up("b2", report("a", 2, 101)), None);
        for exec in [waiting, late] {
            let (broker, _) = exec.await.unwrap();
            assert_eq!(broker, Ok("b2".to_owned()));
        }

        // An appliance that left the draining broker and comes back nowhere: `offline`
        // once the wait is over, and at once for a command after that.
        c.session_down("b1", "z", 3);
        let (sent, waited) = exec("z").await.unwrap();
        assert_eq!(sent, Err(CommandFailure::Offline));
        assert!(
            (DRAINING_ROUTE_WAIT..DRAINING_ROUTE_WAIT + Duration::from_millis(100))
                .contains(&waited),
            "{waited:?}"
        );
        assert_eq!(
            exec("z").await.unwrap(),
            (Err(CommandFailure::Offline), Duration::ZERO)
        );

        // Leftovers forgotten with a draining broker's channel are leaving too.
        c.session_up("b1", report("x", 5, 102));
        let _b1 = c.attach_link("b1", vec![]);
        let waiting = exec("x");
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.session_up("b2", report("x", 6, 103));
        assert_eq!(waiting.await.unwrap().0, Ok("b2".to_owned()));
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
                tunnel: false,
                replicas_connected: Arc::default(),
                drain: false,
                draining: Arc::default(),
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
    fn every_replica_closes_the_same_session_whatever_the_order_of_reports() {
        let at = |broker: &str, id: u64, ms: u64| {
            let mut r = report("a", id, ms / 1000);
            r.connected_at_ms = ms;
            (broker.to_owned(), r)
        };
        // Same millisecond on two brokers: the broker name decides, then the session id.
        let reports = [
            at("b1", 4, 100_500),
            at("b2", 3, 100_500),
            at("b3", 9, 100_499),
        ];
        let orders: [[usize; 3]; 3] = [[0, 1, 2], [2, 1, 0], [1, 2, 0]];
        for order in orders {
            let c = Cluster::new();
            let mut closed = Vec::new();
            for i in order {
                let (broker, r) = reports[i].clone();
                closed.extend(c.session_up(&broker, r));
            }
            let kept = c.presence("a").unwrap();
            assert_eq!(
                (kept.broker.as_str(), kept.session_id),
                ("b2", 3),
                "{order:?}"
            );
            assert!(
                !closed.contains(&("b2".to_owned(), 3)),
                "{order:?}: {closed:?}"
            );
        }
    }

    #[test]
    fn a_broker_replacing_its_own_session_needs_no_close_from_control() {
        let c = Cluster::new();
        c.session_up("b1", report("a", 1, 100));
        assert_eq!(c.session_up("b1", report("a", 2, 101)), None);
        assert_eq!(c.presence("a").unwrap().session_id, 2);
    }
}
