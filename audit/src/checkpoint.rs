//! Signed checkpoints of the audit log: the `seq` and `hash` of an entry, signed by
//! control's own leaf (`spiffe://<td>/control`, ECDSA P-256), so that a log that was cut
//! or rewritten before that entry no longer matches something the database cannot forge.
//!
//! # The signed string (format `tether-audit-checkpoint-v1`)
//!
//! The signature is ECDSA P-256 with SHA-256 (ASN.1 DER, stored as lowercase hex) over
//! these fields, encoded as the entry hash's fields are (see [`crate::hash`]: `int` is 8
//! bytes big-endian two's complement, `str` a 4-byte big-endian length then the UTF-8
//! bytes):
//!
//! | # | field | encoding |
//! |---|-------|----------|
//! | 1 | the text `tether-audit-checkpoint-v1` ([`CHECKPOINT_FORMAT`]) | `str` |
//! | 2 | `seq`: the entry the checkpoint vouches for | `int` |
//! | 3 | `head_hash`: that entry's `hash`, 64 lowercase hex characters | `str` |
//! | 4 | `at`: when it was signed, Unix seconds | `int` |
//!
//! The first field differs from the entry hash's, so no entry hash input is ever a
//! checkpoint input and the reverse.
//!
//! # The signer
//!
//! A checkpoint carries the signer's certificate chain (`signer_chain_pem`: the control
//! leaf, then the intermediate). The control leaf rotates (30 days), so every checkpoint
//! keeps the chain it was signed with. [`CheckpointVerifier`] accepts a checkpoint only if
//! that chain leads to a root the verifier was given (never one taken from the export),
//! every certificate was valid at the checkpoint's `at`, the leaf is for server
//! authentication, carries exactly one SAN URI and it is `spiffe://<td>/control`, and the
//! signature verifies with the leaf's key. An appliance, broker or operator certificate of
//! the same CA cannot sign one.
//!
//! # Writing them
//!
//! [`CheckpointSigner::sign`] signs whatever `seq` and hash it is given. Control's
//! `write_checkpoint` (in `tether-control`, next to the store) signs the log's head only
//! after checking with a [`ChainVerifier`](crate::ChainVerifier) that the entries since
//! the last checkpoint extend it (so control never vouches for a history that does not
//! contain what it vouched for before), and writes nothing when no entry is new.
//! `tether-control serve` calls it every `[audit] checkpoint_every`;
//! `tether-control audit checkpoint` once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::hash::{hex, is_hash, put_str_bytes};

/// The first field of every signed checkpoint string (the format version).
pub const CHECKPOINT_FORMAT: &str = "tether-audit-checkpoint-v1";
/// Most certificates a checkpoint's `signer_chain_pem` may hold.
pub const MAX_SIGNER_CHAIN: usize = 4;
/// Longest `signer_chain_pem`, bytes.
pub const MAX_SIGNER_CHAIN_PEM: usize = 16 * 1024;
/// Longest hex signature (a DER ECDSA P-256 signature is at most 72 bytes).
const MAX_SIGNATURE_HEX: usize = 2 * 80;

/// One signed checkpoint, as stored and exported (`{"checkpoint": {...}}` in an export).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The entry vouched for.
    pub seq: i64,
    /// That entry's `hash`.
    pub head_hash: String,
    /// When it was signed, Unix seconds (the signer's certificates were valid then).
    pub at: i64,
    /// ECDSA P-256 SHA-256 signature over [`checkpoint_message`], ASN.1 DER, lowercase hex.
    pub signature: String,
    /// The signer's certificate, then its intermediate, PEM.
    pub signer_chain_pem: String,
}

/// The bytes a checkpoint's signature covers (see the module docs).
pub fn checkpoint_message(seq: i64, head_hash: &str, at: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + CHECKPOINT_FORMAT.len() + 8 + 4 + 64 + 8);
    put_str_bytes(&mut out, CHECKPOINT_FORMAT);
    out.extend_from_slice(&seq.to_be_bytes());
    put_str_bytes(&mut out, head_hash);
    out.extend_from_slice(&at.to_be_bytes());
    out
}

