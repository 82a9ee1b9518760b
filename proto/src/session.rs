//! Session-stream state machines for both ends of a connection.
//!
//! Each is fed by `handle_frame` / `handle_timeout` and drained by `poll_transmit` (frames
//! to write), `poll_event` (what happened) and `poll_timeout` (when to call
//! `handle_timeout` next). A thin async driver in the broker or agent does the I/O. Time
//! comes in as a [`Now`], so tests run on a virtual clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::capability;
use crate::close::CloseCode;
use crate::codec::{DecodeError, DEFAULT_MAX_FRAME_LEN, MIN_MAX_FRAME_LEN};
use crate::frame::{
    Frame, FrameType, GoAway, GoAwayReason, Heartbeat, HeartbeatAck, Hello, ManifestAck,
    ManifestBacklog, Status, TrustState, Welcome,
};
use crate::PROTOCOL_VERSION;

/// The current time, as the caller read it: a monotonic instant for deadlines and the wall
/// clock (ms since the Unix epoch) for timestamps on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for deadlines.
    pub instant: Instant,
    /// Wall-clock time, ms since the Unix epoch.
    pub unix_ms: i64,
}

impl Now {
    /// This time advanced by `d`.
    pub fn after(self, d: Duration) -> Now {
        Now {
            instant: self.instant + d,
            unix_ms: self
                .unix_ms
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

/// The peer broke the session protocol. The connection must be closed with
/// [`CloseCode::ProtocolError`]; retrying the same behaviour cannot help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A frame that is not allowed in the current state or direction.
    #[error("unexpected {frame:?} frame while {state}")]
    UnexpectedFrame {
        /// The frame received.
        frame: FrameType,
        /// What the session was doing.
        state: &'static str,
    },
    /// The agent's protocol version is not supported.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// A heartbeat's sequence number did not increase.
    #[error("heartbeat sequence went from {last} to {got}")]
    NonMonotonicHeartbeat {
        /// The previous sequence number.
        last: u64,
        /// The one received.
        got: u64,
    },
    /// Bytes on the stream could not be decoded.
    #[error("undecodable frame: {0}")]
    Decode(#[from] DecodeError),
}

impl ProtocolViolation {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolViolation::UnexpectedFrame { .. } => "unexpected_frame",
            ProtocolViolation::UnsupportedVersion(_) => "unsupported_version",
            ProtocolViolation::NonMonotonicHeartbeat { .. } => "heartbeat_sequence",
            ProtocolViolation::Decode(DecodeError::FrameTooLarge { .. }) => "frame_too_large",
            ProtocolViolation::Decode(DecodeError::UnknownFrameType(_)) => "unknown_frame_type",
            ProtocolViolation::Decode(_) => "malformed_frame",
        }
    }
}

/// Default heartbeat interval the broker announces: 25 s, what WireGuard recommends for
/// keeping NAT and firewall state alive ("a sensible interval that works with a wide
/// variety of firewalls") and under the 30 s after which RFC 9308 (§3.2) finds most
/// middleboxes drop a quiet UDP flow. An idle fleet's broker CPU is one exchange per
/// heartbeat (docs/PROTOCOL.md §5): at 15 s, 10,000 appliances cost 20,000 a half-minute.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(25);
/// Heartbeats that may be missed before the session is closed as idle.
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;
/// Time an agent has to send `Hello` after connecting: 10 s.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest heartbeat interval an agent accepts from a broker: 100 ms.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// Settings of the broker end.
#[derive(Clone, Debug)]
pub struct BrokerSessionConfig {
    /// Session id announced in `Welcome`.
    pub session_id: u64,
    /// Heartbeat interval announced in `Welcome`.
    pub heartbeat_interval: Duration,
    /// Heartbeats missed before [`CloseCode::IdleTimeout`].
    pub missed_heartbeats: u32,
    /// Deadline for `Hello` after the session stream opened.
    pub hello_timeout: Duration,
    /// Manual-renewal generation to announce.
    pub manual_renewal_generation: u64,
    /// The broker's maximum frame length, announced in `Welcome` to agents that announced
    /// [`crate::capability::MAX_FRAME_LEN`]. A `u32`, as on the wire (and so that the
    /// config stays as small as it was: the broker keeps one per idle session).
    pub max_frame_len: u32,
}

/// What the broker end observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerEvent {
    /// `Hello` accepted and `Welcome` queued.
    Established(Hello),
    /// A heartbeat arrived (and was acknowledged).
    Heartbeat(Heartbeat),
    /// A status report arrived.
    Status(Status),
    /// A manifest from the agent's backlog arrived (answer with
    /// [`BrokerSession::ack_manifest`] once it was passed on).
    ManifestBacklog(ManifestBacklog),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BrokerState {
    AwaitingHello,
    Established,
    Closed(CloseCode),
}

/// The broker end of a session stream.
#[derive(Debug)]
pub struct BrokerSession {
    config: BrokerSessionConfig,
    state: BrokerState,
    started: Instant,
    last_rx: Instant,
    last_seq: u64,
    /// Whether `Welcome` listed `manifest-backlog/1` (the agent may send backlog).
    backlog: bool,
    /// Whether the agent announced `sparse-heartbeat-acks/1` (and the interval allows it).
    sparse_acks: bool,
    /// Whether it also announced `quiet-heartbeats/1`: answers only with news.
    quiet: bool,
    /// Whether `Welcome` listed `sparse-heartbeats/1`: a heartbeat every
    /// [`capability::HEARTBEAT_ACK_EVERY`] intervals, news at once.
    sparse_heartbeats: bool,
    /// A `HeartbeatAck` is owed with the next heartbeat whatever its `seq` (the
    /// manual-renewal generation changed).
    ack_due: bool,
    /// The `seq` of the last heartbeat answered.
    acked_seq: u64,
    transmit: VecDeque<Frame>,
    events: VecDeque<BrokerEvent>,
}

impl BrokerSession {
    /// A session whose stream opened at `now`.
    pub fn new(config: BrokerSessionConfig, now: Now) -> Self {
        Self {
            config,
            state: BrokerState::AwaitingHello,
            started: now.instant,
            last_rx: now.instant,
            last_seq: 0,
            backlog: false,
            sparse_acks: false,
            quiet: false,
            sparse_heartbeats: false,
            ack_due: false,
            acked_seq: 0,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Whether `Hello` was accepted.
    pub fn is_established(&self) -> bool {
        self.state == BrokerState::Established
    }

    /// Process a frame from the agent.
    pub fn handle_frame(&mut self, frame: Frame, now: Now) -> Result<(), ProtocolViolation> {
        let state = match self.state {
            BrokerState::AwaitingHello => "awaiting hello",
            BrokerState::Established => "established",
            BrokerState::Closed(_) => "closed",
        };
        match (self.state, frame) {
            (BrokerState::AwaitingHello, Frame::Hello(hello)) => {
                if hello.protocol_version < 1 {
                    return Err(ProtocolViolation::UnsupportedVersion(
                        hello.protocol_version,
                    ));
                }
                // Only an agent that said it understands the trailing field gets it: a
                // version-1 agent without the capability refuses trailing bytes.
                // An agent that announced the backlog reads `max_frame_len` and then the
                // broker's own capabilities after it.
                self.backlog =
                    capability::announced(&hello.capabilities, capability::MANIFEST_BACKLOG);
                self.sparse_acks =
                    capability::announced(&hello.capabilities, capability::SPARSE_HEARTBEAT_ACKS)
                        && self.config.heartbeat_interval >= capability::SPARSE_ACKS_MIN_INTERVAL;
                self.quiet = self.sparse_acks
                    && capability::announced(&hello.capabilities, capability::QUIET_HEARTBEATS);
                // The agent reads the list after `max_frame_len` when it announced either.
                let sparse_heartbeats =
                    capability::announced(&hello.capabilities, capability::SPARSE_HEARTBEATS);
                self.sparse_heartbeats = sparse_heartbeats
                    && self.quiet
                    && self.config.heartbeat_interval >= capability::SPARSE_HEARTBEATS_KEEP_ALIVE;
                let max_frame_len = (self.backlog
                    || sparse_heartbeats
                    || capability::announced(&hello.capabilities, capability::MAX_FRAME_LEN))
                .then_some(self.config.max_frame_len.max(MIN_MAX_FRAME_LEN as u32));
                let capabilities = [
                    (self.backlog, capability::MANIFEST_BACKLOG),
                    (self.sparse_heartbeats, capability::SPARSE_HEARTBEATS),
                ]
                .into_iter()
                .filter(|(taken, _)| *taken)
                .map(|(_, c)| c.to_owned())
                .collect();
                self.transmit.push_back(Frame::Welcome(Welcome {
                    protocol_version: hello.protocol_version.min(PROTOCOL_VERSION),
                    session_id: self.config.session_id,
                    heartbeat_interval_ms: duration_ms(self.config.heartbeat_interval),
                    server_time_ms: now.unix_ms,
                    manual_renewal_generation: self.config.manual_renewal_generation,
                    max_frame_len,
                    capabilities,
                }));
                self.state = BrokerState::Established;
                self.last_rx = now.instant;
                self.events.push_back(BrokerEvent::Established(hello));
                Ok(())
            }
            (BrokerState::Established, Frame::Heartbeat(hb)) => {
                if hb.seq <= self.last_seq {
                    return Err(ProtocolViolation::NonMonotonicHeartbeat {
                        last: self.last_seq,
                        got: hb.seq,
                    });
                }
                self.last_seq = hb.seq;
                self.last_rx = now.instant;
                if !self.sparse_acks
                    || self.ack_due
                    || (!self.quiet && hb.seq >= self.acked_seq + capability::HEARTBEAT_ACK_EVERY)
                {
                    self.ack_due = false;
                    self.acked_seq = hb.seq;
                    self.transmit.push_back(Frame::HeartbeatAck(HeartbeatAck {
                        seq: hb.seq,
                        server_time_ms: now.unix_ms,
                        manual_renewal_generation: self.config.manual_renewal_generation,
                    }));
                }
                self.events.push_back(BrokerEvent::Heartbeat(hb));
                Ok(())
            }
            (BrokerState::Established, Frame::Status(status)) => {
                self.last_rx = now.instant;
                self.events.push_back(BrokerEvent::Status(status));
                Ok(())
            }
            (BrokerState::Established, Frame::ManifestBacklog(m)) if self.backlog => {
                self.last_rx = now.instant;
                self.events.push_back(BrokerEvent::ManifestBacklog(m));
                Ok(())
            }
            (_, frame) => Err(ProtocolViolation::UnexpectedFrame {
                frame: frame.frame_type(),
                state,
            }),
        }
    }

    /// When [`BrokerSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            BrokerState::AwaitingHello => Some(self.started + self.config.hello_timeout),
            BrokerState::Established => {
                let intervals = if self.sparse_heartbeats {
                    let every = u32::try_from(capability::HEARTBEAT_ACK_EVERY).unwrap_or(u32::MAX);
                    self.config.missed_heartbeats.saturating_mul(every)
                } else {
                    self.config.missed_heartbeats
                };
                Some(self.last_rx + self.config.heartbeat_interval * intervals)
            }
            BrokerState::Closed(_) => None,
        }
    }

