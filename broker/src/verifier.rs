//! The client-certificate verifier: who may hold a session, and as which appliance.
//!
//! This is the core of the product's trust. A client certificate is admitted only if all
//! three steps pass, in this order (cheap refusals of foreign certificates come from
//! step 1, and steps 2–3 never run on a certificate we did not issue):
//!
//! 1. **Chain** — the leaf chains to the configured CA bundle (root and intermediate
//!    certificates are trust anchors), is inside its validity window, and is a client
//!    certificate (webpki checks signatures, validity, basic constraints and that an EKU, if
//!    present, allows clientAuth). We then require the EKU extension to be present *and*
//!    to contain clientAuth, and key usage, if present, to allow digitalSignature.
//! 2. **Identity** — exactly one SAN URI, of the form
//!    `spiffe://<trust-domain>/appliance/<id>` with our trust domain and a valid id.
//!    Any other SAN URI, a second URI, or none at all is refused.
//! 3. **Pin** — the SHA-256 of the leaf DER is in the allowlist snapshot **for that
//!    appliance id**: a fingerprint recorded for appliance A never admits a certificate
//!    naming appliance B.
//!
//! Each refusal has a distinct [`Rejection`]: it picks the TLS alert the client sees, the
//! `reason` label of `tether_handshake_rejected_total`, and a structured log line.
//!
//! The only way to obtain a [`VerifiedAppliance`] is [`ApplianceVerifier::identify`] on a
//! connection whose certificate rustls already verified with this verifier; everything
//! that acts for an appliance takes that type.
//!
//! TLS session resumption is disabled on the broker (see `server.rs`): a resumed handshake
//! would skip this verifier, so a revoked certificate could otherwise come back.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

use tether_identity::cert::{IdentityError, SanError};
use tether_identity::{Kind, TrustDomain};

use crate::allowlist::{Allowlist, ApplianceId, Fingerprint};
use crate::metrics::Metrics;

/// Why a client certificate was refused. Each variant is a distinct metrics label.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Rejection {
    /// No client certificate was presented.
    #[error("no client certificate")]
    NoCertificate,
    /// The chain does not lead to the configured CA.
    #[error("certificate not issued by the fleet CA")]
    UnknownIssuer,
    /// A signature in the chain does not verify.
    #[error("bad signature in certificate chain")]
    BadSignature,
    /// `notAfter` has passed.
    #[error("certificate expired")]
    Expired,
    /// `notBefore` is in the future.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// No EKU extension, or one without clientAuth.
    #[error("certificate is not for client authentication (EKU)")]
    WrongEku,
    /// Key usage present but without digitalSignature.
    #[error("certificate key usage does not allow digital signatures")]
    WrongKeyUsage,
    /// The certificate could not be parsed.
    #[error("malformed certificate")]
    BadEncoding,
    /// Any other chain-validation failure.
    #[error("certificate chain invalid: {0}")]
    ChainInvalid(String),
    /// No SAN URI.
    #[error("certificate has no SAN URI")]
    NoSanUri,
    /// More than one SAN URI.
    #[error("certificate has {0} SAN URIs, exactly one is allowed")]
    MultipleSanUris(usize),
    /// The SAN URI is not `spiffe://<td>/appliance/<id>` with a valid id.
    #[error("SAN URI is not an appliance identity")]
    NotAppliance,
    /// The SAN URI names another trust domain.
    #[error("SAN URI is for another trust domain")]
    WrongTrustDomain,
    /// The fingerprint is in no allowlist entry.
    #[error("certificate fingerprint {fingerprint} is not in the allowlist for {appliance}")]
    UnknownFingerprint {
        /// The appliance the certificate names.
        appliance: ApplianceId,
        /// The fingerprint.
        fingerprint: Fingerprint,
    },
    /// The fingerprint was recorded for a different appliance than the certificate names.
    #[error("certificate fingerprint {fingerprint} belongs to another appliance than {appliance}")]
    FingerprintForOtherAppliance {
        /// The appliance the certificate names.
        appliance: ApplianceId,
        /// The fingerprint.
        fingerprint: Fingerprint,
    },
}