/// Why a checkpoint could not be signed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key or the chain is unusable (the text never holds key material).
    #[error("checkpoint signer: {0}")]
    Key(String),
    /// The signer's certificate is not valid at the signing time: checkpoints signed now
    /// would never verify. Restart `tether-control serve` (it renews the control leaf).
    #[error("the control certificate is not valid at {at} (valid {not_before}..{not_after}); renew it by restarting serve")]
    NotValid {
        /// The signing time.
        at: i64,
        /// The leaf's notBefore.
        not_before: i64,
        /// The leaf's notAfter.
        not_after: i64,
    },
    /// Signing failed.
    #[error("signing the checkpoint failed")]
    Sign,
    /// The hash to sign is not 64 lowercase hex characters (a bug in the caller).
    #[error("not an audit hash: {0:?}")]
    BadHash(String),
}

/// Signs checkpoints with control's leaf key. `Debug` never shows the key.
pub struct CheckpointSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    chain_pem: String,
    not_before: i64,
    not_after: i64,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("key", &"<redacted>")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// A signer with a PKCS#8 P-256 key (PEM) and the chain to carry (its certificate
    /// first, PEM). The key must match the first certificate.
    pub fn new(key_pem: &str, chain_pem: &str) -> Result<Self, SignError> {
        let key = match rustls_pemfile::private_key(&mut key_pem.as_bytes()) {
            Ok(Some(PrivateKeyDer::Pkcs8(k))) => k,
            _ => return Err(SignError::Key("not a PKCS#8 private key (PEM)".into())),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            key.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|_| SignError::Key("not an ECDSA P-256 key".into()))?;
        let certs = pem_certs(chain_pem).map_err(SignError::Key)?;
        let leaf = certs
            .first()
            .ok_or_else(|| SignError::Key("no certificate in the chain".into()))?;
        let (_, x509) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| SignError::Key(format!("bad certificate: {e}")))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(SignError::Key(
                "the key does not match the certificate".into(),
            ));
        }
        Ok(CheckpointSigner {
            key,
            rng,
            chain_pem: chain_pem.to_owned(),
            not_before: x509.validity().not_before.timestamp(),
            not_after: x509.validity().not_after.timestamp(),
        })
    }

    /// The signer certificate's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// A checkpoint of entry `seq` with hash `head_hash`, signed at `at`.
    pub fn sign(&self, seq: i64, head_hash: &str, at: i64) -> Result<Checkpoint, SignError> {
        if !is_hash(head_hash) {
            return Err(SignError::BadHash(head_hash.to_owned()));
        }
        if at < self.not_before || at > self.not_after {
            return Err(SignError::NotValid {
                at,
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        let sig = self
            .key
            .sign(&self.rng, &checkpoint_message(seq, head_hash, at))
            .map_err(|_| SignError::Sign)?;
        Ok(Checkpoint {
            seq,
            head_hash: head_hash.to_owned(),
            at,
            signature: hex(sig.as_ref()),
            signer_chain_pem: self.chain_pem.clone(),
        })
    }
}

/// Why a checkpoint is not accepted. The export (or whoever wrote it) is at fault.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A field is not in its format (seq, hash, hex signature, PEM chain).
    #[error("malformed: {0}")]
    Malformed(String),
    /// The signer's chain does not lead to the trusted root, or a certificate of it was
    /// not valid at the checkpoint's time (webpki's reason).
    #[error("the signer does not chain to the trusted root: {0}")]
    UntrustedSigner(String),
    /// The signer chains to the root but is not control (`spiffe://<td>/control`).
    #[error("the signer is not control: {0}")]
    NotControl(String),
    /// The signature does not verify with the signer's key: forged or altered.
    #[error("the signature does not verify")]
    BadSignature,
}

/// Why a [`CheckpointVerifier`] cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifierError {
    /// No root certificate given: nothing could be trusted.
    #[error("no root certificate to verify checkpoints with")]
    NoRoot,
    /// A root certificate cannot be a trust anchor.
    #[error("unusable root certificate: {0}")]
    BadRoot(String),
    /// The trust domain is empty.
    #[error("no trust domain to expect in the signer's identity")]
    NoTrustDomain,
}

/// Proof that a checkpoint passed [`CheckpointVerifier::verify`]; only the verifier builds
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    seq: i64,
    head_hash: String,
    at: i64,
}

impl VerifiedCheckpoint {
    /// The entry vouched for.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Its hash.
    pub fn head_hash(&self) -> &str {
        &self.head_hash
    }

    /// When it was signed.
    pub fn at(&self) -> i64 {
        self.at
    }
}

