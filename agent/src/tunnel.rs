//! Break-glass tunnels on the appliance (customer-trust design §3, docs/PROTOCOL.md §12).
//!
//! A session-control stream (`TunnelOpen`) is admitted by [`SignedOps::admit_tunnel`]
//! (the customer's approval re-derived from the customer's own policy, used once). The
//! target's addresses are resolved once, at activation, and pinned: connections never
//! re-resolve, so a re-pointed DNS name cannot redirect them. Time lives here: each
//! session's watchdog task ends it at activation + the approved duration (capped by
//! policy) by this agent's own timer, whatever the vendor does; it also ends it when the
//! customer's policy stops allowing it (re-checked four times a second), when the
//! customer ends it (`tether-agent session end`), when the vendor closes the
//! session-control stream, or when the appliance has had no broker session for the
//! policy's `teardown_on_disconnect_after` ([`Tunnels::broker_up`],
//! [`Tunnels::broker_down`]). A session-control stream lost with its connection does not
//! end the session by itself: connections for it are accepted on any of the agent's
//! broker connections while it lives.
//!
//! Each connection stream (`TunnelConnect`) dials the pinned addresses and copies bytes
//! both ways, half-close included (QUIC stream flow control is the back-pressure). Every
//! close carries its reason as the stream's reset code ([`TunnelCloseReason`]).
//!
//! At the end the watchdog resets every connection, runs the revoke command (retried with
//! backoff, [`REVOKE_RETRY`]; a session whose revoke never succeeded is listed in
//! `Status` as `tunnel.teardown_failed` and retried when the agent starts again), then
//! signs the session manifest (`tether_ops::session`), logs it for the customer and
//! sends it in `TunnelEnded` when the session-control stream is still there.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tether_ops::manifest::ApprovalRef;
use tether_ops::session::{
    ConnectionRecord, CredentialRecord, SessionManifest, Teardown, MAX_LISTED_CONNECTIONS,
    SESSION_MANIFEST_TYPE,
};
use tether_ops::Phase;
use tether_proto::{
    Frame, TunnelClose, TunnelCloseReason, TunnelConnect, TunnelConnected, TunnelEnded, TunnelOpen,
    TunnelPlan, TunnelReady,
};
use tether_transport::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::signed::applog::action;
use crate::signed::tunnel::TunnelDecision;
use crate::signed::{now_ms, SignedOps};

/// How often a live session re-asks the customer's files.
pub const POLICY_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long resolving the target may take at activation.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long dialing the target may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read at a time from either side of a connection.
const CHUNK: usize = 16 * 1024;
/// Under the state directory: `tether-agent session end ID` leaves `ID` here; the running
/// agent ends that session and removes the file.
pub const END_DIR: &str = "tunnel-end";

/// Ask the running agent to end session `id` (`tether-agent session end`).
pub fn request_end(state_dir: &std::path::Path, id: u64) -> std::io::Result<()> {
    let dir = state_dir.join(END_DIR);
    std::fs::create_dir_all(&dir)?;
    tether_identity::fs::write_atomic(&dir.join(id.to_string()), b"", 0o600)
}

/// A session the appliance audit log shows active (activated, not ended).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedSession {
    /// Its id.
    pub id: u64,
    /// The resource.
    pub resource: String,
    /// The privilege.
    pub privilege: String,
    /// The target, as the customer's policy named it.
    pub target: String,
    /// When the agent's timer ends it.
    pub expires_at_ms: i64,
    /// The vendor's request id.
    pub request_id: String,
    /// Its credential's id (empty: none).
    pub credential_id: String,
    /// Who its credential commands run as.
    pub run_as: String,
    /// Its revoke command, if any.
    pub revoke: Option<tether_ops::tunnel::CredentialCommand>,
    /// What its manifest needs, as journaled at activation (`None` in a log written
    /// before session manifests).
    pub journal: Option<Journal>,
    /// Its connections, as `connection.closed` entries recorded them (sessions still
    /// active only).
    pub connections: Vec<ConnectionRecord>,
    /// Its sealed credential was handed to the vendor (`credential.delivered`).
    pub delivered: bool,
}

/// What the activation entry journals for a session's manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    /// The approval that opened it.
    pub approval: ApprovalRef,
    /// The resource's phase.
    pub phase: Phase,
    /// The addresses pinned at activation.
    pub pinned: Vec<String>,
    /// The enforced length, in seconds.
    pub duration_s: u64,
    /// When it became active.
    pub activated_ms: i64,
    /// A credential was minted and sealed.
    pub minted: bool,
}

/// The sessions `log` shows activated and not ended (`tether-agent session list`).
pub fn active_in_log(log: &std::path::Path) -> anyhow::Result<Vec<LoggedSession>> {
    Ok(sessions_in_log(log)?.active)
}

/// What the appliance log says of tunnel sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggedSessions {
    /// Activated and not ended.
    pub active: Vec<LoggedSession>,
    /// Ended, with a revoke command that never succeeded (`teardown.failed`, no
    /// `credential.revoked` after it).
    pub unrevoked: Vec<LoggedSession>,
}

