//! The two-tier CA: a root (10 years, self-signed), an intermediate (2 years, signed by the
//! root, path length 0) that issues every leaf, and the control server's own leaf.
//!
//! Keys are ECDSA P-256, either local files under `data_dir/ca/` (mode 0600, never logged)
//! or AWS KMS keys that never leave KMS (see [`kms`]). Leaves come from CSRs, but control
//! takes only the public key from a CSR, after checking its signature (proof of
//! possession, [`csr::verify_csr`]): subject, SANs, key usages and validity come from the
//! arguments and [`CaConfig`].
//!
//! | leaf | EKU | SAN URI | validity |
//! |---|---|---|---|
//! | appliance | clientAuth | `spiffe://<td>/appliance/<id>` (the only SAN) | 30 days |
//! | broker | serverAuth, clientAuth | `spiffe://<td>/broker/<name>` + DNS / IP | 30 days |
//! | operator | clientAuth | `spiffe://<td>/operator/<name>` | 365 days |
//! | control | serverAuth | `spiffe://<td>/control` + DNS / IP | 30 days |
//!
//! Every certificate starts being valid [`BACKDATE`] before `now` (clock skew) and never
//! outlives its issuer; serial numbers are 128 random bits (positive).
//!
//! # Files (`data_dir/ca/`)
//!
//! | file | what |
//! |---|---|
//! | `root.pem`, `intermediate.pem` | CA certificates |
//! | `root.key`, `intermediate.key` | PKCS#8 keys, local mode only, mode 0600 |
//! | `kms.json` | KMS mode: region, endpoint and key ARNs |
//! | `control.pem`, `control.key` | the control server's leaf (no chain) and key (0600) |
//!
//! Issuance is synchronous and, in KMS mode, makes network calls: async servers run it in
//! `tokio::task::spawn_blocking`.

pub mod csr;
pub mod kms;

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    SigningKey,
};
use rustls::pki_types::CertificateDer;
use tether_identity::{
    ApplianceId, BrokerName, NameError, OperatorName, SpiffeId, Subject, TrustDomain,
};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

pub use csr::{verify_csr, CsrError, CsrKeyType, VerifiedCsr, MAX_CSR_PEM_BYTES};
pub use kms::{KmsKey, KmsRecord, KmsSettings, StaticCredentials};

/// Root CA validity: 10 years (3,650 days).
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);
/// Intermediate CA validity: 2 years (730 days).
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(730 * 86_400);
/// Control server leaf validity: 30 days.
pub const DEFAULT_CONTROL_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// Appliance leaf validity: 30 days.
pub const DEFAULT_APPLIANCE_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// Broker leaf validity: 30 days.
pub const DEFAULT_BROKER_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// Operator leaf validity: 365 days.
pub const DEFAULT_OPERATOR_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// How long before `now` a certificate starts being valid (clock skew): 5 minutes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// `[certificates]`: validity lengths of issued leaves (the root and intermediate are
/// fixed at init: 10 and 2 years).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertificateSettings {
    /// Appliance certificates. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub appliance: Duration,
    /// Broker certificates. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub broker: Duration,
    /// Operator certificates. Default 365 days.
    #[serde(with = "humantime_serde")]
    pub operator: Duration,
}

impl Default for CertificateSettings {
    fn default() -> Self {
        CertificateSettings {
            appliance: DEFAULT_APPLIANCE_VALIDITY,
            broker: DEFAULT_BROKER_VALIDITY,
            operator: DEFAULT_OPERATOR_VALIDITY,
        }
    }
}

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate.key";
const CONTROL_CERT: &str = "control.pem";
const CONTROL_KEY: &str = "control.key";
const KMS_RECORD: &str = "kms.json";

/// CA settings. Validities are whole seconds (sub-second parts are dropped).
#[derive(Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// SPIFFE trust domain, e.g. `example.org`: lowercase letters, digits, `.`, `-`, `_`.
    /// No default (empty is refused by [`CaConfig::validate`]).
    pub trust_domain: String,
    /// Root CA validity. Default [`DEFAULT_ROOT_VALIDITY`] (10 years).
    pub root_validity: Duration,
    /// Intermediate CA validity. Default [`DEFAULT_INTERMEDIATE_VALIDITY`] (2 years).
    pub intermediate_validity: Duration,
    /// Control server leaf validity. Default [`DEFAULT_CONTROL_VALIDITY`] (30 days).
    pub control_validity: Duration,
    /// Appliance leaf validity. Default [`DEFAULT_APPLIANCE_VALIDITY`] (30 days).
    pub appliance_validity: Duration,
    /// Broker leaf validity. Default [`DEFAULT_BROKER_VALIDITY`] (30 days).
    pub broker_validity: Duration,
    /// Operator leaf validity. Default [`DEFAULT_OPERATOR_VALIDITY`] (365 days).
    pub operator_validity: Duration,
    /// DNS names in the control server's leaf. Default none.
    pub control_dns_names: Vec<String>,
    /// IP addresses in the control server's leaf. Default none.
    pub control_ips: Vec<IpAddr>,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            trust_domain: String::new(),
            root_validity: DEFAULT_ROOT_VALIDITY,
            intermediate_validity: DEFAULT_INTERMEDIATE_VALIDITY,
            control_validity: DEFAULT_CONTROL_VALIDITY,
            appliance_validity: DEFAULT_APPLIANCE_VALIDITY,
            broker_validity: DEFAULT_BROKER_VALIDITY,
            operator_validity: DEFAULT_OPERATOR_VALIDITY,
            control_dns_names: Vec::new(),
            control_ips: Vec::new(),
        }
    }
}

