//! Names that cross process boundaries as strings (JSON on the cluster channel and in
//! control's API), each defined once with its spelling: [`CommandFailure`], the one
//! vocabulary of why a command ended without an exit code, and the JSON names of
//! [`CommandKind`], [`OutputStream`] and [`CloseCode`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{CloseCode, CommandKind, FailureReason, OutputStream};

/// Defines `as_str`, `FromStr`, `Display`, `Serialize` and `Deserialize` for an enum from
/// one table of spellings.
macro_rules! named {
    ($name:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $name {
            /// The stable name on the wire.
            pub const fn name(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }

            /// The value of a name, `None` if unknown.
            pub fn from_name(s: &str) -> Option<$name> {
                match s { $($s => Some($name::$v),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

    };
}

/// `named!` plus a `Deserialize` that refuses unknown names.
macro_rules! named_strict {
    ($name:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        named!($name { $($v => $s),+ });

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::from_name(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        concat!("unknown ", stringify!($name), " {:?}"),
                        s
                    ))
                })
            }
        }
    };
}

/// Why a command ended without an exit code. Agent, broker, control and the `tether`
/// CLI all use these names (the `code` of a failed command on the cluster channel and in
/// control's NDJSON answer), and [`CommandFailure::exit_code`] is the one place that maps
/// them to `tether exec`'s exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CommandFailure {
    /// The appliance is connected to no broker (control), or not to this one (broker).
    Offline,
    /// No result by the deadline.
    TimedOut,
    /// The appliance's connection (or its command stream) went away mid-command.
    ConnectionLost,
    /// The broker holding the appliance, or control's link to it, went away mid-command.
    BrokerLost,
    /// The caller went away, or the broker cancelled the command.
    Cancelled,
    /// The control replica relaying the command went away mid-command (the CLI: control's
    /// answer ended without a result; the audit log: the outcome written for a command
    /// whose replica stopped heartbeating). The broker stops such a command when that
    /// replica's channel ends; it is never retried automatically.
    ReplicaLost,
    /// Control knows which broker holds the appliance but this replica has no channel to
    /// it (a partition): nothing was sent. Answered 503 with `Retry-After`; retrying,
    /// through the load balancer, can reach a replica that has the channel.
    NoChannel,
    /// The request was malformed (empty argv, unknown kind, a duplicate id).
    Invalid,
    /// A shell command to an agent that did not announce the `shell` capability.
    ShellNotAllowed,
    /// The agent broke the protocol on the command stream.
    ProtocolError,
    /// The program could not be started on the appliance.
    SpawnFailed,
    /// The agent runs its maximum number of commands.
    Busy,
    /// The process was killed by a signal.
    Signaled,
    /// The agent refused the request (kind not allowed, ...).
    Refused,
    /// The agent failed internally.
    AgentInternal,
    /// The caller read output too slowly; control stopped the command.
    OutputOverflow,
    /// Signed operations: the phase needs a customer approval and none came.
    ApprovalRequired,
    /// Signed operations: the approval does not verify against what the agent re-derived
    /// (changed command, other appliance, unpinned key, wrong namespace, not canonical).
    ApprovalInvalid,
    /// Signed operations: the agent's clock is outside the approval's window.
    ApprovalExpired,
    /// Signed operations: the approval's window is longer than the policy allows.
    ApprovalTooLong,
    /// Signed operations: the approval was used before (or is older than the pruning
    /// horizon).
    ApprovalReplayed,
    /// Signed operations: the pinned approvers cannot be used (missing, unparsable, or a
    /// file someone other than the customer could write).
    ApprovalUnavailable,
    /// Signed operations: the customer policy is missing or broken; nothing runs.
    PolicyUnavailable,
    /// Signed operations: the command's phase is disabled (or its window ended).
    PhaseDisabled,
    /// Signed operations: the phase was disabled while the command ran; it was killed.
    PhaseRevoked,
    /// Signed operations: a deny rule of the customer policy matched.
    DeniedByPolicy,
    /// Signed operations: the appliance audit log cannot be written; nothing runs that
    /// cannot be recorded.
    AuditUnavailable,
    /// Signed operations: the agent cannot run the command as the phase's user.
    PrivsepUnavailable,
    /// A name this version does not know (from a newer peer): kept as a failure, so one
    /// new code never breaks a channel or an answer.
    Unknown,
}

