//! Control replicas as a broker sees them: which replicas are live (control's
//! [`ToBroker::Replicas`](tether_proto::cluster::ToBroker::Replicas), kept in the data
//! directory as [`REPLICAS_FILE`] so a restart works without the load balancer), which of
//! them this broker holds a channel to (one channel per replica id: a second channel
//! landing on a held id is closed), and the presence fan-out that gives every channel its
//! own copy of session up/down and heartbeats.
//!
//! The channels themselves are in [`crate::channel`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_proto::cluster::{HeartbeatSummary, ReplicaAddr};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::datadir::check_control_url;
use crate::metrics::Metrics;
use crate::presence::{PresenceEvent, PresenceRx, EVENT_QUEUE};

/// The file in the data directory holding the live replicas control last sent (JSON).
pub const REPLICAS_FILE: &str = "control.replicas";
/// Most replicas a broker follows (more in a frame are ignored).
pub const MAX_REPLICAS: usize = 64;
/// Longest replica id taken.
pub const MAX_REPLICA_ID: usize = 128;

/// Why a replica list from control was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaListError {
    /// An id is empty, too long, or not `[A-Za-z0-9._-]`.
    #[error("invalid replica id {0:?}")]
    InvalidId(String),
    /// An address is not `host:port`.
    #[error("replica {id}: invalid advertise address {advertise:?}")]
    InvalidAdvertise {
        /// The replica.
        id: String,
        /// What it advertised.
        advertise: String,
    },
    /// More than [`MAX_REPLICAS`].
    #[error("{0} replicas listed, at most {MAX_REPLICAS} are followed")]
    TooMany(usize),
}

/// Check a replica list from control (its ids go into logs and metrics, its addresses
/// are dialed).
pub fn check_replicas(list: &[ReplicaAddr]) -> Result<(), ReplicaListError> {
    if list.len() > MAX_REPLICAS {
        return Err(ReplicaListError::TooMany(list.len()));
    }
    for r in list {
        check_id(&r.id)?;
        check_control_url(&replica_url(&r.advertise)).map_err(|_| {
            ReplicaListError::InvalidAdvertise {
                id: r.id.clone(),
                advertise: r.advertise.clone(),
            }
        })?;
    }
    Ok(())
}

/// Check one replica id (from a list or an upgrade answer's header).
pub fn check_id(id: &str) -> Result<(), ReplicaListError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REPLICA_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ReplicaListError::InvalidId(id.to_owned()))
    }
}

/// The HTTPS base URL of a replica's `advertise` address.
pub fn replica_url(advertise: &str) -> String {
    format!("https://{advertise}")
}

/// The replica list saved in `path`, if a valid one is there (anything else is logged
/// and ignored: the bundle's URL still works).
pub fn load(path: &Path) -> Vec<ReplicaAddr> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the saved control replicas");
            return Vec::new();
        }
    };
    match serde_json::from_slice::<Vec<ReplicaAddr>>(&bytes) {
        Ok(list) => match check_replicas(&list) {
            Ok(()) => list,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "saved control replicas ignored");
                Vec::new()
            }
        },
        Err(e) => {
            warn!(path = %path.display(), error = %e, "saved control replicas ignored");
            Vec::new()
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    /// The live replicas control last listed, sorted by id.
    known: Vec<ReplicaAddr>,
    /// Replica id → the slot holding a channel to it.
    held: HashMap<String, u64>,
    /// Replica ids with a slot dialing them directly.
    direct: HashSet<String>,
}

