//! Loading credentials from a state directory: supported keys and the exact refusal for
//! each kind of bad file.

mod common;

use std::io::ErrorKind;
use std::path::Path;

use common::{appliance, Ca, Leaf};
use tether_agent::credentials::{CA_FILE, CERT_FILE, KEY_FILE};
use tether_agent::{CredentialError, Credentials};

fn write_state(dir: &Path, cert: &str, key: &str, ca: &str) {
    std::fs::write(dir.join(CERT_FILE), cert).unwrap();
    std::fs::write(dir.join(KEY_FILE), key).unwrap();
    std::fs::write(dir.join(CA_FILE), ca).unwrap();
}

/// Split one DER TLV: (tag, content, rest).
fn tlv(buf: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = buf[0];
    let (len, hdr) = match buf[1] {
        l if l < 0x80 => (usize::from(l), 2),
        0x81 => (usize::from(buf[2]), 3),
        0x82 => (usize::from(buf[2]) << 8 | usize::from(buf[3]), 4),
        _ => panic!("length form not needed in tests"),
    };
    (tag, &buf[hdr..hdr + len], &buf[hdr + len..])
}

/// The SEC1 `ECPrivateKey` inside a PKCS#8 `PrivateKeyInfo`, as PEM.
fn sec1_pem_from_pkcs8(pkcs8: &[u8]) -> String {
    let (_, info, _) = tlv(pkcs8);
    let (_, _version, rest) = tlv(info);
    let (_, _alg, rest) = tlv(rest);
    let (tag, sec1, _) = tlv(rest);
    assert_eq!(tag, 0x04, "octet string");
    pem_encode("EC PRIVATE KEY", sec1)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    let body: Vec<String> = s
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

#[test]
fn loads_p256_pkcs8_credentials_from_the_state_dir() {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, "acme.test", "app-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = tempfile::tempdir().unwrap();
    write_state(dir.path(), &leaf.cert_pem(), &leaf.key_pem(), &ca.pem());

    let creds = Credentials::load(dir.path()).expect("load");
    assert_eq!(creds.appliance_id(), "app-1");
    assert_eq!(creds.trust_domain(), "acme.test");
    assert_eq!(creds.cert_chain().len(), 1);
    assert_eq!(creds.ca_certs().len(), 1);
    assert_eq!(creds.fingerprint().len(), 64);
    assert!(creds.not_after_ms() > 0);
    let expected = ring::digest::digest(&ring::digest::SHA256, leaf.der().as_ref());
    let hex: String = expected
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(creds.fingerprint(), hex);
}

#[test]
fn loads_ed25519_credentials() {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, "acme.test", "app-ed", &rcgen::PKCS_ED25519);
    let creds = Credentials::from_pem(
        leaf.cert_pem().as_bytes(),
        leaf.key_pem().as_bytes(),
        ca.pem().as_bytes(),
    )
    .expect("ed25519");
    assert_eq!(creds.appliance_id(), "app-ed");
}

#[test]
fn loads_a_sec1_ec_key() {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, "acme.test", "app-sec1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let sec1 = sec1_pem_from_pkcs8(&leaf.key.serialize_der());
    assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    let creds = Credentials::from_pem(
        leaf.cert_pem().as_bytes(),
        sec1.as_bytes(),
        ca.pem().as_bytes(),
    )
    .expect("sec1");
    assert_eq!(creds.appliance_id(), "app-sec1");
}

