//! A real headless browser for the console's tests: Debian's `chromium`, driven through its
//! `chromedriver` (W3C WebDriver) with fantoccini. `scripts/chromium` installs both
//! (`scripts/test` sources it); `TETHER_TEST_CHROMEDRIVER` and `TETHER_TEST_CHROMIUM` name
//! them, else they are looked up on PATH.
//!
//! With `CI=true` a missing browser fails the test; locally the test prints why it is
//! SKIPPED and passes.
//!
//! The browser trusts the console's certificate by its public-key pin
//! (`--ignore-certificate-errors-spki-list`), never by ignoring certificate errors
//! altogether, and runs with background networking off so it never reaches for Google's
//! hosts on this closed network.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use fantoccini::{Client, ClientBuilder};

/// One browser session and the chromedriver that runs it; both end on [`Browser::close`]
/// (or on drop, the driver is killed and the browser with it).
pub struct Browser {
    pub client: Client,
    driver: Child,
    driver_url: String,
    session: String,
    _profile: tempfile::TempDir,
}

/// The base64 SHA-256 of the first certificate's SubjectPublicKeyInfo in `cert_pem`: what
/// Chromium's `--ignore-certificate-errors-spki-list` takes.
pub fn spki_pin(cert_pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .expect("a certificate in the PEM")
        .expect("a readable PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("an X.509 certificate");
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn find(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Start chromedriver and a headless Chromium trusting the certificates whose SPKI pins
    /// are `pins`. `None` (after printing SKIPPED and why) when the browser is not installed
    /// and `CI` is not `true`.
    pub async fn start(test: &str, pins: &[String]) -> Option<Browser> {
        let (driver_bin, chromium) = match (
            find("TETHER_TEST_CHROMEDRIVER", "chromedriver"),
            find("TETHER_TEST_CHROMIUM", "chromium"),
        ) {
            (Some(d), Some(c)) => (d, c),
            _ => {
                let why = "chromium and chromedriver are not installed (run scripts/chromium, \
                           or ./scripts/test, which installs them)";
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{test}: {why}; CI=true, so the browser tests cannot be skipped");
                }
                eprintln!("{test}: SKIPPED: {why}");
                return None;
            }
        };
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_bin.display()));
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = super::http();
        let up = super::wait_for(Duration::from_secs(20), || async {
            let r = http.get(format!("{driver_url}/status")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        assert!(up.is_some(), "chromedriver answered on {driver_url}");
        let profile = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--window-size=1366,900".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        if !pins.is_empty() {
            args.push(format!(
                "--ignore-certificate-errors-spki-list={}",
                pins.join(",")
            ));
        }
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&driver_url)
            .await
            .unwrap_or_else(|e| panic!("cannot open a Chromium session: {e}"));
        let session = client.session_id().await.unwrap().expect("a session id");
        Some(Browser {
            client,
            driver,
            driver_url,
            session,
            _profile: profile,
        })
    }

    /// The browser's console log since the last call: (level, message) for every entry,
    /// CSP violations and uncaught errors included (chromedriver's `se/log`).
    pub async fn log(&self) -> Vec<(String, String)> {
        let r = super::http()
            .post(format!(
                "{}/session/{}/se/log",
                self.driver_url, self.session
            ))
            .json(&serde_json::json!({ "type": "browser" }))
            .send()
            .await
            .expect("chromedriver answers se/log");
        let body: serde_json::Value = r.json().await.expect("a JSON log");
        body["value"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        (
                            e["level"].as_str().unwrap_or_default().to_owned(),
                            e["message"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Errors and warnings in the browser's log since the last call (JavaScript errors, CSP
    /// violations, failed loads).
    pub async fn problems(&self) -> Vec<String> {
        self.log()
            .await
            .into_iter()
            .filter(|(level, _)| level == "SEVERE" || level == "WARNING")
            .map(|(level, m)| format!("{level}: {m}"))
            .collect()
    }

    /// Save a screenshot of the current page as `target/console-shots/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = shots_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// End the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `target/console-shots/` (beside the binaries under test).
pub fn shots_dir() -> PathBuf {
    let bin = super::bin("tether-control");
    let target = bin
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/tether-control");
    target.join("console-shots")
}
