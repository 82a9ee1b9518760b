//! The two-tier CA, local keys and AWS KMS (against the moto emulator `scripts/moto`
//! starts; `./scripts/test` exports `TETHER_TEST_KMS_URL`).
//!
//! Every issued chain is checked by two independent verifiers — `openssl verify` with a
//! purpose and `-x509_strict`, and webpki through rustls' client/server verifiers — and
//! its fields (validity, SAN, EKU, key usage, path length) are read back with x509-parser.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType, SignatureAlgorithm,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tether_control::domain::ca::{
    Ca, CaBackend, CaConfig, CaError, CsrError, Issued, KmsSettings, StaticCredentials,
};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const TD: &str = "tether.test";
const DAY: i64 = 86_400;
const BACKDATE: i64 = 300;

fn cfg() -> CaConfig {
    CaConfig {
        trust_domain: TD.into(),
        control_dns_names: vec!["control.tether.test".into(), "localhost".into()],
        control_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ..CaConfig::default()
    }
}

/// Whole seconds: what certificates can carry.
fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn csr_for(alg: &'static SignatureAlgorithm, params: CertificateParams) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn p256_csr() -> String {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "requester");
    csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, params)
}

fn ed25519_csr() -> String {
    csr_for(&rcgen::PKCS_ED25519, CertificateParams::default())
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(char::from(B64[((v >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn csr_der(pem: &str) -> Vec<u8> {
    rustls_pemfile::csr(&mut pem.as_bytes())
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

/// What the tests read back from a certificate.
#[derive(Debug)]
struct CertInfo {
    cn: String,
    not_before: i64,
    not_after: i64,
    serial: Vec<u8>,
    is_ca: Option<bool>,
    path_len: Option<u32>,
    uris: Vec<String>,
    dns: Vec<String>,
    ips: Vec<Vec<u8>>,
    san_count: usize,
    server_auth: bool,
    client_auth: bool,
    eku_present: bool,
    digital_signature: bool,
    key_cert_sign: bool,
    crl_sign: bool,
    has_aki: bool,
    has_ski: bool,
    issuer_cn: String,
}

fn info(der: &[u8]) -> CertInfo {
    let (rest, c) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    let cn = |n: &x509_parser::x509::X509Name<'_>| {
        n.iter_common_name()
            .next()
            .map(|a| a.as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let bc = c.basic_constraints().unwrap().map(|b| b.value.clone());
    let ku = c.key_usage().unwrap().map(|k| *k.value);
    let eku = c.extended_key_usage().unwrap().map(|e| e.value.clone());
    let mut i = CertInfo {
        cn: cn(c.subject()),
        issuer_cn: cn(c.issuer()),
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        serial: c.raw_serial().to_vec(),
        is_ca: bc.as_ref().map(|b| b.ca),
        path_len: bc.as_ref().and_then(|b| b.path_len_constraint),
        uris: vec![],
        dns: vec![],
        ips: vec![],
        san_count: 0,
        server_auth: eku.as_ref().is_some_and(|e| e.server_auth),
        client_auth: eku.as_ref().is_some_and(|e| e.client_auth),
        eku_present: eku.is_some(),
        digital_signature: ku.as_ref().is_some_and(|k| k.digital_signature()),
        key_cert_sign: ku.as_ref().is_some_and(|k| k.key_cert_sign()),
        crl_sign: ku.as_ref().is_some_and(|k| k.crl_sign()),
        has_aki: c
            .extensions()
            .iter()
            .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER),
        has_ski: c
            .extensions()
            .iter()
            .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER),
    };
    if let Some(san) = c.subject_alternative_name().unwrap() {
        i.san_count = san.value.general_names.len();
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => i.uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => i.dns.push((*d).to_owned()),
                GeneralName::IPAddress(b) => i.ips.push(b.to_vec()),
                _ => {}
            }
        }
    }
    if let Some(eku) = &eku {
        assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
    }
    i
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Purpose {
    Client,
    Server,
}

/// `openssl verify -x509_strict -purpose ... -CAfile root -untrusted inter leaf`.
fn openssl_verify(root_pem: &str, chain_pem: &str, purpose: Purpose) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let chain = pem_certs(chain_pem);
    assert_eq!(chain.len(), 2, "chain is leaf + intermediate");
    let root = dir.path().join("root.pem");
    let inter = dir.path().join("inter.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&root, root_pem).unwrap();
    std::fs::write(&leaf, pem_encode("CERTIFICATE", &chain[0])).unwrap();
    std::fs::write(&inter, pem_encode("CERTIFICATE", &chain[1])).unwrap();
    let purpose = match purpose {
        Purpose::Client => "sslclient",
        Purpose::Server => "sslserver",
    };
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .expect("openssl must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains(": OK") {
        Ok(())
    } else {
        Err(text)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(root_pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for der in pem_certs(root_pem) {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    Arc::new(roots)
}

/// webpki, as a TLS server checks a client certificate.
fn webpki_client(root_pem: &str, chain_pem: &str) -> Result<(), rustls::Error> {
    let v = WebPkiClientVerifier::builder_with_provider(roots(root_pem), provider())
        .build()
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = pem_certs(chain_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
}

/// webpki, as a TLS client checks a server certificate for `name`.
fn webpki_server(root_pem: &str, chain_pem: &str, name: &str) -> Result<(), rustls::Error> {
    let v =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(root_pem), provider())
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> = pem_certs(chain_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    v.verify_server_cert(
        &chain[0],
        &chain[1..],
        &ServerName::try_from(name.to_owned()).unwrap(),
        &[],
        UnixTime::now(),
    )
    .map(|_| ())
}

/// Both verifiers accept the chain for `purpose`, and refuse it for the other purpose
/// when the leaf lacks that EKU.
fn verify_both(ca: &Ca, chain_pem: &str, purpose: Purpose, server_name: Option<&str>) {
    let root = ca.root_pem();
    match purpose {
        Purpose::Client => {
            openssl_verify(&root, chain_pem, Purpose::Client).unwrap();
            webpki_client(&root, chain_pem).unwrap();
        }
        Purpose::Server => {
            openssl_verify(&root, chain_pem, Purpose::Server).unwrap();
            webpki_server(&root, chain_pem, server_name.unwrap()).unwrap();
        }
    }
}

/// The CA certificates: 10 y root, 2 y intermediate with path length 0.
fn check_ca_certs(ca: &Ca, now: OffsetDateTime) {
    let now = now.unix_timestamp();
    let root = info(ca.root_der());
    assert_eq!(root.is_ca, Some(true));
    assert_eq!(root.path_len, None);
    assert!(root.key_cert_sign && root.crl_sign && !root.eku_present);
    assert_eq!(root.not_before, now - BACKDATE);
    assert_eq!(root.not_after, now + 3650 * DAY);
    assert_eq!(root.issuer_cn, root.cn);
    assert!(root.has_ski);

    let inter = info(ca.intermediate_der());
    assert_eq!(inter.is_ca, Some(true));
    assert_eq!(inter.path_len, Some(0));
    assert!(inter.key_cert_sign && inter.crl_sign);
    assert_eq!(inter.not_before, now - BACKDATE);
    assert_eq!(inter.not_after, now + 730 * DAY);
    assert_eq!(inter.issuer_cn, root.cn);
    assert!(inter.has_aki && inter.has_ski);

    assert_eq!(
        ca.bundle_pem()
            .matches("-----BEGIN CERTIFICATE-----")
            .count(),
        2
    );
    assert_eq!(
        pem_certs(&ca.bundle_pem()),
        vec![ca.root_der().to_vec(), ca.intermediate_der().to_vec()]
    );
}

/// Common leaf checks; returns the parsed leaf.
fn check_leaf(issued: &Issued, now: OffsetDateTime, validity_days: i64) -> CertInfo {
    let now = now.unix_timestamp();
    let chain = pem_certs(&issued.chain_pem);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], issued.cert_der);
    assert_eq!(pem_certs(&issued.cert_pem), vec![issued.cert_der.clone()]);
    let i = info(&issued.cert_der);
    assert_eq!(
        i.is_ca,
        Some(false),
        "leaves carry basicConstraints CA:false"
    );
    assert!(i.digital_signature && !i.key_cert_sign && !i.crl_sign);
    assert!(i.has_aki);
    assert_eq!(i.not_before, now - BACKDATE);
    assert_eq!(i.not_after, now + validity_days * DAY);
    assert_eq!(
        (issued.not_before, issued.not_after),
        (i.not_before, i.not_after)
    );
    assert_eq!(i.serial.len(), 16, "128-bit serial");
    assert!(i.serial[0] != 0 && i.serial[0] < 0x80, "positive, minimal");
    assert_eq!(issued.serial_hex, hex(&i.serial));
    assert_eq!(
        issued.fingerprint_hex,
        hex(ring::digest::digest(&ring::digest::SHA256, &issued.cert_der).as_ref())
    );
    i
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Issue the three leaf kinds and check each with both verifiers; check the control leaf.
fn exercise(ca: &Ca, now: OffsetDateTime) {
    check_ca_certs(ca, now);

    // Control leaf: serverAuth, spiffe://td/control + DNS + IP.
    let control_chain = ca.control_chain_pem();
    let control = info(&pem_certs(&control_chain)[0]);
    assert!(control.server_auth && !control.client_auth);
    assert_eq!(control.uris, vec![format!("spiffe://{TD}/control")]);
    assert_eq!(control.dns, vec!["control.tether.test", "localhost"]);
    assert_eq!(control.ips, vec![vec![127, 0, 0, 1]]);
    assert_eq!(control.not_after, now.unix_timestamp() + 30 * DAY);
    assert_eq!(control.path_len, None);
    verify_both(
        ca,
        &control_chain,
        Purpose::Server,
        Some("control.tether.test"),
    );
    webpki_server(&ca.root_pem(), &control_chain, "127.0.0.1").unwrap();
    assert!(webpki_server(&ca.root_pem(), &control_chain, "other.tether.test").is_err());
    assert!(ca.control_key_pem().contains("PRIVATE KEY"));

    // Appliance: clientAuth only, exactly one SAN.
    for csr in [p256_csr(), ed25519_csr()] {
        let a = ca.issue_appliance("app-1", &csr, now).unwrap();
        let i = check_leaf(&a, now, 30);
        assert_eq!(i.cn, "app-1");
        assert_eq!(i.san_count, 1);
        assert_eq!(i.uris, vec![format!("spiffe://{TD}/appliance/app-1")]);
        assert!(i.client_auth && !i.server_auth);
        verify_both(ca, &a.chain_pem, Purpose::Client, None);
        // The purpose checks are real: an appliance cannot act as a server.
        assert!(openssl_verify(&ca.root_pem(), &a.chain_pem, Purpose::Server).is_err());
    }

    // Broker: serverAuth + clientAuth, URI + DNS + IP.
    let b = ca
        .issue_broker(
            "b1",
            &p256_csr(),
            &["b1.tether.test".into()],
            &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))],
            now,
        )
        .unwrap();
    let i = check_leaf(&b, now, 30);
    assert_eq!(i.cn, "b1");
    assert_eq!(i.uris, vec![format!("spiffe://{TD}/broker/b1")]);
    assert_eq!(i.dns, vec!["b1.tether.test"]);
    assert_eq!(i.ips, vec![vec![127, 0, 0, 2]]);
    assert!(i.client_auth && i.server_auth);
    verify_both(ca, &b.chain_pem, Purpose::Server, Some("b1.tether.test"));
    verify_both(ca, &b.chain_pem, Purpose::Client, None);

    // Operator: 1 year, clientAuth.
    let o = ca.issue_operator("alice", &ed25519_csr(), now).unwrap();
    let i = check_leaf(&o, now, 365);
    assert_eq!(i.cn, "alice");
    assert_eq!(i.uris, vec![format!("spiffe://{TD}/operator/alice")]);
    assert!(i.client_auth && !i.server_auth);
    verify_both(ca, &o.chain_pem, Purpose::Client, None);
    assert!(openssl_verify(&ca.root_pem(), &o.chain_pem, Purpose::Server).is_err());
    assert!(webpki_server(&ca.root_pem(), &o.chain_pem, "alice").is_err());
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------
// Local keys
// ---------------------------------------------------------------------------------------

#[test]
fn local_ca_issues_chains_that_independent_verifiers_accept() {
    let dir = tempfile::tempdir().unwrap();
    let now = now();
    let ca = Ca::init(dir.path(), &cfg(), now).unwrap();
    assert_eq!(ca.backend(), &CaBackend::Local);
    exercise(&ca, now);

    // Serials and fingerprints differ between issuances for the same record.
    let a = ca.issue_appliance("app-1", &p256_csr(), now).unwrap();
    let b = ca.issue_appliance("app-1", &p256_csr(), now).unwrap();
    assert_ne!(a.serial_hex, b.serial_hex);
    assert_ne!(a.fingerprint_hex, b.fingerprint_hex);
}

#[test]
fn key_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(dir.path(), &cfg(), now()).unwrap();
    let ca_dir = dir.path().join("ca");
    assert_eq!(mode(&ca_dir), 0o700);
    for key in ["root.key", "intermediate.key", "control.key"] {
        assert_eq!(mode(&ca_dir.join(key)), 0o600, "{key}");
    }
    for cert in ["root.pem", "intermediate.pem", "control.pem"] {
        assert_eq!(mode(&ca_dir.join(cert)), 0o644, "{cert}");
    }
    assert!(!ca_dir.join("kms.json").exists());
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("control.key")).unwrap(),
        ca.control_key_pem()
    );
    // No leftovers of the atomic init.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("ca")]);

    // A key file others can read is refused on load.
    std::fs::set_permissions(
        ca_dir.join("intermediate.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert!(matches!(Ca::load(dir.path(), &cfg()), Err(CaError::Key(_))));
}

#[test]
fn debug_never_shows_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(dir.path(), &cfg(), now()).unwrap();
    let debug = format!("{ca:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    let key_body: String = ca.control_key_pem().lines().nth(1).unwrap().to_owned();
    assert!(!debug.contains(&key_body));
    let root_key = std::fs::read_to_string(dir.path().join("ca/root.key")).unwrap();
    assert!(!debug.contains(root_key.lines().nth(1).unwrap()));
    assert!(debug.contains(TD));

    let settings = KmsSettings {
        credentials: Some(StaticCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token-secret".into()),
        }),
        ..KmsSettings::default()
    };
    let debug = format!("{settings:?}");
    assert!(debug.contains("AKIDEXAMPLE"));
    assert!(!debug.contains("very-secret") && !debug.contains("token-secret"));
}

#[test]
fn load_after_init_gives_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let now = now();
    let ca = Ca::init(dir.path(), &cfg(), now).unwrap();
    let loaded = Ca::load(dir.path(), &cfg()).unwrap();
    assert_eq!(loaded.root_pem(), ca.root_pem());
    assert_eq!(loaded.bundle_pem(), ca.bundle_pem());
    assert_eq!(loaded.control_chain_pem(), ca.control_chain_pem());
    assert_eq!(loaded.control_key_pem(), ca.control_key_pem());
    // The loaded CA issues with the same intermediate (AKI matches, chain verifies).
    exercise(&loaded, now);
}

#[test]
fn init_twice_refuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(dir.path(), &cfg(), now()).unwrap();
    let err = Ca::init(dir.path(), &cfg(), now()).unwrap_err();
    assert!(
        matches!(&err, CaError::AlreadyInitialised(p) if *p == dir.path().join("ca")),
        "{err:?}"
    );
    assert_eq!(
        Ca::load(dir.path(), &cfg()).unwrap().root_pem(),
        ca.root_pem()
    );
}

#[test]
fn load_without_init_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ca::load(dir.path(), &cfg()).unwrap_err();
    assert!(matches!(err, CaError::NotInitialised(_)), "{err:?}");
}

#[test]
fn load_refuses_another_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    Ca::init(dir.path(), &cfg(), now()).unwrap();
    let other = CaConfig {
        trust_domain: "other.test".into(),
        ..cfg()
    };
    let err = Ca::load(dir.path(), &other).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Config {
                field: "trust_domain",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn config_validation_names_the_field() {
    let field = |c: CaConfig| match c.validate() {
        Err(CaError::Config { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(field(CaConfig::default()), "trust_domain");
    assert_eq!(
        field(CaConfig {
            trust_domain: "Upper.Case".into(),
            ..cfg()
        }),
        "trust_domain"
    );
    assert_eq!(
        field(CaConfig {
            operator_validity: Duration::from_secs(800 * 86_400),
            ..cfg()
        }),
        "operator_validity"
    );
    assert_eq!(
        field(CaConfig {
            control_dns_names: vec!["bad name".into()],
            ..cfg()
        }),
        "control_dns_names"
    );
    cfg().validate().unwrap();
    let d = CaConfig::default();
    assert_eq!(d.appliance_validity, Duration::from_secs(30 * 86_400));
    assert_eq!(d.broker_validity, Duration::from_secs(30 * 86_400));
    assert_eq!(d.operator_validity, Duration::from_secs(365 * 86_400));
}

#[test]
fn validity_lengths_are_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let now = now();
    let c = CaConfig {
        appliance_validity: Duration::from_secs(7 * 86_400),
        operator_validity: Duration::from_secs(90 * 86_400),
        ..cfg()
    };
    let ca = Ca::init(dir.path(), &c, now).unwrap();
    check_leaf(&ca.issue_appliance("a", &p256_csr(), now).unwrap(), now, 7);
    check_leaf(&ca.issue_operator("o", &p256_csr(), now).unwrap(), now, 90);
}

#[test]
fn leaves_never_outlive_the_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let ca = Ca::init(dir.path(), &cfg(), t0).unwrap();
    let inter_not_after = info(ca.intermediate_der()).not_after;
    let late = t0 + time::Duration::days(700);
    let o = ca.issue_operator("alice", &p256_csr(), late).unwrap();
    assert_eq!(o.not_after, inter_not_after);
    let err = ca
        .issue_appliance("app-1", &p256_csr(), t0 + time::Duration::days(731))
        .unwrap_err();
    assert!(
        matches!(err, CaError::IntermediateNotValid { not_after } if not_after == inter_not_after),
        "{err:?}"
    );
}

#[test]
fn control_leaf_is_renewed_when_due_or_renamed() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let mut ca = Ca::init(dir.path(), &cfg(), t0).unwrap();
    let first = ca.control_chain_pem();
    let margin = Duration::from_secs(7 * 86_400);
    assert!(!ca.ensure_control_leaf(t0, margin).unwrap());
    assert!(!ca
        .ensure_control_leaf(t0 + time::Duration::days(22), margin)
        .unwrap());
    let t1 = t0 + time::Duration::days(24);
    assert!(ca.ensure_control_leaf(t1, margin).unwrap());
    assert_ne!(ca.control_chain_pem(), first);
    assert_eq!(ca.control_not_after(), t1.unix_timestamp() + 30 * DAY);
    assert!(!ca.ensure_control_leaf(t1, margin).unwrap());
    // Written: a fresh load sees the new leaf and key, still private.
    let loaded = Ca::load(dir.path(), &cfg()).unwrap();
    assert_eq!(loaded.control_chain_pem(), ca.control_chain_pem());
    assert_eq!(loaded.control_key_pem(), ca.control_key_pem());
    assert_eq!(mode(&dir.path().join("ca/control.key")), 0o600);

    // New DNS names in the configuration: renewed at once.
    let renamed = CaConfig {
        control_dns_names: vec!["control2.tether.test".into()],
        ..cfg()
    };
    let mut ca = Ca::load(dir.path(), &renamed).unwrap();
    let t = now();
    assert!(ca.ensure_control_leaf(t, margin).unwrap());
    let i = info(&pem_certs(&ca.control_chain_pem())[0]);
    assert_eq!(i.dns, vec!["control2.tether.test"]);
    verify_both(
        &ca,
        &ca.control_chain_pem(),
        Purpose::Server,
        Some("control2.tether.test"),
    );
}

// ---------------------------------------------------------------------------------------
// CSR attacks: each refused with the exact error; names always come from the record.
// ---------------------------------------------------------------------------------------

fn local_ca() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(dir.path(), &cfg(), now()).unwrap();
    (dir, ca)
}

fn csr_err(r: Result<Issued, CaError>) -> CsrError {
    match r {
        Err(CaError::Csr(e)) => e,
        other => panic!("expected a CSR error, got {other:?}"),
    }
}

#[test]
fn appliance_cannot_request_another_appliances_name() {
    let (_dir, ca) = local_ca();
    let now = now();
    // Everything a CSR can ask for: another appliance's CN and SPIFFE id, DNS names,
    // serverAuth, even CA:true.
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "app-2");
    params.subject_alt_names.push(SanType::URI(
        format!("spiffe://{TD}/appliance/app-2").try_into().unwrap(),
    ));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, params);

    let issued = ca.issue_appliance("app-1", &csr, now).unwrap();
    let i = check_leaf(&issued, now, 30);
    assert_eq!(i.cn, "app-1");
    assert_eq!(i.san_count, 1);
    assert_eq!(i.uris, vec![format!("spiffe://{TD}/appliance/app-1")]);
    assert!(i.dns.is_empty());
    assert!(i.client_auth && !i.server_auth);
    assert_eq!(i.is_ca, Some(false));
    let der = String::from_utf8_lossy(&issued.cert_der).into_owned();
    assert!(!der.contains("app-2") && !der.contains("evil.example"));
    verify_both(&ca, &issued.chain_pem, Purpose::Client, None);
}

