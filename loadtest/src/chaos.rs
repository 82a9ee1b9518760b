//! `chaos`: control, several brokers and the fleet under a schedule of faults drawn from
//! `--seed`, with the normal work going on (commands, revocations, disables and enables,
//! churn), and the invariants that must hold whatever the faults: checked while the run
//! goes and at its end, each reported with its evidence.
//!
//! The faults ([`FaultKind`]): SIGKILL and restart of a broker, SIGTERM drain and
//! restart of a broker, SIGKILL and restart of control, a partition between a broker and
//! control (a [`FaultProxy`] on the broker's channel), and a full disk under a broker's
//! data directory (a tmpfs mounted for the run; only where this process may mount one).
//! [`schedule`] draws them from the seed alone: the same seed, duration, broker count and
//! available kinds give the same schedule. Faults overlap (a broker dies while another
//! is partitioned, control restarts meanwhile), but one broker is always left untouched so
//! the fleet has somewhere to be.
//!
//! `--control-replicas N` (N ≥ 2): control is N replicas on one PostgreSQL database
//! ([`start_replicas`]: the pool's SQLite store, enrolled against as with one control,
//! copied into a fresh database of a server of the run's own, [`PgServer`]).
//! `control_kill` then kills one replica (one is always left untouched), and
//! `pg_restart` crashes PostgreSQL and starts it again. Each replica advertises a
//! [`FaultProxy`] in front of it, so a partition cuts the broker from every replica. The work goes to a replica drawn
//! from the seed; an answer 503 (the database down) is refused work, counted, never an
//! acknowledgement.
//!
//! The invariants ([`Invariants`]):
//! - `revocation_closes_sessions`: a revoked or disabled appliance's session closes
//!   within [`CLOSE_BOUND`] of control acknowledging it, counted from when its broker could
//!   hear control again (a partitioned broker enforces its last allowlist until it heals;
//!   that wait is reported apart);
//! - `revoked_never_admitted_again`: no session for it after that bound, and a fresh
//!   connection with each revoked or still-disabled certificate at the end is refused;
//! - `changes_in_force_on_every_broker`: at the end every broker applies control's
//!   allowlist version, as every replica reads it from the store, and no control life
//!   logged a broker whose digest for a version differed from the store's;
//! - `audit_log_verifies`: `tether audit verify` passes on control's export (the first
//!   replica's);
//! - `commands_end_exactly_once`: every command has exactly one final line, and none is
//!   reported as succeeded without its output (the command echoes a nonce);
//! - `fleet_reconnects_after_faults`: every appliance neither revoked nor disabled has a
//!   session again within [`RECONNECT_BOUND`] of the last fault ending;
//! - `memory_bounded`: no process's memory keeps growing over the run;
//! - `no_unexpected_exit`: no process exits but those the schedule killed, and each
//!   stops cleanly on SIGTERM at the end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tether_agent::Credentials;
use tokio::task::JoinSet;

use crate::cli::RunArgs;
use crate::faultproxy::FaultProxy;
use crate::fleet::{Fleet, FleetEvent, FleetOptions};
use crate::measure::{self, Machine};
use crate::ops::{Api, EchoOutcome};
use crate::pgserver::PgServer;
use crate::pool::{self, Pool};
use crate::progress::Progress;
use crate::report::{round3, Detail, Limits, Report, Sample, UdpReport};
use crate::scenario::{self, Tally};
use crate::spawn::{self, ChildGuard};

/// Brokers `chaos` starts unless `--brokers` says otherwise.
pub const DEFAULT_BROKERS: usize = 3;
/// A revocation or disable must close the appliance's session within this of control's
/// acknowledgement, once the appliance's broker can hear control.
pub const CLOSE_BOUND: Duration = Duration::from_secs(5);
/// Every appliance neither revoked nor disabled must have a session again within this of
/// the last fault ending.
pub const RECONNECT_BOUND: Duration = Duration::from_secs(60);
/// How long the brokers may take to apply control's allowlist version at the end.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the run checks its processes and deadlines.
const TICK: Duration = Duration::from_millis(200);
/// How often memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// A process's memory at the end may exceed its level in the middle of the run by this
/// factor, or by [`MEMORY_SLACK`], before it counts as growing.
const MEMORY_GROWTH: f64 = 1.5;
/// See [`MEMORY_GROWTH`].
const MEMORY_SLACK: u64 = 32 * 1024 * 1024;
/// A broker's allowance per session it holds beyond those it held in the middle of its
/// life: sessions move between brokers as others are killed and drained (a broker of a
/// fleet of 1,000 on three holds about 333 and then all of them), and each costs its
/// QUIC or TLS state (about 35–40 KB measured) and its share of the handshake's buffers.
const MEMORY_PER_SESSION: u64 = 64 * 1024;
/// Commands' deadline, ms.
const COMMAND_TIMEOUT_MS: u64 = 5000;
/// Agents of the run reconnect after at most this (their default cap is 30 s: the
/// reconnect bound is about the system, not about the agents' patience).
const AGENT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A refused (revoked, disabled) agent tries again after this, so an enabled one is back
/// soon.
const AGENT_REVOKED_BACKOFF: Duration = Duration::from_secs(2);
/// The brokers' GoAway jitter when drained.
const DRAIN_JITTER: Duration = Duration::from_secs(2);
/// Size of each broker's tmpfs beyond the allowlist snapshot's.
const DISK_BASE: u64 = 16 * 1024 * 1024;

/// The agent executable.
const AGENT_BIN: &str = "tether-agent";
/// Real agent processes `chaos` runs beside the simulated fleet (for
/// [`FaultKind::AgentCrashMidWrite`]).
const REAL_AGENTS: usize = 2;
/// The agent's crash point armed by [`FaultKind::AgentCrashMidWrite`]
/// (`agent/src/fault.rs`).
const AGENT_FAULT: (&str, &str) = ("TETHER_AGENT_FAULT", "crash_at:credential_key_written");
/// What the agent prints when it aborts there.
const AGENT_FAULT_SAYS: &str = "crash_at:credential_key_written: aborting";

/// A fault the schedule can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL a broker; start it again after the hold.
    BrokerKill,
    /// SIGTERM a broker (it drains: GoAway, sessions leave); start it again after it
    /// exited and the hold passed.
    BrokerDrain,
    /// SIGKILL control; start it again after the hold.
    ControlKill,
    /// Black-hole a broker's channel to control for the hold.
    Partition,
    /// Fill a broker's data directory's file system for the hold.
    DiskFull,
    /// Restart a real `tether-agent` process armed to abort between writing a renewed
    /// key and its certificate, and ask control to renew it; start it again unarmed after
    /// the hold.
    AgentCrashMidWrite,
    /// Crash the run's PostgreSQL (`pg_ctl stop -m immediate`) under control replicas;
    /// start it again after the hold (crash recovery, same port).
    PgRestart,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::BrokerKill,
        FaultKind::BrokerDrain,
        FaultKind::ControlKill,
        FaultKind::Partition,
        FaultKind::DiskFull,
        FaultKind::AgentCrashMidWrite,
        // Last, so a run without it (one control on SQLite) draws the schedule it drew
        // before it existed.
        FaultKind::PgRestart,
    ];

    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::BrokerKill => "broker_kill",
            FaultKind::BrokerDrain => "broker_drain",
            FaultKind::ControlKill => "control_kill",
            FaultKind::Partition => "partition",
            FaultKind::DiskFull => "disk_full",
            FaultKind::AgentCrashMidWrite => "agent_crash_mid_write",
            FaultKind::PgRestart => "pg_restart",
        }
    }

    /// Range of the hold, ms.
    fn hold_ms(self) -> std::ops::RangeInclusive<u64> {
        match self {
            FaultKind::BrokerKill => 500..=4000,
            FaultKind::BrokerDrain => 500..=3000,
            FaultKind::ControlKill => 300..=3000,
            FaultKind::Partition => 1000..=8000,
            FaultKind::DiskFull => 2000..=10_000,
            FaultKind::AgentCrashMidWrite => 5000..=10_000,
            FaultKind::PgRestart => 1000..=5000,
        }
    }

    /// Whether it acts on a broker.
    fn on_broker(self) -> bool {
        matches!(
            self,
            FaultKind::BrokerKill
                | FaultKind::BrokerDrain
                | FaultKind::Partition
                | FaultKind::DiskFull
        )
    }
}

/// One fault of the schedule, and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// When it starts, ms from the start of the work.
    pub at_ms: u64,
    /// Broker name, `control` (one control), `control-K` (replica K), the real agent's
    /// id, or `postgres`.
    pub target: String,
    /// How long it lasts, ms.
    pub hold_ms: u64,
    /// What happened (e.g. how long the restart took), filled in as it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// The faults `seed` draws for a run of `duration` over `brokers` brokers, `agents` real
/// agent processes and `replicas` control replicas from `kinds`: a fault starts every
/// 3–9 s from 5 % to 80 % of the run; a broker, control (each replica), each agent and
/// PostgreSQL take one fault at a time (and 3 s more to come back), one broker is always
/// free of faults, and so is one replica when there are several (with one, `control_kill`
/// kills it).
pub fn schedule(
    seed: u64,
    duration: Duration,
    brokers: usize,
    agents: usize,
    replicas: usize,
    kinds: &[FaultKind],
) -> Vec<Fault> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = duration.as_millis() as u64;
    let mut t = (total / 20).max(2000);
    let end = total * 4 / 5;
    let mut busy_until = vec![0u64; brokers];
    let mut control_busy_until = 0u64;
    let mut replica_busy_until = vec![0u64; replicas];
    let mut pg_busy_until = 0u64;
    let mut agent_busy_until = vec![0u64; agents];
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    while t < end {
        let kind = kinds[rng.usize(..kinds.len())];
        let hold = rng.u64(kind.hold_ms());
        let settle = hold + 3000;
        if kind.on_broker() {
            let free: Vec<usize> = (0..brokers).filter(|&b| busy_until[b] <= t).collect();
            // Leave one broker untouched.
            if free.len() >= 2 {
                let b = free[rng.usize(..free.len())];
                busy_until[b] = t + settle;
                out.push(Fault {
                    kind,
                    at_ms: t,
                    target: pool::broker_name(b + 1),
                    hold_ms: hold,
                    outcome: None,
                });
            }
        } else if kind == FaultKind::AgentCrashMidWrite {
            let free: Vec<usize> = (0..agents).filter(|&a| agent_busy_until[a] <= t).collect();
            if !free.is_empty() {
                let a = free[rng.usize(..free.len())];
                agent_busy_until[a] = t + settle;
                out.push(Fault {
                    kind,
                    at_ms: t,
                    target: agent_id(a + 1),
                    hold_ms: hold,
                    outcome: None,
                });
            }
        } else if kind == FaultKind::PgRestart {
            if pg_busy_until <= t {
                pg_busy_until = t + settle;
                out.push(Fault {
                    kind,
                    at_ms: t,
                    target: PG_TARGET.into(),
                    hold_ms: hold,
                    outcome: None,
                });
            }
        } else if replicas > 1 {
            let free: Vec<usize> = (0..replicas)
                .filter(|&r| replica_busy_until[r] <= t)
                .collect();
            // Leave one replica untouched.
            if free.len() >= 2 {
                let r = free[rng.usize(..free.len())];
                replica_busy_until[r] = t + settle;
                out.push(Fault {
                    kind,
                    at_ms: t,
                    target: replica_name(r + 1),
                    hold_ms: hold,
                    outcome: None,
                });
            }
        } else if control_busy_until <= t {
            control_busy_until = t + settle;
            out.push(Fault {
                kind,
                at_ms: t,
                target: "control".into(),
                hold_ms: hold,
                outcome: None,
            });
        }
        t += rng.u64(3000..=9000);
    }
    out
}

/// The target of [`FaultKind::PgRestart`].
pub const PG_TARGET: &str = "postgres";

/// The name of control replica `k` (1-based) in faults, windows, logs and memory.
pub fn replica_name(k: usize) -> String {
    format!("control-{k}")
}

/// The id of real agent process `k` (1-based).
pub fn agent_id(k: usize) -> String {
    format!("chaos-agent-{k}")
}

/// One invariant's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Invariant {
    /// Its name.
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// The evidence: what was measured or what broke.
    pub detail: String,
}

