//! The cluster channel: what a broker and control say to each other.
//!
//! A broker dials control's HTTPS port with its own certificate
//! (`spiffe://<td>/broker/<name>`, clientAuth) and sends
//! `GET /v1/brokers/channel` with `Connection: Upgrade` and `Upgrade: `[`UPGRADE`].
//! Control answers `101 Switching Protocols`; from then on the TLS connection carries
//! frames in both directions, each a 4-byte big-endian length followed by that many bytes
//! of JSON (one [`ToControl`] or [`ToBroker`] value), at most [`MAX_FRAME_LEN`] bytes.
//!
//! The conversation:
//!
//! 1. broker → [`ToControl::Hello`]: its name, its QUIC address, the allowlist version it
//!    holds (0 for none) and every session it holds now.
//! 2. control → either the deltas after that version ([`ToBroker::Delta`], one per
//!    version, in order) or, when the broker is too far behind (or has nothing), a
//!    snapshot: [`ToBroker::SnapshotBegin`], any number of [`ToBroker::SnapshotChunk`],
//!    [`ToBroker::SnapshotEnd`]. The broker applies the snapshot whole at `SnapshotEnd`,
//!    never a part of it. Then [`ToBroker::Synced`] with the version now current.
//! 3. From then on control pushes each new version as a [`ToBroker::Delta`] as soon as it
//!    is committed, the manual-renewal generations ([`ToBroker::Renewals`]), session
//!    closes ([`ToBroker::CloseSession`]) and commands ([`ToBroker::Command`]); the broker
//!    reports [`ToControl::Applied`] after each version it swapped in, session up/down,
//!    batched heartbeat summaries and command events.
//! 4. Either side sends [`ToBroker::Ping`]/[`ToControl::Ping`] when it has been quiet for a
//!    while; a channel silent for [`CHANNEL_IDLE_TIMEOUT_SECS`] is dead. When it ends,
//!    control fails the commands in flight on it with `broker_lost`, and the broker
//!    reconnects with jittered backoff, resuming from its version.
//! 5. A control that is shutting down sends [`ToBroker::GoingAway`] after its in-flight
//!    requests have finished, then closes; the broker reconnects at once.

use serde::{Deserialize, Serialize};

use crate::{CloseCode, CommandFailure, CommandKind, OutputStream};

/// The `Upgrade` token of the channel.
pub const UPGRADE: &str = "tether-cluster/1";
/// Path of the channel on control's HTTPS port.
pub const CHANNEL_PATH: &str = "/v1/brokers/channel";
/// Largest channel frame (JSON bytes after the 4-byte length).
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;
/// Entries per [`ToBroker::SnapshotChunk`] control sends.
pub const SNAPSHOT_CHUNK: usize = 10_000;
/// Seconds after which a side with nothing to say sends a ping.
pub const CHANNEL_PING_SECS: u64 = 10;
/// Seconds of silence after which a side treats the channel as dead.
pub const CHANNEL_IDLE_TIMEOUT_SECS: u64 = 30;

/// One allowed certificate: appliance id and the lowercase-hex SHA-256 of its leaf DER.
pub type AllowEntry = (String, String);

/// Domain separation of [`allowlist_digest`].
pub const ALLOWLIST_DIGEST_TAG: &[u8] = b"tether-allowlist-v1";
/// The digest "before version 1" that version 1 chains to.
pub const ALLOWLIST_GENESIS_DIGEST: [u8; 32] = [0; 32];