impl fmt::Debug for CaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            trust_domain,
            root_validity,
            intermediate_validity,
            control_validity,
            appliance_validity,
            broker_validity,
            operator_validity,
            control_dns_names,
            control_ips,
        } = self;
        f.debug_struct("CaConfig")
            .field("trust_domain", trust_domain)
            .field("root_validity", root_validity)
            .field("intermediate_validity", intermediate_validity)
            .field("control_validity", control_validity)
            .field("appliance_validity", appliance_validity)
            .field("broker_validity", broker_validity)
            .field("operator_validity", operator_validity)
            .field("control_dns_names", control_dns_names)
            .field("control_ips", control_ips)
            .finish()
    }
}

impl CaConfig {
    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), CaError> {
        let bad = |field: &'static str, reason: String| Err(CaError::Config { field, reason });
        if let Err(e) = TrustDomain::new(&self.trust_domain) {
            return bad("trust_domain", e.to_string());
        }
        // The CA certificates and control's own leaf live long; a client leaf may be as
        // short as a few seconds (demos and tests of expiry and renewal).
        let validities = [
            ("root_validity", self.root_validity, 60),
            ("intermediate_validity", self.intermediate_validity, 60),
            ("control_validity", self.control_validity, 60),
            ("appliance_validity", self.appliance_validity, 1),
            ("broker_validity", self.broker_validity, 1),
            ("operator_validity", self.operator_validity, 1),
        ];
        for (field, v, min_secs) in validities {
            if v.as_secs() < min_secs {
                return bad(field, format!("must be at least {min_secs} s"));
            }
        }
        if self.intermediate_validity > self.root_validity {
            return bad(
                "intermediate_validity",
                "must not exceed root_validity".into(),
            );
        }
        for (field, v, _) in &validities[2..] {
            if *v > self.intermediate_validity {
                return bad(field, "must not exceed intermediate_validity".into());
            }
        }
        for name in &self.control_dns_names {
            if let Err(reason) = check_dns_name(name) {
                return bad("control_dns_names", format!("{name:?}: {reason}"));
            }
        }
        Ok(())
    }

    /// The SPIFFE id of `subject` in this CA's trust domain.
    fn spiffe(&self, subject: Subject) -> Result<String, CaError> {
        let td = TrustDomain::new(&self.trust_domain).map_err(|e| CaError::Config {
            field: "trust_domain",
            reason: e.to_string(),
        })?;
        Ok(SpiffeId {
            trust_domain: td,
            subject,
        }
        .uri())
    }
}

/// A CA operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR was refused: the requester's fault (HTTP 400 with [`CsrError::code`]).
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// `init` found a CA already in this directory; nothing was changed.
    #[error("a CA already exists in {0}")]
    AlreadyInitialised(PathBuf),
    /// `load` found no CA in this directory; run `tether-control init`.
    #[error("no CA in {0}; run `tether-control init` first")]
    NotInitialised(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key could not be generated or read, or does not match its certificate. The text
    /// never contains key material.
    #[error("key: {0}")]
    Key(String),
    /// A CA certificate on disk is unreadable or inconsistent.
    #[error("certificate {}: {reason}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Signing a certificate failed (local key).
    #[error("signing failed: {0}")]
    Sign(String),
    /// A KMS call failed or KMS returned something unusable; retrying may help when KMS
    /// was unreachable.
    #[error("kms: {0}")]
    Kms(String),
    /// A name to put in a certificate (appliance id, broker or operator name, DNS name)
    /// is not acceptable. The caller's record is wrong; retrying cannot help.
    #[error("invalid {kind} {name:?}: {reason}")]
    InvalidName {
        /// Which name (`appliance_id`, `broker`, `operator`, `dns_name`).
        kind: &'static str,
        /// The name as given.
        name: String,
        /// Why.
        reason: String,
    },
    /// A configuration field is invalid.
    #[error("invalid CA config field {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The intermediate CA has expired (or is not valid yet) at `now`: nothing can be
    /// issued until it is rotated.
    #[error("the intermediate CA is not valid at this time (valid until unix {not_after})")]
    IntermediateNotValid {
        /// Intermediate's notAfter, unix seconds.
        not_after: i64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The leaf, PEM.
    pub cert_pem: String,
    /// The leaf then the intermediate, PEM (what a TLS peer presents).
    pub chain_pem: String,
    /// The leaf, DER.
    pub cert_der: Vec<u8>,
    /// Serial number, lowercase hex of its 16 DER content bytes.
    pub serial_hex: String,
    /// SHA-256 of the leaf DER, lowercase hex.
    pub fingerprint_hex: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

/// Where the CA's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaBackend {
    /// PKCS#8 files in `data_dir/ca/`.
    Local,
    /// AWS KMS.
    Kms(KmsRecord),
}

/// A CA signing key: local or in KMS.
enum CaKey {
    Local(Box<KeyPair>),
    Kms(KmsKey),
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::Local(k) => k.der_bytes(),
            CaKey::Kms(k) => k.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            CaKey::Local(k) => k.algorithm(),
            CaKey::Kms(k) => k.algorithm(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::Local(k) => k.sign(msg),
            CaKey::Kms(k) => k.sign(msg),
        }
    }
}

