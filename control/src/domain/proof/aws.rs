//! AWS proof: a presigned `sts:GetCallerIdentity` request that control replays to STS.
//!
//! The appliance signs (SigV4, with its own credentials) a `POST` of
//! `Action=GetCallerIdentity&Version=2011-06-15` to an STS endpoint, with the enrollment
//! nonce in the header `x-tether-nonce` *inside the signature*, and sends the method, URL,
//! headers and body as its proof. Control holds no AWS secret: it sends the request on to
//! STS, which checks the signature and answers whose credentials signed it.
//!
//! # Checks
//!
//! Before any connection is made, in this order:
//!
//! 1. The recorded role is an IAM role ARN (`aws_binding_invalid` otherwise: control's own
//!    record is unusable, re-register the appliance).
//! 2. The method is `POST`; the headers are valid HTTP headers, at most [`MAX_HEADERS`],
//!    no name twice (case-insensitively).
//! 3. The URL's origin — scheme, host and port, compared exactly after URL parsing (default
//!    ports made explicit) — is one of [`AwsSettings::sts_endpoints`]; a URL with user
//!    info, another scheme, another port, a trailing-dot host or an IP literal that is not
//!    listed is refused. The path must be `/`, with no query or fragment.
//! 4. The body is exactly [`GET_CALLER_IDENTITY_BODY`].
//! 5. `Authorization` is `AWS4-HMAC-SHA256` for the service `sts`.
//! 6. `x-tether-nonce` is present, listed in `SignedHeaders`, and equal to the nonce.
//! 7. `host` is present, signed, and equal to the URL's authority.
//! 8. Every signed header is present and one of [`SIGNABLE_HEADERS`]; a signed
//!    `content-length` equals the body's length; `content-type` (if any) is a form type.
//!
//! Then the request goes to the *configured* endpoint's root URL (never a URL rebuilt from
//! the proof), carrying `Authorization`, the signed headers (`content-length` is set by
//! the client) and a form `content-type`; nothing else. The call has a time limit
//! ([`AwsSettings::timeout`], connect to last byte), follows no redirect, uses no proxy,
//! and reads at most [`AwsSettings::max_response_bytes`] of the answer, incrementally.
//! HTTPS is verified against the public web roots (`webpki-roots`); plain HTTP is only
//! possible for an endpoint listed with `http://` (tests, emulators).
//!
//! STS must answer 200 with a `GetCallerIdentityResponse` naming exactly one `Arn`.
//!
//! # Role matching
//!
//! STS names a caller with role credentials by its *assumed-role* ARN,
//! `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`. That is normalised to
//! `arn:aws:iam::ACCOUNT:role/ROLE` and must equal the recorded role. An assumed-role ARN
//! carries no role path, so a recorded role with a path (`role/path/to/ROLE`) matches on
//! partition, account and final name: role names are unique within an account whatever
//! their path. Names compare exactly (case-sensitively). IAM users, root, federated users,
//! other roles and roles of other accounts are refused (`aws_role_mismatch`). Note that a
//! role deleted and re-created under the same name matches: the ARN cannot tell them
//! apart.
//!
//! # Replay
//!
//! The proof id is the SHA-256 of the SigV4 signature. STS accepts a signature for 15
//! minutes either side of its `x-amz-date`, so the id is remembered until 15 minutes after
//! the later of now and that date. (The nonce, single use and signed, already stops a
//! replay for another enrollment; this is the second lock.)
//!
//! # Refusals
//!
//! | code | status | why |
//! |---|---|---|
//! | `aws_proof_malformed` | 400 | method, headers, URL path, `Authorization`, signed-header set |
//! | `aws_wrong_action` | 400 | the body is not exactly GetCallerIdentity |
//! | `aws_host_not_allowed` | 400 | the URL's origin is not a configured STS endpoint |
//! | `aws_host_header_mismatch` | 400 | `host` missing or not the URL's authority |
//! | `aws_nonce_not_signed` | 400 | `x-tether-nonce` missing or not in `SignedHeaders` |
//! | `aws_nonce_mismatch` | 403 | `x-tether-nonce` is not this enrollment's nonce |
//! | `aws_binding_invalid` | 500 | the recorded role is not an IAM role ARN |
//! | `aws_sts_unreachable` | 502 | connect failure or time limit |
//! | `aws_sts_bad_response` | 502 | answer too large, not UTF-8, not the expected XML |
//! | `aws_sts_refused` | 403 | STS answered other than 200 (bad signature, expired, ...) |
//! | `aws_role_mismatch` | 403 | the caller is not the recorded role |
//!
//! Each refusal is logged (`warn`) with its code.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::ErrorKind;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use tether_api::enroll::AwsProof;

use super::{Error, Verified};
use crate::domain::InvalidSetting;

/// The header that carries the enrollment nonce; it must be among the signed headers.
pub const NONCE_HEADER: &str = "x-tether-nonce";
/// The only body accepted.
pub const GET_CALLER_IDENTITY_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The content type sent when the proof carries none.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// Default time limit of one STS call (connect to last byte): 10 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest STS answer read: 64 KiB (a real one is under 1 KiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How long STS accepts a signature around its date: 15 minutes.
pub const PRESIGN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Most headers a proof may carry.
pub const MAX_HEADERS: usize = 32;
/// The headers a proof may sign. Anything else in `SignedHeaders` is refused, so no
/// hop-by-hop or otherwise surprising header is ever forwarded.
pub const SIGNABLE_HEADERS: &[&str] = &[
    "content-length",
    "content-type",
    "host",
    "x-amz-content-sha256",
    "x-amz-date",
    "x-amz-security-token",
    NONCE_HEADER,
];
/// Regions whose STS endpoint (`https://sts.REGION.amazonaws.com`) is allowed by default,
/// next to the global `https://sts.amazonaws.com`. Other partitions (China, GovCloud) and
/// FIPS endpoints are listed by the operator.
pub const DEFAULT_STS_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "af-south-1",
    "ap-east-1",
    "ap-south-1",
    "ap-south-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "sa-east-1",
];