/// What `chaos` adds to the report besides `faults` and `invariants`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChaosDetail {
    /// `--seed`.
    pub seed: u64,
    /// Control processes serving at once (`--control-replicas`).
    pub control_replicas: usize,
    /// Their store: `sqlite`, or `postgresql` (replicas).
    pub store: &'static str,
    /// Requests of the work (commands, revokes, disables, enables) a replica answered 503
    /// (`database_unavailable` while PostgreSQL was down, or no channel to the
    /// appliance's broker yet): refused cleanly, not acknowledged, counted here.
    pub answered_503: u64,
    /// Faults injected, by kind.
    pub faults_by_kind: BTreeMap<&'static str, usize>,
    /// Kinds left out of the schedule, and why.
    pub unavailable: BTreeMap<&'static str, String>,
    /// Revocations and disables control acknowledged.
    pub revocations: usize,
    /// Disables of them (each enabled again later).
    pub disables: usize,
    /// Commands sent, by outcome (`ok`, or the failure's name).
    pub commands: BTreeMap<String, u64>,
    /// Revokes, disables and enables control did not acknowledge, by action and error.
    pub actions_failed: BTreeMap<String, u64>,
    /// Appliances kicked (a clean close and a rejoin, as a reboot).
    pub churned: u64,
    /// Worst revocation → session closed, ms (from control's acknowledgement).
    pub worst_revoke_to_close_ms: Option<f64>,
    /// Worst of the same counted from when the broker could hear control again, ms.
    pub worst_revoke_to_close_reachable_ms: Option<f64>,
    /// From the last fault ending to every appliance that should be connected being
    /// connected, ms.
    pub reconnect_after_last_fault_ms: Option<f64>,
    /// Each process life's memory, first and last reading and the peak, bytes.
    pub memory: BTreeMap<String, MemoryTrace>,
    /// Longest an appliance was without a session after losing it to a fault (its
    /// broker killed, drained or its connection lost), until it had one again, ms.
    pub longest_outage_ms: Option<f64>,
    /// Longest a broker's channel to control was down (not connected, or its allowlist
    /// stale) as its metrics showed, faults included, ms.
    pub longest_channel_outage_ms: Option<f64>,
    /// The agents' backoff settings in this run, ms.
    pub agent_backoff_max_ms: u64,
}

/// One process life's memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryTrace {
    /// Readings taken.
    pub samples: usize,
    /// First reading, bytes.
    pub first: u64,
    /// Median of the middle third, bytes.
    pub middle: u64,
    /// Last reading, bytes.
    pub last: u64,
    /// Highest reading, bytes.
    pub peak: u64,
}

/// A tmpfs mounted for a broker's data directory, unmounted when dropped.
#[derive(Debug)]
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// Fill it up; the filler file's path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("chaos-filler");
        if let Ok(mut f) = std::fs::File::create(&path) {
            let chunk = vec![0u8; 1 << 20];
            while f.write_all(&chunk).is_ok() {}
            // The last partial page.
            while f.write_all(&chunk[..4096]).is_ok() {}
            let _ = f.sync_all();
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// A broker of the run.
struct ChaosBroker {
    name: String,
    data_dir: PathBuf,
    /// Where it keeps its credential between runs.
    pool_dir: PathBuf,
    quic: SocketAddr,
    admin: SocketAddr,
    proxy: FaultProxy,
    guard: Option<ChildGuard>,
    disk: Option<Tmpfs>,
    /// Starts so far (its lives).
    lives: u32,
    /// Down on purpose (killed or drained, not started again yet).
    down: bool,
    /// Partitioned from control (every replica) now.
    partitioned: bool,
    /// When its sessions last all ended with its process: SIGKILLed, or started again
    /// after a drain. A session that came up before then is gone, whatever its agent
    /// believes until its next packet meets the new process's stateless reset.
    wiped: Option<Instant>,
}

impl ChaosBroker {
    fn life(&self) -> String {
        format!("{}#{}", self.name, self.lives)
    }
}

/// A real `tether-agent run` process with its own state directory.
struct RealAgent {
    id: String,
    bin: PathBuf,
    args: Vec<String>,
    guard: Option<ChildGuard>,
    lives: u32,
    /// Killed or armed to crash on purpose.
    down: bool,
    /// Times it aborted between writing a renewed key and its certificate.
    crashes: u32,
    /// Times it was armed but did not reach the crash point within the hold.
    missed: u32,
}

impl RealAgent {
    /// Register `id` (tenant `loadtest`), enroll it with a one-time token into a fresh
    /// state directory under `run_dir`, and start it on every broker.
    #[allow(clippy::too_many_arguments)]
    async fn enroll(
        id: &str,
        args: &RunArgs,
        api: &Api,
        control_url: &str,
        ca: &Path,
        brokers: &[ChaosBroker],
        bins: &Path,
        run_dir: &Path,
    ) -> anyhow::Result<RealAgent> {
        api.register(id, pool::TENANT).await?;
        let token = api.token(id).await?;
        let state_dir = run_dir.join("agents").join(id);
        let bin = bins.join(AGENT_BIN);
        let mut enroll = tokio::process::Command::new(&bin);
        enroll
            .args([
                "enroll",
                "--control",
                control_url,
                "--id",
                id,
                "--proof",
                "token",
            ])
            .arg("--ca")
            .arg(ca)
            .arg("--token")
            .arg(&token)
            .arg("--state-dir")
            .arg(&state_dir);
        run_tool(enroll, "tether-agent enroll").await?;
        let mut run_args: Vec<String> = vec![
            "run".into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--transport".into(),
            args.transport.as_str().into(),
            "--backoff-max".into(),
            humantime::format_duration(AGENT_BACKOFF_MAX).to_string(),
            "--revoked-backoff".into(),
            humantime::format_duration(AGENT_REVOKED_BACKOFF).to_string(),
        ];
        for b in brokers {
            run_args.push("--broker".into());
            run_args.push(b.quic.to_string());
        }
        let mut a = RealAgent {
            id: id.to_owned(),
            bin,
            args: run_args,
            guard: None,
            lives: 0,
            down: false,
            crashes: 0,
            missed: 0,
        };
        a.start(run_dir, false).await?;
        Ok(a)
    }

    /// Start it (again), armed to crash mid-write or not.
    async fn start(&mut self, run_dir: &Path, armed: bool) -> anyhow::Result<()> {
        let env: &[(&str, &str)] = if armed { &[AGENT_FAULT] } else { &[] };
        let (guard, _) = ChildGuard::spawn_env(
            &self.id,
            &self.bin,
            &self.args,
            env,
            run_dir.join(format!("{}.log", self.id)),
            "credentials loaded",
        )
        .await?;
        self.guard = Some(guard);
        self.lives += 1;
        Ok(())
    }

    /// How many times its log says it aborted at the crash point.
    fn aborts_logged(&self, run_dir: &Path) -> u32 {
        std::fs::read_to_string(run_dir.join(format!("{}.log", self.id)))
            .map(|t| t.matches(AGENT_FAULT_SAYS).count() as u32)
            .unwrap_or(0)
    }
}

/// `--control-replicas N`: stop `sqlite` (the pool's control, enrolled against), copy its
/// store into PostgreSQL (`tether-control store copy`: a server of the run's own, or
/// `--pg-url`'s empty database), and start N replicas on it, each on a copy of the data
/// directory (same CA, its own `replica.id`) whose control.toml names the database. The
/// first listens where `sqlite` did, so the brokers' proxies lead to it; the brokers learn
/// the others from it. Returns the replicas and the server, if it is the run's own.
async fn start_replicas(
    args: &RunArgs,
    mut sqlite: ChaosControl,
    brokers: &[ChaosBroker],
    pool: &Pool,
    bins: &Path,
    run_dir: &Path,
) -> anyhow::Result<(Vec<ChaosControl>, Option<PgServer>)> {
    if let Some(g) = sqlite.guard.take() {
        if !g.stop(spawn::STOP_GRACE).await {
            bail!("control on SQLite did not stop on SIGTERM before the store copy");
        }
    }
    let (url, server) = match &args.pg_url {
        Some(url) => (url.clone(), None),
        None => {
            // PostgreSQL runs as the `postgres` user when we are root: it must be able to
            // reach its directory inside the run's.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o711))?;
            let started = Instant::now();
            let server = PgServer::start(&run_dir.join("postgres")).await?;
            println!(
                "PostgreSQL of the run: {} (started in {} ms)",
                server.url(),
                started.elapsed().as_millis()
            );
            (server.url().to_owned(), Some(server))
        }
    };
    let mut copy = tokio::process::Command::new(bins.join(spawn::CONTROL_BIN));
    copy.args(["store", "copy", "--from"])
        .arg(format!("sqlite:{}", pool.control_dir().display()))
        .arg("--to")
        .arg(&url);
    run_tool(copy, "tether-control store copy").await?;
    // From now on the brokers follow another history than the pool's store.
    for b in brokers {
        std::fs::write(b.pool_dir.join(FOLLOWED_POSTGRES), b"")?;
    }
    let mut controls = Vec::with_capacity(args.control_replicas);
    for k in 1..=args.control_replicas {
        let name = replica_name(k);
        let data_dir = run_dir.join(&name);
        copy_replica_dir(&pool.control_dir(), &data_dir)?;
        // Concrete ports, kept across restarts.
        let listen = if k == 1 { sqlite.listen } else { free_port()? };
        // The brokers reach the replica at the address it advertises: a proxy that can cut
        // a partitioned broker's connections.
        let advertised = FaultProxy::start(listen).await?;
        let toml_path = data_dir.join("control.toml");
        let toml = std::fs::read_to_string(&toml_path)
            .with_context(|| format!("reading {}", toml_path.display()))?;
        // A top-level key, so before the first table.
        let mut toml = format!("database_url = {}\n{toml}", serde_json::to_string(&url)?);
        let advertise = format!(
            "advertise = {}",
            serde_json::to_string(&advertised.addr().to_string())?
        );
        if toml.contains("\n[replica]\n") {
            toml = toml.replace("\n[replica]\n", &format!("\n[replica]\n{advertise}\n"));
        } else {
            toml.push_str(&format!("\n[replica]\n{advertise}\n"));
        }
        std::fs::write(&toml_path, toml)?;
        let mut c = ChaosControl {
            name,
            data_dir,
            listen,
            metrics: free_port()?,
            database_url: Some(url.clone()),
            advertised: Some(advertised),
            guard: None,
            lives: 0,
            down: false,
        };
        c.start(bins, run_dir).await?;
        println!("{}: {} on PostgreSQL", c.name, c.url());
        controls.push(c);
    }
    Ok((controls, server))
}

/// Copy control's data directory for a replica: not its SQLite store, not its
/// `replica.id` (each replica makes its own at first start).
fn copy_replica_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("control.db") || name == "replica.id" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Wait until broker `name` holds a channel to each of `replicas` replicas and applies
/// the fleet's allowlist again (after control moved to PostgreSQL).
async fn wait_replica_channels(
    name: &str,
    admin: SocketAddr,
    n: usize,
    replicas: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let text = scenario::wait_synced_at(name, admin, n).await?;
        let channels = spawn::metric(&text, "tether_broker_control_channels").unwrap_or(0.0);
        if channels >= replicas as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "broker {name} holds channels to {channels} control replicas of {replicas} after {CONVERGE_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Start [`FaultKind::AgentCrashMidWrite`]: restart the agent armed, and ask control to
/// have it renew now.
async fn agent_begin(
    f: &Fault,
    agents: &mut [RealAgent],
    api: &Api,
    run_dir: &Path,
) -> anyhow::Result<Option<String>> {
    let a = agents
        .iter_mut()
        .find(|a| a.id == f.target)
        .context("no such agent")?;
    a.down = true;
    if let Some(mut g) = a.guard.take() {
        g.kill().await;
    }
    a.start(run_dir, true).await?;
    match api.set_status(&a.id, "renew").await {
        Ok(()) => Ok(None),
        Err(e) => Ok(Some(format!("renewal request refused ({e})"))),
    }
}

/// End [`FaultKind::AgentCrashMidWrite`]: see whether it crashed there, then start it
/// unarmed on whatever its state directory holds.
async fn agent_end(
    f: &Fault,
    agents: &mut [RealAgent],
    run_dir: &Path,
) -> anyhow::Result<Option<String>> {
    let a = agents
        .iter_mut()
        .find(|a| a.id == f.target)
        .context("no such agent")?;
    let exited = a.guard.as_mut().and_then(|g| g.exited());
    let aborted = a.aborts_logged(run_dir);
    let what = if exited.is_some() && aborted > a.crashes {
        a.crashes = aborted;
        "crashed between writing the renewed key and its certificate".to_owned()
    } else {
        a.missed += 1;
        if let Some(mut g) = a.guard.take() {
            g.kill().await;
        }
        format!(
            "did not reach the crash point within the hold ({})",
            exited.map_or_else(
                || "still running: renewal not done".to_owned(),
                |s| s.to_string()
            )
        )
    };
    let started = Instant::now();
    a.start(run_dir, false).await?;
    a.down = false;
    Ok(Some(format!(
        "{what}; started again in {} ms",
        started.elapsed().as_millis()
    )))
}

/// Whether each real agent has a session again (control sees it connected), waiting up
/// to `deadline`.
async fn agents_connected(api: &Api, agents: &[RealAgent], deadline: Instant) -> Invariant {
    let mut last = Vec::new();
    loop {
        last.clear();
        for a in agents {
            let connected = match api.appliance(&a.id).await {
                Ok(d) => d.connection.is_some(),
                Err(_) => false,
            };
            if !connected {
                last.push(a.id.clone());
            }
        }
        if last.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let crashes: u32 = agents.iter().map(|a| a.crashes).sum();
    let missed: u32 = agents.iter().map(|a| a.missed).sum();
    Invariant {
        name: "agent_credentials_survive_crash",
        ok: last.is_empty(),
        detail: if agents.is_empty() {
            "no real agent in this run".into()
        } else if last.is_empty() {
            format!(
                "{} real agents aborted {crashes} times between writing a renewed key and its certificate ({missed} armed runs did not get there within the hold); each connected again on what it had stored",
                agents.len()
            )
        } else {
            format!(
                "without a session at the end: {} ({crashes} crashes mid-write)",
                last.join(", ")
            )
        },
    }
}

/// Control in the run: the one control on SQLite, or one replica on PostgreSQL.
struct ChaosControl {
    /// `control`, or `control-K` for replica K: its fault target, window and log name.
    name: String,
    data_dir: PathBuf,
    listen: SocketAddr,
    /// Its metrics listener (kept across restarts).
    metrics: SocketAddr,
    /// The PostgreSQL URL of a replica (also in its control.toml).
    database_url: Option<String>,
    /// A replica's proxy for every broker, the address it advertises (brokers dial it
    /// besides the one their own proxy leads to): a partition cuts a broker's connections
    /// through it too.
    advertised: Option<FaultProxy>,
    guard: Option<ChildGuard>,
    lives: u32,
    down: bool,
}

impl ChaosControl {
    fn life(&self) -> String {
        format!("{}#{}", self.name, self.lives)
    }

    fn log(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(format!("{}.log", self.name))
    }

    fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// Start it on its addresses (a first start on port 0 learns its API port).
    async fn start(&mut self, bins: &Path, run_dir: &Path) -> anyhow::Result<()> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen".into(),
            self.listen.to_string(),
            "--metrics-listen".into(),
            self.metrics.to_string(),
            "--log-format".into(),
            "json".into(),
        ];
        if let Some(url) = &self.database_url {
            args.extend(["--database-url".into(), url.clone()]);
        }
        let (guard, line) = ChildGuard::spawn(
            &self.name,
            &bins.join(spawn::CONTROL_BIN),
            &args,
            self.log(run_dir),
            "control API listening",
        )
        .await?;
        self.listen = spawn::addr_field(&line, "listen")?;
        self.guard = Some(guard);
        self.lives += 1;
        self.down = false;
        Ok(())
    }
}

/// Marks a broker's pool directory whose allowlist snapshot comes from a run's PostgreSQL
/// store, whose history (versions and their digests) the pool's SQLite store never had.
const FOLLOWED_POSTGRES: &str = "chaos-followed-postgresql";

/// A broker that followed a run's PostgreSQL store starts the next run without its
/// allowlist snapshot and revocation journal: the pool's SQLite store, which it follows
/// next, numbers other changes with the same versions. (Kept, the snapshot makes the
/// broker say version V in its `Hello` without a digest, the snapshot file having none;
/// control used to send it the deltas after V of its own history, a wrong allowlist the
/// broker called in sync, and now sends a snapshot: README, chaos.)
fn forget_foreign_history(pool_dir: &Path) -> anyhow::Result<()> {
    let mark = pool_dir.join(FOLLOWED_POSTGRES);
    if mark.exists() {
        for f in [
            tether_broker::datadir::SNAPSHOT_FILE,
            tether_broker::datadir::REVOKED_JOURNAL_FILE,
        ] {
            match std::fs::remove_file(pool_dir.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {f}")),
            }
        }
        std::fs::remove_file(&mark)?;
    }
    Ok(())
}

/// A free loopback port (bound and let go: the child binds it a moment later).
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// A stretch of time during which a target could not hear control (or was down).
#[derive(Clone, Debug)]
struct Window {
    target: String,
    from: Instant,
    to: Option<Instant>,
}

/// What the fleet's appliances are, as far as the run's actions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Active,
    /// Disable sent, not acknowledged yet (or refused).
    Disabling,
    /// Disabled since (acknowledged).
    Disabled(Instant),
    /// Enable sent (disabled since).
    Enabling(Instant),
    /// Revoke sent.
    Revoking,
    /// Revoked since.
    Revoked(Instant),
}