/// The digest of allowlist version `version`, chained to the previous version's:
/// SHA-256 of [`ALLOWLIST_DIGEST_TAG`] ‖ `prev` ‖ `version` (u64, big-endian) ‖ the
/// version's changes as a [`ToBroker::Delta`] carries them: the number of additions
/// (u32 BE) and each (appliance id, fingerprint), then the number of removals and each
/// fingerprint, in the order control recorded them; every string length-prefixed (u32
/// BE). A delta carries no appliance for a removal (the fingerprint names the
/// certificate), so the digest covers exactly what every broker receives. Control writes
/// it with each version; a broker recomputes it from the delta it applies, so a history
/// that forked (the same version numbers with other content) shows as a mismatch.
pub fn allowlist_digest(
    prev: &[u8; 32],
    version: u64,
    add: &[(&str, &str)],
    remove: &[&str],
) -> [u8; 32] {
    fn put(ctx: &mut ring::digest::Context, s: &str) {
        ctx.update(&(s.len() as u32).to_be_bytes());
        ctx.update(s.as_bytes());
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ALLOWLIST_DIGEST_TAG);
    ctx.update(prev);
    ctx.update(&version.to_be_bytes());
    ctx.update(&(add.len() as u32).to_be_bytes());
    for (appliance, fingerprint) in add {
        put(&mut ctx, appliance);
        put(&mut ctx, fingerprint);
    }
    ctx.update(&(remove.len() as u32).to_be_bytes());
    for fingerprint in remove {
        put(&mut ctx, fingerprint);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// [`allowlist_digest`] of a [`ToBroker::Delta`]'s fields, from a hex `prev`; `None` when
/// `prev` is not 64 hex digits.
pub fn allowlist_digest_hex(
    prev: &str,
    version: u64,
    add: &[AllowEntry],
    remove: &[String],
) -> Option<String> {
    let prev = parse_digest(prev)?;
    let add: Vec<(&str, &str)> = add.iter().map(|(a, f)| (a.as_str(), f.as_str())).collect();
    let remove: Vec<&str> = remove.iter().map(String::as_str).collect();
    Some(to_hex(&allowlist_digest(&prev, version, &add, &remove)))
}

/// A digest from 64 lowercase or uppercase hex digits.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// A digest as 64 lowercase hex digits.
pub fn to_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What control sends to a broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToBroker {
    /// A full allowlist follows, at `version`.
    SnapshotBegin {
        /// The version the snapshot reflects.
        version: u64,
        /// How many entries will follow in chunks.
        entries: u64,
    },
    /// Part of the snapshot.
    SnapshotChunk {
        /// Entries.
        entries: Vec<AllowEntry>,
    },
    /// The snapshot is complete: apply it whole.
    SnapshotEnd {
        /// Same as in `SnapshotBegin`.
        version: u64,
        /// The digest of that version ([`allowlist_digest`], lowercase hex); empty from an
        /// older control.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        digest: String,
    },
    /// One version's changes, applied together. Versions arrive in order, with no gaps.
    Delta {
        /// The version after applying it.
        version: u64,
        /// Fingerprints to allow.
        add: Vec<AllowEntry>,
        /// Fingerprints to remove (lowercase hex).
        remove: Vec<String>,
        /// The digest of this version ([`allowlist_digest`] over the previous version's
        /// digest and this delta, lowercase hex); empty from an older control. A broker
        /// that knows the previous digest recomputes it and refuses a mismatch.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        digest: String,
    },
    /// The broker is up to date at `version`.
    Synced {
        /// The current version.
        version: u64,
        /// Optional messages control takes from the broker beyond the base channel
        /// (`"manifest_backlog"`); absent from an older control, which would refuse them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        accepts: Vec<String>,
    },
    /// Manual-renewal generations: an appliance whose generation is above what its agent
    /// has seen renews on its next heartbeat answer. Sent whole after `Hello`, then as they
    /// change. Appliances not listed keep their generation.
    Renewals {
        /// `(appliance, generation)`.
        generations: Vec<(String, u64)>,
    },
    /// Close an appliance's session on this broker, if it is still the one named.
    CloseSession {
        /// The appliance.
        appliance: String,
        /// The broker's session id; the session is closed only if it still has this id.
        session_id: u64,
        /// The close code (its name on the wire: `superseded`, `revoked`).
        code: CloseCode,
    },
    /// Run a command on an appliance connected to this broker.
    Command {
        /// Control's id of this command (unique per channel).
        id: u64,
        /// The appliance.
        appliance: String,
        /// Program and arguments.
        argv: Vec<String>,
        /// `exec` (default) or `shell`.
        #[serde(default)]
        kind: CommandKind,
        /// Environment variable names the command may inherit from the agent.
        #[serde(default)]
        env_allowlist: Vec<String>,
        /// Deadline in milliseconds.
        timeout_ms: u64,
        /// Signed operations (docs/PROTOCOL.md §11). Control always sends it (empty when
        /// the caller gave nothing): its presence says control understands
        /// `command_manifest` and `command_plan`, which the broker relays only then. An
        /// older broker ignores the field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed: Option<SignedCommand>,
    },
    /// Stop a command (the caller went away). The broker drops its stream.
    CancelCommand {
        /// The command.
        id: u64,
    },
    /// Break glass: open (or plan) a tunnel session on an appliance connected to this
    /// broker. Sent only to a broker whose `Hello` listed [`FEATURE_TUNNEL`]. The broker
    /// answers [`ToControl::TunnelAnswer`] with the same `id`.
    TunnelOpen {
        /// Control's id of the tunnel session (unique across control's sessions).
        id: String,
        /// The appliance.
        appliance: String,
        /// What the vendor asks for, and the customer's approval.
        open: TunnelRequest,
    },
    /// Break glass: one tunnel connection. The broker dials control back at
    /// [`TUNNEL_DIAL_PATH`]`{conn}` (upgrade [`crate::relay::UPGRADE`], its broker
    /// certificate), then opens a connection stream to `appliance` for the agent's
    /// `session_id` and relays (docs/PROTOCOL.md §12.5). Any broker holding the appliance
    /// can serve it: the agent checks the session.
    TunnelConnect {
        /// Control's id of the tunnel session.
        id: String,
        /// The appliance.
        appliance: String,
        /// The agent's session id (from its `TunnelReady`).
        session_id: u64,
        /// The one-time token naming the dial-back (32 lowercase hex digits).
        conn: String,
    },
    /// Break glass: the vendor closes tunnel session `id`. Sent to the broker holding the
    /// appliance now: it finishes the session-control stream if it holds it, else (the
    /// stream was lost: the session is detached) it sends the agent a `TunnelClose` for
    /// `session_id` on a new stream. Either way the agent ends the session as `closed`
    /// and the broker reports [`ToControl::TunnelEnded`].
    TunnelClose {
        /// Control's id of the tunnel session.
        id: String,
        /// The appliance.
        #[serde(default)]
        appliance: String,
        /// The agent's session id.
        #[serde(default)]
        session_id: u64,
    },
    /// The live control replicas (their registry on the database's clock), sent after
    /// [`ToBroker::Synced`] and again whenever the registry changes. A broker holds one
    /// channel to each: it dials each `advertise` directly (it reached the first one
    /// through its bundle's URL, often a load balancer), keeps the list in its data
    /// directory so a restart does not need the load balancer, and closes a second
    /// channel that lands on a replica it already holds (every upgrade answer names its
    /// replica in the `tether-control-replica` header). An older broker would take this
    /// frame for a protocol error, so control sends it only to a broker whose `Hello`
    /// listed [`FEATURE_REPLICAS`].
    Replicas {
        /// The replica at the other end of this channel.
        self_id: String,
        /// Every live replica, this one included.
        replicas: Vec<ReplicaAddr>,
    },
    /// Keep-alive.
    Ping,
    /// Drain, exactly as on SIGTERM (`tether broker drain NAME`): `GoAway` with a jittered
    /// reconnect delay to every session, wait for them to leave, then stop. Sent only to a
    /// broker whose `Hello` listed [`FEATURE_DRAIN`].
    Drain,
    /// Control is shutting down: it has finished its in-flight requests and will close
    /// the channel. The broker reconnects (to any control replica) at once, with jitter,
    /// keeping its allowlist meanwhile. A broker that does not know this frame treats it
    /// as a protocol error, which ends the channel the same way.
    GoingAway,
}

/// The signed-operations part of a [`ToBroker::Command`]: the `SignedOps` extension's
/// fields as JSON (the approval and its signature are UTF-8: canonical JSON and armor).
/// Empty fields are left out, so a plain command costs `"signed":{}` (11 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    /// The vendor's request id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The approval document's exact bytes, `""` if none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub approval: String,
    /// Its SSHSIG armor, `""` if none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub approval_sig: String,
    /// Classify only and answer the document to sign.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan: bool,
}

impl SignedCommand {
    /// The extension as the broker sends it to the agent.
    pub fn to_wire(&self) -> crate::SignedOps {
        crate::SignedOps {
            request_id: self.request_id.clone(),
            reason: self.reason.clone(),
            approval: self.approval.clone().into_bytes().into(),
            approval_sig: self.approval_sig.clone().into_bytes().into(),
            plan_only: self.plan,
        }
    }
}

/// A control replica in [`ToBroker::Replicas`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaAddr {
    /// Its id (`tether-control-replica`).
    pub id: String,
    /// Where brokers reach it (`host:port`, HTTPS).
    pub advertise: String,
}