/// The refusal codes, stable (clients and dashboards match on them).
pub mod codes {
    /// 400: method, headers, URL path, `Authorization` or signed-header set.
    pub const MALFORMED: &str = "aws_proof_malformed";
    /// 400: the body is not exactly GetCallerIdentity.
    pub const WRONG_ACTION: &str = "aws_wrong_action";
    /// 400: the URL's origin is not a configured STS endpoint.
    pub const HOST_NOT_ALLOWED: &str = "aws_host_not_allowed";
    /// 400: the `host` header is missing or not the URL's authority.
    pub const HOST_HEADER_MISMATCH: &str = "aws_host_header_mismatch";
    /// 400: `x-tether-nonce` is missing or not signed.
    pub const NONCE_NOT_SIGNED: &str = "aws_nonce_not_signed";
    /// 403: `x-tether-nonce` is not this enrollment's nonce.
    pub const NONCE_MISMATCH: &str = "aws_nonce_mismatch";
    /// 500: the recorded role is not an IAM role ARN.
    pub const BINDING_INVALID: &str = "aws_binding_invalid";
    /// 502: STS could not be reached in time.
    pub const STS_UNREACHABLE: &str = "aws_sts_unreachable";
    /// 502: STS answered something unusable (too large, not the expected XML).
    pub const STS_BAD_RESPONSE: &str = "aws_sts_bad_response";
    /// 403: STS refused the request.
    pub const STS_REFUSED: &str = "aws_sts_refused";
    /// 403: the caller is not the recorded role.
    pub const ROLE_MISMATCH: &str = "aws_role_mismatch";
}

/// `[proofs.aws]`
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    /// The STS endpoints proofs may be sent to, as origins (`https://sts.amazonaws.com`,
    /// `https://sts.eu-west-1.amazonaws.com:443`, `http://127.0.0.1:5000` for an emulator):
    /// scheme `https` or `http`, a host, an optional port, no path, query or user info. A
    /// proof for any other origin is refused without a connection. Empty: no AWS proof is
    /// accepted. Default: [`default_sts_endpoints`] (global and regional AWS STS, HTTPS).
    pub sts_endpoints: Vec<String>,
    /// Time limit of one STS call, connect to last byte. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest STS answer read, bytes. Default 64 KiB.
    pub max_response_bytes: usize,
}

/// The default [`AwsSettings::sts_endpoints`]: `https://sts.amazonaws.com` and
/// `https://sts.REGION.amazonaws.com` for each of [`DEFAULT_STS_REGIONS`].
pub fn default_sts_endpoints() -> Vec<String> {
    std::iter::once("https://sts.amazonaws.com".to_owned())
        .chain(
            DEFAULT_STS_REGIONS
                .iter()
                .map(|r| format!("https://sts.{r}.amazonaws.com")),
        )
        .collect()
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            sts_endpoints: default_sts_endpoints(),
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl fmt::Debug for AwsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            sts_endpoints,
            timeout,
            max_response_bytes,
        } = self;
        f.debug_struct("AwsSettings")
            .field("sts_endpoints", sts_endpoints)
            .field("timeout", timeout)
            .field("max_response_bytes", max_response_bytes)
            .finish()
    }
}

impl AwsSettings {
    /// Check every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.endpoints().map(|_| ())
    }

    fn endpoints(&self) -> Result<Vec<Endpoint>, InvalidSetting> {
        if self.timeout.is_zero() {
            return Err(InvalidSetting {
                field: "proofs.aws.timeout",
                reason: "must be positive".into(),
            });
        }
        if self.max_response_bytes == 0 {
            return Err(InvalidSetting {
                field: "proofs.aws.max_response_bytes",
                reason: "must be positive".into(),
            });
        }
        self.sts_endpoints
            .iter()
            .map(|s| {
                Endpoint::parse(s).map_err(|reason| InvalidSetting {
                    field: "proofs.aws.sts_endpoints",
                    reason: format!("{s:?}: {reason}"),
                })
            })
            .collect()
    }
}

