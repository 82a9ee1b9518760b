//! One run: get the pool ready, start control and the brokers, drive the scenario while
//! sampling, stop everything, and build the [`Report`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tether_agent::Credentials;

use crate::cli::{RunArgs, Scenario, Transport};
use crate::fleet::{Endpoints, Fleet, FleetEvent, FleetOptions};
use crate::measure::{self, Machine, ProcSample, UdpCounters};
use crate::pool::{self, Pool};
use crate::progress::Progress;
use crate::report::{ms, round3, Detail, Limits, Report, Sample, UdpReport, MAX_SAMPLES};
use crate::spawn::{self, ChildGuard};

/// How long the brokers may take to load the fleet's allowlist from control.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the scenario samples the processes once the fleet is connected (at least:
/// `--sample-every` may be longer).
const HOLD_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How long stopping agents may take at the end.
const FLEET_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the next phase waits at most for the last one's QUIC connections to finish
/// closing ([`settle`]).
const SETTLE_MAX: Duration = Duration::from_secs(30);
/// Largest connect time the histogram holds, µs (one hour).
const MAX_CONNECT_US: u64 = 3_600_000_000;
/// UDP buffer below which a storm is expected to drop packets (32 MiB).
const WANTED_UDP_BUFFER: u64 = 32 * 1024 * 1024;

/// How long a draining broker waits for its sessions to leave: GoAway's jitter, then
/// ten seconds for the last ones to go.
fn drain_timeout(args: &RunArgs) -> Duration {
    args.drain_jitter + Duration::from_secs(10)
}

/// A started broker.
struct Broker {
    guard: ChildGuard,
    /// Its QUIC address.
    quic: SocketAddr,
    /// Its admin API's address.
    admin: SocketAddr,
}

/// Run the scenario `args` describes.
pub async fn run(args: &RunArgs, limits: Limits) -> anyhow::Result<Report> {
    if args.baseline && !matches!(args.scenario, Scenario::Storm | Scenario::Steady) {
        bail!(
            "--baseline compares storm and steady only: the bare echo server has no \
             commands, revocation, churn or drain"
        );
    }
    if args.scenario == Scenario::Drain && args.effective_brokers() < 2 {
        bail!("drain moves the appliances of one broker to the others: give --brokers 2 or more");
    }
    if args.transport == Transport::Tcp {
        // One socket per appliance here (QUIC's share --client-endpoints).
        measure::check_nofile(
            "this process (the fleet)",
            Some(limits.nofile),
            args.appliances,
        );
    }
    if let Some(url) = &args.control {
        if args.scenario == Scenario::Chaos {
            bail!("chaos kills and restarts control and the brokers: it needs --spawn");
        }
        return crate::remote::run(args, url, limits).await;
    }
    if !args.spawn {
        bail!(
            "give --spawn (start control and brokers here) or --control URL (an existing cluster)"
        );
    }
    let progress = Progress::new(args.no_progress);
    let machine = Machine::detect();
    let bins = spawn::bin_dir(args.bin_dir.as_deref())?;
    let n = usize::try_from(args.appliances).context("--appliances is too large")?;

    // The pool: what is enrolled already, what is missing.
    let root = match &args.pool {
        Some(p) => p.clone(),
        None => Pool::default_root()?,
    };
    let pool = Pool::open(&root)?;
    println!("pool: {}", pool.root().display());
    let mut creds = pool.load(n, &progress).await;
    let missing = pool::missing(&creds);
    if !missing.is_empty() {
        println!(
            "{} of {n} appliances need enrolling ({} ready in the pool)",
            missing.len(),
            n - missing.len()
        );
    }
    let prepared = pool
        .prepare(
            &missing,
            args.effective_brokers(),
            args.scenario.needs_operator(),
            &progress,
        )
        .await?;

    let run_dir = tempfile::Builder::new()
        .prefix("tether-loadtest-")
        .tempdir()
        .context("creating the run directory")?;
    let outcome = run_spawned(
        args,
        &pool,
        &prepared,
        &mut creds,
        &bins,
        run_dir.path(),
        &progress,
        machine,
        limits,
    )
    .await;
    let broken = outcome
        .as_ref()
        .is_ok_and(|r| r.broken_invariants().is_some());
    if outcome.is_err() || broken || args.keep_logs {
        let kept = run_dir.keep();
        eprintln!("logs of control and the brokers: {}", kept.display());
    }
    outcome
}

/// Start control and the brokers here, enroll what the pool lacks, wait until every broker
/// enforces the fleet's allowlist, [`drive`] the scenario, then stop the brokers and
/// control.
#[allow(clippy::too_many_arguments)]
async fn run_spawned(
    args: &RunArgs,
    pool: &Pool,
    prepared: &pool::Prepared,
    creds: &mut [Option<Credentials>],
    bins: &std::path::Path,
    run_dir: &std::path::Path,
    progress: &Progress,
    machine: Machine,
    mut limits: Limits,
) -> anyhow::Result<Report> {
    if args.scenario == Scenario::Chaos {
        return crate::chaos::run(
            args, pool, prepared, creds, bins, run_dir, progress, machine, limits,
        )
        .await;
    }
    let n = creds.len();
    let (control, control_url) = start_control(pool, bins, run_dir).await?;

    // Enrollment of what the pool lacks.
    let enroll_started = Instant::now();
    prepared
        .enroll(pool, &control_url, args.enroll_concurrency, progress)
        .await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    let creds = prepared.fill(pool, creds)?;

    // commands, revoke: control's API as the pool's operator.
    let api = if args.scenario.needs_operator() {
        let operator = prepared.operator(pool, &control_url).await?;
        Some(crate::ops::Api::new(
            &control_url,
            &prepared.root_pem,
            &operator,
        )?)
    } else {
        None
    };

    // Brokers.
    let nb = args.effective_brokers();
    let mut brokers = Vec::with_capacity(nb);
    for b in 1..=nb {
        let name = pool::broker_name(b);
        brokers.push(start_broker(args, pool, prepared, &name, &control_url, bins, run_dir).await?);
    }
    // The brokers inherit this process's raised open-files limit: check what they got.
    for b in &brokers {
        let limit = measure::nofile_of(b.guard.pid());
        if args.transport == Transport::Tcp {
            measure::check_nofile(
                &format!("broker {}", b.guard.name()),
                limit,
                n.div_ceil(nb) as u64,
            );
        }
        limits.broker_nofile.push(limit);
    }
    let mut udp_report = UdpReport {
        client_endpoints: args.client_endpoints,
        ..UdpReport::default()
    };
    for b in &brokers {
        let synced = wait_synced(b, n).await?;
        udp_report
            .broker_recv_buffer_bytes
            .push(spawn::metric(&synced, "tether_udp_recv_buffer_bytes").map(|v| v as u64));
    }

    // --baseline: the first broker's credential, which it enrolled by now.
    let baseline_cert = args.baseline.then(|| {
        let dir = pool.broker_dir(&pool::broker_name(1));
        BaselineCert {
            cert: dir.join("broker.pem"),
            key: dir.join("broker.key"),
            ca: dir.join("ca.pem"),
        }
    });
    let outcome = drive(
        args,
        pool,
        api.as_ref(),
        creds,
        brokers
            .iter()
            .map(|b| crate::motion::BrokerRef {
                name: b.guard.name().to_owned(),
                quic: b.quic,
                admin: Some(b.admin),
                pid: Some(b.guard.pid()),
                sessions_before: 0,
            })
            .collect(),
        Some(control.pid()),
        baseline_cert,
        run_dir,
        progress,
        udp_report,
        machine,
        limits,
        enroll_secs,
        prepared.tokens.len(),
    )
    .await;
    stop_all(brokers, control, run_dir).await;
    outcome
}