/// The replicas and the channels to them.
#[derive(Debug)]
pub struct Fleet {
    state: Mutex<Held>,
    /// Woken when the list or the held set changes.
    pub changed: Notify,
    /// The ids held, for [`tether_proto::cluster::ToControl::Channels`].
    held_ids: watch::Sender<Vec<String>>,
    up: AtomicUsize,
    synced: AtomicUsize,
    metrics: Arc<Metrics>,
    path: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fleet {
    /// A fleet whose list is saved at `path` (and starts from what is saved there).
    pub fn new(path: PathBuf, metrics: Arc<Metrics>) -> Fleet {
        let mut known = load(&path);
        known.sort();
        if !known.is_empty() {
            info!(
                replicas = known.len(),
                "control replicas from the data directory"
            );
        }
        Fleet {
            state: Mutex::new(Held {
                known,
                ..Held::default()
            }),
            changed: Notify::new(),
            held_ids: watch::channel(Vec::new()).0,
            up: AtomicUsize::new(0),
            synced: AtomicUsize::new(0),
            metrics,
            path,
        }
    }

    /// Control listed the live replicas: record (and save) them if they changed.
    pub fn set_known(&self, mut list: Vec<ReplicaAddr>) {
        list.sort();
        list.dedup_by(|a, b| a.id == b.id);
        {
            let mut s = lock(&self.state);
            if s.known == list {
                return;
            }
            info!(replicas = ?list.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), "control replicas changed");
            s.known = list.clone();
        }
        match serde_json::to_vec_pretty(&list) {
            Ok(json) => {
                if let Err(e) = crate::datadir::write_atomic(&self.path, &json, None) {
                    warn!(path = %self.path.display(), error = %e, "cannot save the control replicas");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode the control replicas"),
        }
        self.changed.notify_waiters();
    }

    /// The advertise address of replica `id`, if listed.
    pub fn advertise(&self, id: &str) -> Option<String> {
        lock(&self.state)
            .known
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.advertise.clone())
    }

    /// Take replica `id` for `slot`; false when another slot holds it.
    pub fn claim(&self, id: &str, slot: u64) -> bool {
        let mut s = lock(&self.state);
        match s.held.get(id) {
            Some(holder) if *holder != slot => false,
            _ => {
                s.held.insert(id.to_owned(), slot);
                let ids = sorted(s.held.keys());
                drop(s);
                self.held_ids.send_replace(ids);
                true
            }
        }
    }

    /// `slot` no longer holds `id`.
    pub fn release(&self, id: &str, slot: u64) {
        let mut s = lock(&self.state);
        if s.held.get(id) == Some(&slot) {
            s.held.remove(id);
            let ids = sorted(s.held.keys());
            drop(s);
            self.held_ids.send_replace(ids);
            self.changed.notify_waiters();
        }
    }

    /// Every listed replica is held (nothing for the bootstrap URL to find). False while
    /// no list is known.
    pub fn all_held(&self) -> bool {
        let s = lock(&self.state);
        !s.known.is_empty() && s.known.iter().all(|r| s.held.contains_key(&r.id))
    }

    /// Whether a direct slot for `id` should keep dialing: it is listed and no other
    /// slot holds it. When not, the slot is forgotten (it ends).
    pub fn keep_dialing(&self, id: &str, slot: u64) -> bool {
        let mut s = lock(&self.state);
        let keep = s.known.iter().any(|r| r.id == id)
            && s.held.get(id).is_none_or(|holder| *holder == slot);
        if !keep {
            s.direct.remove(id);
        }
        keep
    }

    /// The listed replicas nobody holds or dials, marked as dialed: the caller starts a
    /// direct slot for each.
    pub fn to_dial(&self) -> Vec<ReplicaAddr> {
        let mut s = lock(&self.state);
        let todo: Vec<ReplicaAddr> = s
            .known
            .iter()
            .filter(|r| !s.held.contains_key(&r.id) && !s.direct.contains(&r.id))
            .cloned()
            .collect();
        for r in &todo {
            s.direct.insert(r.id.clone());
        }
        todo
    }

    /// The ids held now, and their changes.
    pub fn held_ids(&self) -> watch::Receiver<Vec<String>> {
        self.held_ids.subscribe()
    }

    /// A channel came up.
    pub fn channel_up(&self) {
        let up = self.up.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.control_channels.set(up as i64);
        self.metrics.control_connected.set(1);
    }

    /// A channel that was up ended (`synced`: it had synced).
    pub fn channel_down(&self, synced: bool) {
        let up = self.up.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        self.metrics.control_channels.set(up as i64);
        self.metrics.control_connected.set(i64::from(up > 0));
        if synced {
            let n = self
                .synced
                .fetch_sub(1, Ordering::Relaxed)
                .saturating_sub(1);
            if n == 0 {
                self.metrics.allowlist_stale.set(1);
            }
        }
    }

    /// A channel synced.
    pub fn channel_synced(&self) {
        self.synced.fetch_add(1, Ordering::Relaxed);
        self.metrics.allowlist_stale.set(0);
    }

    /// How many channels are up.
    pub fn channels_up(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }
}

fn sorted<'a>(ids: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = ids.cloned().collect();
    v.sort();
    v
}