/// Scheme, host and port (explicit, defaults filled in): what two URLs must share to
/// reach the same server.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// The origin of an `http`/`https` URL with a host; `None` for anything else.
    fn of(url: &Url) -> Option<Origin> {
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        Some(Origin {
            scheme: url.scheme().to_owned(),
            host: url.host_str()?.to_owned(),
            port: url.port_or_known_default()?,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// A configured STS endpoint.
#[derive(Debug)]
struct Endpoint {
    origin: Origin,
    /// Its root URL: where proofs for it are sent.
    url: Url,
}

impl Endpoint {
    fn parse(s: &str) -> Result<Endpoint, String> {
        let url = Url::parse(s).map_err(|e| e.to_string())?;
        let origin = Origin::of(&url).ok_or("must be an http:// or https:// URL with a host")?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry user info".into());
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err("must be an origin: no path, query or fragment".into());
        }
        Ok(Endpoint { origin, url })
    }
}

/// Verifies AWS proofs (see the module docs).
#[derive(Debug)]
pub struct AwsVerifier {
    endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
}

/// What the checks before the network established.
#[derive(Debug)]
struct Prepared<'a> {
    endpoint: &'a Endpoint,
    headers: Vec<(HeaderName, HeaderValue)>,
    proof_id: String,
    remember_until: i64,
}

/// The parsed `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
struct SigV4<'a> {
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn refusal(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Error {
    Error::new(kind, code, message)
}

fn malformed(message: impl Into<String>) -> Error {
    refusal(ErrorKind::BadRequest, codes::MALFORMED, message)
}

impl AwsVerifier {
    /// Build from settings: checks them and builds the STS HTTP client.
    pub fn new(settings: &AwsSettings) -> anyhow::Result<AwsVerifier> {
        let endpoints = settings.endpoints()?;
        Ok(AwsVerifier {
            endpoints,
            client: sts_client(settings.timeout)?,
            timeout: settings.timeout,
            max_response_bytes: settings.max_response_bytes,
        })
    }

    /// Verify `proof` for `nonce` against the recorded `role_arn`.
    pub async fn verify(
        &self,
        proof: &AwsProof,
        nonce: &str,
        role_arn: &str,
    ) -> Result<Verified, Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.verify_at(proof, nonce, role_arn, now).await
    }

    /// [`verify`](Self::verify) with the time given (Unix seconds): it only sets
    /// `remember_until`; the signature's freshness is STS's to judge.
    pub async fn verify_at(
        &self,
        proof: &AwsProof,
        nonce: &str,
        role_arn: &str,
        now: i64,
    ) -> Result<Verified, Error> {
        let result = self.verify_inner(proof, nonce, role_arn, now).await;
        match &result {
            Ok(v) => debug!(role = role_arn, proof_id = %v.proof_id, "AWS proof verified"),
            Err(e) => warn!(
                code = e.code,
                kind = ?e.kind,
                reason = %e.message,
                role = role_arn,
                url = ?proof.url,
                "AWS proof refused"
            ),
        }
        result
    }

    async fn verify_inner(
        &self,
        proof: &AwsProof,
        nonce: &str,
        role_arn: &str,
        now: i64,
    ) -> Result<Verified, Error> {
        let recorded = RoleRef::recorded(role_arn).ok_or_else(|| {
            refusal(
                ErrorKind::Internal,
                codes::BINDING_INVALID,
                "the role recorded for this appliance is not an IAM role ARN; re-register it",
            )
        })?;
        let prepared = self.check(proof, nonce, now)?;
        let arn = self.call_sts(&prepared, &proof.body).await?;
        let caller = RoleRef::assumed(&arn).ok_or_else(|| {
            refusal(
                ErrorKind::Forbidden,
                codes::ROLE_MISMATCH,
                format!("the proof was signed by {arn}, not by an assumed role"),
            )
        })?;
        if caller != recorded {
            return Err(refusal(
                ErrorKind::Forbidden,
                codes::ROLE_MISMATCH,
                // The recorded role goes to the log (`role`), not to the caller.
                format!(
                    "the proof was signed by {arn} (role {}), which is not the role this \
                     appliance is bound to",
                    caller.normalised()
                ),
            ));
        }
        Ok(Verified {
            kind: "aws",
            proof_id: prepared.proof_id,
            remember_until: prepared.remember_until,
        })
    }

    /// Every check of `proof` that needs no network (module docs, steps 2-8), and
    /// nothing sent: what [`verify_at`](Self::verify_at) does before it calls STS. For
    /// the `aws_proof` fuzz target, which must not reach the network.
    pub fn check_offline(&self, proof: &AwsProof, nonce: &str, now: i64) -> Result<(), Error> {
        self.check(proof, nonce, now).map(|_| ())
    }

    /// Every check that needs no network (module docs, steps 2-8).
    fn check<'s>(&'s self, proof: &AwsProof, nonce: &str, now: i64) -> Result<Prepared<'s>, Error> {
        if proof.method != "POST" {
            return Err(malformed(format!(
                "the method must be POST, not {:?}",
                proof.method
            )));
        }
        let headers = lowercase_headers(&proof.headers)?;
        let (endpoint, url) = self.endpoint_for(&proof.url)?;
        if proof.body != GET_CALLER_IDENTITY_BODY {
            return Err(refusal(
                ErrorKind::BadRequest,
                codes::WRONG_ACTION,
                format!("the body must be exactly {GET_CALLER_IDENTITY_BODY:?}"),
            ));
        }
        let auth = headers
            .get("authorization")
            .ok_or_else(|| malformed("no Authorization header"))?;
        let sig = parse_authorization(auth).map_err(malformed)?;
        if sig.service != "sts" {
            return Err(malformed(format!(
                "the request is signed for the service {:?}, not sts",
                sig.service
            )));
        }
        let signed = |name: &str| sig.signed_headers.contains(&name);

        match headers.get(NONCE_HEADER) {
            None => {
                return Err(refusal(
                    ErrorKind::BadRequest,
                    codes::NONCE_NOT_SIGNED,
                    format!("the proof has no {NONCE_HEADER} header"),
                ))
            }
            Some(_) if !signed(NONCE_HEADER) => {
                return Err(refusal(
                    ErrorKind::BadRequest,
                    codes::NONCE_NOT_SIGNED,
                    format!("{NONCE_HEADER} is not among the signed headers"),
                ))
            }
            Some(v) if *v != nonce => {
                return Err(refusal(
                    ErrorKind::Forbidden,
                    codes::NONCE_MISMATCH,
                    format!("{NONCE_HEADER} is not the nonce of this enrollment"),
                ))
            }
            Some(_) => {}
        }

        let authority = match url.port() {
            Some(port) => format!("{}:{port}", endpoint.origin.host),
            None => endpoint.origin.host.clone(),
        };
        match headers.get("host") {
            Some(h) if h.eq_ignore_ascii_case(&authority) => {}
            Some(h) => {
                return Err(refusal(
                    ErrorKind::BadRequest,
                    codes::HOST_HEADER_MISMATCH,
                    format!("the host header {h:?} is not the URL's host {authority:?}"),
                ))
            }
            None => {
                return Err(refusal(
                    ErrorKind::BadRequest,
                    codes::HOST_HEADER_MISMATCH,
                    "the proof has no host header",
                ))
            }
        }
        if !signed("host") {
            return Err(malformed("the host header is not signed"));
        }

        let mut forward = Vec::with_capacity(sig.signed_headers.len() + 2);
        forward.push(header(AUTHORIZATION, auth)?);
        for &name in &sig.signed_headers {
            if !SIGNABLE_HEADERS.contains(&name) {
                return Err(malformed(format!(
                    "the signed header {name:?} is not accepted (only {})",
                    SIGNABLE_HEADERS.join(", ")
                )));
            }
            let value = headers
                .get(name)
                .ok_or_else(|| malformed(format!("the signed header {name:?} is missing")))?;
            match name {
                // The client sets it from the body; it must say the same.
                "content-length" => {
                    if value.trim() != proof.body.len().to_string() {
                        return Err(malformed("content-length is not the body's length"));
                    }
                }
                _ => forward.push(header(signable_name(name), value)?),
            }
        }
        match headers.get("content-type") {
            Some(ct) => {
                let essence = ct.split(';').next().unwrap_or("").trim();
                if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
                    return Err(malformed(format!("content-type {ct:?} is not a form type")));
                }
                if !signed("content-type") {
                    forward.push(header(CONTENT_TYPE, ct)?);
                }
            }
            None => forward.push(header(CONTENT_TYPE, FORM_CONTENT_TYPE)?),
        }

        let dated = headers
            .get("x-amz-date")
            .and_then(|d| parse_amz_date(d))
            .map_or(now, |d| d.max(now));
        Ok(Prepared {
            endpoint,
            headers: forward,
            proof_id: crate::domain::token::sha256_hex(sig.signature.as_bytes()),
            remember_until: dated + PRESIGN_LIFETIME.as_secs() as i64,
        })
    }

    /// The configured endpoint the proof's URL names, and the parsed URL.
    fn endpoint_for(&self, raw: &str) -> Result<(&Endpoint, Url), Error> {
        let not_allowed =
            |message: String| refusal(ErrorKind::BadRequest, codes::HOST_NOT_ALLOWED, message);
        let url = Url::parse(raw).map_err(|e| malformed(format!("the URL does not parse: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(not_allowed("the URL carries user info".into()));
        }
        let origin = Origin::of(&url)
            .ok_or_else(|| not_allowed("the URL must be http(s) with a host".into()))?;
        let endpoint = self
            .endpoints
            .iter()
            .find(|e| e.origin == origin)
            .ok_or_else(|| not_allowed(format!("{origin} is not a configured STS endpoint")))?;
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(malformed(
                "the URL must be the endpoint's root: no path, query or fragment",
            ));
        }
        Ok((endpoint, url))
    }

    /// Send the checked request; the caller's ARN from a 200 answer.
    async fn call_sts(&self, p: &Prepared<'_>, body: &str) -> Result<String, Error> {
        let origin = &p.endpoint.origin;
        let unreachable = |why: String| {
            refusal(
                ErrorKind::Upstream,
                codes::STS_UNREACHABLE,
                format!("STS at {origin} could not be reached: {why}"),
            )
        };
        let bad = |why: String| {
            refusal(
                ErrorKind::Upstream,
                codes::STS_BAD_RESPONSE,
                format!("STS at {origin} answered unusably: {why}"),
            )
        };
        let mut req = self
            .client
            .post(p.endpoint.url.clone())
            .body(body.to_owned());
        for (name, value) in &p.headers {
            req = req.header(name.clone(), value.clone());
        }
        // reqwest's own timeout covers the whole exchange; this one is the backstop.
        let exchange = async {
            let mut resp = req.send().await.map_err(ReadError::Transport)?;
            let status = resp.status();
            let body = read_limited(&mut resp, self.max_response_bytes).await;
            Ok::<_, ReadError>((status, body))
        };
        let (status, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => return Err(unreachable(format!("no answer within {:?}", self.timeout))),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(answer)) => answer,
        };
        if status != reqwest::StatusCode::OK {
            let detail = body
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|b| sts_error(&b));
            let (code, text) = detail.unwrap_or_default();
            warn!(sts = %origin, status = status.as_u16(), sts_code = %code, sts_message = %text, "STS refused a proof");
            let code = if code.is_empty() {
                String::new()
            } else {
                format!(" {code}")
            };
            return Err(refusal(
                ErrorKind::Forbidden,
                codes::STS_REFUSED,
                format!("STS refused the signed request ({}{code})", status.as_u16()),
            ));
        }
        let body = body.map_err(|e| match e {
            ReadError::TooLarge(limit) => bad(format!("more than {limit} bytes")),
            e @ ReadError::Transport(_) => unreachable(e.to_string()),
        })?;
        let text = String::from_utf8(body).map_err(|_| bad("not UTF-8".into()))?;
        caller_arn(&text).map_err(bad)
    }
}

