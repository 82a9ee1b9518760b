//! `tether up`: a whole Tether on one machine, for a first look and for demos.
//!
//! It creates (or reuses) a data directory with a development PKI — root and intermediate
//! CA, a broker certificate, one certificate per simulated appliance — writes the broker's
//! config and allowlist, runs the broker, and connects a fleet of real agents (the
//! `tether-agent` library, many agents sharing one QUIC endpoint). Everything listens on
//! 127.0.0.1 only. Ctrl-C stops the fleet, then drains the broker.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pki::Pki;

/// Trust domain of the development fleet.
pub const TRUST_DOMAIN: &str = "tether.local";
/// File marking a data directory as made by `tether up` (so it may be regenerated).
const MARKER: &str = "tether-up.json";

/// Options of `tether up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Where the PKI, configs and appliance state live.
    pub data_dir: PathBuf,
    /// Simulated appliances.
    pub appliances: usize,
    /// Broker QUIC address.
    pub listen: SocketAddr,
    /// Broker admin address.
    pub admin_listen: SocketAddr,
}

/// Paths inside the data directory.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn broker_config(&self) -> PathBuf {
        self.root.join("broker").join("broker.toml")
    }
    fn allowlist(&self) -> PathBuf {
        self.root.join("broker").join("allowlist.txt")
    }
    fn appliance(&self, id: &str) -> PathBuf {
        self.root.join("appliances").join(id)
    }
}

