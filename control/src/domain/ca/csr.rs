//! Certificate signing requests: parse, check proof of possession, extract the key.
//!
//! Control takes exactly one thing from a CSR: its public key, and only after the CSR's
//! signature verifies under that key (proof of possession). The subject, the requested
//! extensions and every other attribute are ignored; names come from control's records.
//!
//! The only way to get a [`VerifiedCsr`] is [`verify_csr`], so issuance cannot run on a
//! key whose possession was not proven.

use std::fmt;

use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// Largest CSR accepted, in bytes of PEM text (8 KiB). A P-256 or Ed25519 CSR is well under
/// 1 KiB; anything near this is not one we would sign.
pub const MAX_CSR_PEM_BYTES: usize = 8 * 1024;

/// Why a CSR was refused. The peer's fault in every case: retrying the same CSR cannot
/// help, a new, well-formed one can.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The PEM text is longer than [`MAX_CSR_PEM_BYTES`].
    #[error("certificate signing request is larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    /// Not exactly one PEM `CERTIFICATE REQUEST` holding a DER PKCS#10 request.
    #[error("certificate signing request is malformed")]
    Malformed,
    /// The CSR's signature does not verify under its own public key (no proof of
    /// possession), or its signature algorithm does not fit the key.
    #[error("certificate signing request signature does not verify")]
    BadSignature,
    /// The public key is not ECDSA P-256 or Ed25519; carries the key type found.
    #[error(
        "certificate signing request key type {0} is not allowed (use ECDSA P-256 or Ed25519)"
    )]
    KeyTypeNotAllowed(String),
}

impl CsrError {
    /// Stable machine-readable code, for HTTP 400 bodies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            CsrError::TooLarge => "csr_too_large",
            CsrError::Malformed => "csr_malformed",
            CsrError::BadSignature => "csr_bad_signature",
            CsrError::KeyTypeNotAllowed(_) => "csr_key_type_not_allowed",
        }
    }
}

/// Key types control certifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CsrKeyType {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

impl CsrKeyType {
    /// Short name, e.g. for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CsrKeyType::EcdsaP256 => "ecdsa-p256",
            CsrKeyType::Ed25519 => "ed25519",
        }
    }

    fn rcgen_alg(self) -> &'static SignatureAlgorithm {
        match self {
            CsrKeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            CsrKeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// A CSR whose signature verified under its own public key. Only [`verify_csr`] builds
/// one; it carries nothing from the CSR but the public key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    key_type: CsrKeyType,
    /// The raw public key (the BIT STRING content of the SubjectPublicKeyInfo).
    public_key: Vec<u8>,
}

impl fmt::Debug for VerifiedCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCsr")
            .field("key_type", &self.key_type)
            .field("public_key_len", &self.public_key.len())
            .finish()
    }
}

impl VerifiedCsr {
    /// The key type.
    pub fn key_type(&self) -> CsrKeyType {
        self.key_type
    }

    /// The raw public key: an uncompressed P-256 point (65 bytes) or an Ed25519 key (32).
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// SHA-256 of [`VerifiedCsr::public_key`], lowercase hex: what an idempotent retry of
    /// an enrollment or renewal must present again.
    pub fn key_sha256(&self) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &self.public_key,
        ))
    }
}

impl PublicKeyData for VerifiedCsr {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.key_type.rcgen_alg()
    }
}

/// Parse a PEM CSR, check its size, key type and signature.
pub fn verify_csr(csr_pem: &str) -> Result<VerifiedCsr, CsrError> {
    if csr_pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    let der = pem_to_der(csr_pem)?;
    verify_csr_der(&der)
}

/// As [`verify_csr`], for DER input.
pub fn verify_csr_der(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CsrError::Malformed);
    }
    let spki = &info.subject_pki;
    let key_oid = &spki.algorithm.algorithm;
    let key_type = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(CsrError::Malformed)?;
        if curve != OID_EC_P256 {
            return Err(CsrError::KeyTypeNotAllowed(format!(
                "ecdsa (curve {curve})"
            )));
        }
        CsrKeyType::EcdsaP256
    } else if *key_oid == OID_SIG_ED25519 {
        CsrKeyType::Ed25519
    } else {
        return Err(CsrError::KeyTypeNotAllowed(key_type_name(key_oid)));
    };
    if spki.subject_public_key.unused_bits != 0 {
        return Err(CsrError::Malformed);
    }
    let public_key = spki.subject_public_key.data.to_vec();
    match key_type {
        // Uncompressed point only: that is what a certificate should carry.
        CsrKeyType::EcdsaP256 if public_key.len() != 65 || public_key[0] != 0x04 => {
            return Err(CsrError::Malformed)
        }
        CsrKeyType::Ed25519 if public_key.len() != 32 => return Err(CsrError::Malformed),
        _ => {}
    }

    let sig_oid = &csr.signature_algorithm.algorithm;
    let verify_alg: &'static dyn ring::signature::VerificationAlgorithm = match key_type {
        CsrKeyType::EcdsaP256 if *sig_oid == OID_SIG_ECDSA_WITH_SHA256 => {
            &ring::signature::ECDSA_P256_SHA256_ASN1
        }
        CsrKeyType::EcdsaP256 if *sig_oid == OID_SIG_ECDSA_WITH_SHA384 => {
            &ring::signature::ECDSA_P256_SHA384_ASN1
        }
        CsrKeyType::Ed25519 if *sig_oid == OID_SIG_ED25519 => &ring::signature::ED25519,
        _ => return Err(CsrError::BadSignature),
    };
    if csr.signature_value.unused_bits != 0 {
        return Err(CsrError::BadSignature);
    }
    ring::signature::UnparsedPublicKey::new(verify_alg, &public_key)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(VerifiedCsr {
        key_type,
        public_key,
    })
}

/// Exactly one PEM block labelled `CERTIFICATE REQUEST`. A second one, or a certificate,
/// key or CRL block, is refused; unknown labels and text outside blocks are ignored.
fn pem_to_der(pem: &str) -> Result<Vec<u8>, CsrError> {
    let mut reader = std::io::Cursor::new(pem.as_bytes());
    let mut found = None;
    loop {
        match rustls_pemfile::read_one(&mut reader) {
            Ok(Some(rustls_pemfile::Item::Csr(der))) if found.is_none() => {
                found = Some(der.to_vec())
            }
            Ok(Some(_)) | Err(_) => return Err(CsrError::Malformed),
            Ok(None) => break,
        }
    }
    found.ok_or(CsrError::Malformed)
}

fn key_type_name(oid: &Oid<'_>) -> String {
    if *oid == OID_PKCS1_RSAENCRYPTION {
        "rsa".to_owned()
    } else {
        oid.to_id_string()
    }
}