/// Headers by lowercase name; each valid for HTTP, none twice.
fn lowercase_headers(h: &BTreeMap<String, String>) -> Result<BTreeMap<String, &str>, Error> {
    if h.len() > MAX_HEADERS {
        return Err(malformed(format!("more than {MAX_HEADERS} headers")));
    }
    let mut out = BTreeMap::new();
    for (name, value) in h {
        let lower = name.to_ascii_lowercase();
        if HeaderName::from_bytes(lower.as_bytes()).is_err()
            || HeaderValue::from_str(value).is_err()
        {
            return Err(malformed(format!(
                "the header {name:?} is not a valid HTTP header"
            )));
        }
        if out.insert(lower, value.as_str()).is_some() {
            return Err(malformed(format!("the header {name:?} appears twice")));
        }
    }
    Ok(out)
}

fn header(name: HeaderName, value: &str) -> Result<(HeaderName, HeaderValue), Error> {
    let value = HeaderValue::from_str(value)
        .map_err(|_| malformed(format!("the header {name} is not a valid HTTP header")))?;
    Ok((name, value))
}

/// The header name of an entry of [`SIGNABLE_HEADERS`] (lowercase, valid).
fn signable_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).expect("SIGNABLE_HEADERS are valid names")
}

/// Parse `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
/// SignedHeaders=a;b;c, Signature=HEX`.
fn parse_authorization(v: &str) -> Result<SigV4<'_>, String> {
    let rest = v
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("Authorization is not AWS4-HMAC-SHA256")?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or("Authorization has a part without '='")?;
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(format!("Authorization has an unknown part {key:?}")),
        };
        if slot.replace(value).is_some() {
            return Err(format!("Authorization has {key} twice"));
        }
    }
    let credential = credential.ok_or("Authorization has no Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [akid, date, region, service, terminator] = scope[..] else {
        return Err("the Credential scope is not AKID/DATE/REGION/SERVICE/aws4_request".into());
    };
    if akid.is_empty()
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
        || region.is_empty()
        || terminator != "aws4_request"
    {
        return Err("the Credential scope is not AKID/DATE/REGION/SERVICE/aws4_request".into());
    }
    let signed: Vec<&str> = signed_headers
        .ok_or("Authorization has no SignedHeaders")?
        .split(';')
        .collect();
    if signed
        .iter()
        .any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err("SignedHeaders must be lowercase names separated by ';'".into());
    }
    let mut sorted = signed.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != signed.len() {
        return Err("SignedHeaders names a header twice".into());
    }
    let signature = signature.ok_or("Authorization has no Signature")?;
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("the Signature is not 64 lowercase hex digits".into());
    }
    Ok(SigV4 {
        service,
        signed_headers: signed,
        signature,
    })
}

