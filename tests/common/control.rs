//! The control plane for end-to-end tests: the real `tether-control` binary (init,
//! register, tokens, serve on 127.0.0.1:0) and an HTTPS client pinned to its root.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::{bin, TRUST_DOMAIN};

/// `tether-control` with `args`; panics with its stderr if it fails.
pub fn control(args: &[&str]) -> String {
    let out = Command::new(bin("tether-control"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tether-control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub struct ControlProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// Every log line so far (JSON).
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for ControlProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(dir: &Path) -> ControlProc {
    serve_on(dir, "127.0.0.1:0")
}

/// `tether-control serve` on `listen` (a restart keeps its port, so brokers find it).
pub fn serve_on(dir: &Path, listen: &str) -> ControlProc {
    serve_env(dir, listen, &[])
}

/// [`serve_on`] with extra environment variables (e.g. `TETHER_CONTROL_FAULT`).
pub fn serve_env(dir: &Path, listen: &str, env: &[(&str, &str)]) -> ControlProc {
    let mut child = Command::new(bin("tether-control"))
        .envs(env.iter().copied())
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("metrics listening") || line.contains("control API listening") {
                let _ = tx.send(line.clone());
            }
            eprintln!("[control] {line}");
            sink.lock().unwrap().push(line);
        }
    });
    // The metrics listener comes up first, then the API.
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("control started");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        addrs.push(v["fields"]["listen"].as_str().unwrap().parse().unwrap());
    }
    ControlProc {
        child,
        metrics: addrs[0],
        addr: addrs[1],
        logs,
    }
}

impl ControlProc {
    /// The value of one sample of this process's metrics (0 if absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = super::http()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// `/readyz`'s status (`None`: no answer within 5 s).
    pub async fn readyz(&self) -> Option<u16> {
        let resp = super::http()
            .get(format!("http://{}/readyz", self.metrics))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        Some(resp.status().as_u16())
    }