#[test]
fn garbage_csr_is_malformed() {
    let (_dir, ca) = local_ca();
    let now = now();
    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        &pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
        // A certificate is not a CSR.
        &ca.root_pem(),
        // Two CSRs.
        &format!("{}{}", p256_csr(), p256_csr()),
    ] {
        assert_eq!(
            csr_err(ca.issue_appliance("app-1", garbage, now)),
            CsrError::Malformed,
            "{garbage:?}"
        );
    }
    // Trailing bytes after the DER request.
    let mut der = csr_der(&p256_csr());
    der.push(0);
    let csr = pem_encode("CERTIFICATE REQUEST", &der);
    assert_eq!(
        csr_err(ca.issue_appliance("app-1", &csr, now)),
        CsrError::Malformed
    );
    assert_eq!(CsrError::Malformed.code(), "csr_malformed");
}

#[test]
fn oversized_csr_is_refused_before_parsing() {
    let (_dir, ca) = local_ca();
    let csr = format!("{}{}", "#".repeat(8 * 1024), p256_csr());
    assert_eq!(
        csr_err(ca.issue_appliance("app-1", &csr, now())),
        CsrError::TooLarge
    );
    assert_eq!(ca.check_csr(&csr).unwrap_err(), CsrError::TooLarge);
    assert_eq!(CsrError::TooLarge.code(), "csr_too_large");
}

