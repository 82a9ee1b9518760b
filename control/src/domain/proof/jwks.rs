//! JSON Web Key Sets for the GCP and Kubernetes verifiers, and the one place a JWT's
//! signature is checked.
//!
//! A [`JwksCache`] holds the RSA signing keys of one issuer, read from an HTTPS URL or a
//! file ([`JwksSource`]). Keys are loaded on first use, again once they are older than
//! `max_age`, and again when a token names a `kid` the set does not hold (the issuer
//! rotated its keys), but never more often than once per `min_refetch`: tokens with
//! made-up kids cannot make control hammer the source, and concurrent misses share one
//! fetch. A failed refresh keeps the keys already held (and is logged). Time is the
//! caller's `now`; nothing here reads the clock.
//!
//! [`verify_rs256`] parses the header itself, so `alg: none`, `HS256` keyed with the public
//! key and every other algorithm are refused with `jwt_alg_not_allowed` before any key is
//! looked up; then the RS256 signature is checked (jsonwebtoken, RustCrypto backend)
//! against the key the `kid` names and the claims are decoded. Checking the claims
//! (issuer, expiry, audience, identity) with `now` is the caller's job.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::domain::ErrorKind;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tracing::{info, warn};

use super::Error;
use crate::domain::InvalidSetting;

/// Largest JWKS document accepted, bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Largest JWT accepted, bytes (identity tokens are about 1 KiB).
pub const MAX_JWT_BYTES: usize = 16 * 1024;
/// Most keys kept from one JWKS document.
pub const MAX_KEYS: usize = 64;
/// Smallest RSA modulus accepted, bytes (2048 bits).
pub const MIN_RSA_MODULUS_BYTES: usize = 256;
/// Largest RSA modulus accepted, bytes (8192 bits).
pub const MAX_RSA_MODULUS_BYTES: usize = 1024;
/// Time limit of one JWKS request, connection included.
pub const JWKS_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of the connection of one JWKS request.
pub const JWKS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default age after which a key set is fetched again: 1 hour.
pub const DEFAULT_JWKS_MAX_AGE: Duration = Duration::from_secs(3600);
/// Default least time between two fetches of one source: 1 minute.
pub const DEFAULT_JWKS_MIN_REFETCH: Duration = Duration::from_secs(60);
/// Largest clock leeway a config may set: 5 minutes.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Refusal codes shared by the JWT proofs (each also logged at warn).
pub mod code {
    /// 400: not a compact JWS, bad base64 or JSON, claims missing or of the wrong type.
    pub const JWT_MALFORMED: &str = "jwt_malformed";
    /// 400: the header names an algorithm other than RS256 (`none`, `HS256`, ...).
    pub const JWT_ALG_NOT_ALLOWED: &str = "jwt_alg_not_allowed";
    /// 403: no `kid`, or a `kid` the issuer's key set does not hold (after one refresh).
    pub const JWT_UNKNOWN_KEY: &str = "jwt_unknown_key";
    /// 403: the signature does not verify with the key the `kid` names.
    pub const JWT_BAD_SIGNATURE: &str = "jwt_bad_signature";
    /// 403: past `exp` (plus the leeway).
    pub const JWT_EXPIRED: &str = "jwt_expired";
    /// 403: `nbf` or `iat` lies in the future (beyond the leeway).
    pub const JWT_NOT_YET_VALID: &str = "jwt_not_yet_valid";
    /// 403: issued (`iat`) longer ago than the allowed age (Kubernetes).
    pub const JWT_STALE: &str = "jwt_stale";
    /// 403: `aud` is not the nonce (GCP) or the cluster's audience (Kubernetes).
    pub const JWT_WRONG_AUDIENCE: &str = "jwt_wrong_audience";
    /// 403: `iss` is not Google (GCP) or not the appliance's recorded issuer (Kubernetes).
    pub const JWT_WRONG_ISSUER: &str = "jwt_wrong_issuer";
    /// 403: project or service account differ from the appliance's GCP binding.
    pub const GCP_IDENTITY_MISMATCH: &str = "gcp_identity_mismatch";
    /// 403: namespace, service account or subject differ from the Kubernetes binding.
    pub const K8S_IDENTITY_MISMATCH: &str = "k8s_identity_mismatch";
    /// 403: the appliance's recorded issuer is not a cluster configured in
    /// `[[proofs.k8s.clusters]]`.
    pub const K8S_ISSUER_NOT_CONFIGURED: &str = "k8s_issuer_not_configured";
    /// 502: the issuer's keys could not be loaded (and none are cached); retrying later
    /// may help.
    pub const JWKS_UNAVAILABLE: &str = "jwks_unavailable";
}

