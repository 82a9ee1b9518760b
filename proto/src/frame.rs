//! Frame types and their body encodings.
//!
//! Every multi-byte integer is big-endian. Strings are a `u16` byte length then UTF-8;
//! byte strings are a `u32` length then bytes; lists are a `u16` count then items.
//! Times are milliseconds since the Unix epoch (`i64`); durations are milliseconds (`u32`).

use bytes::{Buf, BufMut, Bytes};

use crate::tunnel::{
    TunnelClose, TunnelConnect, TunnelConnected, TunnelEnded, TunnelOpen, TunnelPlan, TunnelReady,
};

use crate::codec::{
    check_count, check_str, get, get_bytes, get_count, get_str, put_str, Codec, DecodeError,
    EncodeError, DEFAULT_MAX_FRAME_LEN, MIN_MAX_FRAME_LEN,
};

/// Longest agent version string, in bytes.
pub const MAX_AGENT_VERSION_LEN: usize = 64;
/// Most capabilities in a [`Hello`].
pub const MAX_CAPABILITIES: usize = 32;
/// Longest capability name, in bytes.
pub const MAX_CAPABILITY_LEN: usize = 64;
/// Most key/value pairs in a [`Status`].
pub const MAX_STATUS_ENTRIES: usize = 64;
/// Longest status key, in bytes.
pub const MAX_STATUS_KEY_LEN: usize = 128;
/// Longest status value, in bytes.
pub const MAX_STATUS_VALUE_LEN: usize = 1024;
/// Most arguments of a command (including the program).
pub const MAX_ARGV: usize = 256;
/// Longest single argument, in bytes.
pub const MAX_ARG_LEN: usize = 4096;
/// Most environment variable names in a command's allowlist.
pub const MAX_ENV: usize = 64;
/// Longest environment variable name, in bytes.
pub const MAX_ENV_NAME_LEN: usize = 256;
/// Longest human-readable message (GoAway, failure reasons), in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Bytes of a `CommandOutput` frame (as `len` counts them) besides its data: type (1),
/// command id (8), stream (1), data length (4). A chunk of `n` bytes makes `len = n + 14`.
pub const COMMAND_OUTPUT_OVERHEAD: usize = 1 + 8 + 1 + 4;
/// Bytes of a `Failed` `CommandResult` frame (as `len` counts them) besides its message:
/// type (1), command id (8), outcome (1), reason (1), message length (2).
pub const COMMAND_RESULT_FAILED_OVERHEAD: usize = 1 + 8 + 1 + 1 + 2;

/// The one-byte type that opens every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// [`Hello`]
    Hello = 0x01,
    /// [`Welcome`]
    Welcome = 0x02,
    /// [`Heartbeat`]
    Heartbeat = 0x03,
    /// [`HeartbeatAck`]
    HeartbeatAck = 0x04,
    /// [`Status`]
    Status = 0x05,
    /// [`GoAway`]
    GoAway = 0x06,
    /// [`CommandRequest`]
    CommandRequest = 0x10,
    /// [`CommandOutput`]
    CommandOutput = 0x11,
    /// [`CommandResult`]
    CommandResult = 0x12,
    /// [`CommandManifest`] (capability `signed-ops/1`)
    CommandManifest = 0x13,
    /// [`CommandPlan`] (capability `signed-ops/1`)
    CommandPlan = 0x14,
    /// [`ManifestBacklog`] (capability `manifest-backlog/1`, session stream)
    ManifestBacklog = 0x15,
    /// [`ManifestAck`] (capability `manifest-backlog/1`, session stream)
    ManifestAck = 0x16,
    /// [`TunnelOpen`] (capability `tunnel/1`)
    TunnelOpen = 0x20,
    /// [`TunnelReady`] (capability `tunnel/1`)
    TunnelReady = 0x21,
    /// [`TunnelPlan`] (capability `tunnel/1`)
    TunnelPlan = 0x22,
    /// [`TunnelEnded`] (capability `tunnel/1`)
    TunnelEnded = 0x23,
    /// [`TunnelConnect`] (capability `tunnel/1`)
    TunnelConnect = 0x24,
    /// [`TunnelConnected`] (capability `tunnel/1`)
    TunnelConnected = 0x25,
    /// [`TunnelClose`] (capability `tunnel/1`)
    TunnelClose = 0x28,
}

impl FrameType {
    /// The type for a byte, if known.
    pub fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            0x01 => FrameType::Hello,
            0x02 => FrameType::Welcome,
            0x03 => FrameType::Heartbeat,
            0x04 => FrameType::HeartbeatAck,
            0x05 => FrameType::Status,
            0x06 => FrameType::GoAway,
            0x10 => FrameType::CommandRequest,
            0x11 => FrameType::CommandOutput,
            0x12 => FrameType::CommandResult,
            0x13 => FrameType::CommandManifest,
            0x14 => FrameType::CommandPlan,
            0x15 => FrameType::ManifestBacklog,
            0x16 => FrameType::ManifestAck,
            0x20 => FrameType::TunnelOpen,
            0x21 => FrameType::TunnelReady,
            0x22 => FrameType::TunnelPlan,
            0x23 => FrameType::TunnelEnded,
            0x24 => FrameType::TunnelConnect,
            0x25 => FrameType::TunnelConnected,
            0x28 => FrameType::TunnelClose,
            _ => return None,
        })
    }
}

