//! Operators for end-to-end tests: the `tether` CLI with a config directory, HTTPS
//! clients presenting a stored credential, and the audit log as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::bin;
use super::control::{control, Fleet};

/// `tether ARGS` with `TETHER_CONFIG_DIR=config`; Ok(stdout) or Err(stderr).
pub fn tether(config: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin("tether"))
        .args(args)
        .env("TETHER_CONFIG_DIR", config)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A config directory for `who`, next to the fleet's data.
pub fn config_dir(fleet: &Fleet, who: &str) -> PathBuf {
    fleet.data.parent().unwrap().join(format!("config-{who}"))
}

/// An HTTPS client presenting the credential `tether login` stored in `config` (or the
/// agent credential in a state directory when `agent` is set).
pub fn client_from(fleet: &Fleet, config: Option<&Path>, agent: bool) -> reqwest::Client {
    let root = std::fs::read(&fleet.root).unwrap();
    let files = config.map(|d| {
        let (c, k) = if agent {
            ("client.cert.pem", "client.key.pem")
        } else {
            ("operator.cert.pem", "operator.key.pem")
        };
        (
            std::fs::read(d.join(c)).unwrap(),
            std::fs::read(d.join(k)).unwrap(),
        )
    });
    tether_agent::enroll::http_client_with(
        &root,
        files.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    )
    .unwrap()
}

pub async fn call(
    client: &reqwest::Client,
    fleet: &Fleet,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", fleet.url());
    let req = match method {
        "GET" => client.get(url),
        _ => client.post(url).json(&body.unwrap_or(json!({}))),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub fn audit_entries(fleet: &Fleet) -> Vec<Value> {
    control(&[
        "audit",
        "list",
        "--data-dir",
        fleet.data.to_str().unwrap(),
        "--limit",
        "10000",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}
