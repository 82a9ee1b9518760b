//! Break-glass tunnels as control relays them (docs/PROTOCOL.md §12.5): which sessions
//! are open and by whom, the opens waiting for the appliance's answer, and the dial-backs
//! waiting for their broker.
//!
//! Control decides nothing about a tunnel: the agent verifies the customer's approval,
//! pins the target and keeps the clock. Control routes (`tunnel_open` and `tunnel_connect`
//! go down the link of the broker that holds the appliance), remembers who opened each
//! session (only they may connect or fetch its credential), hands the sealed credential
//! over once and forgets it, and counts what it relays. Sessions live in memory: a
//! restarted control knows none, and the agent's timer ends them all the same.

use std::collections::HashMap;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tether_api::tunnels::TunnelSession;
use tether_proto::cluster::{ToBroker, TunnelAnswer, TunnelRequest};
use tether_proto::CommandFailure;
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::{lock, Cluster};

/// A broker's dial-back, upgraded to `tether-tunnel/1`.
pub type DialBack = TokioIo<hyper::upgrade::Upgraded>;

/// How long an open waits for the appliance (minting a credential runs the customer's
/// command, whose own deadline is at most a minute).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a connection waits for its broker to dial back.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// Ended sessions kept for `GET /v1/tunnels`.
const KEEP_ENDED: usize = 256;

/// Why control could not route a tunnel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No broker reports the appliance.
    Offline,
    /// The broker holding it does not serve tunnels for control (an older broker).
    BrokerUnsupported,
    /// The broker's channel ended before it answered.
    BrokerLost,
    /// No answer in time.
    TimedOut,
}

impl RouteError {
    /// The error code callers see: the shared failure names where one exists.
    pub fn code(self) -> &'static str {
        match self {
            RouteError::Offline => CommandFailure::Offline.name(),
            RouteError::BrokerUnsupported => "broker_unsupported",
            RouteError::BrokerLost => CommandFailure::BrokerLost.name(),
            RouteError::TimedOut => CommandFailure::TimedOut.name(),
        }
    }
}

/// One session control opened.
#[derive(Debug)]
pub struct Record {
    /// What `GET /v1/tunnels` shows.
    pub view: TunnelSession,
    /// The one-time key the credential is sealed to.
    pub recipient: String,
    /// The sealed credential until its one fetch.
    sealed: Option<String>,
}

impl Record {
    /// A record for a session the appliance just made ready.
    pub fn new(view: TunnelSession, recipient: String, sealed: String) -> Record {
        Record {
            view,
            recipient,
            sealed: (!sealed.is_empty()).then_some(sealed),
        }
    }
}

/// Why a credential fetch was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialError {
    /// No such session.
    NotFound,
    /// Another operator opened it.
    NotYours,
    /// The appliance minted none.
    NoCredential,
    /// It was fetched already.
    AlreadyFetched,
    /// The session ended before it was fetched (and the copy went with it).
    SessionEnded,
}

/// The tunnel state of a [`Cluster`].
#[derive(Debug, Default)]
pub(super) struct Tunnels {
    sessions: std::sync::Mutex<Vec<Record>>,
    opening: std::sync::Mutex<HashMap<String, (u64, oneshot::Sender<TunnelAnswer>)>>,
    dials: std::sync::Mutex<HashMap<String, (String, oneshot::Sender<DialBack>)>>,
}

