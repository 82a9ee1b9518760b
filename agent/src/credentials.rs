//! The appliance's credentials: its certificate chain and private key, and the CA it pins
//! for brokers. Loaded from the state directory, checked once, then shared read-only.
//!
//! Files in the state directory:
//!
//! - [`KEY_FILE`]: the private key, PEM, PKCS#8 or SEC1 (EC) or PKCS#1 (RSA); P-256 /
//!   P-384 ECDSA, Ed25519 and RSA keys are accepted.
//! - [`CERT_FILE`]: the appliance's leaf certificate, then its chain.
//! - [`CA_FILE`]: one or more CA certificates a broker certificate must chain to.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use tether_identity::cert::SanError;
use tether_identity::{Kind, SpiffeRef};

/// File name of the private key in the state directory.
pub const KEY_FILE: &str = "client.key.pem";
/// File name of the certificate chain (leaf first) in the state directory.
pub const CERT_FILE: &str = "client.cert.pem";
/// File name of the pinned CA certificate(s) in the state directory.
pub const CA_FILE: &str = "ca.cert.pem";

/// Why credentials could not be loaded or used. Each is a local provisioning problem:
/// retrying without fixing the files cannot help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A credential file could not be read.
    #[error("cannot read {}: {kind}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        kind: io::ErrorKind,
    },
    /// A file is not valid PEM.
    #[error("{file} is not valid pem")]
    InvalidPem {
        /// Which file (`certificate`, `key` or `ca`).
        file: &'static str,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in the certificate file")]
    NoCertificate,
    /// The key file holds no private key.
    #[error("no private key in the key file")]
    NoPrivateKey,
    /// The key is of a type the crypto provider cannot sign with.
    #[error("unsupported private key: {0}")]
    UnsupportedKey(String),
    /// The private key does not belong to the leaf certificate.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// The leaf certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// The leaf carries no `spiffe://<td>/appliance/<id>` SAN URI.
    #[error("certificate has no spiffe appliance identity")]
    NoApplianceIdentity,
    /// The leaf carries more than one SAN URI.
    #[error("certificate has more than one SAN URI")]
    AmbiguousIdentity,
    /// The CA file holds no certificate: an empty trust store would trust nothing (or,
    /// worse, be mistaken for "trust anything").
    #[error("no ca certificate to pin")]
    NoCaCertificate,
    /// A CA certificate could not be used as a trust anchor.
    #[error("invalid ca certificate: {0}")]
    InvalidCaCertificate(String),
    /// The TLS configuration could not be built from these credentials.
    #[error("tls configuration: {0}")]
    Tls(String),
}

/// An appliance's identity and keys. Cheap to clone (the key is shared).
#[derive(Clone)]
pub struct Credentials {
    appliance_id: String,
    trust_domain: String,
    certified_key: Arc<CertifiedKey>,
    ca_certs: Arc<[CertificateDer<'static>]>,
    not_before_ms: i64,
    not_after_ms: i64,
    fingerprint: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            appliance_id,
            trust_domain,
            certified_key,
            ca_certs,
            not_before_ms,
            not_after_ms,
            fingerprint,
        } = self;
        f.debug_struct("Credentials")
            .field("appliance_id", appliance_id)
            .field("trust_domain", trust_domain)
            .field("chain_len", &certified_key.cert.len())
            .field("key", &"<redacted>")
            .field("ca_certs", &ca_certs.len())
            .field("not_before_ms", not_before_ms)
            .field("not_after_ms", not_after_ms)
            .field("fingerprint", fingerprint)
            .finish()
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(&path).map_err(|e| CredentialError::Read {
        path,
        kind: e.kind(),
    })
}

fn parse_certs(
    pem: &[u8],
    file: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CredentialError::InvalidPem { file })
}