    /// Whether the process is still running (not exited, not restarted).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Whether control logged a warning carrying `code` (bounded wait: the log line may
    /// trail the HTTP answer).
    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn warned(&self, code: &str) -> bool {
        for _ in 0..250 {
            let found = self.logs.lock().unwrap().iter().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["level"] == "WARN" && v["fields"]["code"] == code)
            });
            if found {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

pub struct Fleet {
    pub _tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub root: PathBuf,
    pub control: ControlProc,
}

impl Fleet {
    pub fn new() -> Fleet {
        Fleet::with_config("")
    }

    /// As [`Fleet::new`], with `toml` merged into `control.toml` before `serve`.
    pub fn with_config(toml: &str) -> Fleet {
        Fleet::with_init(&[], toml)
    }

    /// As [`Fleet::with_config`], passing `init_args` to `tether-control init`.
    pub fn with_init(init_args: &[&str], toml: &str) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("control");
        let d = data.to_str().unwrap();
        let mut args = vec!["init", "--data-dir", d, "--trust-domain", TRUST_DOMAIN];
        args.extend_from_slice(init_args);
        control(&args);
        for id in ["app-1", "app-2"] {
            control(&[
                "appliance",
                "register",
                "--data-dir",
                d,
                id,
                "--token-only",
                "--tenant",
                "acme",
            ]);
        }
        let root = data.join("ca").join("root.pem");
        assert!(root.exists());
        merge_config(&data, toml);
        let control = serve(&data);
        Fleet {
            _tmp: tmp,
            data,
            root,
            control,
        }
    }

    pub fn token(&self, id: &str) -> String {
        let out = control(&[
            "token",
            "create",
            "--data-dir",
            self.data.to_str().unwrap(),
            id,
        ]);
        out.lines().last().unwrap().trim().to_owned()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.control.addr.port())
    }

    /// `tether-agent enroll`; Ok(stdout) or Err(stderr).
    pub fn enroll(&self, id: &str, token: &str, state: &Path) -> Result<String, String> {
        let out = Command::new(bin("tether-agent"))
            .args([
                "enroll",
                "--control",
                &self.url(),
                "--id",
                id,
                "--token",
                token,
                "--ca",
            ])
            .arg(&self.root)
            .arg("--state-dir")
            .arg(state)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn client(&self) -> reqwest::Client {
        tether_agent::enroll::http_client(&std::fs::read(&self.root).unwrap()).unwrap()
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .client()
            .post(format!("{}{path}", self.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(json!(null)))
    }

    pub async fn nonce(&self) -> String {
        let (status, v) = self.post("/v1/enroll/challenge", json!({})).await;
        assert_eq!(status, 200);
        let expires = v["expires_at"].as_str().expect("expires_at is a string");
        assert!(
            time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "expires_at is RFC 3339: {v}"
        );
        v["nonce"].as_str().unwrap().to_owned()
    }
}

/// Merge `extra` (TOML) into `DATA/control.toml`, table by table.
pub fn merge_config(data: &Path, extra: &str) {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let path = data.join("control.toml");
    let mut table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    merge(&mut table, extra.parse().expect("valid TOML"));
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
}

impl Fleet {
    /// Control's CA, loaded from the data directory.
    pub fn ca(&self) -> tether_control::domain::ca::Ca {
        tether_control::domain::ca::Ca::load(
            &self.data,
            &tether_control::domain::ca::CaConfig {
                trust_domain: TRUST_DOMAIN.into(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// The value of one sample of control's metrics (0 if absent), e.g.
    /// `tether_control_requests_total{route="/v1/enroll",status="403",code="token_used"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = super::http()
            .get(format!("http://{}/metrics", self.control.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// `tether-control allowlist export` written to `path` (atomically).
    pub fn export_allowlist(&self, path: &Path) {
        let text = control(&[
            "allowlist",
            "export",
            "--data-dir",
            self.data.to_str().unwrap(),
        ]);
        super::write_atomic(path, &text);
    }

    /// A real broker with a certificate from control's CA, enforcing control's allowlist
    /// as exported now (re-export to `allowlist` to update it). `extra_toml` is appended to
    /// its config.
    pub fn broker(&self, name: &str, extra_toml: &str) -> (super::BrokerProc, PathBuf) {
        let dir = self.data.parent().unwrap().join(format!("broker-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = self.ca();
        let (key_pem, csr) = tether_agent::enroll::key_and_csr(name).unwrap();
        let cert = ca
            .issue_broker(
                name,
                &csr,
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.bundle_pem()).unwrap();
        std::fs::write(dir.join("broker.pem"), &cert.chain_pem).unwrap();
        std::fs::write(dir.join("broker.key"), key_pem).unwrap();
        let allowlist = dir.join("allowlist.txt");
        self.export_allowlist(&allowlist);
        std::fs::write(
            dir.join("broker.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n\
                 [allowlist]\nfile = \"allowlist.txt\"\n{extra_toml}\n"
            ),
        )
        .unwrap();
        (
            super::BrokerProc::start(&dir.join("broker.toml")),
            allowlist,
        )
    }
}

impl Fleet {
    /// Record `issued` (an operator certificate from [`Fleet::ca`]) as a certificate of
    /// operator `name` with `role`, as a login would, so operator routes honour it.
    /// Usable from sync and async tests alike (its own runtime on its own thread).
    pub fn honour_operator(
        &self,
        name: &str,
        role: tether_api::operators::Role,
        issued: &tether_control::domain::ca::Issued,
    ) {
        use tether_audit::{Actor, AuditEvent};
        let cert = tether_control::store::OperatorCertificate {
            fingerprint: issued.fingerprint_hex.clone(),
            serial: issued.serial_hex.clone(),
            operator: name.to_owned(),
            not_after: issued.not_after,
        };
        let data = self.data.clone();
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let cfg = tether_control::config::ControlConfig::load(&data).unwrap();
                    let store = tether_control::run::open_store(&cfg, &data).await.unwrap();
                    let now = tether_control::now_unix();
                    let hash = tether_control::domain::token::Token::generate().hash();
                    let event = AuditEvent::success(Actor::system("test"), "operator.invite", name);
                    store
                        .create_invite(&hash, name, role, now + 60, now, &event)
                        .await
                        .unwrap();
                    let event = AuditEvent::success(Actor::operator(name), "operator.login", name);
                    store
                        .redeem_invite(&hash, &cert, now, &event)
                        .await
                        .unwrap()
                        .unwrap();
                });
            })
            .join()
            .unwrap();
        });
    }
}