impl CaKey {
    /// Turn an rcgen error from signing with this key into a `CaError`.
    fn sign_error(&self, e: rcgen::Error) -> CaError {
        match (self, e) {
            (CaKey::Kms(k), rcgen::Error::RemoteKeyError) => CaError::Kms(
                k.take_last_error()
                    .unwrap_or_else(|| "signing failed".to_owned()),
            ),
            (_, e) => CaError::Sign(e.to_string()),
        }
    }
}

/// PEM text of a private key; `Debug` redacts.
#[derive(Clone)]
struct SecretPem(String);

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A CA certificate.
struct CaCert {
    pem: String,
    der: Vec<u8>,
    not_after: OffsetDateTime,
}

/// The control server's leaf and key.
struct ControlLeaf {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: SecretPem,
    not_after: OffsetDateTime,
}

/// The CA: root and intermediate certificates, the intermediate's signing key (local or
/// KMS), and the control server's leaf. `Debug` never shows key material.
pub struct Ca {
    cfg: CaConfig,
    dir: PathBuf,
    backend: CaBackend,
    root: CaCert,
    intermediate: CaCert,
    /// Signs leaves: the intermediate's key and name.
    issuer: Issuer<'static, CaKey>,
    control: ControlLeaf,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.cfg.trust_domain)
            .field("dir", &self.dir)
            .field("backend", &self.backend)
            .field("root_fingerprint", &fingerprint_hex(&self.root.der))
            .field(
                "intermediate_fingerprint",
                &fingerprint_hex(&self.intermediate.der),
            )
            .field("intermediate_not_after", &self.intermediate.not_after)
            .field("control_not_after", &self.control.not_after)
            .field("control_key", &self.control.key)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Create a CA with local key files under `data_dir/ca/`: root (10 y, self-signed,
    /// ECDSA P-256, keyCertSign|cRLSign), intermediate (2 y, signed by the root, path
    /// length 0) and the control server's leaf. The directory appears whole or not at all
    /// (built beside it, then renamed). Refuses if a CA already exists there.
    pub fn init(data_dir: &Path, cfg: &CaConfig, now: OffsetDateTime) -> Result<Ca, CaError> {
        cfg.validate()?;
        let dir = data_dir.join("ca");
        refuse_existing(&dir)?;
        let gen = || {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| CaError::Key(format!("cannot generate a P-256 key: {e}")))
        };
        let root_key = gen()?;
        let intermediate_key = gen()?;
        let files = vec![
            (ROOT_KEY, root_key.serialize_pem(), true),
            (INTERMEDIATE_KEY, intermediate_key.serialize_pem(), true),
        ];
        Self::create(
            data_dir,
            cfg,
            now,
            CaKey::Local(Box::new(root_key)),
            CaKey::Local(Box::new(intermediate_key)),
            CaBackend::Local,
            files,
        )
    }

    /// Create a CA whose root and intermediate keys live in AWS KMS: use the keys
    /// `settings` names or create them (ECC_NIST_P256, SIGN_VERIFY). The data directory
    /// records the key ARNs, region and endpoint in `ca/kms.json`; the control leaf's key
    /// is a local file as in [`Ca::init`]. Blocks on KMS calls.
    pub fn init_kms(
        data_dir: &Path,
        cfg: &CaConfig,
        settings: &KmsSettings,
        now: OffsetDateTime,
    ) -> Result<Ca, CaError> {
        cfg.validate()?;
        let dir = data_dir.join("ca");
        refuse_existing(&dir)?;
        if settings.root_key.is_some() && settings.root_key == settings.intermediate_key {
            return Err(CaError::Config {
                field: "intermediate_key",
                reason: "the root and the intermediate need different keys".into(),
            });
        }
        let session = kms::KmsSession::connect(settings).map_err(CaError::Kms)?;
        let key = |given: &Option<String>, what: &str| -> Result<KmsKey, CaError> {
            let id = match given {
                Some(id) => id.clone(),
                None => session
                    .create_key(&format!(
                        "Tether {what} CA for trust domain {}",
                        cfg.trust_domain
                    ))
                    .map_err(CaError::Kms)?,
            };
            session.key(&id).map_err(CaError::Kms)
        };
        let root_key = key(&settings.root_key, "root")?;
        let intermediate_key = key(&settings.intermediate_key, "intermediate")?;
        if root_key.arn() == intermediate_key.arn() {
            return Err(CaError::Config {
                field: "intermediate_key",
                reason: "the root and the intermediate need different keys".into(),
            });
        }
        let record = KmsRecord {
            region: settings.region.clone(),
            endpoint_url: settings.endpoint_url.clone(),
            root_key_arn: root_key.arn().to_owned(),
            intermediate_key_arn: intermediate_key.arn().to_owned(),
        };
        let json = serde_json::to_string_pretty(&record)
            .map_err(|e| CaError::Kms(format!("cannot encode the kms record: {e}")))?;
        Self::create(
            data_dir,
            cfg,
            now,
            CaKey::Kms(root_key),
            CaKey::Kms(intermediate_key),
            CaBackend::Kms(record),
            vec![(KMS_RECORD, json + "\n", false)],
        )
    }

    /// Build the hierarchy with the given keys and write it, with the backend's `files`
    /// (name, contents, secret?), atomically to `data_dir/ca`.
    fn create(
        data_dir: &Path,
        cfg: &CaConfig,
        now: OffsetDateTime,
        root_key: CaKey,
        intermediate_key: CaKey,
        backend: CaBackend,
        mut files: Vec<(&'static str, String, bool)>,
    ) -> Result<Ca, CaError> {
        let now = whole_seconds(now);
        let dir = data_dir.join("ca");
        let not_before = now - time_duration(BACKDATE);

        let root_dn = ca_name("Tether root CA", &cfg.trust_domain);
        let mut root_params = ca_params(root_dn, BasicConstraints::Unconstrained)?;
        root_params.not_before = not_before;
        root_params.not_after = now + time_duration(cfg.root_validity);
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(|e| root_key.sign_error(e))?;
        let root_issuer = Issuer::new(root_params, root_key);

        let inter_dn = ca_name("Tether intermediate CA", &cfg.trust_domain);
        let mut inter_params = ca_params(inter_dn, BasicConstraints::Constrained(0))?;
        inter_params.use_authority_key_identifier_extension = true;
        inter_params.not_before = not_before;
        inter_params.not_after = now + time_duration(cfg.intermediate_validity);
        let inter_cert = inter_params
            .signed_by(&intermediate_key, &root_issuer)
            .map_err(|e| root_issuer.key().sign_error(e))?;
        let inter_not_after = inter_params.not_after;
        let issuer = Issuer::new(inter_params, intermediate_key);

        let mut ca = Ca {
            cfg: cfg.clone(),
            dir: dir.clone(),
            backend,
            root: CaCert {
                pem: root_cert.pem(),
                der: root_cert.der().to_vec(),
                not_after: now + time_duration(cfg.root_validity),
            },
            intermediate: CaCert {
                pem: inter_cert.pem(),
                der: inter_cert.der().to_vec(),
                not_after: inter_not_after,
            },
            issuer,
            // Replaced just below.
            control: ControlLeaf {
                cert_pem: String::new(),
                cert_der: Vec::new(),
                key: SecretPem(String::new()),
                not_after: now,
            },
        };
        ca.control = ca.new_control_leaf(now)?;

        files.push((CONTROL_KEY, ca.control.key.0.clone(), true));
        files.push((ROOT_CERT, ca.root.pem.clone(), false));
        files.push((INTERMEDIATE_CERT, ca.intermediate.pem.clone(), false));
        files.push((CONTROL_CERT, ca.control.cert_pem.clone(), false));
        write_ca_dir(data_dir, &dir, &files)?;
        Ok(ca)
    }

    /// Load the CA `init` or `init_kms` created. A KMS CA connects with the region and
    /// endpoint recorded at init and the SDK's default credentials; use [`Ca::load_kms`]
    /// to choose them. Checks that the intermediate key matches its certificate and that
    /// the CA belongs to `cfg.trust_domain`.
    pub fn load(data_dir: &Path, cfg: &CaConfig) -> Result<Ca, CaError> {
        let dir = data_dir.join("ca");
        let record_path = dir.join(KMS_RECORD);
        if record_path.exists() {
            let record = read_kms_record(&record_path)?;
            let settings = KmsSettings {
                region: record.region.clone(),
                endpoint_url: record.endpoint_url.clone(),
                ..KmsSettings::default()
            };
            return Self::load_kms(data_dir, cfg, &settings);
        }
        cfg.validate()?;
        if !dir.join(ROOT_CERT).exists() {
            return Err(CaError::NotInitialised(dir));
        }
        let key_path = dir.join(INTERMEDIATE_KEY);
        let pem = read_secret(&key_path)?;
        let key = KeyPair::from_pem(&pem)
            .map_err(|_| CaError::Key(format!("{} is not a usable key", key_path.display())))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Key(format!(
                "{} is not an ECDSA P-256 key",
                key_path.display()
            )));
        }
        Self::open(&dir, cfg, CaKey::Local(Box::new(key)), CaBackend::Local)
    }

    /// Load a KMS CA, reaching KMS with `settings`' region, endpoint and credentials
    /// (falling back to those recorded at init); the key ARNs always come from
    /// `ca/kms.json`. Blocks on a KMS call (GetPublicKey).
    pub fn load_kms(
        data_dir: &Path,
        cfg: &CaConfig,
        settings: &KmsSettings,
    ) -> Result<Ca, CaError> {
        cfg.validate()?;
        let dir = data_dir.join("ca");
        let record_path = dir.join(KMS_RECORD);
        if !record_path.exists() {
            return Err(CaError::NotInitialised(dir));
        }
        let record = read_kms_record(&record_path)?;
        let settings = KmsSettings {
            region: settings.region.clone().or(record.region.clone()),
            endpoint_url: settings
                .endpoint_url
                .clone()
                .or(record.endpoint_url.clone()),
            root_key: None,
            intermediate_key: None,
            credentials: settings.credentials.clone(),
        };
        let session = kms::KmsSession::connect(&settings).map_err(CaError::Kms)?;
        let key = session
            .key(&record.intermediate_key_arn)
            .map_err(CaError::Kms)?;
        Self::open(&dir, cfg, CaKey::Kms(key), CaBackend::Kms(record))
    }

    fn open(dir: &Path, cfg: &CaConfig, key: CaKey, backend: CaBackend) -> Result<Ca, CaError> {
        let root = read_cert(&dir.join(ROOT_CERT))?;
        let inter_path = dir.join(INTERMEDIATE_CERT);
        let intermediate = read_cert(&inter_path)?;
        {
            let (_, x509) = x509_parser::parse_x509_certificate(&intermediate.der)
                .map_err(|e| bad_cert(&inter_path, e))?;
            if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
                return Err(CaError::Key(format!(
                    "the intermediate key does not match {}",
                    inter_path.display()
                )));
            }
        }
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(intermediate.der.as_slice()), key)
                .map_err(|e| bad_cert(&inter_path, e))?;

        let control_path = dir.join(CONTROL_CERT);
        if !control_path.exists() && !dir.join(CONTROL_KEY).exists() {
            // A new replica's data directory (`ca export`): no control leaf yet. An
            // already-expired placeholder, which `ensure_control_leaf` replaces with a
            // leaf of this replica's own names before anything serves.
            return Ok(Ca {
                cfg: cfg.clone(),
                dir: dir.to_owned(),
                backend,
                root,
                intermediate,
                issuer,
                control: ControlLeaf {
                    cert_pem: String::new(),
                    cert_der: Vec::new(),
                    key: SecretPem(String::new()),
                    not_after: OffsetDateTime::UNIX_EPOCH,
                },
            });
        }
        let control_cert = read_cert(&control_path)?;
        let control_key = read_secret(&dir.join(CONTROL_KEY))?;
        let (uris, _, _) = leaf_names(&control_cert.der).map_err(|e| bad_cert(&control_path, e))?;
        let expected = cfg.spiffe(Subject::Control)?;
        if !uris.contains(&expected) {
            return Err(CaError::Config {
                field: "trust_domain",
                reason: format!(
                    "the CA in {} was not created for trust domain {:?} (control leaf names {uris:?})",
                    dir.display(),
                    cfg.trust_domain
                ),
            });
        }
        Ok(Ca {
            cfg: cfg.clone(),
            dir: dir.to_owned(),
            backend,
            root,
            intermediate,
            issuer,
            control: ControlLeaf {
                cert_pem: control_cert.pem,
                cert_der: control_cert.der,
                key: SecretPem(control_key),
                not_after: control_cert.not_after,
            },
        })
    }

    /// Copy what a new control replica needs of the CA in `data_dir` into `out` (a
    /// data directory, created if missing): `ca/root.pem`, `ca/intermediate.pem` and the
    /// intermediate's signing key (`ca/intermediate.key`, mode 0600) or, in KMS mode, the
    /// key record `ca/kms.json`. Never the root key, never this replica's own control
    /// leaf (the new replica issues its own at first start, for its own names). Returns
    /// the files written, relative to `out`.
    pub fn export_for_replica(data_dir: &Path, out: &Path) -> Result<Vec<PathBuf>, CaError> {
        let from = data_dir.join("ca");
        if !from.join(ROOT_CERT).exists() {
            return Err(CaError::NotInitialised(from));
        }
        let to = out.join("ca");
        fs::create_dir_all(&to).map_err(io_err(&to))?;
        let signing = if from.join(KMS_RECORD).exists() {
            (KMS_RECORD, false)
        } else {
            (INTERMEDIATE_KEY, true)
        };
        let mut written = Vec::new();
        for (name, secret) in [(ROOT_CERT, false), (INTERMEDIATE_CERT, false), signing] {
            let path = from.join(name);
            let bytes = if secret {
                read_secret(&path)?.into_bytes()
            } else {
                fs::read(&path).map_err(io_err(&path))?
            };
            write_atomic(&to.join(name), &bytes, secret)?;
            written.push(Path::new("ca").join(name));
        }
        Ok(written)
    }

    /// Whether the root CA's private key is in `data_dir` (local mode): it signs only
    /// intermediates, so a serving replica never needs it.
    pub fn root_key_present(data_dir: &Path) -> bool {
        data_dir.join("ca").join(ROOT_KEY).exists()
    }

    /// The CA's configuration.
    pub fn config(&self) -> &CaConfig {
        &self.cfg
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    /// Where the keys are.
    pub fn backend(&self) -> &CaBackend {
        &self.backend
    }

    /// The root certificate, PEM (what appliances and operators pin).
    pub fn root_pem(&self) -> String {
        self.root.pem.clone()
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root.der
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_pem(&self) -> String {
        self.intermediate.pem.clone()
    }

    /// The intermediate certificate, DER.
    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate.der
    }

    /// Root then intermediate, PEM.
    pub fn bundle_pem(&self) -> String {
        format!("{}{}", self.root.pem, self.intermediate.pem)
    }

    /// The control server's leaf then the intermediate, PEM (for its HTTPS server).
    pub fn control_chain_pem(&self) -> String {
        format!("{}{}", self.control.cert_pem, self.intermediate.pem)
    }

    /// The control server's leaf, DER.
    pub fn control_cert_der(&self) -> &[u8] {
        &self.control.cert_der
    }

    /// The control server's private key, PKCS#8 PEM. Secret: don't log it.
    pub fn control_key_pem(&self) -> String {
        self.control.key.0.clone()
    }

    /// The control leaf's notAfter, unix seconds.
    pub fn control_not_after(&self) -> i64 {
        self.control.not_after.unix_timestamp()
    }

    /// Renew the control server's leaf (new key) if it expires within `margin` of `now`
    /// or its DNS names / IPs differ from the configuration. Writes `control.key` then
    /// `control.pem` (each atomically). Returns whether it renewed.
    pub fn ensure_control_leaf(
        &mut self,
        now: OffsetDateTime,
        margin: Duration,
    ) -> Result<bool, CaError> {
        let expiring = now + time_duration(margin) >= self.control.not_after;
        let names_changed = match leaf_names(&self.control.cert_der) {
            Ok((_, mut dns, mut ips)) => {
                let mut want_dns = self.cfg.control_dns_names.clone();
                let mut want_ips = self.cfg.control_ips.clone();
                for v in [&mut dns, &mut want_dns] {
                    v.iter_mut().for_each(|n| n.make_ascii_lowercase());
                    v.sort();
                    v.dedup();
                }
                for v in [&mut ips, &mut want_ips] {
                    v.sort();
                    v.dedup();
                }
                dns != want_dns || ips != want_ips
            }
            Err(_) => true,
        };
        if !expiring && !names_changed {
            return Ok(false);
        }
        let leaf = self.new_control_leaf(whole_seconds(now))?;
        write_atomic(&self.dir.join(CONTROL_KEY), leaf.key.0.as_bytes(), true)?;
        write_atomic(
            &self.dir.join(CONTROL_CERT),
            leaf.cert_pem.as_bytes(),
            false,
        )?;
        self.control = leaf;
        Ok(true)
    }

    fn new_control_leaf(&self, now: OffsetDateTime) -> Result<ControlLeaf, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Key(format!("cannot generate a P-256 key: {e}")))?;
        let mut sans = vec![uri_san(&self.cfg.spiffe(Subject::Control)?)?];
        for name in &self.cfg.control_dns_names {
            sans.push(dns_san(name)?);
        }
        sans.extend(
            self.cfg
                .control_ips
                .iter()
                .map(|ip| SanType::IpAddress(*ip)),
        );
        let issued = self.sign_leaf(
            "tether-control",
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            self.cfg.control_validity,
            &key,
            now,
        )?;
        Ok(ControlLeaf {
            cert_pem: issued.cert_pem,
            cert_der: issued.cert_der,
            key: SecretPem(key.serialize_pem()),
            not_after: OffsetDateTime::from_unix_timestamp(issued.not_after)
                .map_err(|e| CaError::Sign(e.to_string()))?,
        })
    }

    /// Check a CSR (size, key type, proof of possession) without issuing.
    pub fn check_csr(&self, csr_pem: &str) -> Result<VerifiedCsr, CsrError> {
        verify_csr(csr_pem)
    }

    /// An appliance leaf: CN=`appliance_id`, exactly one SAN, the URI
    /// `spiffe://<td>/appliance/<appliance_id>`, clientAuth, [`CaConfig::appliance_validity`].
    /// Only the CSR's public key is used.
    pub fn issue_appliance(
        &self,
        appliance_id: &str,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        name("appliance_id", appliance_id, ApplianceId::new)?;
        let csr = verify_csr(csr_pem)?;
        self.issue_appliance_verified(appliance_id, &csr, now)
    }

    /// As [`Ca::issue_appliance`], for a CSR already checked.
    pub fn issue_appliance_verified(
        &self,
        appliance_id: &str,
        csr: &VerifiedCsr,
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let id = name("appliance_id", appliance_id, ApplianceId::new)?;
        let uri = self.cfg.spiffe(Subject::Appliance(id))?;
        self.sign_leaf(
            appliance_id,
            vec![uri_san(&uri)?],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            self.cfg.appliance_validity,
            csr,
            whole_seconds(now),
        )
    }

    /// A broker leaf: CN=`name`, SANs `spiffe://<td>/broker/<name>` plus `dns` and `ips`,
    /// serverAuth + clientAuth, [`CaConfig::broker_validity`].
    pub fn issue_broker(
        &self,
        name: &str,
        csr_pem: &str,
        dns: &[String],
        ips: &[IpAddr],
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let broker = self::name("broker", name, BrokerName::new)?;
        let mut sans = vec![uri_san(&self.cfg.spiffe(Subject::Broker(broker))?)?];
        for d in dns {
            sans.push(dns_san(d)?);
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let csr = verify_csr(csr_pem)?;
        self.sign_leaf(
            name,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            self.cfg.broker_validity,
            &csr,
            whole_seconds(now),
        )
    }

    /// An operator leaf: CN=`name`, SAN `spiffe://<td>/operator/<name>`, clientAuth,
    /// [`CaConfig::operator_validity`].
    pub fn issue_operator(
        &self,
        name: &str,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let operator = self::name("operator", name, OperatorName::new)?;
        let uri = self.cfg.spiffe(Subject::Operator(operator))?;
        let csr = verify_csr(csr_pem)?;
        self.sign_leaf(
            name,
            vec![uri_san(&uri)?],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            self.cfg.operator_validity,
            &csr,
            whole_seconds(now),
        )
    }

    /// Sign a leaf for `key` with the intermediate: digitalSignature, CA:false, AKI, SKI,
    /// random serial, valid from `now - BACKDATE` to `now + validity` capped at the
    /// intermediate's notAfter.
    fn sign_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        validity: Duration,
        key: &impl PublicKeyData,
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        if now >= self.intermediate.not_after {
            return Err(CaError::IntermediateNotValid {
                not_after: self.intermediate.not_after.unix_timestamp(),
            });
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        params.not_before = now - time_duration(BACKDATE);
        params.not_after = (now + time_duration(validity)).min(self.intermediate.not_after);
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| self.issuer_error(e))?;
        let cert_pem = cert.pem();
        Ok(Issued {
            chain_pem: format!("{cert_pem}{}", self.intermediate.pem),
            cert_pem,
            fingerprint_hex: fingerprint_hex(cert.der()),
            cert_der: cert.der().to_vec(),
            serial_hex,
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
        })
    }

    fn issuer_error(&self, e: rcgen::Error) -> CaError {
        self.issuer.key().sign_error(e)
    }
}