/// Appliance id number `i` (1-based): `app-0001`.
pub fn appliance_id(i: usize) -> String {
    format!("app-{i:04}")
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Create the PKI, broker files and appliance state directories, unless a previous
/// `tether up` already made them for the same settings.
fn prepare(opts: &UpOptions, layout: &Layout) -> anyhow::Result<()> {
    let marker = layout.root.join(MARKER);
    let wanted = serde_json::json!({
        "appliances": opts.appliances,
        "listen": opts.listen.to_string(),
        "admin_listen": opts.admin_listen.to_string(),
        "trust_domain": TRUST_DOMAIN,
    });
    if marker.exists() {
        let seen: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker)?)?;
        if seen == wanted {
            println!("reusing {}", layout.root.display());
            return Ok(());
        }
        println!("settings changed: regenerating {}", layout.root.display());
        std::fs::remove_dir_all(&layout.root)?;
    } else if layout.root.exists() && std::fs::read_dir(&layout.root)?.next().is_some() {
        bail!(
            "{} exists and was not made by `tether up`; choose another --data-dir",
            layout.root.display()
        );
    }
    let broker_dir = layout.root.join("broker");
    std::fs::create_dir_all(&broker_dir)?;
    let pki = Pki::new(TRUST_DOMAIN)?;
    let broker = pki.broker("local-1")?;
    std::fs::write(broker_dir.join("ca.pem"), pki.ca_bundle_pem())?;
    std::fs::write(broker_dir.join("broker.pem"), broker.chain_pem())?;
    write_private(&broker_dir.join("broker.key"), &broker.key_pem())?;
    std::fs::write(
        layout.broker_config(),
        format!(
            "# Written by `tether up`. Relative paths resolve against this folder.\n\
             listen = \"{}\"\nadmin_listen = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
             [tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n\n\
             [allowlist]\nfile = \"allowlist.txt\"\n\n\
             [session]\nheartbeat_interval = \"5s\"\n\n\
             [drain]\ntimeout = \"3s\"\nreconnect_jitter = \"1s\"\n",
            opts.listen, opts.admin_listen
        ),
    )?;
    let bar = progress(opts.appliances as u64, "issuing certificates");
    let mut allowlist = String::from(
        "# <appliance-id> <sha256 of the certificate DER>. Remove a line to revoke.\n",
    );
    for i in 1..=opts.appliances {
        let id = appliance_id(i);
        let leaf = pki.appliance(&id)?;
        leaf.write_agent_state(&layout.appliance(&id), &pki.root_pem())?;
        allowlist.push_str(&format!("{id} {}\n", leaf.fingerprint_hex()));
        bar.inc(1);
    }
    bar.finish();
    std::fs::write(layout.allowlist(), allowlist)?;
    std::fs::write(&marker, serde_json::to_vec_pretty(&wanted)?)?;
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Run the broker and the fleet until `shutdown`.
pub async fn run(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    if opts.appliances == 0 {
        bail!("--appliances must be at least 1");
    }
    let layout = Layout {
        root: opts.data_dir.clone(),
    };
    prepare(&opts, &layout)?;

    let config = tether_broker::config::Config::load(&layout.broker_config())?;
    let running = tether_broker::Running::bind(config)
        .await
        .context("starting the broker")?;
    let broker_addr = running.broker.local_addr()?;
    let admin_addr = running.admin.local_addr()?;
    let broker_stop = CancellationToken::new();
    let broker_task = tokio::spawn(running.serve(broker_stop.clone()));

    let endpoint = tether_agent::client_endpoint("127.0.0.1:0".parse()?)?;
    let fleet_stop = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, bool)>();
    let mut agents = Vec::with_capacity(opts.appliances);
    for i in 1..=opts.appliances {
        let id = appliance_id(i);
        let creds = tether_agent::Credentials::load(&layout.appliance(&id))
            .with_context(|| format!("loading {id}"))?;
        let agent = tether_agent::Agent::new(
            tether_agent::AgentConfig::default(),
            creds,
            endpoint.clone(),
            [broker_addr],
        )?;
        let mut events = agent.events();
        let tx = tx.clone();
        let id2 = id.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                let up = match ev {
                    tether_agent::AgentEvent::Connected { .. } => true,
                    tether_agent::AgentEvent::Disconnected { .. } => false,
                    tether_agent::AgentEvent::Stopped => break,
                    _ => continue,
                };
                if tx.send((id2.clone(), up)).is_err() {
                    break;
                }
            }
        });
        agents.push(tokio::spawn(agent.run(fleet_stop.clone())));
    }
    drop(tx);

    let bar = progress(opts.appliances as u64, "connecting appliances");
    let started = Instant::now();
    let mut connected = HashSet::new();
    while connected.len() < opts.appliances {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = rx.recv() => match ev {
                Some((id, true)) => { connected.insert(id); }
                Some((id, false)) => { connected.remove(&id); }
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_secs(60)) => {
                bail!("only {} of {} appliances connected within 60 s", connected.len(), opts.appliances);
            }
        }
        bar.set_position(connected.len() as u64);
    }
    bar.finish();
    if !shutdown.is_cancelled() {
        let first = appliance_id(1);
        let data = layout.root.display();
        println!(
            "ready: {} appliances connected (in {:.1?})\n",
            connected.len(),
            started.elapsed()
        );
        println!("  broker (QUIC, mTLS):  {broker_addr}");
        println!("  admin API + metrics:  http://{admin_addr}/metrics");
        println!("  data directory:       {data}\n");
        println!("Try, in another terminal:");
        println!("  curl -s http://{admin_addr}/v1/sessions | head -c 600; echo");
        println!(
            "  curl -sN http://{admin_addr}/v1/sessions/{first}/commands \\\n      -H 'content-type: application/json' -d '{{\"argv\": [\"uname\", \"-a\"], \"timeout_ms\": 5000}}'"
        );
        println!(
            "  sed -i '/^{first} /d' {data}/broker/allowlist.txt    # revoke: the session closes at once"
        );
        println!(
            "  cargo run --release --bin tether-agent -- run --state-dir {data}/appliances/{first} --broker {broker_addr}   # refused after revoke"
        );
        println!("\nCtrl-C stops everything.");
    }

    // Report sessions that go away (revocations) while running.
    let mut live = connected;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = rx.recv() => match ev {
                Some((id, true)) => { if live.insert(id.clone()) { println!("{id}: connected"); } }
                Some((id, false)) => { if live.remove(&id) { println!("{id}: disconnected ({} connected)", live.len()); } }
                None => break,
            },
        }
    }

    println!("stopping {} appliances and the broker", opts.appliances);
    fleet_stop.cancel();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
    }
    broker_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), broker_task).await {
        Ok(Ok(Ok(()))) => println!("stopped cleanly"),
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => bail!("broker did not stop within 10 s"),
    }
    Ok(())
}
