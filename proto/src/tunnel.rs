//! Break-glass tunnels (capability `tunnel/1`, docs/PROTOCOL.md §12): a customer-approved,
//! time-boxed TCP tunnel from the vendor to one resource the customer declared, through
//! the appliance's existing connection.
//!
//! Two kinds of broker-opened bidirectional stream carry them:
//!
//! - the **session-control stream**: [`TunnelOpen`] →
//!   [`TunnelReady`] (or [`TunnelPlan`]) … [`TunnelEnded`]. It stays open while the
//!   tunnel session lives; the agent ends the session when the broker finishes or resets
//!   it, and says why in `TunnelEnded` when the agent ends it;
//! - one **connection stream** per TCP connection: [`TunnelConnect`] →
//!   [`TunnelConnected`], then raw bytes both ways (half-close is the stream's FIN). The
//!   agent refuses or ends a connection by resetting the stream with a
//!   [`TunnelCloseReason`] code.

use bytes::{Buf, BufMut, Bytes};

use crate::codec::{check_str, get, get_str, put_str, Codec, DecodeError, EncodeError};
use crate::frame::{
    check_len, get_bytes_max, put_bytes, MAX_APPROVAL_LEN, MAX_APPROVAL_SIG_LEN, MAX_MANIFEST_LEN,
    MAX_MESSAGE_LEN, MAX_REQUEST_ID_LEN,
};

/// Longest resource or privilege name (the customer's policy allows 64).
pub const MAX_NAME_LEN: usize = 64;
/// Longest `recipient` (an operator's one-time public key).
pub const MAX_RECIPIENT_LEN: usize = 512;
/// Longest sealed credential carried in [`TunnelReady`].
pub const MAX_SEALED_LEN: usize = 16 * 1024;

u8_enum!(
    /// Why a tunnel connection or session ended: the reset code of a connection stream
    /// (and of the session-control stream), and [`TunnelEnded::reason`].
    TunnelCloseReason, "tunnel close reason" {
        /// The session reached activation + duration (the agent's clock and timer).
        Expired = 1,
        /// This connection carried no byte for `idle_timeout_s`.
        Idle = 2,
        /// The customer's policy no longer allows it (phase, resource or privilege removed).
        Revoked = 3,
        /// The customer ended it on the appliance (`tether-agent session end`).
        CustomerEnded = 4,
        /// The appliance lost its broker (the session-control stream or connection ended).
        Disconnected = 5,
        /// The target did not accept the connection.
        TargetUnreachable = 6,
        /// `max_connections` are open already.
        Limit = 7,
        /// No such active session on this appliance.
        NotActive = 8,
        /// The vendor closed it.
        Closed = 9,
        /// The session was refused before it became active (see `TunnelEnded.code`).
        Refused = 10,
    }
);

impl TunnelCloseReason {
    /// The reason for a wire value.
    pub fn from_code(code: u64) -> Option<TunnelCloseReason> {
        Self::ALL.iter().copied().find(|r| *r as u64 == code)
    }

    /// The reason's name, as the operator sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Idle => "idle",
            Self::Revoked => "revoked",
            Self::CustomerEnded => "customer_ended",
            Self::Disconnected => "disconnected",
            Self::TargetUnreachable => "target_unreachable",
            Self::Limit => "limit",
            Self::NotActive => "not_active",
            Self::Closed => "closed",
            Self::Refused => "refused",
        }
    }
}

impl std::fmt::Display for TunnelCloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Broker → agent, first frame of a session-control stream: open (or plan) a tunnel
/// session. Everything but the names and numbers the agent re-derives from its own
/// policy; the approval decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelOpen {
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
    /// The operator's one-time public key the credential is sealed to (`""`: none).
    pub recipient: String,
    /// The customer's approval document, its exact bytes (empty for a plan).
    pub approval: Bytes,
    /// Its SSHSIG armor.
    pub approval_sig: Bytes,
    /// Answer [`TunnelPlan`] with the document to sign; open nothing.
    pub plan_only: bool,
}