#[test]
fn csr_with_a_bad_signature_is_refused() {
    let (_dir, ca) = local_ca();
    for csr in [p256_csr(), ed25519_csr()] {
        let mut der = csr_der(&csr);
        // The signature is the last field: flip its last byte.
        *der.last_mut().unwrap() ^= 0x01;
        let bad = pem_encode("CERTIFICATE REQUEST", &der);
        assert_eq!(
            csr_err(ca.issue_appliance("app-1", &bad, now())),
            CsrError::BadSignature
        );
        // A signature over other content: swap in another CSR's key.
        assert!(ca.check_csr(&csr).is_ok());
    }
    assert_eq!(CsrError::BadSignature.code(), "csr_bad_signature");
}

#[test]
fn csr_from_another_key_is_refused() {
    // The request info of one CSR with the signature of another: no proof of possession.
    let (_dir, ca) = local_ca();
    let a = csr_der(&p256_csr());
    let b = csr_der(&p256_csr());
    // Outer SEQUENCE header, then the request info, then algorithm + signature.
    let split = |der: &[u8]| {
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der).unwrap();
        (header_len(der), csr.certification_request_info.raw.len())
    };
    let (ha, ia) = split(&a);
    let (hb, ib) = split(&b);
    let mut body = a[ha..ha + ia].to_vec();
    body.extend_from_slice(&b[hb + ib..]);
    let mut der = vec![0x30];
    der.extend(der_len(body.len()));
    der.extend(body);
    let mixed = pem_encode("CERTIFICATE REQUEST", &der);
    assert_eq!(ca.check_csr(&mixed).unwrap_err(), CsrError::BadSignature);
}

