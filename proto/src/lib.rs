//! Tether's wire protocol, sans-IO and clock-free: frame types, the length-prefixed codec,
//! QUIC close codes and the session state machines. Nothing here touches a socket or reads
//! a clock; time comes in as an argument, so every test is deterministic.
//!
//! # Layout
//!
//! - [`frame`]: the frames that travel on the session stream and on command streams.
//! - [`codec`]: the [`Codec`] trait, the length-prefixed framing with its hard size limit,
//!   and the [`FrameDecoder`] that reassembles frames from stream chunks.
//! - [`capability`]: the capability strings of [`Hello`].
//! - [`close`]: the QUIC application close codes ([`CloseCode`]).
//! - [`failure`]: [`CommandFailure`], the one vocabulary of failed commands (and their
//!   `tether exec` exit codes), and the JSON names of the frame enums.
//! - [`cluster`]: the broker ↔ control channel (JSON frames over an upgraded mTLS
//!   connection) and the broker bundle.
//! - [`session`]: the session-stream state machines for both ends ([`BrokerSession`],
//!   [`AgentSession`]), fed by `handle_*` calls and drained by `poll_*` calls.
//!
//! # Streams
//!
//! One QUIC connection per appliance, ALPN [`ALPN`]. The agent opens exactly one
//! bidirectional *session stream* and sends [`Hello`]; the broker answers [`Welcome`] and
//! then heartbeats flow up and are acknowledged down. Each command travels on its own
//! bidirectional stream opened by the broker: one [`CommandRequest`], then zero or more
//! [`CommandOutput`] and exactly one [`CommandResult`] from the agent. `docs/PROTOCOL.md`
//! describes the byte layout for third-party agents.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod capability;
pub mod close;
pub mod cluster;
pub mod codec;
pub mod failure;
#[macro_use]
pub mod frame;
pub mod relay;
pub mod session;
pub mod tunnel;

pub use close::CloseCode;
pub use codec::{
    decode_frame, encode_frame, Codec, DecodeError, EncodeError, FrameDecoder,
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, MIN_MAX_FRAME_LEN,
};
pub use failure::CommandFailure;
pub use frame::{
    CommandKind, CommandManifest, CommandOutcome, CommandOutput, CommandPlan, CommandRequest,
    CommandResult, FailureReason, Frame, FrameType, GoAway, GoAwayReason, Heartbeat, HeartbeatAck,
    Hello, ManifestAck, ManifestBacklog, OutputStream, SignedOps, Status, TrustState, Welcome,
};
pub use session::{
    AgentEvent, AgentSession, AgentSessionConfig, BrokerEvent, BrokerSession, BrokerSessionConfig,
    Now, ProtocolViolation,
};
pub use tunnel::{
    TunnelClose, TunnelCloseReason, TunnelConnect, TunnelConnected, TunnelEnded, TunnelOpen,
    TunnelPlan, TunnelReady,
};

/// The protocol version carried in [`Hello`] and [`Welcome`].
pub const PROTOCOL_VERSION: u16 = 1;

/// How long past a command's `deadline_ms` the broker waits for the agent's
/// `CommandResult` before it fails the command as `timed_out` itself: 2 s. The agent kills
/// the process at the deadline and reports `Failed{timed_out}`; this is the time that report
/// has to arrive. Control, relaying for operators, derives its own wait from it.
pub const COMMAND_DEADLINE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The QUIC ALPN identifier of this protocol.
pub const ALPN: &[u8] = b"tether/1";