/// Any frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Agent → broker, first frame on the session stream.
    Hello(Hello),
    /// Broker → agent, answer to `Hello`.
    Welcome(Welcome),
    /// Agent → broker, every heartbeat interval.
    Heartbeat(Heartbeat),
    /// Broker → agent, answer to each `Heartbeat`.
    HeartbeatAck(HeartbeatAck),
    /// Agent → broker, free-form status report.
    Status(Status),
    /// Broker → agent: leave and reconnect later (to another broker).
    GoAway(GoAway),
    /// Broker → agent, first frame on a command stream.
    CommandRequest(CommandRequest),
    /// Agent → broker, a chunk of a command's output.
    CommandOutput(CommandOutput),
    /// Agent → broker, last frame on a command stream.
    CommandResult(CommandResult),
    /// Agent → broker, the signed manifest of a command, just before its result.
    CommandManifest(CommandManifest),
    /// Agent → broker, the answer to a `plan_only` request, just before its result.
    CommandPlan(CommandPlan),
    /// Agent → broker, on the session stream: a signed manifest whose command stream
    /// ended before it was delivered, re-sent after a reconnect.
    ManifestBacklog(ManifestBacklog),
    /// Broker → agent, on the session stream: a `ManifestBacklog` was passed on.
    ManifestAck(ManifestAck),
    /// Broker → agent, first frame of a tunnel's session-control stream.
    TunnelOpen(TunnelOpen),
    /// Agent → broker: the tunnel session is active.
    TunnelReady(TunnelReady),
    /// Agent → broker: the approval document a tunnel needs.
    TunnelPlan(TunnelPlan),
    /// Agent → broker: the tunnel session ended (or never opened).
    TunnelEnded(TunnelEnded),
    /// Broker → agent, first frame of a tunnel connection stream.
    TunnelConnect(TunnelConnect),
    /// Agent → broker: the target accepted; raw bytes follow.
    TunnelConnected(TunnelConnected),
    /// [`TunnelClose`]
    TunnelClose(TunnelClose),
}

impl Frame {
    /// This frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Heartbeat(_) => FrameType::Heartbeat,
            Frame::HeartbeatAck(_) => FrameType::HeartbeatAck,
            Frame::Status(_) => FrameType::Status,
            Frame::GoAway(_) => FrameType::GoAway,
            Frame::CommandRequest(_) => FrameType::CommandRequest,
            Frame::CommandOutput(_) => FrameType::CommandOutput,
            Frame::CommandResult(_) => FrameType::CommandResult,
            Frame::CommandManifest(_) => FrameType::CommandManifest,
            Frame::CommandPlan(_) => FrameType::CommandPlan,
            Frame::ManifestBacklog(_) => FrameType::ManifestBacklog,
            Frame::ManifestAck(_) => FrameType::ManifestAck,
            Frame::TunnelOpen(_) => FrameType::TunnelOpen,
            Frame::TunnelReady(_) => FrameType::TunnelReady,
            Frame::TunnelPlan(_) => FrameType::TunnelPlan,
            Frame::TunnelEnded(_) => FrameType::TunnelEnded,
            Frame::TunnelConnect(_) => FrameType::TunnelConnect,
            Frame::TunnelConnected(_) => FrameType::TunnelConnected,
            Frame::TunnelClose(_) => FrameType::TunnelClose,
        }
    }
}