impl Credentials {
    /// Load [`CERT_FILE`], [`KEY_FILE`] and [`CA_FILE`] from `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Credentials, CredentialError> {
        let cert = read(state_dir.join(CERT_FILE))?;
        let key = read(state_dir.join(KEY_FILE))?;
        let ca = read(state_dir.join(CA_FILE))?;
        Credentials::from_pem(&cert, &key, &ca)
    }

    /// Build credentials from PEM bytes: chain (leaf first), private key, pinned CA(s).
    pub fn from_pem(
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        ca_pem: &[u8],
    ) -> Result<Credentials, CredentialError> {
        let chain = parse_certs(cert_chain_pem, "certificate")?;
        if chain.is_empty() {
            return Err(CredentialError::NoCertificate);
        }
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|_| CredentialError::InvalidPem { file: "key" })?
            .ok_or(CredentialError::NoPrivateKey)?;
        let ca_certs = parse_certs(ca_pem, "ca")?;
        if ca_certs.is_empty() {
            return Err(CredentialError::NoCaCertificate);
        }
        Credentials::from_der(chain, key, ca_certs)
    }

    /// Build credentials from DER values (used by simulators that mint certificates in
    /// memory).
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca_certs: Vec<CertificateDer<'static>>,
    ) -> Result<Credentials, CredentialError> {
        let leaf = chain.first().ok_or(CredentialError::NoCertificate)?;
        if ca_certs.is_empty() {
            return Err(CredentialError::NoCaCertificate);
        }
        let (appliance_id, trust_domain, not_before_ms, not_after_ms) = appliance_identity(leaf)?;
        let fingerprint = tether_identity::Fingerprint::of(leaf).to_hex();

        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CredentialError::UnsupportedKey(e.to_string()))?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        match certified_key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(CredentialError::KeyMismatch)
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(CredentialError::InvalidCertificate(e.to_string())),
        }
        // Fail now, not at the first handshake, if a CA cannot be a trust anchor.
        crate::verifier::broker_verifier(&ca_certs, &trust_domain)?;

        Ok(Credentials {
            appliance_id,
            trust_domain,
            certified_key: Arc::new(certified_key),
            ca_certs: ca_certs.into(),
            not_before_ms,
            not_after_ms,
            fingerprint,
        })
    }

    /// The appliance id from the certificate's SAN URI.
    pub fn appliance_id(&self) -> &str {
        &self.appliance_id
    }

    /// The trust domain from the certificate's SAN URI; brokers must be in the same one.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `notBefore` of the leaf certificate, ms since the Unix epoch.
    pub fn not_before_ms(&self) -> i64 {
        self.not_before_ms
    }

    /// `notAfter` of the leaf, Unix milliseconds.
    pub fn not_after_ms(&self) -> i64 {
        self.not_after_ms
    }

    /// SHA-256 of the leaf certificate's DER, lowercase hex: the allowlist key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    /// The pinned CA certificates.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    /// The chain and signing key, for the TLS client configuration.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified_key.clone()
    }

    /// What heartbeats report about this certificate at `now_ms`.
    pub fn trust_state(&self, now_ms: i64) -> tether_proto::TrustState {
        const DAY_MS: i64 = 24 * 60 * 60 * 1000;
        let left = self.not_after_ms.saturating_sub(now_ms);
        if left < DAY_MS {
            tether_proto::TrustState::RenewalDue
        } else if left < 3 * DAY_MS {
            tether_proto::TrustState::RenewalRecommended
        } else {
            tether_proto::TrustState::Trusted
        }
    }
}

/// Parse the leaf: its single `spiffe://<td>/appliance/<id>` URI and its `notAfter`.
/// The appliance id, trust domain, notBefore and notAfter (ms) of a leaf.
type Identity = (String, String, i64, i64);

fn appliance_identity(leaf: &CertificateDer<'_>) -> Result<Identity, CredentialError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| CredentialError::InvalidCertificate(e.to_string()))?;
    // The same rule the broker applies: exactly one SAN URI, an appliance SPIFFE id.
    let uri = tether_identity::cert::single_san_uri(&cert).map_err(|e| match e {
        SanError::MultipleUris(_) => CredentialError::AmbiguousIdentity,
        SanError::NoUri => CredentialError::NoApplianceIdentity,
        other => CredentialError::InvalidCertificate(other.to_string()),
    })?;
    let id = SpiffeRef::parse(uri).map_err(|_| CredentialError::NoApplianceIdentity)?;
    if id.kind() != Kind::Appliance {
        return Err(CredentialError::NoApplianceIdentity);
    }
    let name = id.name().unwrap_or_default().to_owned();
    let td = id.trust_domain().to_owned();
    let not_before_ms = cert.validity().not_before.timestamp().saturating_mul(1000);
    let not_after_ms = cert.validity().not_after.timestamp().saturating_mul(1000);
    Ok((name, td, not_before_ms, not_after_ms))
}
