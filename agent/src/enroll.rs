//! Enrollment: get a first certificate from control with no shared secret but a one-time
//! proof, and store the credential safely.
//!
//! The key is generated here and never leaves the appliance; control receives a CSR and
//! answers a certificate whose names come from its own record. The HTTPS connection to
//! control is verified against the root CA the appliance was provisioned with (and only
//! that root).
//!
//! Storage is crash-safe: every file is written to a temporary sibling, fsynced and renamed
//! into place, the folder fsynced; the key goes before the certificate. A crash between the
//! two leaves a key that does not match the certificate, which [`crate::Credentials::load`]
//! refuses (`KeyMismatch`): the appliance re-enrolls, it never runs on a corrupt state.
//! The credential being replaced is kept in `previous/` for the renewal overlap.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::credentials::{CA_FILE, CERT_FILE, KEY_FILE};
use crate::proxy::{ProxyConfig, ProxyError};

/// State file written next to the credential.
pub const STATE_FILE: &str = "state.json";
/// Folder holding the previous credential.
pub const PREVIOUS_DIR: &str = "previous";
/// Time limit of each HTTP request to control.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::proof::EnrollProof;

/// What to enroll, where.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    /// Base URL of control, e.g. `https://control.example:8443`.
    pub control_url: String,
    /// PEM of the root CA to pin for control (and later for brokers).
    pub ca_pem: Vec<u8>,
    /// The appliance id (as registered in control).
    pub appliance_id: String,
    /// The proof.
    pub proof: EnrollProof,
    /// Where to store the credential.
    pub state_dir: PathBuf,
    /// How to reach control: direct, or through an HTTP proxy.
    pub proxy: ProxyConfig,
}

/// Why enrollment failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The CA file holds no usable certificate.
    #[error("no usable CA certificate in the given file")]
    NoCa,
    /// Control could not be reached or answered garbage; retrying may help.
    #[error("cannot talk to control: {0}")]
    Transport(String),
    /// Control refused the enrollment; the code says why (e.g. `token_used`: a new token
    /// is needed; retrying the same request cannot help).
    #[error("control refused the enrollment ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The platform proof could not be made (no credentials, metadata server or token
    /// file unreachable, ...).
    #[error("cannot make the enrollment proof: {0}")]
    Proof(String),
    /// The certificate cannot be renewed or remade unattended: this appliance enrolls with
    /// one-time tokens.
    #[error(
        "appliance {0} enrolls with one-time tokens: an operator must create a new token \
             (tether-control token create {0}) and the appliance run `tether-agent enroll` again"
    )]
    NeedsToken(String),
    /// The proxy configuration is unusable (`--proxy`, `HTTPS_PROXY`, `NO_PROXY`): fix it,
    /// retrying cannot help.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// `state.json` is unreadable.
    #[error("bad enrollment state: {0}")]
    State(String),
    /// The key or CSR could not be made.
    #[error("cannot create the key or CSR: {0}")]
    Key(String),
    /// Writing the credential failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

pub(crate) use tether_api::enroll::EnrollResponse;
use tether_api::enroll::{Challenge, EnrollRequest};
use tether_api::error::ErrorBody;

/// What `state.json` records.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollState {
    /// The appliance id.
    pub appliance_id: String,
    /// Control's URL.
    pub control_url: String,
    /// Brokers control handed out.
    pub brokers: Vec<String>,
    /// Fingerprint of the current certificate.
    pub fingerprint: String,
    /// `notAfter` of the current certificate, Unix seconds.
    pub not_after: i64,
    /// How the appliance enrolled (no secrets), for unattended re-enrollment.
    #[serde(default)]
    pub proof: Option<crate::proof::ProofSpec>,
    /// The highest manual-renewal generation this agent has renewed for.
    #[serde(default)]
    pub manual_renewal_generation: u64,
}

impl EnrollState {
    /// Read `DIR/state.json`; `Ok(None)` when the appliance was provisioned by hand (no
    /// state file).
    pub fn load(dir: &Path) -> Result<Option<EnrollState>, EnrollError> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| EnrollError::State(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(EnrollError::Io { path, source }),
        }
    }

    /// Write `DIR/state.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), EnrollError> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| EnrollError::State(e.to_string()))?;
        write_atomic(&dir.join(STATE_FILE), &json, 0o644)
    }
}

/// An HTTPS client that trusts only `ca_pem` (ring provider, TLS 1.3), through the proxy
/// of the process environment (`HTTPS_PROXY`, `NO_PROXY`: [`ProxyConfig::from_env`]).
pub fn http_client(ca_pem: &[u8]) -> Result<reqwest::Client, EnrollError> {
    http_client_with(ca_pem, None)
}