impl Codec for Frame {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let ty: u8 = get(buf, "frame type")?;
        let ty = FrameType::from_u8(ty).ok_or(DecodeError::UnknownFrameType(ty))?;
        Ok(match ty {
            FrameType::Hello => Frame::Hello(Hello::decode(buf)?),
            FrameType::Welcome => Frame::Welcome(Welcome::decode(buf)?),
            FrameType::Heartbeat => Frame::Heartbeat(Heartbeat::decode(buf)?),
            FrameType::HeartbeatAck => Frame::HeartbeatAck(HeartbeatAck::decode(buf)?),
            FrameType::Status => Frame::Status(Status::decode(buf)?),
            FrameType::GoAway => Frame::GoAway(GoAway::decode(buf)?),
            FrameType::CommandRequest => Frame::CommandRequest(CommandRequest::decode(buf)?),
            FrameType::CommandOutput => Frame::CommandOutput(CommandOutput::decode(buf)?),
            FrameType::CommandResult => Frame::CommandResult(CommandResult::decode(buf)?),
            FrameType::CommandManifest => Frame::CommandManifest(CommandManifest::decode(buf)?),
            FrameType::CommandPlan => Frame::CommandPlan(CommandPlan::decode(buf)?),
            FrameType::ManifestBacklog => Frame::ManifestBacklog(ManifestBacklog::decode(buf)?),
            FrameType::ManifestAck => Frame::ManifestAck(ManifestAck::decode(buf)?),
            FrameType::TunnelOpen => Frame::TunnelOpen(TunnelOpen::decode(buf)?),
            FrameType::TunnelReady => Frame::TunnelReady(TunnelReady::decode(buf)?),
            FrameType::TunnelPlan => Frame::TunnelPlan(TunnelPlan::decode(buf)?),
            FrameType::TunnelEnded => Frame::TunnelEnded(TunnelEnded::decode(buf)?),
            FrameType::TunnelConnect => Frame::TunnelConnect(TunnelConnect::decode(buf)?),
            FrameType::TunnelConnected => Frame::TunnelConnected(TunnelConnected::decode(buf)?),
            FrameType::TunnelClose => Frame::TunnelClose(TunnelClose::decode(buf)?),
        })
    }

    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u8(self.frame_type() as u8);
        match self {
            Frame::Hello(f) => f.encode(buf),
            Frame::Welcome(f) => f.encode(buf),
            Frame::Heartbeat(f) => f.encode(buf),
            Frame::HeartbeatAck(f) => f.encode(buf),
            Frame::Status(f) => f.encode(buf),
            Frame::GoAway(f) => f.encode(buf),
            Frame::CommandRequest(f) => f.encode(buf),
            Frame::CommandOutput(f) => f.encode(buf),
            Frame::CommandResult(f) => f.encode(buf),
            Frame::CommandManifest(f) => f.encode(buf),
            Frame::CommandPlan(f) => f.encode(buf),
            Frame::ManifestBacklog(f) => f.encode(buf),
            Frame::ManifestAck(f) => f.encode(buf),
            Frame::TunnelOpen(f) => f.encode(buf),
            Frame::TunnelReady(f) => f.encode(buf),
            Frame::TunnelPlan(f) => f.encode(buf),
            Frame::TunnelEnded(f) => f.encode(buf),
            Frame::TunnelConnect(f) => f.encode(buf),
            Frame::TunnelConnected(f) => f.encode(buf),
            Frame::TunnelClose(f) => f.encode(buf),
        }
    }

    fn check(&self) -> Result<(), EncodeError> {
        match self {
            Frame::Hello(f) => f.check(),
            Frame::Welcome(f) => f.check(),
            Frame::Heartbeat(f) => f.check(),
            Frame::HeartbeatAck(f) => f.check(),
            Frame::Status(f) => f.check(),
            Frame::GoAway(f) => f.check(),
            Frame::CommandRequest(f) => f.check(),
            Frame::CommandOutput(f) => f.check(),
            Frame::CommandResult(f) => f.check(),
            Frame::CommandManifest(f) => f.check(),
            Frame::CommandPlan(f) => f.check(),
            Frame::ManifestBacklog(f) => f.check(),
            Frame::ManifestAck(f) => f.check(),
            Frame::TunnelOpen(f) => f.check(),
            Frame::TunnelReady(f) => f.check(),
            Frame::TunnelPlan(f) => f.check(),
            Frame::TunnelEnded(f) => f.check(),
            Frame::TunnelConnect(f) => f.check(),
            Frame::TunnelConnected(f) => f.check(),
            Frame::TunnelClose(f) => f.check(),
        }
    }
}

/// Defines a `u8`-coded enum with its codec; unknown values are a decode error.
macro_rules! u8_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($(#[$vm:meta])* $v:ident = $n:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $v = $n),+ }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
        }

        impl Codec for $name {
            fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
                let b: u8 = get(buf, $field)?;
                match b {
                    $($n => Ok($name::$v),)+
                    other => Err(DecodeError::InvalidValue { field: $field, value: u64::from(other) }),
                }
            }
            fn encode<B: BufMut>(&self, buf: &mut B) {
                buf.put_u8(*self as u8);
            }
        }
    };
}

u8_enum!(
    /// The appliance's view of its own certificate (the trust states of docs/PROTOCOL.md).
    TrustState, "trust_state" {
        /// More than three days of validity left.
        Trusted = 0,
        /// Less than three days left: renew soon.
        RenewalRecommended = 1,
        /// Less than one day left: renew now.
        RenewalDue = 2,
        /// The certificate was revoked.
        TrustRevoked = 3,
    }
);

u8_enum!(
    /// Why a broker sends `GoAway`.
    GoAwayReason, "goaway_reason" {
        /// The broker is shutting down or restarting.
        Draining = 0,
        /// The operator moves sessions to balance the cluster.
        Rebalance = 1,
    }
);

