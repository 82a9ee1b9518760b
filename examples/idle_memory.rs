//! Broker memory per idle connection: start the release `tether-broker`, connect N real
//! agents (the agent library, many per QUIC endpoint, in this process), wait until every
//! one has a session and a heartbeat went through, and read the broker's RSS from
//! /proc/<pid>/status before and after.
//!
//! ```sh
//! cargo build --release --bin tether-broker
//! cargo run --release --example idle_memory -- 10000
//! ```
//!
//! Prints one JSON object. Traffic stays on 127.0.0.1 and the run stops by itself.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tether::pki::Pki;
use tokio_util::sync::CancellationToken;

const TD: &str = "mem.test";
const AGENTS_PER_ENDPOINT: usize = 1000;

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let broker_bin = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "target/release/tether-broker".into());
    let dir = tempfile::tempdir()?;
    let p = |f: &str| dir.path().join(f);

    eprintln!("issuing {n} appliance certificates");
    let pki = Pki::new(TD)?;
    let broker_leaf = pki.broker("mem")?;
    std::fs::write(p("ca.pem"), pki.ca_bundle_pem())?;
    std::fs::write(p("broker.pem"), broker_leaf.chain_pem())?;
    std::fs::write(p("broker.key"), broker_leaf.key_pem())?;
    let mut allow = String::new();
    let mut creds = Vec::with_capacity(n);
    let ca = vec![rustls::pki_types::CertificateDer::from(
        pki.root.cert_der().to_vec(),
    )];
    for i in 0..n {
        let id = format!("app-{i:06}");
        let leaf = pki.appliance(&id)?;
        allow.push_str(&format!("{id} {}\n", leaf.fingerprint_hex()));
        creds.push(tether_agent::Credentials::from_der(
            leaf.rustls_chain(),
            leaf.rustls_key(),
            ca.clone(),
        )?);
    }
    std::fs::write(p("allow.txt"), allow)?;
    std::fs::write(
        p("broker.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntrust_domain = \"{TD}\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n\
             [allowlist]\nfile = \"allow.txt\"\n[session]\nheartbeat_interval = \"5s\"\n"
        ),
    )?;

    let mut child = Command::new(&broker_bin)
        .arg("--config")
        .arg(p("broker.toml"))
        .args(["--log-format", "json"])
        .env(
            "RUST_LOG",
            "warn,tether_broker=info,tether_broker::server=warn",
        )
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {broker_bin}"))?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let quic = loop {
        let Some(line) = lines.next() else {
            bail!("broker exited")
        };
        let line = line?;
        if line.contains("tether-broker listening") {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            break v["fields"]["quic"]
                .as_str()
                .context("quic")?
                .parse::<std::net::SocketAddr>()?;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;

    eprintln!("connecting {n} agents to {quic}");
    let stop = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut endpoint = None;
    let started = Instant::now();
    for (i, c) in creds.into_iter().enumerate() {
        if i % AGENTS_PER_ENDPOINT == 0 {
            let (socket, _) = tether_broker::tls::bind_udp("127.0.0.1:0".parse()?, 8 << 20)?;
            endpoint = Some(quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                std::sync::Arc::new(quinn::TokioRuntime),
            )?);
        }
        let agent = tether_agent::Agent::new(
            tether_agent::AgentConfig::default(),
            c,
            endpoint.clone().context("endpoint")?,
            [quic],
        )?;
        let mut events = agent.events();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                if let tether_agent::AgentEvent::Connected { .. } = ev {
                    let _ = tx.send(i);
                }
            }
        });
        tokio::spawn(agent.run(stop.clone()));
    }
    let mut connected = HashSet::new();
    let limit = Instant::now() + Duration::from_secs(300);
    while connected.len() < n {
        match tokio::time::timeout_at(limit.into(), rx.recv()).await {
            Ok(Some(i)) => {
                connected.insert(i);
            }
            _ => break,
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // Let a heartbeat round pass so per-session state is fully warm.
    let settle: u64 = std::env::var("IDLE_MEMORY_SETTLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = rss_bytes(pid)?;
    let per_conn = (after.saturating_sub(before)) as f64 / connected.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "connections": connected.len(),
            "connect_seconds": connect_secs,
            "broker_rss_before_bytes": before,
            "broker_rss_after_bytes": after,
            "broker_bytes_per_conn": per_conn.round(),
        })
    );
    stop.cancel();
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
