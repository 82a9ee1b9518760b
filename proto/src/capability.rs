//! Capability strings an agent may announce in [`crate::Hello::capabilities`].
//!
//! A capability announces optional behaviour within protocol version 1. A broker ignores
//! capabilities it does not know; an agent announces each at most once. `docs/PROTOCOL.md`
//! (§4.1.1) lists them with their exact meaning.

/// The agent runs `CommandKind::Exec` requests. Every reference agent announces it; brokers
/// of version 1 do not require it (exec is part of the base protocol).
pub const EXEC: &str = "exec";

/// The agent runs `CommandKind::Shell` requests (`/bin/sh -c`). A broker MUST NOT send a
/// shell command to an agent that did not announce it; the reference broker refuses such a
/// request itself (`shell_not_allowed`) before opening a stream.
pub const SHELL: &str = "shell";

/// The agent understands the optional trailing `max_frame_len` field of
/// [`crate::Welcome`]. A broker appends the field only for agents that announce this: a
/// version-1 agent without it refuses trailing bytes in `Welcome` as a protocol error.
pub const MAX_FRAME_LEN: &str = "max_frame_len";

/// The agent decides commands under its customer's policy and signed approvals
/// (docs/PROTOCOL.md, signed operations): the broker appends the `SignedOps` extension
/// to every `CommandRequest` it sends such an agent, and relays `CommandManifest` and
/// `CommandPlan` frames and the signed-ops failure reasons (8 to 19). An agent announces
/// it only when it runs with a customer directory.
pub const SIGNED_OPS: &str = "signed-ops/1";

/// The agent keeps signed manifests whose delivery it could not confirm and re-sends them
/// on the session stream (`ManifestBacklog`, answered by `ManifestAck`) to a broker that
/// lists this in `Welcome.capabilities`. An agent announcing it also reads the trailing
/// `max_frame_len` of `Welcome`, after which the broker's list follows. The reference
/// agent announces it together with [`SIGNED_OPS`].
pub const MANIFEST_BACKLOG: &str = "manifest-backlog/1";

/// The agent opens customer-approved break-glass tunnels (docs/PROTOCOL.md §12): the
/// broker may open session-control streams (`TunnelOpen`) and connection streams
/// (`TunnelConnect`) to it. Announced with [`SIGNED_OPS`]: a tunnel never opens without
/// a customer's approval.
pub const TUNNEL: &str = "tunnel/1";

/// The agent needs a `HeartbeatAck` only for every [`HEARTBEAT_ACK_EVERY`]-th heartbeat
/// (and whenever the manual-renewal generation changed): its transport already tells it
/// the broker is there. The reference agent announces it over QUIC, where the transport
/// acknowledges every heartbeat and closes the connection after its idle timeout without
/// one, and over direct TCP (`TCP_USER_TIMEOUT` and keep-alive probes do the same); not
/// through an egress proxy, which acknowledges for a broker that may be gone. A broker
/// answering every heartbeat anyway (one that does not know this) is still correct.
///
/// An idle QUIC session then costs one packet each way per heartbeat interval (the
/// heartbeat and the transport's acknowledgement) instead of three: the answer and the
/// agent's acknowledgement of it were two thirds of a held fleet's broker CPU.
pub const SPARSE_HEARTBEAT_ACKS: &str = "sparse-heartbeat-acks/1";

/// With [`SPARSE_HEARTBEAT_ACKS`], the broker answers at least every this many
/// heartbeats; the agent presumes the broker gone after `missed_heartbeats` times this
/// many intervals without an answer (the transport notices sooner).
pub const HEARTBEAT_ACK_EVERY: u64 = 4;

/// Answers are sparse (or quiet) only when the heartbeat interval is at least this long
/// (14 s): then `missed_heartbeats` (3) intervals are no shorter than the transports' own
/// detection of a silent peer (the reference agent's 40 s QUIC idle timeout and
/// `TCP_USER_TIMEOUT`), so a dead broker is noticed no later than with an answer to every
/// heartbeat. With a shorter interval (chosen for fast failure detection), every heartbeat
/// is answered. Both ends apply the rule to `Welcome.heartbeat_interval_ms`.
pub const SPARSE_ACKS_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(14);

/// With [`SPARSE_HEARTBEAT_ACKS`] (announced together): the broker answers a heartbeat
/// only when it has news, the manual-renewal generation changed since its last answer,
/// and the agent never presumes the broker gone for want of answers: its transport is
/// the only judge of a silent broker (QUIC's idle timeout, `TCP_USER_TIMEOUT`), as it
/// already is sooner than `missed_heartbeats` × [`HEARTBEAT_ACK_EVERY`] intervals. The
/// reference agent announces it wherever it announces sparse answers.
///
/// An idle session then costs exactly one exchange per heartbeat interval, the heartbeat
/// and the transport's acknowledgement (QUIC's ACK, TCP's), no more than a bare QUIC
/// connection's keep-alive: the periodic answer and the agent's acknowledgement of it
/// were a fifth of a held fleet's broker CPU.
pub const QUIET_HEARTBEATS: &str = "quiet-heartbeats/1";

/// With [`QUIET_HEARTBEATS`] (announced together): the agent's transport sends a
/// keep-alive whenever it has received nothing for [`SPARSE_HEARTBEATS_KEEP_ALIVE`] (QUIC's
/// `PING`, which the broker's transport acknowledges without waking the session), so the
/// agent needs to send a `Heartbeat` only every [`HEARTBEAT_ACK_EVERY`]-th interval, or at
/// the next interval after what it reports (certificate expiry, trust state) changed.
///
/// A broker that takes it lists it in `Welcome.capabilities` (an agent announcing it reads
/// `max_frame_len` and the broker's list after it, as with [`MANIFEST_BACKLOG`]), only when
/// its heartbeat interval is at least [`SPARSE_HEARTBEATS_KEEP_ALIVE`], so the path and NAT
/// bindings see a packet at least as often as the interval asks. It then waits
/// `missed_heartbeats` × [`HEARTBEAT_ACK_EVERY`] intervals for a heartbeat (its transport's
/// idle timeout notices a silent agent sooner), and sends a renewal generation change at
/// once in an unsolicited `HeartbeatAck` instead of with the next answer. Without the
/// broker's word, the agent heartbeats every interval. The reference agent announces it
/// over QUIC only (a TCP keep-alive probe crosses no egress proxy).
///
/// An idle QUIC session then costs the broker what a bare QUIC connection kept alive at
/// the same interval costs, plus one heartbeat in four: each heartbeat wakes the session
/// and reports presence to control, which a keep-alive does not.
pub const SPARSE_HEARTBEATS: &str = "sparse-heartbeats/1";

/// The longest an agent announcing [`SPARSE_HEARTBEATS`] lets its transport go without
/// sending a keep-alive after the last packet it received: the default heartbeat interval
/// (25 s).
pub const SPARSE_HEARTBEATS_KEEP_ALIVE: std::time::Duration =
    crate::session::DEFAULT_HEARTBEAT_INTERVAL;

/// Every capability this crate defines, in the order the reference agent announces them.
pub const ALL: [&str; 9] = [
    EXEC,
    SHELL,
    MAX_FRAME_LEN,
    SIGNED_OPS,
    MANIFEST_BACKLOG,
    TUNNEL,
    SPARSE_HEARTBEAT_ACKS,
    QUIET_HEARTBEATS,
    SPARSE_HEARTBEATS,
];

/// Whether `capabilities` (from a `Hello`) holds `capability`.
pub fn announced(capabilities: &[String], capability: &str) -> bool {
    capabilities.iter().any(|c| c == capability)
}