/// `x-amz-date` (`YYYYMMDDTHHMMSSZ`) as Unix seconds.
fn parse_amz_date(v: &str) -> Option<i64> {
    let format =
        time::format_description::parse_borrowed::<2>("[year][month][day]T[hour][minute][second]Z")
            .ok()?;
    let t = time::PrimitiveDateTime::parse(v, &format).ok()?;
    Some(t.assume_utc().unix_timestamp())
}

/// Why the answer could not be read.
#[derive(Debug)]
enum ReadError {
    Transport(reqwest::Error),
    TooLarge(usize),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Transport(e) if e.is_timeout() => f.write_str("timed out"),
            ReadError::Transport(e) if e.is_connect() => write!(f, "cannot connect: {e}"),
            ReadError::Transport(e) => write!(f, "{e}"),
            ReadError::TooLarge(limit) => write!(f, "answer larger than {limit} bytes"),
        }
    }
}

/// The body, chunk by chunk, refusing past `limit` bytes.
async fn read_limited(resp: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The HTTPS client for STS: rustls with ring, the public web roots, HTTP/1.1, no
/// redirects, no proxy, a total time limit.
fn sts_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("tether-control/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Element path of the caller's ARN in a GetCallerIdentity answer.
const ARN_PATH: [&str; 3] = [
    "GetCallerIdentityResponse",
    "GetCallerIdentityResult",
    "Arn",
];
/// Deepest element nesting read.
const MAX_XML_DEPTH: usize = 16;

/// The `Arn` of a `GetCallerIdentityResponse` (exactly one, non-empty): how STS's 200
/// answer is read. Public for the `sts_xml` fuzz target; the error says why the answer is
/// unusable.
pub fn caller_arn(xml: &str) -> Result<String, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut arn: Option<String> = None;
    let at_arn = |path: &[String]| path.iter().map(String::as_str).eq(ARN_PATH);
    loop {
        match reader.read_event().map_err(|e| format!("bad XML: {e}"))? {
            Event::Start(e) => {
                let name = e.local_name();
                let name = name.into_inner().to_owned();
                if path.is_empty() && name != ARN_PATH[0] {
                    return Err(format!("<{name}> is not a GetCallerIdentityResponse"));
                }
                if path.len() >= MAX_XML_DEPTH {
                    return Err("XML nested too deep".into());
                }
                path.push(name);
                if at_arn(&path) {
                    if arn.is_some() {
                        return Err("more than one Arn".into());
                    }
                    arn = Some(String::new());
                }
            }
            Event::Empty(e) => {
                let name = e.local_name();
                let name = name.into_inner().to_owned();
                if path.is_empty() {
                    return Err(format!("<{name}/> is not a GetCallerIdentityResponse"));
                }
                path.push(name);
                if at_arn(&path) {
                    return Err("empty Arn".into());
                }
                path.pop();
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) if at_arn(&path) => {
                if let Some(a) = arn.as_mut() {
                    a.push_str(&t.xml10_content());
                }
            }
            Event::CData(_) | Event::GeneralRef(_) if at_arn(&path) => {
                return Err("the Arn is not plain text".into());
            }
            Event::DocType(_) => return Err("a DTD in the answer".into()),
            Event::Eof => break,
            _ => {}
        }
    }
    match arn.map(|a| a.trim().to_owned()) {
        Some(a) if !a.is_empty() => Ok(a),
        _ => Err("no Arn in the answer".into()),
    }
}

/// `Code` and `Message` of an STS `ErrorResponse`, for the log (`None`: no `Code`).
/// Public for the `sts_xml` fuzz target.
pub fn sts_error(xml: &str) -> Option<(String, String)> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut code, mut message) = (None, None);
    let mut current: Option<String> = None;
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => current = Some(e.local_name().into_inner().to_owned()),
            Event::End(_) => current = None,
            Event::Text(t) => {
                let text: String = t.xml10_content().chars().take(200).collect();
                match current.as_deref() {
                    Some("Code") if code.is_none() => code = Some(text),
                    Some("Message") if message.is_none() => message = Some(text),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Some((code?, message.unwrap_or_default()))
}

/// A role: partition, account, final name.
#[derive(Debug, PartialEq, Eq)]
struct RoleRef<'a> {
    partition: &'a str,
    account: &'a str,
    name: &'a str,
}