/// What a broker lists in its `Hello` when it takes [`ToBroker::Replicas`] and holds a
/// channel to every replica (it may then also send [`ToControl::Channels`]).
pub const FEATURE_REPLICAS: &str = "replicas";

/// What a broker lists in its `Hello` when it drains on [`ToBroker::Drain`].
pub const FEATURE_DRAIN: &str = "drain";

/// What a broker lists in its `Hello` when it serves break-glass tunnels for control.
pub const FEATURE_TUNNEL: &str = "tunnel";
/// [`ToControl::TunnelEnded`]'s `reason` when the broker lost the session-control
/// stream without the agent's `TunnelEnded`: the session is not known to have ended.
pub const TUNNEL_DETACHED: &str = "detached";
/// Path prefix of a tunnel connection's dial-back on control's HTTPS port (the
/// connection's token follows).
pub const TUNNEL_DIAL_PATH: &str = "/v1/brokers/tunnels/";

/// The break-glass fields of a [`ToBroker::TunnelOpen`]: the `TunnelOpen` frame as JSON
/// (the approval and its signature are UTF-8: canonical JSON and armor).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRequest {
    /// The vendor's request id.
    pub request_id: String,
    /// Why.
    pub reason: String,
    /// The resource, by the customer's name for it.
    pub resource: String,
    /// The privilege, by the customer's name for it.
    pub privilege: String,
    /// Session length from activation, in seconds.
    pub duration_s: u32,
    /// Most TCP connections open at once.
    pub max_connections: u16,
    /// Idle limit of each connection, in seconds.
    pub idle_timeout_s: u32,
    /// The operator's one-time public key (`""`: no credential).
    #[serde(default)]
    pub recipient: String,
    /// The approval document's exact bytes (`""` for a plan).
    #[serde(default)]
    pub approval: String,
    /// Its SSHSIG armor.
    #[serde(default)]
    pub approval_sig: String,
    /// Answer the document to sign; open nothing.
    #[serde(default)]
    pub plan: bool,
}