pub use tether_identity::fingerprint::hex_of as fingerprint_hex;

/// 128 random bits, first byte in 0x01..=0x7f so the DER INTEGER is positive and exactly
/// 16 bytes (126.x bits of entropy).
fn random_serial() -> Result<(SerialNumber, String), CaError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| CaError::Sign("no randomness for a serial number".into()))?;
    b[0] = (b[0] & 0x7f).max(1);
    Ok((SerialNumber::from_slice(&b), hex::encode(b)))
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

fn time_duration(d: Duration) -> time::Duration {
    time::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
}

fn ca_name(cn: &str, trust_domain: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether");
    if trust_domain.len() <= 64 {
        dn.push(DnType::OrganizationalUnitName, trust_domain);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(
    dn: DistinguishedName,
    constraints: BasicConstraints,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (serial, _) = random_serial()?;
    params.serial_number = Some(serial);
    Ok(params)
}

fn uri_san(uri: &str) -> Result<SanType, CaError> {
    Ia5String::try_from(uri)
        .map(SanType::URI)
        .map_err(|e| CaError::InvalidName {
            kind: "uri",
            name: uri.to_owned(),
            reason: e.to_string(),
        })
}

fn dns_san(name: &str) -> Result<SanType, CaError> {
    check_dns_name(name).map_err(|reason| CaError::InvalidName {
        kind: "dns_name",
        name: name.to_owned(),
        reason,
    })?;
    Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|e| CaError::InvalidName {
            kind: "dns_name",
            name: name.to_owned(),
            reason: e.to_string(),
        })
}

/// A name checked by [`tether_identity`]'s rule, or the CA's refusal naming the field.
fn name<T>(
    kind: &'static str,
    raw: &str,
    check: fn(&str) -> Result<T, NameError>,
) -> Result<T, CaError> {
    check(raw).map_err(|e| CaError::InvalidName {
        kind,
        name: raw
            .chars()
            .take(tether_identity::MAX_NAME_LEN + 1)
            .collect(),
        reason: e.to_string(),
    })
}

fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err("labels may contain only letters, digits and inner `-`".into());
        }
    }
    Ok(())
}