/// Read `log` for [`LoggedSessions`].
pub fn sessions_in_log(log: &std::path::Path) -> anyhow::Result<LoggedSessions> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut active: Vec<LoggedSession> = Vec::new();
    let mut ended: Vec<LoggedSession> = Vec::new();
    let mut unrevoked: HashSet<u64> = HashSet::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let d = &e["details"];
        let id = d["session_id"].as_str().and_then(|s| s.parse::<u64>().ok());
        let field = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
        match (e["action"].as_str(), id) {
            (Some(action::SESSION_ACTIVATED), Some(id)) => {
                let s = LoggedSession {
                    id,
                    resource: field("resource"),
                    privilege: field("privilege"),
                    target: field("target"),
                    expires_at_ms: field("expires_at_ms").parse().unwrap_or_default(),
                    request_id: e["target"].as_str().unwrap_or_default().to_owned(),
                    credential_id: field("credential_id"),
                    run_as: field("run_as"),
                    revoke: serde_json::from_str(&field("revoke")).ok(),
                    journal: (|| {
                        Some(Journal {
                            approval: ApprovalRef {
                                sha256: d["approval_sha256"].as_str()?.to_owned(),
                                approval_id: field("approval_id"),
                                signer: d["approval_signer"].as_str()?.to_owned(),
                            },
                            phase: serde_json::from_value(d["phase"].clone()).ok()?,
                            pinned: field("pinned")
                                .split(',')
                                .filter(|a| !a.is_empty())
                                .map(str::to_owned)
                                .collect(),
                            duration_s: field("duration_s").parse().ok()?,
                            activated_ms: field("activated_ms").parse().ok()?,
                            minted: field("sealed_bytes").parse::<u64>().is_ok_and(|n| n > 0),
                        })
                    })(),
                    connections: Vec::new(),
                    delivered: false,
                };
                if s.revoke.is_some() {
                    unrevoked.insert(id);
                }
                active.push(s);
            }
            (Some(action::SESSION_ENDED), Some(id)) => {
                if let Some(at) = active.iter().position(|s| s.id == id) {
                    ended.push(active.remove(at));
                }
            }
            (Some(action::CREDENTIAL_REVOKED), Some(id)) => {
                unrevoked.remove(&id);
            }
            (Some(action::CONNECTION_CLOSED), Some(id)) => {
                let num = |k: &str| field(k).parse::<u64>().unwrap_or_default();
                let ms = |k: &str| field(k).parse::<i64>().unwrap_or_default();
                if let Some(s) = active.iter_mut().find(|s| s.id == id) {
                    s.connections.push(ConnectionRecord {
                        n: num("n"),
                        opened_ms: ms("opened_ms"),
                        closed_ms: ms("closed_ms"),
                        to_target_bytes: num("bytes_down"),
                        from_target_bytes: num("bytes_up"),
                        reason: field("reason"),
                    });
                }
            }
            (Some(action::CREDENTIAL_DELIVERED), Some(id)) => {
                if let Some(s) = active.iter_mut().find(|s| s.id == id) {
                    s.delivered = true;
                }
            }
            _ => {}
        }
    }
    ended.retain(|s| unrevoked.contains(&s.id));
    Ok(LoggedSessions {
        active,
        unrevoked: ended,
    })
}

/// The waits between attempts of a failing revoke command (then it is left to the next
/// start of the agent, and flagged in `Status` until it succeeds).
pub const REVOKE_RETRY: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// How long an ended session waits for its connections to record their close before its
/// manifest is signed.
const CONNECTIONS_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How often `Status` may report changed tunnel counters alone (a session starting or
/// ending, or a failed teardown, is reported at once).
pub const COUNTERS_REPORT_EVERY: Duration = Duration::from_secs(10);

/// One active session.
#[derive(Debug)]
struct Session {
    request_id: String,
    resource: String,
    privilege: String,
    target: String,
    phase: Phase,
    max_connections: u32,
    idle: Duration,
    pinned: Vec<SocketAddr>,
    /// The agent's own end of the session (activation + approved duration).
    expires_at: Instant,
    /// The approval that opened it, for the manifest.
    approval: ApprovalRef,
    /// The enforced length, in seconds.
    duration_s: u64,
    activated_ms: i64,
    /// Set when it ends (0 before).
    ended_ms: AtomicI64,
    open: AtomicU32,
    /// Connections asked for (each one's `n`).
    connections: AtomicU64,
    /// What the manifest tells of its connections.
    record: Mutex<ConnectionsRecord>,
    credential_id: String,
    minted: bool,
    delivered: AtomicBool,
    /// Fired when the session ends; connections then close with `reason`.
    end: CancellationToken,
    reason: Mutex<Option<TunnelCloseReason>>,
}

/// A session's connections as its manifest lists them.
#[derive(Debug, Default)]
struct ConnectionsRecord {
    listed: Vec<ConnectionRecord>,
    total: u64,
    to_target_bytes: u64,
    from_target_bytes: u64,
}

impl Session {
    fn end_with(&self, reason: TunnelCloseReason) {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.end.cancel();
    }

    fn reason(&self) -> TunnelCloseReason {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(TunnelCloseReason::Closed)
    }

    fn record(&self, c: ConnectionRecord) {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.total += 1;
        r.to_target_bytes = r.to_target_bytes.saturating_add(c.to_target_bytes);
        r.from_target_bytes = r.from_target_bytes.saturating_add(c.from_target_bytes);
        if r.listed.len() < MAX_LISTED_CONNECTIONS {
            r.listed.push(c);
        }
    }
}

/// A listed session (`tether-agent session list` reads the audit log; this is the live
/// view for tests and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    /// The session id.
    pub id: u64,
    /// The resource.
    pub resource: String,
    /// The privilege.
    pub privilege: String,
    /// Connections open now.
    pub open: u32,
}

/// Which broker connections have an established session, and since when none has.
#[derive(Debug)]
struct Brokers {
    live: HashSet<usize>,
    lost_since: Instant,
}

/// The appliance's tunnel sessions.
#[derive(Debug)]
pub struct Tunnels {
    ops: Arc<SignedOps>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Where `session end` asks ([`END_DIR`]).
    end_dir: std::path::PathBuf,
    brokers: Mutex<Brokers>,
    /// Sessions whose revoke command has not succeeded (yet).
    teardown_failed: Mutex<BTreeSet<u64>>,
    /// Bytes relayed both ways, every session since the agent started.
    bytes: AtomicU64,
    /// Connections the targets accepted, every session since the agent started.
    connections: AtomicU64,
    /// The last sessions that ended, with their reason and signed manifest, for a
    /// `TunnelClose` that arrives as (or just after) one ends; woken by `ended_notify`.
    recently_ended: Mutex<std::collections::VecDeque<EndedSession>>,
    ended_notify: tokio::sync::Notify,
}

