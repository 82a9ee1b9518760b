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

/// Every capability this crate defines, in the order the reference agent announces them.
pub const ALL: [&str; 6] = [
    EXEC,
    SHELL,
    MAX_FRAME_LEN,
    SIGNED_OPS,
    MANIFEST_BACKLOG,
    TUNNEL,
];

/// What the reference broker lists in `Welcome.capabilities` (to agents that announced
/// [`MANIFEST_BACKLOG`]).
pub const BROKER: [&str; 1] = [MANIFEST_BACKLOG];

/// Whether `capabilities` (from a `Hello`) holds `capability`.
pub fn announced(capabilities: &[String], capability: &str) -> bool {
    capabilities.iter().any(|c| c == capability)
}