u8_enum!(
    /// How the agent runs a command.
    CommandKind, "command_kind" {
        /// Execute `argv[0]` with `argv[1..]` directly; no shell.
        Exec = 0,
        /// Run `argv` joined by spaces through `/bin/sh -c` (only if the agent allows it).
        Shell = 1,
    }
);

u8_enum!(
    /// Which output stream a chunk came from.
    OutputStream, "output_stream" {
        /// Standard output.
        Stdout = 1,
        /// Standard error.
        Stderr = 2,
    }
);

u8_enum!(
    /// Why a command produced no exit code.
    FailureReason, "failure_reason" {
        /// The program could not be started (not found, not executable, ...).
        SpawnFailed = 1,
        /// The deadline passed; the process was killed.
        TimedOut = 2,
        /// The agent is already running its maximum number of commands.
        Busy = 3,
        /// The process was terminated by a signal.
        Signaled = 4,
        /// The agent refused the request (kind not allowed, empty argv, ...).
        Refused = 5,
        /// The broker cancelled the command.
        Cancelled = 6,
        /// The agent failed internally.
        Internal = 7,
        /// Signed operations (capability `signed-ops/1`): the phase needs an approval.
        ApprovalRequired = 8,
        /// Signed operations: the approval does not verify against what the agent
        /// re-derived.
        ApprovalInvalid = 9,
        /// Signed operations: outside the approval's window (agent's clock).
        ApprovalExpired = 10,
        /// Signed operations: the approval's window is longer than the policy allows.
        ApprovalTooLong = 11,
        /// Signed operations: the approval was used before.
        ApprovalReplayed = 12,
        /// Signed operations: the pinned approvers cannot be used.
        ApprovalUnavailable = 13,
        /// Signed operations: the customer policy is missing or broken.
        PolicyUnavailable = 14,
        /// Signed operations: the command's phase is disabled.
        PhaseDisabled = 15,
        /// Signed operations: the phase was disabled while the command ran.
        PhaseRevoked = 16,
        /// Signed operations: a deny rule matched.
        DeniedByPolicy = 17,
        /// Signed operations: the appliance audit log cannot be written.
        AuditUnavailable = 18,
        /// Signed operations: the command cannot run as the phase's user.
        PrivsepUnavailable = 19,
    }
);

/// Agent → broker: first frame on the session stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the agent speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: u16,
    /// Agent software version, for inventory.
    pub agent_version: String,
    /// Optional features the agent supports (e.g. `"shell"`).
    pub capabilities: Vec<String>,
    /// `notAfter` of the certificate the agent connected with, ms since the epoch.
    pub cert_not_after_ms: i64,
}

impl Codec for Hello {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let protocol_version = get(buf, "protocol_version")?;
        let agent_version = get_str(buf, "agent_version", MAX_AGENT_VERSION_LEN)?;
        let n = get_count(buf, "capabilities", MAX_CAPABILITIES)?;
        let mut capabilities = Vec::with_capacity(n);
        for _ in 0..n {
            capabilities.push(get_str(buf, "capability", MAX_CAPABILITY_LEN)?);
        }
        let cert_not_after_ms = get(buf, "cert_not_after_ms")?;
        Ok(Hello {
            protocol_version,
            agent_version,
            capabilities,
            cert_not_after_ms,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u16(self.protocol_version);
        put_str(buf, &self.agent_version);
        buf.put_u16(self.capabilities.len() as u16);
        for c in &self.capabilities {
            put_str(buf, c);
        }
        buf.put_i64(self.cert_not_after_ms);
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_str(&self.agent_version, "agent_version", MAX_AGENT_VERSION_LEN)?;
        check_count(self.capabilities.len(), "capabilities", MAX_CAPABILITIES)?;
        for c in &self.capabilities {
            check_str(c, "capability", MAX_CAPABILITY_LEN)?;
        }
        Ok(())
    }
}

/// Broker → agent: the session is established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version the broker will speak (never above the agent's).
    pub protocol_version: u16,
    /// Broker-assigned session id, unique per broker run.
    pub session_id: u64,
    /// How often the agent sends `Heartbeat`, in ms.
    pub heartbeat_interval_ms: u32,
    /// The broker's wall clock, ms since the epoch, so the agent can detect skew.
    pub server_time_ms: i64,
    /// The appliance's manual-renewal generation known to the broker (0 = none).
    pub manual_renewal_generation: u64,
    /// The broker's maximum frame length (type byte plus body, as `len` counts it): the
    /// largest frame the agent may send. An optional trailing `u32`, sent only to agents
    /// that announced [`crate::capability::MAX_FRAME_LEN`]; `None` (absent) means
    /// [`crate::DEFAULT_MAX_FRAME_LEN`]. Never below [`crate::MIN_MAX_FRAME_LEN`].
    pub max_frame_len: Option<u32>,
    /// Which of the agent's announced capabilities the broker takes beyond the base
    /// protocol ([`crate::capability::MANIFEST_BACKLOG`],
    /// [`crate::capability::SPARSE_HEARTBEATS`]): an optional trailing list after
    /// `max_frame_len`, sent only to agents that announced one of those (which implies they
    /// read `max_frame_len`, so the broker then always sends that field), and only when
    /// not empty. Empty when absent.
    pub capabilities: Vec<String>,
}

