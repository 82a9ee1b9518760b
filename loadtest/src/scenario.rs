//! One run: get the pool ready, start control and the brokers, drive the scenario while
//! sampling, stop everything, and build the [`Report`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tether_agent::{AgentConfig, Credentials};

use crate::cli::{RunArgs, Scenario};
use crate::fleet::{Fleet, FleetEvent, FleetOptions};
use crate::measure::{self, Machine, ProcSample, UdpCounters};
use crate::pool::{self, Pool};
use crate::progress::Progress;
use crate::report::{ms, round3, Detail, Limits, Report, Sample, UdpReport};
use crate::spawn::{self, ChildGuard};

/// How long the brokers may take to load the fleet's allowlist from control.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the scenario samples the processes.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How long stopping agents may take at the end.
const FLEET_STOP_GRACE: Duration = Duration::from_secs(10);
/// Largest connect time the histogram holds, µs (one hour).
const MAX_CONNECT_US: u64 = 3_600_000_000;
/// UDP buffer below which a storm is expected to drop packets (32 MiB).
const WANTED_UDP_BUFFER: u64 = 32 * 1024 * 1024;

/// A started broker.
struct Broker {
    guard: ChildGuard,
    admin: SocketAddr,
}

/// Run the scenario `args` describes.
pub async fn run(args: &RunArgs, limits: Limits) -> anyhow::Result<Report> {
    if !args.spawn {
        bail!(
            "give --spawn: this version runs only self-contained (control and brokers started \
             on 127.0.0.1); --control URL against an existing cluster comes later"
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
    let missing: Vec<usize> = creds
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_none())
        .map(|(i, _)| i + 1)
        .collect();
    if !missing.is_empty() {
        println!(
            "{} of {n} appliances need enrolling ({} ready in the pool)",
            missing.len(),
            n - missing.len()
        );
    }
    let prepared = pool.prepare(&missing, args.brokers, &progress).await?;

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
    if outcome.is_err() || args.keep_logs {
        let kept = run_dir.keep();
        eprintln!("logs of control and the brokers: {}", kept.display());
    }
    outcome
}

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
    limits: Limits,
) -> anyhow::Result<Report> {
    let n = creds.len();
    // Control.
    let control_args: Vec<String> = vec![
        "serve".into(),
        "--data-dir".into(),
        pool.control_dir().display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
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

    // Enrollment of what the pool lacks.
    let enroll_started = Instant::now();
    prepared
        .enroll(pool, &control_url, args.enroll_concurrency, progress)
        .await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    for p in &prepared.tokens {
        let dir = pool.appliance_dir(&p.id);
        creds[p.index - 1] = Some(
            Credentials::load(&dir)
                .with_context(|| format!("loading the new credential in {}", dir.display()))?,
        );
    }
    let creds: Vec<Credentials> = creds
        .iter_mut()
        .map(|c| c.take().expect("loaded"))
        .collect();

    // Brokers.
    let mut brokers = Vec::with_capacity(args.brokers);
    let mut quic = Vec::with_capacity(args.brokers);
    for b in 1..=args.brokers {
        let name = pool::broker_name(b);
        let bundle = prepared.broker_start(pool, &name, &control_url, run_dir)?;
        let mut broker_args: Vec<String> = vec![
            "--data-dir".into(),
            pool.broker_dir(&name).display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--log-format".into(),
            "json".into(),
            "--heartbeat-interval".into(),
            humantime::format_duration(args.heartbeat_interval).to_string(),
        ];
        if let Some(bundle) = bundle {
            broker_args.push("--bundle".into());
            broker_args.push(bundle.display().to_string());
        }
        let (guard, line) = ChildGuard::spawn(
            &name,
            &bins.join(spawn::BROKER_BIN),
            &broker_args,
            run_dir.join(format!("{name}.log")),
            "tether-broker listening",
        )
        .await?;
        let addr = spawn::addr_field(&line, "quic")?;
        let admin = spawn::addr_field(&line, "admin")?;
        println!(
            "broker {name}: quic {addr}, admin http://{admin} (pid {})",
            guard.pid()
        );
        quic.push(addr);
        brokers.push(Broker { guard, admin });
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

    let outcome = drive(
        args,
        creds,
        &quic,
        &brokers,
        &control,
        progress,
        udp_report,
        machine,
        limits,
        enroll_secs,
        prepared.tokens.len(),
    )
    .await;

    // Stop the brokers, then control (SIGTERM; SIGKILL after the grace period).
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
    outcome
}

/// Wait until the broker follows control with the whole fleet in its allowlist. Returns
/// its metrics text.
async fn wait_synced(broker: &Broker, n: usize) -> anyhow::Result<String> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let mut last;
    loop {
        match spawn::http_get(broker.admin, "/metrics").await {
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
                "broker {} did not load the fleet's allowlist ({n} entries) from control within \
                 {SYNC_TIMEOUT:?}: {last}",
                broker.guard.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the fleet's events add up to.
struct Tally {
    connect: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    up: Vec<bool>,
    current: usize,
    first_done: usize,
    failed: usize,
    last_first: Option<Instant>,
    reconnects: u64,
}

impl Tally {
    fn new(n: usize) -> Tally {
        Tally {
            connect: Histogram::new_with_bounds(1, MAX_CONNECT_US, 3).expect("valid bounds"),
            errors: BTreeMap::new(),
            up: vec![false; n],
            current: 0,
            first_done: 0,
            failed: 0,
            last_first: None,
            reconnects: 0,
        }
    }

    fn record(&mut self, ev: FleetEvent) {
        match ev {
            FleetEvent::Connected {
                index,
                first_connect,
            } => {
                if !std::mem::replace(&mut self.up[index], true) {
                    self.current += 1;
                }
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
            FleetEvent::Failed { kind, .. } => {
                self.failed += 1;
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }

    fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.connect.is_empty()).then(|| ms(self.connect.value_at_quantile(q)))
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &RunArgs,
    creds: Vec<Credentials>,
    quic: &[SocketAddr],
    brokers: &[Broker],
    control: &ChildGuard,
    progress: &Progress,
    mut udp: UdpReport,
    machine: Machine,
    limits: Limits,
    enroll_secs: f64,
    enrolled_this_run: usize,
) -> anyhow::Result<Report> {
    let n = creds.len();
    let pids: Vec<u32> = brokers.iter().map(|b| b.guard.pid()).collect();
    let me = std::process::id();
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
    let opts = FleetOptions {
        brokers: quic.to_vec(),
        agent: AgentConfig::default(),
        concurrency: args.effective_concurrency(),
    };

    // Before: the brokers idle with the allowlist loaded.
    let before = measure::sample_all(&pids)?;
    let me_before = measure::sample(me)?;
    let udp_before = UdpCounters::read();
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    println!(
        "{}: starting {n} appliances{}",
        args.scenario.as_str(),
        args.effective_concurrency()
            .map(|c| format!(" (at most {c} connecting at once)"))
            .unwrap_or_default()
    );

    let start = Instant::now();
    let mut fleet = Fleet::start(creds, &endpoints, &opts);
    let mut tally = Tally::new(n);
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let bar = progress.bar(n as u64, "connecting appliances");

    // Connect phase.
    let give_up = tokio::time::sleep(args.connect_timeout);
    tokio::pin!(give_up);
    let mut timed_out = false;
    while tally.first_done + tally.failed < n {
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev) => tally.record(ev),
                None => break,
            },
            _ = tick.tick() => {
                samples.push(take_sample(start, &tally, &pids, me, before)?);
                bar.set_prefix(format!("{} errors", tally.errors.values().sum::<u64>()));
            }
            _ = &mut give_up => { timed_out = true; break; }
        }
        bar.set_position(tally.first_done as u64);
    }
    bar.finish_and_clear();
    let connect_end = tally.last_first.unwrap_or_else(Instant::now);
    let connect_secs = connect_end.duration_since(start).as_secs_f64();
    let after_connect = measure::sample_all(&pids)?;
    if timed_out {
        let missing = n - tally.first_done - tally.failed;
        eprintln!(
            "{missing} appliances had no session after {:?}",
            args.connect_timeout
        );
        tally.errors.insert("not_connected".into(), missing as u64);
    }
    println!(
        "{} of {n} connected in {connect_secs:.2} s",
        tally.first_done
    );

    // Hold phase (steady).
    let mut hold_secs = None;
    let mut end = after_connect;
    if args.scenario == Scenario::Steady {
        let hold_start = Instant::now();
        let bar = progress.bar(args.duration.as_secs(), "holding the fleet");
        let hold = tokio::time::sleep(args.duration);
        tokio::pin!(hold);
        loop {
            tokio::select! {
                ev = fleet.events.recv() => match ev {
                    Some(ev) => tally.record(ev),
                    None => break,
                },
                _ = tick.tick() => {
                    samples.push(take_sample(start, &tally, &pids, me, before)?);
                    bar.set_position(hold_start.elapsed().as_secs());
                    bar.set_prefix(format!("{} connected", tally.current));
                }
                _ = &mut hold => break,
            }
        }
        bar.finish_and_clear();
        hold_secs = Some(hold_start.elapsed().as_secs_f64());
        end = measure::sample_all(&pids)?;
    }
    // Drain what is queued, so errors up to now count.
    while let Ok(ev) = fleet.events.try_recv() {
        tally.record(ev);
    }
    let me_end = measure::sample(me)?;
    let control_rss = measure::sample(control.pid()).ok().map(|s| s.rss_bytes);
    let udp_drops = UdpCounters::read().since(udp_before);
    udp.drops = udp_drops;
    let connected_at_end = tally.current;

    let left = fleet.stop(FLEET_STOP_GRACE).await;
    if left > 0 {
        eprintln!("{left} agents did not stop within {FLEET_STOP_GRACE:?}");
    }
    for e in &endpoints.endpoints {
        e.close(0u32.into(), b"done");
    }

    if udp_drops.rcvbuf_errors > 0 {
        eprintln!(
            "warning: the kernel dropped {} UDP datagrams for full receive buffers during the \
             run; the brokers' sockets got {:?} bytes (net.core.rmem_max = {:?}). Raise it: \
             sysctl -w net.core.rmem_max={WANTED_UDP_BUFFER}",
            udp_drops.rcvbuf_errors, udp.broker_recv_buffer_bytes, limits.rmem_max
        );
    }

    let connected = tally.first_done;
    let rss = end.rss_bytes;
    let per_conn = (connected_at_end > 0)
        .then(|| round3(rss.saturating_sub(before.rss_bytes) as f64 / connected_at_end as f64));
    Ok(Report {
        scenario: args.scenario.as_str(),
        appliances: n,
        brokers: brokers.len(),
        handshakes_per_sec: (connected > 0 && connect_secs > 0.0)
            .then(|| round3(connected as f64 / connect_secs)),
        connect_p50_ms: tally.quantile_ms(0.5),
        connect_p99_ms: tally.quantile_ms(0.99),
        broker_rss_bytes: Some(rss),
        broker_bytes_per_conn: per_conn,
        broker_cpu_seconds: Some(round3(end.cpu_seconds - before.cpu_seconds)),
        command_rtt_p50_ms: None,
        command_rtt_p99_ms: None,
        revoke_to_close_p50_ms: None,
        revoke_to_close_p99_ms: None,
        revoked_reconnects_accepted: None,
        errors: tally.errors.clone(),
        machine,
        detail: Detail {
            version: env!("CARGO_PKG_VERSION"),
            started_at,
            concurrency: args.effective_concurrency(),
            hold_secs: hold_secs.map(round3),
            connected,
            connected_at_end,
            connect_secs: Some(round3(connect_secs)),
            connect_p90_ms: tally.quantile_ms(0.9),
            connect_max_ms: (!tally.connect.is_empty()).then(|| ms(tally.connect.max())),
            reconnects: tally.reconnects,
            broker_rss_before_bytes: Some(before.rss_bytes),
            broker_rss_after_connect_bytes: Some(after_connect.rss_bytes),
            broker_cpu_per_handshake_us: (connected > 0).then(|| {
                round3((after_connect.cpu_seconds - before.cpu_seconds) * 1e6 / connected as f64)
            }),
            broker_hold_cpu_percent: hold_secs.map(|h| {
                round3((end.cpu_seconds - after_connect.cpu_seconds) / h.max(1e-9) * 100.0)
            }),
            control_rss_bytes: control_rss,
            simulator_rss_bytes: Some(me_end.rss_bytes),
            simulator_cpu_seconds: Some(round3(me_end.cpu_seconds - me_before.cpu_seconds)),
            enrolled_this_run,
            enroll_secs: round3(enroll_secs),
            udp,
            limits,
            samples,
        },
        baseline: None,
        ratios: None,
    })
}

fn take_sample(
    start: Instant,
    tally: &Tally,
    pids: &[u32],
    me: u32,
    before: ProcSample,
) -> anyhow::Result<Sample> {
    let b = measure::sample_all(pids).context("a broker is gone")?;
    let s = measure::sample(me)?;
    Ok(Sample {
        t: round3(start.elapsed().as_secs_f64()),
        connected: tally.current,
        broker_rss_bytes: b.rss_bytes,
        broker_cpu_seconds: round3(b.cpu_seconds - before.cpu_seconds),
        simulator_rss_bytes: s.rss_bytes,
    })
}
