//! The control-mode data directory: the broker's identity, credential and cached allowlist.
//!
//! | file | contents |
//! |---|---|
//! | `broker.json` | [`BrokerIdentity`]: name, trust domain, control URL |
//! | `ca.pem` | the root CA (control's certificate and every appliance chain to it) |
//! | `broker.pem` | the broker's chain: leaf (`spiffe://<td>/broker/<name>`), intermediate |
//! | `broker.key` | its private key (PKCS#8 PEM, mode 0600) |
//! | `allowlist.snapshot` | the last allowlist from control ([`crate::snapshot`]) |
//!
//! Every file is written with [`write_atomic`] (temporary file, fsync, rename, fsync of
//! the folder). A renewal replaces the key and the chain together: both are first written
//! as `broker.key.next` and `broker.pem.next` (the chain last, and itself atomically), then
//! renamed into place, key first. A crash between the two renames leaves
//! `broker.pem.next`, which [`DataDir::load`] finishes moving, so the key and the chain on
//! disk always match.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tether_api::brokers::BrokerBundle;
use thiserror::Error;

/// `broker.json`.
pub const IDENTITY_FILE: &str = "broker.json";
/// `ca.pem`.
pub const CA_FILE: &str = "ca.pem";
/// `broker.pem`.
pub const CERT_FILE: &str = "broker.pem";
/// `broker.key`.
pub const KEY_FILE: &str = "broker.key";
/// `allowlist.snapshot`.
pub const SNAPSHOT_FILE: &str = "allowlist.snapshot";
/// Fingerprints removed since the snapshot was written, `<version> <sha256-hex>` per line,
/// appended and synced before the removal is acknowledged (see
/// [`crate::snapshot::SnapshotWriter::record_removed`]).
pub const REVOKED_JOURNAL_FILE: &str = "allowlist.revoked";
/// Suffix of the files of a renewal in progress.
const NEXT: &str = ".next";

/// Who this broker is (`broker.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerIdentity {
    /// The broker's name (its certificate says `spiffe://<td>/broker/<name>`).
    pub name: String,
    /// The trust domain.
    pub trust_domain: String,
    /// Control's base URL (`https://host:port`).
    pub control_url: String,
}

/// The stored credential, loaded.
pub struct StoredCredential {
    /// Who we are.
    pub identity: BrokerIdentity,
    /// The root CA certificates.
    pub ca: Vec<CertificateDer<'static>>,
    /// Our chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            identity,
            ca,
            chain,
            key: _,
        } = self;
        f.debug_struct("StoredCredential")
            .field("identity", identity)
            .field("ca", &ca.len())
            .field("chain", &chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A data directory or bundle that cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's contents are not usable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No credential yet and no bundle to enroll with.
    #[error(
        "no broker credential in {0}: start once with --bundle FILE (from `tether broker add NAME`)"
    )]
    NotEnrolled(PathBuf),
}

/// A broker bundle that cannot be used. The operator needs a new one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not the JSON of a bundle.
    #[error("not a broker bundle: {0}")]
    Malformed(String),
    /// The name is not 1–128 characters of `[A-Za-z0-9._-]`.
    #[error("bundle has an invalid broker name")]
    InvalidName,
    /// The trust domain is not valid.
    #[error("bundle has an invalid trust domain")]
    InvalidTrustDomain,
    /// The control URL is not `https://host[:port]`.
    #[error("bundle control_url must be https://host[:port], got {0:?}")]
    InvalidControlUrl(String),
    /// The CA PEM holds no certificate.
    #[error("bundle ca_pem holds no certificate")]
    NoCaCertificate,
    /// The token is empty.
    #[error("bundle has no enrollment token")]
    NoToken,
    /// The token has expired.
    #[error(
        "bundle expired at {expired_at} (Unix seconds); ask for a new one with `tether broker add`"
    )]
    Expired {
        /// `expires_at` of the bundle.
        expired_at: u64,
    },
}