/// One item of the presence fan-out.
#[derive(Clone, Debug)]
pub enum Fanned {
    /// Sessions came up or went down, in order (the events of one
    /// [`PRESENCE_BATCH_WINDOW`]).
    Events(Arc<[PresenceEvent]>),
    /// Presence was dropped before the fan-out: every channel resynchronises.
    Resync,
}

/// The presence every channel gets a copy of, and the backlog items (manifests, tunnel
/// ends: audit records) that go to exactly one channel.
#[derive(Debug)]
pub struct Fanout {
    events: broadcast::Sender<Fanned>,
    /// Heartbeat summaries, a batch every [`RESYNC_CHECK`].
    heartbeats: broadcast::Sender<Arc<[HeartbeatSummary]>>,
    /// Backlog items; whichever channel takes one sends it.
    pub backlog: tokio::sync::Mutex<mpsc::Receiver<PresenceEvent>>,
}

/// Interval at which the fan-out checks the drivers' resync flag and passes on the
/// heartbeat summaries queued meanwhile, as one batch.
const RESYNC_CHECK: Duration = Duration::from_millis(500);
/// How long the fan-out gathers session up/down events after the first before passing
/// them on together. In a connection storm each event alone woke every channel task and
/// cost it a TLS record and a `write` to control (19 µs of broker CPU per connect in a
/// QUIC storm's profile); together they share them. Control learns of a session this much
/// later, which no one can tell from the time the agent's handshake took.
pub const PRESENCE_BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Most events in one batch (a channel sends them as one write).
const PRESENCE_BATCH_MAX: usize = 1024;
/// Heartbeat batches a channel may fall behind by (a minute's worth) before it skips some.
const HEARTBEAT_BATCHES: usize = 120;