fn bad_cert(path: &Path, e: impl fmt::Display) -> CaError {
    CaError::Certificate {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Read a PEM file holding exactly one certificate.
fn read_cert(path: &Path) -> Result<CaCert, CaError> {
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let der = match certs.as_slice() {
        [Ok(der)] => der.to_vec(),
        _ => return Err(bad_cert(path, "expected exactly one PEM certificate")),
    };
    let not_after = {
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert(path, e))?;
        x509.validity().not_after.to_datetime()
    };
    Ok(CaCert {
        pem,
        der,
        not_after,
    })
}

/// Read a key file, refusing one that others can read.
fn read_secret(path: &Path) -> Result<String, CaError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CaError::Key(format!(
            "{} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    fs::read_to_string(path).map_err(io_err(path))
}

fn read_kms_record(path: &Path) -> Result<KmsRecord, CaError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map_err(|e| CaError::Kms(format!("{} is not a kms record: {e}", path.display())))
}

/// The URI SANs, DNS names and IPs of a certificate, in order.
type LeafNames = (Vec<String>, Vec<String>, Vec<IpAddr>);

/// The URI SANs, DNS names and IPs of a certificate.
fn leaf_names(der: &[u8]) -> Result<LeafNames, String> {
    let (_, x509) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(san) = x509.subject_alternative_name().map_err(|e| e.to_string())? {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(
                        <[u8; 4]>::try_from(*b).map_err(|e| e.to_string())?,
                    )),
                    16 => ips.push(IpAddr::from(
                        <[u8; 16]>::try_from(*b).map_err(|e| e.to_string())?,
                    )),
                    _ => return Err("bad IP address SAN".into()),
                },
                _ => {}
            }
        }
    }
    Ok((uris, dns, ips))
}