/// Parse and check a bundle at `now` (Unix seconds).
pub fn parse_bundle(bytes: &[u8], now: u64) -> Result<BrokerBundle, BundleError> {
    let b: BrokerBundle =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if !tether_identity::BrokerName::is_valid(&b.name) {
        return Err(BundleError::InvalidName);
    }
    if !tether_identity::TrustDomain::is_valid(&b.trust_domain) {
        return Err(BundleError::InvalidTrustDomain);
    }
    check_control_url(&b.control_url)
        .map_err(|_| BundleError::InvalidControlUrl(b.control_url.clone()))?;
    if parse_certs(b.ca_pem.as_bytes())
        .map(|c| c.is_empty())
        .unwrap_or(true)
    {
        return Err(BundleError::NoCaCertificate);
    }
    if b.token.trim().is_empty() {
        return Err(BundleError::NoToken);
    }
    if b.expires_at <= now {
        return Err(BundleError::Expired {
            expired_at: b.expires_at,
        });
    }
    Ok(b)
}

/// Check that `url` is `https://host[:port][/]`; returns `(host, port)`.
pub fn check_control_url(url: &str) -> Result<(String, u16), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if parsed.scheme() != "https" {
        return Err("scheme must be https".into());
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("no host")?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || parsed.path() != "/" {
        return Err("must be a base URL with no path".into());
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, parsed.port_or_known_default().unwrap_or(443)))
}