named!(CommandFailure {
    Offline => "offline",
    TimedOut => "timed_out",
    ConnectionLost => "connection_lost",
    BrokerLost => "broker_lost",
    Cancelled => "cancelled",
    ReplicaLost => "replica_lost",
    NoChannel => "no_channel",
    Invalid => "invalid",
    ShellNotAllowed => "shell_not_allowed",
    ProtocolError => "protocol_error",
    SpawnFailed => "spawn_failed",
    Busy => "busy",
    Signaled => "signaled",
    Refused => "refused",
    AgentInternal => "agent_internal",
    OutputOverflow => "output_overflow",
    ApprovalRequired => "approval_required",
    ApprovalInvalid => "approval_invalid",
    ApprovalExpired => "approval_expired",
    ApprovalTooLong => "approval_too_long",
    ApprovalReplayed => "approval_replayed",
    ApprovalUnavailable => "approval_unavailable",
    PolicyUnavailable => "policy_unavailable",
    PhaseDisabled => "phase_disabled",
    PhaseRevoked => "phase_revoked",
    DeniedByPolicy => "denied_by_policy",
    AuditUnavailable => "audit_unavailable",
    PrivsepUnavailable => "privsep_unavailable",
    Unknown => "unknown",
});

impl<'de> Deserialize<'de> for CommandFailure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CommandFailure, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(CommandFailure::from_name(&s).unwrap_or(CommandFailure::Unknown))
    }
}

/// `tether exec`: the appliance is not connected.
pub const EXIT_OFFLINE: i32 = 69;
/// `tether exec`: the appliance, its broker, the link to control or the control replica
/// went away mid-command, or no replica reached had a channel to the appliance's broker
/// (EX_TEMPFAIL: trying again later may work; `tether exec` never retries a command that
/// was sent).
pub const EXIT_LOST: i32 = 75;
/// `tether exec`: no result by the deadline.
pub const EXIT_TIMED_OUT: i32 = 124;
/// `tether exec`: any other failure (and `tether`'s own errors).
pub const EXIT_ERROR: i32 = 125;

impl CommandFailure {
    /// Every failure.
    pub const ALL: [CommandFailure; 29] = [
        CommandFailure::Offline,
        CommandFailure::TimedOut,
        CommandFailure::ConnectionLost,
        CommandFailure::BrokerLost,
        CommandFailure::Cancelled,
        CommandFailure::ReplicaLost,
        CommandFailure::NoChannel,
        CommandFailure::Invalid,
        CommandFailure::ShellNotAllowed,
        CommandFailure::ProtocolError,
        CommandFailure::SpawnFailed,
        CommandFailure::Busy,
        CommandFailure::Signaled,
        CommandFailure::Refused,
        CommandFailure::AgentInternal,
        CommandFailure::OutputOverflow,
        CommandFailure::ApprovalRequired,
        CommandFailure::ApprovalInvalid,
        CommandFailure::ApprovalExpired,
        CommandFailure::ApprovalTooLong,
        CommandFailure::ApprovalReplayed,
        CommandFailure::ApprovalUnavailable,
        CommandFailure::PolicyUnavailable,
        CommandFailure::PhaseDisabled,
        CommandFailure::PhaseRevoked,
        CommandFailure::DeniedByPolicy,
        CommandFailure::AuditUnavailable,
        CommandFailure::PrivsepUnavailable,
        CommandFailure::Unknown,
    ];

    /// The refusals of signed operations (docs/PROTOCOL.md, customer-signed operations):
    /// the agent decided, on the customer's policy and keys, not to run the command.
    pub const SIGNED_OPS_REFUSALS: [CommandFailure; 12] = [
        CommandFailure::ApprovalRequired,
        CommandFailure::ApprovalInvalid,
        CommandFailure::ApprovalExpired,
        CommandFailure::ApprovalTooLong,
        CommandFailure::ApprovalReplayed,
        CommandFailure::ApprovalUnavailable,
        CommandFailure::PolicyUnavailable,
        CommandFailure::PhaseDisabled,
        CommandFailure::PhaseRevoked,
        CommandFailure::DeniedByPolicy,
        CommandFailure::AuditUnavailable,
        CommandFailure::PrivsepUnavailable,
    ];

    /// The exit code `tether exec` ends with: [`EXIT_OFFLINE`] (69), [`EXIT_LOST`] (75),
    /// [`EXIT_TIMED_OUT`] (124) or [`EXIT_ERROR`] (125).
    pub const fn exit_code(self) -> i32 {
        match self {
            CommandFailure::Offline => EXIT_OFFLINE,
            CommandFailure::TimedOut => EXIT_TIMED_OUT,
            CommandFailure::ConnectionLost
            | CommandFailure::BrokerLost
            | CommandFailure::Cancelled
            | CommandFailure::ReplicaLost
            | CommandFailure::NoChannel => EXIT_LOST,
            _ => EXIT_ERROR,
        }
    }
}