impl Rejection {
    /// The stable `reason` label.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_client_certificate",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongEku => "wrong_eku",
            Rejection::WrongKeyUsage => "wrong_key_usage",
            Rejection::BadEncoding => "bad_encoding",
            Rejection::ChainInvalid(_) => "chain_invalid",
            Rejection::NoSanUri => "no_san_uri",
            Rejection::MultipleSanUris(_) => "multiple_san_uris",
            Rejection::NotAppliance => "not_appliance",
            Rejection::WrongTrustDomain => "wrong_trust_domain",
            Rejection::UnknownFingerprint { .. } => "unknown_fingerprint",
            Rejection::FingerprintForOtherAppliance { .. } => "fingerprint_for_other_appliance",
        }
    }

    /// The rustls error, which decides the TLS alert the client receives.
    fn to_tls_error(&self) -> rustls::Error {
        use CertificateError as C;
        let e = match self {
            Rejection::NoCertificate => return rustls::Error::NoCertificatesPresented,
            Rejection::UnknownIssuer => C::UnknownIssuer, // unknown_ca
            Rejection::BadSignature => C::BadSignature,   // decrypt_error
            Rejection::Expired | Rejection::NotYetValid => C::Expired, // certificate_expired
            Rejection::WrongEku | Rejection::WrongKeyUsage => C::InvalidPurpose, // unsupported_certificate
            Rejection::BadEncoding => C::BadEncoding,                            // bad_certificate
            Rejection::ChainInvalid(_) => C::Other(rustls::OtherError(Arc::new(self.clone()))), // certificate_unknown
            Rejection::NoSanUri
            | Rejection::MultipleSanUris(_)
            | Rejection::NotAppliance
            | Rejection::WrongTrustDomain => C::NotValidForName, // bad_certificate
            Rejection::UnknownFingerprint { .. } => C::Revoked, // certificate_revoked
            Rejection::FingerprintForOtherAppliance { .. } => C::ApplicationVerificationFailure, // access_denied
        };
        rustls::Error::InvalidCertificate(e)
    }

    fn from_webpki(e: rustls::Error) -> Rejection {
        use CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => Rejection::UnknownIssuer,
                C::BadSignature => Rejection::BadSignature,
                C::Expired | C::ExpiredContext { .. } => Rejection::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Rejection::NotYetValid,
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => Rejection::WrongEku,
                C::BadEncoding => Rejection::BadEncoding,
                other => Rejection::ChainInvalid(format!("{other:?}")),
            },
            rustls::Error::NoCertificatesPresented => Rejection::NoCertificate,
            other => Rejection::ChainInvalid(other.to_string()),
        }
    }
}

/// Proof that a peer passed all three steps. Only this module can build one.
#[derive(Clone, Debug)]
pub struct VerifiedAppliance {
    appliance: ApplianceId,
    fingerprint: Fingerprint,
    not_after_unix: i64,
}

impl VerifiedAppliance {
    /// The appliance.
    pub fn appliance(&self) -> &ApplianceId {
        &self.appliance
    }
    /// The certificate's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
    /// The certificate's `notAfter`, seconds since the epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }
}

/// Why the verifier could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VerifierError {
    /// The CA bundle holds no certificate.
    #[error("the CA bundle is empty")]
    EmptyCaBundle,
    /// A CA certificate could not be used as a trust anchor.
    #[error("invalid CA certificate: {0}")]
    InvalidCa(rustls::Error),
    /// The trust domain is empty or has characters outside `[a-z0-9.-_]`.
    #[error("invalid trust domain {0:?}")]
    InvalidTrustDomain(String),
    /// webpki refused the configuration.
    #[error("cannot build the certificate verifier: {0}")]
    Build(String),
}

/// The broker's [`ClientCertVerifier`].
#[derive(Debug)]
pub struct ApplianceVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    allowlist: Arc<Allowlist>,
    metrics: Arc<Metrics>,
}

