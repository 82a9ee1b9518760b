//! How a control-mode broker decides that the server it reached is its fleet's control,
//! and the rustls client configuration it dials control with.
//!
//! The control URL may name control by IP or any DNS name, so the TLS server name is **not**
//! checked (as the agent does for brokers). Instead control must present a certificate that
//! chains to the root CA of the broker's bundle (webpki path building, validity at the
//! handshake time, serverAuth), carries an explicit `serverAuth` EKU, and carries exactly
//! one SAN URI, `spiffe://<trust-domain>/control`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use x509_parser::extensions::GeneralName;

use crate::tls::CertStore;

/// Why control's certificate was refused. Whoever answered at the control URL is not our
/// control; retrying will fail the same way until one side is re-provisioned.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ControlCertError {
    /// The chain does not verify to the bundle's root (unknown CA, expired, malformed...).
    #[error("control certificate chain refused: {0}")]
    Chain(rustls::Error),
    /// The leaf lacks the `serverAuth` extended key usage.
    #[error("control certificate lacks the serverAuth extended key usage")]
    MissingServerAuth,
    /// The leaf's SAN URIs are not exactly `spiffe://<td>/control`.
    #[error("control certificate does not name spiffe://{expected}/control (found {found:?})")]
    NotControl {
        /// Our trust domain.
        expected: String,
        /// The SAN URIs found.
        found: Vec<String>,
    },
}

impl From<ControlCertError> for rustls::Error {
    fn from(e: ControlCertError) -> Self {
        match e {
            ControlCertError::Chain(e) => e,
            ControlCertError::MissingServerAuth => {
                rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose)
            }
            ControlCertError::NotControl { .. } => {
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            }
        }
    }
}

/// A trust store with no certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no usable root CA certificate: {0}")]
pub struct NoRoots(pub String);

/// Verifies control's certificate (see the module documentation).
#[derive(Debug)]
pub struct ControlVerifier {
    roots: Arc<RootCertStore>,
    expected_uri: String,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ControlVerifier {
    /// A verifier trusting `ca` for control of `trust_domain`. An empty `ca` is an error.
    pub fn new(ca: &[CertificateDer<'_>], trust_domain: &str) -> Result<ControlVerifier, NoRoots> {
        if ca.is_empty() {
            return Err(NoRoots("the CA bundle is empty".into()));
        }
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c.clone().into_owned())
                .map_err(|e| NoRoots(e.to_string()))?;
        }
        Ok(ControlVerifier {
            roots: Arc::new(roots),
            expected_uri: format!("spiffe://{trust_domain}/control"),
            trust_domain: trust_domain.to_owned(),
            algorithms: crate::tls::provider().signature_verification_algorithms,
        })
    }

    /// Check `end_entity` at `now`.
    pub fn verify_control(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), ControlCertError> {
        let parsed = ParsedCertificate::try_from(end_entity).map_err(ControlCertError::Chain)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(ControlCertError::Chain)?;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| {
            ControlCertError::Chain(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ))
        })?;
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.server_auth => {}
            _ => return Err(ControlCertError::MissingServerAuth),
        }
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if uris.len() == 1 && uris[0] == self.expected_uri {
            Ok(())
        } else {
            Err(ControlCertError::NotControl {
                expected: self.trust_domain.clone(),
                found: uris,
            })
        }
    }
}

impl ServerCertVerifier for ControlVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Deliberately ignored: control is identified by its SPIFFE URI.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.verify_control(end_entity, intermediates, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                tracing::warn!(error = %e, "refusing control's certificate");
                Err(e.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client configuration only offers TLS 1.3.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
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
