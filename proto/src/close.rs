//! QUIC application close codes: why a Tether connection ended.
//!
//! Carried in the QUIC `CONNECTION_CLOSE` frame of type 0x1d (application close). A peer
//! that receives a code it does not know treats it as [`CloseCode::Internal`].

use std::fmt;

/// Why a connection was closed. The numeric values are part of the wire protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// Orderly close; the peer may reconnect at will.
    Normal,
    /// The certificate's fingerprint left the allowlist (or the appliance was revoked or
    /// disabled). Reconnecting with the same certificate will be refused.
    Revoked,
    /// A newer session for the same appliance replaced this one.
    Superseded,
    /// The broker is shutting down; reconnect (to another broker) after the delay given in
    /// the preceding `GoAway`.
    Draining,
    /// The peer broke the protocol: malformed, oversized or unexpected frame, or a stream
    /// it was not allowed to open.
    ProtocolError,
    /// No frame arrived for three heartbeat intervals.
    IdleTimeout,
    /// The peer authenticated but is not allowed to hold a session (no appliance
    /// identity, or it was refused after the handshake).
    Unauthorized,
    /// The closing side failed internally; retry with backoff.
    Internal,
}

impl CloseCode {
    /// Every code, in numeric order.
    pub const ALL: [CloseCode; 8] = [
        CloseCode::Normal,
        CloseCode::Revoked,
        CloseCode::Superseded,
        CloseCode::Draining,
        CloseCode::ProtocolError,
        CloseCode::IdleTimeout,
        CloseCode::Unauthorized,
        CloseCode::Internal,
    ];

    /// The numeric QUIC application error code.
    pub const fn code(self) -> u32 {
        match self {
            CloseCode::Normal => 0x00,
            CloseCode::Revoked => 0x01,
            CloseCode::Superseded => 0x02,
            CloseCode::Draining => 0x03,
            CloseCode::ProtocolError => 0x04,
            CloseCode::IdleTimeout => 0x05,
            CloseCode::Unauthorized => 0x06,
            CloseCode::Internal => 0x07,
        }
    }

    /// The code for a numeric value, `None` if unknown.
    pub fn from_code(code: u64) -> Option<CloseCode> {
        CloseCode::ALL
            .into_iter()
            .find(|c| u64::from(c.code()) == code)
    }

    /// A short stable name, used as the reason phrase on the wire and as a metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::Revoked => "revoked",
            CloseCode::Superseded => "superseded",
            CloseCode::Draining => "draining",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::IdleTimeout => "idle_timeout",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Internal => "internal",
        }
    }

    /// Whether an agent should reconnect after a close with this code. After `Revoked` and
    /// `Unauthorized` it still may (a renewed certificate can be admitted), but with a long
    /// backoff; the caller decides that from [`CloseCode::is_refusal`].
    pub const fn is_refusal(self) -> bool {
        matches!(self, CloseCode::Revoked | CloseCode::Unauthorized)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        for (i, c) in CloseCode::ALL.into_iter().enumerate() {
            assert_eq!(c.code() as usize, i);
            assert_eq!(CloseCode::from_code(u64::from(c.code())), Some(c));
        }
        assert_eq!(CloseCode::from_code(0xff), None);
    }
}
