//! AWS proof: a presigned `sts:GetCallerIdentity` carrying the enrollment nonce in a
//! signed header.
//!
//! The appliance loads its credentials with the standard AWS chain (environment, shared
//! config and credentials files, web identity, ECS container credentials, EC2 instance
//! role), signs (SigV4, `aws-sigv4`) a `POST` of [`GET_CALLER_IDENTITY_BODY`] to the STS
//! endpoint with the header [`NONCE_HEADER`]` = <nonce>` included in the signature, and
//! hands control the method, URL, headers and body. It does not send the request itself:
//! control replays it to STS (only to endpoints it is configured for) and learns the
//! appliance's role from the answer. The signature covers the nonce, so the proof is good
//! for this enrollment only; it holds no secret (the session token it carries is useless
//! without the secret key that only signed it).

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;

use crate::enroll::EnrollError;

/// The header that carries the nonce (signed).
pub const NONCE_HEADER: &str = "x-tether-nonce";
/// The request body: GetCallerIdentity, nothing else.
pub const GET_CALLER_IDENTITY_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The body's content type (signed).
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// Time limit for loading credentials (the instance metadata service may be slow or
/// absent): 30 s.
pub const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to sign.
#[derive(Clone, Debug)]
pub struct AwsSource {
    /// The STS endpoint URL to sign for (its origin must be one control allows).
    pub sts_url: String,
    /// The signing region.
    pub region: String,
}

impl AwsSource {
    /// The proof JSON: credentials from the standard chain, signed now.
    pub async fn build(&self, nonce: &str) -> Result<tether_api::enroll::Proof, EnrollError> {
        let credentials = load_credentials(&self.region).await?;
        sign_proof(
            &self.sts_url,
            &self.region,
            nonce,
            &credentials,
            SystemTime::now(),
        )
    }
}

