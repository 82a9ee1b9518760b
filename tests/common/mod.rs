//! Shared harness for the end-to-end tests: a real `tether-broker` process on 127.0.0.1
//! with ephemeral ports and certificates made by `tether::pki`, plus a raw QUIC client that
//! can present any certificate (or none) and send any bytes.

#![allow(dead_code)]

pub mod aws;
pub mod browser;
pub mod cluster;
pub mod control;
pub mod customer;
pub mod netfault;
pub mod operators;
pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tether::pki::{Leaf, Pki};
use tether_proto::{encode_frame, Frame, FrameDecoder, Hello, DEFAULT_MAX_FRAME_LEN};

pub const TRUST_DOMAIN: &str = "tether.test";

/// Path of a workspace binary next to the test executable (`cargo test --workspace` builds
/// them all).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

/// Write `text` to `path` atomically (write a sibling, then rename), as an operator's
/// tooling should.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Allowlist text for `(appliance, leaf)` pairs.
pub fn allowlist_text(entries: &[(&str, &Leaf)]) -> String {
    let mut s = String::from("# written by the test\n");
    for (id, leaf) in entries {
        s.push_str(&format!("{id} {}\n", leaf.fingerprint_hex()));
    }
    s
}

/// A PKI and a folder with the broker's files in it.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(TRUST_DOMAIN).unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_bundle_pem()).unwrap();
        Setup { dir, pki }
    }

    pub fn allowlist_path(&self) -> PathBuf {
        self.dir.path().join("allowlist.txt")
    }

    pub fn set_allowlist(&self, entries: &[(&str, &Leaf)]) {
        write_atomic(&self.allowlist_path(), &allowlist_text(entries));
    }

    /// Start a broker named `name` with extra TOML appended to its config.
    pub fn broker(&self, name: &str, extra_toml: &str) -> BrokerProc {
        let leaf = self.pki.broker(name).unwrap();
        let cert = format!("{name}.pem");
        let key = format!("{name}.key");
        std::fs::write(self.dir.path().join(&cert), leaf.chain_pem()).unwrap();
        std::fs::write(self.dir.path().join(&key), leaf.key_pem()).unwrap();
        if !self.allowlist_path().exists() {
            self.set_allowlist(&[]);
        }
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"

[tls]
ca = "ca.pem"
cert = "{cert}"
key = "{key}"

[allowlist]
file = "allowlist.txt"

[transport]
udp_recv_buffer = 4194304

{extra_toml}
"#
            ),
        )
        .unwrap();
        BrokerProc::start(&config)
    }

    /// Write an agent state dir for `leaf` and return its path.
    pub fn agent_state(&self, id: &str, leaf: &Leaf) -> PathBuf {
        let dir = self.dir.path().join(format!("agent-{id}"));
        leaf.write_agent_state(&dir, &self.pki.root_pem()).unwrap();
        dir
    }
}