impl TunnelRequest {
    /// The frame the broker sends the agent.
    pub fn to_wire(&self) -> crate::TunnelOpen {
        crate::TunnelOpen {
            request_id: self.request_id.clone(),
            reason: self.reason.clone(),
            resource: self.resource.clone(),
            privilege: self.privilege.clone(),
            duration_s: self.duration_s,
            max_connections: self.max_connections,
            idle_timeout_s: self.idle_timeout_s,
            recipient: self.recipient.clone(),
            approval: self.approval.clone().into_bytes().into(),
            approval_sig: self.approval_sig.clone().into_bytes().into(),
            plan_only: self.plan,
        }
    }
}

/// What the agent answered a [`ToBroker::TunnelOpen`], as the broker relays it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TunnelAnswer {
    /// The session is active.
    Ready {
        /// The agent's session id.
        session_id: u64,
        /// When the agent's timer ends it (agent's clock, ms since the epoch).
        expires_at_ms: i64,
        /// The credential sealed to the operator's one-time key (standard base64 of the
        /// `age` ciphertext; `""` when none was minted). Relayed, never opened.
        #[serde(default)]
        sealed_credential: String,
    },
    /// The approval document to sign (a plan).
    Plan {
        /// Its exact bytes.
        document: String,
    },
    /// Refused, or ended at once.
    Ended {
        /// The close reason's name (`refused`, `not_active`, ...).
        reason: String,
        /// For `refused`: the signed-ops failure name.
        code: String,
        /// Detail.
        message: String,
    },
}

