//! [`ServerVerifier`]: how a Tether client decides that the server it reached is its
//! fleet's broker (the agent) or its fleet's control (a broker, the CLI).
//!
//! Brokers and control are addressed by IP or by any DNS name, so the TLS server name is
//! **not** checked. Instead the server must present a certificate that
//!
//! 1. is a well-formed X.509 end-entity certificate,
//! 2. chains (through the intermediates it sent) to one of the pinned CA certificates, with
//!    every certificate valid at the handshake time and the leaf allowed for server
//!    authentication (webpki's path building and EKU check),
//! 3. explicitly carries the `serverAuth` extended key usage (webpki accepts a leaf with no
//!    EKU extension at all; we do not),
//! 4. carries exactly one SAN URI, read by [`crate::cert::spiffe_id`]: a SPIFFE id of the
//!    pinned trust domain naming the expected [`ServerRole`] (`spiffe://<td>/broker/<name>`
//!    or `spiffe://<td>/control`).
//!
//! The handshake signature is then checked with ring's algorithms (TLS 1.3 only). The
//! verifier holds no clock: rustls passes the handshake time in.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;

use crate::cert::{IdentityError, SanError};
use crate::name::{NameError, TrustDomain};
use crate::spiffe::{Kind, Subject};

/// Which server a [`ServerVerifier`] expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRole {
    /// A broker of the fleet: `spiffe://<td>/broker/<name>`, any name.
    Broker,
    /// The fleet's control: `spiffe://<td>/control`.
    Control,
}

impl ServerRole {
    fn kind(self) -> Kind {
        match self {
            ServerRole::Broker => Kind::Broker,
            ServerRole::Control => Kind::Control,
        }
    }
}

/// Why a server certificate was refused. The server (or whoever answered in its place) is
/// at fault; retrying the same server fails the same way until it is re-provisioned.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ServerCertError {
    /// The chain does not verify: unknown CA, expired, not yet valid, wrong key usage, bad
    /// signature, malformed. Carries rustls' error, which picks the TLS alert.
    #[error("server certificate chain refused: {0}")]
    Chain(rustls::Error),
    /// The leaf has no extended key usage extension, or it lacks `serverAuth`.
    #[error("server certificate lacks the serverAuth extended key usage")]
    MissingServerAuth,
    /// The leaf carries more than one SAN URI; exactly one is allowed.
    #[error("server certificate has {0} SAN URIs, exactly one is allowed")]
    MultipleSanUris(usize),
    /// The leaf's SAN URI (or its absence) names no identity of the expected role.
    #[error("server certificate does not name a {expected} of this fleet ({found})")]
    WrongIdentity {
        /// The role expected.
        expected: Kind,
        /// What the certificate carries instead.
        found: String,
    },
    /// The leaf names the expected role in another trust domain.
    #[error("{kind} certificate is for trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// The pinned trust domain.
        expected: String,
        /// The certificate's.
        found: String,
        /// The kind it names.
        kind: Kind,
    },
}

impl From<ServerCertError> for rustls::Error {
    fn from(e: ServerCertError) -> Self {
        match e {
            ServerCertError::Chain(error) => error,
            ServerCertError::MissingServerAuth => {
                rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose)
            }
            // The certificate is sound but not for the identity we need: `bad_certificate`.
            ServerCertError::MultipleSanUris(_)
            | ServerCertError::WrongIdentity { .. }
            | ServerCertError::WrongTrustDomain { .. } => {
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            }
        }
    }
}

/// Why a [`ServerVerifier`] could not be built.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum VerifierBuildError {
    /// No CA certificate to pin: refusing, rather than trusting nothing or everything.
    #[error("no CA certificate to trust")]
    NoCa,
    /// A CA certificate cannot be a trust anchor.
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
    /// The trust domain breaks its rule.
    #[error(transparent)]
    TrustDomain(NameError),
}

/// Proof that a certificate passed [`ServerVerifier::verify`]; only the verifier builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedServer {
    trust_domain: TrustDomain,
    subject: Subject,
}

