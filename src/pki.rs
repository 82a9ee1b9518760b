//! A small, real development PKI for integration tests, benches and the `tether up` demo.
//!
//! It mirrors the identities of docs/ARCHITECTURE.md ("Identity model"): a self-signed
//! root (10 years), an intermediate signed by it (2 years, path length 0), and 30-day
//! leaves carrying a SPIFFE URI SAN:
//! `spiffe://<trust-domain>/appliance/<id>` (clientAuth) and
//! `spiffe://<trust-domain>/broker/<name>` (serverAuth + clientAuth).
//!
//! Every property of a leaf can be varied through [`LeafSpec`], so tests can also make
//! bad certificates on purpose (expired, wrong EKU, wrong SAN, other algorithm, ...).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let pki = tether::pki::Pki::new("tether.test")?;
//! let appliance = pki.appliance("app-1")?;
//! let broker = pki.broker("b1")?;
//! println!("{}", appliance.fingerprint_hex());
//! # let _ = broker;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::Context;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SignatureAlgorithm,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// How far in the past certificates start being valid, to tolerate clock skew.
const BACKDATE: Duration = Duration::hours(1);
/// Root CA validity (10 years).
const ROOT_VALIDITY: Duration = Duration::days(3650);
/// Intermediate CA validity (2 years).
const INTERMEDIATE_VALIDITY: Duration = Duration::days(730);
/// Leaf validity (30 days).
const LEAF_VALIDITY: Duration = Duration::days(30);

/// Key algorithm for leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KeyAlg {
    /// ECDSA on NIST P-256 with SHA-256 (the default).
    #[default]
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