impl Standing {
    /// Acknowledged out of the allowlist since.
    fn out_since(self) -> Option<Instant> {
        match self {
            Standing::Disabled(t) | Standing::Revoked(t) => Some(t),
            _ => None,
        }
    }

    /// Whether it should have a session once the faults are over.
    fn should_connect(self) -> bool {
        matches!(self, Standing::Active)
    }
}

/// Answers of the work sent to control.
enum Done {
    Command {
        index: usize,
        /// The control (replica) that relayed it.
        via: String,
        sent: Instant,
        outcome: EchoOutcome,
    },
    Status {
        index: usize,
        action: &'static str,
        result: Result<(), String>,
    },
}

/// The invariants' evidence as it accumulates.
#[derive(Default)]
struct Invariants {
    close_violations: Vec<String>,
    admitted_again: Vec<String>,
    /// Sessions of revoked or disabled appliances admitted by a broker that could not
    /// hear control yet.
    stale_admissions: usize,
    worst_close: Option<Duration>,
    worst_close_reachable: Option<Duration>,
    closes: usize,
    command_violations: Vec<String>,
    unexpected_exits: Vec<String>,
    /// Appliances whose overdue session was reported already.
    overdue_reported: HashSet<usize>,
    /// Since when each appliance lost its session (a fault or a disconnection, not a
    /// kick or its own revocation).
    down_since: Vec<Option<Instant>>,
    /// Longest time an appliance was without a session that way.
    longest_outage: Option<Duration>,
}

/// Run `chaos` on a pool whose appliances and operator are ready.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    args: &RunArgs,
    pool: &Pool,
    prepared: &pool::Prepared,
    creds: &mut [Option<Credentials>],
    bins: &Path,
    run_dir: &Path,
    progress: &Progress,
    machine: Machine,
    limits: Limits,
) -> anyhow::Result<Report> {
    let n = creds.len();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    println!("chaos seed: {seed} (give --seed {seed} to run the same schedule again)");
    let tether_bin = bins.join("tether");
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();

    let replicas = args.control_replicas;
    if replicas < 2 && args.pg_url.is_some() {
        bail!("--pg-url is for --control-replicas 2 or more (one control runs on SQLite)");
    }
    // Control first, on a port it keeps across restarts; on the pool's SQLite store,
    // which knows the pool's appliances and brokers, also when replicas take over from
    // it once the pool is enrolled and the brokers have their credentials.
    let mut control = ChaosControl {
        name: "control".into(),
        data_dir: pool.control_dir(),
        listen: "127.0.0.1:0".parse().expect("an address"),
        metrics: free_port()?,
        database_url: None,
        advertised: None,
        guard: None,
        lives: 0,
        down: false,
    };
    control.start(bins, run_dir).await?;
    let control_url = control.url();
    let listen = control.listen;
    println!("control: {control_url}");
    let enroll_started = Instant::now();
    prepared
        .enroll(pool, &control_url, args.enroll_concurrency, progress)
        .await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    let enrolled_this_run = prepared.tokens.len();
    let creds = prepared.fill(pool, creds)?;
    let operator = prepared.operator(pool, &control_url).await?;

    // Brokers, each with its channel to control through a fault proxy and, where a
    // tmpfs can be mounted, its data directory on one.
    let nb = args.effective_brokers();
    let mut unavailable = BTreeMap::new();
    let mut brokers = Vec::with_capacity(nb);
    let disk_bytes = DISK_BASE + n as u64 * 512;
    for b in 1..=nb {
        let name = pool::broker_name(b);
        let proxy = FaultProxy::start(listen).await?;
        let proxied = format!("https://{}", proxy.addr());
        let bundle = prepared.broker_start(pool, &name, &proxied, run_dir)?;
        let pool_dir = pool.broker_dir(&name);
        forget_foreign_history(&pool_dir)?;
        let (data_dir, disk) = match Tmpfs::mount(&run_dir.join("disk").join(&name), disk_bytes) {
            Ok(t) => {
                copy_dir(&pool_dir, &t.dir)?;
                (t.dir.clone(), Some(t))
            }
            Err(e) => {
                unavailable
                    .entry(FaultKind::DiskFull.as_str())
                    .or_insert_with(|| format!("{e:#} (mounting a tmpfs needs root)"));
                (pool_dir.clone(), None)
            }
        };
        // The replicas an earlier run listed are gone: this run's control tells it its own.
        let _ = std::fs::remove_file(data_dir.join(tether_broker::replicas::REPLICAS_FILE));
        let (guard, quic, admin) = scenario::spawn_broker(
            args,
            &name,
            &data_dir,
            bundle.as_deref(),
            None,
            bins,
            run_dir,
            DRAIN_JITTER,
        )
        .await?;
        brokers.push(ChaosBroker {
            name,
            data_dir,
            pool_dir,
            quic,
            admin,
            proxy,
            guard: Some(guard),
            disk,
            lives: 1,
            down: false,
            partitioned: false,
            wiped: None,
        });
    }
    for b in &brokers {
        scenario::wait_synced_at(&b.name, b.admin, n).await?;
    }

    // Replicas: the SQLite store copied into PostgreSQL, control started again there on
    // its address (the brokers' proxies lead to it) and the other replicas beside it.
    let (mut controls, pg) = if replicas >= 2 {
        let (controls, pg) = start_replicas(args, control, &brokers, pool, bins, run_dir).await?;
        for b in &brokers {
            wait_replica_channels(&b.name, b.admin, n, replicas).await?;
        }
        (controls, pg)
    } else {
        (vec![control], None)
    };
    if pg.is_none() {
        unavailable.insert(
            FaultKind::PgRestart.as_str(),
            if replicas >= 2 {
                "--pg-url names a server this run did not start: it is not restarted".to_owned()
            } else {
                "one control on SQLite (--control-replicas 1)".to_owned()
            },
        );
    }
    let mut apis = Vec::with_capacity(controls.len());
    for c in &controls {
        apis.push(Api::new(&c.url(), &prepared.root_pem, &operator)?);
    }
    let api = apis[0].clone();

    // Real agent processes with their own state directories, for the crash mid-write.
    let mut agents = Vec::new();
    let agent_bin = bins.join(AGENT_BIN);
    if agent_bin.is_file() {
        let ca = run_dir.join("root.pem");
        std::fs::write(&ca, &prepared.root_pem)?;
        for k in 1..=REAL_AGENTS {
            let a = RealAgent::enroll(
                &agent_id(k),
                args,
                &api,
                &control_url,
                &ca,
                &brokers,
                bins,
                run_dir,
            )
            .await
            .with_context(|| format!("setting up the real agent {}", agent_id(k)))?;
            agents.push(a);
        }
    } else {
        unavailable.insert(
            FaultKind::AgentCrashMidWrite.as_str(),
            format!("{} not found", agent_bin.display()),
        );
    }

    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| !unavailable.contains_key(k.as_str()))
        .collect();
    let mut faults = schedule(seed, args.duration, nb, agents.len(), replicas, &kinds);
    println!(
        "chaos: {} faults over {:?} on {nb} brokers and {} ({} kinds)",
        faults.len(),
        args.duration,
        if replicas > 1 {
            format!("{replicas} control replicas on PostgreSQL")
        } else {
            "control".to_owned()
        },
        kinds.len()
    );

    let outcome = drive(
        args,
        seed,
        pool,
        &apis,
        &creds,
        &mut brokers,
        &mut controls,
        pg.as_ref(),
        &mut agents,
        &mut faults,
        bins,
        run_dir,
        progress,
    )
    .await;

    // Stop everything, the agents first (a broker drains for as long as sessions stay
    // and have nowhere else to go); a process that does not stop on SIGTERM is an
    // invariant broken.
    let mut stop_problems = Vec::new();
    for a in &mut agents {
        if let Some(g) = a.guard.take() {
            if !g.stop(spawn::STOP_GRACE).await {
                stop_problems.push(format!("{}#{} did not stop on SIGTERM", a.id, a.lives));
            }
        }
    }
    for b in &mut brokers {
        if let Some(g) = b.guard.take() {
            // Its drain timeout, and some.
            if !g.stop(DRAIN_JITTER + Duration::from_secs(15)).await {
                stop_problems.push(format!("{} did not stop on SIGTERM", b.life()));
            }
        }
    }
    for c in &mut controls {
        if let Some(g) = c.guard.take() {
            if !g.stop(spawn::STOP_GRACE).await {
                stop_problems.push(format!("{} did not stop on SIGTERM", c.life()));
            }
        }
    }
    // Keep the brokers' credentials (renewed meanwhile, or first enrolled here) in the
    // pool; then unmount their disks.
    for b in &mut brokers {
        if b.disk.is_some() {
            let _ = std::fs::remove_file(b.data_dir.join("chaos-filler"));
            if let Err(e) = copy_dir(&b.data_dir, &b.pool_dir) {
                eprintln!(
                    "warning: keeping {}'s credential in the pool: {e:#}",
                    b.name
                );
            }
        }
        b.disk.take();
    }
    let mut out = outcome?;

    // The audit log, exported by control's own tool and checked by the operator's.
    // From the first replica's data directory (its control.toml names PostgreSQL, still
    // running), else the pool's SQLite store.
    let audit = verify_audit(bins, &tether_bin, &controls[0].data_dir, prepared, run_dir).await;
    drop(pg);
    out.invariants.push(Invariant {
        name: "audit_log_verifies",
        ok: audit.is_ok(),
        detail: audit.unwrap_or_else(|e| format!("{e:#}")),
    });
    if let Some(inv) = out
        .invariants
        .iter_mut()
        .find(|i| i.name == "no_unexpected_exit")
    {
        if !stop_problems.is_empty() {
            inv.ok = false;
            inv.detail = format!("{}; {}", inv.detail, stop_problems.join("; "));
        }
    }

    let mut by_kind = BTreeMap::new();
    for f in &faults {
        *by_kind.entry(f.kind.as_str()).or_insert(0) += 1;
    }
    out.detail.faults_by_kind = by_kind;
    out.detail.unavailable = unavailable;
    out.detail.seed = seed;
    out.detail.control_replicas = controls.len();
    out.detail.store = if controls.len() > 1 {
        "postgresql"
    } else {
        "sqlite"
    };
    out.detail.agent_backoff_max_ms = AGENT_BACKOFF_MAX.as_millis() as u64;

    let mut errors = BTreeMap::new();
    for (k, v) in &out.errors {
        errors.insert(k.clone(), *v);
    }
    Ok(Report {
        scenario: args.scenario.as_str(),
        transport: args.transport,
        appliances: n,
        brokers: nb,
        handshakes_per_sec: None,
        connect_p50_ms: out.tally.quantile_ms(0.5),
        connect_p99_ms: out.tally.quantile_ms(0.99),
        broker_rss_bytes: None,
        broker_bytes_per_conn: None,
        broker_cpu_seconds: None,
        command_rtt_p50_ms: None,
        command_rtt_p99_ms: None,
        revoke_to_close_p50_ms: None,
        revoke_to_close_p99_ms: None,
        revoked_reconnects_accepted: Some(out.reconnects_accepted),
        errors,
        machine: scenario::machine_at_end(machine),
        detail: Detail {
            version: env!("CARGO_PKG_VERSION"),
            started_at,
            concurrency: args.effective_concurrency(),
            baseline_warm_up: false,
            hold_secs: Some(round3(args.duration.as_secs_f64())),
            connected: out.tally.first_done(),
            connected_at_end: out.tally.current,
            reconnects: out.tally.reconnects(),
            enrolled_this_run,
            enroll_secs: round3(enroll_secs),
            udp: UdpReport::default(),
            limits,
            sample_every_ms: Some(SAMPLE_EVERY.as_millis() as f64),
            samples: out.samples,
            faults: Some(faults),
            invariants: Some(out.invariants),
            chaos: Some(out.detail),
            ..Detail::default()
        },
        baseline: None,
        ratios: None,
    })
}

