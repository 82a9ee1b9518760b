//! GCP proof: an instance identity token from the metadata server, with the enrollment
//! nonce as its audience, in full format (so it names the project).
//!
//! The request goes straight to the metadata server (never through a proxy from the
//! environment), with `Metadata-Flavor: Google`, no redirects and a time limit.

use std::sync::Arc;
use std::time::Duration;

use crate::enroll::EnrollError;

/// Path of the identity endpoint under the metadata server.
pub const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
/// Time limit of the metadata request.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest identity token accepted, bytes (Google's are about 1 KiB).
pub const MAX_IDENTITY_TOKEN_BYTES: usize = 16 * 1024;

/// Where to get the token.
#[derive(Clone, Debug)]
pub struct GcpSource {
    /// Base URL of the metadata server (`http://metadata.google.internal`).
    pub metadata_url: String,
}

impl GcpSource {
    /// The proof JSON: `{"kind": "gcp", "jwt": "..."}`, the token's audience being `nonce`.
    pub async fn build(&self, nonce: &str) -> Result<tether_api::enroll::Proof, EnrollError> {
        let url = format!("{}{IDENTITY_PATH}", self.metadata_url.trim_end_matches('/'));
        let fail =
            |what: String| EnrollError::Proof(format!("GCP identity token from {url}: {what}"));
        let client = metadata_client().map_err(fail)?;
        let mut resp = client
            .get(&url)
            .query(&[("audience", nonce), ("format", "full")])
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > MAX_IDENTITY_TOKEN_BYTES {
                return Err(fail(format!(
                    "larger than {MAX_IDENTITY_TOKEN_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let jwt = std::str::from_utf8(&body)
            .map(str::trim)
            .ok()
            .filter(|t| looks_like_jwt(t))
            .ok_or_else(|| fail("the answer is not a JWT".into()))?;
        Ok(tether_api::enroll::Proof::Gcp {
            jwt: jwt.to_owned(),
        })
    }
}

/// A plain-HTTP client for the metadata server: no proxy, no redirects, a time limit. Its
/// TLS config (ring, no roots) only exists because reqwest needs one; an `https` metadata
/// URL fails to verify.
fn metadata_client() -> Result<reqwest::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(METADATA_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())
}

/// Whether `t` has the shape of a compact JWS: three non-empty base64url parts. (Control
/// does the real checks; this only catches an answer that is plainly something else.)
pub(crate) fn looks_like_jwt(t: &str) -> bool {
    let parts: Vec<&str> = t.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::looks_like_jwt;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJp.c2ln"));
        assert!(!looks_like_jwt("eyJh.eyJp."));
        assert!(!looks_like_jwt("eyJh.eyJp"));
        assert!(!looks_like_jwt("<html>error</html>"));
        assert!(!looks_like_jwt("a.b.c.d"));
    }
}