impl Cluster {
    /// Send a tunnel open (or plan) for `appliance` down the link of the broker holding it
    /// and wait for the appliance's answer. Returns the broker's name with it.
    pub async fn tunnel_open(
        &self,
        appliance: &str,
        id: &str,
        open: TunnelRequest,
    ) -> Result<(String, TunnelAnswer), RouteError> {
        let presence = self.presence(appliance).ok_or(RouteError::Offline)?;
        let (link_id, tx) = self.tunnel_link(&presence.broker)?;
        let (answer_tx, answer_rx) = oneshot::channel();
        lock(&self.tunnels.opening).insert(id.to_owned(), (link_id, answer_tx));
        let msg = ToBroker::TunnelOpen {
            id: id.to_owned(),
            appliance: appliance.to_owned(),
            open,
        };
        let result = async {
            tx.send(msg).await.map_err(|_| RouteError::BrokerLost)?;
            match tokio::time::timeout(OPEN_TIMEOUT, answer_rx).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(_)) => Err(RouteError::BrokerLost),
                Err(_) => Err(RouteError::TimedOut),
            }
        }
        .await;
        lock(&self.tunnels.opening).remove(id);
        Ok((presence.broker, result?))
    }

    /// The link of broker `name`, if it is up and serves tunnels.
    fn tunnel_link(
        &self,
        name: &str,
    ) -> Result<(u64, tokio::sync::mpsc::Sender<ToBroker>), RouteError> {
        let links = lock(&self.links);
        let link = links.get(name).ok_or(RouteError::Offline)?;
        if !link.tunnel {
            return Err(RouteError::BrokerUnsupported);
        }
        Ok((link.id, link.tx.clone()))
    }

    /// The broker on link `link_id` answered open `id`. An answer from another broker's
    /// link is dropped: a broker speaks only for what it was sent.
    pub(super) fn tunnel_answered(&self, link_id: u64, id: &str, answer: TunnelAnswer) -> bool {
        let mut opening = lock(&self.tunnels.opening);
        if opening.get(id).is_none_or(|(l, _)| *l != link_id) {
            return false;
        }
        let (_, tx) = opening.remove(id).expect("present");
        tx.send(answer).is_ok()
    }

    /// Fail the opens waiting on a link that ended.
    pub(super) fn tunnel_link_ended(&self, link_id: u64) {
        lock(&self.tunnels.opening).retain(|_, (l, _)| *l != link_id);
    }

    /// Remember a session that became active.
    pub fn tunnel_insert(&self, record: Record) {
        let mut sessions = lock(&self.tunnels.sessions);
        sessions.push(record);
        let ended = sessions.iter().filter(|r| r.view.ended.is_some()).count();
        if ended > KEEP_ENDED {
            if let Some(i) = sessions.iter().position(|r| r.view.ended.is_some()) {
                sessions.remove(i);
            }
        }
    }

    /// Broker `broker` says session `id` ended: record why, and return the session as it
    /// ended (`None` when it is not one of that broker's live sessions).
    pub(super) fn tunnel_ended(
        &self,
        broker: &str,
        id: &str,
        reason: &str,
    ) -> Option<TunnelSession> {
        let mut sessions = lock(&self.tunnels.sessions);
        let r = sessions
            .iter_mut()
            .find(|r| r.view.id == id && r.view.broker == broker && r.view.ended.is_none())?;
        r.view.ended = Some(reason.to_owned());
        r.view.state = "ended".into();
        // A credential never fetched is not kept past the session.
        r.sealed = None;
        Some(r.view.clone())
    }

    /// Broker `broker` lost session `id`'s session-control stream: the appliance keeps it
    /// through its disconnection grace. Returns the session (`None` when it is not one of
    /// that broker's live sessions).
    pub(super) fn tunnel_detached(&self, broker: &str, id: &str) -> Option<TunnelSession> {
        let mut sessions = lock(&self.tunnels.sessions);
        let r = sessions
            .iter_mut()
            .find(|r| r.view.id == id && r.view.broker == broker && r.view.ended.is_none())?;
        r.view.state = "detached".into();
        Some(r.view.clone())
    }

    /// Session `id`.
    pub fn tunnel(&self, id: &str) -> Option<TunnelSession> {
        lock(&self.tunnels.sessions)
            .iter()
            .find(|r| r.view.id == id)
            .map(|r| r.view.clone())
    }

    /// Every session, live first, newest first.
    pub fn tunnels(&self) -> Vec<TunnelSession> {
        let mut all: Vec<TunnelSession> = lock(&self.tunnels.sessions)
            .iter()
            .map(|r| r.view.clone())
            .collect();
        all.sort_by(|a, b| {
            a.ended
                .is_some()
                .cmp(&b.ended.is_some())
                .then(b.opened_at.cmp(&a.opened_at))
        });
        all
    }

    /// Hand session `id`'s sealed credential to `operator`, once: the copy is dropped
    /// as it is handed over. Returns the recipient and the sealed bytes (base64).
    pub fn tunnel_take_credential(
        &self,
        id: &str,
        operator: &str,
    ) -> Result<(String, String), CredentialError> {
        let mut sessions = lock(&self.tunnels.sessions);
        let r = sessions
            .iter_mut()
            .find(|r| r.view.id == id)
            .ok_or(CredentialError::NotFound)?;
        if r.view.operator != operator {
            return Err(CredentialError::NotYours);
        }
        if !r.view.credential {
            return Err(CredentialError::NoCredential);
        }
        let sealed = r.sealed.take().ok_or(if r.view.credential_fetched {
            CredentialError::AlreadyFetched
        } else {
            CredentialError::SessionEnded
        })?;
        r.view.credential_fetched = true;
        Ok((r.recipient.clone(), sealed))
    }

    /// Count bytes relayed for session `id`.
    pub fn tunnel_bytes(&self, id: &str, up: u64, down: u64) {
        if let Some(r) = lock(&self.tunnels.sessions)
            .iter_mut()
            .find(|r| r.view.id == id)
        {
            r.view.bytes_up += up;
            r.view.bytes_down += down;
        }
    }

    /// Ask the broker holding session `session`'s appliance to dial back for one
    /// connection, and wait for it. `Err` names why there is no connection.
    pub async fn tunnel_connect(&self, session: &TunnelSession) -> Result<DialBack, RouteError> {
        let presence = self
            .presence(&session.appliance)
            .ok_or(RouteError::Offline)?;
        let (_, tx) = self.tunnel_link(&presence.broker)?;
        let conn = crate::domain::token::nonce()[..32].to_owned();
        let (dial_tx, dial_rx) = oneshot::channel();
        lock(&self.tunnels.dials).insert(conn.clone(), (presence.broker.clone(), dial_tx));
        let msg = ToBroker::TunnelConnect {
            id: session.id.clone(),
            appliance: session.appliance.clone(),
            session_id: session.session_id,
            conn: conn.clone(),
        };
        let result = async {
            tx.send(msg).await.map_err(|_| RouteError::BrokerLost)?;
            match tokio::time::timeout(DIAL_TIMEOUT, dial_rx).await {
                Ok(Ok(io)) => Ok(io),
                Ok(Err(_)) => Err(RouteError::BrokerLost),
                Err(_) => Err(RouteError::TimedOut),
            }
        }
        .await;
        lock(&self.tunnels.dials).remove(&conn);
        if result.is_ok() {
            if let Some(r) = lock(&self.tunnels.sessions)
                .iter_mut()
                .find(|r| r.view.id == session.id)
            {
                r.view.connections += 1;
            }
        }
        debug!(tunnel = %session.id, broker = %presence.broker, ok = result.is_ok(), "tunnel connection routed");
        result
    }

    /// Broker `broker` dialed back for connection `conn`: the waiting connection's
    /// sender, if `conn` is one control asked *this* broker for (one use).
    pub fn tunnel_dialed(&self, broker: &str, conn: &str) -> Option<oneshot::Sender<DialBack>> {
        let mut dials = lock(&self.tunnels.dials);
        if dials.get(conn).is_none_or(|(b, _)| b != broker) {
            return None;
        }
        dials.remove(conn).map(|(_, tx)| tx)
    }

    /// Tell the broker holding session `id`'s appliance now to close it (the one that
    /// opened it finishes its session-control stream; another asks the agent with a
    /// `TunnelClose`). `false` when it is not live or no broker that serves tunnels holds
    /// the appliance.
    pub fn tunnel_close(&self, id: &str) -> bool {
        let Some((appliance, session_id)) = lock(&self.tunnels.sessions)
            .iter()
            .find(|r| r.view.id == id && r.view.ended.is_none())
            .map(|r| (r.view.appliance.clone(), r.view.session_id))
        else {
            return false;
        };
        let Some(presence) = self.presence(&appliance) else {
            return false;
        };
        let Ok((_, tx)) = self.tunnel_link(&presence.broker) else {
            return false;
        };
        info!(tunnel = %id, broker = %presence.broker, "closing a tunnel session");
        let sent = tx
            .try_send(ToBroker::TunnelClose {
                id: id.to_owned(),
                appliance,
                session_id,
            })
            .is_ok();
        if sent {
            // Its end now comes from that broker.
            if let Some(r) = lock(&self.tunnels.sessions)
                .iter_mut()
                .find(|r| r.view.id == id)
            {
                r.view.broker = presence.broker;
            }
        }
        sent
    }

    /// Live tunnel sessions.
    pub fn tunnels_active(&self) -> usize {
        lock(&self.tunnels.sessions)
            .iter()
            .filter(|r| r.view.ended.is_none())
            .count()
    }
}

