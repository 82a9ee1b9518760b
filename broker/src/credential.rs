//! The broker's own certificate in control mode: enrollment with a bundle, and renewal
//! before expiry.
//!
//! - [`enroll`]: a P-256 key made here (it never leaves the data directory), a CSR,
//!   `POST /v1/brokers/enroll` with the bundle's one-time token (server-authenticated TLS
//!   pinned to the bundle's root), and the answer stored in the [`DataDir`].
//! - [`Renewer`]: at two thirds of the certificate's lifetime, a new key and CSR,
//!   `POST /v1/brokers/renew` over mTLS with the current certificate; the files are
//!   replaced atomically and the [`CertStore`] swapped, so the QUIC server, the next
//!   channel connection and the next HTTP call use the new certificate. A failed renewal is
//!   retried with backoff until it succeeds or the certificate expires.
//!
//! Control's refusals arrive as `{"error": code, "message": ...}` with a non-2xx status;
//! [`ControlError::Refused`] carries both.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_api::brokers::{
    BrokerBundle, BrokerCredential, BrokerEnrollRequest, BrokerRenewRequest,
};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use tether_identity::{Kind, TrustDomain};

use crate::control_tls::{client_config, ControlVerifier};
use crate::datadir::{parse_certs, BrokerIdentity, DataDir, DataDirError};
use crate::metrics::{Metrics, Outcome};
use crate::tls::CertStore;

/// Path of enrollment on control.
pub const ENROLL_PATH: &str = "/v1/brokers/enroll";
/// Path of renewal on control.
pub const RENEW_PATH: &str = "/v1/brokers/renew";
/// Time limit of one enrollment or renewal request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry delay of a failed renewal.
pub const RENEW_RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest retry delay of a failed renewal.
pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(300);

/// Why enrollment or renewal failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Control could not be reached or the TLS handshake failed (retry may help).
    #[error("cannot reach control: {0}")]
    Unreachable(String),
    /// Control refused the request (its code and message; retrying the same will not
    /// help).
    #[error("control refused ({status}): {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Control's stable error code.
        code: String,
        /// Control's message.
        message: String,
    },
    /// Control's answer is not a usable credential (control's fault).
    #[error("control's answer is not usable: {0}")]
    BadAnswer(String),
    /// A key or CSR could not be made, or the credential could not be stored (ours).
    #[error("{0}")]
    Local(String),
    /// The data directory failed.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
}

/// A fresh P-256 key and a PEM CSR over it.
pub fn new_key_and_csr(name: &str) -> Result<(KeyPair, String), ControlError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ControlError::Local(format!("cannot generate a key: {e}")))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| ControlError::Local(format!("cannot build a CSR: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ControlError::Local(format!("cannot build a CSR: {e}")))?;
    Ok((key, csr))
}

/// The rustls form of an rcgen key.
pub fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// Check control's answer: a chain whose leaf names `spiffe://<td>/broker/<name>` and
/// holds our public key. Returns the chain and the leaf's validity (Unix seconds).
pub fn check_credential(
    cred: &BrokerCredential,
    identity: &BrokerIdentity,
    key: &KeyPair,
) -> Result<(Vec<CertificateDer<'static>>, Validity), ControlError> {
    let bad = |m: String| ControlError::BadAnswer(m);
    if cred.name != identity.name {
        return Err(bad(format!(
            "credential is for broker {:?}, we are {:?}",
            cred.name, identity.name
        )));
    }
    let chain = parse_certs(cred.chain_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad("chain_pem holds no certificate".into()))?;
    let validity = leaf_validity(leaf).map_err(bad)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("the certificate is not for the key we sent".into()));
    }
    let td = TrustDomain::new(&identity.trust_domain).map_err(|e| bad(e.to_string()))?;
    let named = tether_identity::cert::spiffe_id(&cert, &td)
        .map_err(|e| bad(format!("the certificate names no broker of {td}: {e}")))?;
    if named.kind() != Kind::Broker || named.name() != Some(identity.name.as_str()) {
        return Err(bad(format!(
            "the certificate names {:?} {:?}, not broker {:?}",
            named.kind(),
            named.name(),
            identity.name
        )));
    }
    Ok((chain, validity))
}

/// A certificate's validity period (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// `notBefore`.
    pub not_before: u64,
    /// `notAfter`.
    pub not_after: u64,
}

impl Validity {
    /// When to renew: two thirds into the lifetime.
    pub fn renew_at(&self) -> u64 {
        let life = self.not_after.saturating_sub(self.not_before);
        self.not_before + life * 2 / 3
    }
}