    /// Advance time. Returns the close code if the session must end now.
    #[must_use = "a returned close code means the connection must be closed"]
    pub fn handle_timeout(&mut self, now: Now) -> Option<CloseCode> {
        let deadline = self.poll_timeout()?;
        if now.instant < deadline {
            return None;
        }
        let code = match self.state {
            BrokerState::AwaitingHello => CloseCode::ProtocolError,
            _ => CloseCode::IdleTimeout,
        };
        self.state = BrokerState::Closed(code);
        Some(code)
    }

    /// Queue a `GoAway`.
    pub fn go_away(&mut self, reason: GoAwayReason, reconnect_after: Duration, message: &str) {
        self.transmit.push_back(Frame::GoAway(GoAway {
            reason,
            reconnect_after_ms: duration_ms(reconnect_after),
            message: message.chars().take(256).collect(),
        }));
    }

    /// Acknowledge the backlog manifest `seq` (it was passed on).
    pub fn ack_manifest(&mut self, seq: u64) {
        self.transmit
            .push_back(Frame::ManifestAck(ManifestAck { seq }));
    }

    /// Announce `generation` in the next `HeartbeatAck` (answering the next heartbeat even
    /// where answers are sparse), or at once in an unsolicited one to an agent whose
    /// heartbeats are sparse (the next may be four intervals away).
    pub fn set_manual_renewal_generation(&mut self, generation: u64, now: Now) {
        let news = generation != self.config.manual_renewal_generation;
        self.config.manual_renewal_generation = generation;
        if !news {
            return;
        }
        if self.sparse_heartbeats && self.state == BrokerState::Established {
            self.transmit.push_back(Frame::HeartbeatAck(HeartbeatAck {
                seq: self.last_seq,
                server_time_ms: now.unix_ms,
                manual_renewal_generation: generation,
            }));
        } else {
            self.ack_due = true;
        }
    }