impl<'a> RoleRef<'a> {
    /// `arn:PARTITION:SERVICE::ACCOUNT:RESOURCE` → (partition, account, resource).
    fn split(arn: &'a str, service: &str) -> Option<(&'a str, &'a str, &'a str)> {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some(svc), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let partition_ok = !partition.is_empty()
            && partition
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-');
        let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
        (svc == service && partition_ok && account_ok).then_some((partition, account, resource))
    }

    /// A recorded role: `arn:P:iam::ACCOUNT:role/[PATH/]NAME`.
    fn recorded(arn: &'a str) -> Option<RoleRef<'a>> {
        let (partition, account, resource) = Self::split(arn, "iam")?;
        let path_and_name = resource.strip_prefix("role/")?;
        if !path_and_name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return None;
        }
        let name = path_and_name.rsplit('/').next()?;
        valid_name(name).then_some(RoleRef {
            partition,
            account,
            name,
        })
    }

    /// A caller: `arn:P:sts::ACCOUNT:assumed-role/NAME/SESSION`.
    fn assumed(arn: &'a str) -> Option<RoleRef<'a>> {
        let (partition, account, resource) = Self::split(arn, "sts")?;
        let (name, session) = resource.strip_prefix("assumed-role/")?.split_once('/')?;
        (valid_name(name) && valid_name(session)).then_some(RoleRef {
            partition,
            account,
            name,
        })
    }

    fn normalised(&self) -> String {
        format!(
            "arn:{}:iam::{}:role/{}",
            self.partition, self.account, self.name
        )
    }
}

/// IAM role and session names: `[A-Za-z0-9+=,.@_-]`, 1-64 (sessions may be longer; 128
/// is allowed here).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// The role ARN an assumed-role ARN stands for: `arn:aws:sts::ACCT:assumed-role/ROLE/SESSION`
/// → `arn:aws:iam::ACCT:role/ROLE`. `None` for anything else (users, root, federated).
pub fn normalise_assumed_role(arn: &str) -> Option<String> {
    RoleRef::assumed(arn).map(|r| r.normalised())
}

/// Whether `arn` can be recorded as an appliance's AWS binding:
/// `arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME`.
pub fn is_role_arn(arn: &str) -> bool {
    RoleRef::recorded(arn).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn verifier(endpoints: &[&str]) -> AwsVerifier {
        AwsVerifier::new(&AwsSettings {
            sts_endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            ..AwsSettings::default()
        })
        .unwrap()
    }

    fn proof(url: &str, host: &str, nonce: &str, signed: &str) -> AwsProof {
        let mut headers = BTreeMap::new();
        headers.insert(
            "Authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/sts/aws4_request, SignedHeaders={signed}, Signature={SIG}"
            ),
        );
        headers.insert("Host".into(), host.into());
        headers.insert("X-Amz-Date".into(), "20240101T000000Z".into());
        headers.insert("Content-Type".into(), FORM_CONTENT_TYPE.into());
        headers.insert(NONCE_HEADER.into(), nonce.into());
        AwsProof {
            method: "POST".into(),
            url: url.into(),
            headers,
            body: GET_CALLER_IDENTITY_BODY.into(),
        }
    }

    const SIGNED: &str = "content-type;host;x-amz-date;x-tether-nonce";

