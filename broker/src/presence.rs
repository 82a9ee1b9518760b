//! Presence and renewal generations: what session drivers tell the control channel, and
//! what control tells session drivers.
//!
//! - [`Presence`] is the drivers' side of two bounded queues to the channel task
//!   ([`PresenceRx`]). Sends never wait: the data path must not slow down because control
//!   is slow or away.
//!   - Session up/down go on the event queue. If it is ever full, the event is dropped,
//!     counted, and the channel is asked to resynchronise ([`PresenceRx::resync`]): it
//!     reconnects, and its `Hello` carries the full session list, so nothing is lost for
//!     control, only repeated.
//!   - Heartbeat summaries go on their own queue and are simply dropped (and counted) when
//!     it is full; the next heartbeat replaces them anyway.
//! - [`Generations`] holds each appliance's manual-renewal generation from control and
//!   pushes a change into the live session, whose driver puts it into the next
//!   `HeartbeatAck`.
//!
//! In standalone (file) mode [`Presence::disabled`] drops everything at no cost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tether_proto::cluster::{HeartbeatSummary, SessionReport};
use tether_proto::TrustState;
use tokio::sync::mpsc;

use crate::allowlist::ApplianceId;
use crate::metrics::Metrics;
use crate::sessions::{SessionInfo, SessionTable};

/// Capacity of the session up/down queue.
pub const EVENT_QUEUE: usize = 16 * 1024;
/// Capacity of the heartbeat-summary queue: the fan-out to the control channels empties it
/// twice a second, and 100,000 appliances heartbeating every 15 s fill 6,700 a second.
/// Slots are allocated as they fill, not up front.
pub const HEARTBEAT_QUEUE: usize = 32 * 1024;

/// A session came up or went down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceEvent {
    /// Established (after `Hello`/`Welcome`).
    Up(SessionReport),
    /// Ended.
    Down {
        /// The appliance.
        appliance: String,
        /// The broker's session id.
        session_id: u64,
        /// The close code name (or `connection_lost`).
        reason: &'static str,
    },
    /// A break-glass tunnel session control opened ended: for control's audit log. Kept
    /// across channel reconnects like backlog manifests.
    TunnelEnded {
        /// Control's id of the session.
        id: String,
        /// The close reason's name.
        reason: String,
        /// Detail.
        message: String,
        /// The signed session manifest (`""`: none).
        manifest: String,
        /// Its SSHSIG armor.
        manifest_sig: String,
    },
    /// A signed manifest from the agent's backlog (its command stream had ended before
    /// delivery): for control's audit log.
    Manifest {
        /// The appliance.
        appliance: String,
        /// The command id it was made for.
        command_id: u64,
        /// The manifest's exact bytes.
        manifest: String,
        /// Its SSHSIG armor.
        sig: String,
    },
}

/// The drivers' handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Presence {
    inner: Option<Arc<Tx>>,
}

#[derive(Debug)]
struct Tx {
    events: mpsc::Sender<PresenceEvent>,
    heartbeats: mpsc::Sender<HeartbeatSummary>,
    resync: Arc<AtomicBool>,
    /// Whether control's last `synced` said it takes backlog manifests.
    backlog: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// The channel task's side.
#[derive(Debug)]
pub struct PresenceRx {
    /// Session up/down, in order.
    pub events: mpsc::Receiver<PresenceEvent>,
    /// Heartbeat summaries.
    pub heartbeats: mpsc::Receiver<HeartbeatSummary>,
    resync: Arc<AtomicBool>,
    backlog: Arc<AtomicBool>,
}

impl PresenceRx {
    /// Whether an up/down event was dropped since the last call (the channel must send a
    /// fresh `Hello`). Clears the flag.
    pub fn resync(&self) -> bool {
        self.resync.swap(false, Ordering::Relaxed)
    }

    /// Control's `synced` said whether it takes backlog manifests.
    pub fn set_backlog_accepted(&self, accepted: bool) {
        self.backlog.store(accepted, Ordering::Relaxed);
    }

    /// The switch [`PresenceRx::set_backlog_accepted`] sets, for a task that does not
    /// hold this receiver.
    pub fn backlog_switch(&self) -> Arc<AtomicBool> {
        self.backlog.clone()
    }