impl KeyAlg {
    fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlg::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlg::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// A CA (root or intermediate) that can sign leaves.
pub struct Ca {
    /// The rcgen issuer; owns the CA's signing key.
    issuer: Issuer<'static, KeyPair>,
    common_name: String,
    cert_der: Vec<u8>,
    cert_pem: String,
    /// Certificates a leaf issued by this CA presents after itself: this CA and every
    /// intermediate above it, root excluded. Empty for a root.
    chain_der: Vec<Vec<u8>>,
}

impl Ca {
    /// Self-signed root, ECDSA P-256, CA:true, key usage keyCertSign+cRLSign, validity 10y (from now - 1h).
    pub fn new_root(common_name: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating root CA key")?;
        let now = OffsetDateTime::now_utc();
        let params = ca_params(
            common_name,
            now - BACKDATE,
            now + ROOT_VALIDITY,
            BasicConstraints::Unconstrained,
        )?;
        let cert = params
            .self_signed(&key)
            .with_context(|| format!("self-signing root CA {common_name:?}"))?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            common_name: common_name.to_owned(),
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            chain_der: Vec::new(),
        })
    }

    /// Intermediate signed by self, pathlen 0, validity 2 years (from now - 1h).
    pub fn new_intermediate(&self, common_name: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating intermediate CA key")?;
        let now = OffsetDateTime::now_utc();
        let mut params = ca_params(
            common_name,
            now - BACKDATE,
            now + INTERMEDIATE_VALIDITY,
            BasicConstraints::Constrained(0),
        )?;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).with_context(|| {
            format!(
                "signing intermediate CA {common_name:?} by {:?}",
                self.common_name
            )
        })?;
        let cert_der = cert.der().to_vec();
        let mut chain_der = Vec::with_capacity(self.chain_der.len() + 1);
        chain_der.push(cert_der.clone());
        chain_der.extend(self.chain_der.iter().cloned());
        Ok(Ca {
            issuer: Issuer::new(params, key),
            common_name: common_name.to_owned(),
            cert_der,
            cert_pem: cert.pem(),
            chain_der,
        })
    }

    /// The CA's subject common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// DER of the CA certificate.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// PEM of the CA certificate.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate as a rustls type (e.g. to add to a `RootCertStore`).
    pub fn rustls_cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// Whether this CA is a self-signed root (rather than an intermediate).
    pub fn is_root(&self) -> bool {
        self.chain_der.is_empty()
    }

    /// What a leaf issued by this CA sends after itself: this CA and the intermediates
    /// above it, root excluded (empty for a root).
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }

    /// PKCS#8 PEM of the CA's private key (e.g. for the `tether up` demo's control).
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", self.issuer.key().serialized_der())
    }

    /// Sign a leaf described by `spec`, with a freshly generated key.
    pub fn issue(&self, spec: &LeafSpec) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate_for(spec.key_alg.signature_algorithm())
            .with_context(|| format!("generating {:?} leaf key", spec.key_alg))?;

        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished_name(&spec.common_name);
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.server_auth {
            params.insert_extended_key_usage(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params.insert_extended_key_usage(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;

        let mut sans = Vec::with_capacity(spec.uris.len() + spec.dns_names.len() + spec.ips.len());
        for uri in &spec.uris {
            let uri = Ia5String::try_from(uri.as_str())
                .with_context(|| format!("SAN URI {uri:?} is not IA5 (ASCII)"))?;
            sans.push(SanType::URI(uri));
        }
        for name in &spec.dns_names {
            let name = Ia5String::try_from(name.as_str())
                .with_context(|| format!("SAN DNS name {name:?} is not IA5 (ASCII)"))?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(spec.ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;

        let cert = params.signed_by(&key, &self.issuer).with_context(|| {
            format!(
                "signing leaf {:?} by {:?}",
                spec.common_name, self.common_name
            )
        })?;
        Ok(Leaf {
            cert_der: cert.der().to_vec(),
            chain_der: self.chain_der.clone(),
            key_pkcs8_der: key.serialize_der(),
        })
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("common_name", &self.common_name)
            .field("is_root", &self.is_root())
            .field("fingerprint", &fingerprint_hex(&self.cert_der))
            .finish_non_exhaustive()
    }
}

/// A two-tier PKI: root -> intermediate, as Tether's control would run.
#[derive(Debug)]
pub struct Pki {
    /// Self-signed root CA (what agents pin).
    pub root: Ca,
    /// Intermediate CA signed by the root; issues all leaves.
    pub intermediate: Ca,
    /// SPIFFE trust domain, e.g. `tether.test`.
    pub trust_domain: String,
}

impl Pki {
    /// A fresh root and intermediate for `trust_domain`.
    ///
    /// The trust domain must be valid (`tether_identity::TrustDomain`).
    pub fn new(trust_domain: &str) -> anyhow::Result<Pki> {
        if let Err(e) = tether_identity::TrustDomain::new(trust_domain) {
            anyhow::bail!("invalid SPIFFE trust domain {trust_domain:?}: {e}");
        }
        let root = Ca::new_root(&format!("Tether Dev Root CA ({trust_domain})"))?;
        let intermediate =
            root.new_intermediate(&format!("Tether Dev Intermediate CA ({trust_domain})"))?;
        Ok(Pki {
            root,
            intermediate,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// PEM bundle of root + intermediate (what the broker's `[tls] ca` file holds).
    pub fn ca_bundle_pem(&self) -> String {
        let mut pem = self.root.cert_pem();
        pem.push_str(&self.intermediate.cert_pem());
        pem
    }

    /// Root only PEM (what an agent pins as ca.cert.pem).
    pub fn root_pem(&self) -> String {
        self.root.cert_pem()
    }

    /// A rustls root store holding only the root, for building verifiers in tests.
    pub fn rustls_roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.root.rustls_cert())
            .context("adding root CA to rustls root store")?;
        Ok(roots)
    }

    /// Appliance leaf: SAN URI spiffe://<td>/appliance/<id>, EKU clientAuth, 30 days, ECDSA P-256, issued by the intermediate.
    pub fn appliance(&self, id: &str) -> anyhow::Result<Leaf> {
        self.intermediate
            .issue(&LeafSpec::appliance(&self.trust_domain, id))
    }

    /// Broker leaf: SAN URI spiffe://<td>/broker/<name>, plus DNS "localhost" and IP 127.0.0.1 and ::1, EKU serverAuth+clientAuth, 30 days.
    pub fn broker(&self, name: &str) -> anyhow::Result<Leaf> {
        self.intermediate
            .issue(&LeafSpec::broker(&self.trust_domain, name))
    }
}

/// SPIFFE ID of an appliance: `spiffe://<td>/appliance/<id>`.
///
/// Formatted as given, not through `tether_identity::SpiffeId`: this PKI exists to mint
/// test certificates, including ones naming ids the identity rule refuses (attack tests).
pub fn appliance_spiffe_id(trust_domain: &str, id: &str) -> String {
    format!("spiffe://{trust_domain}/appliance/{id}")
}

/// SPIFFE ID of a broker: `spiffe://<td>/broker/<name>`.
pub fn broker_spiffe_id(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/broker/{name}")
}

/// Everything that can be varied about a leaf, so tests can make bad certificates on purpose.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// SAN URIs.
    pub uris: Vec<String>,
    /// SAN DNS names.
    pub dns_names: Vec<String>,
    /// SAN IP addresses.
    pub ips: Vec<IpAddr>,
    /// EKU clientAuth.
    pub client_auth: bool,
    /// EKU serverAuth.
    pub server_auth: bool,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Algorithm of the leaf's key (the signature is always by the issuing CA's key).
    pub key_alg: KeyAlg,
    /// Subject common name.
    pub common_name: String,
}

impl LeafSpec {
    /// Default appliance spec: one URI spiffe://<td>/appliance/<id>, clientAuth only, now-1h .. now+30d, P-256.
    pub fn appliance(trust_domain: &str, id: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            uris: vec![appliance_spiffe_id(trust_domain, id)],
            dns_names: Vec::new(),
            ips: Vec::new(),
            client_auth: true,
            server_auth: false,
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
            key_alg: KeyAlg::EcdsaP256,
            common_name: id.to_owned(),
        }
    }

    /// Default broker spec: URI spiffe://<td>/broker/<name>, DNS `localhost`, IPs 127.0.0.1
    /// and ::1, serverAuth + clientAuth, now-1h .. now+30d, P-256.
    pub fn broker(trust_domain: &str, name: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            uris: vec![broker_spiffe_id(trust_domain, name)],
            dns_names: vec!["localhost".to_owned()],
            ips: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            client_auth: true,
            server_auth: true,
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
            key_alg: KeyAlg::EcdsaP256,
            common_name: name.to_owned(),
        }
    }
}