    fn code(r: Result<Prepared<'_>, Error>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.code,
        }
    }

    #[test]
    fn assumed_role_arns_normalise_to_the_role() {
        assert_eq!(
            normalise_assumed_role("arn:aws:sts::123456789012:assumed-role/app/i-0abc").as_deref(),
            Some("arn:aws:iam::123456789012:role/app")
        );
        assert_eq!(
            normalise_assumed_role("arn:aws-cn:sts::123456789012:assumed-role/app/s").as_deref(),
            Some("arn:aws-cn:iam::123456789012:role/app")
        );
        for not_a_role in [
            "arn:aws:iam::123456789012:user/alice",
            "arn:aws:sts::123456789012:user/moto",
            "arn:aws:iam::123456789012:root",
            "arn:aws:sts::123456789012:federated-user/bob",
            "arn:aws:iam::123456789012:role/app",
            "arn:aws:sts::123456789012:assumed-role/app",
            "arn:aws:sts::123456789012:assumed-role/app/",
            "arn:aws:sts::123456789012:assumed-role//s",
            "arn:aws:sts::12345678901:assumed-role/app/s",
            "arn:aws:sts:us-east-1:123456789012:assumed-role/app/s",
            "arn:aws:sts::123456789012:assumed-role/app/s/extra",
            "",
        ] {
            assert_eq!(normalise_assumed_role(not_a_role), None, "{not_a_role}");
        }
    }

    #[test]
    fn recorded_roles_match_on_partition_account_and_final_name() {
        let caller = RoleRef::assumed("arn:aws:sts::123456789012:assumed-role/app/s").unwrap();
        for same in [
            "arn:aws:iam::123456789012:role/app",
            "arn:aws:iam::123456789012:role/tether/app",
            "arn:aws:iam::123456789012:role/a/b/c/app",
        ] {
            assert_eq!(
                RoleRef::recorded(same),
                Some(caller_copy(&caller)),
                "{same}"
            );
        }
        for other in [
            "arn:aws:iam::123456789012:role/App",
            "arn:aws:iam::123456789012:role/app2",
            "arn:aws:iam::210987654321:role/app",
            "arn:aws-cn:iam::123456789012:role/app",
            "arn:aws:iam::123456789012:role/app/other",
        ] {
            assert_ne!(
                RoleRef::recorded(other),
                Some(caller_copy(&caller)),
                "{other}"
            );
        }
        for invalid in [
            "arn:aws:iam::123456789012:user/app",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/path/",
            "arn:aws:sts::123456789012:assumed-role/app/s",
            "app",
        ] {
            assert!(!is_role_arn(invalid), "{invalid}");
        }
    }

    fn caller_copy<'a>(r: &RoleRef<'a>) -> RoleRef<'a> {
        RoleRef {
            partition: r.partition,
            account: r.account,
            name: r.name,
        }
    }

    #[test]
    fn the_arn_is_read_from_a_get_caller_identity_response_only() {
        let ok = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult><UserId>AROA:s</UserId><Account>123456789012</Account><Arn>arn:aws:sts::123456789012:assumed-role/app/s</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>"#;
        assert_eq!(
            caller_arn(ok).unwrap(),
            "arn:aws:sts::123456789012:assumed-role/app/s"
        );
        let pretty = "<?xml version=\"1.0\"?>\n<GetCallerIdentityResponse>\n  <GetCallerIdentityResult>\n    <Arn>\n      arn:aws:sts::123456789012:assumed-role/app/s\n    </Arn>\n  </GetCallerIdentityResult>\n</GetCallerIdentityResponse>\n";
        assert_eq!(
            caller_arn(pretty).unwrap(),
            "arn:aws:sts::123456789012:assumed-role/app/s"
        );
        for bad in [
            "",
            "not xml",
            "<ListAllMyBucketsResult><Arn>arn:aws:sts::1:x</Arn></ListAllMyBucketsResult>",
            "<GetCallerIdentityResponse><Arn>arn:aws:sts::123456789012:assumed-role/app/s</Arn></GetCallerIdentityResponse>",
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn/></GetCallerIdentityResult></GetCallerIdentityResponse>",
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>a</Arn><Arn>b</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>",
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>a&amp;b</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>",
            "<!DOCTYPE x [<!ENTITY e \"arn\">]><GetCallerIdentityResponse><GetCallerIdentityResult><Arn>&e;</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>",
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>a</Wrong></GetCallerIdentityResult></GetCallerIdentityResponse>",
        ] {
            assert!(caller_arn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sts_error_codes_are_read_for_the_log() {
        let xml = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>nope</Message></Error></ErrorResponse>"#;
        assert_eq!(
            sts_error(xml),
            Some(("SignatureDoesNotMatch".into(), "nope".into()))
        );
        assert_eq!(sts_error("garbage"), None);
    }

    #[test]
    fn authorization_headers_parse_strictly() {
        let good = format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date, Signature={SIG}");
        assert_eq!(
            parse_authorization(&good).unwrap(),
            SigV4 {
                service: "sts",
                signed_headers: vec!["host", "x-amz-date"],
                signature: SIG
            }
        );
        for bad in [
            format!("AWS4-HMAC-SHA512 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts, SignedHeaders=host, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/2024/us-east-1/sts/aws4_request, SignedHeaders=host, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host;;x, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=Host, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host;host, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature={SIG}, Signature={SIG}"),
            format!("AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host, Extra=1, Signature={SIG}"),
            "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00".into(),
            "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/sts/aws4_request, SignedHeaders=host".into(),
            "Bearer x".into(),
        ] {
            assert!(parse_authorization(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_name_the_bad_field() {
        let mut s = AwsSettings::default();
        assert!(s.validate().is_ok());
        assert_eq!(s.sts_endpoints.len(), 1 + DEFAULT_STS_REGIONS.len());
        for bad in [
            "sts.amazonaws.com",
            "ftp://sts.amazonaws.com",
            "https://sts.amazonaws.com/path",
            "https://sts.amazonaws.com/?x=1",
            "https://user@sts.amazonaws.com",
        ] {
            s.sts_endpoints = vec![bad.into()];
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("proofs.aws.sts_endpoints"), "{bad}: {err}");
        }
        s = AwsSettings {
            timeout: Duration::ZERO,
            ..AwsSettings::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("proofs.aws.timeout"));
        let parsed: AwsSettings =
            toml::from_str("sts_endpoints = [\"http://127.0.0.1:5000\"]\ntimeout = \"2s\"\n")
                .unwrap();
        assert_eq!(parsed.timeout, Duration::from_secs(2));
        assert_eq!(parsed.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
    }

    #[test]
    fn only_configured_origins_pass() {
        let v = verifier(&["https://sts.amazonaws.com", "http://127.0.0.1:5000"]);
        let n = "n1";
        let ok = |url: &str, host: &str| code(v.check(&proof(url, host, n, SIGNED), n, 0));
        assert_eq!(ok("https://sts.amazonaws.com/", "sts.amazonaws.com"), "ok");
        assert_eq!(ok("https://sts.amazonaws.com", "sts.amazonaws.com"), "ok");
        assert_eq!(
            ok("https://STS.amazonaws.com:443/", "sts.amazonaws.com"),
            "ok"
        );
        assert_eq!(ok("http://127.0.0.1:5000/", "127.0.0.1:5000"), "ok");
        for (url, host) in [
            (
                "https://sts.amazonaws.com.evil.test/",
                "sts.amazonaws.com.evil.test",
            ),
            ("https://sts.amazonaws.com./", "sts.amazonaws.com."),
            ("https://sts.amazonaws.com:8443/", "sts.amazonaws.com:8443"),
            ("http://sts.amazonaws.com/", "sts.amazonaws.com"),
            ("https://evil@sts.amazonaws.com/", "sts.amazonaws.com"),
            ("https://sts.amazonaws.com:x@evil.test/", "evil.test"),
            ("http://127.0.0.1:5001/", "127.0.0.1:5001"),
            ("http://localhost:5000/", "localhost:5000"),
            ("https://127.0.0.1:5000/", "127.0.0.1:5000"),
            ("http://[::1]:5000/", "[::1]:5000"),
            ("http://169.254.169.254/", "169.254.169.254"),
            ("file:///etc/passwd", ""),
            ("unix:/run/x.sock", ""),
        ] {
            assert_eq!(ok(url, host), codes::HOST_NOT_ALLOWED, "{url}");
        }
        assert_eq!(ok("not a url", ""), codes::MALFORMED);
        assert_eq!(
            ok("https://sts.amazonaws.com/other", "sts.amazonaws.com"),
            codes::MALFORMED
        );
        assert_eq!(
            ok(
                "https://sts.amazonaws.com/?Action=AssumeRole",
                "sts.amazonaws.com"
            ),
            codes::MALFORMED
        );
        assert_eq!(
            ok("https://sts.amazonaws.com/", "sts.us-east-1.amazonaws.com"),
            codes::HOST_HEADER_MISMATCH
        );
        assert_eq!(
            ok("http://127.0.0.1:5000/", "127.0.0.1"),
            codes::HOST_HEADER_MISMATCH
        );
    }

    #[test]
    fn the_shape_is_checked_before_the_network() {
        let v = verifier(&["https://sts.amazonaws.com"]);
        let url = "https://sts.amazonaws.com/";
        let host = "sts.amazonaws.com";
        let base = || proof(url, host, "n1", SIGNED);
        let c = |p: AwsProof| code(v.check(&p, "n1", 0));

        assert_eq!(c(base()), "ok");
        let mut p = base();
        p.method = "GET".into();
        assert_eq!(c(p), codes::MALFORMED);
        let mut p = base();
        p.body = "Action=AssumeRole&Version=2011-06-15".into();
        assert_eq!(c(p), codes::WRONG_ACTION);
        let mut p = base();
        p.body = format!("{GET_CALLER_IDENTITY_BODY}&Action=AssumeRole");
        assert_eq!(c(p), codes::WRONG_ACTION);
        let mut p = base();
        p.headers.remove("Authorization");
        assert_eq!(c(p), codes::MALFORMED);
        // The same header twice in different case.
        let mut p = base();
        p.headers.insert("host".into(), "evil.test".into());
        assert_eq!(c(p), codes::MALFORMED);
        let mut p = base();
        p.headers.insert("x-bad".into(), "a\r\nb".into());
        assert_eq!(c(p), codes::MALFORMED);
        // Nonce: absent, unsigned, different.
        let mut p = base();
        p.headers.remove(NONCE_HEADER);
        assert_eq!(c(p), codes::NONCE_NOT_SIGNED);
        assert_eq!(
            c(proof(url, host, "n1", "content-type;host;x-amz-date")),
            codes::NONCE_NOT_SIGNED
        );
        assert_eq!(c(proof(url, host, "n2", SIGNED)), codes::NONCE_MISMATCH);
        // Host unsigned; a signed header that is not forwardable; one that is missing.
        assert_eq!(
            c(proof(
                url,
                host,
                "n1",
                "content-type;x-amz-date;x-tether-nonce"
            )),
            codes::MALFORMED
        );
        let mut p = proof(url, host, "n1", "connection;host;x-tether-nonce");
        p.headers.insert("Connection".into(), "close".into());
        assert_eq!(c(p), codes::MALFORMED);
        assert_eq!(
            c(proof(
                url,
                host,
                "n1",
                "host;x-amz-security-token;x-tether-nonce"
            )),
            codes::MALFORMED
        );
        // Wrong service in the scope.
        let mut p = base();
        let auth = p.headers["Authorization"].replace("/sts/", "/iam/");
        p.headers.insert("Authorization".into(), auth);
        assert_eq!(c(p), codes::MALFORMED);
        // content-length must be the body's; content-type must be a form.
        let mut p = proof(url, host, "n1", "content-length;host;x-tether-nonce");
        p.headers.insert("Content-Length".into(), "5".into());
        assert_eq!(c(p), codes::MALFORMED);
        let mut p = proof(url, host, "n1", "content-length;host;x-tether-nonce");
        p.headers.insert(
            "Content-Length".into(),
            GET_CALLER_IDENTITY_BODY.len().to_string(),
        );
        assert_eq!(c(p), "ok");
        let mut p = base();
        p.headers
            .insert("Content-Type".into(), "application/json".into());
        assert_eq!(c(p), codes::MALFORMED);
    }

    #[test]
    fn only_signed_headers_are_forwarded_and_the_id_is_the_signature_hash() {
        let v = verifier(&["https://sts.amazonaws.com"]);
        let mut p = proof(
            "https://sts.amazonaws.com/",
            "sts.amazonaws.com",
            "n1",
            "host;x-amz-date;x-tether-nonce",
        );
        p.headers
            .insert("X-Forwarded-For".into(), "10.0.0.1".into());
        p.headers.insert("Cookie".into(), "a=b".into());
        let prepared = v.check(&p, "n1", 1_704_067_200 + 5_000).unwrap();
        let names: Vec<&str> = prepared.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "authorization",
                "host",
                "x-amz-date",
                "x-tether-nonce",
                "content-type"
            ]
        );
        assert_eq!(prepared.endpoint.url.as_str(), "https://sts.amazonaws.com/");
        assert_eq!(
            prepared.proof_id,
            crate::domain::token::sha256_hex(SIG.as_bytes())
        );
        // Dated before now (2024-01-01T00:00:00Z): now wins.
        assert_eq!(prepared.remember_until, 1_704_067_200 + 5_000 + 900);
        // Dated after now: the date wins.
        let later = v.check(&p, "n1", 1_704_067_200 - 100).unwrap();
        assert_eq!(later.remember_until, 1_704_067_200 + 900);
    }
}
