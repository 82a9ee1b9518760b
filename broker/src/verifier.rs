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
//!
//! ## Verified intermediates
//!
//! The broker's bundle holds the root; every appliance presents its leaf and the
//! intermediate that issued it, so webpki checks two signatures per handshake: the
//! leaf's by the intermediate and the intermediate's by the root. The second is the same
//! computation on the same bytes for every appliance of the fleet (one ECDSA verification,
//! about an eighth of the broker's CPU per handshake). Once a chain `[leaf, X]` has
//! verified to a root anchor **and X must have been in that path** (the leaf names X's
//! subject as its issuer, and no anchor has that subject, so webpki could not have built
//! any other path), X's signature, constraints and key are known good. Later chains
//! presenting exactly the bytes of X are then checked by a webpki verifier anchored at X
//! (the leaf's signature, validity, EKU and X's name constraints), while X's own validity
//! window, which webpki ignores for anchors, is checked here. Anything else (another
//! intermediate, two of them, X outside its window, a leaf X did not sign) takes the full
//! path, which also names every refusal exactly as before. At most
//! [`MAX_VERIFIED_INTERMEDIATES`] are kept (an intermediate rotation has two live).
//!
//! ## The identity handed from the handshake to the session
//!
//! Steps 2 and 3 run twice per connection: inside the handshake, and again on the
//! certificate rustls verified, once the handshake is done, so a revocation that landed
//! in between still refuses it. Step 2 parses the X.509 leaf, and its answer depends only
//! on the leaf's bytes and our trust domain; so the handshake leaves the answer under the
//! leaf's fingerprint (its SHA-256), and the second run takes it from there instead of
//! parsing again. Step 3, the allowlist, is always asked afresh. Answers whose second run
//! never comes (a handshake that failed after the certificate) are dropped once
//! [`MAX_HANDED_OFF`] wait.

use std::sync::Arc;

use arc_swap::ArcSwap;
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

/// How many verified intermediates [`ApplianceVerifier`] keeps (module docs).
pub const MAX_VERIFIED_INTERMEDIATES: usize = 4;

/// An intermediate that was part of a chain verified to a root anchor (module docs).
#[derive(Debug)]
struct VerifiedIntermediate {
    /// Its exact DER: a chain uses the shortcut only when it presents these bytes.
    der: Vec<u8>,
    /// Its validity window, seconds since the epoch, both ends included (as webpki).
    not_before: u64,
    not_after: u64,
    /// webpki anchored at it.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl VerifiedIntermediate {
    fn covers(&self, presented: &[CertificateDer<'_>], now: UnixTime) -> bool {
        let now = now.as_secs();
        matches!(presented, [x] if x.as_ref() == self.der.as_slice())
            && self.not_before <= now
            && now <= self.not_after
    }
}

/// The broker's [`ClientCertVerifier`].
#[derive(Debug)]
pub struct ApplianceVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    /// Raw subjects of the configured anchors.
    anchor_subjects: Vec<Vec<u8>>,
    /// Intermediates learned from verified chains (module docs), newest last.
    intermediates: ArcSwap<Vec<Arc<VerifiedIntermediate>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    trust_domain: TrustDomain,
    allowlist: Arc<Allowlist>,
    metrics: Arc<Metrics>,
    /// Step 2's answers from handshakes, by leaf fingerprint, for the run after them.
    handed_off: std::sync::Mutex<HandedOff>,
}

type HandedOff = std::collections::HashMap<
    Fingerprint,
    (ApplianceId, i64),
    tether_identity::fingerprint::FingerprintHasher,
>;

