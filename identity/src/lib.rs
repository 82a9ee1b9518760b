//! Who is who in a Tether fleet: the one place that defines names, SPIFFE ids,
//! certificate fingerprints and how a server's certificate is checked. No tokio, no
//! sockets; the only I/O is [`fs::write_atomic`], which several processes need the same way.
//!
//! # Design
//!
//! Every process reads identities out of certificates and config files. Before this crate
//! each did so with its own copy of the rules, and the copies drifted: control registered an
//! appliance named `..` that its own CA then refused to certify, and the broker admitted a
//! certificate naming `..` that PROTOCOL.md says is refused. Now there is one rule per kind
//! of name, each behind a type that can only hold a valid value:
//!
//! | type | rule |
//! |---|---|
//! | [`TrustDomain`] | 1–255 bytes of `[a-z0-9._-]` |
//! | [`ApplianceId`], [`BrokerName`], [`OperatorName`] | 1–128 bytes of `[A-Za-z0-9._-]`, never exactly `.` or `..` |
//!
//! (docs/PROTOCOL.md §1.1 states the same rule for third-party implementations; README
//! points there.) A certificate carries **exactly one** SAN URI, and it is a [`SpiffeId`]:
//! `spiffe://<td>/appliance/<id>`, `spiffe://<td>/broker/<name>`,
//! `spiffe://<td>/operator/<name>` or `spiffe://<td>/control`. [`cert::spiffe_id`] is the
//! one function every verifier calls to read it.
//!
//! # Layout
//!
//! - [`name`]: the id types and their single validation rule ([`NameError`] says which
//!   part of the rule a value broke).
//! - [`spiffe`]: [`SpiffeId`] parse and format; [`spiffe::SpiffeRef`] for the handshake's
//!   allocation-free parse.
//! - [`cert`]: the single SAN URI of a certificate, checked against a trust domain.
//! - [`fingerprint`]: [`Fingerprint`], the SHA-256 of a leaf's DER, with its hex form.
//! - [`verify`]: [`ServerVerifier`], how a client (the agent dialling a broker, a broker
//!   dialling control) decides the server it reached is the fleet's broker or control.
//! - [`fs`]: atomic file replacement (temp + fsync + rename + directory fsync).
//! - [`backoff`]: full-jitter exponential backoff for reconnects and retries.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod cert;
pub mod fingerprint;
pub mod fs;
pub mod name;
pub mod spiffe;
pub mod verify;

pub use backoff::Backoff;
pub use cert::{spiffe_id, IdentityError, SanError};
pub use fingerprint::{Fingerprint, FingerprintHasher};
pub use name::{
    ApplianceId, BrokerName, NameError, OperatorName, TrustDomain, MAX_NAME_LEN,
    MAX_TRUST_DOMAIN_LEN,
};
pub use spiffe::{Kind, SpiffeError, SpiffeId, SpiffeRef, Subject};
pub use verify::{ServerCertError, ServerRole, ServerVerifier, VerifiedServer, VerifierBuildError};