impl Welcome {
    /// The largest frame the agent may send to this broker: the announced limit, or the
    /// protocol default when the broker announced none.
    pub fn peer_max_frame_len(&self) -> usize {
        self.max_frame_len.map_or(DEFAULT_MAX_FRAME_LEN, |m| {
            usize::try_from(m).unwrap_or(usize::MAX)
        })
    }
}

impl Codec for Welcome {
    /// `buf` must be exactly the frame body (as [`crate::decode_frame`] passes it): the
    /// optional trailing `max_frame_len` is read when bytes are left after
    /// `manual_renewal_generation`.
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let protocol_version = get(buf, "protocol_version")?;
        let session_id = get(buf, "session_id")?;
        let heartbeat_interval_ms = get(buf, "heartbeat_interval_ms")?;
        let server_time_ms = get(buf, "server_time_ms")?;
        let manual_renewal_generation = get(buf, "manual_renewal_generation")?;
        let max_frame_len = if buf.has_remaining() {
            let max: u32 = get(buf, "max_frame_len")?;
            if (max as usize) < MIN_MAX_FRAME_LEN {
                return Err(DecodeError::InvalidValue {
                    field: "max_frame_len",
                    value: u64::from(max),
                });
            }
            Some(max)
        } else {
            None
        };
        let mut capabilities = Vec::new();
        if buf.has_remaining() {
            let n = get_count(buf, "broker capabilities", MAX_CAPABILITIES)?;
            if n == 0 {
                // An empty list is sent as no list: one encoding per Welcome.
                return Err(DecodeError::InvalidValue {
                    field: "broker capabilities",
                    value: 0,
                });
            }
            capabilities.reserve(n);
            for _ in 0..n {
                capabilities.push(get_str(buf, "capability", MAX_CAPABILITY_LEN)?);
            }
        }
        Ok(Welcome {
            protocol_version,
            session_id,
            heartbeat_interval_ms,
            server_time_ms,
            manual_renewal_generation,
            max_frame_len,
            capabilities,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u16(self.protocol_version);
        buf.put_u64(self.session_id);
        buf.put_u32(self.heartbeat_interval_ms);
        buf.put_i64(self.server_time_ms);
        buf.put_u64(self.manual_renewal_generation);
        if let Some(max) = self.max_frame_len {
            buf.put_u32(max);
            if !self.capabilities.is_empty() {
                buf.put_u16(self.capabilities.len() as u16);
                for c in &self.capabilities {
                    put_str(buf, c);
                }
            }
        }
    }
    fn check(&self) -> Result<(), EncodeError> {
        match self.max_frame_len {
            Some(max) if (max as usize) < MIN_MAX_FRAME_LEN => {
                return Err(EncodeError::TooShort {
                    field: "max_frame_len",
                    len: max as usize,
                    min: MIN_MAX_FRAME_LEN,
                })
            }
            // The list is positional: it can only follow `max_frame_len`.
            None if !self.capabilities.is_empty() => {
                return Err(EncodeError::TooShort {
                    field: "max_frame_len (required before broker capabilities)",
                    len: 0,
                    min: MIN_MAX_FRAME_LEN,
                })
            }
            _ => {}
        }
        check_count(self.capabilities.len(), "capabilities", MAX_CAPABILITIES)?;
        for c in &self.capabilities {
            check_str(c, "capability", MAX_CAPABILITY_LEN)?;
        }
        Ok(())
    }
}

/// Agent → broker: liveness and the agent's trust state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Monotonic sequence number, starting at 1 for each session.
    pub seq: u64,
    /// The agent's view of its certificate.
    pub trust_state: TrustState,
    /// `notAfter` of the agent's current certificate, ms since the epoch.
    pub cert_not_after_ms: i64,
}

impl Codec for Heartbeat {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(Heartbeat {
            seq: get(buf, "seq")?,
            trust_state: TrustState::decode(buf)?,
            cert_not_after_ms: get(buf, "cert_not_after_ms")?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.seq);
        self.trust_state.encode(buf);
        buf.put_i64(self.cert_not_after_ms);
    }
}

/// Broker → agent: answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// The `seq` of the heartbeat acknowledged.
    pub seq: u64,
    /// The broker's wall clock, ms since the epoch.
    pub server_time_ms: i64,
    /// The appliance's manual-renewal generation; a value above the agent's asks it to renew.
    pub manual_renewal_generation: u64,
}