impl Codec for TunnelOpen {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(TunnelOpen {
            request_id: get_str(buf, "request_id", MAX_REQUEST_ID_LEN)?,
            reason: get_str(buf, "reason", MAX_MESSAGE_LEN)?,
            resource: get_str(buf, "resource", MAX_NAME_LEN)?,
            privilege: get_str(buf, "privilege", MAX_NAME_LEN)?,
            duration_s: get(buf, "duration_s")?,
            max_connections: get(buf, "max_connections")?,
            idle_timeout_s: get(buf, "idle_timeout_s")?,
            recipient: get_str(buf, "recipient", MAX_RECIPIENT_LEN)?,
            approval: get_bytes_max(buf, "approval", MAX_APPROVAL_LEN)?,
            approval_sig: get_bytes_max(buf, "approval_sig", MAX_APPROVAL_SIG_LEN)?,
            plan_only: match get::<u8, _>(buf, "plan_only")? {
                0 => false,
                1 => true,
                v => {
                    return Err(DecodeError::InvalidValue {
                        field: "plan_only",
                        value: u64::from(v),
                    })
                }
            },
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        put_str(buf, &self.request_id);
        put_str(buf, &self.reason);
        put_str(buf, &self.resource);
        put_str(buf, &self.privilege);
        buf.put_u32(self.duration_s);
        buf.put_u16(self.max_connections);
        buf.put_u32(self.idle_timeout_s);
        put_str(buf, &self.recipient);
        put_bytes(buf, &self.approval);
        put_bytes(buf, &self.approval_sig);
        buf.put_u8(u8::from(self.plan_only));
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_str(&self.request_id, "request_id", MAX_REQUEST_ID_LEN)?;
        check_str(&self.reason, "reason", MAX_MESSAGE_LEN)?;
        check_str(&self.resource, "resource", MAX_NAME_LEN)?;
        check_str(&self.privilege, "privilege", MAX_NAME_LEN)?;
        check_str(&self.recipient, "recipient", MAX_RECIPIENT_LEN)?;
        check_len(self.approval.len(), "approval", MAX_APPROVAL_LEN)?;
        check_len(
            self.approval_sig.len(),
            "approval_sig",
            MAX_APPROVAL_SIG_LEN,
        )
    }
}

/// Agent → broker on the session-control stream: the session is active.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelReady {
    /// The agent's id for the session (what [`TunnelConnect`] names).
    pub session_id: u64,
    /// When the agent's own timer ends it, ms since the epoch (agent's clock).
    pub expires_at_ms: i64,
    /// The credential sealed to the approval's recipient (empty: none minted).
    pub sealed_credential: Bytes,
}

impl Codec for TunnelReady {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(TunnelReady {
            session_id: get(buf, "session_id")?,
            expires_at_ms: get(buf, "expires_at_ms")?,
            sealed_credential: get_bytes_max(buf, "sealed_credential", MAX_SEALED_LEN)?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u64(self.session_id);
        buf.put_i64(self.expires_at_ms);
        put_bytes(buf, &self.sealed_credential);
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_len(
            self.sealed_credential.len(),
            "sealed_credential",
            MAX_SEALED_LEN,
        )
    }
}

/// Agent → broker on the session-control stream, the answer to `plan_only`: the complete
/// approval document the agent would accept (resource target, phase and credential
/// commands from the customer's policy), for the customer to read and sign. Then FIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelPlan {
    /// The document (canonical JSON bytes).
    pub document: Bytes,
}

impl Codec for TunnelPlan {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(TunnelPlan {
            document: get_bytes_max(buf, "document", MAX_APPROVAL_LEN)?,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        put_bytes(buf, &self.document);
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_len(self.document.len(), "document", MAX_APPROVAL_LEN)
    }
}

/// Agent → broker, last frame on the session-control stream (then FIN): the session
/// ended, or was never opened.
///
/// After an activated session it carries the session manifest the appliance signed
/// (`tether_ops::session`): an optional trailing part, `manifest` then `manifest_sig`
/// (each a `u32` length and bytes), present exactly when `manifest` is not empty. Without
/// it the frame is encoded exactly as before the part existed, so an older decoder reads
/// every frame without a manifest, and a newer one reads older frames as having none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelEnded {
    /// Why.
    pub reason: TunnelCloseReason,
    /// For `refused`: the signed-ops failure name (`approval_invalid`, `denied_by_policy`,
    /// …); else empty.
    pub code: String,
    /// For the operator.
    pub message: String,
    /// The signed session manifest, its exact (canonical JSON) bytes; empty when none
    /// (the session never became active, or it could not be signed or did not fit).
    pub manifest: Bytes,
    /// Its SSHSIG armor (namespace `tether-manifest-v1`); empty exactly when `manifest`
    /// is.
    pub manifest_sig: Bytes,
}