/// Start control on the pool's data directory, on free loopback ports. Returns it and its
/// API's URL.
async fn start_control(
    pool: &Pool,
    bins: &std::path::Path,
    run_dir: &std::path::Path,
) -> anyhow::Result<(ChildGuard, String)> {
    start_control_at(&pool.control_dir(), bins, run_dir, None).await
}

/// Start control on `data_dir`, its API on `listen` (else a free loopback port), its
/// metrics on a free one. Returns it and its API's URL.
pub(crate) async fn start_control_at(
    data_dir: &std::path::Path,
    bins: &std::path::Path,
    run_dir: &std::path::Path,
    listen: Option<SocketAddr>,
) -> anyhow::Result<(ChildGuard, String)> {
    let control_args: Vec<String> = vec![
        "serve".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen".into(),
        listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--log-format".into(),
        "json".into(),
    ];
    let (control, line) = ChildGuard::spawn(
        "control",
        &bins.join(spawn::CONTROL_BIN),
        &control_args,
        run_dir.join("control.log"),
        "control API listening",
    )
    .await?;
    let control_url = format!("https://{}", spawn::addr_field(&line, "listen")?);
    println!("control: {control_url} (pid {})", control.pid());
    Ok((control, control_url))
}

/// Start broker `name` on free loopback ports, with a one-time bundle if the pool has no
/// credential for it yet, and the run's heartbeat and drain settings.
#[allow(clippy::too_many_arguments)]
async fn start_broker(
    args: &RunArgs,
    pool: &Pool,
    prepared: &pool::Prepared,
    name: &str,
    control_url: &str,
    bins: &std::path::Path,
    run_dir: &std::path::Path,
) -> anyhow::Result<Broker> {
    let bundle = prepared.broker_start(pool, name, control_url, run_dir)?;
    let (guard, quic, admin) = spawn_broker(
        args,
        name,
        &pool.broker_dir(name),
        bundle.as_deref(),
        None,
        bins,
        run_dir,
        args.drain_jitter,
    )
    .await?;
    Ok(Broker { guard, quic, admin })
}

/// Start broker `name` on `data_dir` (enrolling with `bundle` if given), listening on
/// `listen` (its agents' address and its admin API's; else free loopback ports), with the
/// run's heartbeat and GoAway jitter `jitter`. Returns it, its QUIC address and its admin
/// API's.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn spawn_broker(
    args: &RunArgs,
    name: &str,
    data_dir: &std::path::Path,
    bundle: Option<&std::path::Path>,
    listen: Option<(SocketAddr, SocketAddr)>,
    bins: &std::path::Path,
    run_dir: &std::path::Path,
    jitter: Duration,
) -> anyhow::Result<(ChildGuard, SocketAddr, SocketAddr)> {
    let (quic_at, admin_at) = match listen {
        Some((q, a)) => (q.to_string(), a.to_string()),
        None => ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()),
    };
    let mut broker_args: Vec<String> = vec![
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen".into(),
        quic_at,
        "--admin-listen".into(),
        admin_at,
        "--log-format".into(),
        "json".into(),
        "--heartbeat-interval".into(),
        humantime::format_duration(args.heartbeat_interval).to_string(),
        "--reconnect-jitter".into(),
        humantime::format_duration(jitter).to_string(),
        "--drain-timeout".into(),
        humantime::format_duration(jitter + Duration::from_secs(10)).to_string(),
    ];
    if let Some(bundle) = bundle {
        broker_args.push("--bundle".into());
        broker_args.push(bundle.display().to_string());
    }
    let (guard, line) = ChildGuard::spawn(
        name,
        &bins.join(spawn::BROKER_BIN),
        &broker_args,
        run_dir.join(format!("{name}.log")),
        "tether-broker listening",
    )
    .await?;
    let quic = spawn::addr_field(&line, "quic")?;
    let admin = spawn::addr_field(&line, "admin")?;
    println!(
        "broker {name}: quic {quic}, admin http://{admin} (pid {})",
        guard.pid()
    );
    Ok((guard, quic, admin))
}

/// Stop the brokers, then control (SIGTERM; SIGKILL after the grace period), saying which
/// had to be killed.
async fn stop_all(brokers: Vec<Broker>, control: ChildGuard, run_dir: &std::path::Path) {
    let mut clean = true;
    for b in brokers {
        let name = b.guard.name().to_owned();
        if !b.guard.stop(spawn::STOP_GRACE).await {
            eprintln!(
                "broker {name} did not stop within {:?}: killed",
                spawn::STOP_GRACE
            );
            clean = false;
        }
    }
    if !control.stop(spawn::STOP_GRACE).await {
        eprintln!(
            "control did not stop within {:?}: killed",
            spawn::STOP_GRACE
        );
        clean = false;
    }
    if !clean {
        eprintln!("(see the logs in {})", run_dir.display());
    }
}

/// Wait until the broker follows control with the whole fleet in its allowlist. Returns
/// its metrics text.
async fn wait_synced(broker: &Broker, n: usize) -> anyhow::Result<String> {
    wait_synced_at(broker.guard.name(), broker.admin, n).await
}