impl ApplianceVerifier {
    /// A verifier for certificates chaining to `ca` (root and intermediates, all trusted as
    /// anchors), naming appliances of `trust_domain`, pinned by `allowlist`.
    pub fn new(
        ca: &[CertificateDer<'static>],
        trust_domain: &str,
        allowlist: Arc<Allowlist>,
        metrics: Arc<Metrics>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<ApplianceVerifier, VerifierError> {
        if ca.is_empty() {
            return Err(VerifierError::EmptyCaBundle);
        }
        let trust_domain = TrustDomain::new(trust_domain)
            .map_err(|_| VerifierError::InvalidTrustDomain(trust_domain.to_owned()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots.add(cert.clone()).map_err(VerifierError::InvalidCa)?;
        }
        let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| VerifierError::Build(e.to_string()))?;
        Ok(ApplianceVerifier {
            chain,
            trust_domain,
            allowlist,
            metrics,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        self.trust_domain.as_str()
    }

    /// Steps 2 and 3 on a leaf whose chain rustls has verified with this verifier
    /// (the handshake's peer certificates). Called once more after the handshake so a
    /// revocation that landed during the handshake still takes effect.
    pub fn identify(&self, leaf: &CertificateDer<'_>) -> Result<VerifiedAppliance, Rejection> {
        let (appliance, not_after_unix) = self.identity(leaf)?;
        let fingerprint = Fingerprint::of(leaf);
        self.pin(appliance, fingerprint, not_after_unix)
    }

    /// Count and log a refusal.
    pub fn record(&self, rejection: &Rejection, remote: Option<std::net::SocketAddr>) {
        self.metrics.reject(rejection.label());
        match remote {
            Some(remote) => {
                tracing::warn!(reason = rejection.label(), %remote, error = %rejection, "client certificate refused")
            }
            None => {
                tracing::warn!(reason = rejection.label(), error = %rejection, "client certificate refused")
            }
        }
    }

    /// Step 2 (and the EKU / key-usage part of step 1).
    fn identity(&self, leaf: &CertificateDer<'_>) -> Result<(ApplianceId, i64), Rejection> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|_| Rejection::BadEncoding)?;
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.client_auth => {}
            Ok(_) => return Err(Rejection::WrongEku),
            Err(_) => return Err(Rejection::BadEncoding),
        }
        match cert.key_usage() {
            Ok(Some(ku)) if !ku.value.digital_signature() => return Err(Rejection::WrongKeyUsage),
            Ok(_) => {}
            Err(_) => return Err(Rejection::BadEncoding),
        }
        // The one SAN URI, read and checked by the shared identity crate.
        let id =
            tether_identity::cert::spiffe_id(&cert, &self.trust_domain).map_err(|e| match e {
                IdentityError::San(SanError::MultipleUris(n)) => Rejection::MultipleSanUris(n),
                IdentityError::San(SanError::NoUri) => Rejection::NoSanUri,
                IdentityError::San(_) => Rejection::BadEncoding,
                IdentityError::WrongTrustDomain {
                    kind: Kind::Appliance,
                    ..
                } => Rejection::WrongTrustDomain,
                _ => Rejection::NotAppliance,
            })?;
        let appliance = id.appliance().ok_or(Rejection::NotAppliance)?;
        Ok((appliance, cert.validity().not_after.timestamp()))
    }

    /// Step 3.
    fn pin(
        &self,
        appliance: ApplianceId,
        fingerprint: Fingerprint,
        not_after_unix: i64,
    ) -> Result<VerifiedAppliance, Rejection> {
        match self.allowlist.snapshot().lookup(&fingerprint) {
            // The allowlist's copy of the id: a session keeps it for its whole life, and
            // sharing it costs no allocation per session.
            Some(owner) if *owner == appliance => Ok(VerifiedAppliance {
                appliance: owner.clone(),
                fingerprint,
                not_after_unix,
            }),
            Some(_) => Err(Rejection::FingerprintForOtherAppliance {
                appliance,
                fingerprint,
            }),
            None => Err(Rejection::UnknownFingerprint {
                appliance,
                fingerprint,
            }),
        }
    }

    /// All three steps. Used by the TLS handshake and by benches.
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedAppliance, Rejection> {
        // Step 1: chain, validity, EKU (webpki).
        self.chain
            .verify_client_cert(leaf, intermediates, now)
            .map_err(Rejection::from_webpki)?;
        // Steps 2 and 3.
        self.identify(leaf)
    }
}

impl ClientCertVerifier for ApplianceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Agents have exactly one certificate; sending CA names only costs bytes.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.verify(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(rejection) => {
                self.record(&rejection, None);
                Err(rejection.to_tls_error())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
