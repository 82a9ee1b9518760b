//! [`Fingerprint`]: the SHA-256 of a certificate's DER encoding, the key of the broker's
//! allowlist and of control's certificate records. Its text form is 64 lowercase hex
//! digits; parsing accepts either case.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl std::hash::Hash for Fingerprint {
    /// The fingerprint is already a uniform hash: its first eight bytes are the hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }

    /// Parse 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Fingerprint> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Fingerprint(out))
    }

    /// Lowercase hex, 64 digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Lowercase hex of the SHA-256 of `der`: [`Fingerprint::of`] then [`Fingerprint::to_hex`].
pub fn hex_of(der: &[u8]) -> String {
    Fingerprint::of(der).to_hex()
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = InvalidFingerprint;
    fn from_str(s: &str) -> Result<Fingerprint, InvalidFingerprint> {
        Fingerprint::from_hex(s).ok_or(InvalidFingerprint)
    }
}

/// A fingerprint that is not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a fingerprint is 64 hex digits (SHA-256 of the certificate DER)")]
pub struct InvalidFingerprint;

/// A map hasher for [`Fingerprint`] keys: takes its eight-byte hash as is instead of
/// hashing 32 bytes again with SipHash.
#[derive(Clone, Copy, Default, Debug)]
pub struct FingerprintHasher;

impl BuildHasher for FingerprintHasher {
    type Hasher = FingerprintHash;
    fn build_hasher(&self) -> FingerprintHash {
        FingerprintHash(0)
    }
}

/// See [`FingerprintHasher`].
#[derive(Default)]
pub struct FingerprintHash(u64);

impl Hasher for FingerprintHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `Fingerprint`, which writes one u64, is hashed with this; anything else
        // still gets a usable (FNV-1a) hash.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let fp = Fingerprint::of(b"cert");
        let hex = fp.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(Fingerprint::from_hex(&hex), Some(fp));
        assert_eq!(Fingerprint::from_hex(&hex.to_uppercase()), Some(fp));
        assert_eq!(hex_of(b"cert"), hex);
        for bad in ["", "ab", &hex[..63], &format!("{hex}0"), &"g".repeat(64)] {
            assert_eq!(Fingerprint::from_hex(bad), None, "{bad:?}");
        }
        assert_eq!(
            hex_of(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