/// A live session as a broker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    /// The appliance.
    pub appliance: String,
    /// The broker's session id.
    pub session_id: u64,
    /// Fingerprint of the certificate the session authenticated with (lowercase hex).
    pub fingerprint: String,
    /// When it connected (Unix seconds).
    pub connected_at: u64,
    /// When it connected (Unix milliseconds; 0 from an older broker, which control reads
    /// as `connected_at` × 1000). Every control replica keeps, of two sessions of one
    /// appliance on different brokers, the one with the greatest
    /// (`connected_at_ms`, broker, `session_id`), so all replicas close the same one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub connected_at_ms: u64,
    /// The certificate's `notAfter` (Unix seconds).
    pub cert_not_after: u64,
    /// The agent's version from `Hello`.
    #[serde(default)]
    pub agent_version: String,
    /// The capabilities the agent announced (`signed-ops/1` says the appliance decides
    /// commands under its customer's policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// The transport the session uses: `quic` or `tcp` (absent from older brokers: QUIC).
    #[serde(default = "default_transport")]
    pub transport: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl SessionReport {
    /// When it connected in Unix milliseconds (from `connected_at` for an older broker).
    pub fn connected_ms(&self) -> u64 {
        if self.connected_at_ms != 0 {
            self.connected_at_ms
        } else {
            self.connected_at.saturating_mul(1000)
        }
    }
}

fn default_transport() -> String {
    "quic".to_owned()
}

/// The latest heartbeat of one session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatSummary {
    /// The appliance.
    pub appliance: String,
    /// The broker's session id.
    pub session_id: u64,
    /// When the heartbeat arrived (Unix seconds).
    pub at: u64,
    /// Trust state the agent reported (`trusted`, `renewal_recommended`, `renewal_due`,
    /// `expired`).
    pub trust_state: String,
    /// The certificate's `notAfter` the agent reported (Unix seconds).
    pub cert_not_after: u64,
    /// The agent's `Status` entries, when they changed since the last summary (signed
    /// operations: `policy.sha256`, `policy.phases`, `approvers`, `privsep`,
    /// `audit.head`, ...); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<(String, String)>,
}

/// What control lists in [`ToBroker::Synced`]'s `accepts` when it takes
/// [`ToControl::ManifestBacklog`].
pub const ACCEPTS_MANIFEST_BACKLOG: &str = "manifest_backlog";

/// What control lists in [`ToBroker::Synced`]'s `accepts` when it takes
/// [`ToControl::Draining`].
pub const ACCEPTS_DRAINING: &str = "draining";