/// An issued leaf with its key and the chain up to (not including) the root.
#[derive(Clone)]
pub struct Leaf {
    /// DER of the leaf certificate.
    pub cert_der: Vec<u8>,
    /// Intermediates that signed it, nearest first (for a leaf issued by the
    /// intermediate: `[intermediate]`); empty if issued by a root.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER of the leaf's private key.
    pub key_pkcs8_der: Vec<u8>,
}

impl Leaf {
    /// PEM: leaf then chain (the format of client.cert.pem / broker.pem).
    pub fn chain_pem(&self) -> String {
        std::iter::once(&self.cert_der)
            .chain(&self.chain_der)
            .map(|der| pem_encode("CERTIFICATE", der))
            .collect()
    }

    /// PKCS#8 private key PEM.
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.key_pkcs8_der)
    }

    /// Lowercase hex SHA-256 of the leaf DER (Tether's fingerprint).
    pub fn fingerprint_hex(&self) -> String {
        fingerprint_hex(&self.cert_der)
    }

    /// The leaf as a rustls type, without the chain.
    pub fn rustls_cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// rustls types for building client/server configs directly in tests: leaf then chain.
    pub fn rustls_chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(&self.cert_der)
            .chain(&self.chain_der)
            .map(|der| CertificateDer::from(der.clone()))
            .collect()
    }

    /// The private key as a rustls type.
    pub fn rustls_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }

    /// Write the agent's state-dir layout into `dir` (created if missing):
    /// `client.key.pem` (mode 0600 on Unix), `client.cert.pem` (leaf + chain) and
    /// `ca.cert.pem` = `root_pem`.
    pub fn write_agent_state(&self, dir: &Path, root_pem: &str) -> anyhow::Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_private(&dir.join("client.key.pem"), self.key_pem().as_bytes())?;
        let cert_path = dir.join("client.cert.pem");
        fs::write(&cert_path, self.chain_pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        let ca_path = dir.join("ca.cert.pem");
        fs::write(&ca_path, root_pem).with_context(|| format!("writing {}", ca_path.display()))?;
        Ok(())
    }
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("fingerprint", &self.fingerprint_hex())
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}

