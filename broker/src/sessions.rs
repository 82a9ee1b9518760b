//! The session table: at most one live session per appliance.
//!
//! `DashMap<ApplianceId, Arc<SessionInfo>>`: inserting a session for an appliance that
//! already has one returns the old one, which the caller closes as superseded. Closing the
//! sessions of removed fingerprints looks each removed entry up by appliance id, so the
//! work is proportional to the change, not to the fleet.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tether_proto::{CloseCode, TrustState};

use crate::allowlist::{ApplianceId, Entry, Fingerprint};
use crate::metrics::{Code, Metrics};

/// One live session.
#[derive(Debug)]
pub struct SessionInfo {
    /// Broker-assigned id (announced in `Welcome`).
    pub session_id: u64,
    /// The appliance.
    pub appliance: ApplianceId,
    /// Fingerprint of the certificate the session authenticated with.
    pub fingerprint: Fingerprint,
    /// When `Hello` was accepted.
    pub connected_at: SystemTime,
    /// The agent's address.
    pub remote: SocketAddr,
    /// The agent's version from `Hello`.
    pub agent_version: String,
    /// The capabilities the agent announced in `Hello` (`tether_proto::capability`).
    pub capabilities: Vec<String>,
    /// The connection, for commands and for closing.
    pub connection: tether_transport::Connection,
    /// `notAfter` of the certificate, ms since the epoch (updated by heartbeats).
    pub cert_not_after_ms: AtomicI64,
    /// Wall time of the last heartbeat, ms since the epoch (0 = none yet).
    pub last_heartbeat_ms: AtomicI64,
    /// Last reported trust state (`TrustState as u8`).
    pub trust_state: AtomicU8,
    /// The appliance's manual-renewal generation from control; the driver puts it into
    /// the session's next `HeartbeatAck` when [`SessionInfo::renewal_changed`] fires.
    pub renewal_generation: AtomicU64,
    /// Notified when [`SessionInfo::renewal_generation`] changes.
    pub renewal_changed: tokio::sync::Notify,
    /// The code this session was closed with from outside its driver (revoked,
    /// superseded, draining, a close from control), `u8::MAX` while none: the driver
    /// reports it as the reason the session ended.
    pub close_code: AtomicU8,
    /// The agent's last `Status` report (signed operations: its policy, phases,
    /// approvers, privsep, audit head), and whether control has not had it yet.
    pub status: std::sync::Mutex<AgentStatus>,
}

/// An agent's last `Status`, as the broker keeps it for control.
#[derive(Debug, Default)]
pub struct AgentStatus {
    /// Its entries, in the agent's order.
    pub entries: Vec<(String, String)>,
    /// Set when it changed and control has not been sent it yet.
    pub unsent: bool,
}

/// [`SessionInfo::close_code`] while the session was not closed from outside.
pub const NOT_CLOSED: u8 = u8::MAX;

impl SessionInfo {
    /// The last trust state the agent reported.
    pub fn trust_state(&self) -> TrustState {
        let v = self.trust_state.load(Ordering::Relaxed);
        TrustState::ALL
            .iter()
            .copied()
            .find(|t| *t as u8 == v)
            .unwrap_or(TrustState::Trusted)
    }

    /// Close the connection with `code`.
    pub fn close(&self, code: CloseCode, metrics: &Metrics) {
        let _ = self.close_code.compare_exchange(
            NOT_CLOSED,
            code.code() as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        close(&self.connection, code, metrics);
    }

    /// Whether the agent announced `capability` in its `Hello`.
    pub fn has_capability(&self, capability: &str) -> bool {
        tether_proto::capability::announced(&self.capabilities, capability)
    }

    /// The code the session was closed with from outside its driver, if any.
    pub fn closed_with(&self) -> Option<CloseCode> {
        match self.close_code.load(Ordering::Relaxed) {
            NOT_CLOSED => None,
            c => CloseCode::from_code(u64::from(c)),
        }
    }

    /// Set the manual-renewal generation and wake the driver if it changed.
    pub fn set_renewal_generation(&self, generation: u64) {
        if self.renewal_generation.swap(generation, Ordering::Relaxed) != generation {
            self.renewal_changed.notify_one();
        }
    }
}

/// Close `conn` with `code` (its name as the reason phrase) and count it.
pub fn close(conn: &tether_transport::Connection, code: CloseCode, metrics: &Metrics) {
    if conn.close_reason().is_none() {
        metrics
            .sessions_closed
            .get_or_create(&Code {
                code: code.as_str(),
            })
            .inc();
    }
    conn.close(
        quinn::VarInt::from_u32(code.code()),
        code.as_str().as_bytes(),
    );
}

/// All live sessions of this broker.
#[derive(Debug)]
pub struct SessionTable {
    map: DashMap<ApplianceId, Arc<SessionInfo>>,
    next_id: AtomicU64,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionTable {
    /// An empty table. Session ids start at a random point so ids from two broker runs are
    /// unlikely to collide in logs.
    pub fn new() -> SessionTable {
        SessionTable {
            map: DashMap::new(),
            next_id: AtomicU64::new(fastrand::u64(1..u64::MAX >> 16)),
        }
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Register `session`; returns the session it replaced, which the caller must close
    /// with [`CloseCode::Superseded`].
    pub fn insert(&self, session: Arc<SessionInfo>) -> Option<Arc<SessionInfo>> {
        self.map.insert(session.appliance.clone(), session)
    }

    /// Remove the appliance's session if it is still `session_id` (a newer one may have
    /// replaced it).
    pub fn remove(&self, appliance: &ApplianceId, session_id: u64) -> bool {
        self.map
            .remove_if(appliance, |_, s| s.session_id == session_id)
            .is_some()
    }

    /// The appliance's live session.
    pub fn get(&self, appliance: &str) -> Option<Arc<SessionInfo>> {
        // `ApplianceId: Borrow<str>`: no id is built for a lookup.
        self.map.get(appliance).map(|s| s.value().clone())
    }

    /// Close every live session that authenticated with a removed entry. Returns how many.
    pub fn close_revoked(&self, removed: &[Entry], metrics: &Metrics) -> usize {
        let mut closed = 0;
        for entry in removed {
            let session = self
                .map
                .get(&entry.appliance)
                .filter(|s| s.fingerprint == entry.fingerprint)
                .map(|s| s.value().clone());
            if let Some(s) = session {
                tracing::info!(
                    appliance = %s.appliance,
                    session_id = s.session_id,
                    fingerprint = %s.fingerprint,
                    "fingerprint removed from allowlist: closing live session"
                );
                s.close(CloseCode::Revoked, metrics);
                metrics.sessions_revoked.inc();
                closed += 1;
            }
        }
        closed
    }

    /// Close the appliance's session if it is still `session_id`. Returns whether it was.
    pub fn close_if(
        &self,
        appliance: &str,
        session_id: u64,
        code: CloseCode,
        metrics: &Metrics,
    ) -> bool {
        match self.get(appliance) {
            Some(s) if s.session_id == session_id => {
                s.close(code, metrics);
                true
            }
            _ => false,
        }
    }

    /// Every live session (a copy of the handles).
    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
