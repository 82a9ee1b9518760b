//! The operator side of the `tether` CLI: credentials in a config directory, and an HTTPS
//! client to control that presents the operator certificate and pins control's root.
//!
//! # The config directory
//!
//! `$TETHER_CONFIG_DIR` when set (so several identities can be used side by side), else
//! the platform config directory's `tether/` (e.g. `~/.config/tether`). `tether login`
//! writes there, each file mode 0600 (the directory 0700):
//!
//! - `operator.key.pem` — the operator's private key (generated locally, never sent);
//! - `operator.cert.pem` — its certificate chain (leaf, intermediate);
//! - `ca.pem` — control's root CA, pinned by every call;
//! - `config.json` — `{"control_url", "name", "role"}`.
//!
//! Control's refusals come back as `{"error": code, "message"}`; [`Client`] turns them
//! into an error naming the status and the code, and the command exits non-zero.

pub mod appliance;
pub mod audit;
pub mod broker;
pub mod console;
pub mod control;
pub mod exec;
pub mod login;
pub mod operator;
pub mod tunnel;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tether_api::ErrorBody;

/// Environment variable naming the config directory.
pub const CONFIG_DIR_ENV: &str = "TETHER_CONFIG_DIR";
/// The operator's private key.
pub const KEY_FILE: &str = "operator.key.pem";
/// The operator's certificate chain.
pub const CERT_FILE: &str = "operator.cert.pem";
/// Control's root CA.
pub const CA_FILE: &str = "ca.pem";
/// `config.json`: [`Profile`].
pub const CONFIG_FILE: &str = "config.json";
/// Environment variable of `--control URL`: control's URL for this command, instead of
/// the one stored at login.
pub const CONTROL_URL_ENV: &str = "TETHER_CONTROL_URL";

/// `--control URL` / `$TETHER_CONTROL_URL`, set once by `main` before any command runs.
static CONTROL_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Parse `--control URL`: an `https://host[:port]` URL (a load balancer or one control
/// replica), returned without a trailing `/`.
pub fn parse_control_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err("control is reached over HTTPS: give https://host:port".into());
    }
    if url.host_str().is_none() {
        return Err("the URL names no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not carry a query or fragment".into());
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// Use `url` (from `--control` / `$TETHER_CONTROL_URL`) instead of the control URL stored
/// at login, for every call of this process.
pub fn set_control_url(url: String) {
    let _ = CONTROL_URL.set(url);
}

/// The control URL given for this command, if any.
pub fn control_url_override() -> Option<&'static str> {
    CONTROL_URL.get().map(String::as_str)
}

/// Options every operator command takes.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Config directory holding the operator credential [default: the platform config
    /// directory's `tether/`].
    #[arg(long, env = CONFIG_DIR_ENV)]
    pub config_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Common {
    /// The config directory: `--config-dir` / `$TETHER_CONFIG_DIR`, else the platform's.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        match &self.config_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(dirs::config_dir()
                .context("no platform config directory: set TETHER_CONFIG_DIR")?
                .join("tether")),
        }
    }
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// `config.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Control's HTTPS URL.
    pub control_url: String,
    /// Operator name.
    pub name: String,
    /// Role at login time (control decides on every call).
    pub role: String,
}

/// A refusal from control.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// Stable error code.
    pub code: String,
    /// Message.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "control refused the request ({} {}): {}",
            self.status, self.code, self.message
        )
    }
}

impl std::error::Error for Refused {}

/// An HTTPS client to control, pinned to its root, presenting the operator credential.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    /// The profile (control URL, name).
    pub profile: Profile,
}

impl Client {
    /// The client for the credential in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Client> {
        let read = |file: &str| {
            std::fs::read(dir.join(file)).with_context(|| {
                format!(
                    "no operator credential in {} (missing {file}): run `tether login --bundle FILE` first",
                    dir.display()
                )
            })
        };
        let profile: Profile = serde_json::from_slice(&read(CONFIG_FILE)?)
            .with_context(|| format!("{} is not valid", dir.join(CONFIG_FILE).display()))?;
        let mut profile = profile;
        if let Some(url) = control_url_override() {
            profile.control_url = url.to_owned();
        }
        let (ca, cert, key) = (read(CA_FILE)?, read(CERT_FILE)?, read(KEY_FILE)?);
        let http = tether_agent::enroll::http_client_with(&ca, Some((&cert, &key)))
            .context("loading the operator credential")?;
        Ok(Client { http, profile })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.profile.control_url.trim_end_matches('/'))
    }

    /// GET `path`, decoding the JSON answer.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        answer(
            &self.profile.control_url,
            self.http.get(self.url(path)).send().await,
        )
        .await
    }

    /// GET `path` with `query` (one of `tether_api`'s query types, encoded by reqwest),
    /// decoding the JSON answer.
    pub async fn get_query<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &impl Serialize,
    ) -> anyhow::Result<T> {
        answer(
            &self.profile.control_url,
            self.http.get(self.url(path)).query(query).send().await,
        )
        .await
    }

    /// POST `body` to `path` and hand back the streaming answer on 2xx; a [`Refused`]
    /// otherwise.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach control at {}", self.profile.control_url))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        Err(
            answer::<serde_json::Value>(&self.profile.control_url, Ok(resp))
                .await
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("control answered {status}")),
        )
    }

    /// POST `body` (one of `tether_api`'s request types) to `path`, decoding the JSON
    /// answer.
    pub async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        answer(
            &self.profile.control_url,
            self.http.post(self.url(path)).json(body).send().await,
        )
        .await
    }
}

impl Client {
    /// `method` on `path` with no body, decoding the JSON answer.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<T> {
        answer(
            &self.profile.control_url,
            self.http.request(method, self.url(path)).send().await,
        )
        .await
    }

    /// `GET path` upgraded to `token` (HTTP/1.1 `101 Switching Protocols`): the raw
    /// connection, or a [`Refused`].
    pub async fn upgrade(&self, path: &str, token: &str) -> anyhow::Result<reqwest::Upgraded> {
        let resp = self
            .http
            .get(self.url(path))
            .header(reqwest::header::CONNECTION, "Upgrade")
            .header(reqwest::header::UPGRADE, token)
            .send()
            .await
            .with_context(|| format!("cannot reach control at {}", self.profile.control_url))?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            return Err(
                answer::<serde_json::Value>(&self.profile.control_url, Ok(resp))
                    .await
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("control answered {status}")),
            );
        }
        resp.upgrade()
            .await
            .context("control accepted the upgrade but the connection failed")
    }
}

/// Decode control's answer: the JSON body on 2xx, a [`Refused`] otherwise.
pub async fn answer<T: serde::de::DeserializeOwned>(
    control_url: &str,
    resp: Result<reqwest::Response, reqwest::Error>,
) -> anyhow::Result<T> {
    let resp = resp.with_context(|| format!("cannot reach control at {control_url}"))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("reading control's answer ({status})"))?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => Refused {
                status: status.as_u16(),
                code: e.error,
                message: e.message,
            },
            Err(_) => Refused {
                status: status.as_u16(),
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        }
        .into());
    }
    serde_json::from_slice(&bytes).context("control's answer is not the expected JSON")
}

/// Refuse an invalid operator or broker name before it reaches a URL (the rule of
/// `tether_identity::name`, which control applies too).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if let Err(e) = tether_identity::OperatorName::new(name) {
        bail!("invalid name {name:?}: {e}");
    }
    Ok(())
}

/// Write `data` to `path` atomically with mode 0600.
pub fn write_secret(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    tether_agent::enroll::write_atomic(path, data, 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

/// Print `value` as pretty JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