/// Lowercase hex SHA-256 of a DER certificate (Tether's fingerprint).
pub use tether_identity::fingerprint::hex_of as fingerprint_hex;

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether Dev");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ca_params(
    common_name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    constraints: BasicConstraints,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = distinguished_name(common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Write a secret file readable by its owner only (mode 0600 on Unix, also when it
/// already existed with looser permissions).
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
        write_all(file, path, contents)
    }
    #[cfg(not(unix))]
    {
        let file = options
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        write_all(file, path, contents)
    }
}

fn write_all(mut file: fs::File, path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// RFC 7468 PEM: standard base64 with padding, 64-character lines, LF line endings.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (n >> (18 - 6 * i)) & 0x3f;
                b64.push(ALPHABET[sextet as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&c| char::from(c)));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::server::danger::ClientCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{CertificateError, Error};

    use super::*;

    const TD: &str = "tether.test";

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn client_verifier(pki: &Pki) -> Arc<dyn ClientCertVerifier> {
        WebPkiClientVerifier::builder_with_provider(
            Arc::new(pki.rustls_roots().unwrap()),
            provider(),
        )
        .build()
        .unwrap()
    }

    fn server_verifier(pki: &Pki) -> Arc<WebPkiServerVerifier> {
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(pki.rustls_roots().unwrap()),
            provider(),
        )
        .build()
        .unwrap()
    }

    fn verify_client(pki: &Pki, leaf: &Leaf) -> Result<(), Error> {
        let chain = leaf.rustls_chain();
        client_verifier(pki)
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map(|_| ())
    }

    fn verify_server(pki: &Pki, leaf: &Leaf, name: &str) -> Result<(), Error> {
        let chain = leaf.rustls_chain();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        server_verifier(pki)
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn appliance_leaf_chains_to_root() {
        let pki = Pki::new(TD).unwrap();
        let leaf = pki.appliance("app-1").unwrap();
        assert_eq!(leaf.chain_der, vec![pki.intermediate.cert_der().to_vec()]);

        // Exactly the call the broker makes: leaf + [intermediate] against the root.
        let leaf_der = leaf.rustls_cert();
        let intermediate = pki.intermediate.rustls_cert();
        client_verifier(&pki)
            .verify_client_cert(&leaf_der, &[intermediate], UnixTime::now())
            .expect("appliance leaf verifies as a client");

        // The SPIFFE URI is in the DER as an IA5 string.
        let uri = appliance_spiffe_id(TD, "app-1");
        assert!(leaf
            .cert_der
            .windows(uri.len())
            .any(|w| w == uri.as_bytes()));

        // Its key is usable by rustls.
        provider()
            .key_provider
            .load_private_key(leaf.rustls_key())
            .expect("rustls loads the P-256 key");
    }

    #[test]
    fn appliance_leaf_is_not_a_server_cert() {
        let pki = Pki::new(TD).unwrap();
        let leaf = pki.appliance("app-1").unwrap();
        let err = verify_server(&pki, &leaf, "localhost").unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(
                    CertificateError::InvalidPurpose
                        | CertificateError::InvalidPurposeContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn broker_leaf_verifies_as_server_and_client() {
        let pki = Pki::new(TD).unwrap();
        let leaf = pki.broker("b1").unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            verify_server(&pki, &leaf, name)
                .unwrap_or_else(|e| panic!("broker leaf for {name}: {e:?}"));
        }
        verify_client(&pki, &leaf).expect("broker leaf verifies as a client");
        assert!(verify_server(&pki, &leaf, "example.com").is_err());
    }

    #[test]
    fn expired_leaf_is_refused() {
        let pki = Pki::new(TD).unwrap();
        let now = OffsetDateTime::now_utc();
        let spec = LeafSpec {
            not_before: now - Duration::days(60),
            not_after: now - Duration::days(30),
            ..LeafSpec::appliance(TD, "app-old")
        };
        let leaf = pki.intermediate.issue(&spec).unwrap();
        let err = verify_client(&pki, &leaf).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn leaf_from_another_pki_is_refused() {
        let pki = Pki::new(TD).unwrap();

        // Another trust domain: its intermediate's issuer name matches nothing we trust.
        let other = Pki::new("other.test").unwrap();
        let err = verify_client(&pki, &other.appliance("app-1").unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );

        // Same trust domain, so the same CA names: the path is built by name up to our
        // root, and then the signature check refuses it.
        let twin = Pki::new(TD).unwrap();
        let err = verify_client(&pki, &twin.appliance("app-1").unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(
                    CertificateError::BadSignature | CertificateError::UnknownIssuer
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn ed25519_leaf_verifies() {
        let pki = Pki::new(TD).unwrap();
        let spec = LeafSpec {
            key_alg: KeyAlg::Ed25519,
            ..LeafSpec::appliance(TD, "app-ed")
        };
        let leaf = pki.intermediate.issue(&spec).unwrap();
        verify_client(&pki, &leaf).expect("Ed25519 leaf verifies");
        provider()
            .key_provider
            .load_private_key(leaf.rustls_key())
            .expect("rustls loads the Ed25519 key");
    }

    #[test]
    fn leaf_issued_by_root_has_empty_chain() {
        let pki = Pki::new(TD).unwrap();
        assert!(pki.root.is_root());
        assert!(!pki.intermediate.is_root());
        let leaf = pki.root.issue(&LeafSpec::appliance(TD, "app-1")).unwrap();
        assert!(leaf.chain_der.is_empty());
        verify_client(&pki, &leaf).expect("root-issued leaf verifies");
    }

    #[test]
    fn fingerprint_is_sha256_lowercase_hex() {
        let pki = Pki::new(TD).unwrap();
        let leaf = pki.appliance("app-1").unwrap();
        let fp = leaf.fingerprint_hex();
        assert_eq!(fp.len(), 64);
        assert!(fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        let digest = ring::digest::digest(&ring::digest::SHA256, &leaf.cert_der);
        let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fp, expected);
        assert_eq!(fingerprint_hex(&leaf.cert_der), fp);
        assert_ne!(pki.appliance("app-1").unwrap().fingerprint_hex(), fp);
    }

    #[test]
    fn pem_round_trips() {
        let pki = Pki::new(TD).unwrap();
        let leaf = pki.appliance("app-1").unwrap();

        let certs: Vec<_> = CertificateDer::pem_slice_iter(leaf.chain_pem().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs, leaf.rustls_chain());

        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem().as_bytes()).unwrap();
        assert_eq!(key, leaf.rustls_key());

        let bundle: Vec<_> = CertificateDer::pem_slice_iter(pki.ca_bundle_pem().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            bundle,
            vec![pki.root.rustls_cert(), pki.intermediate.rustls_cert()]
        );
        assert_eq!(pki.root_pem(), pki.root.cert_pem());

        // Our encoder agrees with rcgen's for the CA certificate.
        assert_eq!(
            pem_encode("CERTIFICATE", pki.root.cert_der()),
            pki.root.cert_pem()
        );
        PrivateKeyDer::from_pem_slice(pki.root.key_pem().as_bytes()).unwrap();

        // Padding cases.
        assert_eq!(pem_encode("X", b""), "-----BEGIN X-----\n-----END X-----\n");
        assert!(pem_encode("X", b"f").contains("\nZg==\n"));
        assert!(pem_encode("X", b"fo").contains("\nZm8=\n"));
        assert!(pem_encode("X", b"foo").contains("\nZm9v\n"));
    }

    #[test]
    fn writes_agent_state() {
        let pki = Pki::new(TD).unwrap();
        let leaf = pki.appliance("app-1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        leaf.write_agent_state(&state, &pki.root_pem()).unwrap();

        assert_eq!(
            fs::read_to_string(state.join("client.key.pem")).unwrap(),
            leaf.key_pem()
        );
        assert_eq!(
            fs::read_to_string(state.join("client.cert.pem")).unwrap(),
            leaf.chain_pem()
        );
        assert_eq!(
            fs::read_to_string(state.join("ca.cert.pem")).unwrap(),
            pki.root_pem()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(state.join("client.key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Rewriting over existing files works.
        leaf.write_agent_state(&state, &pki.root_pem()).unwrap();
    }

    #[test]
    fn rejects_bad_trust_domain() {
        assert!(Pki::new("").is_err());
        assert!(Pki::new("Tether.Test").is_err());
        assert!(Pki::new("a/b").is_err());
    }
}