fn header_len(der: &[u8]) -> usize {
    if der[1] < 0x80 {
        2
    } else {
        2 + usize::from(der[1] & 0x7f)
    }
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else if n < 0x100 {
        vec![0x81, n as u8]
    } else {
        vec![0x82, (n >> 8) as u8, n as u8]
    }
}

#[test]
fn csr_with_a_disallowed_key_type_is_refused() {
    let (_dir, ca) = local_ca();
    // RSA, from openssl (ring cannot generate RSA keys).
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=app-1",
        ])
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rsa = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        csr_err(ca.issue_appliance("app-1", &rsa, now())),
        CsrError::KeyTypeNotAllowed("rsa".into())
    );

    // ECDSA on P-384: a curve we don't certify.
    let p384 = csr_for(&rcgen::PKCS_ECDSA_P384_SHA384, CertificateParams::default());
    let err = csr_err(ca.issue_appliance("app-1", &p384, now()));
    assert!(
        matches!(&err, CsrError::KeyTypeNotAllowed(t) if t.contains("ecdsa")),
        "{err:?}"
    );
    assert_eq!(err.code(), "csr_key_type_not_allowed");

    // Ed25519 and P-256 are fine.
    ca.check_csr(&ed25519_csr()).unwrap();
    ca.check_csr(&p256_csr()).unwrap();
}