/// What [`drive`] hands back.
struct Driven {
    tally: Tally,
    samples: Vec<Sample>,
    invariants: Vec<Invariant>,
    detail: ChaosDetail,
    errors: BTreeMap<String, u64>,
    reconnects_accepted: u64,
}

/// Start the fleet, run the schedule and the work for `--duration`, then wait for the
/// fleet and the brokers to settle and judge the invariants.
#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &RunArgs,
    seed: u64,
    pool: &Pool,
    apis: &[Api],
    creds: &[Credentials],
    brokers: &mut [ChaosBroker],
    controls: &mut [ChaosControl],
    pg: Option<&PgServer>,
    agents: &mut [RealAgent],
    faults: &mut [Fault],
    bins: &Path,
    run_dir: &Path,
    progress: &Progress,
) -> anyhow::Result<Driven> {
    let n = creds.len();
    let api = &apis[0];
    let mut udp = UdpReport::default();
    let endpoints = scenario::client_endpoints(args, &mut udp)?;
    let agent = tether_agent::AgentConfig {
        backoff_max: AGENT_BACKOFF_MAX,
        revoked_backoff: AGENT_REVOKED_BACKOFF,
        ..args.agent_config()
    };
    let quic: Vec<SocketAddr> = brokers.iter().map(|b| b.quic).collect();
    let names = names_of(brokers);
    let opts = FleetOptions {
        brokers: quic.clone(),
        agent: agent.clone(),
        concurrency: args.effective_concurrency(),
        rejoin_delay: args.rejoin_delay,
    };
    let mut fleet = Fleet::start(creds.to_vec(), &endpoints, &opts);
    let mut tally = Tally::new(n);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();

    // Everyone connected before the faults start.
    let bar = progress.bar(n as u64, "connecting the fleet");
    let deadline = tokio::time::Instant::now() + args.connect_timeout;
    while tally.current < n {
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev) => tally.record(ev),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
        bar.set_position(tally.current as u64);
    }
    bar.finish_and_clear();
    if tally.current < n {
        fleet.stop(Duration::from_secs(5)).await;
        bail!(
            "only {} of {n} appliances connected within {:?}, before any fault",
            tally.current,
            args.connect_timeout
        );
    }
    println!(
        "fleet connected: {n} appliances; injecting faults for {:?}",
        args.duration
    );

    let mut rng = fastrand::Rng::with_seed(seed ^ 0x05ee_d0fc_4a05);
    let start = Instant::now();
    let mut standing = vec![Standing::Active; n];
    let mut windows: Vec<Window> = Vec::new();
    let mut inv = Invariants {
        down_since: vec![None; n],
        ..Invariants::default()
    };
    let mut detail = ChaosDetail {
        seed,
        ..ChaosDetail::default()
    };
    let mut work: JoinSet<Done> = JoinSet::new();
    let mut memory: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    // The fleet's sessions on each broker life at each memory reading.
    let mut held: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut samples = Vec::new();
    // The schedule as timed steps: (ms, fault index, starting?).
    let mut steps: Vec<(u64, usize, bool)> = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        steps.push((f.at_ms, i, true));
        steps.push((f.at_ms + f.hold_ms, i, false));
    }
    steps.sort_by_key(|s| (s.0, !s.2));
    let mut next_step = 0;
    let mut last_fault_end: Option<Instant> = None;
    // When every appliance that should be connected was, after the last fault ended.
    let mut fully_back: Option<Instant> = None;
    let mut enable_at: Vec<(Instant, usize)> = Vec::new();
    let mut filler: BTreeMap<usize, PathBuf> = BTreeMap::new();
    let mut drained_at: BTreeMap<usize, Instant> = BTreeMap::new();

    // The work's pace.
    let command_every = Duration::from_secs_f64(1.0 / args.rate);
    let revoke_every = (args.duration / 8).max(Duration::from_secs(5));
    let disable_every = (args.duration / 8).max(Duration::from_secs(5));
    let churn_every = Duration::from_secs(2);
    let max_out = (n / 10).max(1);
    let mut next_command = start;
    let mut next_revoke = start + revoke_every / 2;
    let mut next_disable = start + disable_every * 3 / 4;
    let mut next_churn = start + churn_every;
    let mut next_sample = start;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let bar = progress.bar(args.duration.as_secs(), "chaos");

    let (channel_tx, mut channel_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watchers = JoinSet::new();
    for b in brokers.iter() {
        watchers.spawn(watch_channel(b.name.clone(), b.admin, channel_tx.clone()));
    }
    let work_end = start + args.duration;
    loop {
        while let Ok((name, hearing, at)) = channel_rx.try_recv() {
            on_channel(&mut windows, &name, hearing, at);
        }
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev) => on_event(ev, &mut tally, &standing, &windows, &names, &mut inv),
                None => break,
            },
            done = work.join_next(), if !work.is_empty() => {
                if let Some(Ok(done)) = done {
                    on_done(done, &mut standing, &mut detail, &mut inv, &windows, &mut enable_at, &mut rng);
                }
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if now >= work_end && next_step >= steps.len() && work.is_empty() && enable_at.is_empty() {
            break;
        }
        // Faults due.
        while next_step < steps.len() && start + Duration::from_millis(steps[next_step].0) <= now {
            let (_, i, starting) = steps[next_step];
            next_step += 1;
            let f = &mut faults[i];
            let result = if f.kind == FaultKind::AgentCrashMidWrite {
                let r = if starting {
                    agent_begin(f, agents, api, run_dir).await
                } else {
                    agent_end(f, agents, run_dir).await
                };
                if !starting {
                    last_fault_end = Some(Instant::now());
                }
                r
            } else if starting {
                if f.kind == FaultKind::BrokerKill {
                    // Its sessions die with it, whenever their agents notice.
                    if let Some(addr) = brokers.iter().find(|b| b.name == f.target).map(|b| b.quic)
                    {
                        for i in 0..n {
                            if tally.up[i] && tally.on[i] == Some(addr) {
                                tally.expected_close(i);
                                inv.down_since[i] = Some(now);
                            }
                        }
                    }
                }
                begin(
                    f,
                    brokers,
                    controls,
                    pg,
                    &mut windows,
                    &mut filler,
                    &mut drained_at,
                )
                .await
            } else {
                let r = end(
                    f,
                    args,
                    brokers,
                    controls,
                    pg,
                    &mut windows,
                    &mut filler,
                    &mut drained_at,
                    bins,
                    run_dir,
                )
                .await;
                last_fault_end = Some(Instant::now());
                r
            };
            match result {
                Ok(Some(what)) => f.outcome = Some(what),
                Ok(None) => {}
                Err(e) => {
                    f.outcome = Some(format!("failed: {e:#}"));
                    *errors
                        .entry(format!("fault_{}_failed", f.kind.as_str()))
                        .or_default() += 1;
                }
            }
        }
        // Work due (none after the run's duration).
        if now < work_end {
            while next_command <= now {
                next_command += command_every;
                if let Some(index) = pick(&mut rng, &tally, &standing, |s| s == Standing::Active) {
                    let replica = pick_replica(&mut rng, apis.len());
                    let api = apis[replica].clone();
                    let via = controls[replica].name.clone();
                    let id = id_of(index);
                    let nonce = format!("chaos-{}", rng.u64(..));
                    work.spawn(async move {
                        let sent = Instant::now();
                        let outcome = api.exec_echo(&id, &nonce, COMMAND_TIMEOUT_MS).await;
                        Done::Command {
                            index,
                            via,
                            sent,
                            outcome,
                        }
                    });
                }
            }
            for (next, every, standing_now, action) in [
                (&mut next_revoke, revoke_every, Standing::Revoking, "revoke"),
                (
                    &mut next_disable,
                    disable_every,
                    Standing::Disabling,
                    "disable",
                ),
            ] {
                if *next > now {
                    continue;
                }
                *next += every;
                if out_count(&standing) >= max_out {
                    continue;
                }
                if let Some(index) = pick(&mut rng, &tally, &standing, |s| s == Standing::Active) {
                    standing[index] = standing_now;
                    let replica = pick_replica(&mut rng, apis.len());
                    spawn_status(&mut work, &apis[replica], index, action);
                }
            }
            if next_churn <= now {
                next_churn += churn_every;
                if let Some(index) = pick(&mut rng, &tally, &standing, |s| s == Standing::Active) {
                    fleet.kick(index);
                    detail.churned += 1;
                }
            }
        }
        // Enables due (also after the duration: every disabled appliance comes back).
        enable_at.retain(|&(at, index)| {
            if at <= now {
                if let Standing::Disabled(since) = standing[index] {
                    standing[index] = Standing::Enabling(since);
                }
                // Round the replicas (no draw: the work's choices stay those of the seed).
                spawn_status(&mut work, &apis[index % apis.len()], index, "enable");
                false
            } else {
                true
            }
        });
        check_overdue(
            now,
            &tally,
            &standing,
            &windows,
            &names,
            &wiped(brokers),
            &mut inv,
        );
        check_exits(brokers, controls, agents, &mut inv, bins, run_dir, args).await;
        if next_step >= steps.len() && fully_back.is_none() && missing(&tally, &standing) == 0 {
            fully_back = Some(now);
        }
        if now >= next_sample {
            next_sample = now + SAMPLE_EVERY;
            sample_memory(brokers, controls, agents, &tally, &mut memory, &mut held);
            samples.push(Sample {
                t: round3(start.elapsed().as_secs_f64()),
                connected: tally.current,
                broker_rss_bytes: None,
                broker_cpu_seconds: None,
                simulator_rss_bytes: measure::sample(std::process::id())
                    .map(|s| s.rss_bytes)
                    .unwrap_or(0),
            });
            bar.set_position(start.elapsed().as_secs().min(args.duration.as_secs()));
        }
    }
    bar.finish_and_clear();

    // Every appliance that should be connected, connected again.
    let since = last_fault_end.unwrap_or(start);
    let reconnect_deadline = since + RECONNECT_BOUND;
    let mut left_out = missing(&tally, &standing);
    while fully_back.is_none() && left_out > 0 && Instant::now() < reconnect_deadline {
        while let Ok((name, hearing, at)) = channel_rx.try_recv() {
            on_channel(&mut windows, &name, hearing, at);
        }
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev) => on_event(ev, &mut tally, &standing, &windows, &names, &mut inv),
                None => break,
            },
            _ = tokio::time::sleep(TICK) => {}
        }
        check_overdue(
            Instant::now(),
            &tally,
            &standing,
            &windows,
            &names,
            &wiped(brokers),
            &mut inv,
        );
        check_exits(brokers, controls, agents, &mut inv, bins, run_dir, args).await;
        left_out = missing(&tally, &standing);
    }
    if fully_back.is_none() && left_out == 0 {
        fully_back = Some(Instant::now());
    }
    detail.reconnect_after_last_fault_ms =
        fully_back.map(|t| round3(t.saturating_duration_since(since).as_secs_f64() * 1000.0));
    let missing = if fully_back.is_some() { 0 } else { left_out };

    // The brokers apply control's latest allowlist.
    let broker_names: Vec<String> = brokers.iter().map(|b| b.name.clone()).collect();
    let logs: Vec<PathBuf> = controls.iter().map(|c| c.log(run_dir)).collect();
    let converged = converge(apis, &broker_names, &logs).await;

    // Fresh connections with each revoked or disabled certificate: all refused.
    let out_now: Vec<usize> = (0..n)
        .filter(|&i| standing[i].out_since().is_some())
        .collect();
    let mut rdetail = crate::ops::RevokeDetail::default();
    let mut rout = crate::ops::OpsOutcome::default();
    let ctx = crate::ops::Ctx {
        api,
        pool,
        creds,
        endpoints: &endpoints,
        brokers: &quic,
        agent: &agent,
    };
    crate::ops::reconnect_revoked(&ctx, &out_now, progress, &mut rdetail, &mut rout).await;
    for (k, v) in rout.errors {
        *errors.entry(k).or_default() += v;
    }
    // Those disabled at the end are enabled again, so the pool stays usable; the revoked
    // leave the pool.
    for (i, s) in standing.iter_mut().enumerate() {
        match *s {
            Standing::Disabled(_) | Standing::Disabling | Standing::Enabling(_) => {
                match api.set_status(&id_of(i), "enable").await {
                    Ok(()) => *s = Standing::Active,
                    Err(e) => eprintln!("warning: enabling {} again: {e}", id_of(i)),
                }
            }
            Standing::Revoked(_) | Standing::Revoking => {
                let _ = pool.mark_revoked(&id_of(i));
            }
            _ => {}
        }
    }
    while let Ok(ev) = fleet.events.try_recv() {
        on_event(ev, &mut tally, &standing, &windows, &names, &mut inv);
    }
    watchers.abort_all();
    let left = fleet.stop(Duration::from_secs(10)).await;
    if left > 0 {
        errors.insert("agents_not_stopped".into(), left as u64);
    }
    for e in &endpoints.endpoints {
        e.close(0u32.into(), b"done");
    }
    check_exits(brokers, controls, agents, &mut inv, bins, run_dir, args).await;

    // The verdicts.
    detail.longest_outage_ms = inv.longest_outage.map(|d| round3(d.as_secs_f64() * 1000.0));
    detail.longest_channel_outage_ms = windows
        .iter()
        .filter(|w| w.target.starts_with("channel:"))
        .filter_map(|w| w.to.map(|to| to.saturating_duration_since(w.from)))
        .max()
        .map(|d| round3(d.as_secs_f64() * 1000.0));
    detail.worst_revoke_to_close_ms = inv.worst_close.map(|d| round3(d.as_secs_f64() * 1000.0));
    detail.worst_revoke_to_close_reachable_ms = inv
        .worst_close_reachable
        .map(|d| round3(d.as_secs_f64() * 1000.0));
    let mut invariants = Vec::new();
    invariants.push(Invariant {
        name: "revocation_closes_sessions",
        ok: inv.close_violations.is_empty(),
        detail: if inv.close_violations.is_empty() {
            format!(
                "{} revocations and disables, {} live sessions closed; worst {} ms after control's acknowledgement, {} ms after the broker could hear control (bound {} ms)",
                detail.revocations,
                inv.closes,
                show(detail.worst_revoke_to_close_ms),
                show(detail.worst_revoke_to_close_reachable_ms),
                CLOSE_BOUND.as_millis()
            )
        } else {
            inv.close_violations.join("; ")
        },
    });
    let admitted = rdetail.reconnects_accepted as usize + inv.admitted_again.len();
    invariants.push(Invariant {
        name: "revoked_never_admitted_again",
        ok: admitted == 0,
        detail: format!(
            "{} fresh connections with revoked or disabled certificates at the end: {} refused, {} accepted{}",
            rdetail.reconnects_tried,
            rdetail.reconnects_refused,
            rdetail.reconnects_accepted,
            if inv.admitted_again.is_empty() {
                format!(
                    "; during the run none past the bound ({} admitted by a broker before it could hear control, each closed within the bound of hearing it)",
                    inv.stale_admissions
                )
            } else {
                format!("; during the run: {}", inv.admitted_again.join("; "))
            }
        ),
    });
    invariants.push(Invariant {
        name: "changes_in_force_on_every_broker",
        ok: converged.is_ok(),
        detail: converged.unwrap_or_else(|e| format!("{e:#}")),
    });
    let sent: u64 = detail.commands.values().sum();
    invariants.push(Invariant {
        name: "commands_end_exactly_once",
        ok: inv.command_violations.is_empty(),
        detail: if inv.command_violations.is_empty() {
            format!(
                "{sent} commands, each with one outcome: {}",
                detail
                    .commands
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            inv.command_violations.join("; ")
        },
    });
    invariants.push(Invariant {
        name: "fleet_reconnects_after_faults",
        ok: missing == 0,
        detail: if missing == 0 {
            format!(
                "every appliance neither revoked nor disabled connected {} ms after the last fault ended (bound {} s); the longest any appliance was without a session during the faults: {} ms",
                show(detail.reconnect_after_last_fault_ms),
                RECONNECT_BOUND.as_secs(),
                show(detail.longest_outage_ms)
            )
        } else {
            format!(
                "{missing} appliances neither revoked nor disabled still without a session {} s after the last fault ended",
                RECONNECT_BOUND.as_secs()
            )
        },
    });
    invariants.push(
        agents_connected(
            api,
            agents,
            (since + RECONNECT_BOUND).max(Instant::now() + Duration::from_secs(20)),
        )
        .await,
    );
    let (mem_ok, mem_detail, traces) = judge_memory(&memory, &held);
    detail.memory = traces;
    invariants.push(Invariant {
        name: "memory_bounded",
        ok: mem_ok,
        detail: mem_detail,
    });
    invariants.push(Invariant {
        name: "no_unexpected_exit",
        ok: inv.unexpected_exits.is_empty(),
        detail: if inv.unexpected_exits.is_empty() {
            format!(
                "only the processes the schedule killed exited ({} broker lives, {} control lives)",
                brokers.iter().map(|b| b.lives).sum::<u32>(),
                controls.iter().map(|c| c.lives).sum::<u32>()
            )
        } else {
            inv.unexpected_exits.join("; ")
        },
    });
    Ok(Driven {
        tally,
        samples,
        invariants,
        detail,
        errors,
        reconnects_accepted: rdetail.reconnects_accepted,
    })
}