    /// The next frame to write on the session stream.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        pop_or_release(&mut self.transmit)
    }

    /// The next thing that happened.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<BrokerEvent> {
        pop_or_release(&mut self.events)
    }
}

/// Settings of the agent end.
#[derive(Clone, Debug)]
pub struct AgentSessionConfig {
    /// Reported in `Hello`.
    pub agent_version: String,
    /// Reported in `Hello`.
    pub capabilities: Vec<String>,
    /// `notAfter` of the certificate in use, ms since the epoch.
    pub cert_not_after_ms: i64,
    /// Trust state reported in heartbeats.
    pub trust_state: TrustState,
    /// Deadline for `Welcome` after `Hello` was queued.
    pub welcome_timeout: Duration,
    /// Heartbeat answers that may be missed before the broker is presumed gone.
    pub missed_heartbeats: u32,
    /// Highest manual-renewal generation already acted upon.
    pub manual_renewal_generation: u64,
}

/// What the agent end observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// The broker accepted the session.
    Welcome(Welcome),
    /// A heartbeat was acknowledged.
    HeartbeatAck(HeartbeatAck),
    /// The broker announced a manual-renewal generation above the one acted upon.
    RenewalRequested {
        /// The new generation.
        generation: u64,
    },
    /// The broker asks the agent to leave.
    GoAway(GoAway),
    /// The broker passed on the backlog manifest with this `seq`.
    ManifestAck(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentState {
    AwaitingWelcome,
    Established,
    Closed(CloseCode),
}

/// The agent end of a session stream. Queues `Hello` on creation.
#[derive(Debug)]
pub struct AgentSession {
    config: AgentSessionConfig,
    state: AgentState,
    started: Instant,
    last_rx: Instant,
    interval: Duration,
    peer_max_frame_len: usize,
    /// Whether the broker's `Welcome` listed `manifest-backlog/1`.
    backlog: bool,
    /// Heartbeat intervals without any frame from the broker before it is presumed gone:
    /// `missed_heartbeats`, times [`capability::HEARTBEAT_ACK_EVERY`] when this agent
    /// announced `sparse-heartbeat-acks/1` and the interval is at least
    /// [`capability::SPARSE_ACKS_MIN_INTERVAL`]; none (its transport judges) when it also
    /// announced `quiet-heartbeats/1`.
    silent_intervals: Option<u32>,
    next_heartbeat: Option<Instant>,
    /// Whether the broker's `Welcome` took `sparse-heartbeats/1`: a heartbeat is sent only
    /// every [`capability::HEARTBEAT_ACK_EVERY`]-th interval, or after what it reports
    /// changed.
    sparse: bool,
    /// Intervals since the last heartbeat sent.
    skipped: u64,
    /// What the last heartbeat sent reported (`None`: none sent yet).
    reported: Option<(i64, TrustState)>,
    seq: u64,
    transmit: VecDeque<Frame>,
    events: VecDeque<AgentEvent>,
}

impl AgentSession {
    /// A session whose stream opened at `now`; `Hello` is queued.
    pub fn new(config: AgentSessionConfig, now: Now) -> Self {
        let silent_intervals = Some(config.missed_heartbeats);
        let mut transmit = VecDeque::new();
        transmit.push_back(Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: config.agent_version.clone(),
            capabilities: config.capabilities.clone(),
            cert_not_after_ms: config.cert_not_after_ms,
        }));
        Self {
            config,
            state: AgentState::AwaitingWelcome,
            started: now.instant,
            last_rx: now.instant,
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            peer_max_frame_len: DEFAULT_MAX_FRAME_LEN,
            backlog: false,
            silent_intervals,
            next_heartbeat: None,
            sparse: false,
            skipped: 0,
            reported: None,
            seq: 0,
            transmit,
            events: VecDeque::new(),
        }
    }

    /// Whether `Welcome` arrived.
    pub fn is_established(&self) -> bool {
        self.state == AgentState::Established
    }

    /// The heartbeat interval in force.
    pub fn heartbeat_interval(&self) -> Duration {
        self.interval
    }

    /// The largest frame the broker accepts (type byte plus body): what its `Welcome`
    /// announced, else [`DEFAULT_MAX_FRAME_LEN`] (also before `Welcome`). Every frame the
    /// agent sends, on any stream of this connection, must fit it.
    pub fn peer_max_frame_len(&self) -> usize {
        self.peer_max_frame_len
    }

    /// Process a frame from the broker.
    pub fn handle_frame(&mut self, frame: Frame, now: Now) -> Result<(), ProtocolViolation> {
        let state = match self.state {
            AgentState::AwaitingWelcome => "awaiting welcome",
            AgentState::Established => "established",
            AgentState::Closed(_) => "closed",
        };
        match (self.state, frame) {
            (AgentState::AwaitingWelcome, Frame::Welcome(w)) => {
                if w.protocol_version < 1 || w.protocol_version > PROTOCOL_VERSION {
                    return Err(ProtocolViolation::UnsupportedVersion(w.protocol_version));
                }
                self.interval = Duration::from_millis(u64::from(w.heartbeat_interval_ms))
                    .max(MIN_HEARTBEAT_INTERVAL);
                if capability::announced(
                    &self.config.capabilities,
                    capability::SPARSE_HEARTBEAT_ACKS,
                ) && self.interval >= capability::SPARSE_ACKS_MIN_INTERVAL
                {
                    let every = u32::try_from(capability::HEARTBEAT_ACK_EVERY).unwrap_or(u32::MAX);
                    self.silent_intervals = if capability::announced(
                        &self.config.capabilities,
                        capability::QUIET_HEARTBEATS,
                    ) {
                        None
                    } else {
                        Some(self.config.missed_heartbeats.saturating_mul(every))
                    };
                }
                self.peer_max_frame_len = w.peer_max_frame_len();
                self.backlog = capability::announced(&w.capabilities, capability::MANIFEST_BACKLOG);
                // Only on the broker's word: one that does not know sparse heartbeats
                // closes a session after `missed_heartbeats` intervals without one.
                self.sparse = self.silent_intervals.is_none()
                    && capability::announced(
                        &self.config.capabilities,
                        capability::SPARSE_HEARTBEATS,
                    )
                    && capability::announced(&w.capabilities, capability::SPARSE_HEARTBEATS)
                    && self.interval >= capability::SPARSE_HEARTBEATS_KEEP_ALIVE;
                self.state = AgentState::Established;
                self.last_rx = now.instant;
                // The first heartbeat a twenty-fifth of an interval early: the transport's
                // keep-alive timer (QUIC's, as long as the interval) restarted on the packet
                // that carried `Welcome`, a moment before this; the heartbeat, not a PING,
                // should be the first interval's packet. Each later heartbeat (or PING)
                // restarts that timer again after a full interval.
                self.next_heartbeat = Some(now.instant + self.interval - self.interval / 25);
                self.note_generation(w.manual_renewal_generation);
                self.events.push_back(AgentEvent::Welcome(w));
                Ok(())
            }
            (AgentState::Established, Frame::HeartbeatAck(ack)) => {
                self.last_rx = now.instant;
                self.note_generation(ack.manual_renewal_generation);
                self.events.push_back(AgentEvent::HeartbeatAck(ack));
                Ok(())
            }
            (AgentState::Established, Frame::ManifestAck(ack)) if self.backlog => {
                self.last_rx = now.instant;
                self.events.push_back(AgentEvent::ManifestAck(ack.seq));
                Ok(())
            }
            (AgentState::AwaitingWelcome | AgentState::Established, Frame::GoAway(g)) => {
                self.last_rx = now.instant;
                self.events.push_back(AgentEvent::GoAway(g));
                Ok(())
            }
            (_, frame) => Err(ProtocolViolation::UnexpectedFrame {
                frame: frame.frame_type(),
                state,
            }),
        }
    }

    fn note_generation(&mut self, generation: u64) {
        if generation > self.config.manual_renewal_generation {
            self.config.manual_renewal_generation = generation;
            self.events
                .push_back(AgentEvent::RenewalRequested { generation });
        }
    }

    /// When the broker is presumed gone if nothing came from it by then.
    fn silent_deadline(&self) -> Option<Instant> {
        self.silent_intervals
            .map(|n| self.last_rx + self.interval * n)
    }

    /// Update what heartbeats report (after a renewal, or as expiry approaches).
    pub fn set_certificate(&mut self, cert_not_after_ms: i64, trust_state: TrustState) {
        self.config.cert_not_after_ms = cert_not_after_ms;
        self.config.trust_state = trust_state;
    }

    /// When [`AgentSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            AgentState::AwaitingWelcome => Some(self.started + self.config.welcome_timeout),
            AgentState::Established => match (self.silent_deadline(), self.next_heartbeat) {
                (Some(silent), Some(hb)) => Some(hb.min(silent)),
                (silent, hb) => silent.or(hb),
            },
            AgentState::Closed(_) => None,
        }
    }

    /// Advance time: queue due heartbeats. Returns a close code if the broker has gone
    /// silent (or never welcomed us) and the connection must be abandoned.
    #[must_use = "a returned close code means the connection must be closed"]
    pub fn handle_timeout(&mut self, now: Now) -> Option<CloseCode> {
        match self.state {
            AgentState::AwaitingWelcome => {
                if now.instant >= self.started + self.config.welcome_timeout {
                    self.state = AgentState::Closed(CloseCode::IdleTimeout);
                    return Some(CloseCode::IdleTimeout);
                }
            }
            AgentState::Established => {
                if self.silent_deadline().is_some_and(|t| now.instant >= t) {
                    self.state = AgentState::Closed(CloseCode::IdleTimeout);
                    return Some(CloseCode::IdleTimeout);
                }
                if let Some(due) = self.next_heartbeat {
                    if now.instant >= due {
                        self.heartbeat_due();
                        // Skip missed slots rather than bursting after a stall.
                        let mut next = due + self.interval;
                        while next <= now.instant {
                            next += self.interval;
                        }
                        self.next_heartbeat = Some(next);
                    }
                }
            }
            AgentState::Closed(_) => {}
        }
        None
    }

    /// A heartbeat interval passed: queue a heartbeat, unless heartbeats are sparse, this
    /// is not every [`capability::HEARTBEAT_ACK_EVERY`]-th interval and there is no news.
    fn heartbeat_due(&mut self) {
        let report = (self.config.cert_not_after_ms, self.config.trust_state);
        self.skipped += 1;
        if self.sparse
            && self.reported == Some(report)
            && self.skipped < capability::HEARTBEAT_ACK_EVERY
        {
            return;
        }
        self.skipped = 0;
        self.reported = Some(report);
        self.seq += 1;
        self.transmit.push_back(Frame::Heartbeat(Heartbeat {
            seq: self.seq,
            trust_state: report.1,
            cert_not_after_ms: report.0,
        }));
    }

    /// Queue a status report.
    pub fn send_status(&mut self, status: Status) {
        self.transmit.push_back(Frame::Status(status));
    }

    /// Whether the broker takes [`ManifestBacklog`] frames (its `Welcome` said so).
    pub fn accepts_backlog(&self) -> bool {
        self.state == AgentState::Established && self.backlog
    }

    /// Queue a manifest from the backlog; only when [`AgentSession::accepts_backlog`].
    pub fn send_backlog(&mut self, manifest: ManifestBacklog) {
        debug_assert!(self.accepts_backlog());
        self.transmit.push_back(Frame::ManifestBacklog(manifest));
    }

    /// The next frame to write on the session stream.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        pop_or_release(&mut self.transmit)
    }

    /// The next thing that happened.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        pop_or_release(&mut self.events)
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The queue's next item; once it is empty, its buffer goes back to the allocator. A
/// session's queues are empty between heartbeats, and a broker holds 100,000 sessions:
/// keeping the few slots they grew to (a `Frame` is large) cost 1.1 KB a session
/// (heaptrack), against one allocation per heartbeat to give it back.
fn pop_or_release<T>(queue: &mut VecDeque<T>) -> Option<T> {
    let next = queue.pop_front();
    if next.is_none() && queue.capacity() != 0 {
        *queue = VecDeque::new();
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now0() -> Now {
        Now {
            instant: Instant::now(),
            unix_ms: 1_800_000_000_000,
        }
    }

    fn pair(now: Now) -> (AgentSession, BrokerSession) {
        pair_with(now, vec![])
    }

    fn pair_with(now: Now, capabilities: Vec<String>) -> (AgentSession, BrokerSession) {
        pair_every(now, capabilities, Duration::from_secs(1))
    }

    fn pair_every(
        now: Now,
        capabilities: Vec<String>,
        interval: Duration,
    ) -> (AgentSession, BrokerSession) {
        let agent = AgentSession::new(
            AgentSessionConfig {
                agent_version: "test".into(),
                capabilities,
                cert_not_after_ms: 1,
                trust_state: TrustState::Trusted,
                welcome_timeout: Duration::from_secs(5),
                missed_heartbeats: 3,
                manual_renewal_generation: 0,
            },
            now,
        );
        let broker = BrokerSession::new(
            BrokerSessionConfig {
                session_id: 9,
                heartbeat_interval: interval,
                missed_heartbeats: 3,
                hello_timeout: Duration::from_secs(5),
                manual_renewal_generation: 0,
                max_frame_len: 4096,
            },
            now,
        );
        (agent, broker)
    }

    /// Move every queued frame across, both ways, until quiet.
    fn pump(a: &mut AgentSession, b: &mut BrokerSession, now: Now) {
        loop {
            let mut moved = false;
            while let Some(f) = a.poll_transmit() {
                b.handle_frame(f, now).unwrap();
                moved = true;
            }
            while let Some(f) = b.poll_transmit() {
                a.handle_frame(f, now).unwrap();
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    #[test]
    fn hello_welcome_heartbeat_on_a_virtual_clock() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        assert!(a.is_established() && b.is_established());
        assert!(matches!(b.poll_event(), Some(BrokerEvent::Established(_))));
        assert!(matches!(a.poll_event(), Some(AgentEvent::Welcome(w)) if w.session_id == 9));

        for i in 1..=5u64 {
            let t = t0.after(Duration::from_secs(i));
            assert_eq!(a.handle_timeout(t), None);
            assert_eq!(b.handle_timeout(t), None);
            pump(&mut a, &mut b, t);
            assert!(
                matches!(b.poll_event(), Some(BrokerEvent::Heartbeat(h)) if h.seq == i),
                "heartbeat {i}"
            );
        }
    }

    #[test]
    fn broker_closes_after_three_missed_heartbeats() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        assert_eq!(
            b.handle_timeout(t0.after(Duration::from_millis(2999))),
            None
        );
        assert_eq!(
            b.handle_timeout(t0.after(Duration::from_secs(3))),
            Some(CloseCode::IdleTimeout)
        );
    }

    #[test]
    fn hello_twice_is_a_violation() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        let hello = Frame::Hello(Hello {
            protocol_version: 1,
            agent_version: String::new(),
            capabilities: vec![],
            cert_not_after_ms: 0,
        });
        assert_eq!(
            b.handle_frame(hello, t0),
            Err(ProtocolViolation::UnexpectedFrame {
                frame: FrameType::Hello,
                state: "established"
            })
        );
    }

    #[test]
    fn replayed_heartbeat_sequence_is_a_violation() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        let hb = Frame::Heartbeat(Heartbeat {
            seq: 1,
            trust_state: TrustState::Trusted,
            cert_not_after_ms: 0,
        });
        b.handle_frame(hb.clone(), t0).unwrap();
        assert_eq!(
            b.handle_frame(hb, t0),
            Err(ProtocolViolation::NonMonotonicHeartbeat { last: 1, got: 1 })
        );
    }

    #[test]
    fn renewal_generation_reaches_the_agent_once() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        b.set_manual_renewal_generation(4, t0);
        let t1 = t0.after(Duration::from_secs(1));
        assert_eq!(a.handle_timeout(t1), None);
        pump(&mut a, &mut b, t1);
        let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events.contains(&AgentEvent::RenewalRequested { generation: 4 }));
        let t2 = t0.after(Duration::from_secs(2));
        assert_eq!(a.handle_timeout(t2), None);
        pump(&mut a, &mut b, t2);
        let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(!events
            .iter()
            .any(|e| matches!(e, AgentEvent::RenewalRequested { .. })));
    }

    /// A pair whose agent announced sparse answers, at a 15 s interval (where they apply).
    fn sparse_pair(now: Now) -> (AgentSession, BrokerSession) {
        pair_every(
            now,
            vec![capability::SPARSE_HEARTBEAT_ACKS.to_owned()],
            Duration::from_secs(15),
        )
    }

    /// A pair whose agent announced sparse and quiet answers, at a 15 s interval.
    fn quiet_pair(now: Now) -> (AgentSession, BrokerSession) {
        pair_every(
            now,
            vec![
                capability::SPARSE_HEARTBEAT_ACKS.to_owned(),
                capability::QUIET_HEARTBEATS.to_owned(),
            ],
            Duration::from_secs(15),
        )
    }

    /// Run `n` intervals of `every` seconds from `t0` (both ends' timers, frames pumped);
    /// what the agent and the broker observed in each, by interval (from 1).
    fn run_intervals(
        a: &mut AgentSession,
        b: &mut BrokerSession,
        t0: Now,
        n: u64,
        every: u64,
    ) -> Vec<(u64, Vec<AgentEvent>, Vec<BrokerEvent>)> {
        (1..=n)
            .map(|i| {
                let t = t0.after(Duration::from_secs(i * every));
                assert_eq!(a.handle_timeout(t), None, "interval {i}");
                assert_eq!(b.handle_timeout(t), None, "interval {i}");
                pump(a, b, t);
                let agent = std::iter::from_fn(|| a.poll_event()).collect();
                (i, agent, std::iter::from_fn(|| b.poll_event()).collect())
            })
            .collect()
    }

    /// Heartbeats answered, as the agent saw them, over `n` heartbeat intervals (each of
    /// which sends one).
    fn acks_over(
        a: &mut AgentSession,
        b: &mut BrokerSession,
        t0: Now,
        n: u64,
        every: u64,
    ) -> Vec<u64> {
        let mut acked = Vec::new();
        for (i, agent, broker) in run_intervals(a, b, t0, n, every) {
            assert!(matches!(broker.first(), Some(BrokerEvent::Heartbeat(h)) if h.seq == i));
            acked.extend(agent.into_iter().filter_map(|e| match e {
                AgentEvent::HeartbeatAck(ack) => Some(ack.seq),
                _ => None,
            }));
        }
        acked
    }

    #[test]
    fn sparse_acks_answer_every_fourth_heartbeat_and_every_generation_change() {
        let t0 = now0();
        let (mut a, mut b) = sparse_pair(t0);
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        let _ = b.poll_event();
        // Twelve intervals: the agent, which waits 3 × 4 intervals for a word, never
        // gives up, and only every fourth heartbeat is answered.
        assert_eq!(acks_over(&mut a, &mut b, t0, 12, 15), vec![4, 8, 12]);
        // A generation change is answered at once, whatever the count.
        news_answered_once(&mut a, &mut b, t0, 13, 15);
    }

    /// Change the manual-renewal generation; heartbeat `seq` (sent `seq` intervals of
    /// `every` seconds after `t0`) is answered with it, and heartbeat `seq + 1`, after the
    /// same generation was set again, is not: that is no news.
    fn news_answered_once(
        a: &mut AgentSession,
        b: &mut BrokerSession,
        t0: Now,
        seq: u64,
        every: u64,
    ) {
        b.set_manual_renewal_generation(2, t0);
        let t = t0.after(Duration::from_secs(seq * every));
        assert_eq!(a.handle_timeout(t), None);
        pump(a, b, t);
        let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events.contains(&AgentEvent::RenewalRequested { generation: 2 }));
        assert!(events
            .iter()
            .any(|e| matches!(e, AgentEvent::HeartbeatAck(ack) if ack.seq == seq)));
        b.set_manual_renewal_generation(2, t0);
        let t = t0.after(Duration::from_secs((seq + 1) * every));
        assert_eq!(a.handle_timeout(t), None);
        pump(a, b, t);
        assert!(!std::iter::from_fn(|| a.poll_event())
            .any(|e| matches!(e, AgentEvent::HeartbeatAck(_))));
    }

    #[test]
    fn without_the_capability_every_heartbeat_is_answered() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        let _ = b.poll_event();
        assert_eq!(acks_over(&mut a, &mut b, t0, 5, 1), vec![1, 2, 3, 4, 5]);
    }

    /// Below 10 s intervals (fast failure detection) every heartbeat is answered and the
    /// agent keeps its 3-interval patience, capability or not.
    #[test]
    fn short_intervals_keep_an_answer_to_every_heartbeat() {
        let t0 = now0();
        let (mut a, mut b) = pair_with(t0, vec![capability::SPARSE_HEARTBEAT_ACKS.to_owned()]);
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        let _ = b.poll_event();
        assert_eq!(acks_over(&mut a, &mut b, t0, 5, 1), vec![1, 2, 3, 4, 5]);
        let (mut a, mut b) = pair_with(t0, vec![capability::SPARSE_HEARTBEAT_ACKS.to_owned()]);
        pump(&mut a, &mut b, t0);
        assert_eq!(
            a.handle_timeout(t0.after(Duration::from_secs(3))),
            Some(CloseCode::IdleTimeout)
        );
    }

    #[test]
    fn a_sparse_agent_still_gives_up_on_a_silent_broker() {
        let t0 = now0();
        let (mut a, mut b) = sparse_pair(t0);
        pump(&mut a, &mut b, t0);
        // Nothing comes back: given up after 3 × 4 intervals of silence, not before.
        for i in 1..12 {
            assert_eq!(
                a.handle_timeout(t0.after(Duration::from_secs(i * 15))),
                None
            );
        }
        assert_eq!(
            a.handle_timeout(t0.after(Duration::from_secs(180))),
            Some(CloseCode::IdleTimeout)
        );
    }

    #[test]
    fn quiet_heartbeats_are_answered_only_with_news() {
        let t0 = now0();
        let (mut a, mut b) = quiet_pair(t0);
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        let _ = b.poll_event();
        // Twenty intervals without an answer: the agent does not give up (its transport
        // judges a silent broker), and the broker still takes every heartbeat.
        assert_eq!(acks_over(&mut a, &mut b, t0, 20, 15), Vec::<u64>::new());
        // A generation change is news: the next heartbeat is answered, and only that one.
        news_answered_once(&mut a, &mut b, t0, 21, 15);
    }

    #[test]
    fn a_quiet_agent_leaves_a_silent_broker_to_its_transport() {
        let t0 = now0();
        let (mut a, mut b) = quiet_pair(t0);
        pump(&mut a, &mut b, t0);
        // A day of silence: heartbeats keep going out, the session is not given up.
        let mut t = t0;
        for _ in 0..(24 * 60 * 4) {
            t = t.after(Duration::from_secs(15));
            assert_eq!(a.handle_timeout(t), None);
            while a.poll_transmit().is_some() {}
        }
        assert!(
            a.poll_timeout().is_some(),
            "the next heartbeat is still due"
        );
    }

    /// Quiet answers need sparse ones and an interval where those apply; otherwise
    /// nothing changes.
    #[test]
    fn quiet_alone_or_at_short_intervals_changes_nothing() {
        let t0 = now0();
        let quiet = vec![capability::QUIET_HEARTBEATS.to_owned()];
        let (mut a, mut b) = pair_every(t0, quiet, Duration::from_secs(15));
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        let _ = b.poll_event();
        assert_eq!(acks_over(&mut a, &mut b, t0, 3, 15), vec![1, 2, 3]);
        let both = vec![
            capability::SPARSE_HEARTBEAT_ACKS.to_owned(),
            capability::QUIET_HEARTBEATS.to_owned(),
        ];
        let (mut a, mut b) = pair_every(t0, both, Duration::from_secs(10));
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        let _ = b.poll_event();
        assert_eq!(acks_over(&mut a, &mut b, t0, 3, 10), vec![1, 2, 3]);
        assert_eq!(
            a.handle_timeout(t0.after(Duration::from_secs(60))),
            Some(CloseCode::IdleTimeout)
        );
    }

    /// What the reference agent announces over QUIC.
    fn sparse_heartbeat_capabilities() -> Vec<String> {
        [
            capability::MAX_FRAME_LEN,
            capability::SPARSE_HEARTBEAT_ACKS,
            capability::QUIET_HEARTBEATS,
            capability::SPARSE_HEARTBEATS,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The intervals (from 1) in which the broker received a heartbeat, over `n`.
    fn heartbeats_over(
        a: &mut AgentSession,
        b: &mut BrokerSession,
        t0: Now,
        n: u64,
        every: u64,
    ) -> Vec<u64> {
        run_intervals(a, b, t0, n, every)
            .into_iter()
            .filter(|(_, _, broker)| {
                broker
                    .iter()
                    .any(|e| matches!(e, BrokerEvent::Heartbeat(_)))
            })
            .map(|(i, ..)| i)
            .collect()
    }

    #[test]
    fn sparse_heartbeats_go_every_fourth_interval_and_with_news() {
        let t0 = now0();
        let (mut a, mut b) =
            pair_every(t0, sparse_heartbeat_capabilities(), Duration::from_secs(25));
        let w = welcome_of(&mut b, &mut a, t0);
        assert_eq!(w.capabilities, [capability::SPARSE_HEARTBEATS]);
        assert!(
            w.max_frame_len.is_some(),
            "the list needs the field before it"
        );
        let _ = a.poll_event();
        let _ = b.poll_event();
        // The first interval reports the trust state; then one in four. Neither end gives
        // up in between: the broker waits 3 × 4 intervals for a heartbeat.
        assert_eq!(heartbeats_over(&mut a, &mut b, t0, 12, 25), vec![1, 5, 9]);
        // News (a renewed certificate) goes out at the next interval, not the fourth.
        a.set_certificate(2, TrustState::Trusted);
        let t12 = t0.after(Duration::from_secs(12 * 25));
        let t13 = t12.after(Duration::from_secs(25));
        assert_eq!(heartbeats_over(&mut a, &mut b, t12, 1, 25), vec![1]);
        // The same report again is no news.
        a.set_certificate(2, TrustState::Trusted);
        assert_eq!(
            heartbeats_over(&mut a, &mut b, t13, 3, 25),
            Vec::<u64>::new()
        );
        assert_eq!(
            heartbeats_over(&mut a, &mut b, t13.after(Duration::from_secs(75)), 1, 25),
            vec![1]
        );
    }

    #[test]
    fn a_broker_waits_twelve_intervals_for_a_sparse_heartbeat_and_no_longer() {
        let t0 = now0();
        let (mut a, mut b) =
            pair_every(t0, sparse_heartbeat_capabilities(), Duration::from_secs(25));
        pump(&mut a, &mut b, t0);
        // The agent falls silent (its transport would still send keep-alives): the broker
        // waits out 3 × 4 intervals, then closes the session as idle.
        assert_eq!(
            b.handle_timeout(t0.after(Duration::from_secs(12 * 25 - 1))),
            None
        );
        assert_eq!(
            b.handle_timeout(t0.after(Duration::from_secs(12 * 25))),
            Some(CloseCode::IdleTimeout)
        );
        // Without sparse heartbeats, three intervals are all it waits.
        let (mut a, mut b) = quiet_pair(t0);
        pump(&mut a, &mut b, t0);
        assert_eq!(
            b.handle_timeout(t0.after(Duration::from_secs(3 * 15))),
            Some(CloseCode::IdleTimeout)
        );
    }

    #[test]
    fn a_renewal_generation_reaches_a_sparse_agent_at_once() {
        let t0 = now0();
        let (mut a, mut b) =
            pair_every(t0, sparse_heartbeat_capabilities(), Duration::from_secs(25));
        pump(&mut a, &mut b, t0);
        let _ = a.poll_event();
        // Between heartbeats: an unsolicited answer carries it, not the next heartbeat's.
        let t = t0.after(Duration::from_secs(60));
        b.set_manual_renewal_generation(3, t);
        let Some(Frame::HeartbeatAck(ack)) = b.poll_transmit() else {
            panic!("no unsolicited answer")
        };
        assert_eq!(ack.manual_renewal_generation, 3);
        a.handle_frame(Frame::HeartbeatAck(ack), t).unwrap();
        let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events.contains(&AgentEvent::RenewalRequested { generation: 3 }));
        // The same generation again is no news: nothing is sent.
        b.set_manual_renewal_generation(3, t);
        assert!(b.poll_transmit().is_none());
    }

    /// Sparse heartbeats need quiet answers, an interval of at least the keep-alive
    /// promise and the broker's word; otherwise the agent heartbeats every interval.
    #[test]
    fn sparse_heartbeats_need_quiet_answers_a_long_interval_and_the_brokers_word() {
        let t0 = now0();
        let every_interval = |caps: Vec<String>, secs: u64, strip_list: bool| {
            let (mut a, mut b) = pair_every(t0, caps, Duration::from_secs(secs));
            let hello = a.poll_transmit().expect("hello queued");
            b.handle_frame(hello, t0).unwrap();
            let Some(Frame::Welcome(mut w)) = b.poll_transmit() else {
                panic!("no welcome")
            };
            let listed = capability::announced(&w.capabilities, capability::SPARSE_HEARTBEATS);
            if strip_list {
                // What a broker that does not know the capability sends.
                w.capabilities.clear();
            }
            a.handle_frame(Frame::Welcome(w), t0).unwrap();
            let _ = a.poll_event();
            let _ = b.poll_event();
            (listed, heartbeats_over(&mut a, &mut b, t0, 4, secs))
        };
        // Below the keep-alive promise (25 s) the broker does not take it.
        assert_eq!(
            every_interval(sparse_heartbeat_capabilities(), 15, false),
            (false, vec![1, 2, 3, 4])
        );
        // Without quiet answers it does not either.
        let no_quiet: Vec<String> = sparse_heartbeat_capabilities()
            .into_iter()
            .filter(|c| c != capability::QUIET_HEARTBEATS)
            .collect();
        assert_eq!(
            every_interval(no_quiet, 25, false),
            (false, vec![1, 2, 3, 4])
        );
        // A broker that did not list it gets a heartbeat every interval.
        assert_eq!(
            every_interval(sparse_heartbeat_capabilities(), 25, true),
            (true, vec![1, 2, 3, 4])
        );
        // The list survives the wire when it is all the broker lists.
        let (mut a, mut b) =
            pair_every(t0, sparse_heartbeat_capabilities(), Duration::from_secs(25));
        let w = welcome_of(&mut b, &mut a, t0);
        let mut wire = bytes::BytesMut::new();
        crate::encode_frame(&Frame::Welcome(w.clone()), &mut wire, 4096).unwrap();
        let mut decoder = crate::FrameDecoder::new(4096);
        decoder.push(&wire);
        assert_eq!(decoder.poll_frame().unwrap(), Some(Frame::Welcome(w)));
    }

    #[test]
    fn agent_gives_up_on_a_silent_broker() {
        let t0 = now0();
        let (mut a, mut b) = pair(t0);
        pump(&mut a, &mut b, t0);
        // Heartbeats go out but nothing comes back.
        for i in 1..3 {
            assert_eq!(a.handle_timeout(t0.after(Duration::from_secs(i))), None);
        }
        assert_eq!(
            a.handle_timeout(t0.after(Duration::from_secs(3))),
            Some(CloseCode::IdleTimeout)
        );
    }

    fn welcome_of(b: &mut BrokerSession, a: &mut AgentSession, t: Now) -> Welcome {
        let hello = a.poll_transmit().expect("hello queued");
        b.handle_frame(hello, t).unwrap();
        let Some(Frame::Welcome(w)) = b.poll_transmit() else {
            panic!("no welcome")
        };
        a.handle_frame(Frame::Welcome(w.clone()), t).unwrap();
        w
    }

    #[test]
    fn manifest_backlog_flows_only_when_both_ends_listed_it() {
        let t0 = now0();
        let m = ManifestBacklog {
            seq: 3,
            manifest: crate::CommandManifest {
                command_id: 7,
                manifest: bytes::Bytes::from_static(b"{}"),
                sig: bytes::Bytes::from_static(b"sig"),
            },
        };
        // Both: the broker lists it (after the frame limit), takes the frame and answers.
        let (mut a, mut b) = pair_with(t0, vec![capability::MANIFEST_BACKLOG.into()]);
        let w = welcome_of(&mut b, &mut a, t0);
        assert!(
            w.max_frame_len.is_some(),
            "the list needs the field before it"
        );
        assert_eq!(w.capabilities, [capability::MANIFEST_BACKLOG]);
        assert!(a.accepts_backlog());
        a.send_backlog(m.clone());
        b.handle_frame(a.poll_transmit().unwrap(), t0).unwrap();
        let _ = b.poll_event();
        assert_eq!(
            b.poll_event(),
            Some(BrokerEvent::ManifestBacklog(m.clone()))
        );
        b.ack_manifest(3);
        a.handle_frame(b.poll_transmit().unwrap(), t0).unwrap();
        let _ = a.poll_event();
        assert_eq!(a.poll_event(), Some(AgentEvent::ManifestAck(3)));

        // An agent that did not announce it gets no list, and its backlog frame is a
        // violation; so is an acknowledgement the agent never asked for.
        let (mut a, mut b) = pair_with(t0, vec![capability::MAX_FRAME_LEN.into()]);
        let w = welcome_of(&mut b, &mut a, t0);
        assert!(w.capabilities.is_empty());
        assert!(!a.accepts_backlog());
        assert!(b.handle_frame(Frame::ManifestBacklog(m), t0).is_err());
        assert!(a
            .handle_frame(Frame::ManifestAck(ManifestAck { seq: 3 }), t0)
            .is_err());
    }

    #[test]
    fn welcome_announces_the_frame_limit_only_to_agents_that_asked() {
        let t0 = now0();
        let (mut a, mut b) = pair_with(t0, vec![capability::MAX_FRAME_LEN.into()]);
        let w = welcome_of(&mut b, &mut a, t0);
        assert_eq!(w.max_frame_len, Some(4096));
        assert_eq!(a.peer_max_frame_len(), 4096);

        // An agent without the capability gets the version-1 Welcome it can decode (30
        // bytes of body, no trailing field) and assumes the protocol default.
        let (mut a, mut b) = pair_with(t0, vec![capability::EXEC.into()]);
        let w = welcome_of(&mut b, &mut a, t0);
        assert_eq!(w.max_frame_len, None);
        let mut wire = bytes::BytesMut::new();
        crate::encode_frame(&Frame::Welcome(w), &mut wire, DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(wire.len(), crate::FRAME_HEADER_LEN + 1 + 30);
        assert_eq!(a.peer_max_frame_len(), DEFAULT_MAX_FRAME_LEN);
    }

    #[test]
    fn output_chunked_by_the_announced_limit_reaches_the_broker_whole() {
        use crate::frame::{CommandOutput, OutputStream};
        use crate::FrameDecoder;
        let t0 = now0();
        let (mut a, mut b) = pair_with(t0, vec![capability::MAX_FRAME_LEN.into()]);
        let _ = welcome_of(&mut b, &mut a, t0);
        let limit = a.peer_max_frame_len();
        // 100 KiB of output, cut as an agent must: each chunk fills at most one frame.
        let output: Vec<u8> = (0..100 * 1024u32).map(|i| (i % 251) as u8).collect();
        let chunk = CommandOutput::max_data_len(limit);
        assert_eq!(chunk, 4096 - 14);
        let mut wire = bytes::BytesMut::new();
        for piece in output.chunks(chunk) {
            let frame = Frame::CommandOutput(CommandOutput {
                command_id: 1,
                stream: OutputStream::Stdout,
                data: bytes::Bytes::copy_from_slice(piece),
            });
            crate::encode_frame(&frame, &mut wire, limit).unwrap();
        }
        // The broker's decoder, at its own limit, takes every frame.
        let mut decoder = FrameDecoder::new(4096);
        let mut got = Vec::new();
        for piece in wire.chunks(1500) {
            decoder.push(piece);
            while let Some(f) = decoder.poll_frame().unwrap() {
                let Frame::CommandOutput(o) = f else {
                    panic!("not output")
                };
                got.extend_from_slice(&o.data);
            }
        }
        assert!(decoder.is_idle());
        assert_eq!(got, output);
        // One byte more than the chunk does not fit.
        let too_big = Frame::CommandOutput(CommandOutput {
            command_id: 1,
            stream: OutputStream::Stdout,
            data: vec![0; chunk + 1].into(),
        });
        assert!(crate::encode_frame(&too_big, &mut wire, limit).is_err());
    }
}