impl Codec for HeartbeatAck {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(HeartbeatAck {
            seq: get(buf, "seq")?,
            server_time_ms: get(buf, "server_time_ms")?,
            manual_renewal_generation: get(buf, "manual_renewal_generation")?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.seq);
        buf.put_i64(self.server_time_ms);
        buf.put_u64(self.manual_renewal_generation);
    }
}

/// Agent → broker: free-form key/value status, bounded in count and size.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Status {
    /// Key/value pairs, in the agent's order.
    pub entries: Vec<(String, String)>,
}

impl Codec for Status {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let n = get_count(buf, "status entries", MAX_STATUS_ENTRIES)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = get_str(buf, "status key", MAX_STATUS_KEY_LEN)?;
            let v = get_str(buf, "status value", MAX_STATUS_VALUE_LEN)?;
            entries.push((k, v));
        }
        Ok(Status { entries })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u16(self.entries.len() as u16);
        for (k, v) in &self.entries {
            put_str(buf, k);
            put_str(buf, v);
        }
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_count(self.entries.len(), "status entries", MAX_STATUS_ENTRIES)?;
        for (k, v) in &self.entries {
            check_str(k, "status key", MAX_STATUS_KEY_LEN)?;
            check_str(v, "status value", MAX_STATUS_VALUE_LEN)?;
        }
        Ok(())
    }
}

/// Broker → agent: stop using this broker; reconnect after the delay, preferably elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    /// Why.
    pub reason: GoAwayReason,
    /// How long to wait before reconnecting, in ms (already jittered by the broker).
    pub reconnect_after_ms: u32,
    /// Human-readable detail for logs.
    pub message: String,
}

impl Codec for GoAway {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(GoAway {
            reason: GoAwayReason::decode(buf)?,
            reconnect_after_ms: get(buf, "reconnect_after_ms")?,
            message: get_str(buf, "message", MAX_MESSAGE_LEN)?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.reason.encode(buf);
        buf.put_u32(self.reconnect_after_ms);
        put_str(buf, &self.message);
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_str(&self.message, "message", MAX_MESSAGE_LEN)
    }
}

/// Broker → agent: run a command. First frame of a broker-opened bidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRequest {
    /// Id chosen by the requester, echoed in output and result.
    pub command_id: u64,
    /// How to run it.
    pub kind: CommandKind,
    /// Program and arguments; never empty for a valid request.
    pub argv: Vec<String>,
    /// Names of the agent's environment variables the command may inherit; everything
    /// else is cleared (except `PATH`).
    pub env_allowlist: Vec<String>,
    /// Time the command may run before it is killed, in ms.
    pub deadline_ms: u32,
    /// The signed-operations fields, sent only to agents that announced `signed-ops/1`
    /// (a trailing extension: an agent without the capability refuses trailing bytes).
    /// An agent receiving it knows its broker understands the signed-ops refusal reasons
    /// and [`CommandManifest`].
    pub signed: Option<SignedOps>,
}

/// The signed-operations part of a [`CommandRequest`] (capability `signed-ops/1`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignedOps {
    /// The vendor's request id (at most [`MAX_REQUEST_ID_LEN`] bytes).
    pub request_id: String,
    /// Why (at most [`MAX_MESSAGE_LEN`] bytes).
    pub reason: String,
    /// The customer's approval document, its exact bytes; empty if none.
    pub approval: Bytes,
    /// Its SSHSIG armor; empty if none.
    pub approval_sig: Bytes,
    /// Classify and answer with [`CommandPlan`]; run nothing.
    pub plan_only: bool,
}

/// Longest `request_id` of [`SignedOps`].
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// Longest approval document carried, in bytes.
pub const MAX_APPROVAL_LEN: usize = 16 * 1024;
/// Longest approval signature carried, in bytes.
pub const MAX_APPROVAL_SIG_LEN: usize = 4 * 1024;
/// Longest manifest carried, in bytes.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;

pub(crate) fn check_len(len: usize, field: &'static str, max: usize) -> Result<(), EncodeError> {
    if len > max {
        return Err(EncodeError::TooLong { field, len, max });
    }
    Ok(())
}

pub(crate) fn get_bytes_max<B: Buf>(
    buf: &mut B,
    field: &'static str,
    max: usize,
) -> Result<Bytes, DecodeError> {
    let b = get_bytes(buf, field)?;
    if b.len() > max {
        return Err(DecodeError::TooLong {
            field,
            len: b.len(),
            max,
        });
    }
    Ok(b)
}

pub(crate) fn put_bytes<B: BufMut>(buf: &mut B, b: &[u8]) {
    buf.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    buf.put_slice(b);
}

