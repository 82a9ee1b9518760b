//! A whole Tether for end-to-end tests: control (the real `tether-control serve`), the
//! local admin logged in with the real `tether login`, brokers started with the real
//! `tether-broker --bundle` (bundles from `tether broker add`), and appliances enrolled
//! with tokens and run by the real `tether-agent run`. Everything on 127.0.0.1 with
//! ephemeral ports.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::control::{serve_on, Fleet};
use super::operators::{config_dir, tether};
use super::{bin, wait_for, AgentProc, BrokerProc};

/// Heartbeat interval the test brokers announce.
pub const HEARTBEAT: &str = "1s";

pub struct Cluster {
    pub fleet: Fleet,
    /// The admin's `TETHER_CONFIG_DIR`.
    pub ops: PathBuf,
    /// Broker data directories, by name.
    pub broker_dirs: Vec<(String, PathBuf)>,
}

impl Cluster {
    /// Control with `control_toml` merged into its config, and the admin logged in.
    pub fn new(control_toml: &str) -> Cluster {
        Cluster::with_init(&[], control_toml)
    }

    /// As [`Cluster::new`], passing `init_args` to `tether-control init` (e.g.
    /// `--database-url`).
    pub fn with_init(init_args: &[&str], control_toml: &str) -> Cluster {
        let fleet = Fleet::with_init(init_args, control_toml);
        let ops = config_dir(&fleet, "admin");
        tether(
            &ops,
            &[
                "login",
                "--bundle",
                fleet.data.join("admin-bundle.json").to_str().unwrap(),
                "--control",
                &fleet.url(),
            ],
        )
        .expect("the admin logs in");
        Cluster {
            fleet,
            ops,
            broker_dirs: Vec::new(),
        }
    }

    /// `tether ARGS` as the admin.
    pub fn tether(&self, args: &[&str]) -> Result<String, String> {
        tether(&self.ops, args)
    }

    /// `tether exec`: (exit code, stdout, stderr).
    pub fn exec(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("tether"))
            .arg("exec")
            .args(args)
            .env("TETHER_CONFIG_DIR", &self.ops)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `tether operator invite NAME --role ROLE` as the admin, then `tether login` with the
    /// bundle into NAME's own config directory, which is returned.
    pub fn invite_operator(&self, name: &str, role: &str) -> PathBuf {
        let bundle = self.tmp().join(format!("{name}.bundle.json"));
        self.tether(&[
            "operator",
            "invite",
            name,
            "--role",
            role,
            "--out",
            bundle.to_str().unwrap(),
        ])
        .expect("invite");
        let dir = config_dir(&self.fleet, name);
        tether(
            &dir,
            &[
                "login",
                "--bundle",
                bundle.to_str().unwrap(),
                "--control",
                &self.fleet.url(),
            ],
        )
        .expect("login");
        dir
    }

    /// The temporary directory everything lives in.
    pub fn tmp(&self) -> &Path {
        self.fleet.data.parent().unwrap()
    }

    /// `tether broker add NAME`, then `tether-broker --bundle` on a fresh data directory.
    pub fn add_broker(&mut self, name: &str) -> BrokerProc {
        let url = self.fleet.url();
        self.add_broker_via(name, &url)
    }

    /// [`Cluster::add_broker`] with `control_url` in its bundle (one replica, or a
    /// load balancer).
    pub fn add_broker_via(&mut self, name: &str, control_url: &str) -> BrokerProc {
        let dir = self.tmp().join(format!("broker-{name}"));
        let bundle = self.tmp().join(format!("{name}.broker.json"));
        self.tether(&["broker", "add", name, "--out", bundle.to_str().unwrap()])
            .expect("tether broker add");
        // The bundle names control by its configured DNS name; reach it on 127.0.0.1.
        let mut b: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
        b["control_url"] = Value::from(control_url);
        std::fs::write(&bundle, serde_json::to_vec(&b).unwrap()).unwrap();
        self.broker_dirs.push((name.to_owned(), dir.clone()));
        start_broker(&dir, Some(&bundle), "127.0.0.1:0")
    }

    /// Start broker `name` again on its data directory (no bundle) at `listen`.
    pub fn restart_broker(&self, name: &str, listen: SocketAddr) -> BrokerProc {
        start_broker(self.broker_dir(name), None, &listen.to_string())
    }