/// The agent's wire reasons and the names they stand for: one table, read both ways.
const WIRE: [(FailureReason, CommandFailure); 19] = [
    (FailureReason::SpawnFailed, CommandFailure::SpawnFailed),
    (FailureReason::TimedOut, CommandFailure::TimedOut),
    (FailureReason::Busy, CommandFailure::Busy),
    (FailureReason::Signaled, CommandFailure::Signaled),
    (FailureReason::Refused, CommandFailure::Refused),
    (FailureReason::Cancelled, CommandFailure::Cancelled),
    (FailureReason::Internal, CommandFailure::AgentInternal),
    (
        FailureReason::ApprovalRequired,
        CommandFailure::ApprovalRequired,
    ),
    (
        FailureReason::ApprovalInvalid,
        CommandFailure::ApprovalInvalid,
    ),
    (
        FailureReason::ApprovalExpired,
        CommandFailure::ApprovalExpired,
    ),
    (
        FailureReason::ApprovalTooLong,
        CommandFailure::ApprovalTooLong,
    ),
    (
        FailureReason::ApprovalReplayed,
        CommandFailure::ApprovalReplayed,
    ),
    (
        FailureReason::ApprovalUnavailable,
        CommandFailure::ApprovalUnavailable,
    ),
    (
        FailureReason::PolicyUnavailable,
        CommandFailure::PolicyUnavailable,
    ),
    (FailureReason::PhaseDisabled, CommandFailure::PhaseDisabled),
    (FailureReason::PhaseRevoked, CommandFailure::PhaseRevoked),
    (
        FailureReason::DeniedByPolicy,
        CommandFailure::DeniedByPolicy,
    ),
    (
        FailureReason::AuditUnavailable,
        CommandFailure::AuditUnavailable,
    ),
    (
        FailureReason::PrivsepUnavailable,
        CommandFailure::PrivsepUnavailable,
    ),
];

impl CommandFailure {
    /// The wire reason an agent sends for this failure, if it is one an agent reports
    /// (`shell_not_allowed` goes as `refused`).
    pub fn wire_reason(self) -> Option<FailureReason> {
        if self == CommandFailure::ShellNotAllowed {
            return Some(FailureReason::Refused);
        }
        WIRE.iter().find(|(_, c)| *c == self).map(|(w, _)| *w)
    }
}

impl From<FailureReason> for CommandFailure {
    /// The agent's reason on the wire, in the shared vocabulary.
    fn from(r: FailureReason) -> CommandFailure {
        WIRE.iter()
            .find(|(w, _)| *w == r)
            .map_or(CommandFailure::Unknown, |(_, c)| *c)
    }
}

named_strict!(CommandKind {
    Exec => "exec",
    Shell => "shell",
});

// `u8_enum!` defines the type and its derives; a `#[default]` would need the macro to
// derive `Default` for every wire enum.
#[allow(clippy::derivable_impls)]
impl Default for CommandKind {
    fn default() -> CommandKind {
        CommandKind::Exec
    }
}

named_strict!(OutputStream {
    Stdout => "stdout",
    Stderr => "stderr",
});

impl Serialize for CloseCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CloseCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CloseCode, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        CloseCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown close code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_reason_maps_to_a_name_and_back() {
        for &r in FailureReason::ALL {
            let f = CommandFailure::from(r);
            assert_ne!(f, CommandFailure::Unknown, "{r:?}");
            assert_eq!(f.wire_reason(), Some(r), "{r:?}");
        }
        assert_eq!(
            CommandFailure::ShellNotAllowed.wire_reason(),
            Some(FailureReason::Refused)
        );
        assert_eq!(CommandFailure::Offline.wire_reason(), None);
    }

    #[test]
    fn names_round_trip_and_map_to_exit_codes() {
        for f in CommandFailure::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
            assert_eq!(serde_json::from_str::<CommandFailure>(&json).unwrap(), f);
        }
        assert_eq!(CommandFailure::Offline.exit_code(), 69);
        assert_eq!(CommandFailure::BrokerLost.exit_code(), 75);
        assert_eq!(CommandFailure::ReplicaLost.exit_code(), 75);
        assert_eq!(CommandFailure::NoChannel.exit_code(), 75);
        assert_eq!(CommandFailure::TimedOut.exit_code(), 124);
        assert_eq!(CommandFailure::SpawnFailed.exit_code(), 125);
        assert_eq!(
            serde_json::from_str::<CommandFailure>("\"from_the_future\"").unwrap(),
            CommandFailure::Unknown
        );
        for c in CloseCode::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<CloseCode>(&json).unwrap(), c);
        }
        assert_eq!(
            serde_json::to_string(&CommandKind::Shell).unwrap(),
            "\"shell\""
        );
        assert_eq!(
            serde_json::to_string(&OutputStream::Stderr).unwrap(),
            "\"stderr\""
        );
    }
}
