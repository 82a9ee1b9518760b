//! SSHSIG: the OpenSSH signature format (`ssh-keygen -Y sign|verify`) over document
//! bytes, restricted to what Tether accepts.
//!
//! Accepted: `ssh-ed25519` and `sk-ssh-ed25519@openssh.com` keys, SHA-256 or SHA-512,
//! an empty `reserved` field, and exactly the expected namespace. For hardware (`sk-`)
//! keys the user-presence flag is read from the signature (`ssh-key` verifies the
//! signature but does not look at the flags). Nothing is ever keyed on signature bytes:
//! Ed25519 signatures are malleable under non-strict verification, so single use is
//! keyed on the id inside the signed document.

use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

/// The longest armored signature accepted (an Ed25519 SSHSIG is about 300 bytes).
pub const MAX_SIG_LEN: usize = 4096;

/// The user-presence bit of a FIDO signature's flags.
const FLAG_USER_PRESENT: u8 = 0x01;
/// Where the flags byte sits in an `sk-ssh-ed25519` signature: after the 64-byte
/// Ed25519 signature, before the 4-byte counter.
const SK_FLAGS_AT: usize = 64;

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigError {
    /// Longer than [`MAX_SIG_LEN`].
    #[error("the signature is {0} bytes; at most {MAX_SIG_LEN} are accepted")]
    TooLong(usize),
    /// Not SSHSIG armor.
    #[error("not an SSH signature: {0}")]
    Malformed(String),
    /// A key type other than `ssh-ed25519` / `sk-ssh-ed25519`.
    #[error("signatures by {0} keys are not accepted (only ssh-ed25519 and sk-ssh-ed25519)")]
    Algorithm(String),
    /// Signed for another purpose.
    #[error("the signature is for namespace {found:?}, not {expected:?}")]
    Namespace {
        /// What the signature says.
        found: String,
        /// What was required.
        expected: &'static str,
    },
    /// A non-empty reserved field.
    #[error("the signature's reserved field is not empty")]
    Reserved,
    /// The signature does not verify over these bytes.
    #[error("the signature does not verify over the document")]
    Invalid,
}

/// Who made a signature that verified.
#[derive(Clone, Debug)]
pub struct Signer {
    /// The signing key (as the signature embeds it; comment empty).
    pub key: PublicKey,
    /// Whether a hardware key reported the user present (always `true` for a software
    /// key, which has no such flag).
    pub user_present: bool,
}

impl Signer {
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }
}

/// Where the signature of `file` lives: `FILE.sig`, as `ssh-keygen -Y sign` writes it.
pub fn sig_path(file: &std::path::Path) -> std::path::PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".sig");
    s.into()
}

/// Whether Tether accepts keys of `alg`.
pub fn accepted_algorithm(alg: &Algorithm) -> bool {
    matches!(alg, Algorithm::Ed25519 | Algorithm::SkEd25519)
}

/// Sign `msg` for `namespace` (SHA-512, as `ssh-keygen` does), as armor ending in a
/// newline, which is what `ssh-keygen -Y sign` writes.
pub fn sign(key: &PrivateKey, namespace: &str, msg: &[u8]) -> Result<String, ssh_key::Error> {
    let sig = key.sign(namespace, HashAlg::Sha512, msg)?;
    let mut armor = sig.to_pem(LineEnding::LF)?;
    if !armor.ends_with('\n') {
        armor.push('\n');
    }
    Ok(armor)
}

/// Verify the armored signature `armor` over `msg` in `namespace`. Returns the signer;
/// whether that key may sign is the caller's question ([`crate::approvers`]).
pub fn verify(armor: &[u8], namespace: &'static str, msg: &[u8]) -> Result<Signer, SigError> {
    if armor.len() > MAX_SIG_LEN {
        return Err(SigError::TooLong(armor.len()));
    }
    let sig = SshSig::from_pem(armor).map_err(|e| SigError::Malformed(e.to_string()))?;
    let alg = sig.public_key().algorithm();
    if !accepted_algorithm(&alg) || sig.algorithm() != alg {
        return Err(SigError::Algorithm(alg.as_str().to_owned()));
    }
    if sig.namespace() != namespace {
        return Err(SigError::Namespace {
            found: sig.namespace().to_owned(),
            expected: namespace,
        });
    }
    if !sig.reserved().is_empty() {
        return Err(SigError::Reserved);
    }
    let key = PublicKey::new(sig.public_key().clone(), "");
    key.verify(namespace, msg, &sig)
        .map_err(|_| SigError::Invalid)?;
    let user_present = match alg {
        Algorithm::SkEd25519 => sig
            .signature_bytes()
            .get(SK_FLAGS_AT)
            .is_some_and(|f| f & FLAG_USER_PRESENT != 0),
        _ => true,
    };
    Ok(Signer { key, user_present })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn key() -> PrivateKey {
        PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519).unwrap()
    }

    #[test]
    fn round_trip_and_every_tamper_fails() {
        let k = key();
        let armor = sign(&k, "tether-approval-v1", b"doc").unwrap();
        let s = verify(armor.as_bytes(), "tether-approval-v1", b"doc").unwrap();
        assert_eq!(s.key.key_data(), k.public_key().key_data());
        assert!(s.fingerprint().starts_with("SHA256:"));
        assert_eq!(
            verify(armor.as_bytes(), "tether-approval-v1", b"doc!").unwrap_err(),
            SigError::Invalid
        );
        assert!(matches!(
            verify(armor.as_bytes(), "tether-manifest-v1", b"doc").unwrap_err(),
            SigError::Namespace { .. }
        ));
        assert!(matches!(
            verify(b"garbage", "tether-approval-v1", b"doc").unwrap_err(),
            SigError::Malformed(_)
        ));
        assert!(matches!(
            verify(&vec![b'a'; MAX_SIG_LEN + 1], "tether-approval-v1", b"doc").unwrap_err(),
            SigError::TooLong(_)
        ));
    }
}
