//! The Tether agent: the appliance side of a Tether connection, as a library (used by the
//! `tether-agent` binary, the broker's tests and the fleet simulator) and a binary.
//!
//! An agent holds one QUIC connection (mutual TLS, ALPN [`tether_proto::ALPN`]) to one
//! broker of a list, drives the session protocol from [`tether_proto`] on it, runs the
//! commands the broker sends, and reconnects with jittered backoff when the connection
//! ends. Many agents can share one tokio runtime and a few QUIC endpoints.
//!
//! # Layout
//!
//! - [`config`]: [`AgentConfig`], every tunable with its default constant, and `validate()`.
//! - [`credentials`]: [`Credentials`] loaded from the state directory (`client.key.pem`,
//!   `client.cert.pem`, `ca.cert.pem`); the appliance id and trust domain come from the
//!   certificate's SPIFFE URI (read by `tether_identity`, the fleet-wide identity rules).
//! - [`verifier`]: [`BrokerVerifier`], the shared `tether_identity::ServerVerifier` set up
//!   to decide whether a server is a broker of our fleet (pinned CA, serverAuth,
//!   `spiffe://<td>/broker/<name>`).
//! - [`tls`]: [`client_config`] (TLS 1.3, ring, small transport) and [`client_endpoint`].
//! - [`session`]: the async driver of one connection ([`connect_once`], [`SessionEnd`]).
//! - [`command`]: [`CommandRunner`], which runs commands and streams their output as frames
//!   into any `AsyncWrite`.
//! - [`enroll`]: first enrollment with control (key made here, CSR, one-time proof) and
//!   crash-safe credential storage.
//! - [`renew`]: renewal over mTLS and unattended re-enrollment with a platform proof.
//! - [`proxy`]: [`ProxyConfig`], egress through an HTTP proxy (`--proxy`, `HTTPS_PROXY`,
//!   `NO_PROXY`): TCP tunnels with `CONNECT`, and the same rules for the HTTPS client.
//! - [`agent`]: [`Agent`], the connect / session / reconnect loop, and [`BrokerAddr`].
//! - Reconnect delays: full-jitter exponential [`Backoff`] from `tether_identity`.
//! - [`event`]: [`AgentEvent`] and [`DisconnectReason`].
//! - [`error`]: [`ConnectError`] and [`AgentError`].
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_agent::{Agent, AgentConfig, Credentials, client_endpoint};
//! let creds = Credentials::load(std::path::Path::new("/var/lib/tether"))?;
//! let endpoint = client_endpoint("0.0.0.0:0".parse()?)?;
//! let agent = Agent::new(AgentConfig::default(), creds, endpoint,
//!     ["192.0.2.10:4433".parse::<std::net::SocketAddr>()?])?;
//! let mut events = agent.events();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(async move { while let Ok(e) = events.recv().await { println!("{e:?}") } });
//! agent.run(shutdown).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod command;
pub mod config;
pub mod credentials;
pub mod enroll;
pub mod error;
pub mod event;
pub mod fault;
pub mod manifest_key;
pub mod proof;
pub mod proxy;
pub mod renew;
pub mod session;
pub mod signed;
pub mod supervisor;
pub mod tls;
pub mod tunnel;
pub mod tunnel_credential;
pub mod verifier;

pub use agent::{Agent, BrokerAddr};
pub use command::CommandRunner;
pub use config::{AgentConfig, ConfigError};
pub use credentials::{CredentialError, Credentials};
pub use error::{AgentError, ConnectError};
pub use event::{AgentEvent, DisconnectReason};
pub use proxy::{ProxyConfig, ProxyError, ProxyUrl};
pub use session::{connect, connect_once, SessionEnd};
pub use tether_identity::Backoff;
pub use tls::{client_config, client_endpoint};
pub use verifier::{broker_verifier, BrokerCertError, BrokerVerifier, VerifiedBroker};