#[test]
fn names_that_cannot_be_a_spiffe_segment_are_refused() {
    let (_dir, ca) = local_ca();
    for bad in ["", "..", "a/b", "a b", "é", &"x".repeat(129)] {
        let err = ca.issue_appliance(bad, &p256_csr(), now()).unwrap_err();
        assert!(
            matches!(
                err,
                CaError::InvalidName {
                    kind: "appliance_id",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
    let err = ca
        .issue_broker("b1", &p256_csr(), &["bad_name!".into()], &[], now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            CaError::InvalidName {
                kind: "dns_name",
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------
// KMS (moto)
// ---------------------------------------------------------------------------------------

fn kms_settings() -> KmsSettings {
    let url = std::env::var("TETHER_TEST_KMS_URL").unwrap_or_else(|_| {
        panic!(
            "TETHER_TEST_KMS_URL is not set: the KMS tests need the moto emulator; \
             run ./scripts/test (or `eval \"$(scripts/moto)\"` before cargo test)"
        )
    });
    KmsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(url),
        credentials: Some(StaticCredentials {
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            session_token: None,
        }),
        ..KmsSettings::default()
    }
}

/// A KMS client in the test, for setting up keys and aliases the way an operator would.
fn with_kms<T>(f: impl AsyncFnOnce(aws_sdk_kms::Client) -> T) -> T {
    let s = kms_settings();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new("us-east-1"))
            .endpoint_url(s.endpoint_url.unwrap())
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .build();
        f(aws_sdk_kms::Client::from_conf(conf)).await
    })
}

#[test]
fn kms_ca_issues_chains_that_independent_verifiers_accept() {
    let dir = tempfile::tempdir().unwrap();
    let now = now();
    let ca = Ca::init_kms(dir.path(), &cfg(), &kms_settings(), now).unwrap();
    let CaBackend::Kms(record) = ca.backend().clone() else {
        panic!("not a KMS CA")
    };
    assert!(record.root_key_arn.starts_with("arn:aws:kms:us-east-1:"));
    assert_ne!(record.root_key_arn, record.intermediate_key_arn);
    exercise(&ca, now);

    // The CA keys never touched the disk; the control key is the only local key.
    let ca_dir = dir.path().join("ca");
    assert!(!ca_dir.join("root.key").exists());
    assert!(!ca_dir.join("intermediate.key").exists());
    assert_eq!(mode(&ca_dir.join("control.key")), 0o600);
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ca_dir.join("kms.json")).unwrap()).unwrap();
    assert_eq!(
        recorded["intermediate_key_arn"],
        record.intermediate_key_arn.as_str()
    );

    // The root's public key is the KMS key's.
    let root_spki = {
        let (_, c) = x509_parser::parse_x509_certificate(ca.root_der()).unwrap();
        c.public_key().raw.to_vec()
    };
    let arn = record.root_key_arn.clone();
    let kms_spki = with_kms(async move |kms| {
        kms.get_public_key()
            .key_id(arn)
            .send()
            .await
            .unwrap()
            .public_key()
            .unwrap()
            .as_ref()
            .to_vec()
    });
    assert_eq!(root_spki, kms_spki);

    // load_kms: same root, issues through KMS again.
    let loaded = Ca::load_kms(dir.path(), &cfg(), &kms_settings()).unwrap();
    assert_eq!(loaded.root_pem(), ca.root_pem());
    assert_eq!(loaded.backend(), ca.backend());
    let a = loaded.issue_appliance("app-9", &p256_csr(), now).unwrap();
    check_leaf(&a, now, 30);
    verify_both(&loaded, &a.chain_pem, Purpose::Client, None);

    // Init twice refuses.
    assert!(matches!(
        Ca::init_kms(dir.path(), &cfg(), &kms_settings(), now),
        Err(CaError::AlreadyInitialised(_))
    ));
}

#[test]
fn kms_ca_uses_given_keys_and_aliases() {
    let (root_arn, alias) = with_kms(async |kms| {
        let mut arns = Vec::new();
        for _ in 0..2 {
            let out = kms
                .create_key()
                .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
                .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
                .send()
                .await
                .unwrap();
            arns.push(out.key_metadata().unwrap().arn().unwrap().to_owned());
        }
        let alias = format!("alias/tether-test-{}", fastrand::u64(..));
        kms.create_alias()
            .alias_name(&alias)
            .target_key_id(&arns[1])
            .send()
            .await
            .unwrap();
        (arns[0].clone(), (alias, arns[1].clone()))
    });
    let (alias, inter_arn) = alias;
    let settings = KmsSettings {
        root_key: Some(root_arn.clone()),
        intermediate_key: Some(alias),
        ..kms_settings()
    };
    let dir = tempfile::tempdir().unwrap();
    let now = now();
    let ca = Ca::init_kms(dir.path(), &cfg(), &settings, now).unwrap();
    let CaBackend::Kms(record) = ca.backend() else {
        panic!()
    };
    assert_eq!(record.root_key_arn, root_arn);
    // The alias is resolved and the key itself recorded.
    assert_eq!(record.intermediate_key_arn, inter_arn);
    let o = ca.issue_operator("alice", &p256_csr(), now).unwrap();
    check_leaf(&o, now, 365);
    verify_both(&ca, &o.chain_pem, Purpose::Client, None);
}

#[test]
fn kms_refuses_keys_that_are_not_p256_signing_keys() {
    let rsa = with_kms(async |kms| {
        kms.create_key()
            .key_spec(aws_sdk_kms::types::KeySpec::Rsa2048)
            .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
            .send()
            .await
            .unwrap()
            .key_metadata()
            .unwrap()
            .key_id()
            .to_owned()
    });
    let dir = tempfile::tempdir().unwrap();
    let settings = KmsSettings {
        root_key: Some(rsa),
        ..kms_settings()
    };
    let err = Ca::init_kms(dir.path(), &cfg(), &settings, now()).unwrap_err();
    assert!(
        matches!(&err, CaError::Kms(m) if m.contains("ECC_NIST_P256")),
        "{err:?}"
    );
    // Nothing was written.
    assert!(!dir.path().join("ca").exists());

    let same = KmsSettings {
        root_key: Some("alias/x".into()),
        intermediate_key: Some("alias/x".into()),
        ..kms_settings()
    };
    assert!(matches!(
        Ca::init_kms(dir.path(), &cfg(), &same, now()),
        Err(CaError::Config {
            field: "intermediate_key",
            ..
        })
    ));

    let missing = KmsSettings {
        root_key: Some("alias/does-not-exist".into()),
        ..kms_settings()
    };
    assert!(matches!(
        Ca::init_kms(dir.path(), &cfg(), &missing, now()),
        Err(CaError::Kms(_))
    ));
}

#[test]
fn kms_unreachable_is_a_kms_error() {
    let dir = tempfile::tempdir().unwrap();
    Ca::init_kms(dir.path(), &cfg(), &kms_settings(), now()).unwrap();
    // A closed port on loopback: refused at once (retries included, well under a second).
    let unreachable = KmsSettings {
        endpoint_url: Some("http://127.0.0.1:1".into()),
        ..kms_settings()
    };
    let err = Ca::load_kms(dir.path(), &cfg(), &unreachable).unwrap_err();
    assert!(matches!(err, CaError::Kms(_)), "{err:?}");
}

#[test]
fn chains_do_not_verify_under_another_root() {
    let (_d1, a) = local_ca();
    let (_d2, b) = local_ca();
    let issued = a.issue_appliance("app-1", &p256_csr(), now()).unwrap();
    assert!(openssl_verify(&b.root_pem(), &issued.chain_pem, Purpose::Client).is_err());
    assert!(webpki_client(&b.root_pem(), &issued.chain_pem).is_err());
    assert!(webpki_server(&b.root_pem(), &a.control_chain_pem(), "localhost").is_err());
}

#[test]
fn ca_can_be_shared_across_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Ca>();
    shared::<Issued>();
    shared::<CaError>();
}

/// KMS signing blocks on its own runtime, so it works from inside another runtime: in
/// `spawn_blocking` (what servers do) and even directly; dropping the CA there is fine.
#[tokio::test]
async fn kms_ca_works_inside_a_tokio_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let now = now();
    let ca = Arc::new(Ca::init_kms(dir.path(), &cfg(), &kms_settings(), now).unwrap());
    let shared = ca.clone();
    let issued =
        tokio::task::spawn_blocking(move || shared.issue_appliance("app-1", &p256_csr(), now))
            .await
            .unwrap()
            .unwrap();
    verify_both(&ca, &issued.chain_pem, Purpose::Client, None);
    let direct = ca.issue_appliance("app-2", &p256_csr(), now).unwrap();
    verify_both(&ca, &direct.chain_pem, Purpose::Client, None);
    drop(ca);
    let loaded = Ca::load_kms(dir.path(), &cfg(), &kms_settings()).unwrap();
    drop(loaded);
}