/// The appliance id of fleet index `i` (ids count from 1).
fn id_of(i: usize) -> String {
    pool::appliance_id(i + 1)
}

fn show(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// A broker's channel went down (a window opens) or came back (it closes).
fn on_channel(windows: &mut Vec<Window>, name: &str, hearing: bool, at: Instant) {
    let target = channel_target(name);
    if hearing {
        if let Some(w) = windows
            .iter_mut()
            .rev()
            .find(|w| w.target == target && w.to.is_none())
        {
            w.to = Some(at);
        }
    } else {
        windows.push(Window {
            target,
            from: at,
            to: None,
        });
    }
}

/// Appliances that should have a session and have none.
fn missing(tally: &Tally, standing: &[Standing]) -> usize {
    standing
        .iter()
        .enumerate()
        .filter(|(i, s)| s.should_connect() && !tally.up[*i])
        .count()
}

/// Appliances out of the allowlist or on their way.
fn out_count(standing: &[Standing]) -> usize {
    standing
        .iter()
        .filter(|s| !matches!(s, Standing::Active))
        .count()
}

/// A random connected appliance whose standing passes `want`.
fn pick(
    rng: &mut fastrand::Rng,
    tally: &Tally,
    standing: &[Standing],
    want: impl Fn(Standing) -> bool,
) -> Option<usize> {
    let n = standing.len();
    let from = rng.usize(..n);
    (0..n)
        .map(|k| (from + k) % n)
        .find(|&i| tally.up[i] && want(standing[i]))
}

/// The replica a request of the work goes to: drawn when there are several (no draw with
/// one control, so its runs make the choices they made before replicas).
fn pick_replica(rng: &mut fastrand::Rng, replicas: usize) -> usize {
    if replicas > 1 {
        rng.usize(..replicas)
    } else {
        0
    }
}

fn spawn_status(work: &mut JoinSet<Done>, api: &Api, index: usize, action: &'static str) {
    let api = api.clone();
    work.spawn(async move {
        let result = api.set_status(&id_of(index), action).await;
        Done::Status {
            index,
            action,
            result,
        }
    });
}

/// The brokers' names by the address agents reach them at.
type Names = [(SocketAddr, String)];

fn names_of(brokers: &[ChaosBroker]) -> Vec<(SocketAddr, String)> {
    brokers.iter().map(|b| (b.quic, b.name.clone())).collect()
}

/// The broker name holding a session at `addr`.
fn broker_at(names: &Names, addr: SocketAddr) -> Option<&str> {
    names
        .iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, n)| n.as_str())
}

/// The window target of broker `name`'s channel to control being down (as its metrics
/// say: not connected, or its allowlist not known to be control's latest).
fn channel_target(name: &str) -> String {
    format!("channel:{name}")
}