/// A `tether-broker` child process. Killed on drop.
pub struct BrokerProc {
    pub child: Child,
    pub quic: SocketAddr,
    /// The TCP address, when the broker serves TCP.
    pub tcp: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl BrokerProc {
    pub fn start(config: &Path) -> BrokerProc {
        BrokerProc::start_with(&["--config".as_ref(), config.as_os_str()])
    }

    /// `tether-broker ARGS --log-format json`, waiting until it listens.
    pub fn start_with(args: &[&std::ffi::OsStr]) -> BrokerProc {
        let mut child = Command::new(bin("tether-broker"))
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,tether_broker=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tether-broker");
        let stdout = child.stdout.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("tether-broker listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("broker did not start; logs: {:?}", logs.lock().unwrap());
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let field = |k: &str| -> SocketAddr {
            v["fields"][k]
                .as_str()
                .unwrap_or_else(|| panic!("no {k} in {line}"))
                .parse()
                .unwrap()
        };
        BrokerProc {
            tcp: v["fields"]["tcp"].as_str().and_then(|a| a.parse().ok()),
            quic: field("quic"),
            admin: field("admin"),
            child,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Send SIGTERM.
    pub fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Send SIGHUP.
    pub fn hangup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    /// Wait for the process to exit (bounded).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "broker did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of one metric sample, e.g.
    /// `tether_handshake_rejected_total{reason="expired"}`; 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = http()
            .get(self.url("/metrics"))
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

    /// Wait until `sample` reaches `at_least` (bounded).
    pub async fn wait_metric(&self, sample: &str, at_least: f64) -> f64 {
        wait_for(Duration::from_secs(10), || async {
            let v = self.metric(sample).await;
            (v >= at_least).then_some(v)
        })
        .await
        .unwrap_or_else(|| panic!("{sample} never reached {at_least}"))
    }

    /// Wait until `sample` equals `value` (bounded by `limit`); for gauges that go down.
    pub async fn wait_metric_eq(&self, sample: &str, value: f64, limit: Duration) {
        wait_for(limit, || async {
            (self.metric(sample).await == value).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{sample} never became {value} on {}", self.quic))
    }

    pub async fn sessions(&self) -> Vec<serde_json::Value> {
        http()
            .get(self.url("/v1/sessions"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Wait until `appliance` has a session here; returns its JSON row.
    pub async fn wait_session(&self, appliance: &str) -> serde_json::Value {
        wait_for(Duration::from_secs(15), || async {
            self.sessions()
                .await
                .into_iter()
                .find(|s| s["appliance_id"] == appliance)
        })
        .await
        .unwrap_or_else(|| panic!("{appliance} never connected"))
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: its broker's log says why more often than not.
            for line in self.logs.lock().unwrap().iter() {
                eprintln!("[broker {}] {line}", self.quic);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` every 20 ms until it returns `Some` or `limit` passes.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The rustls setup of a standard client (TLS 1.3, WebPKI against the fleet root)
/// presenting `leaf` (or no certificate) and offering `alpn`: QUIC's and TCP's raw clients.
pub fn raw_tls(pki: &Pki, leaf: Option<&Leaf>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.rustls_roots().unwrap());
    let mut tls = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(leaf.rustls_chain(), leaf.rustls_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tls
}

/// A raw QUIC client presenting `leaf` (or no certificate), verifying the broker like any
/// standard client would (WebPKI, server name `localhost`).
pub fn raw_client(pki: &Pki, leaf: Option<&Leaf>) -> (quinn::Endpoint, quinn::ClientConfig) {
    let tls = raw_tls(pki, leaf, &[tether_proto::ALPN]);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, config)
}

/// Connect; `Err` if the handshake itself failed.
pub async fn connect(
    pki: &Pki,
    leaf: Option<&Leaf>,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let (endpoint, config) = raw_client(pki, leaf);
    endpoint
        .connect_with(config, addr, "localhost")
        .unwrap()
        .await
}

/// Open the session stream, send Hello, read Welcome.
pub async fn hello(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream, tether_proto::Welcome), String> {
    hello_with(conn, &[]).await
}

/// [`hello`] announcing `capabilities`.
pub async fn hello_with(
    conn: &quinn::Connection,
    capabilities: &[&str],
) -> Result<(quinn::SendStream, quinn::RecvStream, tether_proto::Welcome), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let hello = Frame::Hello(Hello {
        protocol_version: tether_proto::PROTOCOL_VERSION,
        agent_version: "raw-test".into(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        cert_not_after_ms: 0,
    });
    encode_frame(&hello, &mut buf, DEFAULT_MAX_FRAME_LEN).unwrap();
    send.write_all(&buf).await.map_err(|e| e.to_string())?;
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    loop {
        match recv.read_chunk(65536, true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            Ok(None) => return Err("stream finished".into()),
            Err(e) => return Err(e.to_string()),
        }
        match dec.poll_frame() {
            Ok(Some(Frame::Welcome(w))) => return Ok((send, recv, w)),
            Ok(Some(other)) => return Err(format!("unexpected {other:?}")),
            Ok(None) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// How a connection ended, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The broker closed it with an application close code.
    App(u64),
    /// The TLS handshake failed with this alert (the broker refused our certificate).
    Alert(u8),
    /// Something else.
    Other(String),
}

pub fn ended(e: &quinn::ConnectionError) -> Ended {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Ended::App(c.error_code.into_inner()),
        quinn::ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            if (0x100..0x200).contains(&code) {
                Ended::Alert((code - 0x100) as u8)
            } else {
                Ended::Other(format!("{c}"))
            }
        }
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            if (0x100..0x200).contains(&code) {
                Ended::Alert((code - 0x100) as u8)
            } else {
                Ended::Other(t.to_string())
            }
        }
        other => Ended::Other(other.to_string()),
    }
}

/// Try to get a session with `leaf`; return how the broker ended it (or `None` if a
/// Welcome came back, i.e. the broker admitted us).
pub async fn try_session(pki: &Pki, leaf: Option<&Leaf>, addr: SocketAddr) -> Option<Ended> {
    let conn = match connect(pki, leaf, addr).await {
        Ok(c) => c,
        Err(e) => return Some(ended(&e)),
    };
    match tokio::time::timeout(Duration::from_secs(10), hello(&conn)).await {
        Ok(Ok(_)) => {
            conn.close(0u32.into(), b"done");
            None
        }
        _ => Some(ended(&conn.closed().await)),
    }
}

/// TLS alert numbers (RFC 8446).
pub mod alert {
    pub const BAD_CERTIFICATE: u8 = 42;
    pub const UNSUPPORTED_CERTIFICATE: u8 = 43;
    pub const CERTIFICATE_REVOKED: u8 = 44;
    pub const CERTIFICATE_EXPIRED: u8 = 45;
    pub const UNKNOWN_CA: u8 = 48;
    pub const ACCESS_DENIED: u8 = 49;
    pub const DECRYPT_ERROR: u8 = 51;
    pub const CERTIFICATE_REQUIRED: u8 = 116;
}

/// A `tether-agent` child process. Killed on drop.
pub struct AgentProc {
    pub child: Child,
}

impl AgentProc {
    pub fn start(state_dir: &Path, brokers: &[SocketAddr], extra: &[&str]) -> AgentProc {
        AgentProc::start_env(state_dir, brokers, extra, &[])
    }

    /// [`AgentProc::start`] with extra environment variables.
    pub fn start_env(
        state_dir: &Path,
        brokers: &[SocketAddr],
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> AgentProc {
        let mut cmd = Command::new(bin("tether-agent"));
        cmd.envs(env.iter().copied());
        cmd.arg("run").arg("--state-dir").arg(state_dir);
        for b in brokers {
            cmd.arg("--broker").arg(b.to_string());
        }
        cmd.args(["--backoff-initial", "100ms", "--backoff-max", "1s"])
            .args(extra)
            .env("RUST_LOG", "info")
            // TETHER_TEST_AGENT_LOGS=1 shows the agents' logs.
            .stdout(if std::env::var_os("TETHER_TEST_AGENT_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        AgentProc {
            child: cmd.spawn().expect("spawn tether-agent"),
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP client for admin listeners. reqwest builds a TLS config even for
/// `http://` URLs, and the workspace's reqwest has no built-in crypto provider (the agent
/// brings ring explicitly), so install ring as the process default once.
pub fn http() -> reqwest::Client {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::new()
}

/// An HTTPS client that trusts only the root in `root_pem_file` and presents no
/// certificate.
pub fn http_pinned(root_pem_file: &Path) -> reqwest::Client {
    tether_agent::enroll::http_client(&std::fs::read(root_pem_file).unwrap()).unwrap()
}

/// POST a command to the broker's admin API; returns the status and the NDJSON lines.
pub async fn run_command(
    broker: &BrokerProc,
    appliance: &str,
    body: serde_json::Value,
) -> (u16, Vec<serde_json::Value>) {
    let resp = http()
        .post(broker.url(&format!("/v1/sessions/{appliance}/commands")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (status, lines)
}