impl VerifiedServer {
    /// The broker's name; `None` for control.
    pub fn name(&self) -> Option<&str> {
        self.subject.name()
    }

    /// Its trust domain (the pinned one).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Who it is.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }
}

/// Verifies a broker's or control's certificate (see the module documentation).
#[derive(Debug)]
pub struct ServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    role: ServerRole,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerVerifier {
    /// A verifier trusting `ca` for servers of `role` in `trust_domain`. An empty `ca`, a
    /// CA certificate that cannot be an anchor, or an invalid trust domain is an error.
    pub fn new(
        ca: &[CertificateDer<'_>],
        trust_domain: &str,
        role: ServerRole,
    ) -> Result<ServerVerifier, VerifierBuildError> {
        let trust_domain =
            TrustDomain::new(trust_domain).map_err(VerifierBuildError::TrustDomain)?;
        if ca.is_empty() {
            return Err(VerifierBuildError::NoCa);
        }
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c.clone().into_owned())
                .map_err(|e| VerifierBuildError::InvalidCa(e.to_string()))?;
        }
        Ok(ServerVerifier {
            roots: Arc::new(roots),
            trust_domain,
            role,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// The pinned trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The role expected.
    pub fn role(&self) -> ServerRole {
        self.role
    }

    /// Steps 1–4 of the module documentation, at time `now`.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedServer, ServerCertError> {
        let role = self.role;
        let chain = ServerCertError::Chain;
        // 1. Parse the leaf for webpki (refuses malformed DER and non-end-entity shapes).
        let parsed = ParsedCertificate::try_from(end_entity).map_err(chain)?;

        // 2. Chain to a pinned CA, validity at `now`, EKU serverAuth if an EKU is present.
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(chain)?;

        // webpki accepted the DER, so x509-parser failing here would be a parser
        // disagreement; refuse rather than trust.
        let bad_encoding = || {
            chain(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ))
        };
        let (_, cert) =
            x509_parser::parse_x509_certificate(end_entity).map_err(|_| bad_encoding())?;

        // 3. An explicit serverAuth EKU.
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.server_auth => {}
            _ => return Err(ServerCertError::MissingServerAuth),
        }

        // 4. Exactly one SAN URI, naming the expected role in our trust domain.
        let expected = role.kind();
        let id = crate::cert::spiffe_id(&cert, &self.trust_domain).map_err(|e| match e {
            IdentityError::San(SanError::Malformed) => bad_encoding(),
            IdentityError::San(SanError::MultipleUris(n)) => ServerCertError::MultipleSanUris(n),
            IdentityError::San(e) => ServerCertError::WrongIdentity {
                expected,
                found: e.to_string(),
            },
            IdentityError::NotSpiffe(e) => ServerCertError::WrongIdentity {
                expected,
                found: e.to_string(),
            },
            IdentityError::WrongTrustDomain {
                expected: want,
                found,
                kind,
            } if kind == expected => ServerCertError::WrongTrustDomain {
                expected: want,
                found,
                kind,
            },
            IdentityError::WrongTrustDomain { found, kind, .. } => ServerCertError::WrongIdentity {
                expected,
                found: format!("an identity of kind {kind} in trust domain {found}"),
            },
        })?;
        if id.kind() != expected {
            return Err(ServerCertError::WrongIdentity {
                expected,
                found: format!("an identity of kind {}", id.kind()),
            });
        }
        Ok(VerifiedServer {
            trust_domain: self.trust_domain.clone(),
            subject: id.to_owned().subject,
        })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Deliberately ignored: servers are identified by their SPIFFE URI, not by the name
        // or address the client dialled.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.verify(end_entity, intermediates, now) {
            Ok(server) => {
                tracing::debug!(role = ?self.role, name = server.name(), "server certificate verified");
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => {
                tracing::warn!(role = ?self.role, error = %e, "refusing server certificate");
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
        // Tether clients only offer TLS 1.3 (QUIC requires it; the control client too).
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
