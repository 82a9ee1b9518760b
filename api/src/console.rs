//! The web console's sign-in link: `POST /v1/console/login-links` (over mutual TLS).

use serde::{Deserialize, Serialize};

/// The answer of `POST /v1/console/login-links`: a single-use sign-in link for the
/// calling operator. The secret is in the URL's fragment (never sent to a server by a
/// browser); the link is good once, until `expires_at` (about a minute).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginLink {
    /// `https://<console origin>/console/login/<link id>#<secret>`.
    pub url: String,
    /// When it stops working (RFC 3339).
    pub expires_at: String,
}

impl std::fmt::Debug for LoginLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let LoginLink { url, expires_at } = self;
        let public = url.split('#').next().unwrap_or_default();
        f.debug_struct("LoginLink")
            .field("url", &format!("{public}#<redacted>"))
            .field("expires_at", expires_at)
            .finish()
    }
}
