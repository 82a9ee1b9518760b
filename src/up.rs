//! `tether up`: a whole Tether on one machine, for a first look and for demos.
//!
//! In one process, on 127.0.0.1 only, it runs what a real deployment runs as separate
//! processes, through the same library code:
//!
//! 1. **control** on a data directory it creates on first use (`tether-control init`
//!    with local CA keys and the embedded SQLite store);
//! 2. an **operator** `admin`, logged in under `DATA/operator` (so
//!    `TETHER_CONFIG_DIR=DATA/operator tether ...` works from another terminal);
//! 3. **two brokers**, `edge-1` and `edge-2`, each enrolled with a one-time bundle and
//!    following control over its cluster channel;
//! 4. a **fleet** of appliances `app-0001`… registered in control, enrolled with one-time
//!    tokens (keys made locally, CSRs, real certificates) and run by the real agent
//!    supervisor (sessions, heartbeats, commands, renewal), half of them preferring each
//!    broker.
//!
//! It prints `ready: <N> appliances connected` once the fleet is up, then where
//! everything is and what to try. A second run reuses the data directory (only new
//! appliances enroll). Ctrl-C stops the fleet, the brokers (drained), then control.
//!
//! `tether broker drain edge-1` drains an in-process broker exactly as SIGTERM drains a
//! `tether-broker` process (GoAway with a jittered reconnect delay, its appliances move
//! to the other broker); `tether up` then starts it again on the same addresses, as the
//! next version would be started in a rolling upgrade, and keeps running.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_audit::{action, system, Actor, AuditEvent};
use tether_control::store::{Appliance, Store, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Every this many appliances, one connects over TLS/TCP instead of QUIC.
const TCP_EVERY: usize = 4;
/// The fleet's UDP socket buffers asked for (the kernel grants at most `net.core.rmem_max`
/// without `CAP_NET_ADMIN`).
const FLEET_UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Trust domain of the local fleet.
pub const TRUST_DOMAIN: &str = "tether.local";
/// Tenant of the simulated appliances (`tether exec --selector tenant=demo`).
pub const TENANT: &str = "demo";
/// The brokers `tether up` runs.
pub const BROKERS: [&str; 2] = ["edge-1", "edge-2"];
/// File marking a data directory as made by `tether up`.
const MARKER: &str = "tether-up.json";
/// Enrollments running at once.
const ENROLL_CONCURRENCY: usize = 8;
/// How long [`LocalControl::wait_applied`] waits for the brokers to follow control.
const ALLOWLIST_SYNC: Duration = Duration::from_secs(30);

/// Options of `tether up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Where control, the brokers, the operator and the appliances keep their files.
    pub data_dir: PathBuf,
    /// Simulated appliances.
    pub appliances: usize,
    /// First port: edge-1 QUIC on it and admin on +1, edge-2 on +10/+11, control's API on
    /// +1000 and its metrics on +1001. 0 picks free ports for everything.
    pub port_base: u16,
}

impl UpOptions {
    fn addr(&self, offset: u16) -> anyhow::Result<SocketAddr> {
        let port = if self.port_base == 0 {
            0
        } else {
            self.port_base
                .checked_add(offset)
                .context("--port-base is too high")?
        };
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
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

fn local_admin() -> Actor {
    Actor::system(system::LOCAL_ADMIN)
}

/// Paths inside the data directory.
#[derive(Clone, Debug)]
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn control(&self) -> PathBuf {
        self.root.join("control")
    }
    fn operator(&self) -> PathBuf {
        self.root.join("operator")
    }
    fn broker(&self, name: &str) -> PathBuf {
        self.root.join("brokers").join(name)
    }
    fn appliance(&self, id: &str) -> PathBuf {
        self.root.join("appliances").join(id)
    }
}

/// Check the data directory is ours (or empty) and make control's on first use.
async fn prepare(opts: &UpOptions, layout: &Layout) -> anyhow::Result<()> {
    let marker = layout.root.join(MARKER);
    let wanted = serde_json::json!({ "trust_domain": TRUST_DOMAIN, "layout": 2 });
    if marker.exists() {
        let seen: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker)?)?;
        if seen == wanted {
            println!("reusing {}", layout.root.display());
            return Ok(());
        }
        println!(
            "{} was made by an older tether up: starting afresh",
            layout.root.display()
        );
        std::fs::remove_dir_all(&layout.root)?;
    } else if layout.root.exists() && std::fs::read_dir(&layout.root)?.next().is_some() {
        bail!(
            "{} exists and was not made by `tether up`; choose another --data-dir",
            layout.root.display()
        );
    }
    std::fs::create_dir_all(&layout.root)?;
    let mut cfg = tether_control::config::ControlConfig {
        trust_domain: TRUST_DOMAIN.into(),
        listen: opts.addr(1000)?,
        metrics_listen: opts.addr(1001)?,
        ips: vec![[127, 0, 0, 1].into()],
        dns_names: vec!["localhost".into()],
        ..Default::default()
    };
    cfg.console.listen = Some(tether_control::console::UP_LISTEN.parse()?);
    // The whole fleet enrolls from one address: allow it.
    cfg.http.public_rate_per_sec = 10_000;
    cfg.http.public_burst = 10_000;
    println!(
        "creating control's CA and store in {}",
        layout.control().display()
    );
    tether_control::run::init(&layout.control(), &cfg, None).await?;
    std::fs::write(&marker, serde_json::to_vec_pretty(&wanted)?)?;
    Ok(())
}

