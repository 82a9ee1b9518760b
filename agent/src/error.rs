//! Errors of connecting and of running the agent. Credential and configuration errors live
//! next to their types ([`crate::CredentialError`], [`crate::ConfigError`]).

use thiserror::Error;

use crate::config::ConfigError;
use crate::credentials::CredentialError;
use crate::event::DisconnectReason;

/// Why a connection attempt produced no QUIC connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The broker address did not resolve. Retry later: DNS may recover.
    #[error("cannot resolve broker {host}: {reason}")]
    Resolve {
        /// The `HOST:PORT` string.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// The endpoint could not start the connection (stopped endpoint, invalid server
    /// name, unsupported address). A local problem; retrying cannot help.
    #[error("cannot start connection: {0}")]
    Endpoint(#[from] quinn::ConnectError),
    /// The handshake did not complete within `connect_timeout`. Retry with backoff.
    #[error("handshake timed out")]
    Timeout,
    /// The handshake failed; the reason says whether the broker refused us.
    #[error("handshake failed: {0}")]
    Handshake(DisconnectReason),
    /// Shutdown was requested during the attempt.
    #[error("shutdown requested")]
    Shutdown,
}

impl ConnectError {
    /// The reason to log and report for this failed attempt.
    pub fn reason(&self) -> DisconnectReason {
        match self {
            ConnectError::Resolve { reason, .. } => DisconnectReason::Resolve(reason.clone()),
            ConnectError::Endpoint(e) => DisconnectReason::Transport(e.to_string()),
            ConnectError::Timeout => DisconnectReason::TimedOut,
            ConnectError::Handshake(r) => r.clone(),
            ConnectError::Shutdown => DisconnectReason::Local(tether_proto::CloseCode::Normal),
        }
    }

    /// Whether retrying cannot help (the local endpoint is unusable).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ConnectError::Endpoint(
                quinn::ConnectError::EndpointStopping | quinn::ConnectError::CidsExhausted
            )
        )
    }
}

/// Why the agent could not be built or stopped running on its own.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The credentials cannot be used.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// No broker address was given.
    #[error("no broker to connect to")]
    NoBrokers,
    /// A broker address is not `HOST:PORT`.
    #[error("invalid broker address {0:?}: expected HOST:PORT")]
    InvalidBroker(String),
    /// The QUIC endpoint stopped; the agent cannot connect any more.
    #[error("quic endpoint unusable: {0}")]
    Endpoint(ConnectError),
}