/// The validity of a DER certificate.
pub fn leaf_validity(der: &[u8]) -> Result<Validity, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    let v = cert.validity();
    Ok(Validity {
        not_before: u64::try_from(v.not_before.timestamp()).unwrap_or(0),
        not_after: u64::try_from(v.not_after.timestamp()).unwrap_or(0),
    })
}

fn http_client(
    verifier: Arc<ControlVerifier>,
    cert: Option<Arc<CertStore>>,
) -> Result<reqwest::Client, ControlError> {
    let tls = client_config(verifier, cert, crate::tls::provider())
        .map_err(|e| ControlError::Local(format!("TLS configuration: {e}")))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ControlError::Local(format!("HTTP client: {e}")))
}

/// POST `body` as JSON; a 2xx answer is decoded as `T`, anything else is
/// [`ControlError::Refused`] with control's code and message.
async fn post<B: Serialize, T: DeserializeOwned>(
    client: &reqwest::Client,
    url: String,
    body: &B,
) -> Result<T, ControlError> {
    let resp = client
        .post(&url)
        .json(body)
        .send()
        .await
        .map_err(|e| ControlError::Unreachable(format!("{url}: {}", error_chain(&e))))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ControlError::Unreachable(format!("{url}: {}", error_chain(&e))))?;
    if !status.is_success() {
        let (code, message) = error_body(&bytes);
        return Err(ControlError::Refused {
            status: status.as_u16(),
            code,
            message,
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ControlError::BadAnswer(e.to_string()))
}

/// Control's `{"error": code, "message": ...}`, or the status text when the body is not.
pub fn error_body(bytes: &[u8]) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        error: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Body>(bytes) {
        Ok(b) => (b.error, b.message),
        Err(_) => {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            ("unknown".into(), text)
        }
    }
}

/// An error and its sources, one line (reqwest hides the useful part in the sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The base URL without a trailing slash, then `path`.
pub fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Enroll with `bundle` and store the credential in `dir`.
pub async fn enroll(bundle: &BrokerBundle, dir: &DataDir) -> Result<(), ControlError> {
    let ca = parse_certs(bundle.ca_pem.as_bytes())
        .map_err(|e| ControlError::Local(format!("bundle ca_pem: {e}")))?;
    let verifier = Arc::new(
        crate::control_tls::control_verifier(&ca, &bundle.trust_domain)
            .map_err(|e| ControlError::Local(e.to_string()))?,
    );
    let identity = BrokerIdentity {
        name: bundle.name.clone(),
        trust_domain: bundle.trust_domain.clone(),
        control_url: bundle.control_url.clone(),
    };
    let (key, csr_pem) = new_key_and_csr(&bundle.name)?;
    let client = http_client(verifier, None)?;
    let cred: BrokerCredential = post(
        &client,
        join(&bundle.control_url, ENROLL_PATH),
        &BrokerEnrollRequest {
            name: bundle.name.clone(),
            token: bundle.token.clone(),
            csr_pem,
        },
    )
    .await?;
    let (_, validity) = check_credential(&cred, &identity, &key)?;
    if parse_certs(cred.ca_pem.as_bytes())
        .map(|c| c.is_empty())
        .unwrap_or(true)
    {
        return Err(ControlError::BadAnswer(
            "ca_pem holds no certificate".into(),
        ));
    }
    dir.save_enrolled(
        &identity,
        &cred.ca_pem,
        &cred.chain_pem,
        &key.serialize_pem(),
    )?;
    info!(
        broker = %identity.name,
        trust_domain = %identity.trust_domain,
        not_after = validity.not_after,
        dir = %dir.root().display(),
        "enrolled with control; credential stored"
    );
    Ok(())
}