/// Watch broker `name`'s channel to control through its admin API every 250 ms, sending
/// each change (`true`: it hears control) with when it was seen.
async fn watch_channel(
    name: String,
    admin: SocketAddr,
    tx: tokio::sync::mpsc::UnboundedSender<(String, bool, Instant)>,
) {
    let mut hearing = true;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = match spawn::http_get(admin, "/metrics").await {
            Ok(text) => {
                spawn::metric(&text, "tether_broker_control_connected") == Some(1.0)
                    && spawn::metric(&text, "tether_broker_allowlist_stale") != Some(1.0)
            }
            Err(_) => false,
        };
        if now != hearing {
            hearing = now;
            if tx.send((name.clone(), now, Instant::now())).is_err() {
                return;
            }
        }
    }
}

/// When `target` could hear control again after `since`: the latest end of a window of
/// it or of control overlapping `[since, now]`; `None` while one is still open.
fn reachable_from(windows: &[Window], target: &str, since: Instant) -> Option<Instant> {
    let mut from = since;
    let channel = channel_target(target);
    for w in windows
        .iter()
        .filter(|w| w.target == target || w.target == channel || w.target == "control")
    {
        match w.to {
            None if w.from <= Instant::now() => return None,
            Some(to) if to > since && w.from <= to => from = from.max(to),
            _ => {}
        }
    }
    Some(from)
}

fn on_event(
    ev: FleetEvent,
    tally: &mut Tally,
    standing: &[Standing],
    windows: &[Window],
    names: &Names,
    inv: &mut Invariants,
) {
    match &ev {
        FleetEvent::Disconnected {
            index,
            was_connected: true,
            at,
            ..
        } => {
            if standing[*index] == Standing::Active && tally.up[*index] {
                if let Some(d) = inv.down_since.get_mut(*index) {
                    *d = Some(*at);
                }
            }
            if let Some(acked) = standing[*index].out_since() {
                if tally.up[*index] {
                    let took = at.saturating_duration_since(acked);
                    inv.closes += 1;
                    inv.worst_close = inv.worst_close.max(Some(took));
                    let target = tally.on[*index].and_then(|a| broker_at(names, a));
                    if let Some(from) = target.and_then(|t| reachable_from(windows, t, acked)) {
                        let took = at.saturating_duration_since(from);
                        inv.worst_close_reachable = inv.worst_close_reachable.max(Some(took));
                    }
                }
            }
        }
        FleetEvent::Connected {
            index, broker, at, ..
        } => {
            if let Some(since) = inv.down_since.get_mut(*index).and_then(Option::take) {
                let took = at.saturating_duration_since(since);
                inv.longest_outage = inv.longest_outage.max(Some(took));
            }
            if let Some(acked) = standing[*index].out_since() {
                let name = broker_at(names, *broker).unwrap_or("?");
                let due = reachable_from(windows, name, acked).map(|t| t + CLOSE_BOUND);
                if due.is_none_or(|d| *at <= d) {
                    // A broker that could not hear control yet (partitioned, or control
                    // down) still enforces its last allowlist: it must close the session
                    // within the bound of hearing again, which `check_overdue` watches.
                    inv.stale_admissions += 1;
                } else {
                    inv.admitted_again.push(format!(
                        "{} got a session on {name} {} ms after its revocation or disable was acknowledged",
                        id_of(*index),
                        at.saturating_duration_since(acked).as_millis()
                    ));
                }
            }
        }
        _ => {}
    }
    tally.record(ev);
}

fn on_done(
    done: Done,
    standing: &mut [Standing],
    detail: &mut ChaosDetail,
    inv: &mut Invariants,
    windows: &[Window],
    enable_at: &mut Vec<(Instant, usize)>,
    rng: &mut fastrand::Rng,
) {
    match done {
        Done::Command {
            index,
            via,
            sent,
            outcome,
        } => {
            let key = match &outcome {
                EchoOutcome::Ran => "ok".to_owned(),
                EchoOutcome::Failed(kind) => kind.clone(),
                EchoOutcome::Broken(kind) => {
                    // The answer's stream broke: fine only if the control (replica) relaying
                    // it died meanwhile.
                    let control_died = windows.iter().any(|w| w.target == via && w.from >= sent);
                    if !control_died {
                        inv.command_violations.push(format!(
                            "a command to {} through {via} ended without a final line ({kind}) while {via} was up",
                            id_of(index)
                        ));
                    }
                    format!("{kind}_control_killed")
                }
                EchoOutcome::Violation(what) => {
                    inv.command_violations
                        .push(format!("a command to {}: {what}", id_of(index)));
                    "violation".to_owned()
                }
            };
            if key.contains("_503") {
                detail.answered_503 += 1;
            }
            *detail.commands.entry(key).or_default() += 1;
        }
        Done::Status {
            index,
            action,
            result,
        } => {
            let now = Instant::now();
            if result.as_ref().is_err_and(|e| e == "http_503") {
                detail.answered_503 += 1;
            }
            match (action, result) {
                ("revoke", Ok(())) => {
                    standing[index] = Standing::Revoked(now);
                    detail.revocations += 1;
                }
                ("disable", Ok(())) => {
                    standing[index] = Standing::Disabled(now);
                    detail.revocations += 1;
                    detail.disables += 1;
                    enable_at.push((now + Duration::from_millis(rng.u64(3000..=10_000)), index));
                }
                ("enable", Ok(())) => standing[index] = Standing::Active,
                ("enable", Err(e)) => {
                    // Control down: try again shortly.
                    *detail
                        .actions_failed
                        .entry(format!("enable_{e}"))
                        .or_default() += 1;
                    if let Standing::Enabling(since) = standing[index] {
                        standing[index] = Standing::Disabled(since);
                    }
                    enable_at.push((now + Duration::from_secs(1), index));
                }
                // A refused or lost revoke or disable (control killed meanwhile): control
                // may or may not have committed it, so the appliance stays `Revoking` or
                // `Disabling`: neither checked for closing nor expected back; the end of the
                // run enables it again or takes it out of the pool.
                (_, Err(e)) => {
                    *detail
                        .actions_failed
                        .entry(format!("{action}_{e}"))
                        .or_default() += 1;
                }
                _ => {}
            }
        }
    }
}

/// Each broker's [`ChaosBroker::wiped`], by name, for [`check_overdue`].
fn wiped(brokers: &[ChaosBroker]) -> HashMap<String, Instant> {
    brokers
        .iter()
        .filter_map(|b| Some((b.name.clone(), b.wiped?)))
        .collect()
}

/// Sessions of appliances out of the allowlist held past the bound. A session that came
/// up on a broker before its process ended (`wiped`) is gone, not held.
fn check_overdue(
    now: Instant,
    tally: &Tally,
    standing: &[Standing],
    windows: &[Window],
    names: &Names,
    wiped: &HashMap<String, Instant>,
    inv: &mut Invariants,
) {
    for (i, s) in standing.iter().enumerate() {
        let Some(acked) = s.out_since() else { continue };
        if !tally.up[i] || inv.overdue_reported.contains(&i) {
            continue;
        }
        let Some(name) = tally.on[i].and_then(|a| broker_at(names, a)) else {
            continue;
        };
        // Its broker's process ended since (SIGKILL, or a drain and a new start): the
        // session went with it, and the new process never admitted it.
        if let (Some(up), Some(wiped)) = (tally.since[i], wiped.get(name)) {
            if up <= *wiped {
                continue;
            }
        }
        let Some(from) = reachable_from(windows, name, acked) else {
            continue;
        };
        if now > from + CLOSE_BOUND {
            inv.overdue_reported.insert(i);
            inv.close_violations.push(format!(
                "{} still had its session on {name} {} ms after its revocation or disable was acknowledged ({} ms after {name} could hear control)",
                id_of(i),
                now.saturating_duration_since(acked).as_millis(),
                now.saturating_duration_since(from).as_millis()
            ));
        }
    }
}

/// Start fault `f`.
async fn begin(
    f: &Fault,
    brokers: &mut [ChaosBroker],
    controls: &mut [ChaosControl],
    pg: Option<&PgServer>,
    windows: &mut Vec<Window>,
    filler: &mut BTreeMap<usize, PathBuf>,
    drained_at: &mut BTreeMap<usize, Instant>,
) -> anyhow::Result<Option<String>> {
    let now = Instant::now();
    tracing::info!(kind = f.kind.as_str(), target = %f.target, "chaos: fault starts");
    if f.kind == FaultKind::ControlKill {
        let control = controls
            .iter_mut()
            .find(|c| c.name == f.target)
            .context("no such control replica")?;
        control.down = true;
        windows.push(Window {
            target: control.name.clone(),
            from: now,
            to: None,
        });
        if let Some(g) = control.guard.as_mut() {
            g.kill().await;
        }
        return Ok(None);
    }
    if f.kind == FaultKind::PgRestart {
        let pg = pg.context("no PostgreSQL of the run's own")?;
        windows.push(Window {
            target: PG_TARGET.into(),
            from: now,
            to: None,
        });
        pg.crash().await?;
        return Ok(None);
    }
    let b = brokers
        .iter()
        .position(|b| b.name == f.target)
        .context("no such broker")?;
    let broker = &mut brokers[b];
    match f.kind {
        FaultKind::BrokerKill => {
            broker.down = true;
            broker.wiped = Some(now);
            windows.push(Window {
                target: broker.name.clone(),
                from: now,
                to: None,
            });
            if let Some(g) = broker.guard.as_mut() {
                g.kill().await;
            }
        }
        FaultKind::BrokerDrain => {
            broker.down = true;
            drained_at.insert(b, now);
            if let Some(g) = broker.guard.as_ref() {
                spawn::terminate(g.pid());
            }
        }
        FaultKind::Partition => {
            windows.push(Window {
                target: broker.name.clone(),
                from: now,
                to: None,
            });
            broker.proxy.partition(true);
            broker.partitioned = true;
            cut_partitioned(brokers, controls);
        }
        FaultKind::DiskFull => {
            let Some(disk) = broker.disk.as_ref() else {
                return Ok(Some("skipped: no tmpfs".into()));
            };
            let path = disk.fill();
            filler.insert(b, path);
        }
        FaultKind::ControlKill | FaultKind::AgentCrashMidWrite | FaultKind::PgRestart => {
            unreachable!("handled apart")
        }
    }
    Ok(None)
}

/// End fault `f`: heal, or start what was stopped.
#[allow(clippy::too_many_arguments)]
async fn end(
    f: &Fault,
    args: &RunArgs,
    brokers: &mut [ChaosBroker],
    controls: &mut [ChaosControl],
    pg: Option<&PgServer>,
    windows: &mut [Window],
    filler: &mut BTreeMap<usize, PathBuf>,
    drained_at: &mut BTreeMap<usize, Instant>,
    bins: &Path,
    run_dir: &Path,
) -> anyhow::Result<Option<String>> {
    let close = |windows: &mut [Window], target: &str| {
        if let Some(w) = windows
            .iter_mut()
            .rev()
            .find(|w| w.target == target && w.to.is_none())
        {
            w.to = Some(Instant::now());
        }
    };
    tracing::info!(kind = f.kind.as_str(), target = %f.target, "chaos: fault ends");
    if f.kind == FaultKind::ControlKill {
        let control = controls
            .iter_mut()
            .find(|c| c.name == f.target)
            .context("no such control replica")?;
        let started = Instant::now();
        let r = restart_control(control, bins, run_dir).await;
        close(windows, &f.target);
        r?;
        return Ok(Some(format!(
            "{} restarted in {} ms",
            f.target,
            started.elapsed().as_millis()
        )));
    }
    if f.kind == FaultKind::PgRestart {
        let pg = pg.context("no PostgreSQL of the run's own")?;
        let started = Instant::now();
        let r = pg.restart().await;
        close(windows, PG_TARGET);
        r?;
        return Ok(Some(format!(
            "PostgreSQL accepting connections again {} ms after its start (crash recovery)",
            started.elapsed().as_millis()
        )));
    }
    let b = brokers
        .iter()
        .position(|b| b.name == f.target)
        .context("no such broker")?;
    match f.kind {
        FaultKind::BrokerKill => {
            let started = Instant::now();
            let r = restart_broker(&mut brokers[b], args, bins, run_dir).await;
            close(windows, &f.target);
            r?;
            Ok(Some(format!(
                "restarted in {} ms",
                started.elapsed().as_millis()
            )))
        }
        FaultKind::BrokerDrain => {
            // It drains for up to its drain timeout; wait for it to be gone.
            let mut exited = "drained".to_owned();
            if let Some(g) = brokers[b].guard.take() {
                let since = drained_at.remove(&b).unwrap_or_else(Instant::now);
                if !g.stop(DRAIN_JITTER + Duration::from_secs(15)).await {
                    exited = "did not exit after draining: killed".into();
                }
                exited = format!("{exited} in {} ms", since.elapsed().as_millis());
            }
            let started = Instant::now();
            restart_broker(&mut brokers[b], args, bins, run_dir).await?;
            Ok(Some(format!(
                "{exited}; restarted in {} ms",
                started.elapsed().as_millis()
            )))
        }
        FaultKind::Partition => {
            brokers[b].proxy.partition(false);
            brokers[b].partitioned = false;
            cut_partitioned(brokers, controls);
            close(windows, &f.target);
            Ok(None)
        }
        FaultKind::DiskFull => {
            if let Some(path) = filler.remove(&b) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            Ok(None)
        }
        FaultKind::ControlKill | FaultKind::AgentCrashMidWrite | FaultKind::PgRestart => {
            unreachable!("handled apart")
        }
    }
}