/// The most step-2 answers kept for a second run that has not come yet (handshakes
/// in flight are far fewer; the rest failed after the certificate and are dropped).
pub const MAX_HANDED_OFF: usize = 4096;

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
        // Every anchor's subject must be known: one missing could let `learn` keep an
        // intermediate that a chain never went through.
        let anchor_subjects = ca
            .iter()
            .map(|cert| match x509_parser::parse_x509_certificate(cert) {
                Ok((_, cert)) => Ok(cert.tbs_certificate.subject.as_raw().to_vec()),
                Err(_) => Err(VerifierError::InvalidCa(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding,
                ))),
            })
            .collect::<Result<_, _>>()?;
        let chain = webpki_verifier(ca, &provider)?;
        Ok(ApplianceVerifier {
            chain,
            anchor_subjects,
            intermediates: ArcSwap::default(),
            handed_off: std::sync::Mutex::new(HandedOff::with_hasher(Default::default())),
            provider,
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
    /// Step 2's answer is the one the handshake left, if it did (module docs).
    pub fn identify(&self, leaf: &CertificateDer<'_>) -> Result<VerifiedAppliance, Rejection> {
        let fingerprint = Fingerprint::of(leaf);
        let handed_off = self
            .handed_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fingerprint);
        let (appliance, not_after_unix) = match handed_off {
            Some(answer) => answer,
            None => self.identity(leaf)?,
        };
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
        self.verify_chain(leaf, intermediates, now)?;
        // Steps 2 and 3; step 2's answer is left for the run after the handshake.
        let fingerprint = Fingerprint::of(leaf);
        let (appliance, not_after_unix) = self.identity(leaf)?;
        let verified = self.pin(appliance, fingerprint, not_after_unix)?;
        let mut handed_off = self.handed_off.lock().unwrap_or_else(|e| e.into_inner());
        if handed_off.len() >= MAX_HANDED_OFF {
            handed_off.clear();
        }
        handed_off.insert(
            fingerprint,
            (verified.appliance.clone(), verified.not_after_unix),
        );
        Ok(verified)
    }

    /// Step 1, through a verified intermediate when the chain presents one (module docs).
    fn verify_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Rejection> {
        let known = self.intermediates.load();
        if let Some(x) = known.iter().find(|x| x.covers(intermediates, now)) {
            if x.verifier.verify_client_cert(leaf, &[], now).is_ok() {
                return Ok(());
            }
            // A leaf this intermediate did not sign, or an expired one: the full path
            // refuses it too, and names why exactly as it always has.
        }
        self.chain
            .verify_client_cert(leaf, intermediates, now)
            .map_err(Rejection::from_webpki)?;
        if let [presented] = intermediates {
            if !known.iter().any(|x| x.der.as_slice() == presented.as_ref()) {
                self.learn(leaf, presented);
            }
        }
        Ok(())
    }

    /// Keep `presented` as a verified intermediate if the chain `[leaf, presented]` that
    /// webpki just verified must have gone through it (module docs).
    fn learn(&self, leaf: &CertificateDer<'_>, presented: &CertificateDer<'_>) {
        let (Ok((_, leaf)), Ok((_, x))) = (
            x509_parser::parse_x509_certificate(leaf),
            x509_parser::parse_x509_certificate(presented),
        ) else {
            return;
        };
        let subject = x.tbs_certificate.subject.as_raw();
        if leaf.tbs_certificate.issuer.as_raw() != subject
            || self.anchor_subjects.iter().any(|a| a.as_slice() == subject)
        {
            return;
        }
        let validity = x.validity();
        let (Ok(not_before), Ok(not_after)) = (
            u64::try_from(validity.not_before.timestamp()),
            u64::try_from(validity.not_after.timestamp()),
        ) else {
            return;
        };
        let Ok(verifier) = webpki_verifier(&[presented.clone().into_owned()], &self.provider)
        else {
            return;
        };
        let learned = Arc::new(VerifiedIntermediate {
            der: presented.to_vec(),
            not_before,
            not_after,
            verifier,
        });
        self.intermediates.rcu(|known| {
            let mut next: Vec<_> = known
                .iter()
                .filter(|x| x.der != learned.der)
                .cloned()
                .collect();
            next.push(learned.clone());
            let excess = next.len().saturating_sub(MAX_VERIFIED_INTERMEDIATES);
            next.drain(..excess);
            next
        });
        tracing::info!(
            issuer = %x.issuer(),
            subject = %x.subject(),
            "intermediate verified against the root: chains through it now check one signature"
        );
    }

    /// How many verified intermediates are kept (tests).
    pub fn verified_intermediates(&self) -> usize {
        self.intermediates.load().len()
    }
}

/// webpki's client verifier with `anchors` as trust anchors.
fn webpki_verifier(
    anchors: &[CertificateDer<'static>],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, VerifierError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in anchors {
        roots.add(cert.clone()).map_err(VerifierError::InvalidCa)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| VerifierError::Build(e.to_string()))
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