impl Default for TunnelEnded {
    /// `closed`, no code, no message, no manifest.
    fn default() -> Self {
        TunnelEnded {
            reason: TunnelCloseReason::Closed,
            code: String::new(),
            message: String::new(),
            manifest: Bytes::new(),
            manifest_sig: Bytes::new(),
        }
    }
}

impl Codec for TunnelEnded {
    /// `buf` must be exactly the frame body (as [`crate::decode_frame`] passes it): the
    /// optional manifest is read when bytes are left after `message`.
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let reason = TunnelCloseReason::decode(buf)?;
        let code = get_str(buf, "code", MAX_NAME_LEN)?;
        let message = get_str(buf, "message", MAX_MESSAGE_LEN)?;
        let (mut manifest, mut manifest_sig) = (Bytes::new(), Bytes::new());
        if buf.has_remaining() {
            manifest = get_bytes_max(buf, "manifest", MAX_MANIFEST_LEN)?;
            manifest_sig = get_bytes_max(buf, "manifest_sig", MAX_APPROVAL_SIG_LEN)?;
            if manifest.is_empty() || manifest_sig.is_empty() {
                // No manifest is sent as no part: one encoding per frame.
                return Err(DecodeError::InvalidValue {
                    field: "manifest",
                    value: 0,
                });
            }
        }
        Ok(TunnelEnded {
            reason,
            code,
            message,
            manifest,
            manifest_sig,
        })
    }
    fn encode<B: BufMut>(&self, buf: &mut B) {
        self.reason.encode(buf);
        put_str(buf, &self.code);
        put_str(buf, &self.message);
        if !self.manifest.is_empty() {
            put_bytes(buf, &self.manifest);
            put_bytes(buf, &self.manifest_sig);
        }
    }
    fn check(&self) -> Result<(), EncodeError> {
        check_str(&self.code, "code", MAX_NAME_LEN)?;
        check_str(&self.message, "message", MAX_MESSAGE_LEN)?;
        check_len(self.manifest.len(), "manifest", MAX_MANIFEST_LEN)?;
        check_len(
            self.manifest_sig.len(),
            "manifest_sig",
            MAX_APPROVAL_SIG_LEN,
        )?;
        match (self.manifest.is_empty(), self.manifest_sig.is_empty()) {
            // A manifest needs its signature, and a signature without one has no place.
            (false, true) => Err(EncodeError::TooShort {
                field: "manifest_sig",
                len: 0,
                min: 1,
            }),
            (true, false) => Err(EncodeError::TooLong {
                field: "manifest_sig",
                len: self.manifest_sig.len(),
                max: 0,
            }),
            _ => Ok(()),
        }
    }
}

/// Broker → agent, first frame of a connection stream: one TCP connection for session
/// `session_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConnect {
    /// The session ([`TunnelReady::session_id`]).
    pub session_id: u64,
}

/// Broker → agent, first frame of a new stream: end session `session_id` as `closed`
/// (the vendor's close of a session whose session-control stream was lost). The agent
/// answers the session's `TunnelEnded`, with its signed manifest, once the teardown is
/// done (`not_active` when it has no such session, active or recently ended); then FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelClose {
    /// The session ([`TunnelReady::session_id`]).
    pub session_id: u64,
}

/// Agent → broker on a connection stream: the target accepted; raw bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConnected {
    /// The session.
    pub session_id: u64,
}

macro_rules! session_id_frame {
    ($t:ident) => {
        impl Codec for $t {
            fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
                Ok($t {
                    session_id: get(buf, "session_id")?,
                })
            }
            fn encode<B: BufMut>(&self, buf: &mut B) {
                buf.put_u64(self.session_id);
            }
            fn check(&self) -> Result<(), EncodeError> {
                Ok(())
            }
        }
    };
}
session_id_frame!(TunnelConnect);
session_id_frame!(TunnelConnected);
session_id_frame!(TunnelClose);