/// What a broker sends to control.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToControl {
    /// First frame on every channel.
    Hello {
        /// The broker's name (must match its certificate).
        name: String,
        /// The broker's version.
        version: String,
        /// Where agents reach it (`host:port`, UDP).
        quic_addr: String,
        /// The allowlist version it holds (0 when it holds none).
        allowlist_version: u64,
        /// The digest of that version as it applied it (lowercase hex; empty when unknown,
        /// or from an older broker). Control sends a snapshot when it differs from the
        /// store's, equal versions included: the history the broker followed was lost or
        /// rewritten (an asynchronous failover, a restore from backup).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        allowlist_digest: String,
        /// Every session it holds now.
        sessions: Vec<SessionReport>,
        /// What this broker serves beyond the base conversation ([`FEATURE_TUNNEL`]).
        /// An older control ignores the field.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// A version was swapped in (after a delta or a snapshot).
    Applied {
        /// The version now in force.
        version: u64,
        /// Live sessions closed because their fingerprint left the allowlist.
        sessions_closed: u64,
    },
    /// A session came up.
    SessionUp(SessionReport),
    /// A session ended.
    SessionDown {
        /// The appliance.
        appliance: String,
        /// The broker's session id.
        session_id: u64,
        /// Close code name (`normal`, `revoked`, `superseded`, `draining`, `idle`, ...).
        reason: String,
    },
    /// The latest heartbeats since the previous batch (one per session at most).
    Heartbeats {
        /// Summaries.
        items: Vec<HeartbeatSummary>,
    },
    /// Output of a command.
    CommandOutput {
        /// Control's command id.
        id: u64,
        /// `stdout` or `stderr`.
        stream: OutputStream,
        /// The bytes, standard base64.
        data: String,
    },
    /// Signed operations: the appliance's signed manifest of the command (just before
    /// its end); sent only for commands whose `command` carried `signed`.
    CommandManifest {
        /// Control's command id.
        id: u64,
        /// The manifest's exact bytes (canonical JSON).
        manifest: String,
        /// Its SSHSIG armor.
        sig: String,
    },
    /// Signed operations: a manifest the agent re-sent after a reconnect (its command's
    /// stream had ended before delivery), not tied to a live command. Sent only to a
    /// control whose `synced` listed [`ACCEPTS_MANIFEST_BACKLOG`].
    ManifestBacklog {
        /// The appliance.
        appliance: String,
        /// The command id it was made for (the broker's, on the connection it ran on).
        command_id: u64,
        /// The manifest's exact bytes (canonical JSON).
        manifest: String,
        /// Its SSHSIG armor.
        sig: String,
    },
    /// Signed operations: the answer to a plan request (just before the end).
    CommandPlan {
        /// Control's command id.
        id: u64,
        /// Whether the command's phase needs an approval.
        approval_required: bool,
        /// The approval document the appliance expects (canonical JSON).
        document: String,
    },
    /// The command exited.
    CommandExit {
        /// Control's command id.
        id: u64,
        /// Exit code.
        code: i32,
    },
    /// The command ended without an exit code.
    CommandFailed {
        /// Control's command id.
        id: u64,
        /// Why ([`CommandFailure`]: `offline` when not connected here, `timed_out`,
        /// `connection_lost`, `invalid`, ...). An unknown name reads as `unknown`.
        code: CommandFailure,
        /// Detail.
        message: String,
    },
    /// Break glass: the agent's answer to [`ToBroker::TunnelOpen`] `id`.
    TunnelAnswer {
        /// Control's id of the tunnel session.
        id: String,
        /// The answer.
        answer: TunnelAnswer,
    },
    /// Break glass: tunnel session `id`, which was ready, ended (the agent's
    /// `TunnelEnded`), or its session-control stream was lost ([`TUNNEL_DETACHED`]: the
    /// agent keeps the session through its disconnection grace).
    TunnelEnded {
        /// Control's id of the tunnel session.
        id: String,
        /// The close reason's name (`expired`, `revoked`, `customer_ended`, `closed`,
        /// `disconnected`, ...), or [`TUNNEL_DETACHED`].
        reason: String,
        /// Detail.
        message: String,
        /// The session manifest the appliance signed (canonical JSON), `""` if none.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        manifest: String,
        /// Its SSHSIG armor.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        manifest_sig: String,
    },
    /// The replicas this broker holds a channel to now (their ids), sent on every
    /// channel after `synced` and whenever the set changes, so any replica can show how
    /// many replicas each broker reaches. Sent only by a broker that listed
    /// [`FEATURE_REPLICAS`], to a control that sent [`ToBroker::Replicas`].
    Channels {
        /// Replica ids.
        replicas: Vec<String>,
    },
    /// The broker is draining (SIGTERM or [`ToBroker::Drain`]): it sent `GoAway` to its
    /// sessions and stops once they left. Sent once per channel, only to a control that
    /// listed [`ACCEPTS_DRAINING`].
    Draining,
    /// Keep-alive.
    Ping,
}