/// As [`http_client`], presenting `identity` (certificate chain PEM, key PEM) as the
/// client certificate.
pub fn http_client_with(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<reqwest::Client, EnrollError> {
    http_client_with_proxy(ca_pem, identity, &ProxyConfig::from_env(None)?)
}

/// As [`http_client_with`], reaching control as `proxy` says (and never as reqwest's own
/// reading of the environment would): how the agent enrolls and renews.
pub fn http_client_with_proxy(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    proxy: &ProxyConfig,
) -> Result<reqwest::Client, EnrollError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]).flatten() {
        roots.add(cert).map_err(|_| EnrollError::NoCa)?;
    }
    if roots.is_empty() {
        return Err(EnrollError::NoCa);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| EnrollError::Transport(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        None => tls.with_no_client_auth(),
        Some((chain_pem, key_pem)) => {
            let chain = rustls_pemfile::certs(&mut &chain_pem[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EnrollError::Key(format!("current certificate: {e}")))?;
            let key = rustls_pemfile::private_key(&mut &key_pem[..])
                .map_err(|e| EnrollError::Key(format!("current key: {e}")))?
                .ok_or_else(|| EnrollError::Key("no current key".into()))?;
            tls.with_client_auth_cert(chain, key)
                .map_err(|e| EnrollError::Key(format!("current credential: {e}")))?
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // `no_proxy()` first: reqwest must not add proxies of its own from the environment.
    let mut builder = reqwest::Client::builder().no_proxy();
    if let Some(p) = proxy.reqwest_proxy() {
        builder = builder.proxy(p);
    }
    builder
        .use_preconfigured_tls(tls)
        .timeout(HTTP_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| EnrollError::Transport(e.to_string()))
}

/// Time allowed to ask a proxy why a tunnel failed ([`proxy_failure`]).
const PROXY_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// POST `body` as JSON with `client` (built for `proxy`), and read a JSON answer.
pub(crate) async fn post<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    proxy: &ProxyConfig,
    url: String,
    body: &impl serde::Serialize,
) -> Result<T, EnrollError> {
    let resp = match client.post(&url).json(body).send().await {
        Ok(resp) => resp,
        Err(e) => {
            if e.is_connect() {
                if let Some(why) = proxy_failure(proxy, &url).await {
                    return Err(EnrollError::Transport(format!("{url}: {why}")));
                }
            }
            return Err(EnrollError::Transport(format!(
                "{url}: {}",
                with_causes(&e)
            )));
        }
    };
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| EnrollError::Transport(e.to_string()))?;
    if !status.is_success() {
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error, b.message),
            Err(_) => (
                "http_error".into(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ),
        };
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            code,
            message,
        });
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| EnrollError::Transport(format!("bad answer from {url}: {e}")))
}

/// When a request through a proxy could not connect, reqwest says only "tunnel error":
/// open one tunnel ourselves to learn why (407 and the credentials refused, 403, the proxy
/// unreachable). `None` when no proxy applies or the tunnel opens now.
async fn proxy_failure(proxy: &ProxyConfig, url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let (host, port) = (url.host_str()?, url.port_or_known_default()?);
    let p = proxy.proxy_for(host, port)?;
    match p.connect(host, port, PROXY_PROBE_TIMEOUT).await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// `e` and its causes, `: `-separated: reqwest's own message alone hides why a connection
/// failed (refused, TLS, a proxy's tunnel refused).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// A fresh P-256 key and a CSR for it, PEM.
pub fn key_and_csr(appliance_id: &str) -> Result<(String, String), EnrollError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, appliance_id);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| EnrollError::Key(e.to_string()))?
        .pem()
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

/// Enroll and store the credential. Returns what was recorded in `state.json`.
pub async fn enroll(opts: &EnrollOptions) -> Result<EnrollState, EnrollError> {
    let client = http_client_with_proxy(&opts.ca_pem, None, &opts.proxy)?;
    let base = opts.control_url.trim_end_matches('/');
    let (key_pem, csr_pem) = key_and_csr(&opts.appliance_id)?;
    let challenge: Challenge = post(
        &client,
        &opts.proxy,
        format!("{base}/v1/enroll/challenge"),
        &serde_json::json!({}),
    )
    .await?;
    let proof = opts.proof.build(&challenge.nonce).await?;
    let resp: EnrollResponse = post(
        &client,
        &opts.proxy,
        format!("{base}/v1/enroll"),
        &EnrollRequest {
            appliance_id: opts.appliance_id.clone(),
            csr_pem,
            nonce: challenge.nonce,
            proof,
        },
    )
    .await?;
    let state = EnrollState {
        appliance_id: opts.appliance_id.clone(),
        control_url: opts.control_url.clone(),
        brokers: resp.brokers,
        fingerprint: resp.fingerprint,
        not_after: resp.not_after,
        proof: Some(opts.proof.spec()),
        manual_renewal_generation: 0,
    };
    store_credential(
        &opts.state_dir,
        &key_pem,
        &resp.certificate_pem,
        &resp.ca_pem,
        &state,
    )?;
    Ok(state)
}

/// Write the credential crash-safely (see the module docs).
pub fn store_credential(
    dir: &Path,
    key_pem: &str,
    chain_pem: &str,
    ca_pem: &str,
    state: &EnrollState,
) -> Result<(), EnrollError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| EnrollError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Keep the credential being replaced for the overlap window.
    let (old_key, old_cert) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
    if old_key.exists() && old_cert.exists() {
        let prev = dir.join(PREVIOUS_DIR);
        std::fs::create_dir_all(&prev).map_err(io(&prev))?;
        let key = std::fs::read(&old_key).map_err(io(&old_key))?;
        let cert = std::fs::read(&old_cert).map_err(io(&old_cert))?;
        write_atomic(&prev.join(KEY_FILE), &key, 0o600)?;
        write_atomic(&prev.join(CERT_FILE), &cert, 0o644)?;
    }
    write_atomic(&old_key, key_pem.as_bytes(), 0o600)?;
    crate::fault::point(crate::fault::CREDENTIAL_KEY_WRITTEN);
    write_atomic(&old_cert, chain_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    state.save(dir)
}

/// Write `data` to `path` atomically with `mode` ([`tether_identity::fs::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), EnrollError> {
    tether_identity::fs::write_atomic(path, data, mode).map_err(|source| EnrollError::Io {
        path: path.to_owned(),
        source,
    })
}