impl Fanout {
    /// Start the fan-out task reading `rx` until `shutdown`.
    pub fn spawn(mut rx: PresenceRx, shutdown: CancellationToken) -> Arc<Fanout> {
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let (heartbeats, _) = broadcast::channel(HEARTBEAT_BATCHES);
        let (backlog_tx, backlog_rx) = mpsc::channel(EVENT_QUEUE);
        let fan = Arc::new(Fanout {
            events,
            heartbeats,
            backlog: tokio::sync::Mutex::new(backlog_rx),
        });
        let out = fan.clone();
        tokio::spawn(async move {
            let mut check = tokio::time::interval(RESYNC_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = rx.events.recv() => {
                        let Some(first) = ev else { return };
                        let mut batch = Vec::new();
                        let mut next = Some(first);
                        let window = tokio::time::sleep(PRESENCE_BATCH_WINDOW);
                        tokio::pin!(window);
                        loop {
                            match next.take() {
                                Some(ev @ (PresenceEvent::Up(_) | PresenceEvent::Down { .. })) => {
                                    batch.push(ev);
                                }
                                Some(ev) => {
                                    let Ok(()) = backlog_tx.send(ev).await else { return };
                                }
                                None => {}
                            }
                            if batch.is_empty() || batch.len() >= PRESENCE_BATCH_MAX {
                                break;
                            }
                            // Gather what else comes within the window (its first event
                            // opened it), so a storm's events travel together.
                            next = tokio::select! {
                                _ = shutdown.cancelled() => return,
                                ev = rx.events.recv() => match ev {
                                    None => return,
                                    some => some,
                                },
                                _ = &mut window => break,
                            };
                        }
                        if !batch.is_empty() {
                            let _ = out.events.send(Fanned::Events(batch.into()));
                        }
                    },
                    // Heartbeat summaries are taken a batch at a time, not as they come:
                    // waiting on their queue would wake this task (and every channel after
                    // it) for each heartbeat of the fleet.
                    _ = check.tick() => {
                        if rx.resync() {
                            let _ = out.events.send(Fanned::Resync);
                        }
                        let mut batch = Vec::new();
                        while let Ok(hb) = rx.heartbeats.try_recv() {
                            batch.push(hb);
                        }
                        if !batch.is_empty() {
                            let _ = out.heartbeats.send(batch.into());
                        }
                    }
                }
            }
        });
        fan
    }

    /// A new channel's copies (take them before listing the sessions for `Hello`, so
    /// nothing after that list is missed; what comes between is repeated, harmlessly).
    pub fn subscribe(
        &self,
    ) -> (
        broadcast::Receiver<Fanned>,
        broadcast::Receiver<Arc<[HeartbeatSummary]>>,
    ) {
        (self.events.subscribe(), self.heartbeats.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, advertise: &str) -> ReplicaAddr {
        ReplicaAddr {
            id: id.into(),
            advertise: advertise.into(),
        }
    }

    fn up(appliance: &str) -> PresenceEvent {
        PresenceEvent::Up(tether_proto::cluster::SessionReport {
            appliance: appliance.into(),
            session_id: 1,
            fingerprint: String::new(),
            connected_at: 0,
            connected_at_ms: 0,
            cert_not_after: 0,
            agent_version: String::new(),
            capabilities: Vec::new(),
            transport: "tcp".into(),
        })
    }

    fn names(events: &[PresenceEvent]) -> Vec<&str> {
        events
            .iter()
            .map(|e| match e {
                PresenceEvent::Up(r) => r.appliance.as_str(),
                PresenceEvent::Down { appliance, .. } => appliance.as_str(),
                _ => "other",
            })
            .collect()
    }

    #[tokio::test]
    async fn session_events_of_one_window_travel_together_in_order() {
        let (_presence, mut rx) = crate::presence::channel(Arc::new(Metrics::new()));
        let (tx, events) = mpsc::channel(16);
        rx.events = events;
        let shutdown = CancellationToken::new();
        let fan = Fanout::spawn(rx, shutdown.clone());
        let (mut out, _) = fan.subscribe();
        // Queued before the fan-out runs (one thread): all within its first window.
        tx.send(up("a")).await.unwrap();
        tx.send(PresenceEvent::Down {
            appliance: "b".into(),
            session_id: 2,
            reason: "going_away",
        })
        .await
        .unwrap();
        tx.send(PresenceEvent::Manifest {
            appliance: "m".into(),
            command_id: 3,
            manifest: String::new(),
            sig: String::new(),
        })
        .await
        .unwrap();
        tx.send(up("c")).await.unwrap();
        let Fanned::Events(first) = out.recv().await.unwrap() else {
            panic!("events expected");
        };
        assert_eq!(names(&first), ["a", "b", "c"]);
        // The backlog item went to the backlog queue, not to every channel.
        let backlog = fan.backlog.lock().await.recv().await.unwrap();
        assert!(matches!(
            backlog,
            PresenceEvent::Manifest { command_id: 3, .. }
        ));
        // A later event opens a window of its own.
        tx.send(up("d")).await.unwrap();
        let Fanned::Events(second) = out.recv().await.unwrap() else {
            panic!("events expected");
        };
        assert_eq!(names(&second), ["d"]);
        shutdown.cancel();
    }

    #[test]
    fn replica_lists_are_checked() {
        assert_eq!(check_replicas(&[r("a1", "127.0.0.1:8443")]), Ok(()));
        assert_eq!(
            check_replicas(&[r("a b", "127.0.0.1:8443")]),
            Err(ReplicaListError::InvalidId("a b".into()))
        );
        assert!(matches!(
            check_replicas(&[r("a", "x/y")]),
            Err(ReplicaListError::InvalidAdvertise { .. })
        ));
        let many: Vec<_> = (0..=MAX_REPLICAS)
            .map(|i| r(&format!("r{i}"), "c:1"))
            .collect();
        assert_eq!(
            check_replicas(&many),
            Err(ReplicaListError::TooMany(MAX_REPLICAS + 1))
        );
    }

    #[test]
    fn one_channel_per_replica_and_the_list_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPLICAS_FILE);
        let metrics = Arc::new(Metrics::new());
        let fleet = Fleet::new(path.clone(), metrics.clone());
        assert!(!fleet.all_held(), "nothing known: the bootstrap URL dials");
        fleet.set_known(vec![r("b", "127.0.0.1:2"), r("a", "127.0.0.1:1")]);
        assert_eq!(fleet.to_dial().len(), 2);
        assert!(fleet.to_dial().is_empty(), "each is dialed once");
        // The bootstrap channel lands on a first; the direct slot 2 for a then stops.
        assert!(fleet.claim("a", 1));
        assert!(!fleet.claim("a", 2));
        assert!(!fleet.keep_dialing("a", 2));
        assert!(fleet.claim("b", 3));
        assert!(fleet.all_held());
        assert_eq!(*fleet.held_ids().borrow(), vec!["a", "b"]);
        fleet.release("a", 1);
        assert!(!fleet.all_held());
        assert_eq!(fleet.to_dial(), vec![r("a", "127.0.0.1:1")]);
        // A restart reads the list back.
        let again = Fleet::new(path, metrics);
        assert_eq!(again.to_dial().len(), 2);
    }
}
