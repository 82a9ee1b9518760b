//! CSRs for the `csr` target: an Ed25519 key from a fixed seed, and the DER of a PKCS#10
//! request built around any `CertificationRequestInfo` bytes and signed with that key, so
//! a fuzzed request body whose key is this one gets past the signature check.

use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// The key's seed.
pub const SEED: [u8; 32] = *b"tether-fuzz-csr-ed25519-seed-019";

/// The key.
pub fn key() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&SEED).expect("Ed25519 seed")
}

/// The key as PKCS#8 v1 DER (RFC 8410), for tools that take that form (rcgen).
pub fn pkcs8() -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&SEED);
    der
}

/// The public key, 32 bytes.
pub fn public_key() -> Vec<u8> {
    key().public_key().as_ref().to_vec()
}

/// `SEQUENCE { info, AlgorithmIdentifier { id-Ed25519 }, BIT STRING signature(info) }`:
/// `info` is taken as the DER of a `CertificationRequestInfo`, whatever it holds.
pub fn sign_request(key: &Ed25519KeyPair, info: &[u8]) -> Vec<u8> {
    let sig = key.sign(info);
    let mut bits = vec![0u8];
    bits.extend_from_slice(sig.as_ref());
    let mut body = info.to_vec();
    body.extend_from_slice(&[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70]);
    tlv(0x03, &bits, &mut body);
    let mut out = Vec::with_capacity(body.len() + 4);
    tlv(0x30, &body, &mut out);
    out
}

/// Append a DER tag, definite length and `value` to `out`.
fn tlv(tag: u8, value: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
}