/// Verifies checkpoints against trusted roots and a trust domain (module docs, "The
/// signer"). Holds no clock: each checkpoint is checked at its own `at`.
#[derive(Debug, Clone)]
pub struct CheckpointVerifier {
    roots: Arc<RootCertStore>,
    control_id: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl CheckpointVerifier {
    /// Trust `roots` for control of `trust_domain`. No roots is an error.
    pub fn new(
        roots: &[CertificateDer<'_>],
        trust_domain: &str,
    ) -> Result<CheckpointVerifier, VerifierError> {
        if roots.is_empty() {
            return Err(VerifierError::NoRoot);
        }
        if trust_domain.is_empty() {
            return Err(VerifierError::NoTrustDomain);
        }
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone().into_owned())
                .map_err(|e| VerifierError::BadRoot(e.to_string()))?;
        }
        Ok(CheckpointVerifier {
            roots: Arc::new(store),
            control_id: format!("spiffe://{trust_domain}/control"),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// The trust domain signers must belong to.
    pub fn trust_domain(&self) -> &str {
        self.control_id
            .strip_prefix("spiffe://")
            .and_then(|s| s.strip_suffix("/control"))
            .unwrap_or_default()
    }

    /// Check one checkpoint (module docs, "The signer").
    pub fn verify(&self, cp: &Checkpoint) -> Result<VerifiedCheckpoint, CheckpointError> {
        let malformed = |s: &str| Err(CheckpointError::Malformed(s.to_owned()));
        if cp.seq < 1 {
            return malformed("seq must be at least 1");
        }
        if !is_hash(&cp.head_hash) {
            return malformed("head_hash is not 64 lowercase hex characters");
        }
        let Ok(at) = u64::try_from(cp.at) else {
            return malformed("at is before 1970");
        };
        if cp.signature.len() > MAX_SIGNATURE_HEX {
            return malformed("signature too long");
        }
        let Some(sig) = unhex(&cp.signature) else {
            return malformed("signature is not lowercase hex");
        };
        if cp.signer_chain_pem.len() > MAX_SIGNER_CHAIN_PEM {
            return malformed("signer_chain_pem too long");
        }
        let certs = pem_certs(&cp.signer_chain_pem).map_err(CheckpointError::Malformed)?;
        let Some((leaf, intermediates)) = certs.split_first() else {
            return malformed("signer_chain_pem holds no certificate");
        };
        if certs.len() > MAX_SIGNER_CHAIN {
            return malformed("signer_chain_pem holds too many certificates");
        }

        // The chain to a trusted root, every certificate valid at `at`, serverAuth.
        let parsed = ParsedCertificate::try_from(leaf)
            .map_err(|e| CheckpointError::UntrustedSigner(e.to_string()))?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(at)),
            self.algorithms.all,
        )
        .map_err(|e| CheckpointError::UntrustedSigner(e.to_string()))?;

        // Exactly one SAN URI, control's.
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CheckpointError::UntrustedSigner(format!("unparsable leaf: {e}")))?;
        let uris: Vec<&str> = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .iter()
            .flat_map(|s| s.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        if uris != [self.control_id.as_str()] {
            return Err(CheckpointError::NotControl(if uris.is_empty() {
                "no SAN URI".to_owned()
            } else {
                uris.join(", ")
            }));
        }

        // The signature, with the leaf's key (the chain check above accepted only the
        // algorithms webpki knows; the key must be P-256 here).
        let key = UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_ASN1,
            x509.public_key().subject_public_key.data.as_ref(),
        );
        key.verify(&checkpoint_message(cp.seq, &cp.head_hash, cp.at), &sig)
            .map_err(|_| CheckpointError::BadSignature)?;
        Ok(VerifiedCheckpoint {
            seq: cp.seq,
            head_hash: cp.head_hash.clone(),
            at: cp.at,
        })
    }
}

/// The trust domain a Tether root certificate names (its subject's OU, which `init` sets
/// when the trust domain has at most 64 characters), if any.
pub fn root_trust_domain(root_der: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(root_der).ok()?;
    let ou = x509.subject().iter_organizational_unit().next()?;
    ou.as_str().ok().map(str::to_owned)
}

/// The certificates in `pem` (e.g. a root file), DER; an error if one is unreadable.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate chain: {e}"))
}

/// Lowercase hex to bytes; `None` for anything else.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| match p {
            [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
            _ => None,
        })
        .collect()
}