/// A refusal: 400 for a token that is not well formed, 403 for one that does not prove
/// the identity.
pub(crate) fn refuse(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Error {
    Error::new(kind, code, message)
}

/// A `jwt_malformed` refusal.
pub(crate) fn malformed(message: impl Into<String>) -> Error {
    refuse(ErrorKind::BadRequest, code::JWT_MALFORMED, message)
}

/// Where an issuer's keys come from.
pub enum JwksSource {
    /// `GET` this URL (HTTPS; plain HTTP only to a loopback host).
    Url {
        /// The JWKS URL.
        url: reqwest::Url,
        /// Client: rustls + ring, webpki roots or the configured CA file, no redirects,
        /// [`JWKS_HTTP_TIMEOUT`].
        client: reqwest::Client,
    },
    /// Read this file (re-read on every refresh, so a rotated file is picked up).
    File(PathBuf),
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::Url { url, .. } => write!(f, "Url({url})"),
            JwksSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl JwksSource {
    /// The source a config names: exactly one of `url` and `file`. `ca_file` (PEM) replaces
    /// the webpki roots for an HTTPS URL; `field` prefixes the config field names in errors
    /// (e.g. `proofs.gcp`).
    pub fn from_config(
        field: &'static str,
        url: Option<&str>,
        file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<JwksSource, InvalidSetting> {
        let invalid = |reason: String| InvalidSetting { field, reason };
        match (url, file) {
            (Some(_), Some(_)) => Err(invalid("set jwks_url or jwks_file, not both".into())),
            (None, None) => Err(invalid("set jwks_url or jwks_file".into())),
            (None, Some(path)) => {
                if ca_file.is_some() {
                    return Err(invalid("jwks_ca_file applies to jwks_url only".into()));
                }
                Ok(JwksSource::File(path.to_owned()))
            }
            (Some(url), None) => {
                let url = checked_url(url).map_err(|r| invalid(format!("jwks_url: {r}")))?;
                let roots = match ca_file {
                    Some(path) => load_roots(path)
                        .map_err(|r| invalid(format!("jwks_ca_file {}: {r}", path.display())))?,
                    None => rustls::RootCertStore {
                        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                    },
                };
                let client = http_client(roots).map_err(|r| invalid(format!("jwks_url: {r}")))?;
                Ok(JwksSource::Url { url, client })
            }
        }
    }

    /// Fetch and parse the key set.
    async fn load(&self) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
        let bytes = match self {
            JwksSource::Url { url, client } => fetch(client, url).await?,
            JwksSource::File(path) => read_file(path).await?,
        };
        parse_jwks(&bytes)
    }
}

/// `https://...`, or `http://` to a loopback host (a local proxy, tests).
fn checked_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let host = parsed.host_str().ok_or("no host")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => return Err("must be https (plain http only to a loopback host)".into()),
        other => return Err(format!("unsupported scheme {other:?}")),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials".into());
    }
    Ok(parsed)
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(roots)
}