/// Renews the broker's certificate before it expires.
#[derive(Debug, Clone)]
pub struct Renewer {
    /// Who we are.
    pub identity: BrokerIdentity,
    /// Verifies control.
    pub verifier: Arc<ControlVerifier>,
    /// The certificate in force (swapped on success).
    pub cert: Arc<CertStore>,
    /// Where the files live.
    pub dir: DataDir,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Longest wait before renewing a certificate whose two-thirds point has passed.
pub const RENEW_FLOOR_MAX: Duration = Duration::from_secs(60);

impl Renewer {
    /// One renewal: new key, CSR, `POST /v1/brokers/renew`, files, swap. Returns the new
    /// validity.
    pub async fn renew_once(&self) -> Result<Validity, ControlError> {
        let (key, csr_pem) = new_key_and_csr(&self.identity.name)?;
        let client = http_client(self.verifier.clone(), Some(self.cert.clone()))?;
        let cred: BrokerCredential = post(
            &client,
            join(&self.identity.control_url, RENEW_PATH),
            &BrokerRenewRequest { csr_pem },
        )
        .await?;
        let (chain, validity) = check_credential(&cred, &self.identity, &key)?;
        let ck = crate::tls::certified_key(chain, key_der(&key), &crate::tls::provider())
            .map_err(|e| ControlError::BadAnswer(e.to_string()))?;
        let dir = self.dir.clone();
        let chain_pem = cred.chain_pem.clone();
        let key_pem = key.serialize_pem();
        tokio::task::spawn_blocking(move || dir.save_renewed(&chain_pem, &key_pem))
            .await
            .map_err(|e| ControlError::Local(e.to_string()))??;
        self.cert.swap(ck);
        self.metrics
            .certificate_expiry_timestamp_seconds
            .set(i64::try_from(validity.not_after).unwrap_or(i64::MAX));
        Ok(validity)
    }

    /// Renew at two thirds of each certificate's lifetime until `shutdown`.
    pub async fn run(self, mut validity: Validity, shutdown: CancellationToken) {
        self.metrics
            .certificate_expiry_timestamp_seconds
            .set(i64::try_from(validity.not_after).unwrap_or(i64::MAX));
        let mut retry = tether_identity::Backoff::new(RENEW_RETRY_MIN, RENEW_RETRY_MAX);
        loop {
            let now = crate::presence::unix_secs(SystemTime::now());
            // Control backdates `notBefore` (clock skew), so for a short certificate the
            // two-thirds point can already be past on arrival: wait at least half of what
            // is left, up to a minute, so renewals never run back to back.
            let floor = Duration::from_secs(validity.not_after.saturating_sub(now) / 2)
                .min(RENEW_FLOOR_MAX);
            let wait = Duration::from_secs(validity.renew_at().saturating_sub(now)).max(floor);
            info!(
                not_after = validity.not_after,
                renew_in = ?wait,
                "broker certificate renewal scheduled"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            loop {
                match self.renew_once().await {
                    Ok(v) => {
                        self.metrics
                            .certificate_renewals
                            .get_or_create(&Outcome { result: "ok" })
                            .inc();
                        info!(not_after = v.not_after, "broker certificate renewed");
                        validity = v;
                        retry.reset();
                        break;
                    }
                    Err(e) => {
                        self.metrics
                            .certificate_renewals
                            .get_or_create(&Outcome { result: "error" })
                            .inc();
                        let now = crate::presence::unix_secs(SystemTime::now());
                        if now >= validity.not_after {
                            error!(error = %e, not_after = validity.not_after,
                                "broker certificate expired and renewal failed: agents and control \
                                 will refuse this broker until it is enrolled again");
                        } else {
                            warn!(error = %e, retry_within = ?retry.ceiling(), not_after = validity.not_after,
                                "broker certificate renewal failed; retrying");
                        }
                        let delay = retry.next_delay();
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let v = Validity {
            not_before: 1000,
            not_after: 1000 + 30 * 86400,
        };
        assert_eq!(v.renew_at(), 1000 + 20 * 86400);
    }

    #[test]
    fn control_error_bodies_give_code_and_message() {
        let (code, msg) = error_body(br#"{"error":"invalid_token","message":"token expired"}"#);
        assert_eq!(
            (code.as_str(), msg.as_str()),
            ("invalid_token", "token expired")
        );
        let (code, msg) = error_body(b"<html>bad gateway</html>");
        assert_eq!(code, "unknown");
        assert!(msg.contains("bad gateway"));
        let e = ControlError::Refused {
            status: 401,
            code: "invalid_token".into(),
            message: "token expired".into(),
        };
        assert_eq!(
            e.to_string(),
            "control refused (401): invalid_token: token expired"
        );
    }

    #[test]
    fn a_csr_is_made_over_a_fresh_p256_key() {
        let (k1, csr) = new_key_and_csr("edge-1").unwrap();
        let (k2, _) = new_key_and_csr("edge-1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_ne!(k1.public_key_raw(), k2.public_key_raw());
        assert_eq!(k1.public_key_raw().len(), 65, "uncompressed P-256 point");
    }

    #[test]
    fn join_tolerates_a_trailing_slash() {
        assert_eq!(
            join("https://c:8443/", ENROLL_PATH),
            "https://c:8443/v1/brokers/enroll"
        );
        assert_eq!(
            join("https://c:8443", RENEW_PATH),
            "https://c:8443/v1/brokers/renew"
        );
    }
}