/// A fresh id for a tunnel session: `tun_` and 24 hex digits.
pub fn new_id() -> String {
    let n = crate::domain::token::nonce();
    format!("tun_{}", &n[..24])
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::cluster::Link;

    fn cluster_with_links() -> (Cluster, tokio::sync::mpsc::Receiver<ToBroker>) {
        let c = Cluster::new();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for (id, name) in [(1, "b1"), (2, "b2")] {
            lock(&c.links).insert(
                name.into(),
                Link {
                    id,
                    tx: tx.clone(),
                    quic_addr: String::new(),
                    connected_at: 0,
                    applied: Arc::new(AtomicU64::new(0)),
                    ended: CancellationToken::new(),
                    tunnel: true,
                    replicas_connected: Arc::default(),
                    drain: true,
                    draining: Arc::default(),
                },
            );
        }
        (c, rx)
    }

    #[tokio::test]
    async fn a_broker_answers_only_the_opens_it_was_sent() {
        let (c, mut rx) = cluster_with_links();
        c.session_up(
            "b1",
            tether_proto::cluster::SessionReport {
                appliance: "a".into(),
                session_id: 1,
                fingerprint: "ab".into(),
                connected_at: 1,
                connected_at_ms: 0,
                cert_not_after: 0,
                agent_version: String::new(),
                capabilities: vec![],
                transport: "quic".into(),
            },
        );
        let c = Arc::new(c);
        let opening = {
            let c = c.clone();
            tokio::spawn(async move { c.tunnel_open("a", "tun_1", TunnelRequest::default()).await })
        };
        assert!(matches!(rx.recv().await, Some(ToBroker::TunnelOpen { .. })));
        let ready = TunnelAnswer::Ready {
            session_id: 9,
            expires_at_ms: 0,
            sealed_credential: String::new(),
        };
        // Broker 2 forges the answer: dropped. Broker 1's goes through.
        assert!(!c.tunnel_answered(2, "tun_1", ready.clone()));
        assert!(c.tunnel_answered(1, "tun_1", ready.clone()));
        let (broker, answer) = opening.await.unwrap().unwrap();
        assert_eq!((broker.as_str(), answer), ("b1", ready));
    }

    #[test]
    fn a_dial_back_is_taken_once_and_only_by_the_broker_asked() {
        let (c, _rx) = cluster_with_links();
        let (tx, _rx) = oneshot::channel();
        lock(&c.tunnels.dials).insert("k".into(), ("b1".into(), tx));
        assert!(c.tunnel_dialed("b2", "k").is_none());
        assert!(c.tunnel_dialed("b1", "other").is_none());
        assert!(c.tunnel_dialed("b1", "k").is_some());
        assert!(c.tunnel_dialed("b1", "k").is_none());
    }

    #[test]
    fn the_credential_goes_once_to_the_opener_and_never_after_the_end() {
        let (c, _rx) = cluster_with_links();
        let view = |id: &str| TunnelSession {
            id: id.into(),
            appliance: "a".into(),
            broker: "b1".into(),
            operator: "alice".into(),
            request_id: String::new(),
            reason: String::new(),
            resource: String::new(),
            privilege: String::new(),
            session_id: 1,
            opened_at: 0,
            expires_at_ms: 0,
            state: "active".into(),
            ended: None,
            credential: true,
            credential_fetched: false,
            connections: 0,
            bytes_up: 0,
            bytes_down: 0,
        };
        c.tunnel_insert(Record::new(view("t1"), "age1x".into(), "c2VhbGVk".into()));
        c.tunnel_insert(Record::new(view("t2"), "age1y".into(), "c2VhbGVk".into()));
        assert_eq!(
            c.tunnel_take_credential("t1", "mallory"),
            Err(CredentialError::NotYours)
        );
        assert_eq!(
            c.tunnel_take_credential("t1", "alice"),
            Ok(("age1x".into(), "c2VhbGVk".into()))
        );
        assert_eq!(
            c.tunnel_take_credential("t1", "alice"),
            Err(CredentialError::AlreadyFetched)
        );
        // Another broker cannot end it; its own can, and the unfetched copy goes with it.
        assert!(c.tunnel_ended("b2", "t2", "expired").is_none());
        assert!(c.tunnel_ended("b1", "t2", "expired").is_some());
        assert_eq!(
            c.tunnel_take_credential("t2", "alice"),
            Err(CredentialError::SessionEnded)
        );
        assert_eq!(
            c.tunnel_take_credential("nope", "alice"),
            Err(CredentialError::NotFound)
        );
    }
}