impl Codec for SignedOps {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let request_id = get_str(buf, "request_id", MAX_REQUEST_ID_LEN)?;
        let reason = get_str(buf, "reason", MAX_MESSAGE_LEN)?;
        let approval = get_bytes_max(buf, "approval", MAX_APPROVAL_LEN)?;
        let approval_sig = get_bytes_max(buf, "approval_sig", MAX_APPROVAL_SIG_LEN)?;
        let plan_only = match get::<u8, _>(buf, "plan_only")? {
            0 => false,
            1 => true,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "plan_only",
                    value: u64::from(other),
                })
            }
        };
        Ok(SignedOps {
            request_id,
            reason,
            approval,
            approval_sig,
            plan_only,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        put_str(buf, &self.request_id);
        put_str(buf, &self.reason);
        put_bytes(buf, &self.approval);
        put_bytes(buf, &self.approval_sig);
        buf.put_u8(u8::from(self.plan_only));
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_str(&self.request_id, "request_id", MAX_REQUEST_ID_LEN)?;
        check_str(&self.reason, "reason", MAX_MESSAGE_LEN)?;
        check_len(self.approval.len(), "approval", MAX_APPROVAL_LEN)?;
        check_len(
            self.approval_sig.len(),
            "approval_sig",
            MAX_APPROVAL_SIG_LEN,
        )
    }
}

/// Agent → broker (capability `signed-ops/1`): the signed manifest of a command, sent on
/// its stream just before the `CommandResult` (refusals included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandManifest {
    /// The command.
    pub command_id: u64,
    /// The manifest document, its exact (canonical JSON) bytes.
    pub manifest: Bytes,
    /// Its SSHSIG armor (namespace `tether-manifest-v1`).
    pub sig: Bytes,
}

impl Codec for CommandManifest {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(CommandManifest {
            command_id: get(buf, "command_id")?,
            manifest: get_bytes_max(buf, "manifest", MAX_MANIFEST_LEN)?,
            sig: get_bytes_max(buf, "manifest_sig", MAX_APPROVAL_SIG_LEN)?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.command_id);
        put_bytes(buf, &self.manifest);
        put_bytes(buf, &self.sig);
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_len(self.manifest.len(), "manifest", MAX_MANIFEST_LEN)?;
        check_len(self.sig.len(), "manifest_sig", MAX_APPROVAL_SIG_LEN)
    }
}

/// Agent → broker, on the session stream (broker capability `manifest-backlog/1`): a
/// signed manifest whose command stream ended before its delivery was confirmed (the
/// connection dropped mid-command), re-sent after a reconnect. The agent keeps it in its
/// spool until the broker answers [`ManifestAck`] with the same `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestBacklog {
    /// The manifest's `seq` (unique per appliance): what the acknowledgement names.
    pub seq: u64,
    /// The manifest as its command stream would have carried it (the command id is the
    /// one it ran under, on the connection it ran on).
    pub manifest: CommandManifest,
}

impl Codec for ManifestBacklog {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(ManifestBacklog {
            seq: get(buf, "seq")?,
            manifest: CommandManifest::decode(buf)?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.seq);
        self.manifest.encode(buf);
    }
    fn check(&self) -> Result<(), EncodeError> {
        self.manifest.check()
    }
}

/// Broker → agent, on the session stream: the [`ManifestBacklog`] with this `seq` was
/// passed on (to control, or to the broker's log when it runs standalone); the agent
/// drops it from its spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestAck {
    /// The manifest's `seq`.
    pub seq: u64,
}

impl Codec for ManifestAck {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(ManifestAck {
            seq: get(buf, "seq")?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.seq);
    }
    fn check(&self) -> Result<(), EncodeError> {
        Ok(())
    }
}

/// Agent → broker (capability `signed-ops/1`): the answer to a `plan_only` request — the
/// complete approval document the agent would expect for this exact command (its own
/// identity, manifest key and phase; a fresh id and window), for the customer to read and
/// sign. Sent just before the `CommandResult`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandPlan {
    /// The command.
    pub command_id: u64,
    /// Whether the command's phase needs an approval.
    pub approval_required: bool,
    /// The approval document (canonical JSON bytes).
    pub document: Bytes,
}

impl Codec for CommandPlan {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let command_id = get(buf, "command_id")?;
        // 0 or 1 only, as `plan_only`: one frame, one encoding.
        let approval_required = match get::<u8, _>(buf, "approval_required")? {
            0 => false,
            1 => true,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "approval_required",
                    value: u64::from(other),
                })
            }
        };
        Ok(CommandPlan {
            command_id,
            approval_required,
            document: get_bytes_max(buf, "document", MAX_APPROVAL_LEN)?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.command_id);
        buf.put_u8(u8::from(self.approval_required));
        put_bytes(buf, &self.document);
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_len(self.document.len(), "document", MAX_APPROVAL_LEN)
    }
}