    /// Register `id` (token only, tenant acme) unless it is, make a token and enroll it
    /// with `tether-agent enroll` into a fresh state directory; returns the directory.
    pub fn enroll(&self, id: &str) -> PathBuf {
        let _ = self.tether(&[
            "appliance",
            "register",
            id,
            "--token-only",
            "--tenant",
            "acme",
        ]);
        let state = self.tmp().join(format!("state-{id}"));
        let token = self.fleet.token(id);
        self.fleet
            .enroll(id, &token, &state)
            .unwrap_or_else(|e| panic!("enroll {id}: {e}"));
        state
    }

    /// `tether-agent run` for the appliance in `state` with `brokers`, heartbeating fast.
    pub fn agent(&self, state: &Path, brokers: &[SocketAddr]) -> AgentProc {
        AgentProc::start(state, brokers, &[])
    }

    /// Control's view of `id` (`GET /v1/appliances/{id}` as the admin).
    pub fn show(&self, id: &str) -> Value {
        let out = self
            .tether(&["appliance", "show", id, "--output", "json"])
            .unwrap_or_else(|e| panic!("show {id}: {e}"));
        serde_json::from_str(&out).unwrap()
    }

    /// Wait until control says `id` is connected (to `broker` when given); returns the
    /// connection object.
    pub async fn wait_connected(&self, id: &str, broker: Option<&str>) -> Value {
        wait_for(Duration::from_secs(20), || async {
            let c = self.show(id)["connection"].clone();
            let ok = !c.is_null() && broker.is_none_or(|b| c["broker"] == b);
            ok.then_some(c)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "{id} never connected (to {broker:?}) as control sees it: {}",
                self.show(id)
            )
        })
    }

    /// Wait until every broker's channel is up, as `tether broker list` says.
    pub async fn wait_brokers_up(&self, n: usize) {
        wait_for(Duration::from_secs(20), || async {
            let out = self.tether(&["broker", "list", "--output", "json"]).ok()?;
            let v: Value = serde_json::from_str(&out).ok()?;
            let up = v["brokers"]
                .as_array()?
                .iter()
                .filter(|b| b["connected"] == true)
                .count();
            (up >= n).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{n} broker channels never came up"));
    }

    /// The data directory of broker `name`.
    pub fn broker_dir(&self, name: &str) -> &Path {
        &self
            .broker_dirs
            .iter()
            .find(|(n, _)| n == name)
            .expect("a broker added earlier")
            .1
    }

    /// SIGKILL control and reap it.
    pub fn kill_control(&mut self) {
        let child = &mut self.fleet.control.child;
        child.kill().expect("SIGKILL control");
        child.wait().expect("reap control");
    }

    /// Restart control (after `kill`) on the same port, so brokers find it again.
    pub fn restart_control(&mut self) {
        let listen = self.fleet.control.addr.to_string();
        self.fleet.control = serve_on(&self.fleet.data, &listen);
    }
}

fn start_broker(dir: &Path, bundle: Option<&Path>, listen: &str) -> BrokerProc {
    let mut args: Vec<&OsStr> = vec![
        "--data-dir".as_ref(),
        dir.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
        "--admin-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--heartbeat-interval".as_ref(),
        HEARTBEAT.as_ref(),
        "--drain-timeout".as_ref(),
        "1s".as_ref(),
        "--reconnect-jitter".as_ref(),
        "200ms".as_ref(),
    ];
    if let Some(b) = bundle {
        args.push("--bundle".as_ref());
        args.push(b.as_os_str());
    }
    BrokerProc::start_with(&args)
}

/// The broker counter that rises when it refuses a certificate not in its allowlist.
pub const REFUSED_UNKNOWN: &str =
    r#"tether_handshake_rejected_total{reason="unknown_fingerprint"}"#;

impl Cluster {
    /// Run the appliance in `state` against `broker` alone and wait until the broker refuses
    /// its certificate (`unknown_fingerprint` rises); `id` never gets a session there.
    pub async fn assert_refused(&self, state: &Path, broker: &BrokerProc, id: &str) {
        let before = broker.metric(REFUSED_UNKNOWN).await;
        let probe = self.agent(state, &[broker.quic]);
        broker.wait_metric(REFUSED_UNKNOWN, before + 1.0).await;
        drop(probe);
        assert!(
            !broker
                .sessions()
                .await
                .iter()
                .any(|s| s["appliance_id"] == id),
            "{id}'s refused certificate got a session on {}",
            broker.quic
        );
    }
}

/// Time from `start` until `f` holds (polling every 2 ms), bounded by 10 s.
pub async fn time_until<F, Fut>(start: Instant, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never happened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