/// [`wait_synced`] of the broker `name` whose admin API is at `admin`.
pub(crate) async fn wait_synced_at(
    name: &str,
    admin: SocketAddr,
    n: usize,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let mut last;
    loop {
        match spawn::http_get(admin, "/metrics").await {
            Ok(text) => {
                let connected = spawn::metric(&text, "tether_broker_control_connected");
                let entries = spawn::metric(&text, "tether_allowlist_entries").unwrap_or(0.0);
                let stale = spawn::metric(&text, "tether_broker_allowlist_stale");
                if connected == Some(1.0) && stale != Some(1.0) && entries >= n as f64 {
                    return Ok(text);
                }
                last = format!(
                    "control_connected={connected:?} allowlist_entries={entries} stale={stale:?}"
                );
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!(
                "broker {name} did not load the fleet's allowlist ({n} entries) from control within \
                 {SYNC_TIMEOUT:?}: {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the fleet's events add up to.
pub struct Tally {
    connect: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// Whether each appliance has a session.
    pub up: Vec<bool>,
    /// The broker of each appliance's latest session.
    pub on: Vec<Option<SocketAddr>>,
    /// When each appliance's latest session came up.
    pub since: Vec<Option<Instant>>,
    /// How many have one.
    pub current: usize,
    first_done: usize,
    failed: usize,
    last_first: Option<Instant>,
    reconnects: u64,
}

impl Tally {
    /// Nothing seen yet of `n` appliances.
    pub fn new(n: usize) -> Tally {
        Tally {
            connect: Histogram::new_with_bounds(1, MAX_CONNECT_US, 3).expect("valid bounds"),
            errors: BTreeMap::new(),
            up: vec![false; n],
            on: vec![None; n],
            since: vec![None; n],
            current: 0,
            first_done: 0,
            failed: 0,
            last_first: None,
            reconnects: 0,
        }
    }

    /// A session closed on purpose (a revocation): not an error.
    pub fn expected_close(&mut self, index: usize) {
        if std::mem::replace(&mut self.up[index], false) {
            self.current -= 1;
        }
    }

    /// Count an event the scenario caused (a kicked appliance back, a drained one moved):
    /// a session coming up again is then not counted as a reconnect after a loss.
    pub fn record_expected(&mut self, ev: FleetEvent) {
        let before = self.reconnects;
        self.record(ev);
        self.reconnects = before;
    }

    /// Count an event.
    pub fn record(&mut self, ev: FleetEvent) {
        match ev {
            FleetEvent::Connected {
                index,
                first_connect,
                broker,
                at,
                ..
            } => {
                if !std::mem::replace(&mut self.up[index], true) {
                    self.current += 1;
                }
                self.on[index] = Some(broker);
                self.since[index] = Some(at);
                match first_connect {
                    Some(d) => {
                        self.first_done += 1;
                        self.last_first = Some(Instant::now());
                        let us = (d.as_micros() as u64).clamp(1, MAX_CONNECT_US);
                        let _ = self.connect.record(us);
                    }
                    None => self.reconnects += 1,
                }
            }
            FleetEvent::Disconnected { index, kind, .. } => {
                if std::mem::replace(&mut self.up[index], false) {
                    self.current -= 1;
                }
                *self.errors.entry(kind).or_default() += 1;
            }
            FleetEvent::Left { index, .. } => self.expected_close(index),
            FleetEvent::Failed { kind, .. } => {
                self.failed += 1;
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }

    /// Appliances with a first session.
    pub fn first_done(&self) -> usize {
        self.first_done
    }

    /// Sessions that came up again after one was lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// A quantile of the first connect times, ms.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.connect.is_empty()).then(|| ms(self.connect.value_at_quantile(q)))
    }
}

/// What one fleet (the agents against Tether, or bare clients against the baseline)
/// measured.
struct Phase {
    tally: Tally,
    connect_secs: f64,
    before: ProcSample,
    after_connect: ProcSample,
    end: ProcSample,
    hold_secs: Option<f64>,
    connected_at_end: usize,
    samples: Vec<Sample>,
    ops: crate::ops::OpsOutcome,
    /// Whether the servers sampled at the end are those sampled before (not so after a
    /// drain), so that memory per connection means something.
    per_conn_comparable: bool,
    /// Whether the servers were measured at all (not against an existing cluster).
    servers_measured: bool,
}

/// The headline numbers of a [`Phase`] (also the `baseline` object of the report).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Headline {
    /// See [`Report::handshakes_per_sec`].
    pub handshakes_per_sec: Option<f64>,
    /// See [`Report::connect_p50_ms`].
    pub connect_p50_ms: Option<f64>,
    /// See [`Report::connect_p99_ms`].
    pub connect_p99_ms: Option<f64>,
    /// See [`Detail::connect_p90_ms`].
    pub connect_p90_ms: Option<f64>,
    /// See [`Detail::connect_max_ms`].
    pub connect_max_ms: Option<f64>,
    /// Server memory (`broker_rss_bytes` for Tether).
    pub broker_rss_bytes: Option<u64>,
    /// Server memory before any client connected.
    pub broker_rss_before_bytes: Option<u64>,
    /// Server memory once every client connected.
    pub broker_rss_after_connect_bytes: Option<u64>,
    /// Server memory growth per connection.
    pub broker_bytes_per_conn: Option<f64>,
    /// Server CPU during the scenario, seconds.
    pub broker_cpu_seconds: Option<f64>,
    /// Server CPU per connected client during the connect phase, µs.
    pub broker_cpu_per_handshake_us: Option<f64>,
    /// Server CPU while holding the clients, percent of one core.
    pub broker_hold_cpu_percent: Option<f64>,
    /// Clients with a first session.
    pub connected: usize,
    /// Clients with a session at the end.
    pub connected_at_end: usize,
    /// Seconds from the start until the last first session.
    pub connect_secs: f64,
    /// Sessions that came up again after one was lost.
    pub reconnects: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
}

impl Phase {
    fn headline(&self) -> Headline {
        let t = &self.tally;
        let connected = t.first_done;
        let rss = self.end.rss_bytes;
        let m = self.servers_measured;
        Headline {
            handshakes_per_sec: (connected > 0 && self.connect_secs > 0.0)
                .then(|| round3(connected as f64 / self.connect_secs)),
            connect_p50_ms: t.quantile_ms(0.5),
            connect_p99_ms: t.quantile_ms(0.99),
            connect_p90_ms: t.quantile_ms(0.9),
            connect_max_ms: (!t.connect.is_empty()).then(|| ms(t.connect.max())),
            broker_rss_bytes: m.then_some(rss),
            broker_rss_before_bytes: m.then_some(self.before.rss_bytes),
            broker_rss_after_connect_bytes: m.then_some(self.after_connect.rss_bytes),
            broker_bytes_per_conn: (m && self.per_conn_comparable && self.connected_at_end > 0)
                .then(|| {
                    round3(
                        rss.saturating_sub(self.before.rss_bytes) as f64
                            / self.connected_at_end as f64,
                    )
                }),
            broker_cpu_seconds: m.then(|| round3(self.end.cpu_seconds - self.before.cpu_seconds)),
            broker_cpu_per_handshake_us: (m && connected > 0).then(|| {
                round3(
                    (self.after_connect.cpu_seconds - self.before.cpu_seconds) * 1e6
                        / connected as f64,
                )
            }),
            broker_hold_cpu_percent: self.hold_secs.filter(|_| m).map(|h| {
                round3(
                    (self.end.cpu_seconds - self.after_connect.cpu_seconds) / h.max(1e-9) * 100.0,
                )
            }),
            connected,
            connected_at_end: self.connected_at_end,
            connect_secs: round3(self.connect_secs),
            reconnects: t.reconnects,
            errors: t.errors.clone(),
        }
    }
}

/// Tether / baseline for the fields where a ratio means something.
fn ratios(tether: &Headline, baseline: &Headline) -> serde_json::Value {
    let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
        _ => None,
    };
    serde_json::json!({
        "handshakes_per_sec": r(tether.handshakes_per_sec, baseline.handshakes_per_sec),
        "broker_bytes_per_conn": r(tether.broker_bytes_per_conn, baseline.broker_bytes_per_conn),
        "broker_cpu_per_handshake_us": r(tether.broker_cpu_per_handshake_us, baseline.broker_cpu_per_handshake_us),
        "connect_p50_ms": r(tether.connect_p50_ms, baseline.connect_p50_ms),
        "connect_p99_ms": r(tether.connect_p99_ms, baseline.connect_p99_ms),
        "broker_rss_bytes": r(tether.broker_rss_bytes.map(|v| v as f64), baseline.broker_rss_bytes.map(|v| v as f64)),
    })
}

/// Sample the servers `pids`, start a fleet of `n`, run the scenario's phases on it and
/// stop it.
#[allow(clippy::too_many_arguments)]
async fn measure_phase(
    args: &RunArgs,
    n: usize,
    pids: &[u32],
    progress: &Progress,
    label: &str,
    ops_ctx: Option<&crate::ops::Ctx<'_>>,
    movers: &[crate::motion::BrokerRef],
    start_fleet: impl FnOnce() -> anyhow::Result<Fleet>,
) -> anyhow::Result<Phase> {
    let before = measure::sample_all(pids)?;
    println!(
        "{label}: {} with {n} appliances{}",
        args.scenario.as_str(),
        args.effective_concurrency()
            .map(|c| format!(" (at most {c} connecting at once)"))
            .unwrap_or_default()
    );
    let mut m = Measuring::start(n, pids, before, args.sample_every, start_fleet)?;
    let (connect_secs, after_connect) = m.connect(args, label, progress).await?;

    // Then what the scenario does with the connected fleet.
    let mut hold_secs = None;
    let mut end = after_connect;
    let mut ops = crate::ops::OpsOutcome::default();
    let mut per_conn_comparable = true;
    match (args.scenario, ops_ctx) {
        (Scenario::Steady, _) => {
            hold_secs = Some(m.hold(args.duration, progress).await?);
            end = measure::sample_all(pids)?;
        }
        (Scenario::Commands | Scenario::Revoke, Some(ctx)) => {
            let act_start = Instant::now();
            ops = m.operate(args, ctx, progress).await?;
            if args.scenario == Scenario::Commands {
                hold_secs = Some(act_start.elapsed().as_secs_f64());
            }
            end = measure::sample_all(pids)?;
        }
        (Scenario::Churn, _) if !movers.is_empty() => {
            let act_start = Instant::now();
            ops = m.churn(args, movers, ops_ctx, progress).await?;
            hold_secs = Some(act_start.elapsed().as_secs_f64());
            end = measure::sample_all(pids)?;
        }
        (Scenario::Drain, _) if !movers.is_empty() => {
            // The drained broker exits: from here on only the others are sampled.
            let rest: Vec<u32> = movers[1..].iter().filter_map(|b| b.pid).collect();
            ops = m.drain(args, movers, &rest, progress).await?;
            end = measure::sample_all(&rest)?;
            per_conn_comparable = false;
        }
        _ => {}
    }
    let (tally, samples, connected_at_end) = m.stop(label).await?;
    Ok(Phase {
        tally,
        connect_secs,
        before,
        after_connect,
        end,
        hold_secs,
        connected_at_end,
        samples,
        ops,
        per_conn_comparable,
        servers_measured: !pids.is_empty(),
    })
}

/// The samples of a phase, and what they are taken against.
struct Samples {
    list: Vec<Sample>,
    /// How many of `list` the connect phase took (fine samples, thinned last).
    fine_len: usize,
    start: Instant,
    me: u32,
    before: ProcSample,
}

impl Samples {
    fn new(start: Instant, before: ProcSample) -> Self {
        Samples {
            list: Vec::new(),
            fine_len: 0,
            start,
            me: std::process::id(),
            before,
        }
    }

    /// Sample the servers `pids` and this process now.
    fn take(&mut self, tally: &Tally, pids: &[u32]) -> anyhow::Result<()> {
        let s = take_sample(self.start, tally, pids, self.me, self.before)?;
        self.push(s);
        Ok(())
    }

    /// Keep `s`, and at most [`MAX_SAMPLES`]: past it, every other sample taken after
    /// the connect phase goes (the storm is what fine samples are for), or every other
    /// one of all when the connect phase alone took half of them.
    fn push(&mut self, s: Sample) {
        self.list.push(s);
        if self.list.len() > MAX_SAMPLES {
            let from = if self.fine_len < MAX_SAMPLES / 2 {
                self.fine_len
            } else {
                self.fine_len = self.fine_len.div_ceil(2);
                0
            };
            thin(&mut self.list, from);
        }
    }
}

/// Drop every other sample of `list[from..]`, keeping the first of those and the last of
/// the list (so the chart still ends where the run did).
fn thin(list: &mut Vec<Sample>, from: usize) {
    let last = list.len().saturating_sub(1);
    let mut i = 0;
    list.retain(|_| {
        let keep = i < from || i == last || (i - from).is_multiple_of(2);
        i += 1;
        keep
    });
}

/// A fleet being measured: its events, what they add up to, and the samples.
struct Measuring<'a> {
    n: usize,
    /// The servers sampled.
    pids: &'a [u32],
    fleet: Fleet,
    tally: Tally,
    tick: tokio::time::Interval,
    /// `--sample-every`: the tick while connecting and draining.
    fine: Duration,
    samples: Samples,
}

/// A sampling tick every `every`, its first now.
fn sample_tick(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

impl<'a> Measuring<'a> {
    /// Start the fleet of `n`; the servers `pids` were sampled `before`.
    fn start(
        n: usize,
        pids: &'a [u32],
        before: ProcSample,
        fine: Duration,
        start_fleet: impl FnOnce() -> anyhow::Result<Fleet>,
    ) -> anyhow::Result<Self> {
        let start = Instant::now();
        let fleet = start_fleet()?;
        Ok(Measuring {
            n,
            pids,
            fleet,
            tally: Tally::new(n),
            tick: sample_tick(fine),
            fine,
            samples: Samples::new(start, before),
        })
    }

    /// The connect phase: until every client has its first session or failed, or
    /// `--connect-timeout` (the missing ones then count as `not_connected`). Returns the
    /// seconds from the start to the last first session, and the servers' sample then.
    async fn connect(
        &mut self,
        args: &RunArgs,
        label: &str,
        progress: &Progress,
    ) -> anyhow::Result<(f64, ProcSample)> {
        let (n, pids, tally) = (self.n, self.pids, &mut self.tally);
        let bar = progress.bar(n as u64, "connecting appliances");
        let give_up = tokio::time::sleep(args.connect_timeout);
        tokio::pin!(give_up);
        let mut timed_out = false;
        while tally.first_done + tally.failed < n {
            tokio::select! {
                ev = self.fleet.events.recv() => match ev {
                    Some(ev) => tally.record(ev),
                    None => break,
                },
                _ = self.tick.tick() => {
                    self.samples.take(tally, pids)?;
                    bar.set_prefix(format!("{} errors", tally.errors.values().sum::<u64>()));
                }
                _ = &mut give_up => { timed_out = true; break; }
            }
            bar.set_position(tally.first_done as u64);
        }
        bar.finish_and_clear();
        // The end of the storm, then samples as often as holding a fleet needs.
        self.samples.take(tally, pids)?;
        self.samples.fine_len = self.samples.list.len();
        let coarse = HOLD_SAMPLE_EVERY.max(self.fine);
        self.tick = sample_tick(coarse);
        self.tick.reset();
        let connect_end = tally.last_first.unwrap_or_else(Instant::now);
        let connect_secs = connect_end.duration_since(self.samples.start).as_secs_f64();
        let after_connect = measure::sample_all(pids)?;
        if timed_out {
            let missing = n - tally.first_done - tally.failed;
            eprintln!(
                "{label}: {missing} appliances had no session after {:?}",
                args.connect_timeout
            );
            tally.errors.insert("not_connected".into(), missing as u64);
        }
        println!(
            "{label}: {} of {n} connected in {connect_secs:.2} s",
            tally.first_done
        );
        Ok((connect_secs, after_connect))
    }

    /// The hold phase (`steady`): keep the fleet for `duration`, sampling. Returns the
    /// seconds held.
    async fn hold(&mut self, duration: Duration, progress: &Progress) -> anyhow::Result<f64> {
        let (pids, tally) = (self.pids, &mut self.tally);
        let hold_start = Instant::now();
        let bar = progress.bar(duration.as_secs(), "holding the fleet");
        let hold = tokio::time::sleep(duration);
        tokio::pin!(hold);
        loop {
            tokio::select! {
                ev = self.fleet.events.recv() => match ev {
                    Some(ev) => tally.record(ev),
                    None => break,
                },
                _ = self.tick.tick() => {
                    self.samples.take(tally, pids)?;
                    bar.set_position(hold_start.elapsed().as_secs());
                    bar.set_prefix(format!("{} connected", tally.current));
                }
                _ = &mut hold => break,
            }
        }
        bar.finish_and_clear();
        Ok(hold_start.elapsed().as_secs_f64())
    }

    /// `commands` or `revoke` through control's API.
    async fn operate(
        &mut self,
        args: &RunArgs,
        ctx: &crate::ops::Ctx<'_>,
        progress: &Progress,
    ) -> anyhow::Result<crate::ops::OpsOutcome> {
        let (pids, samples) = (self.pids, &mut self.samples);
        let mut sample = |t: &Tally| samples.take(t, pids);
        if args.scenario == Scenario::Commands {
            crate::ops::commands(
                ctx,
                args.rate,
                args.duration,
                args.max_in_flight,
                &mut self.fleet,
                &mut self.tally,
                &mut self.tick,
                &mut sample,
                progress,
            )
            .await
        } else {
            crate::ops::revoke(
                ctx,
                args.revoke,
                args.revoke_concurrency,
                &mut self.fleet,
                &mut self.tally,
                &mut self.tick,
                &mut sample,
                progress,
            )
            .await
        }
    }

    /// `churn`: appliances leaving and fresh agents joining on `movers`.
    async fn churn(
        &mut self,
        args: &RunArgs,
        movers: &[crate::motion::BrokerRef],
        ops_ctx: Option<&crate::ops::Ctx<'_>>,
        progress: &Progress,
    ) -> anyhow::Result<crate::ops::OpsOutcome> {
        let (pids, samples) = (self.pids, &mut self.samples);
        let mut sample = |t: &Tally| samples.take(t, pids);
        let (detail, errors) = crate::motion::churn(
            args.rate,
            args.duration,
            args.rejoin_delay,
            movers,
            ops_ctx.map(|c| c.api),
            &mut self.fleet,
            &mut self.tally,
            &mut self.tick,
            &mut sample,
            progress,
        )
        .await?;
        Ok(crate::ops::OpsOutcome {
            churn: Some(detail),
            errors,
            ..Default::default()
        })
    }

    /// `drain`: the first of `movers` drains, its appliances move to the others (`rest`,
    /// the servers sampled from now on).
    async fn drain(
        &mut self,
        args: &RunArgs,
        movers: &[crate::motion::BrokerRef],
        rest: &[u32],
        progress: &Progress,
    ) -> anyhow::Result<crate::ops::OpsOutcome> {
        // Appliances moving brokers make a storm of their own: sample it finely.
        self.tick = sample_tick(self.fine);
        let samples = &mut self.samples;
        let mut sample = |t: &Tally| samples.take(t, rest);
        let (detail, errors) = crate::motion::drain(
            args.drain_jitter,
            drain_timeout(args),
            movers,
            &mut self.fleet,
            &mut self.tally,
            &mut self.tick,
            &mut sample,
            progress,
        )
        .await?;
        Ok(crate::ops::OpsOutcome {
            drain: Some(detail),
            errors,
            ..Default::default()
        })
    }

    /// Count what is still queued (so errors up to now count), take one last sample (so a
    /// run shorter than the sampling period still has a line), and stop the fleet. Returns
    /// the tally, the samples and the sessions up at the end.
    async fn stop(mut self, label: &str) -> anyhow::Result<(Tally, Vec<Sample>, usize)> {
        while let Ok(ev) = self.fleet.events.try_recv() {
            self.tally.record(ev);
        }
        let alive: Vec<u32> = self
            .pids
            .iter()
            .copied()
            .filter(|p| measure::is_alive(*p))
            .collect();
        self.samples.take(&self.tally, &alive)?;
        let connected_at_end = self.tally.current;
        let left = self.fleet.stop(FLEET_STOP_GRACE).await;

        if left > 0 {
            eprintln!("{label}: {left} clients did not stop within {FLEET_STOP_GRACE:?}");
        }
        Ok((self.tally, self.samples.list, connected_at_end))
    }
}

/// Drive the scenario on `creds`' fleet against the brokers `movers`: the Tether phase,
/// then (with `--baseline`) the same against the bare server on the same transport, and
/// the report.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn drive(
    args: &RunArgs,
    pool: &Pool,
    api: Option<&crate::ops::Api>,
    creds: Vec<Credentials>,
    movers: Vec<crate::motion::BrokerRef>,
    control_pid: Option<u32>,
    baseline_cert: Option<BaselineCert>,
    run_dir: &std::path::Path,
    progress: &Progress,
    mut udp: UdpReport,
    machine: Machine,
    mut limits: Limits,
    enroll_secs: f64,
    enrolled_this_run: usize,
) -> anyhow::Result<Report> {
    let n = creds.len();
    let mut movers = movers;
    // What the brokers held before the fleet (other appliances of an existing cluster).
    for b in &mut movers {
        b.sessions_before = crate::motion::broker_sessions(std::slice::from_ref(b), api)
            .await
            .unwrap_or(0);
    }
    let pids: Vec<u32> = movers.iter().filter_map(|b| b.pid).collect();
    let quic: Vec<SocketAddr> = movers.iter().map(|b| b.quic).collect();
    let me = std::process::id();
    let endpoints = client_endpoints(args, &mut udp)?;
    let agent = args.agent_config();
    let opts = FleetOptions {
        brokers: quic.clone(),
        agent: agent.clone(),
        concurrency: args.effective_concurrency(),
        rejoin_delay: args.rejoin_delay,
    };

    let baseline_creds = baseline_cert.as_ref().map(|_| creds.clone());
    if let (Some(cert), Some(creds)) = (&baseline_cert, &baseline_creds) {
        warm_up(args, cert, creds, &endpoints, run_dir, progress).await?;
        settle(&endpoints, "warm-up").await;
    }

    let me_before = measure::sample(me)?;
    let control_before = control_pid.and_then(|p| measure::sample(p).ok());
    let udp_before = UdpCounters::read();
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let ops_creds = if args.scenario == Scenario::Revoke {
        creds.clone()
    } else {
        Vec::new()
    };
    let ops_ctx = api.map(|api| crate::ops::Ctx {
        api,
        pool,
        creds: &ops_creds,
        endpoints: &endpoints,
        brokers: &quic,
        agent: &agent,
    });
    let tether = measure_phase(
        args,
        n,
        &pids,
        progress,
        "tether",
        ops_ctx.as_ref(),
        &movers,
        || Ok(Fleet::start(creds, &endpoints, &opts)),
    )
    .await?;
    let me_end = measure::sample(me)?;
    let machine = machine_at_end(machine);
    let control_end = control_pid.and_then(|p| measure::sample(p).ok());
    udp.drops = udp_drops(udp_before, &udp, &limits);
    let head = tether.headline();

    // The same scenario against the bare server on the same transport.
    let (baseline, ratios) = match (baseline_cert, baseline_creds) {
        (Some(cert), Some(creds)) => {
            settle(&endpoints, "tether").await;
            let me_b0 = measure::sample(me)?;
            let (b, samples, nofile) =
                baseline_phase(args, cert, creds, &endpoints, run_dir, progress).await?;
            let me_b1 = measure::sample(me)?;
            limits.baseline_nofile = nofile;
            let r = ratios(&head, &b);
            let mut json = baseline_json(&b, &samples)?;
            // The simulator's own CPU in each phase: on shared cores the clients' work
            // competes with the server's, so the handshake ratio depends on it too.
            json["simulator_cpu_seconds"] = round3(me_b1.cpu_seconds - me_b0.cpu_seconds).into();
            (Some(json), Some(r))
        }
        _ => (None, None),
    };
    for e in &endpoints.endpoints {
        e.close(0u32.into(), b"done");
    }

    let facts = RunFacts {
        brokers: movers.len(),
        started_at,
        machine,
        limits,
        udp,
        enroll_secs,
        enrolled_this_run,
        simulator: (me_before, me_end),
        control: (control_before, control_end),
    };
    Ok(report(args, n, tether, head, facts, baseline, ratios))
}

/// Wait until the fleet's QUIC endpoints hold no connection of the phase `label` that just
/// stopped. A closed QUIC connection stays in its endpoint for three probe timeouts (its
/// state, its timers, answers to what the peer still sends), and a storm inflates the
/// round-trip estimates those derive from: after a 5,000 storm the closing took 19 s. The
/// next phase would otherwise run beside the last one's closing connections: their memory
/// not yet free for its own (so it first-touched fresh pages) and their timers on the
/// same cores.
async fn settle(endpoints: &Endpoints, label: &str) {
    let open = || -> usize {
        endpoints
            .endpoints
            .iter()
            .map(quinn::Endpoint::open_connections)
            .sum()
    };
    let closing = open();
    if closing == 0 {
        return;
    }
    let started = Instant::now();
    let idle = async {
        for e in &endpoints.endpoints {
            e.wait_idle().await;
        }
    };
    match tokio::time::timeout(SETTLE_MAX, idle).await {
        Ok(()) => println!(
            "{label}: its {closing} QUIC connections finished closing in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        Err(_) => eprintln!(
            "warning: {} QUIC connections of the {label} phase were still closing after \
             {SETTLE_MAX:?}; the next phase starts beside them",
            open()
        ),
    }
}

/// The fleet's client endpoints, with the UDP buffers the kernel granted them noted in
/// `udp` (and a warning when they are smaller than a storm needs).
pub(crate) fn client_endpoints(args: &RunArgs, udp: &mut UdpReport) -> anyhow::Result<Endpoints> {
    let endpoints = crate::fleet::client_endpoints(args.client_endpoints, args.udp_buffer)?;
    udp.client_recv_buffer_bytes = endpoints.recv_buffer_bytes;
    udp.client_send_buffer_bytes = endpoints.send_buffer_bytes;
    if (endpoints.recv_buffer_bytes as u64) < WANTED_UDP_BUFFER.min(args.udp_buffer as u64) {
        eprintln!(
            "warning: the kernel granted the client sockets {} bytes of UDP receive buffer \
             (asked {}); raise net.core.rmem_max: sysctl -w net.core.rmem_max={}",
            endpoints.recv_buffer_bytes, args.udp_buffer, args.udp_buffer
        );
    }
    Ok(endpoints)
}

/// `machine` with the load average at the end of the scenario, warning when other work
/// competed for the machine.
pub(crate) fn machine_at_end(mut machine: Machine) -> Machine {
    machine.load_average_1m_end = measure::load_average();
    // The fleet, the brokers and control account for about the cores' worth of load.
    if let Some(l) = machine
        .load_average_1m_end
        .filter(|l| *l > machine.cores as f64 + 1.0)
    {
        eprintln!(
            "warning: the load average was {l:.1} on {} cores at the end of the scenario: \
             other work competed for the machine, so these figures are pessimistic",
            machine.cores
        );
    }
    machine
}

/// The UDP datagrams the kernel dropped since `before`, warning when it dropped any for
/// full receive buffers.
fn udp_drops(before: UdpCounters, udp: &UdpReport, limits: &Limits) -> UdpCounters {
    let drops = UdpCounters::read().since(before);
    if drops.rcvbuf_errors > 0 {
        eprintln!(
            "warning: the kernel dropped {} UDP datagrams for full receive buffers during the \
             run; the brokers' sockets got {:?} bytes (net.core.rmem_max = {:?}). Raise it: \
             sysctl -w net.core.rmem_max={WANTED_UDP_BUFFER}",
            drops.rcvbuf_errors, udp.broker_recv_buffer_bytes, limits.rmem_max
        );
    }
    drops
}

/// With `--baseline`: a storm of the bare clients against the bare server, measured by
/// nobody, before the Tether phase. Whichever phase ran first paid for first touching this
/// process's heap (the clients' buffers and tasks) and the kernel's socket caches, which
/// the second then reused: in a 5,000 storm over TCP 13 % of the simulator's CPU in the
/// Tether phase went to page faults against 3 % in the bare phase after it, and the
/// handshake-rate ratio moved by a tenth with the order. After a warm-up both measured
/// phases start warm; what Tether's agents need beyond the bare clients' footprint is
/// still first-touched in its phase, as it should be.
async fn warm_up(
    args: &RunArgs,
    cert: &BaselineCert,
    creds: &[Credentials],
    endpoints: &Endpoints,
    run_dir: &std::path::Path,
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut warm = args.clone();
    warm.scenario = Scenario::Storm;
    println!("baseline: warm-up first (not measured)");
    baseline_phase(
        &warm,
        cert.clone(),
        creds.to_vec(),
        endpoints,
        run_dir,
        progress,
    )
    .await?;
    Ok(())
}

/// The same scenario against the bare echo server of `--transport`, presenting `cert`,
/// with a fleet of bare clients on `creds`. Returns its headline, its samples
/// and the server's open-files limit.
async fn baseline_phase(
    args: &RunArgs,
    cert: BaselineCert,
    creds: Vec<Credentials>,
    endpoints: &Endpoints,
    run_dir: &std::path::Path,
    progress: &Progress,
) -> anyhow::Result<(Headline, Vec<Sample>, Option<u64>)> {
    let n = creds.len();
    let exe = std::env::current_exe().context("locating this executable")?;
    let server_args = vec![
        "baseline-server".to_owned(),
        "--cert".into(),
        cert.cert.display().to_string(),
        "--key".into(),
        cert.key.display().to_string(),
        "--ca".into(),
        cert.ca.display().to_string(),
        "--transport".into(),
        args.transport.as_str().into(),
    ];
    // On the system allocator, as the broker (see `alloc` in main.rs).
    let (server, line) = ChildGuard::spawn_env(
        "baseline",
        &exe,
        &server_args,
        &[(
            crate::alloc::SYSTEM_ALLOCATOR
                .to_str()
                .expect("the variable's name is ASCII"),
            "1",
        )],
        run_dir.join("baseline.log"),
        crate::baseline::READY_MESSAGE,
    )
    .await?;
    let addr = spawn::addr_field(&line, args.transport.as_str())?;
    println!(
        "baseline: {} echo server on {addr} (pid {})",
        args.transport.baseline_name(),
        server.pid()
    );
    let nofile = measure::nofile_of(server.pid());
    if args.transport == Transport::Tcp {
        measure::check_nofile("the baseline server", nofile, n as u64);
    }
    let concurrency = args.effective_concurrency();
    let phase = measure_phase(
        args,
        n,
        &[server.pid()],
        progress,
        "baseline",
        None,
        &[],
        || crate::baseline::start_fleet(creds, args.transport, endpoints, addr, concurrency),
    )
    .await;
    server.stop(spawn::STOP_GRACE).await;
    let phase = phase?;
    Ok((phase.headline(), phase.samples, nofile))
}

/// The report's `baseline`: the bare server's headline fields and its samples.
fn baseline_json(head: &Headline, samples: &[Sample]) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(head)?;
    v["samples"] = serde_json::to_value(samples)?;
    Ok(v)
}

/// What a run measured besides its Tether phase, for the report.
struct RunFacts {
    brokers: usize,
    started_at: String,
    machine: Machine,
    limits: Limits,
    udp: UdpReport,
    enroll_secs: f64,
    enrolled_this_run: usize,
    /// This process before and after the Tether phase.
    simulator: (ProcSample, ProcSample),
    /// Control before and after it, when it is ours to read.
    control: (Option<ProcSample>, Option<ProcSample>),
}

/// The report of a run of `n` appliances: the Tether phase (`head` is its headline), what
/// else the run measured, and the comparison with the baseline if there was one.
fn report(
    args: &RunArgs,
    n: usize,
    tether: Phase,
    head: Headline,
    facts: RunFacts,
    baseline: Option<serde_json::Value>,
    ratios: Option<serde_json::Value>,
) -> Report {
    let (me_before, me_end) = facts.simulator;
    let control_rss = facts.control.1.map(|s| s.rss_bytes);
    let control_cpu = match facts.control {
        (Some(b), Some(e)) => Some(round3(e.cpu_seconds - b.cpu_seconds)),
        _ => None,
    };
    let mut errors = head.errors.clone();
    for (k, v) in &tether.ops.errors {
        *errors.entry(k.clone()).or_default() += v;
    }
    let crate::ops::OpsOutcome {
        commands,
        revoke,
        churn,
        drain,
        ..
    } = tether.ops;
    Report {
        scenario: args.scenario.as_str(),
        transport: args.transport,
        appliances: n,
        brokers: facts.brokers,
        handshakes_per_sec: head.handshakes_per_sec,
        connect_p50_ms: head.connect_p50_ms,
        connect_p99_ms: head.connect_p99_ms,
        broker_rss_bytes: head.broker_rss_bytes,
        broker_bytes_per_conn: head.broker_bytes_per_conn,
        broker_cpu_seconds: head.broker_cpu_seconds,
        command_rtt_p50_ms: commands.as_ref().and_then(|c| c.rtt_p50_ms),
        command_rtt_p99_ms: commands.as_ref().and_then(|c| c.rtt_p99_ms),
        revoke_to_close_p50_ms: revoke.as_ref().and_then(|r| r.close_p50_ms),
        revoke_to_close_p99_ms: revoke.as_ref().and_then(|r| r.close_p99_ms),
        revoked_reconnects_accepted: revoke.as_ref().map(|r| r.reconnects_accepted),
        errors,
        machine: facts.machine,
        detail: Detail {
            version: env!("CARGO_PKG_VERSION"),
            started_at: facts.started_at,
            concurrency: args.effective_concurrency(),
            baseline_warm_up: baseline.is_some(),
            hold_secs: tether.hold_secs.map(round3),
            connected: head.connected,
            connected_at_end: head.connected_at_end,
            connect_secs: Some(head.connect_secs),
            connect_p90_ms: head.connect_p90_ms,
            connect_max_ms: head.connect_max_ms,
            reconnects: head.reconnects,
            broker_rss_before_bytes: head.broker_rss_before_bytes,
            broker_rss_after_connect_bytes: head.broker_rss_after_connect_bytes,
            broker_cpu_per_handshake_us: head.broker_cpu_per_handshake_us,
            broker_hold_cpu_percent: head.broker_hold_cpu_percent,
            control_rss_bytes: control_rss,
            control_cpu_seconds: control_cpu,
            simulator_rss_bytes: Some(me_end.rss_bytes),
            simulator_cpu_seconds: Some(round3(me_end.cpu_seconds - me_before.cpu_seconds)),
            enrolled_this_run: facts.enrolled_this_run,
            enroll_secs: round3(facts.enroll_secs),
            udp: facts.udp,
            limits: facts.limits,
            sample_every_ms: Some(round3(args.sample_every.as_secs_f64() * 1000.0)),
            samples: tether.samples,
            commands,
            revoke,
            churn,
            drain,
            faults: None,
            invariants: None,
            chaos: None,
        },
        baseline,
        ratios,
    }
}

/// The broker credential the baseline server presents (so the agents' client
/// configuration accepts it unchanged).
#[derive(Clone)]
pub(crate) struct BaselineCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn take_sample(
    start: Instant,
    tally: &Tally,
    pids: &[u32],
    me: u32,
    before: ProcSample,
) -> anyhow::Result<Sample> {
    // Against an existing cluster the brokers are not ours to read.
    let b = if pids.is_empty() {
        None
    } else {
        Some(measure::sample_all(pids).context("a broker is gone")?)
    };
    let s = measure::sample(me)?;
    Ok(Sample {
        t: round3(start.elapsed().as_secs_f64()),
        connected: tally.current,
        broker_rss_bytes: b.map(|b| b.rss_bytes),
        broker_cpu_seconds: b.map(|b| round3(b.cpu_seconds - before.cpu_seconds)),
        simulator_rss_bytes: s.rss_bytes,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A broker address for events.
    pub(crate) const BROKER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        7443,
    ));

    fn headline(rate: Option<f64>, per_conn: Option<f64>) -> Headline {
        Headline {
            handshakes_per_sec: rate,
            connect_p50_ms: Some(10.0),
            connect_p99_ms: Some(20.0),
            connect_p90_ms: None,
            connect_max_ms: None,
            broker_rss_bytes: Some(100),
            broker_rss_before_bytes: None,
            broker_rss_after_connect_bytes: None,
            broker_bytes_per_conn: per_conn,
            broker_cpu_seconds: None,
            broker_cpu_per_handshake_us: None,
            broker_hold_cpu_percent: None,
            connected: 1,
            connected_at_end: 1,
            connect_secs: 1.0,
            reconnects: 0,
            errors: BTreeMap::new(),
        }
    }

    fn at(t: f64) -> Sample {
        Sample {
            t,
            ..Default::default()
        }
    }

    #[test]
    fn a_storm_keeps_its_fine_samples_through_a_long_hold() {
        let mut s = Samples::new(Instant::now(), ProcSample::default());
        // A three-second storm sampled every 100 ms, as `--sample-every` does by default.
        for i in 0..=30 {
            s.push(at(i as f64 * 0.1));
        }
        s.fine_len = s.list.len();
        // Then two hours of holding, sampled every second.
        for i in 1..=7200 {
            s.push(at(3.0 + i as f64));
        }
        assert!(s.list.len() <= MAX_SAMPLES, "{}", s.list.len());
        let storm = s.list.iter().filter(|x| x.t <= 3.0).count();
        assert_eq!(storm, 31, "the storm's samples are thinned last");
        assert_eq!(s.list.last().map(|x| x.t), Some(7203.0));
        assert!(s.list.windows(2).all(|w| w[0].t < w[1].t));
        // The hold is still drawn, every few seconds.
        assert!(s.list.len() > MAX_SAMPLES / 2);
    }

    #[test]
    fn a_long_connect_phase_is_bounded_too() {
        let mut s = Samples::new(Instant::now(), ProcSample::default());
        for i in 0..5000 {
            s.push(at(i as f64 * 0.1));
        }
        assert!(s.list.len() <= MAX_SAMPLES);
        s.fine_len = s.list.len();
        for i in 0..5000 {
            s.push(at(500.0 + i as f64));
        }
        assert!(s.list.len() <= MAX_SAMPLES);
        assert!(s.fine_len <= s.list.len());
        assert_eq!(s.list.first().map(|x| x.t), Some(0.0));
        assert_eq!(s.list.last().map(|x| x.t), Some(5499.0));
        assert!(s.list.windows(2).all(|w| w[0].t < w[1].t));
    }

    #[test]
    fn the_baseline_keeps_its_samples_beside_its_headline() {
        let v = baseline_json(&headline(Some(10.0), None), &[at(0.0), at(0.1)]).expect("json");
        assert_eq!(v["handshakes_per_sec"], serde_json::json!(10.0));
        assert_eq!(v["samples"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["samples"][1]["t"], serde_json::json!(0.1));
    }

    #[test]
    fn ratios_are_tether_over_baseline_and_null_when_unknown() {
        let r = ratios(
            &headline(Some(900.0), Some(33_000.0)),
            &headline(Some(1000.0), None),
        );
        assert_eq!(r["handshakes_per_sec"], serde_json::json!(0.9));
        assert!(r["broker_bytes_per_conn"].is_null());
        assert_eq!(r["connect_p99_ms"], serde_json::json!(1.0));
        let zero = ratios(&headline(Some(1.0), None), &headline(Some(0.0), None));
        assert!(zero["handshakes_per_sec"].is_null());
    }

    #[test]
    fn tally_counts_first_sessions_reconnects_and_errors() {
        let mut t = Tally::new(2);
        t.record(FleetEvent::Connected {
            index: 0,
            first_connect: Some(Duration::from_millis(5)),
            since_start: Duration::from_millis(5),
            broker: BROKER,
            at: Instant::now(),
        });
        t.record(FleetEvent::Disconnected {
            index: 0,
            was_connected: true,
            kind: "timed_out".into(),
            at: Instant::now(),
        });
        t.record(FleetEvent::Connected {
            index: 0,
            first_connect: None,
            since_start: Duration::from_millis(3),
            broker: BROKER,
            at: Instant::now(),
        });
        t.record(FleetEvent::Failed {
            index: 1,
            kind: "agent_not_built".into(),
        });
        assert_eq!(
            (t.first_done, t.current, t.failed, t.reconnects),
            (1, 1, 1, 1)
        );
        assert_eq!(t.errors.get("timed_out"), Some(&1));
        assert_eq!(t.on[0], Some(BROKER));
        // A kicked appliance leaving is not an error.
        let errors = t.errors.clone();
        t.record(FleetEvent::Left {
            index: 0,
            at: Instant::now(),
        });
        assert_eq!(t.current, 0);
        assert_eq!(t.errors, errors);
        // Three significant digits.
        let p50 = t.quantile_ms(0.5).expect("one value");
        assert!((p50 - 5.0).abs() < 0.01, "{p50}");
    }
}
