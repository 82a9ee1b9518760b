//! One-time secrets: enrollment tokens and nonces.
//!
//! A token is 32 random bytes, shown once as `tt_<base32>`; the store keeps only its
//! SHA-256. Nonces are 32 random bytes in hex and are single use.

use std::fmt;

/// An enrollment token in clear. `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Prefix of every token, so a leaked one is easy to recognise in logs and scanners.
pub const TOKEN_PREFIX: &str = "tt_";

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system RNG works");
    b
}

impl Token {
    /// A fresh random token.
    pub fn generate() -> Token {
        let bytes = random_bytes();
        let mut s = String::from(TOKEN_PREFIX);
        // 256 bits as 52 base32 characters (5 bits each, last one padded).
        let mut acc: u32 = 0;
        let mut bits = 0;
        for b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                s.push(BASE32[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            s.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
        }
        Token(s)
    }

    /// Wrap a token received from a caller.
    pub fn from_secret(s: &str) -> Token {
        Token(s.trim().to_owned())
    }

    /// The token, to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 the store keeps, lowercase hex.
    pub fn hash(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }
}

/// A fresh nonce: 32 random bytes, lowercase hex.
pub fn nonce() -> String {
    hex(&random_bytes())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_redacted() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert!(a.expose().starts_with(TOKEN_PREFIX));
        assert_eq!(a.expose().len(), 3 + 52);
        assert_eq!(format!("{a:?}"), "Token(<redacted>)");
        assert_eq!(a.hash().len(), 64);
        assert_eq!(
            Token::from_secret(&format!(" {} \n", a.expose())).hash(),
            a.hash()
        );
        assert_eq!(nonce().len(), 64);
    }
}
