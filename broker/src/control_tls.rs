//! How a control-mode broker decides that the server it reached is its fleet's control,
//! and the rustls client configuration it dials control with.
//!
//! The check itself is the shared [`tether_identity::ServerVerifier`] in its
//! [`ServerRole::Control`] role: the chain to the bundle's root, an explicit `serverAuth`
//! EKU, and exactly one SAN URI, `spiffe://<trust-domain>/control`. The TLS server name is
//! not checked (control may be named by IP or any DNS name).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use tether_identity::verify::VerifierBuildError;
use tether_identity::{ServerRole, ServerVerifier};

use crate::tls::CertStore;

pub use tether_identity::ServerCertError as ControlCertError;

/// Verifies control's certificate: [`ServerVerifier`] expecting control.
pub type ControlVerifier = ServerVerifier;

/// A verifier trusting `ca` for control of `trust_domain`. An empty `ca` is an error.
pub fn control_verifier(
    ca: &[rustls::pki_types::CertificateDer<'_>],
    trust_domain: &str,
) -> Result<ControlVerifier, VerifierBuildError> {
    ServerVerifier::new(ca, trust_domain, ServerRole::Control)
}

/// The client configuration for control: TLS 1.3, [`ControlVerifier`], ALPN `http/1.1`,
/// and the broker's certificate from `cert` when given (mTLS; read at each handshake, so a
/// renewal applies to the next connection).
pub fn client_config(
    verifier: Arc<ControlVerifier>,
    cert: Option<Arc<CertStore>>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(store) => builder.with_client_cert_resolver(store),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