fn http_client(roots: rustls::RootCertStore) -> Result<reqwest::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(JWKS_HTTP_TIMEOUT)
        .connect_timeout(JWKS_CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tether-control/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

async fn fetch(client: &reqwest::Client, url: &reqwest::Url) -> Result<Vec<u8>, String> {
    let mut resp = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(format!("GET {url}: HTTP {}", resp.status()));
    }
    if resp.content_length().unwrap_or(0) > MAX_JWKS_BYTES as u64 {
        return Err(format!("GET {url}: larger than {MAX_JWKS_BYTES} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("GET {url}: larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!(
            "{}: larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "{}: larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Vec<serde_json::Value>,
}

/// The fields of a JWK this module reads; the rest are ignored.
#[derive(Deserialize)]
struct RsaJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

/// The RS256 signing keys of a JWKS document, by `kid`. Keys of other types or uses,
/// without a kid, or with a modulus outside 2048-8192 bits are skipped; a document with no
/// usable key is an error.
fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
    let doc: JwksDoc = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<RsaJwk>(value) else {
            continue;
        };
        if jwk.kty != "RSA"
            || jwk.use_.as_deref().is_some_and(|u| u != "sig")
            || jwk.alg.as_deref().is_some_and(|a| a != "RS256")
        {
            continue;
        }
        let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else {
            continue;
        };
        let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
            continue;
        };
        let n = strip_leading_zeros(&n);
        let e = strip_leading_zeros(&e);
        if !(MIN_RSA_MODULUS_BYTES..=MAX_RSA_MODULUS_BYTES).contains(&n.len())
            || e.is_empty()
            || e.len() > 4
        {
            continue;
        }
        if keys.len() >= MAX_KEYS || keys.contains_key(&kid) {
            continue;
        }
        keys.insert(kid, Arc::new(DecodingKey::from_rsa_raw_components(n, e)));
    }
    if keys.is_empty() {
        return Err("the key set holds no usable RS256 key".into());
    }
    Ok(keys)
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// When a key set is fetched again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwksTiming {
    /// A set older than this is fetched again on next use.
    pub max_age: Duration,
    /// Least time between two fetches (successful or not), whatever the reason.
    pub min_refetch: Duration,
}

impl JwksTiming {
    /// Check the values; `field` prefixes the config field names in errors.
    pub fn validate(&self, field: &'static str) -> Result<(), InvalidSetting> {
        if self.min_refetch < Duration::from_secs(1) {
            return Err(InvalidSetting {
                field,
                reason: "jwks_min_refetch must be at least 1s".into(),
            });
        }
        if self.max_age < self.min_refetch {
            return Err(InvalidSetting {
                field,
                reason: "jwks_max_age must be at least jwks_min_refetch".into(),
            });
        }
        Ok(())
    }
}

impl Default for JwksTiming {
    fn default() -> Self {
        JwksTiming {
            max_age: DEFAULT_JWKS_MAX_AGE,
            min_refetch: DEFAULT_JWKS_MIN_REFETCH,
        }
    }
}

/// The keys held and when they were loaded (Unix seconds; `None`: never).
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
    loaded_at: Option<i64>,
}

/// The cached key set of one issuer. See the module doc for the refresh rules.
pub struct JwksCache {
    source: JwksSource,
    timing: JwksTiming,
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching; holds the time of the last attempt.
    refresh: tokio::sync::Mutex<Option<i64>>,
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.snapshot();
        let mut kids: Vec<&String> = set.keys.keys().collect();
        kids.sort();
        f.debug_struct("JwksCache")
            .field("source", &self.source)
            .field("timing", &self.timing)
            .field("kids", &kids)
            .field("loaded_at", &set.loaded_at)
            .finish()
    }
}