impl Codec for CommandRequest {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let command_id = get(buf, "command_id")?;
        let kind = CommandKind::decode(buf)?;
        let n = get_count(buf, "argv", MAX_ARGV)?;
        let mut argv = Vec::with_capacity(n);
        for _ in 0..n {
            argv.push(get_str(buf, "argv", MAX_ARG_LEN)?);
        }
        let n = get_count(buf, "env_allowlist", MAX_ENV)?;
        let mut env_allowlist = Vec::with_capacity(n);
        for _ in 0..n {
            env_allowlist.push(get_str(buf, "env_allowlist", MAX_ENV_NAME_LEN)?);
        }
        let deadline_ms = get(buf, "deadline_ms")?;
        let signed = if buf.has_remaining() {
            Some(SignedOps::decode(buf)?)
        } else {
            None
        };
        Ok(CommandRequest {
            command_id,
            kind,
            argv,
            env_allowlist,
            deadline_ms,
            signed,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.command_id);
        self.kind.encode(buf);
        buf.put_u16(self.argv.len() as u16);
        for a in &self.argv {
            put_str(buf, a);
        }
        buf.put_u16(self.env_allowlist.len() as u16);
        for e in &self.env_allowlist {
            put_str(buf, e);
        }
        buf.put_u32(self.deadline_ms);
        if let Some(signed) = &self.signed {
            signed.encode(buf);
        }
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_count(self.argv.len(), "argv", MAX_ARGV)?;
        for a in &self.argv {
            check_str(a, "argv", MAX_ARG_LEN)?;
        }
        check_count(self.env_allowlist.len(), "env_allowlist", MAX_ENV)?;
        for e in &self.env_allowlist {
            check_str(e, "env_allowlist", MAX_ENV_NAME_LEN)?;
        }
        match &self.signed {
            Some(signed) => signed.check(),
            None => Ok(()),
        }
    }
}

/// Agent → broker: a chunk of output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutput {
    /// The command.
    pub command_id: u64,
    /// Stdout or stderr.
    pub stream: OutputStream,
    /// Raw bytes, not necessarily UTF-8 nor line-aligned.
    pub data: Bytes,
}

impl CommandOutput {
    /// The most data one `CommandOutput` frame can carry when frames may be at most
    /// `max_frame_len` long (0 if not even an empty chunk fits).
    pub fn max_data_len(max_frame_len: usize) -> usize {
        max_frame_len.saturating_sub(COMMAND_OUTPUT_OVERHEAD)
    }
}

impl Codec for CommandOutput {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(CommandOutput {
            command_id: get(buf, "command_id")?,
            stream: OutputStream::decode(buf)?,
            data: get_bytes(buf, "data")?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.command_id);
        self.stream.encode(buf);
        buf.put_u32(u32::try_from(self.data.len()).unwrap_or(u32::MAX));
        buf.put_slice(&self.data);
    }
    fn check(&self) -> Result<(), EncodeError> {
        // The frame limit bounds it; this only keeps the u32 prefix honest.
        if u32::try_from(self.data.len()).is_err() {
            return Err(EncodeError::TooLong {
                field: "data",
                len: self.data.len(),
                max: u32::MAX as usize,
            });
        }
        Ok(())
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The process exited with this code.
    Exited(i32),
    /// No exit code: why, with a human-readable message.
    Failed {
        /// Why.
        reason: FailureReason,
        /// Detail for the operator.
        message: String,
    },
}

/// Agent → broker: the command is over. Last frame on the command stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    /// The command.
    pub command_id: u64,
    /// How it ended.
    pub outcome: CommandOutcome,
}

impl CommandResult {
    /// The longest `Failed` message that fits a frame of at most `max_frame_len` bytes
    /// (and the protocol's [`MAX_MESSAGE_LEN`]).
    pub fn max_message_len(max_frame_len: usize) -> usize {
        max_frame_len
            .saturating_sub(COMMAND_RESULT_FAILED_OVERHEAD)
            .min(MAX_MESSAGE_LEN)
    }
}

impl Codec for CommandResult {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let command_id = get(buf, "command_id")?;
        let tag: u8 = get(buf, "outcome")?;
        let outcome = match tag {
            0 => CommandOutcome::Exited(get(buf, "exit_code")?),
            1 => CommandOutcome::Failed {
                reason: FailureReason::decode(buf)?,
                message: get_str(buf, "message", MAX_MESSAGE_LEN)?,
            },
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "outcome",
                    value: u64::from(other),
                })
            }
        };
        Ok(CommandResult {
            command_id,
            outcome,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.command_id);
        match &self.outcome {
            CommandOutcome::Exited(code) => {
                buf.put_u8(0);
                buf.put_i32(*code);
            }
            CommandOutcome::Failed { reason, message } => {
                buf.put_u8(1);
                reason.encode(buf);
                put_str(buf, message);
            }
        }
    }
    fn check(&self) -> Result<(), EncodeError> {
        match &self.outcome {
            CommandOutcome::Exited(_) => Ok(()),
            CommandOutcome::Failed { message, .. } => {
                check_str(message, "message", MAX_MESSAGE_LEN)
            }
        }
    }
}