/// Credentials from the standard AWS chain, with a time limit.
async fn load_credentials(region: &str) -> Result<Credentials, EnrollError> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let load = async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(region.to_owned()))
            .load()
            .await;
        let provider = config
            .credentials_provider()
            .ok_or_else(|| EnrollError::Proof("no AWS credentials provider".into()))?;
        provider
            .provide_credentials()
            .await
            .map_err(|e| EnrollError::Proof(format!("cannot load AWS credentials: {}", chain(&e))))
    };
    tokio::time::timeout(CREDENTIALS_TIMEOUT, load)
        .await
        .map_err(|_| {
            EnrollError::Proof(format!(
                "cannot load AWS credentials: no answer within {CREDENTIALS_TIMEOUT:?}"
            ))
        })?
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The proof JSON for `nonce`, signed with `credentials` at `time`:
/// `{"kind": "aws", "method": "POST", "url", "headers", "body"}`. The signed headers are
/// `content-type`, `host`, `x-amz-date`, `x-tether-nonce` and, with temporary
/// credentials, `x-amz-security-token`.
pub fn sign_proof(
    sts_url: &str,
    region: &str,
    nonce: &str,
    credentials: &Credentials,
    time: SystemTime,
) -> Result<tether_api::enroll::Proof, EnrollError> {
    let bad = |why: String| EnrollError::Proof(format!("cannot sign the AWS proof: {why}"));
    let url = reqwest::Url::parse(sts_url).map_err(|e| bad(format!("STS URL {sts_url:?}: {e}")))?;
    let host = match (url.scheme(), url.host_str()) {
        ("http" | "https", Some(host)) => host,
        _ => {
            return Err(bad(format!(
                "STS URL {sts_url:?} is not http(s) with a host"
            )))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(format!("STS URL {sts_url:?} carries user info")));
    }
    if region.is_empty() {
        return Err(bad("no signing region".into()));
    }
    // The authority as HTTP sends it: the port only when it is not the scheme's default.
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let url = url.as_str();
    let mut headers: Vec<(&str, String)> = vec![
        ("host", host),
        ("content-type", FORM_CONTENT_TYPE.to_owned()),
        (NONCE_HEADER, nonce.to_owned()),
    ];

    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| bad(e.to_string()))?
        .into();
    let request = SignableRequest::new(
        "POST",
        url,
        headers.iter().map(|(k, v)| (*k, v.as_str())),
        SignableBody::Bytes(GET_CALLER_IDENTITY_BODY.as_bytes()),
    )
    .map_err(|e| bad(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| bad(e.to_string()))?
        .into_parts();
    let (added, _query) = instructions.into_parts();
    for h in &added {
        headers.push((h.name(), h.value().to_owned()));
    }
    Ok(tether_api::enroll::Proof::Aws(
        tether_api::enroll::AwsProof {
            method: "POST".into(),
            url: url.to_string(),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            body: GET_CALLER_IDENTITY_BODY.into(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token.map(str::to_owned),
            None,
            "test",
        )
    }

    /// 2024-01-01T00:00:00Z
    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200)
    }

    fn signed_headers(proof: &serde_json::Value) -> Vec<String> {
        let auth = proof["headers"]["authorization"].as_str().unwrap();
        let list = auth
            .split(", ")
            .find_map(|p| p.strip_prefix("SignedHeaders="))
            .unwrap();
        list.split(';').map(str::to_owned).collect()
    }

    #[test]
    fn the_nonce_is_inside_the_signature() {
        let p = sign_proof(
            "https://sts.us-east-1.amazonaws.com/",
            "us-east-1",
            "n0nce",
            &creds(Some("session-token")),
            t0(),
        )
        .unwrap();
        let p = serde_json::to_value(&p).unwrap();
        assert_eq!(p["kind"], "aws");
        assert_eq!(p["method"], "POST");
        assert_eq!(p["url"], "https://sts.us-east-1.amazonaws.com/");
        assert_eq!(p["body"], GET_CALLER_IDENTITY_BODY);
        let h = &p["headers"];
        assert_eq!(h["host"], "sts.us-east-1.amazonaws.com");
        assert_eq!(h[NONCE_HEADER], "n0nce");
        assert_eq!(h["x-amz-date"], "20240101T000000Z");
        assert_eq!(h["x-amz-security-token"], "session-token");
        assert_eq!(
            signed_headers(&p),
            [
                "content-type",
                "host",
                "x-amz-date",
                "x-amz-security-token",
                "x-tether-nonce"
            ]
        );
        let auth = h["authorization"].as_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/sts/aws4_request, "
            ),
            "{auth}"
        );
        // Deterministic: same input, same signature; another nonce, another signature.
        let again = sign_proof(
            "https://sts.us-east-1.amazonaws.com/",
            "us-east-1",
            "n0nce",
            &creds(Some("session-token")),
            t0(),
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), p);
        let other = sign_proof(
            "https://sts.us-east-1.amazonaws.com/",
            "us-east-1",
            "other",
            &creds(Some("session-token")),
            t0(),
        )
        .unwrap();
        let other = serde_json::to_value(&other).unwrap();
        assert_ne!(other["headers"]["authorization"], h["authorization"]);
    }

    #[test]
    fn the_host_header_is_the_authority_http_sends() {
        let p = sign_proof(
            "http://127.0.0.1:5000",
            "us-east-1",
            "n",
            &creds(None),
            t0(),
        )
        .unwrap();
        let p = serde_json::to_value(&p).unwrap();
        assert_eq!(p["url"], "http://127.0.0.1:5000/");
        assert_eq!(p["headers"]["host"], "127.0.0.1:5000");
        assert!(p["headers"].get("x-amz-security-token").is_none());
        assert_eq!(
            signed_headers(&p),
            ["content-type", "host", "x-amz-date", "x-tether-nonce"]
        );
        let p = sign_proof(
            "https://sts.amazonaws.com:443/",
            "us-east-1",
            "n",
            &creds(None),
            t0(),
        )
        .unwrap();
        let p = serde_json::to_value(&p).unwrap();
        assert_eq!(p["headers"]["host"], "sts.amazonaws.com");
    }

    #[test]
    fn unusable_urls_are_refused() {
        for url in [
            "sts.amazonaws.com",
            "file:///x",
            "https://u:p@sts.amazonaws.com/",
        ] {
            assert!(
                matches!(
                    sign_proof(url, "us-east-1", "n", &creds(None), t0()),
                    Err(EnrollError::Proof(_))
                ),
                "{url}"
            );
        }
    }
}