    /// Throw away the presence queued (before a `Hello`, which carries the full list);
    /// the backlog manifests among it are returned, to be sent after that `Hello` (the
    /// agents were told they were passed on).
    pub fn discard(&mut self) -> Vec<PresenceEvent> {
        let mut kept = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            if matches!(
                ev,
                PresenceEvent::Manifest { .. } | PresenceEvent::TunnelEnded { .. }
            ) {
                kept.push(ev);
            }
        }
        while self.heartbeats.try_recv().is_ok() {}
        self.resync.store(false, Ordering::Relaxed);
        kept
    }
}

/// A connected pair.
pub fn channel(metrics: Arc<Metrics>) -> (Presence, PresenceRx) {
    channel_with(metrics, EVENT_QUEUE, HEARTBEAT_QUEUE)
}

/// A connected pair with the given queue sizes (tests).
pub fn channel_with(
    metrics: Arc<Metrics>,
    events: usize,
    heartbeats: usize,
) -> (Presence, PresenceRx) {
    let (etx, erx) = mpsc::channel(events);
    let (htx, hrx) = mpsc::channel(heartbeats);
    let resync = Arc::new(AtomicBool::new(false));
    let backlog = Arc::new(AtomicBool::new(false));
    (
        Presence {
            inner: Some(Arc::new(Tx {
                events: etx,
                heartbeats: htx,
                resync: resync.clone(),
                backlog: backlog.clone(),
                metrics,
            })),
        },
        PresenceRx {
            events: erx,
            heartbeats: hrx,
            resync,
            backlog,
        },
    )
}

impl Presence {
    /// A handle that drops everything (standalone mode).
    pub fn disabled() -> Presence {
        Presence { inner: None }
    }

    /// The session report of `s`, as `Hello` and `SessionUp` carry it.
    pub fn report(s: &SessionInfo) -> SessionReport {
        SessionReport {
            capabilities: s.capabilities.clone(),
            appliance: s.appliance.to_string(),
            session_id: s.session_id,
            fingerprint: s.fingerprint.to_hex(),
            connected_at: unix_secs(s.connected_at),
            connected_at_ms: s
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            cert_not_after: ms_to_secs(s.cert_not_after_ms.load(Ordering::Relaxed)),
            agent_version: s.agent_version.clone(),
            transport: s.connection.transport().as_str().to_owned(),
        }
    }

    /// `s` was established.
    pub fn session_up(&self, s: &SessionInfo) {
        if let Some(tx) = &self.inner {
            tx.event(PresenceEvent::Up(Presence::report(s)));
        }
    }

    /// `s` ended with `reason`.
    pub fn session_down(&self, s: &SessionInfo, reason: &'static str) {
        if let Some(tx) = &self.inner {
            tx.event(PresenceEvent::Down {
                appliance: s.appliance.to_string(),
                session_id: s.session_id,
                reason,
            });
        }
    }

    /// A backlog manifest of `s`'s appliance, for control. `false` when it could not be
    /// queued (the agent keeps it and re-sends it after its next reconnect); `true` in
    /// standalone mode, where the broker's log is its only destination.
    pub fn manifest(
        &self,
        s: &SessionInfo,
        command_id: u64,
        manifest: String,
        sig: String,
    ) -> bool {
        let Some(tx) = &self.inner else { return true };
        if !tx.backlog.load(Ordering::Relaxed) {
            // An older control (or none synced yet): the agent keeps it for later.
            tx.metrics.presence_dropped("manifest_not_accepted");
            return false;
        }
        tx.events
            .try_send(PresenceEvent::Manifest {
                appliance: s.appliance.to_string(),
                command_id,
                manifest,
                sig,
            })
            .map_err(|_| tx.metrics.presence_dropped("manifest"))
            .is_ok()
    }

    /// Tunnel session `id` (opened for control) ended: tell control.
    pub fn tunnel_ended(
        &self,
        id: String,
        reason: String,
        message: String,
        signed: (String, String),
    ) {
        let Some(tx) = &self.inner else { return };
        let (manifest, manifest_sig) = signed;
        let _ = tx
            .events
            .try_send(PresenceEvent::TunnelEnded {
                id,
                reason,
                message,
                manifest,
                manifest_sig,
            })
            .map_err(|_| tx.metrics.presence_dropped("tunnel_ended"));
    }