/// `init` refuses a directory that holds any CA file.
fn refuse_existing(dir: &Path) -> Result<(), CaError> {
    for f in [
        ROOT_CERT,
        ROOT_KEY,
        INTERMEDIATE_CERT,
        INTERMEDIATE_KEY,
        KMS_RECORD,
    ] {
        if dir.join(f).exists() {
            return Err(CaError::AlreadyInitialised(dir.to_owned()));
        }
    }
    Ok(())
}

/// Write `files` into a fresh sibling directory, fsync, then rename it to `dir`. If `dir`
/// exists and is not empty the rename fails and nothing changes.
fn write_ca_dir(
    data_dir: &Path,
    dir: &Path,
    files: &[(&'static str, String, bool)],
) -> Result<(), CaError> {
    fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
        .map_err(|_| CaError::Key("no randomness".into()))?;
    let tmp = data_dir.join(format!(".ca.init-{}", hex::encode(suffix)));
    let result = (|| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        for (name, contents, secret) in files {
            let path = tmp.join(name);
            write_new(&path, contents.as_bytes(), *secret)?;
        }
        sync_dir(&tmp)?;
        match fs::rename(&tmp, dir) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                ) =>
            {
                return Err(CaError::AlreadyInitialised(dir.to_owned()))
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
        sync_dir(data_dir)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Create `path` (must not exist) with mode 0600 for secrets, 0644 otherwise; fsync.
fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), CaError> {
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    // The umask can only narrow the mode; make it exact.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Replace `path` atomically ([`tether_identity::fs::write_atomic`]); mode 0600 when
/// `secret`, else 0644.
fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), CaError> {
    let mode = if secret { 0o600 } else { 0o644 };
    tether_identity::fs::write_atomic(path, contents, mode).map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), CaError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}
