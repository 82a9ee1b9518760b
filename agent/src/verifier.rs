//! How the agent decides that the server it reached is a Tether broker of its own fleet:
//! the shared [`tether_identity::ServerVerifier`] in its [`ServerRole::Broker`] role,
//! pinned to the CA certificates in the agent's state directory and to the trust domain
//! of the agent's own certificate. See that type for the four checks; the TLS server name
//! is not one of them (brokers are dialled by IP or any DNS name).

use rustls::pki_types::CertificateDer;
use tether_identity::verify::VerifierBuildError;
use tether_identity::{ServerRole, ServerVerifier};

use crate::credentials::CredentialError;

pub use tether_identity::ServerCertError as BrokerCertError;
pub use tether_identity::VerifiedServer as VerifiedBroker;

/// Verifies broker certificates: [`ServerVerifier`] expecting a broker.
pub type BrokerVerifier = ServerVerifier;

/// A verifier trusting `ca_certs` for brokers of `trust_domain`.
///
/// An empty `ca_certs` is an error ([`CredentialError::NoCaCertificate`]), as is a CA
/// certificate that cannot be a trust anchor.
pub fn broker_verifier(
    ca_certs: &[CertificateDer<'_>],
    trust_domain: &str,
) -> Result<BrokerVerifier, CredentialError> {
    ServerVerifier::new(ca_certs, trust_domain, ServerRole::Broker).map_err(|e| match e {
        VerifierBuildError::NoCa => CredentialError::NoCaCertificate,
        other => CredentialError::InvalidCaCertificate(other.to_string()),
    })
}