/// Log the local operator `admin` in under `DATA/operator`, unless it is already.
async fn operator(
    layout: &Layout,
    store: &dyn Store,
    control_url: &str,
    root_pem: &str,
) -> anyhow::Result<()> {
    let dir = layout.operator();
    if dir.join(crate::cli::CERT_FILE).exists() {
        // Control may listen on another port than last time (--port-base 0).
        let path = dir.join(crate::cli::CONFIG_FILE);
        let mut profile: crate::cli::Profile = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{} is not valid", path.display()))?;
        if profile.control_url != control_url {
            profile.control_url = control_url.to_owned();
            crate::cli::write_secret(&path, &serde_json::to_vec_pretty(&profile)?)?;
        }
        return Ok(());
    }
    let bundle = tether_control::domain::operators::create_invite(
        store,
        control_url.to_owned(),
        root_pem.to_owned(),
        tether_control::domain::operators::FIRST_ADMIN,
        tether_api::operators::Role::Admin,
        Duration::from_secs(600),
        local_admin(),
        tether_control::now_unix(),
    )
    .await?;
    let path = layout.root.join("admin-bundle.json");
    crate::cli::write_secret(&path, &serde_json::to_vec_pretty(&bundle)?)?;
    crate::cli::login::run(crate::cli::login::LoginArgs {
        bundle: path.clone(),
        control: None,
        common: crate::cli::Common {
            config_dir: Some(dir),
            output: crate::cli::Output::Table,
        },
    })
    .await
    .context("logging the local admin in")?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Start broker `name` (enrolling it with a fresh bundle on first use).
async fn broker(
    layout: &Layout,
    store: &dyn Store,
    control_url: &str,
    root_pem: &str,
    name: &str,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> anyhow::Result<tether_broker::Running> {
    let dir = layout.broker(name);
    std::fs::create_dir_all(&dir)?;
    let bundle_path = dir.join("bundle.json");
    let enrolled = dir.join("broker.pem").exists();
    if !enrolled {
        let bundle = tether_control::domain::brokers::add(
            store,
            control_url.to_owned(),
            root_pem.to_owned(),
            TRUST_DOMAIN,
            name,
            Duration::from_secs(600),
            local_admin(),
            tether_control::now_unix(),
        )
        .await?;
        crate::cli::write_secret(&bundle_path, &serde_json::to_vec_pretty(&bundle)?)?;
    }
    // Paths in a broker config resolve against its folder: the broker's data directory.
    let toml = format!(
        "# Written by `tether up`.\n\
         listen = \"{listen}\"\nadmin_listen = \"{admin_listen}\"\n\n\
         [control]\ndata_dir = \".\"\n{}\n\
         [session]\nheartbeat_interval = \"5s\"\n\n\
         [drain]\ntimeout = \"3s\"\nreconnect_jitter = \"1s\"\n",
        if enrolled {
            ""
        } else {
            "bundle = \"bundle.json\"\n"
        },
    );
    let config_path = dir.join("broker.toml");
    std::fs::write(&config_path, toml)?;
    let config = tether_broker::config::Config::load(&config_path)?;
    let running = tether_broker::Running::bind(config)
        .await
        .with_context(|| format!("starting broker {name}"))?;
    let _ = std::fs::remove_file(bundle_path);
    Ok(running)
}

/// Register (if needed) and enroll (if needed) every appliance with a one-time token.
async fn enroll_fleet(
    opts: &UpOptions,
    layout: &Layout,
    store: Arc<dyn Store>,
    control_url: &str,
    root_pem: &str,
) -> anyhow::Result<()> {
    let missing: Vec<String> = (1..=opts.appliances)
        .map(appliance_id)
        .filter(|id| !layout.appliance(id).join("state.json").exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let bar = progress(missing.len() as u64, "enrolling appliances");
    let limit = Arc::new(tokio::sync::Semaphore::new(ENROLL_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for id in missing {
        let (store, limit, bar) = (store.clone(), limit.clone(), bar.clone());
        let (control_url, root_pem) = (control_url.to_owned(), root_pem.to_owned());
        let state_dir = layout.appliance(&id);
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            let now = tether_control::now_unix();
            let appliance = Appliance {
                id: id.clone(),
                tenant: TENANT.into(),
                binding: PlatformBinding::TokenOnly,
                status: ApplianceStatus::Active,
                manual_renewal_generation: 0,
                created_at: now,
            };
            let event = AuditEvent::success(local_admin(), action::APPLIANCE_REGISTER, &id)
                .with("tenant", TENANT);
            match store.register_appliance(&appliance, &event).await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(anyhow::Error::from(e).context(format!("registering {id}"))),
            }
            let token = tether_control::domain::token::Token::generate();
            let hash = token.hash();
            let event = AuditEvent::success(local_admin(), action::TOKEN_CREATE, &id)
                .with("token_ref", tether_audit::token_ref(&hash));
            store
                .create_token(&id, &hash, now + 600, now, &event)
                .await
                .with_context(|| format!("a token for {id}"))?;
            tether_agent::enroll::enroll(&tether_agent::enroll::EnrollOptions {
                control_url,
                ca_pem: root_pem.into_bytes(),
                appliance_id: id.clone(),
                proof: tether_agent::proof::EnrollProof::Token(token.expose().to_owned()),
                state_dir,
                // The local control `tether up` just started: never through a proxy.
                proxy: tether_agent::ProxyConfig::direct(),
            })
            .await
            .with_context(|| format!("enrolling {id}"))?;
            bar.inc(1);
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("an enrollment task failed")??;
    }
    bar.finish();
    Ok(())
}

/// Run control, two brokers and the fleet until `shutdown`.
pub async fn run(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    if opts.appliances == 0 {
        bail!("--appliances must be at least 1");
    }
    let layout = Layout {
        root: opts.data_dir.clone(),
    };
    prepare(&opts, &layout).await?;
    let control = LocalControl::start(&layout, opts.port_base).await?;
    let (store, control_url, root_pem) = (&control.store, &control.url, &control.root_pem);
    operator(&layout, store.as_ref(), control_url, root_pem).await?;

    // Brokers.
    let mut brokers = Vec::new();
    for (i, name) in BROKERS.iter().enumerate() {
        let offset = 10 * i as u16;
        let running = broker(
            &layout,
            store.as_ref(),
            control_url,
            root_pem,
            name,
            opts.addr(offset)?,
            opts.addr(offset + 1)?,
        )
        .await?;
        let quic = running.broker.local_addr()?;
        let admin = running.admin.local_addr()?;
        let stop = CancellationToken::new();
        let restart = Restart {
            layout: layout.clone(),
            store: store.clone(),
            control_url: control_url.clone(),
            root_pem: root_pem.clone(),
            name: name.to_string(),
            quic,
            admin,
        };
        let task = tokio::spawn(restart.serve(running, stop.clone()));
        brokers.push(LocalBroker {
            name: name.to_string(),
            quic,
            admin,
            stop,
            task,
        });
    }

    enroll_fleet(&opts, &layout, store.clone(), control_url, root_pem).await?;
    // An agent the broker refuses (its enrollment not yet in the broker's allowlist) waits
    // minutes before it tries again, as a revoked one would: start the fleet only once
    // every broker has applied the version that admits it.
    control.wait_applied(&shutdown).await?;
    let fleet_stop = CancellationToken::new();
    let (agents, mut rx) = start_fleet(&opts, &layout, &brokers, &fleet_stop)?;
    let started = Instant::now();
    let connected = wait_connected(opts.appliances, &mut rx, &shutdown).await?;
    if !shutdown.is_cancelled() {
        println!(
            "ready: {} appliances connected (in {:.1?}; every {TCP_EVERY}th over TLS/TCP)\n",
            connected.len(),
            started.elapsed()
        );
        print_where(&opts, &layout, &control, &brokers);
        if control.console.is_some() {
            match crate::cli::console::login_link(&layout.operator()).await {
                Ok(link) => println!(
                    "Console sign-in link for the local admin (works once, until {}; \
                     `tether console` makes another):\n  {}\n",
                    link.expires_at, link.url
                ),
                Err(e) => eprintln!("no console sign-in link: {e:#}"),
            }
        }
    }

    // Report sessions that come and go (revocations, renewals) while running.
    let mut live = connected;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = rx.recv() => match ev {
                Some((id, true)) => { if live.insert(id.clone()) { println!("{id}: connected ({} connected)", live.len()); } }
                Some((id, false)) => { if live.remove(&id) { println!("{id}: disconnected ({} connected)", live.len()); } }
                None => break,
            },
        }
    }

    println!(
        "stopping {} appliances, {} brokers and control",
        opts.appliances,
        brokers.len()
    );
    fleet_stop.cancel();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
    }
    let clean = stop_brokers(brokers).await;
    control.stop().await?;
    if !clean {
        bail!("not every broker stopped cleanly");
    }
    println!("stopped cleanly");
    Ok(())
}

/// Control, serving in a task of this process.
struct LocalControl {
    /// Its API's URL.
    url: String,
    /// The web console's origin.
    console: Option<String>,
    metrics_addr: SocketAddr,
    store: Arc<dyn Store>,
    /// Its broker channels (to see which allowlist version each broker applied).
    cluster: Arc<tether_control::cluster::Cluster>,
    root_pem: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalControl {
    /// Start control on its data directory (prepared by [`prepare`]).
    async fn start(layout: &Layout, port_base: u16) -> anyhow::Result<LocalControl> {
        let overrides = tether_control::run::Overrides {
            console_listen: Some(console_listen(port_base)),
            ..Default::default()
        };
        let control = tether_control::run::Started::bind_with(&layout.control(), overrides)
            .await
            .context("starting control")?;
        let console = control.console_origin();
        let control_addr = control.api_addr()?;
        // With free ports, keep the one control got: brokers and the operator credential
        // remember control's URL for the next run.
        let mut cfg = tether_control::config::ControlConfig::load(&layout.control())?;
        if cfg.listen.port() == 0 {
            cfg.listen = control_addr;
            cfg.save(&layout.control())?;
        }
        let metrics_addr = control.metrics_addr()?;
        let store = control.state.domain.store.clone();
        let cluster = control.state.cluster.clone();
        let url = format!("https://{control_addr}");
        let root_pem = control.state.domain.ca.root_pem();
        let stop = CancellationToken::new();
        let task = tokio::spawn(control.serve(stop.clone()));
        Ok(LocalControl {
            url,
            console,
            metrics_addr,
            store,
            cluster,
            root_pem,
            stop,
            task,
        })
    }

    /// Wait until every broker of [`BROKERS`] has a channel up and has applied the
    /// allowlist version control holds now (30 s at most) or `shutdown`.
    async fn wait_applied(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let version = u64::try_from(self.store.allowlist_version().await?).unwrap_or(0);
        let deadline = Instant::now() + ALLOWLIST_SYNC;
        loop {
            let links = self.cluster.links();
            let behind: Vec<&str> = BROKERS
                .iter()
                .copied()
                .filter(|name| {
                    !links
                        .iter()
                        .any(|l| l.broker == *name && l.allowlist_version >= version)
                })
                .collect();
            if behind.is_empty() || shutdown.is_cancelled() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "broker(s) {} did not apply allowlist version {version} within {ALLOWLIST_SYNC:?}",
                    behind.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop control and wait for it (10 s at most).
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.context("control")),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("control did not stop within 10 s"),
        }
    }
}

/// How long a drained in-process broker may take to get its ports back.
const REBIND_FOR: Duration = Duration::from_secs(10);

/// What it takes to start an in-process broker again on the same addresses.
struct Restart {
    layout: Layout,
    store: Arc<dyn Store>,
    control_url: String,
    root_pem: String,
    name: String,
    quic: SocketAddr,
    admin: SocketAddr,
}

impl Restart {
    /// Serve `running` until `stop`. A drain asked by control (`tether broker drain NAME`)
    /// ends a broker process; here the broker is started again on the same addresses, as
    /// the next version would be in a rolling upgrade, and `tether up` keeps running.
    async fn serve(
        self,
        mut running: tether_broker::Running,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let name = &self.name;
        loop {
            running.serve(stop.clone()).await?;
            if stop.is_cancelled() {
                return Ok(());
            }
            println!(
                "broker {name} drained (tether broker drain): its appliances reconnected to the \
                 other broker; starting {name} again, as a rolling upgrade would"
            );
            running = self.bind_again(&stop).await?;
            println!("broker {name} serving again on {}", self.quic);
        }
    }

    /// Bind the broker again on its addresses, retrying while the old sockets close.
    async fn bind_again(&self, stop: &CancellationToken) -> anyhow::Result<tether_broker::Running> {
        let deadline = Instant::now() + REBIND_FOR;
        loop {
            let r = broker(
                &self.layout,
                self.store.as_ref(),
                &self.control_url,
                &self.root_pem,
                &self.name,
                self.quic,
                self.admin,
            )
            .await;
            match r {
                Ok(running) => return Ok(running),
                Err(e) if Instant::now() < deadline && !stop.is_cancelled() => {
                    tracing::debug!(error = %format!("{e:#}"), "broker not bound yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A broker serving in a task of this process.
struct LocalBroker {
    name: String,
    quic: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Sessions coming up (`true`) and going down (`false`), by appliance id.
type SessionEvents = mpsc::UnboundedReceiver<(String, bool)>;

/// Run every appliance through the real supervisor until `stop`, half preferring each
/// broker. Returns their tasks and their sessions' ups and downs.
fn start_fleet(
    opts: &UpOptions,
    layout: &Layout,
    brokers: &[LocalBroker],
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, SessionEvents)> {
    // One endpoint for the whole fleet, with room for a burst of handshake answers: on the
    // default receive buffer (208 KiB) a fresh start dropped 60 datagrams and an agent or
    // two then waited out quinn's first probe timeout (ready in 1.0 s instead of 60 ms).
    let (endpoint, _, _) =
        tether_broker::tls::client_endpoint("127.0.0.1:0".parse()?, FLEET_UDP_BUFFER)?;
    let (tx, rx) = mpsc::unbounded_channel::<(String, bool)>();
    let mut agents = Vec::with_capacity(opts.appliances);
    for i in 1..=opts.appliances {
        let id = appliance_id(i);
        let mut order: Vec<tether_agent::BrokerAddr> =
            brokers.iter().map(|b| b.quic.into()).collect();
        order.rotate_left(i % brokers.len());
        // Every fourth appliance speaks TLS over TCP, as one behind a network that drops
        // UDP would; the rest QUIC, falling back by themselves if they must.
        let agent = tether_agent::AgentConfig {
            transport: if i % TCP_EVERY == 0 {
                tether_agent::config::TransportMode::Tcp
            } else {
                tether_agent::config::TransportMode::Auto
            },
            ..tether_agent::AgentConfig::default()
        };
        let supervisor = tether_agent::supervisor::Supervisor {
            state_dir: layout.appliance(&id),
            brokers: order,
            agent,
            renew_before: Duration::from_secs(86_400),
            renew_check_every: Duration::from_secs(3600),
        };
        let (tx, endpoint, stop) = (tx.clone(), endpoint.clone(), stop.clone());
        agents.push(tokio::spawn(async move {
            let result = supervisor
                .run(endpoint, stop, |mut events| {
                    let (tx, id) = (tx.clone(), id.clone());
                    tokio::spawn(async move {
                        while let Ok(ev) = events.recv().await {
                            let up = match ev {
                                tether_agent::AgentEvent::Connected { .. } => true,
                                tether_agent::AgentEvent::Disconnected { .. } => false,
                                tether_agent::AgentEvent::Stopped => break,
                                _ => continue,
                            };
                            if tx.send((id.clone(), up)).is_err() {
                                break;
                            }
                        }
                    });
                })
                .await;
            if let Err(e) = result {
                eprintln!("{id}: stopped: {e:#}");
            }
        }));
    }
    Ok((agents, rx))
}

/// Wait until all `appliances` have a session (60 s at most) or `shutdown`. Returns the
/// appliances connected.
async fn wait_connected(
    appliances: usize,
    rx: &mut SessionEvents,
    shutdown: &CancellationToken,
) -> anyhow::Result<HashSet<String>> {
    let bar = progress(appliances as u64, "connecting appliances");
    let mut connected = HashSet::new();
    let give_up = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(give_up);
    while connected.len() < appliances {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = rx.recv() => match ev {
                Some((id, true)) => { connected.insert(id); }
                Some((id, false)) => { connected.remove(&id); }
                None => break,
            },
            _ = &mut give_up => {
                bar.abandon();
                bail!("only {} of {} appliances connected within 60 s", connected.len(), appliances);
            }
        }
        bar.set_position(connected.len() as u64);
    }
    bar.finish_and_clear();
    Ok(connected)
}

/// Where everything is, and what to try from another terminal.
fn print_where(opts: &UpOptions, layout: &Layout, control: &LocalControl, brokers: &[LocalBroker]) {
    let first = appliance_id(1);
    let second = appliance_id(2.min(opts.appliances));
    let data = layout.root.display();
    let ops = layout.operator();
    let (control_url, metrics_addr) = (&control.url, control.metrics_addr);
    println!("  control (HTTPS, mTLS):  {control_url}    metrics: http://{metrics_addr}/metrics");
    for LocalBroker {
        name, quic, admin, ..
    } in brokers
    {
        println!("  broker {name} (QUIC+TCP): {quic}    metrics: http://{admin}/metrics");
    }
    if let Some(console) = &control.console {
        println!("  console (HTTPS):        {console}/console/");
    }
    println!("  data directory:         {data}\n");
    println!("Try, in another terminal (the local admin is logged in there):");
    println!("  export TETHER_CONFIG_DIR={}", ops.display());
    println!("  cargo run --release --bin tether -- broker list");
    println!("  cargo run --release --bin tether -- appliance list");
    println!("  cargo run --release --bin tether -- exec {first} -- uname -a");
    println!("  cargo run --release --bin tether -- exec --selector tenant={TENANT} -- hostname");
    println!("  cargo run --release --bin tether -- appliance show {second}");
    println!("  cargo run --release --bin tether -- appliance renew {second}     # renews on its next heartbeat");
    println!("  cargo run --release --bin tether -- appliance revoke {first}     # its session closes at once");
    println!("  cargo run --release --bin tether -- broker drain edge-1          # its appliances move to edge-2; edge-1 restarts");
    println!("\nCtrl-C stops everything.");
}

/// Stop the brokers (drained) and wait for each (10 s at most). Returns whether all
/// stopped cleanly.
async fn stop_brokers(brokers: Vec<LocalBroker>) -> bool {
    let mut clean = true;
    for LocalBroker {
        name, stop, task, ..
    } in brokers
    {
        stop.cancel();
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                clean = false;
                eprintln!("broker {name}: {e:#}");
            }
            Ok(Err(e)) => {
                clean = false;
                eprintln!("broker {name}: {e}");
            }
            Err(_) => {
                clean = false;
                eprintln!("broker {name} did not stop within 10 s");
            }
        }
    }
    clean
}

/// Where `tether up` puts the console: 127.0.0.1:8445, or a free port when that is taken
/// or every port is free (`--port-base 0`).
fn console_listen(port_base: u16) -> SocketAddr {
    let wanted: SocketAddr = tether_control::console::UP_LISTEN
        .parse()
        .expect("a valid address");
    if port_base != 0 && std::net::TcpListener::bind(wanted).is_ok() {
        wanted
    } else {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
}
