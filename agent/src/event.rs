//! What an agent reports while it runs: [`AgentEvent`]s on a broadcast channel, and the
//! [`DisconnectReason`] that classifies how every connection ended.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{ConnectionError, TransportErrorCode};
use tether_proto::{CloseCode, CommandOutcome, GoAwayReason};

/// Something the agent did or observed. Subscribe with [`crate::Agent::events`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// A connection attempt to `broker` started.
    Connecting {
        /// The resolved broker address.
        broker: SocketAddr,
    },
    /// The broker sent `Welcome`: the session is up.
    Connected {
        /// The broker address.
        broker: SocketAddr,
        /// The broker-assigned session id.
        session_id: u64,
    },
    /// A connection (or attempt) ended.
    Disconnected {
        /// The broker address, if resolution got that far.
        broker: Option<SocketAddr>,
        /// Why.
        reason: DisconnectReason,
    },
    /// The broker asked the agent to leave and reconnect elsewhere after a delay.
    GoAway {
        /// The broker address.
        broker: SocketAddr,
        /// Why it asked.
        reason: GoAwayReason,
        /// The delay it asked for.
        reconnect_after: Duration,
    },
    /// The agent waits this long before the next attempt.
    Backoff {
        /// The delay.
        delay: Duration,
        /// Whether this is the long delay after the certificate was refused.
        refused: bool,
    },
    /// A command ended and its result was sent (or could not be).
    CommandFinished {
        /// The command id from the request.
        command_id: u64,
        /// How it ended.
        outcome: CommandOutcome,
    },
    /// The broker relayed an operator's request to renew the certificate now (the
    /// appliance's manual-renewal generation rose to `generation`).
    RenewalRequested {
        /// The new generation.
        generation: u64,
    },
    /// The run loop stopped (shutdown requested).
    Stopped,
}

/// Why a connection ended, as far as the agent can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The broker closed the connection with a Tether close code (unknown codes map to
    /// [`CloseCode::Internal`]).
    Broker(CloseCode),
    /// The agent closed the connection with this code.
    Local(CloseCode),
    /// A TLS alert ended the handshake or the connection.
    TlsAlert {
        /// The TLS alert number (QUIC crypto error code minus 0x100).
        alert: u8,
        /// `true` if the broker sent it (it refused us), `false` if the agent's TLS stack
        /// raised it (typically: the broker's certificate failed verification).
        by_peer: bool,
    },
    /// The server refused the connection at the QUIC level (`CONNECTION_REFUSED`), e.g.
    /// under admission control. Retry with normal backoff.
    ConnectionRefused,
    /// No answer in time: handshake, `Welcome`, or QUIC idle timeout.
    TimedOut,
    /// The broker's name did not resolve, or resolved to nothing.
    Resolve(String),
    /// Any other transport failure, with its text.
    Transport(String),
}

/// TLS alerts by which a server says it will not accept this client certificate.
const REFUSAL_ALERTS: &[u8] = &[
    42,  // bad_certificate
    43,  // unsupported_certificate
    44,  // certificate_revoked
    45,  // certificate_expired
    46,  // certificate_unknown
    48,  // unknown_ca
    49,  // access_denied
    116, // certificate_required
];

impl DisconnectReason {
    /// Classify a quinn connection error. `local` is the code the agent closed with, if it
    /// closed the connection itself.
    pub fn from_connection_error(e: &ConnectionError, local: Option<CloseCode>) -> Self {
        match e {
            ConnectionError::ApplicationClosed(close) => DisconnectReason::Broker(
                CloseCode::from_code(close.error_code.into_inner()).unwrap_or(CloseCode::Internal),
            ),
            ConnectionError::ConnectionClosed(close) => {
                let code = u64::from(close.error_code);
                if let Some(alert) = crypto_alert(code) {
                    DisconnectReason::TlsAlert {
                        alert,
                        by_peer: true,
                    }
                } else if close.error_code == TransportErrorCode::CONNECTION_REFUSED {
                    DisconnectReason::ConnectionRefused
                } else {
                    DisconnectReason::Transport(format!("closed by broker: {close}"))
                }
            }
            ConnectionError::TransportError(te) => match crypto_alert(u64::from(te.code)) {
                Some(alert) => DisconnectReason::TlsAlert {
                    alert,
                    by_peer: false,
                },
                None => DisconnectReason::Transport(te.to_string()),
            },
            ConnectionError::TimedOut => DisconnectReason::TimedOut,
            ConnectionError::LocallyClosed => {
                DisconnectReason::Local(local.unwrap_or(CloseCode::Normal))
            }
            ConnectionError::Reset => DisconnectReason::Transport("reset by broker".into()),
            other => DisconnectReason::Transport(other.to_string()),
        }
    }

    /// Whether the broker refused this appliance's certificate (revoked, unauthorized, or a
    /// certificate-related TLS alert from the broker): reconnecting soon cannot help, so
    /// the agent waits `revoked_backoff`.
    pub fn is_refusal(&self) -> bool {
        match self {
            DisconnectReason::Broker(code) => code.is_refusal(),
            DisconnectReason::TlsAlert {
                alert,
                by_peer: true,
            } => REFUSAL_ALERTS.contains(alert),
            _ => false,
        }
    }
}

fn crypto_alert(code: u64) -> Option<u8> {
    if (0x100..0x200).contains(&code) {
        u8::try_from(code - 0x100).ok()
    } else {
        None
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Broker(code) => write!(f, "closed by broker: {code}"),
            DisconnectReason::Local(code) => write!(f, "closed by agent: {code}"),
            DisconnectReason::TlsAlert { alert, by_peer } => write!(
                f,
                "tls alert {:?} ({alert}) {}",
                rustls::AlertDescription::from(*alert),
                if *by_peer {
                    "sent by broker"
                } else {
                    "raised by agent"
                }
            ),
            DisconnectReason::ConnectionRefused => f.write_str("connection refused by broker"),
            DisconnectReason::TimedOut => f.write_str("timed out"),
            DisconnectReason::Resolve(e) => write!(f, "cannot resolve broker: {e}"),
            DisconnectReason::Transport(e) => write!(f, "transport error: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use quinn::{ApplicationClose, ConnectionClose, VarInt};

    #[test]
    fn classifies_broker_close_codes() {
        let e = ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u32(CloseCode::Revoked.code()),
            reason: Bytes::from_static(b"revoked"),
        });
        let r = DisconnectReason::from_connection_error(&e, None);
        assert_eq!(r, DisconnectReason::Broker(CloseCode::Revoked));
        assert!(r.is_refusal());
        let e = ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u32(0x99),
            reason: Bytes::new(),
        });
        assert_eq!(
            DisconnectReason::from_connection_error(&e, None),
            DisconnectReason::Broker(CloseCode::Internal)
        );
    }

    #[test]
    fn classifies_tls_alerts_and_refused_connections() {
        let e = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(44),
            frame_type: None,
            reason: Bytes::new(),
        });
        let r = DisconnectReason::from_connection_error(&e, None);
        assert_eq!(
            r,
            DisconnectReason::TlsAlert {
                alert: 44,
                by_peer: true
            }
        );
        assert!(r.is_refusal());
        assert!(r.to_string().contains("CertificateRevoked"), "{r}");

        let e = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: Bytes::new(),
        });
        let r = DisconnectReason::from_connection_error(&e, None);
        assert_eq!(r, DisconnectReason::ConnectionRefused);
        assert!(!r.is_refusal());
        assert!(
            !DisconnectReason::from_connection_error(&ConnectionError::TimedOut, None).is_refusal()
        );
    }
}