    /// `s` received a heartbeat (its fields are already updated).
    pub fn heartbeat(&self, s: &SessionInfo) {
        let Some(tx) = &self.inner else { return };
        let summary = HeartbeatSummary {
            appliance: s.appliance.to_string(),
            session_id: s.session_id,
            at: ms_to_secs(s.last_heartbeat_ms.load(Ordering::Relaxed)),
            trust_state: trust_state_name(s.trust_state()).to_owned(),
            cert_not_after: ms_to_secs(s.cert_not_after_ms.load(Ordering::Relaxed)),
            status: take_unsent(s),
        };
        let had_status = !summary.status.is_empty();
        if tx.heartbeats.try_send(summary).is_err() {
            tx.metrics.presence_dropped("heartbeat");
            if had_status {
                // Send it with a later summary instead.
                s.status.lock().unwrap_or_else(|e| e.into_inner()).unsent = true;
            }
        }
    }
}

/// The agent's status entries if control has not had them yet (then marked sent).
fn take_unsent(s: &SessionInfo) -> Vec<(String, String)> {
    let mut st = s.status.lock().unwrap_or_else(|e| e.into_inner());
    if !st.unsent {
        return Vec::new();
    }
    st.unsent = false;
    st.entries.clone()
}

impl Tx {
    fn event(&self, ev: PresenceEvent) {
        if let Err(e) = self.events.try_send(ev) {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                self.metrics.presence_dropped("session_event");
                self.resync.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// The wire name of a trust state.
pub fn trust_state_name(t: TrustState) -> &'static str {
    match t {
        TrustState::Trusted => "trusted",
        TrustState::RenewalRecommended => "renewal_recommended",
        TrustState::RenewalDue => "renewal_due",
        TrustState::TrustRevoked => "trust_revoked",
    }
}

/// Unix seconds of `t` (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ms_to_secs(ms: i64) -> u64 {
    u64::try_from(ms / 1000).unwrap_or(0)
}

/// Manual-renewal generations by appliance, as control last sent them.
#[derive(Debug, Default)]
pub struct Generations {
    map: DashMap<ApplianceId, u64>,
}

impl Generations {
    /// An empty map (every appliance at generation 0).
    pub fn new() -> Generations {
        Generations::default()
    }

    /// The appliance's generation (0 when control never named it).
    pub fn get(&self, appliance: &ApplianceId) -> u64 {
        self.map.get(appliance).map(|g| *g).unwrap_or(0)
    }

    /// Record `generations` and push each into the appliance's live session, if any.
    /// Appliances not listed keep theirs. Returns the ids that are not valid appliance ids
    /// (skipped).
    pub fn apply(&self, generations: &[(String, u64)], sessions: &SessionTable) -> Vec<String> {
        let mut invalid = Vec::new();
        for (appliance, generation) in generations {
            let Ok(id) = ApplianceId::new(appliance) else {
                invalid.push(appliance.clone());
                continue;
            };
            self.map.insert(id, *generation);
            if let Some(s) = sessions.get(appliance) {
                s.set_renewal_generation(*generation);
            }
        }
        invalid
    }

    /// Number of appliances with a recorded generation.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no generation is recorded.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_default_to_zero_and_skip_invalid_ids() {
        let g = Generations::new();
        let table = SessionTable::new();
        let a = ApplianceId::new("app-1").unwrap();
        assert_eq!(g.get(&a), 0);
        let bad = g.apply(&[("app-1".into(), 3), ("bad id".into(), 1)], &table);
        assert_eq!(bad, vec!["bad id".to_owned()]);
        assert_eq!(g.get(&a), 3);
        // Not listed: kept.
        g.apply(&[("app-2".into(), 1)], &table);
        assert_eq!(g.get(&a), 3);
        assert_eq!(g.len(), 2);
    }

    #[test]
    fn a_full_event_queue_asks_for_a_resync_instead_of_blocking() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = channel_with(metrics.clone(), 1, 1);
        let inner = tx.inner.as_ref().unwrap();
        let down = |id| PresenceEvent::Down {
            appliance: "a".into(),
            session_id: id,
            reason: "normal",
        };
        inner.event(down(1));
        assert!(!rx.resync());
        inner.event(down(2));
        assert!(rx.resync());
        assert!(!rx.resync(), "the flag clears");
        assert_eq!(rx.events.try_recv().unwrap(), down(1));
        assert!(metrics
            .render()
            .contains("tether_broker_presence_dropped_total{kind=\"session_event\"} 1"));
        rx.discard();
        assert!(rx.events.try_recv().is_err());
    }

    #[test]
    fn disabled_presence_drops_everything() {
        let p = Presence::disabled();
        assert!(p.inner.is_none());
    }
}