/// Cut the partitioned brokers' connections through every replica's advertised address
/// (and heal the others').
fn cut_partitioned(brokers: &[ChaosBroker], controls: &[ChaosControl]) {
    let pids: Vec<u32> = brokers
        .iter()
        .filter(|b| b.partitioned)
        .filter_map(|b| b.guard.as_ref().map(|g| g.pid()))
        .collect();
    for p in controls.iter().filter_map(|c| c.advertised.as_ref()) {
        p.cut_processes(pids.clone());
    }
}

async fn restart_broker(
    b: &mut ChaosBroker,
    args: &RunArgs,
    bins: &Path,
    run_dir: &Path,
) -> anyhow::Result<()> {
    if let Some(mut g) = b.guard.take() {
        g.kill().await;
    }
    let (guard, _, _) = scenario::spawn_broker(
        args,
        &b.name,
        &b.data_dir,
        None,
        Some((b.quic, b.admin)),
        bins,
        run_dir,
        DRAIN_JITTER,
    )
    .await?;
    b.guard = Some(guard);
    b.lives += 1;
    b.down = false;
    b.wiped = Some(Instant::now());
    Ok(())
}

async fn restart_control(
    control: &mut ChaosControl,
    bins: &Path,
    run_dir: &Path,
) -> anyhow::Result<()> {
    if let Some(mut g) = control.guard.take() {
        g.kill().await;
    }
    control.start(bins, run_dir).await
}

/// Processes that exited without the schedule killing them: reported, and started again
/// so the run goes on.
async fn check_exits(
    brokers: &mut [ChaosBroker],
    controls: &mut [ChaosControl],
    agents: &mut [RealAgent],
    inv: &mut Invariants,
    bins: &Path,
    run_dir: &Path,
    args: &RunArgs,
) {
    for b in brokers.iter_mut().filter(|b| !b.down) {
        if let Some(status) = b.guard.as_mut().and_then(|g| g.exited()) {
            let (life, log) = (b.life(), run_dir.join(format!("{}.log", b.name)));
            let again = restart_broker(b, args, bins, run_dir).await;
            b.down = restarted(inv, &life, status, &log, &b.name, again);
        }
    }
    for a in agents.iter_mut().filter(|a| !a.down) {
        if let Some(status) = a.guard.as_mut().and_then(|g| g.exited()) {
            let (life, log) = (
                format!("{}#{}", a.id, a.lives),
                run_dir.join(format!("{}.log", a.id)),
            );
            let again = a.start(run_dir, false).await;
            a.down = restarted(inv, &life, status, &log, &a.id, again);
        }
    }
    for control in controls.iter_mut().filter(|c| !c.down) {
        if let Some(status) = control.guard.as_mut().and_then(|g| g.exited()) {
            let (life, log) = (control.life(), control.log(run_dir));
            let again = restart_control(control, bins, run_dir).await;
            control.down = restarted(inv, &life, status, &log, &control.name, again);
        }
    }
}

/// Record that process `life` (named `name`, logging to `log`) exited by itself with
/// `status`, and whether starting it `again` failed; returns whether it is now down.
fn restarted(
    inv: &mut Invariants,
    life: &str,
    status: std::process::ExitStatus,
    log: &Path,
    name: &str,
    again: anyhow::Result<()>,
) -> bool {
    inv.unexpected_exits.push(format!(
        "{life} exited by itself ({status}); its log: {}",
        log.display()
    ));
    match again {
        Ok(()) => false,
        Err(e) => {
            inv.unexpected_exits
                .push(format!("{name} could not be started again: {e:#}"));
            true
        }
    }
}

fn sample_memory(
    brokers: &[ChaosBroker],
    controls: &[ChaosControl],
    agents: &[RealAgent],
    tally: &Tally,
    memory: &mut BTreeMap<String, Vec<u64>>,
    held: &mut BTreeMap<String, Vec<u64>>,
) {
    for a in agents.iter().filter(|a| !a.down) {
        if let Some(Ok(s)) = a.guard.as_ref().map(|g| measure::sample(g.pid())) {
            memory
                .entry(format!("{}#{}", a.id, a.lives))
                .or_default()
                .push(s.rss_bytes);
        }
    }
    for b in brokers {
        if let Some(g) = b.guard.as_ref().filter(|_| !b.down) {
            if let Ok(s) = measure::sample(g.pid()) {
                memory.entry(b.life()).or_default().push(s.rss_bytes);
                let sessions = tally
                    .up
                    .iter()
                    .zip(&tally.on)
                    .filter(|(up, on)| **up && **on == Some(b.quic))
                    .count();
                held.entry(b.life()).or_default().push(sessions as u64);
            }
        }
    }
    for control in controls.iter().filter(|c| !c.down) {
        if let Some(Ok(s)) = control.guard.as_ref().map(|g| measure::sample(g.pid())) {
            memory.entry(control.life()).or_default().push(s.rss_bytes);
        }
    }
    if let Ok(s) = measure::sample(std::process::id()) {
        memory
            .entry("simulator".into())
            .or_default()
            .push(s.rss_bytes);
    }
}

