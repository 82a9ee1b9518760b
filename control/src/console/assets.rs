//! The console's static files, embedded in the binary and served at content-hashed paths
//! (`/console/assets/console.<sha8>.js`) with a year of immutable caching: a new build
//! gets new names, so browsers never mix versions.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::domain::token::sha256_hex;

const CSS: &[u8] = include_bytes!("../../assets/console/console.css");
const JS: &[u8] = include_bytes!("../../assets/console/console.js");
const LOGIN_JS: &[u8] = include_bytes!("../../assets/console/login.js");

/// The hashed paths the pages link to.
#[derive(Debug)]
pub struct Assets {
    /// The stylesheet.
    pub css: String,
    /// The live-update and form helper script.
    pub js: String,
    /// The sign-in page's script.
    pub login: String,
    files: Vec<(String, &'static [u8], &'static str)>,
}

fn hashed(stem: &str, ext: &str, body: &[u8]) -> String {
    format!("{stem}.{}.{ext}", &sha256_hex(body)[..8])
}

/// The assets (computed once).
pub fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let files = vec![
            (
                hashed("console", "css", CSS),
                CSS,
                "text/css; charset=utf-8",
            ),
            (
                hashed("console", "js", JS),
                JS,
                "text/javascript; charset=utf-8",
            ),
            (
                hashed("login", "js", LOGIN_JS),
                LOGIN_JS,
                "text/javascript; charset=utf-8",
            ),
        ];
        let path = |i: usize| format!("/console/assets/{}", files[i].0);
        Assets {
            css: path(0),
            js: path(1),
            login: path(2),
            files,
        }
    })
}

/// `GET /console/assets/{file}`.
pub async fn serve(Path(file): Path<String>) -> Response {
    match assets().files.iter().find(|(name, _, _)| *name == file) {
        Some((_, body, kind)) => {
            let mut resp = (*body).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            );
            resp
        }
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
