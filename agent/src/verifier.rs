//! [`BrokerVerifier`]: how the agent decides that the server it reached is a Tether broker
//! of its own fleet.
//!
//! The agent addresses brokers by IP or by any DNS name, so the TLS server name is **not**
//! checked. Instead a broker must present a certificate that
//!
//! 1. is a well-formed X.509 end-entity certificate,
//! 2. chains (through the intermediates it sent) to one of the CA certificates pinned in
//!    the agent's state directory, with every certificate valid at the handshake time and
//!    the leaf allowed for server authentication (webpki's path building and EKU check),
//! 3. explicitly carries the `serverAuth` extended key usage (webpki accepts a leaf with no
//!    EKU extension at all; we do not),
//! 4. carries a SAN URI `spiffe://<trust-domain>/broker/<name>` whose trust domain equals
//!    the one in the agent's own certificate.
//!
//! The handshake signature is then checked with the ring provider's algorithms (TLS 1.3
//! only). The verifier holds no clock: rustls passes the handshake time in.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use x509_parser::extensions::GeneralName;

use crate::credentials::CredentialError;
use crate::spiffe::{SpiffeId, ROLE_BROKER};

/// Why a broker certificate was refused. The broker (or whoever answered in its place) is
/// at fault; retrying the same broker will fail the same way until it is re-provisioned.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum BrokerCertError {
    /// The chain does not verify: unknown CA, expired, not yet valid, wrong key usage, bad
    /// signature, malformed. Carries rustls' error, which picks the TLS alert.
    #[error("broker certificate chain refused: {0}")]
    Chain(rustls::Error),
    /// The leaf has no extended key usage extension, or it lacks `serverAuth`.
    #[error("broker certificate lacks the serverAuth extended key usage")]
    MissingServerAuth,
    /// The leaf has no SAN URI of the form `spiffe://<td>/broker/<name>`.
    #[error("broker certificate has no spiffe broker identity")]
    NoBrokerIdentity,
    /// The leaf carries more than one SAN URI; exactly one is allowed.
    #[error("broker certificate has {0} SAN URIs, exactly one is allowed")]
    MultipleSanUris(usize),
    /// The leaf names a broker of another trust domain.
    #[error("broker certificate is for trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// The agent's trust domain.
        expected: String,
        /// The broker's.
        found: String,
    },
}

impl From<BrokerCertError> for rustls::Error {
    fn from(e: BrokerCertError) -> Self {
        match e {
            BrokerCertError::Chain(e) => e,
            // The certificate is sound but not for the identity we need: `bad_certificate`.
            BrokerCertError::MissingServerAuth => {
                rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose)
            }
            BrokerCertError::NoBrokerIdentity
            | BrokerCertError::MultipleSanUris(_)
            | BrokerCertError::WrongTrustDomain { .. } => {
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            }
        }
    }
}

/// Proof that a certificate passed [`BrokerVerifier::verify_broker`]; only the verifier
/// builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBroker {
    name: String,
    trust_domain: String,
}

impl VerifiedBroker {
    /// The broker name from its SAN URI.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its trust domain (equal to the agent's).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// Verifies broker certificates against pinned CAs and the agent's trust domain.
#[derive(Debug)]
pub struct BrokerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl BrokerVerifier {
    /// A verifier trusting `ca_certs` for brokers of `trust_domain`.
    ///
    /// An empty `ca_certs` is an error ([`CredentialError::NoCaCertificate`]), as is a CA
    /// certificate that cannot be a trust anchor.
    pub fn new(
        ca_certs: &[CertificateDer<'_>],
        trust_domain: &str,
    ) -> Result<BrokerVerifier, CredentialError> {
        if ca_certs.is_empty() {
            return Err(CredentialError::NoCaCertificate);
        }
        let mut roots = RootCertStore::empty();
        for ca in ca_certs {
            roots
                .add(ca.clone().into_owned())
                .map_err(|e| CredentialError::InvalidCaCertificate(e.to_string()))?;
        }
        Ok(BrokerVerifier {
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_owned(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// Steps 1–4 of the module documentation, at time `now`.
    pub fn verify_broker(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedBroker, BrokerCertError> {
        // 1. Parse the leaf for webpki (refuses malformed DER and non-end-entity shapes).
        let parsed = ParsedCertificate::try_from(end_entity).map_err(BrokerCertError::Chain)?;

        // 2. Chain to a pinned CA, validity at `now`, EKU serverAuth if an EKU is present.
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(BrokerCertError::Chain)?;

        // webpki accepted the DER, so x509-parser failing here would be a parser
        // disagreement; refuse rather than trust.
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| {
            BrokerCertError::Chain(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ))
        })?;

        // 3. An explicit serverAuth EKU.
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.server_auth => {}
            _ => return Err(BrokerCertError::MissingServerAuth),
        }

        // 4. Exactly one SAN URI (as SPIFFE requires, and as the broker requires of
        //    appliances), and it is a broker of our trust domain.
        let san = cert
            .subject_alternative_name()
            .map_err(|_| BrokerCertError::NoBrokerIdentity)?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|s| s.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        if uris.len() > 1 {
            return Err(BrokerCertError::MultipleSanUris(uris.len()));
        }
        let mut other_domain = None;
        for uri in uris {
            let Some(id) = SpiffeId::parse(uri) else {
                continue;
            };
            if id.role != ROLE_BROKER {
                continue;
            }
            if id.trust_domain == self.trust_domain {
                return Ok(VerifiedBroker {
                    name: id.name.to_owned(),
                    trust_domain: id.trust_domain.to_owned(),
                });
            }
            other_domain.get_or_insert_with(|| id.trust_domain.to_owned());
        }
        Err(match other_domain {
            Some(found) => BrokerCertError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found,
            },
            None => BrokerCertError::NoBrokerIdentity,
        })
    }
}

impl ServerCertVerifier for BrokerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Deliberately ignored: brokers are identified by their SPIFFE URI, not by the
        // name or address the agent dialled.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.verify_broker(end_entity, intermediates, now) {
            Ok(broker) => {
                tracing::debug!(broker = broker.name(), "broker certificate verified");
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => {
                tracing::warn!(error = %e, "refusing broker certificate");
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
        // The client configuration only offers TLS 1.3 (QUIC requires it).
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