/// A session that ended: id, reason, signed manifest.
type EndedSession = (u64, TunnelCloseReason, Option<(Vec<u8>, String)>);

/// Ended sessions remembered for `TunnelClose`.
const KEEP_RECENTLY_ENDED: usize = 64;
/// How long a `TunnelClose` waits for the teardown (a failing revoke is retried for about
/// 15 s before the manifest is signed).
const CLOSE_WAIT: Duration = Duration::from_secs(30);

impl Tunnels {
    /// Tunnels decided under `ops` (whose state directory holds [`END_DIR`]).
    pub fn new(ops: Arc<SignedOps>) -> Tunnels {
        Tunnels {
            end_dir: ops.tunnel_end_dir().to_path_buf(),
            ops,
            sessions: Mutex::new(HashMap::new()),
            brokers: Mutex::new(Brokers {
                live: HashSet::new(),
                lost_since: Instant::now(),
            }),
            teardown_failed: Mutex::new(BTreeSet::new()),
            bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            recently_ended: Mutex::new(std::collections::VecDeque::new()),
            ended_notify: tokio::sync::Notify::new(),
        }
    }

    fn ended_session(&self, id: u64) -> Option<EndedSession> {
        self.recently_ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(i, _, _)| *i == id)
            .cloned()
    }

    /// A broker's `TunnelClose` on a stream of its own (the vendor's close of a session
    /// whose session-control stream was lost): end the session as `closed`, wait for its
    /// teardown, and answer its `TunnelEnded` with the signed manifest; `not_active` for
    /// a session this agent does not know.
    pub async fn serve_close(
        &self,
        conn_id: usize,
        close: TunnelClose,
        mut send: SendStream,
        limit: usize,
    ) {
        let id = close.session_id;
        match self.get(id) {
            Some(session) => {
                tracing::info!(
                    conn_id,
                    session_id = id,
                    "tunnel session closed by the vendor"
                );
                session.end_with(TunnelCloseReason::Closed);
            }
            None if self.ended_session(id).is_none() => {
                return ended(
                    &mut send,
                    TunnelCloseReason::NotActive,
                    "",
                    "no such session on this appliance",
                    None,
                    limit,
                )
                .await;
            }
            None => {}
        }
        let found = tokio::time::timeout(CLOSE_WAIT, async {
            loop {
                let notified = self.ended_notify.notified();
                if let Some(e) = self.ended_session(id) {
                    return e;
                }
                notified.await;
            }
        })
        .await;
        match found {
            Ok((_, reason, signed)) => ended(&mut send, reason, "", "", signed, limit).await,
            Err(_) => {
                ended(
                    &mut send,
                    TunnelCloseReason::Closed,
                    "",
                    "the session is ending; its teardown is still running",
                    None,
                    limit,
                )
                .await
            }
        }
    }

    fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The live sessions.
    pub fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, s)| SessionView {
                id: *id,
                resource: s.resource.clone(),
                privilege: s.privilege.clone(),
                open: s.open.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// End every session (the agent is shutting down).
    pub fn end_all(&self, reason: TunnelCloseReason) {
        for s in self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.end_with(reason);
        }
    }

    /// Broker connection `conn_id` has an established session (its `Welcome` came).
    pub fn broker_up(&self, conn_id: usize) {
        self.brokers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .insert(conn_id);
    }

    /// Broker connection `conn_id`'s session ended. When it was the last, the
    /// disconnection grace of every tunnel session starts.
    pub fn broker_down(&self, conn_id: usize) {
        let mut b = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
        if b.live.remove(&conn_id) && b.live.is_empty() {
            b.lost_since = Instant::now();
            let sessions = self
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len();
            if sessions > 0 {
                tracing::warn!(
                    sessions,
                    "no broker session: tunnel sessions end unless one is back within the customer's teardown_on_disconnect_after"
                );
            }
        }
    }

    /// How long the appliance has had no broker session (`None`: it has one).
    fn broker_lost_for(&self) -> Option<Duration> {
        let b = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
        b.live.is_empty().then(|| b.lost_since.elapsed())
    }

    /// `Status` entries: `tunnel.active` (sessions now), `tunnel.connections` and
    /// `tunnel.bytes` (accepted connections and bytes relayed both ways since the agent
    /// started), and, while any session's revoke command has not succeeded,
    /// `tunnel.teardown_failed` (their ids, comma-separated).
    pub fn status(&self) -> Vec<(String, String)> {
        let active = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let mut out = vec![
            ("tunnel.active".to_owned(), active.to_string()),
            (
                "tunnel.connections".to_owned(),
                self.connections.load(Ordering::Relaxed).to_string(),
            ),
            (
                "tunnel.bytes".to_owned(),
                self.bytes.load(Ordering::Relaxed).to_string(),
            ),
        ];
        let failed = self
            .teardown_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if !failed.is_empty() {
            out.push((
                "tunnel.teardown_failed".to_owned(),
                tether_audit::clip(&failed, tether_proto::frame::MAX_STATUS_VALUE_LEN).to_owned(),
            ));
        }
        out
    }

    /// Serve a session-control stream whose `TunnelOpen` was read: decide it, and if
    /// admitted keep the session until it ends, then say why (with the signed manifest).
    /// Should the stream be lost first, the session lives on without it (see the
    /// module's documentation).
    pub async fn serve_open(
        self: &Arc<Self>,
        conn_id: usize,
        open: TunnelOpen,
        mut send: SendStream,
        mut recv: RecvStream,
        limit: usize,
    ) {
        // Tunnels have their own limit, apart from command slots; checked before the
        // approval is looked at, so a refusal here does not use it up.
        let open_now = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let max = self.ops.max_tunnel_sessions();
        if !open.plan_only && open_now >= max {
            let message = format!(
                "{open_now} tunnel sessions are active; the customer's policy allows {max}"
            );
            ended(
                &mut send,
                TunnelCloseReason::Limit,
                "",
                &message,
                None,
                limit,
            )
            .await;
            return;
        }
        let decision = {
            let ops = self.ops.clone();
            let open = open.clone();
            tokio::task::spawn_blocking(move || ops.admit_tunnel(&open)).await
        };
        let verified = match decision {
            Ok(Ok(TunnelDecision::Open(v))) => v,
            Ok(Ok(TunnelDecision::Plan(document))) => {
                let frame = Frame::TunnelPlan(TunnelPlan {
                    document: document.into(),
                });
                let _ = write_frame(&mut send, &frame, limit).await;
                let _ = send.finish();
                return;
            }
            Ok(Err(refusal)) => {
                tracing::warn!(code = %refusal.code, detail = %refusal.detail, resource = %open.resource, "tunnel refused by the customer's rules");
                ended(
                    &mut send,
                    TunnelCloseReason::Refused,
                    refusal.code.name(),
                    &refusal.detail,
                    None,
                    limit,
                )
                .await;
                return;
            }
            Err(e) => {
                ended(
                    &mut send,
                    TunnelCloseReason::Refused,
                    "internal",
                    &e.to_string(),
                    None,
                    limit,
                )
                .await;
                return;
            }
        };
        let target = verified.break_glass.target.clone();
        // Resolved once, here, and pinned for the session's life.
        let pinned: Vec<SocketAddr> =
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&target)).await {
                Ok(Ok(addrs)) => addrs.collect(),
                _ => Vec::new(),
            };
        let id = loop {
            let id = fastrand::u64(1..);
            if self.get(id).is_none() {
                break id;
            }
        };
        if pinned.is_empty() {
            self.log_end(
                &open.request_id,
                id,
                TunnelCloseReason::TargetUnreachable.as_str(),
                "",
            );
            ended(
                &mut send,
                TunnelCloseReason::TargetUnreachable,
                "",
                &format!("cannot resolve {target}"),
                None,
                limit,
            )
            .await;
            return;
        }
        // The one-time credential, minted as the phase's user and sealed to the operator.
        let (mint, revoke) = verified
            .break_glass
            .credential
            .clone()
            .map_or((None, None), |c| (c.mint, c.revoke));
        let user = if mint.is_some() || revoke.is_some() {
            match self.ops.credential_user(&verified.run_as) {
                Ok(u) => Some(u),
                Err(r) => {
                    self.log_end(&open.request_id, id, "credential_unavailable", "");
                    ended(
                        &mut send,
                        TunnelCloseReason::Refused,
                        r.code.name(),
                        &r.detail,
                        None,
                        limit,
                    )
                    .await;
                    return;
                }
            }
        } else {
            None
        };
        let sealed = match (&mint, &user) {
            (Some(m), Some(u)) => match crate::tunnel_credential::mint_and_seal(
                m,
                u,
                &verified.break_glass.recipient,
                verified.duration.as_secs(),
                id,
            )
            .await
            {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot mint the tunnel credential");
                    self.log_end(&open.request_id, id, "credential_unavailable", "");
                    ended(
                        &mut send,
                        TunnelCloseReason::Refused,
                        "credential_unavailable",
                        &e,
                        None,
                        limit,
                    )
                    .await;
                    return;
                }
            },
            _ => None,
        };
        let credential_id = sealed
            .as_ref()
            .map(|s| s.credential_id.clone())
            .unwrap_or_default();
        let duration_ms = i64::try_from(verified.duration.as_millis()).unwrap_or(i64::MAX);
        let activated_ms = now_ms();
        let expires_at_ms = activated_ms.saturating_add(duration_ms);
        let expires_at = Instant::now() + verified.duration;
        let session = Arc::new(Session {
            request_id: open.request_id.clone(),
            resource: verified.break_glass.resource.clone(),
            privilege: verified.break_glass.privilege.clone(),
            target: target.clone(),
            phase: verified.phase,
            max_connections: verified.break_glass.max_connections,
            idle: Duration::from_secs(verified.break_glass.idle_timeout_s),
            pinned: pinned.clone(),
            expires_at,
            approval: ApprovalRef {
                sha256: verified.approval.sha256.clone(),
                approval_id: verified.approval.approval_id.clone(),
                signer: verified.approval.signer.clone(),
            },
            duration_s: verified.duration.as_secs(),
            activated_ms,
            ended_ms: AtomicI64::new(0),
            open: AtomicU32::new(0),
            connections: AtomicU64::new(0),
            record: Mutex::new(ConnectionsRecord::default()),
            credential_id: credential_id.clone(),
            minted: sealed.is_some(),
            delivered: AtomicBool::new(false),
            end: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        let journaled = self.ops.log_tunnel(
            action::SESSION_ACTIVATED,
            &open.request_id,
            &[
                ("session_id", id.to_string()),
                ("resource", session.resource.clone()),
                ("privilege", session.privilege.clone()),
                ("target", target.clone()),
                (
                    "pinned",
                    pinned
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                ("expires_at_ms", expires_at_ms.to_string()),
                ("approval_id", verified.approval.approval_id.clone()),
                ("approval_sha256", verified.approval.sha256.clone()),
                ("approval_signer", verified.approval.signer.clone()),
                ("phase", verified.phase.as_str().to_owned()),
                ("duration_s", verified.duration.as_secs().to_string()),
                ("activated_ms", activated_ms.to_string()),
                ("capped", verified.capped.to_string()),
                // What recovery after a crash needs to revoke (never the secret).
                ("credential_id", credential_id.clone()),
                (
                    "sealed_bytes",
                    sealed
                        .as_ref()
                        .map_or(0, |s| s.ciphertext.len())
                        .to_string(),
                ),
                ("run_as", verified.run_as.clone()),
                (
                    "revoke",
                    revoke
                        .as_ref()
                        .and_then(|r| serde_json::to_string(r).ok())
                        .unwrap_or_default(),
                ),
            ],
        );
        if let Err(r) = journaled {
            // Without the journal a crash could leave the credential unrevoked: fail closed.
            if let (Some(cmd), Some(u)) = (&revoke, &user) {
                self.teardown(&open.request_id, id, cmd, u, &credential_id)
                    .await;
            }
            ended(
                &mut send,
                TunnelCloseReason::Refused,
                r.code.name(),
                &r.detail,
                None,
                limit,
            )
            .await;
            return;
        }
        {
            // Opened through a broker just now: whatever the Welcome's timing, the
            // disconnection grace counts from no earlier than this.
            let mut b = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
            if b.live.is_empty() {
                b.lost_since = Instant::now();
            }
        }
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, session.clone());
        tracing::info!(session_id = id, resource = %session.resource, privilege = %session.privilege, %target, ?pinned, duration_s = verified.duration.as_secs(), "tunnel session active");
        let has_credential = sealed.is_some();
        let ready = Frame::TunnelReady(TunnelReady {
            session_id: id,
            expires_at_ms,
            sealed_credential: sealed.map(|s| s.ciphertext.into()).unwrap_or_default(),
        });
        // The watchdog owns the session's end and teardown, apart from this stream's task:
        // an aborted or stalled stream can neither keep the session alive nor skip its
        // revoke, and a lost one does not end it (the disconnection grace does).
        let watchdog = tokio::spawn({
            let this = self.clone();
            let session = session.clone();
            async move { this.watch(id, session, revoke, user).await }
        });
        let wrote = tokio::select! {
            biased;
            _ = session.end.cancelled() => false,
            r = write_frame(&mut send, &ready, limit) => r.is_ok(),
        };
        if !wrote {
            // The vendor never learnt of it: nobody can use it.
            session.end_with(TunnelCloseReason::Disconnected);
        } else if has_credential {
            session.delivered.store(true, Ordering::Relaxed);
            let _ = self.ops.log_tunnel(
                action::CREDENTIAL_DELIVERED,
                &session.request_id,
                &[
                    ("session_id", id.to_string()),
                    ("credential_id", session.credential_id.clone()),
                    ("recipient", verified.break_glass.recipient.clone()),
                ],
            );
        }
        let lost = tokio::select! {
            biased;
            _ = session.end.cancelled() => false,
            reason = stream_end(&mut recv) => match reason {
                Some(reason) => {
                    session.end_with(reason);
                    false
                }
                None => true,
            },
        };
        if lost {
            tracing::warn!(
                session_id = id,
                conn_id,
                "tunnel session-control stream lost: the session lives on while the appliance has a broker session"
            );
            let _ = self.ops.log_tunnel(
                action::SESSION_DETACHED,
                &session.request_id,
                &[("session_id", id.to_string())],
            );
            return;
        }
        let signed = watchdog.await.ok().flatten();
        let _ = tokio::time::timeout(
            FINAL_WRITE_TIMEOUT,
            ended(&mut send, session.reason(), "", "", signed, limit),
        )
        .await;
    }

    /// Until the session ends: its timer, the customer's `session end`, policy and the
    /// disconnection grace. Then out of the table, connections reset (by `end`), the
    /// credential revoked, the manifest signed and logged (returned), the end logged.
    async fn watch(
        self: Arc<Self>,
        id: u64,
        session: Arc<Session>,
        revoke: Option<tether_ops::tunnel::CredentialCommand>,
        user: Option<crate::signed::RunUser>,
    ) -> Option<(Vec<u8>, String)> {
        let reason = self.live(id, &session).await;
        session.end_with(reason);
        session.ended_ms.store(now_ms(), Ordering::Relaxed);
        let reason = session.reason();
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        tracing::info!(session_id = id, %reason, "tunnel session ended");
        // Every connection sees `end` and closes at once: let them record how.
        let closed = async {
            while session.open.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(CONNECTIONS_CLOSE_WAIT, closed).await;
        let teardown = match (&revoke, &user) {
            (Some(r), Some(u)) => {
                self.teardown(&session.request_id, id, r, u, &session.credential_id)
                    .await
            }
            _ => Teardown::None,
        };
        let manifest = self.manifest(id, &session, reason, teardown);
        let signed = self
            .ops
            .log_session_manifest(&session.request_id, id, &manifest);
        self.log_end(
            &session.request_id,
            id,
            reason.as_str(),
            &signed
                .as_ref()
                .map(|(bytes, _)| tether_ops::sha256_hex(bytes))
                .unwrap_or_default(),
        );
        {
            let mut recent = self
                .recently_ended
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if recent.len() == KEEP_RECENTLY_ENDED {
                recent.pop_front();
            }
            recent.push_back((id, reason, signed.clone()));
        }
        self.ended_notify.notify_waiters();
        signed
    }

    /// The session's manifest, once it ended.
    fn manifest(
        &self,
        id: u64,
        session: &Session,
        reason: TunnelCloseReason,
        teardown: Teardown,
    ) -> SessionManifest {
        let record = session.record.lock().unwrap_or_else(|e| e.into_inner());
        SessionManifest {
            doc_type: SESSION_MANIFEST_TYPE.into(),
            appliance: self.ops.appliance().clone(),
            request_id: session.request_id.clone(),
            session_id: id.to_string(),
            approval: session.approval.clone(),
            phase: session.phase,
            resource: session.resource.clone(),
            privilege: session.privilege.clone(),
            target: session.target.clone(),
            pinned: session.pinned.iter().map(ToString::to_string).collect(),
            duration_s: session.duration_s,
            activated_ms: session.activated_ms,
            ended_ms: session.ended_ms.load(Ordering::Relaxed),
            end_reason: reason.as_str().into(),
            connections: record.listed.clone(),
            connections_total: record.total,
            to_target_bytes: record.to_target_bytes,
            from_target_bytes: record.from_target_bytes,
            credential: CredentialRecord {
                id: session.credential_id.clone(),
                minted: session.minted,
                delivered: session.delivered.load(Ordering::Relaxed),
                revoked: teardown == Teardown::Ok,
            },
            teardown,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn log_end(&self, request_id: &str, id: u64, reason: &str, manifest_sha256: &str) {
        let mut details = vec![
            ("session_id", id.to_string()),
            ("reason", reason.to_owned()),
        ];
        if !manifest_sha256.is_empty() {
            details.push(("manifest_sha256", manifest_sha256.to_owned()));
        }
        let _ = self
            .ops
            .log_tunnel(action::SESSION_ENDED, request_id, &details);
    }

    /// Run the revoke command until it succeeds, waiting [`REVOKE_RETRY`] between
    /// attempts: `credential.revoked`, or `teardown.failed` for each failure (the session
    /// then in `tunnel.teardown_failed` until a later attempt succeeds).
    async fn teardown(
        &self,
        request_id: &str,
        id: u64,
        cmd: &tether_ops::tunnel::CredentialCommand,
        user: &crate::signed::RunUser,
        credential_id: &str,
    ) -> Teardown {
        let mut waits = REVOKE_RETRY.iter();
        for attempt in 1.. {
            match self
                .revoke(request_id, id, cmd, user, credential_id, attempt)
                .await
            {
                Ok(()) => return Teardown::Ok,
                Err(e) => match waits.next() {
                    Some(wait) => tokio::time::sleep(*wait).await,
                    None => {
                        tracing::error!(session_id = id, attempts = attempt, error = %e, "the tunnel credential is still not revoked; retried when the agent starts again");
                        return Teardown::Failed(e);
                    }
                },
            }
        }
        unreachable!("the attempts are unbounded")
    }

    /// One attempt of the revoke command: `credential.revoked` or `teardown.failed` in
    /// the log, and the session in or out of `tunnel.teardown_failed`.
    async fn revoke(
        &self,
        request_id: &str,
        id: u64,
        cmd: &tether_ops::tunnel::CredentialCommand,
        user: &crate::signed::RunUser,
        credential_id: &str,
        attempt: u32,
    ) -> Result<(), String> {
        let result = crate::tunnel_credential::revoke(cmd, user, credential_id, id).await;
        let (event, detail) = match &result {
            Ok(()) => {
                self.teardown_failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                (action::CREDENTIAL_REVOKED, String::new())
            }
            Err(e) => {
                tracing::error!(session_id = id, attempt, error = %e, "cannot revoke the tunnel credential");
                self.teardown_failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
                (action::TEARDOWN_FAILED, e.clone())
            }
        };
        let _ = self.ops.log_tunnel(
            event,
            request_id,
            &[
                ("session_id", id.to_string()),
                ("credential_id", credential_id.to_owned()),
                ("attempt", attempt.to_string()),
                ("error", detail),
            ],
        );
        result
    }

    /// At start: every session the appliance log shows activated and not ended was cut
    /// off by a crash: run its revoke command (idempotent, the customer's policy says so,
    /// retried as at a normal end), sign its manifest from what the log recorded and end
    /// it `recovered_after_crash`. Every ended session whose revoke never succeeded is
    /// revoked again. Each runs in a task of its own, started before the agent connects.
    pub async fn recover_after_crash(self: &Arc<Self>) {
        // Where `session end` asks: the agent's own, 0700 (the customer's admin is root).
        {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new().mode(0o700).create(&self.end_dir);
        }
        let logged = match sessions_in_log(self.ops.audit_log_path()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit log for sessions to recover");
                return;
            }
        };
        for s in logged.active {
            tracing::warn!(session_id = s.id, resource = %s.resource, "tunnel session cut off by a restart: tearing it down");
            tokio::spawn(self.clone().recover(s, true));
        }
        for s in logged.unrevoked {
            tracing::warn!(session_id = s.id, resource = %s.resource, "tunnel credential never revoked: revoking it again");
            tokio::spawn(self.clone().recover(s, false));
        }
    }

    /// Revoke `s`'s credential; if it was `cut_off` by a crash, then sign its manifest and
    /// end it.
    async fn recover(self: Arc<Self>, s: LoggedSession, cut_off: bool) {
        let teardown = match &s.revoke {
            None => Teardown::None,
            Some(cmd) => match self.ops.credential_user(&s.run_as) {
                Ok(user) => {
                    self.teardown(&s.request_id, s.id, cmd, &user, &s.credential_id)
                        .await
                }
                Err(r) => {
                    self.teardown_failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(s.id);
                    let _ = self.ops.log_tunnel(
                        action::TEARDOWN_FAILED,
                        &s.request_id,
                        &[
                            ("session_id", s.id.to_string()),
                            ("error", r.detail.clone()),
                        ],
                    );
                    Teardown::Failed(r.detail)
                }
            },
        };
        if !cut_off {
            return;
        }
        let signed = self
            .recovered_manifest(&s, teardown)
            .and_then(|m| self.ops.log_session_manifest(&s.request_id, s.id, &m));
        self.log_end(
            &s.request_id,
            s.id,
            "recovered_after_crash",
            &signed
                .as_ref()
                .map(|(bytes, _)| tether_ops::sha256_hex(bytes))
                .unwrap_or_default(),
        );
    }

    /// The manifest of a session a crash cut off, from its log entries (`None` for a
    /// session journaled before manifests). It ended at the latest at its expiry, or at
    /// this restart if that is earlier: the agent's timer would have ended it otherwise.
    fn recovered_manifest(&self, s: &LoggedSession, teardown: Teardown) -> Option<SessionManifest> {
        let j = s.journal.as_ref()?;
        let sum = |f: fn(&ConnectionRecord) -> u64| {
            s.connections
                .iter()
                .fold(0u64, |t, c| t.saturating_add(f(c)))
        };
        Some(SessionManifest {
            doc_type: SESSION_MANIFEST_TYPE.into(),
            appliance: self.ops.appliance().clone(),
            request_id: s.request_id.clone(),
            session_id: s.id.to_string(),
            approval: j.approval.clone(),
            phase: j.phase,
            resource: s.resource.clone(),
            privilege: s.privilege.clone(),
            target: s.target.clone(),
            pinned: j.pinned.clone(),
            duration_s: j.duration_s,
            activated_ms: j.activated_ms,
            ended_ms: now_ms().min(s.expires_at_ms).max(j.activated_ms),
            end_reason: "recovered_after_crash".into(),
            connections: s
                .connections
                .iter()
                .take(MAX_LISTED_CONNECTIONS)
                .cloned()
                .collect(),
            connections_total: s.connections.len() as u64,
            to_target_bytes: sum(|c| c.to_target_bytes),
            from_target_bytes: sum(|c| c.from_target_bytes),
            credential: CredentialRecord {
                id: s.credential_id.clone(),
                minted: j.minted,
                delivered: s.delivered,
                revoked: teardown == Teardown::Ok,
            },
            teardown,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// Wait for the session's end; its reason.
    async fn live(&self, id: u64, session: &Session) -> TunnelCloseReason {
        let mut check = tokio::time::interval(POLICY_CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = session.end.cancelled() => return session.reason(),
                _ = tokio::time::sleep_until(session.expires_at) => return TunnelCloseReason::Expired,
                _ = check.tick() => {
                    // The customer's `session end` (a file only root or the agent's user
                    // can write in the state directory).
                    let asked = self.end_dir.join(id.to_string());
                    if asked.exists() {
                        let _ = std::fs::remove_file(&asked);
                        return TunnelCloseReason::CustomerEnded;
                    }
                    let ops = self.ops.clone();
                    let (r, p, ph) = (session.resource.clone(), session.privilege.clone(), session.phase);
                    let allowed = tokio::task::spawn_blocking(move || {
                        ops.tunnel_allowed(&r, &p, ph).then(|| ops.teardown_on_disconnect_after())
                    })
                    .await
                    .ok()
                    .flatten();
                    let Some(grace) = allowed else {
                        return TunnelCloseReason::Revoked;
                    };
                    if self.broker_lost_for().is_some_and(|lost| lost >= grace) {
                        tracing::warn!(session_id = id, ?grace, "no broker session for the customer's teardown_on_disconnect_after");
                        return TunnelCloseReason::Disconnected;
                    }
                }
            }
        }
    }

    /// Serve a connection stream whose `TunnelConnect` was read, on any of the agent's
    /// broker connections (`conn_id`, for the log).
    pub async fn serve_connect(
        &self,
        conn_id: usize,
        connect: TunnelConnect,
        mut send: SendStream,
        mut recv: RecvStream,
        limit: usize,
    ) {
        let refuse = |send: &mut SendStream, recv: &mut RecvStream, r: TunnelCloseReason| {
            let code = VarInt::from_u32(r as u32);
            let _ = send.reset(code);
            let _ = recv.stop(code);
        };
        let Some(session) = self
            .get(connect.session_id)
            .filter(|s| !s.end.is_cancelled() && Instant::now() < s.expires_at)
        else {
            tracing::debug!(
                conn_id,
                session_id = connect.session_id,
                "connection for no active session"
            );
            return refuse(&mut send, &mut recv, TunnelCloseReason::NotActive);
        };
        let slot = OpenSlot(&session.open);
        if session.open.fetch_add(1, Ordering::AcqRel) >= session.max_connections {
            drop(slot);
            return refuse(&mut send, &mut recv, TunnelCloseReason::Limit);
        }
        let n = session.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let started = Instant::now();
        let dial = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&session.pinned[..]),
        );
        let tcp = tokio::select! {
            biased;
            _ = session.end.cancelled() => return refuse(&mut send, &mut recv, session.reason()),
            dialed = dial => match dialed {
                Ok(Ok(tcp)) => tcp,
                _ => return refuse(&mut send, &mut recv, TunnelCloseReason::TargetUnreachable),
            },
        };
        let opened_ms = now_ms();
        self.connections.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let connected = Frame::TunnelConnected(TunnelConnected {
            session_id: connect.session_id,
        });
        let (up, down, reason) = if write_frame(&mut send, &connected, limit).await.is_ok() {
            splice(tcp, &mut send, &mut recv, &session, &self.bytes).await
        } else {
            (0, 0, Some(TunnelCloseReason::Disconnected))
        };
        let reason_name = reason.map_or("finished", TunnelCloseReason::as_str);
        let closed_ms = now_ms();
        session.record(ConnectionRecord {
            n,
            opened_ms,
            closed_ms,
            to_target_bytes: down,
            from_target_bytes: up,
            reason: reason_name.to_owned(),
        });
        drop(slot);
        let _ = self.ops.log_tunnel(
            action::CONNECTION_CLOSED,
            &session.request_id,
            &[
                ("session_id", connect.session_id.to_string()),
                ("n", n.to_string()),
                ("bytes_up", up.to_string()),
                ("bytes_down", down.to_string()),
                ("duration_ms", started.elapsed().as_millis().to_string()),
                ("opened_ms", opened_ms.to_string()),
                ("closed_ms", closed_ms.to_string()),
                ("reason", reason_name.to_owned()),
            ],
        );
    }
}

/// How long the last frame of a session-control stream may take to write.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One of a session's open connections; given back when dropped.
struct OpenSlot<'a>(&'a AtomicU32);

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How the vendor's side of a session-control stream ended: finished, or reset with the
/// code `closed`, is the vendor closing the session (`Some(closed)`); anything else is the
/// stream lost (`None`).
async fn stream_end(recv: &mut RecvStream) -> Option<TunnelCloseReason> {
    let mut buf = [0u8; 64];
    loop {
        match recv.read(&mut buf).await {
            // Nothing more is expected from the vendor on this stream.
            Ok(Some(_)) => {}
            Ok(None) => return Some(TunnelCloseReason::Closed),
            Err(quinn::ReadError::Reset(code))
                if code.into_inner() == TunnelCloseReason::Closed as u64 =>
            {
                return Some(TunnelCloseReason::Closed)
            }
            Err(_) => return None,
        }
    }
}

/// Copy bytes both ways between the target and the stream until both directions are
/// closed (`None`), or until the connection idles or its session ends (the reason, sent
/// as the reset code). Returns (bytes to the vendor, bytes to the target, reason); every
/// byte relayed is also counted in `total`.
async fn splice(
    tcp: tokio::net::TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    session: &Session,
    total: &AtomicU64,
) -> (u64, u64, Option<TunnelCloseReason>) {
    let (mut tr, mut tw) = tcp.into_split();
    let mut from_target = vec![0u8; CHUNK];
    let mut from_vendor = vec![0u8; CHUNK];
    let (mut up, mut down) = (0u64, 0u64);
    let (mut target_open, mut vendor_open) = (true, true);
    let mut last = Instant::now();
    let close = |send: &mut SendStream, recv: &mut RecvStream, r: TunnelCloseReason| {
        let code = VarInt::from_u32(r as u32);
        let _ = send.reset(code);
        let _ = recv.stop(code);
    };
    loop {
        if !target_open && !vendor_open {
            return (up, down, None);
        }
        tokio::select! {
            biased;
            _ = session.end.cancelled() => {
                let r = session.reason();
                close(send, recv, r);
                return (up, down, Some(r));
            }
            r = tr.read(&mut from_target), if target_open => match r {
                Ok(0) => {
                    // Half-close: the target finished sending.
                    let _ = send.finish();
                    target_open = false;
                }
                Ok(n) => {
                    // Never waiting on the vendor's flow control past the session's end.
                    let written = tokio::select! {
                        biased;
                        _ = session.end.cancelled() => continue,
                        r = send.write_all(&from_target[..n]) => r,
                    };
                    if written.is_err() {
                        return (up, down, Some(TunnelCloseReason::Disconnected));
                    }
                    up += n as u64;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    last = Instant::now();
                }
                Err(_) => {
                    close(send, recv, TunnelCloseReason::TargetUnreachable);
                    return (up, down, Some(TunnelCloseReason::TargetUnreachable));
                }
            },
            r = recv.read(&mut from_vendor), if vendor_open => match r {
                Ok(None) => {
                    let _ = tw.shutdown().await;
                    vendor_open = false;
                }
                Ok(Some(n)) => {
                    let written = tokio::select! {
                        biased;
                        _ = session.end.cancelled() => continue,
                        r = tw.write_all(&from_vendor[..n]) => r,
                    };
                    if written.is_err() {
                        close(send, recv, TunnelCloseReason::TargetUnreachable);
                        return (up, down, Some(TunnelCloseReason::TargetUnreachable));
                    }
                    down += n as u64;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    last = Instant::now();
                }
                Err(_) => return (up, down, Some(TunnelCloseReason::Disconnected)),
            },
            _ = tokio::time::sleep_until(last + session.idle) => {
                close(send, recv, TunnelCloseReason::Idle);
                return (up, down, Some(TunnelCloseReason::Idle));
            }
        }
    }
}

async fn write_frame(send: &mut SendStream, frame: &Frame, limit: usize) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    tether_proto::encode_frame(frame, &mut buf, limit).map_err(std::io::Error::other)?;
    send.write_all(&buf).await.map_err(std::io::Error::from)
}

/// The last frame of a session-control stream, with the signed session manifest if
/// there is one, then FIN (best effort: the stream may be gone with the connection). A
/// manifest too large for the broker's frame limit stays in the appliance log only.
async fn ended(
    send: &mut SendStream,
    reason: TunnelCloseReason,
    code: &str,
    message: &str,
    signed: Option<(Vec<u8>, String)>,
    limit: usize,
) {
    let frame = |signed: Option<(Vec<u8>, String)>| {
        let (manifest, manifest_sig) = signed
            .map(|(m, s)| (m.into(), s.into_bytes().into()))
            .unwrap_or_default();
        Frame::TunnelEnded(TunnelEnded {
            reason,
            code: code.to_owned(),
            message: tether_audit::clip(message, tether_proto::frame::MAX_MESSAGE_LEN - 64).into(),
            manifest,
            manifest_sig,
        })
    };
    let mut buf = BytesMut::new();
    if tether_proto::encode_frame(&frame(signed), &mut buf, limit).is_err() {
        buf.clear();
        let _ = tether_proto::encode_frame(&frame(None), &mut buf, limit);
    }
    let _ = send.write_all(&buf).await;
    let _ = send.finish();
}