/// Every certificate in PEM text.
pub fn parse_certs(pem: &[u8]) -> std::io::Result<Vec<CertificateDer<'static>>> {
    rustls_pemfile::certs(&mut &pem[..]).collect()
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Open (and create, mode 0700) the directory.
    pub fn open(root: &Path) -> Result<DataDir, DataDirError> {
        std::fs::create_dir_all(root).map_err(|source| DataDirError::Io {
            path: root.to_owned(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700));
        }
        Ok(DataDir {
            root: root.to_owned(),
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Whether a credential is stored (`broker.json` exists).
    pub fn is_enrolled(&self) -> bool {
        self.path(IDENTITY_FILE).exists()
    }

    fn io(&self, name: &str) -> impl FnOnce(std::io::Error) -> DataDirError {
        let path = self.path(name);
        move |source| DataDirError::Io { path, source }
    }

    /// Store a fresh enrollment: identity, CA, chain, key.
    pub fn save_enrolled(
        &self,
        identity: &BrokerIdentity,
        ca_pem: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<(), DataDirError> {
        write_atomic(&self.path(CA_FILE), ca_pem.as_bytes(), None).map_err(self.io(CA_FILE))?;
        self.save_renewed(chain_pem, key_pem)?;
        let json = serde_json::to_vec_pretty(identity).map_err(|e| DataDirError::Invalid {
            path: self.path(IDENTITY_FILE),
            reason: e.to_string(),
        })?;
        // Last: its presence means the rest is complete.
        write_atomic(&self.path(IDENTITY_FILE), &json, None).map_err(self.io(IDENTITY_FILE))
    }

    /// Replace the key and the chain together (see the module documentation).
    pub fn save_renewed(&self, chain_pem: &str, key_pem: &str) -> Result<(), DataDirError> {
        let key_next = format!("{KEY_FILE}{NEXT}");
        let cert_next = format!("{CERT_FILE}{NEXT}");
        write_atomic(&self.path(&key_next), key_pem.as_bytes(), Some(0o600))
            .map_err(self.io(&key_next))?;
        write_atomic(&self.path(&cert_next), chain_pem.as_bytes(), None)
            .map_err(self.io(&cert_next))?;
        self.finish_swap()
    }

    /// Move `*.next` into place: the key (if still there), then the chain.
    fn finish_swap(&self) -> Result<(), DataDirError> {
        let key_next = self.path(&format!("{KEY_FILE}{NEXT}"));
        let cert_next = self.path(&format!("{CERT_FILE}{NEXT}"));
        if !cert_next.exists() {
            return Ok(());
        }
        if key_next.exists() {
            std::fs::rename(&key_next, self.path(KEY_FILE)).map_err(self.io(KEY_FILE))?;
        }
        std::fs::rename(&cert_next, self.path(CERT_FILE)).map_err(self.io(CERT_FILE))?;
        sync_dir(&self.root).map_err(self.io("."))
    }

    /// Load the stored credential, finishing an interrupted renewal first.
    pub fn load(&self) -> Result<StoredCredential, DataDirError> {
        if !self.is_enrolled() {
            return Err(DataDirError::NotEnrolled(self.root.clone()));
        }
        self.finish_swap()?;
        let invalid = |name: &str, reason: String| DataDirError::Invalid {
            path: self.path(name),
            reason,
        };
        let json = std::fs::read(self.path(IDENTITY_FILE)).map_err(self.io(IDENTITY_FILE))?;
        let identity: BrokerIdentity =
            serde_json::from_slice(&json).map_err(|e| invalid(IDENTITY_FILE, e.to_string()))?;
        if let Err(e) = tether_identity::BrokerName::new(&identity.name) {
            return Err(invalid(IDENTITY_FILE, e.to_string()));
        }
        if let Err(e) = tether_identity::TrustDomain::new(&identity.trust_domain) {
            return Err(invalid(IDENTITY_FILE, e.to_string()));
        }
        check_control_url(&identity.control_url)
            .map_err(|e| invalid(IDENTITY_FILE, format!("control_url: {e}")))?;
        let ca = std::fs::read(self.path(CA_FILE)).map_err(self.io(CA_FILE))?;
        let ca = parse_certs(&ca).map_err(|e| invalid(CA_FILE, e.to_string()))?;
        if ca.is_empty() {
            return Err(invalid(CA_FILE, "no certificate".into()));
        }
        let chain = std::fs::read(self.path(CERT_FILE)).map_err(self.io(CERT_FILE))?;
        let chain = parse_certs(&chain).map_err(|e| invalid(CERT_FILE, e.to_string()))?;
        if chain.is_empty() {
            return Err(invalid(CERT_FILE, "no certificate".into()));
        }
        let key = std::fs::read(self.path(KEY_FILE)).map_err(self.io(KEY_FILE))?;
        let key = rustls_pemfile::private_key(&mut key.as_slice())
            .map_err(|e| invalid(KEY_FILE, e.to_string()))?
            .ok_or_else(|| invalid(KEY_FILE, "no private key".into()))?;
        Ok(StoredCredential {
            identity,
            ca,
            chain,
            key,
        })
    }
}

/// Write `bytes` to `path` atomically (see [`tether_identity::fs::write_atomic`]), mode
/// 0644 unless `mode` says otherwise.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    tether_identity::fs::write_atomic(path, bytes, mode.unwrap_or(0o644))
}

use tether_identity::fs::sync_dir;

/// The QUIC stateless-reset key (32 random bytes, mode 0600): kept across restarts so
/// that a broker started again on the same address answers its previous life's
/// connections with resets their agents accept, and they reconnect at once instead of
/// waiting out the idle timeout.
pub const RESET_KEY_FILE: &str = "quic-reset.key";

/// The stateless-reset key in `root`, made (randomly) if there is none or it is not 32
/// bytes.
pub fn reset_key(root: &Path) -> std::io::Result<[u8; 32]> {
    let path = root.join(RESET_KEY_FILE);
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(key);
        }
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("no randomness for the stateless-reset key"))?;
    write_atomic(&path, &key, Some(0o600))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

    fn bundle_json(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::json!({
            "name": "edge-1",
            "trust_domain": "example.test",
            "control_url": "https://127.0.0.1:8443",
            "ca_pem": ca_pem(),
            "token": "secret-token",
            "expires_at": 2_000,
        });
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_good_bundle_parses() {
        let b = parse_bundle(&bundle_json(|_| {}), 1_000).unwrap();
        assert_eq!(b.name, "edge-1");
        assert_eq!(
            check_control_url(&b.control_url).unwrap(),
            ("127.0.0.1".to_owned(), 8443)
        );
    }

    #[test]
    fn bad_bundles_are_refused_with_the_reason() {
        assert!(matches!(
            parse_bundle(b"not json", 0),
            Err(BundleError::Malformed(_))
        ));
        assert!(matches!(
            parse_bundle(b"{\"name\":\"x\"}", 0),
            Err(BundleError::Malformed(_))
        ));
        let cases: Vec<(Edit, BundleError)> = vec![
            (
                Box::new(|v| v["name"] = "a b".into()),
                BundleError::InvalidName,
            ),
            (
                Box::new(|v| v["trust_domain"] = "Bad/TD".into()),
                BundleError::InvalidTrustDomain,
            ),
            (
                Box::new(|v| v["control_url"] = "http://c:80".into()),
                BundleError::InvalidControlUrl("http://c:80".into()),
            ),
            (
                Box::new(|v| v["ca_pem"] = "garbage".into()),
                BundleError::NoCaCertificate,
            ),
            (Box::new(|v| v["token"] = " ".into()), BundleError::NoToken),
            (
                Box::new(|v| v["expires_at"] = 999.into()),
                BundleError::Expired { expired_at: 999 },
            ),
        ];
        for (edit, want) in cases {
            assert_eq!(parse_bundle(&bundle_json(edit), 1_000).unwrap_err(), want);
        }
    }

    #[test]
    fn control_urls_must_be_https_bases() {
        assert_eq!(
            check_control_url("https://[::1]:9000/").unwrap(),
            ("::1".to_owned(), 9000)
        );
        assert_eq!(
            check_control_url("https://control.example.test").unwrap(),
            ("control.example.test".to_owned(), 443)
        );
        assert!(check_control_url("https://c/x").is_err());
        assert!(check_control_url("https://u:p@c").is_err());
        assert!(check_control_url("c:443").is_err());
    }

    #[test]
    fn without_a_credential_load_says_how_to_enroll() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let err = d.load().unwrap_err();
        assert!(matches!(err, DataDirError::NotEnrolled(_)));
        assert!(err.to_string().contains("--bundle"), "{err}");
    }

    #[test]
    fn an_interrupted_renewal_is_finished_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let identity = BrokerIdentity {
            name: "edge-1".into(),
            trust_domain: "example.test".into(),
            control_url: "https://127.0.0.1:1".into(),
        };
        d.save_enrolled(&identity, &ca_pem(), &cert.pem(), &key.serialize_pem())
            .unwrap();
        // A renewal that crashed after the key was moved, before the chain was.
        let key2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert2 = rcgen::CertificateParams::new(vec!["y".into()])
            .unwrap()
            .self_signed(&key2)
            .unwrap();
        write_atomic(
            &d.path(KEY_FILE),
            key2.serialize_pem().as_bytes(),
            Some(0o600),
        )
        .unwrap();
        write_atomic(&d.path("broker.pem.next"), cert2.pem().as_bytes(), None).unwrap();
        let stored = d.load().unwrap();
        assert_eq!(stored.identity, identity);
        assert_eq!(stored.chain[0].as_ref(), cert2.der().as_ref());
        assert!(!d.path("broker.pem.next").exists());
        let dbg = format!("{stored:?}");
        assert!(
            dbg.contains("redacted") && !dbg.contains("PRIVATE"),
            "{dbg}"
        );
    }

    #[test]
    fn the_reset_key_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = reset_key(dir.path()).unwrap();
        assert_eq!(
            reset_key(dir.path()).unwrap(),
            a,
            "read back, not made again"
        );
        assert_ne!(a, [0u8; 32]);
        std::fs::write(dir.path().join(RESET_KEY_FILE), b"short").unwrap();
        let b = reset_key(dir.path()).unwrap();
        assert_ne!(b, a, "a damaged key is replaced");
        assert_eq!(reset_key(dir.path()).unwrap(), b);
    }
}