#[test]
fn chain_after_the_leaf_and_several_cas_are_kept() {
    let ca = Ca::new("ca");
    let other = Ca::new("other");
    let leaf = appliance(&ca, "acme.test", "app-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let chain = format!("{}{}", leaf.cert_pem(), ca.pem());
    let cas = format!("{}{}", ca.pem(), other.pem());
    let creds =
        Credentials::from_pem(chain.as_bytes(), leaf.key_pem().as_bytes(), cas.as_bytes()).unwrap();
    assert_eq!(creds.cert_chain().len(), 2);
    assert_eq!(creds.ca_certs().len(), 2);
}

#[test]
fn debug_redacts_the_key() {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, "acme.test", "app-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let creds = Credentials::from_pem(
        leaf.cert_pem().as_bytes(),
        leaf.key_pem().as_bytes(),
        ca.pem().as_bytes(),
    )
    .unwrap();
    let debug = format!("{creds:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(debug.contains("app-1"));
    let secret = leaf.key.serialize_der();
    let secret_hex: String = secret[secret.len() - 16..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!debug.contains(&secret_hex));
}

#[test]
fn missing_file_is_a_read_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Credentials::load(dir.path()).unwrap_err();
    assert_eq!(
        err,
        CredentialError::Read {
            path: dir.path().join(CERT_FILE),
            kind: ErrorKind::NotFound
        }
    );
}

#[test]
fn mismatched_key_is_refused() {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, "acme.test", "app-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let other = appliance(&ca, "acme.test", "app-2", &rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = tempfile::tempdir().unwrap();
    write_state(dir.path(), &leaf.cert_pem(), &other.key_pem(), &ca.pem());
    assert_eq!(
        Credentials::load(dir.path()).unwrap_err(),
        CredentialError::KeyMismatch
    );
}

#[test]
fn garbage_files_give_specific_errors() {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, "acme.test", "app-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (cert, key, ca_pem) = (leaf.cert_pem(), leaf.key_pem(), ca.pem());

    // Not PEM at all: no certificate found.
    assert_eq!(
        Credentials::from_pem(b"hello world", key.as_bytes(), ca_pem.as_bytes()).unwrap_err(),
        CredentialError::NoCertificate
    );
    // A PEM block whose base64 is broken.
    let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    assert_eq!(
        Credentials::from_pem(broken.as_bytes(), key.as_bytes(), ca_pem.as_bytes()).unwrap_err(),
        CredentialError::InvalidPem {
            file: "certificate"
        }
    );
    // A well-formed PEM certificate block holding garbage DER.
    let junk = pem_encode("CERTIFICATE", b"not a certificate");
    assert!(matches!(
        Credentials::from_pem(junk.as_bytes(), key.as_bytes(), ca_pem.as_bytes()).unwrap_err(),
        CredentialError::InvalidCertificate(_)
    ));
    // No key in the key file.
    assert_eq!(
        Credentials::from_pem(cert.as_bytes(), cert.as_bytes(), ca_pem.as_bytes()).unwrap_err(),
        CredentialError::NoPrivateKey
    );
    // A key block holding garbage.
    let junk_key = pem_encode("PRIVATE KEY", b"not a key at all");
    assert!(matches!(
        Credentials::from_pem(cert.as_bytes(), junk_key.as_bytes(), ca_pem.as_bytes()).unwrap_err(),
        CredentialError::UnsupportedKey(_)
    ));
    // Empty CA file.
    assert_eq!(
        Credentials::from_pem(cert.as_bytes(), key.as_bytes(), b"").unwrap_err(),
        CredentialError::NoCaCertificate
    );
}

#[test]
fn certificate_without_appliance_identity_is_refused() {
    let ca = Ca::new("ca");
    let no_uri = ca.issue(Leaf {
        common_name: "x",
        uris: vec![],
        ekus: vec![],
        alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        validity: None,
    });
    assert_eq!(
        Credentials::from_pem(
            no_uri.cert_pem().as_bytes(),
            no_uri.key_pem().as_bytes(),
            ca.pem().as_bytes()
        )
        .unwrap_err(),
        CredentialError::NoApplianceIdentity
    );
    // A broker certificate is not an appliance identity either.
    let broker = common::broker(&ca, "acme.test", "b1");
    assert_eq!(
        Credentials::from_pem(
            broker.cert_pem().as_bytes(),
            broker.key_pem().as_bytes(),
            ca.pem().as_bytes()
        )
        .unwrap_err(),
        CredentialError::NoApplianceIdentity
    );
}