/// Encode one frame: 4-byte big-endian length, then the JSON.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if json.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(json.len()));
    }
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Decode the JSON body of one frame (the length already stripped).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// A channel frame that cannot be used: the channel is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("cluster frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not a valid message.
    #[error("malformed cluster frame: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_a_type_tag() {
        let msg = ToBroker::Delta {
            version: 7,
            add: vec![("a".into(), "00".repeat(32))],
            remove: vec!["11".repeat(32)],
            digest: String::new(),
        };
        let frame = encode(&msg).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let text = std::str::from_utf8(&frame[4..]).unwrap();
        assert!(text.starts_with(r#"{"type":"delta""#), "{text}");
        assert_eq!(decode::<ToBroker>(&frame[4..]).unwrap(), msg);
        let up = ToControl::SessionUp(SessionReport {
            appliance: "a".into(),
            session_id: 1,
            fingerprint: "ab".into(),
            connected_at: 1,
            connected_at_ms: 1_500,
            cert_not_after: 2,
            agent_version: "0.1".into(),
            capabilities: vec![],
            transport: "tcp".into(),
        });
        assert_eq!(decode::<ToControl>(&encode(&up).unwrap()[4..]).unwrap(), up);
    }

    #[test]
    fn drain_frames_spell_as_documented() {
        let drain = encode(&ToBroker::Drain).unwrap();
        assert_eq!(&drain[4..], br#"{"type":"drain"}"#);
        assert_eq!(decode::<ToBroker>(&drain[4..]).unwrap(), ToBroker::Drain);
        let draining = encode(&ToControl::Draining).unwrap();
        assert_eq!(&draining[4..], br#"{"type":"draining"}"#);
        assert_eq!(
            decode::<ToControl>(&draining[4..]).unwrap(),
            ToControl::Draining
        );
    }

    #[test]
    fn allowlist_digests_chain_and_old_frames_still_decode() {
        let g = to_hex(&ALLOWLIST_GENESIS_DIGEST);
        let add = vec![("a".to_owned(), "00".repeat(32))];
        let d1 = allowlist_digest_hex(&g, 1, &add, &[]).unwrap();
        assert_eq!(parse_digest(&d1).map(|d| to_hex(&d)), Some(d1.clone()));
        // Another version number, another content or another past: another digest.
        assert_ne!(allowlist_digest_hex(&g, 2, &add, &[]).unwrap(), d1);
        assert_ne!(
            allowlist_digest_hex(&g, 1, &[], &["00".repeat(32)]).unwrap(),
            d1
        );
        assert_ne!(allowlist_digest_hex(&d1, 1, &add, &[]).unwrap(), d1);
        assert_eq!(allowlist_digest_hex("zz", 1, &add, &[]), None);
        // A frame from before the digest decodes with an empty one.
        let old = br#"{"type":"snapshot_end","version":3}"#;
        assert_eq!(
            decode::<ToBroker>(old).unwrap(),
            ToBroker::SnapshotEnd {
                version: 3,
                digest: String::new()
            }
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            decode::<ToControl>(b"{\"type\":\"nope\"}"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<ToBroker>(b"\xff"),
            Err(FrameError::Malformed(_))
        ));
    }
}