/// Whole seconds of a duration setting, as Unix-time arithmetic needs them.
pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl JwksCache {
    /// An empty cache; the first [`JwksCache::key`] loads the set.
    pub fn new(source: JwksSource, timing: JwksTiming) -> JwksCache {
        JwksCache {
            source,
            timing,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(None),
        }
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn fresh(&self, set: &KeySet, now: i64) -> bool {
        set.loaded_at
            .is_some_and(|at| now.saturating_sub(at) < secs(self.timing.max_age))
    }

    /// The key `kid` names, loading or refreshing the set if it is stale or lacks `kid`
    /// (at most once per `min_refetch`).
    pub async fn key(&self, kid: &str, now: i64) -> Result<Arc<DecodingKey>, Error> {
        let set = self.snapshot();
        if self.fresh(&set, now) {
            if let Some(key) = set.keys.get(kid) {
                return Ok(key.clone());
            }
        }
        let mut last_attempt = self.refresh.lock().await;
        // Another task may have refreshed while this one waited.
        let set = self.snapshot();
        if self.fresh(&set, now) {
            if let Some(key) = set.keys.get(kid) {
                return Ok(key.clone());
            }
        }
        // Concurrent callers may pass a `now` a little behind the last attempt: that is not
        // a reason to fetch again. A clock set back by more than the interval is.
        let min_refetch = secs(self.timing.min_refetch);
        let may_fetch = match *last_attempt {
            None => true,
            Some(at) => {
                let elapsed = now.saturating_sub(at);
                elapsed >= min_refetch || elapsed < -min_refetch
            }
        };
        if may_fetch {
            *last_attempt = Some(now);
            match self.source.load().await {
                Ok(keys) => {
                    let mut kids: Vec<&String> = keys.keys().collect();
                    kids.sort();
                    info!(source = ?self.source, ?kids, "JWKS loaded");
                    let set = Arc::new(KeySet {
                        keys,
                        loaded_at: Some(now),
                    });
                    *self
                        .keys
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = set;
                }
                Err(error) => {
                    warn!(source = ?self.source, %error, "JWKS refresh failed; keeping the keys held");
                }
            }
        }
        drop(last_attempt);
        let set = self.snapshot();
        if set.loaded_at.is_none() {
            return Err(refuse(
                ErrorKind::Upstream,
                code::JWKS_UNAVAILABLE,
                "the issuer's signing keys cannot be loaded; try again later",
            ));
        }
        set.keys.get(kid).cloned().ok_or_else(|| {
            refuse(
                ErrorKind::Forbidden,
                code::JWT_UNKNOWN_KEY,
                "the token is signed with a key the issuer does not publish",
            )
        })
    }
}

/// A JWT whose RS256 signature verified.
pub(crate) struct Signed<C> {
    /// The decoded claims.
    pub claims: C,
    /// The signature bytes.
    pub signature: Vec<u8>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// Check `jwt`'s form, algorithm (RS256 only) and signature with the key from `keys`, and
/// decode its claims. Claims are not checked here.
pub(crate) async fn verify_rs256<C: DeserializeOwned>(
    jwt: &str,
    keys: &JwksCache,
    now: i64,
) -> Result<Signed<C>, Error> {
    if jwt.len() > MAX_JWT_BYTES {
        return Err(malformed(format!("longer than {MAX_JWT_BYTES} bytes")));
    }
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a compact JWS (three dot-separated parts)"));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .filter(|h| is_json_object(h))
        .and_then(|h| serde_json::from_slice::<RawHeader>(&h).ok())
        .ok_or_else(|| malformed("the header is not base64url JSON with an alg"))?;
    if header.alg != "RS256" {
        return Err(refuse(
            ErrorKind::BadRequest,
            code::JWT_ALG_NOT_ALLOWED,
            "only RS256 tokens are accepted",
        ));
    }
    if header.crit.is_some() {
        return Err(malformed("critical header extensions are not supported"));
    }
    if !URL_SAFE_NO_PAD
        .decode(payload)
        .is_ok_and(|p| is_json_object(&p))
    {
        return Err(malformed("the claims are not base64url of a JSON object"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| malformed("the signature is not base64url"))?;
    if signature.is_empty() {
        return Err(malformed("no signature"));
    }
    let Some(kid) = header.kid.filter(|k| !k.is_empty()) else {
        return Err(refuse(
            ErrorKind::Forbidden,
            code::JWT_UNKNOWN_KEY,
            "the token names no key (kid)",
        ));
    };
    let key = keys.key(&kid, now).await?;
    let mut validation = Validation::new(Algorithm::RS256);
    // Claims are checked by the caller against its `now`, never the system clock.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<C>(jwt, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as Jwt;
        match e.kind() {
            Jwt::InvalidSignature => refuse(
                ErrorKind::Forbidden,
                code::JWT_BAD_SIGNATURE,
                "the signature does not verify",
            ),
            Jwt::InvalidAlgorithm | Jwt::InvalidAlgorithmName => refuse(
                ErrorKind::BadRequest,
                code::JWT_ALG_NOT_ALLOWED,
                "only RS256 tokens are accepted",
            ),
            Jwt::Json(_) => malformed("claims are missing or of the wrong type"),
            _ => malformed("cannot decode the token"),
        }
    })?;
    Ok(Signed {
        claims: data.claims,
        signature,
    })
}

/// Whether `bytes` are one complete JSON object, UTF-8 throughout (RFC 7519 §7.2), the
/// members nobody reads included: serde skips those without checking their text, and
/// jsonwebtoken decodes only the claims it is asked for. Found by the `jwt` fuzz target.
fn is_json_object(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(bytes).is_ok()
}

/// `aud` as a string or an array of strings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub(crate) enum Audience {
    /// `"aud": "x"`
    One(String),
    /// `"aud": ["x", "y"]`
    Many(Vec<String>),
}

impl Audience {
    /// Whether `aud` names `expected`.
    pub(crate) fn contains(&self, expected: &str) -> bool {
        match self {
            Audience::One(a) => a == expected,
            Audience::Many(all) => all.iter().any(|a| a == expected),
        }
    }
}

/// The time checks both proofs share: `exp` (required) and `nbf`, `iat` (if present) with
/// `leeway` seconds either way.
pub(crate) fn check_times(
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    leeway: i64,
    now: i64,
) -> Result<i64, Error> {
    let exp = exp.ok_or_else(|| malformed("no exp claim"))?;
    if now > exp.saturating_add(leeway) {
        return Err(refuse(
            ErrorKind::Forbidden,
            code::JWT_EXPIRED,
            "the token has expired",
        ));
    }
    for (claim, t) in [("nbf", nbf), ("iat", iat)] {
        if t.is_some_and(|t| t > now.saturating_add(leeway)) {
            return Err(refuse(
                ErrorKind::Forbidden,
                code::JWT_NOT_YET_VALID,
                format!("the token's {claim} is in the future"),
            ));
        }
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_except_loopback() {
        assert!(checked_url("https://www.googleapis.com/oauth2/v3/certs").is_ok());
        assert!(checked_url("http://127.0.0.1:8080/certs").is_ok());
        assert!(checked_url("http://[::1]:8080/certs").is_ok());
        assert!(checked_url("http://localhost/certs").is_ok());
        assert!(checked_url("http://keys.example.com/certs").is_err());
        assert!(checked_url("ftp://127.0.0.1/certs").is_err());
        assert!(checked_url("https://user:pw@keys.example.com/").is_err());
        assert!(checked_url("not a url").is_err());
    }

    #[test]
    fn jwks_without_a_usable_key_is_an_error() {
        assert!(parse_jwks(b"{\"keys\": []}").is_err());
        assert!(parse_jwks(b"not json").is_err());
        let short = URL_SAFE_NO_PAD.encode([0xc5u8; 128]);
        let doc = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"a","n":"{short}","e":"AQAB"}},{{"kty":"EC","kid":"b"}}]}}"#
        );
        assert!(
            parse_jwks(doc.as_bytes()).is_err(),
            "1024-bit keys are refused"
        );
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let doc = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"a","n":"{n}","e":"AQAB","alg":"RS256","use":"sig"}},
                {{"kty":"RSA","kid":"enc","n":"{n}","e":"AQAB","use":"enc"}}]}}"#
        );
        let keys = parse_jwks(doc.as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["a"]);
    }

    /// The claims (and the header) are checked whole before any key is looked up: a
    /// signed token whose payload carries bytes that are not UTF-8, or a lone surrogate,
    /// in a field no verifier reads was accepted (`fuzz/corpus/jwt/regress-claims-not-utf8`).
    #[tokio::test]
    async fn a_token_is_utf8_json_throughout() {
        let keys = JwksCache::new(
            JwksSource::File(PathBuf::from("/nonexistent/tether/jwks.json")),
            JwksTiming::default(),
        );
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k"}"#);
        let sig = URL_SAFE_NO_PAD.encode([1u8; 256]);
        let token = |header: &str, payload: &[u8]| {
            format!("{header}.{}.{sig}", URL_SAFE_NO_PAD.encode(payload))
        };
        let bad_header =
            URL_SAFE_NO_PAD.encode(b"{\"alg\":\"RS256\",\"kid\":\"k\",\"x\":\"\xc1\"}");
        for jwt in [
            token(&header, b"{\"sub\":\"a\",\"uid\":\"f1\xc13\"}"),
            token(&header, br#"{"sub":"a","uid":"\ud800"}"#),
            token(&header, b"[1]"),
            token(&header, b"{\"sub\":\"a\""),
            token(&bad_header, br#"{"sub":"a"}"#),
        ] {
            let r = verify_rs256::<serde_json::Value>(&jwt, &keys, 0).await;
            assert_eq!(r.err().map(|e| e.code), Some(code::JWT_MALFORMED), "{jwt}");
        }
        // Well formed: past the form checks, to the key (which cannot be loaded here).
        let r =
            verify_rs256::<serde_json::Value>(&token(&header, br#"{"sub":"a"}"#), &keys, 0).await;
        assert_eq!(r.err().map(|e| e.code), Some(code::JWKS_UNAVAILABLE));
    }

    #[test]
    fn times() {
        assert_eq!(check_times(Some(100), None, Some(50), 10, 105), Ok(100));
        assert_eq!(
            check_times(Some(100), None, None, 10, 111)
                .unwrap_err()
                .code,
            code::JWT_EXPIRED
        );
        assert_eq!(
            check_times(Some(100), None, Some(80), 10, 60)
                .unwrap_err()
                .code,
            code::JWT_NOT_YET_VALID
        );
        assert_eq!(
            check_times(None, None, None, 10, 60).unwrap_err().code,
            code::JWT_MALFORMED
        );
    }
}