/// Whether any process life's memory kept growing: its last reading against the median
/// of its middle third (the first third is warm-up), for lives with 9 readings or more. A
/// broker life (one with readings in `held`) is allowed [`MEMORY_PER_SESSION`] for each
/// session it held at its last reading beyond the median of its middle third.
fn judge_memory(
    memory: &BTreeMap<String, Vec<u64>>,
    held: &BTreeMap<String, Vec<u64>>,
) -> (bool, String, BTreeMap<String, MemoryTrace>) {
    fn middle_median(s: &[u64]) -> u64 {
        let mut middle: Vec<u64> = s[s.len() / 3..(2 * s.len() / 3).max(s.len() / 3 + 1)].to_vec();
        middle.sort_unstable();
        middle[middle.len() / 2]
    }
    let mut traces = BTreeMap::new();
    let mut grew = Vec::new();
    let mut judged = 0;
    for (life, s) in memory {
        if s.is_empty() {
            continue;
        }
        let mid = middle_median(s);
        let last = *s.last().expect("not empty");
        let more_sessions = held.get(life).filter(|h| !h.is_empty()).map_or(0, |h| {
            h.last()
                .expect("not empty")
                .saturating_sub(middle_median(h))
        });
        let t = MemoryTrace {
            samples: s.len(),
            first: s[0],
            middle: mid,
            last,
            peak: s.iter().copied().max().unwrap_or(0),
        };
        if s.len() >= 9 {
            judged += 1;
            let limit = ((mid as f64 * MEMORY_GROWTH) as u64).max(mid + MEMORY_SLACK)
                + more_sessions * MEMORY_PER_SESSION;
            if last > limit {
                grew.push(format!(
                    "{life}: {:.1} MiB at the end against {:.1} MiB in the middle of its life{}",
                    last as f64 / 1048576.0,
                    mid as f64 / 1048576.0,
                    if more_sessions > 0 {
                        format!(" ({more_sessions} sessions more)")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        traces.insert(life.clone(), t);
    }
    let detail = if grew.is_empty() {
        let worst = traces
            .iter()
            .filter(|(_, t)| t.samples >= 9)
            .map(|(l, t)| (l, t.last as f64 / t.middle.max(1) as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        format!(
            "{judged} process lives sampled long enough; none grew past {MEMORY_GROWTH}x (or {} MiB) of its middle level, a broker's plus {} KiB for each session it took over{}",
            MEMORY_SLACK / 1048576,
            MEMORY_PER_SESSION / 1024,
            worst
                .map(|(l, r)| format!("; the most: {l} at {r:.2}x"))
                .unwrap_or_default()
        )
    } else {
        grew.join("; ")
    };
    (grew.is_empty(), detail, traces)
}

/// What control logs when a broker's allowlist digest is not the store's.
const DIVERGED_SAYS: &str = "allowlist history diverged";

/// Poll each replica's broker list until, on every one, every broker is connected and
/// applies the store's allowlist version (every replica reads the same version); then
/// look through every control life's log for a broker whose digest for a version was not
/// the store's (`allowlist history diverged`), which breaks it too.
async fn converge(apis: &[Api], names: &[String], logs: &[PathBuf]) -> anyhow::Result<String> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let version = loop {
        let mut versions = Vec::new();
        let mut last = Vec::new();
        for (r, api) in apis.iter().enumerate() {
            let replica = if apis.len() > 1 {
                format!("{}: ", replica_name(r + 1))
            } else {
                String::new()
            };
            match api.brokers().await {
                Ok(list) => {
                    versions.push(list.allowlist_version);
                    let behind: Vec<String> = list
                        .brokers
                        .iter()
                        .filter(|b| names.contains(&b.name))
                        .filter(|b| {
                            !(b.connected && b.allowlist_version == Some(list.allowlist_version))
                        })
                        .map(|b| {
                            format!(
                                "{} (connected {}, version {:?})",
                                b.name, b.connected, b.allowlist_version
                            )
                        })
                        .collect();
                    if !behind.is_empty() {
                        last.push(format!(
                            "{replica}control's allowlist is version {}; behind: {}",
                            list.allowlist_version,
                            behind.join(", ")
                        ));
                    }
                }
                Err(e) => last.push(format!("{replica}{e:#}")),
            }
        }
        versions.dedup();
        if last.is_empty() && versions.len() == 1 {
            break versions[0];
        }
        if last.is_empty() {
            last.push(format!(
                "the replicas read different versions: {versions:?}"
            ));
        }
        if Instant::now() > deadline {
            bail!("{} after {CONVERGE_TIMEOUT:?}", last.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let diverged: usize = logs
        .iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .map(|t| t.matches(DIVERGED_SAYS).count())
                .unwrap_or(0)
        })
        .sum();
    if diverged > 0 {
        bail!("control logged `{DIVERGED_SAYS}` {diverged} times: a broker's digest for a version was not the store's");
    }
    Ok(if apis.len() > 1 {
        format!(
            "{} brokers connected, each applying allowlist version {version} as each of {} replicas reads it from the store; no broker's digest ever differed from the store's",
            names.len(),
            apis.len()
        )
    } else {
        format!(
            "{} brokers connected to control, each applying allowlist version {version}; no broker's digest ever differed from the store's",
            names.len()
        )
    })
}

/// `tether-control audit export`, then `tether audit verify` on it.
async fn verify_audit(
    bins: &Path,
    tether: &Path,
    control_dir: &Path,
    prepared: &pool::Prepared,
    run_dir: &Path,
) -> anyhow::Result<String> {
    let export = run_dir.join("audit-export.jsonl");
    let ca = run_dir.join("root.pem");
    std::fs::write(&ca, &prepared.root_pem)?;
    let mut cmd = tokio::process::Command::new(bins.join(spawn::CONTROL_BIN));
    cmd.args(["audit", "export", "--data-dir"])
        .arg(control_dir)
        .arg("--out")
        .arg(&export);
    run_tool(cmd, "tether-control audit export").await?;
    if !tether.is_file() {
        bail!("{} not found: build the tether CLI", tether.display());
    }
    let mut cmd = tokio::process::Command::new(tether);
    cmd.args(["audit", "verify"])
        .arg(&export)
        .arg("--ca")
        .arg(&ca);
    let out = run_tool(cmd, "tether audit verify").await?;
    Ok(format!(
        "tether audit verify: {} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Run `cmd` (named `what` in errors) to its end; its output when it succeeded, else an
/// error carrying what it printed on stderr.
async fn run_tool(
    mut cmd: tokio::process::Command,
    what: &str,
) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Copy the files of `from` into `to` (one level: a broker's data directory is flat but
/// for its subdirectories, copied too).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_schedule() {
        let d = Duration::from_secs(120);
        let a = schedule(7, d, 3, 2, 1, &FaultKind::ALL);
        let b = schedule(7, d, 3, 2, 1, &FaultKind::ALL);
        let c = schedule(8, d, 3, 2, 1, &FaultKind::ALL);
        let key = |s: &[Fault]| {
            s.iter()
                .map(|f| (f.kind, f.at_ms, f.target.clone(), f.hold_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
        assert!(a.len() >= 8, "{} faults in two minutes", a.len());
        // One control: `control_kill` kills it, and there is no PostgreSQL to restart.
        assert!(a
            .iter()
            .filter(|f| f.kind == FaultKind::ControlKill)
            .all(|f| f.target == "control"));
        // Replicas: the same seed draws the same schedule too, `control_kill` names a
        // replica, `pg_restart` PostgreSQL.
        let r = schedule(7, d, 3, 2, 3, &FaultKind::ALL);
        assert_eq!(key(&r), key(&schedule(7, d, 3, 2, 3, &FaultKind::ALL)));
        assert_ne!(key(&r), key(&schedule(8, d, 3, 2, 3, &FaultKind::ALL)));
        for f in &r {
            match f.kind {
                FaultKind::ControlKill => assert!(
                    ["control-1", "control-2", "control-3"].contains(&f.target.as_str()),
                    "{f:?}"
                ),
                FaultKind::PgRestart => assert_eq!(f.target, PG_TARGET),
                _ => {}
            }
        }
        // Without replicas the kinds drawn leave PostgreSQL out, and the schedule is the
        // one the kinds before `pg_restart` drew: `pg_restart` comes last in `ALL`.
        let sqlite: Vec<FaultKind> = FaultKind::ALL
            .into_iter()
            .filter(|k| *k != FaultKind::PgRestart)
            .collect();
        assert_eq!(FaultKind::ALL[..6], sqlite[..]);
        assert!(schedule(7, d, 3, 2, 1, &sqlite)
            .iter()
            .all(|f| f.kind != FaultKind::PgRestart));
    }

    /// CI's run (`loadtest/tests/chaos.rs`): 90 s, 3 brokers, 2 real agents, 2 replicas.
    const CI_SEED: u64 = 20261225;

    #[test]
    fn the_ci_seed_draws_every_kind_with_and_without_disk_faults() {
        let d = Duration::from_secs(90);
        for kinds in [
            FaultKind::ALL.to_vec(),
            FaultKind::ALL
                .into_iter()
                .filter(|k| *k != FaultKind::DiskFull)
                .collect(),
        ] {
            let s = schedule(CI_SEED, d, 3, 2, 2, &kinds);
            for k in &kinds {
                assert!(
                    s.iter().any(|f| f.kind == *k),
                    "seed {CI_SEED} draws no {} from {kinds:?}: {s:?}",
                    k.as_str()
                );
            }
        }
    }

    #[test]
    fn a_schedule_leaves_one_broker_untouched_and_ends_before_the_run() {
        for seed in 0..200 {
            let d = Duration::from_secs(300);
            let s = schedule(seed, d, 3, 2, 2, &FaultKind::ALL);
            for f in &s {
                assert!(f.at_ms + f.hold_ms < d.as_millis() as u64, "{f:?}");
            }
            // At every fault start, fewer than all brokers are in a fault.
            for f in s.iter().filter(|f| f.kind.on_broker()) {
                let busy: HashSet<&str> = s
                    .iter()
                    .filter(|g| g.kind.on_broker())
                    .filter(|g| g.at_ms <= f.at_ms && f.at_ms < g.at_ms + g.hold_ms + 3000)
                    .map(|g| g.target.as_str())
                    .collect();
                assert!(
                    busy.len() < 3,
                    "seed {seed}: all brokers in faults at {}",
                    f.at_ms
                );
            }
            // Never every replica at once.
            for f in s.iter().filter(|f| f.kind == FaultKind::ControlKill) {
                let busy: HashSet<&str> = s
                    .iter()
                    .filter(|g| g.kind == FaultKind::ControlKill)
                    .filter(|g| g.at_ms <= f.at_ms && f.at_ms < g.at_ms + g.hold_ms + 3000)
                    .map(|g| g.target.as_str())
                    .collect();
                assert!(
                    busy.len() < 2,
                    "seed {seed}: both replicas in faults at {}",
                    f.at_ms
                );
            }
            // One fault at a time on a target.
            for (i, f) in s.iter().enumerate() {
                for g in &s[i + 1..] {
                    if g.target == f.target {
                        assert!(g.at_ms >= f.at_ms + f.hold_ms, "seed {seed}: {f:?} {g:?}");
                    }
                }
            }
        }
        assert!(schedule(1, Duration::from_secs(60), 3, 2, 2, &[]).is_empty());
        // Without disk faults the schedule has none.
        let s = schedule(
            3,
            Duration::from_secs(600),
            3,
            2,
            2,
            &[FaultKind::BrokerKill, FaultKind::Partition],
        );
        assert!(s
            .iter()
            .all(|f| matches!(f.kind, FaultKind::BrokerKill | FaultKind::Partition)));
    }

    #[test]
    fn memory_growth_is_judged_against_the_middle_of_a_life() {
        let mut m = BTreeMap::new();
        m.insert("flat".to_owned(), vec![100 << 20; 30]);
        let none = BTreeMap::new();
        let (ok, _, _) = judge_memory(&m, &none);
        assert!(ok);
        let growing: Vec<u64> = (0..30).map(|i| (50 + i * 20) << 20).collect();
        m.insert("leaky".to_owned(), growing);
        let (ok, detail, traces) = judge_memory(&m, &none);
        assert!(!ok);
        assert!(detail.contains("leaky"), "{detail}");
        assert_eq!(traces["leaky"].samples, 30);
        // Too short a life is not judged.
        let mut m = BTreeMap::new();
        m.insert("short".to_owned(), vec![1, 1000 << 20]);
        assert!(judge_memory(&m, &none).0);
    }

    #[test]
    fn a_broker_that_takes_over_sessions_may_grow_by_them_and_no_more() {
        // 45 MiB holding 333 sessions, then 90 MiB holding 1,000 (two brokers down), as
        // the first hour-long run measured.
        let rss: Vec<u64> = (0..30)
            .map(|i| if i < 25 { 45 << 20 } else { 90 << 20 })
            .collect();
        let sessions: Vec<u64> = (0..30).map(|i| if i < 25 { 333 } else { 1000 }).collect();
        let m = BTreeMap::from([("lt-edge-1#3".to_owned(), rss.clone())]);
        let h = BTreeMap::from([("lt-edge-1#3".to_owned(), sessions)]);
        assert!(judge_memory(&m, &h).0, "{}", judge_memory(&m, &h).1);
        // The same growth with the same sessions is growth.
        let h = BTreeMap::from([("lt-edge-1#3".to_owned(), vec![333; 30])]);
        let (ok, detail, _) = judge_memory(&m, &h);
        assert!(!ok, "{detail}");
        // And more than the sessions explain is too.
        let mut leaky = rss;
        *leaky.last_mut().unwrap() = 150 << 20;
        let m = BTreeMap::from([("lt-edge-1#3".to_owned(), leaky)]);
        let h = BTreeMap::from([(
            "lt-edge-1#3".to_owned(),
            (0..30).map(|i| if i < 25 { 333 } else { 1000 }).collect(),
        )]);
        let (ok, detail, _) = judge_memory(&m, &h);
        assert!(!ok && detail.contains("667 sessions more"), "{detail}");
    }

    #[test]
    fn reachability_waits_for_open_windows_and_counts_from_their_end() {
        let t0 = Instant::now();
        let w = vec![Window {
            target: "b1".into(),
            from: t0,
            to: Some(t0 + Duration::from_secs(3)),
        }];
        assert_eq!(
            reachable_from(&w, "b1", t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(3))
        );
        assert_eq!(
            reachable_from(&w, "b2", t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(1))
        );
        // Its channel down (seen in its metrics) counts as well.
        let mut c = Vec::new();
        on_channel(&mut c, "b1", false, t0);
        assert_eq!(reachable_from(&c, "b1", t0), None);
        on_channel(&mut c, "b1", true, t0 + Duration::from_secs(2));
        assert_eq!(
            reachable_from(&c, "b1", t0),
            Some(t0 + Duration::from_secs(2))
        );
        // Ended before the acknowledgement: no wait.
        assert_eq!(
            reachable_from(&w, "b1", t0 + Duration::from_secs(4)),
            Some(t0 + Duration::from_secs(4))
        );
        let open = vec![Window {
            target: "control".into(),
            from: t0,
            to: None,
        }];
        assert_eq!(reachable_from(&open, "b1", t0), None);
    }

    #[test]
    fn a_revoked_session_held_past_the_bound_or_admitted_again_breaks_the_invariants() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let names = vec![(addr, "lt-edge-1".to_owned())];
        let t0 = Instant::now() - Duration::from_secs(20);
        let connected = |at| FleetEvent::Connected {
            index: 0,
            first_connect: None,
            since_start: Duration::from_millis(1),
            broker: addr,
            at,
        };
        let mut tally = Tally::new(2);
        let mut inv = Invariants::default();
        let none = HashMap::new();
        let standing = vec![Standing::Revoked(t0), Standing::Active];
        on_event(connected(t0), &mut tally, &standing, &[], &names, &mut inv);
        assert_eq!(
            inv.stale_admissions, 1,
            "at the acknowledgement: within the bound"
        );
        check_overdue(
            Instant::now(),
            &tally,
            &standing,
            &[],
            &names,
            &none,
            &mut inv,
        );
        assert_eq!(inv.close_violations.len(), 1, "{:?}", inv.close_violations);
        assert!(inv.close_violations[0].contains("sim-000001"));
        // Reported once.
        check_overdue(
            Instant::now(),
            &tally,
            &standing,
            &[],
            &names,
            &none,
            &mut inv,
        );
        assert_eq!(inv.close_violations.len(), 1);

        // Its broker was SIGKILLed after the session came up: the session is gone with
        // that process (its agent learns so at its next packet), not held.
        let mut gone = Invariants::default();
        let killed_after = HashMap::from([("lt-edge-1".to_owned(), t0 + Duration::from_secs(1))]);
        check_overdue(
            Instant::now(),
            &tally,
            &standing,
            &[],
            &names,
            &killed_after,
            &mut gone,
        );
        assert!(
            gone.close_violations.is_empty(),
            "{:?}",
            gone.close_violations
        );
        // Killed before it came up: this session is the new process's, and overdue.
        let mut earlier = Invariants::default();
        let killed_before = HashMap::from([("lt-edge-1".to_owned(), t0 - Duration::from_secs(1))]);
        check_overdue(
            Instant::now(),
            &tally,
            &standing,
            &[],
            &names,
            &killed_before,
            &mut earlier,
        );
        assert_eq!(earlier.close_violations.len(), 1);

        // While its broker cannot hear control, it is not due yet.
        let mut quiet = Invariants::default();
        let partition = vec![Window {
            target: "lt-edge-1".into(),
            from: t0,
            to: None,
        }];
        check_overdue(
            Instant::now(),
            &tally,
            &standing,
            &partition,
            &names,
            &none,
            &mut quiet,
        );
        assert!(quiet.close_violations.is_empty());

        // A fresh session long after the acknowledgement, on a broker that could hear.
        on_event(
            connected(Instant::now()),
            &mut tally,
            &standing,
            &[],
            &names,
            &mut inv,
        );
        assert_eq!(inv.admitted_again.len(), 1, "{:?}", inv.admitted_again);
        // An active appliance's sessions are nobody's business.
        let mut calm = Invariants::default();
        check_overdue(
            Instant::now(),
            &tally,
            &[Standing::Active, Standing::Active],
            &[],
            &names,
            &none,
            &mut calm,
        );
        assert!(calm.close_violations.is_empty());
    }
}
