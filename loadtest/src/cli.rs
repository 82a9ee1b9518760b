//! Command line of `tether-loadtest`: every flag documented, with its default and the
//! environment variable that overrides it (names in [`env`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Environment variables that override flags (a flag given on the command line wins).
pub mod env {
    /// `--spawn`.
    pub const SPAWN: &str = "TETHER_LOADTEST_SPAWN";
    /// `--control`.
    pub const CONTROL: &str = "TETHER_LOADTEST_CONTROL";
    /// `--config-dir`: the same variable as the `tether` CLI's.
    pub const CONFIG_DIR: &str = "TETHER_CONFIG_DIR";
    /// `--allow-non-loopback`.
    pub const ALLOW_NON_LOOPBACK: &str = "TETHER_LOADTEST_ALLOW_NON_LOOPBACK";
    /// `--scenario`.
    pub const SCENARIO: &str = "TETHER_LOADTEST_SCENARIO";
    /// `--appliances`.
    pub const APPLIANCES: &str = "TETHER_LOADTEST_APPLIANCES";
    /// `--duration`.
    pub const DURATION: &str = "TETHER_LOADTEST_DURATION";
    /// `--brokers`.
    pub const BROKERS: &str = "TETHER_LOADTEST_BROKERS";
    /// `--concurrency`.
    pub const CONCURRENCY: &str = "TETHER_LOADTEST_CONCURRENCY";
    /// `--report`.
    pub const REPORT: &str = "TETHER_LOADTEST_REPORT";
    /// `--pool`.
    pub const POOL: &str = "TETHER_LOADTEST_POOL";
    /// `--bin-dir`.
    pub const BIN_DIR: &str = "TETHER_LOADTEST_BIN_DIR";
    /// `--client-endpoints`.
    pub const CLIENT_ENDPOINTS: &str = "TETHER_LOADTEST_CLIENT_ENDPOINTS";
    /// `--connect-timeout`.
    pub const CONNECT_TIMEOUT: &str = "TETHER_LOADTEST_CONNECT_TIMEOUT";
    /// `--enroll-concurrency`.
    pub const ENROLL_CONCURRENCY: &str = "TETHER_LOADTEST_ENROLL_CONCURRENCY";
    /// `--heartbeat-interval`.
    pub const HEARTBEAT_INTERVAL: &str = "TETHER_LOADTEST_HEARTBEAT_INTERVAL";
    /// `--udp-buffer`.
    pub const UDP_BUFFER: &str = "TETHER_LOADTEST_UDP_BUFFER";
    /// `--keep-logs`.
    pub const KEEP_LOGS: &str = "TETHER_LOADTEST_KEEP_LOGS";
    /// `--baseline`.
    pub const BASELINE: &str = "TETHER_LOADTEST_BASELINE";
    /// `--no-progress`.
    pub const NO_PROGRESS: &str = "TETHER_LOADTEST_NO_PROGRESS";
    /// `--rate`.
    pub const RATE: &str = "TETHER_LOADTEST_RATE";
    /// `--max-in-flight`.
    pub const MAX_IN_FLIGHT: &str = "TETHER_LOADTEST_MAX_IN_FLIGHT";
    /// `--revoke`.
    pub const REVOKE: &str = "TETHER_LOADTEST_REVOKE";
    /// `--revoke-concurrency`.
    pub const REVOKE_CONCURRENCY: &str = "TETHER_LOADTEST_REVOKE_CONCURRENCY";
    /// `--rejoin-delay`.
    pub const REJOIN_DELAY: &str = "TETHER_LOADTEST_REJOIN_DELAY";
    /// `--drain-jitter`.
    pub const DRAIN_JITTER: &str = "TETHER_LOADTEST_DRAIN_JITTER";
    /// `--transport`.
    pub const TRANSPORT: &str = "TETHER_LOADTEST_TRANSPORT";
    /// `--sample-every`.
    pub const SAMPLE_EVERY: &str = "TETHER_LOADTEST_SAMPLE_EVERY";
    /// `--seed`.
    pub const SEED: &str = "TETHER_LOADTEST_SEED";
    /// `--control-replicas`.
    pub const CONTROL_REPLICAS: &str = "TETHER_LOADTEST_CONTROL_REPLICAS";
    /// `--pg-url`.
    pub const PG_URL: &str = "TETHER_LOADTEST_PG_URL";
}

/// Default of `--duration`: how long `steady` holds the fleet.
pub const DEFAULT_DURATION: &str = "30s";
/// Default of `--concurrency` for `steady`: what the broker admits without refusing
/// (`storm` has no default limit: the storm is its subject).
pub const DEFAULT_STEADY_CONCURRENCY: usize = 1024;
/// Default of `--brokers` (`drain` needs a second broker to go to: 2 there).
pub const DEFAULT_BROKERS: usize = 1;
/// Default of `--brokers` for `drain`.
pub const DEFAULT_DRAIN_BROKERS: usize = 2;
/// Default of `--rejoin-delay`: the longest a kicked appliance waits before coming back.
pub const DEFAULT_REJOIN_DELAY: &str = "1s";
/// Default of `--drain-jitter`: the brokers' GoAway reconnect jitter (the broker's own
/// default).
pub const DEFAULT_DRAIN_JITTER: &str = "5s";
/// Default of `--client-endpoints`: QUIC endpoints (UDP sockets) the fleet shares, one
/// per core of this machine's usual size.
pub const DEFAULT_CLIENT_ENDPOINTS: usize = 2;
/// Default of `--connect-timeout`: how long the fleet may take to connect.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "120s";
/// Default of `--sample-every`: fine enough to draw a storm of a few seconds (30 points
/// in three seconds), for a few reads of `/proc` per tick.
pub const DEFAULT_SAMPLE_EVERY: &str = "100ms";
/// Default of `--enroll-concurrency`.
pub const DEFAULT_ENROLL_CONCURRENCY: usize = 16;
/// Default of `--heartbeat-interval` (what brokers ask agents for): the protocol's
/// default (`tether_proto::session::DEFAULT_HEARTBEAT_INTERVAL`).
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "25s";
/// Default of `--udp-buffer`: receive and send buffer asked for each client socket
/// (32 MiB; the kernel caps it at `net.core.rmem_max` / `wmem_max`).
pub const DEFAULT_UDP_BUFFER: usize = 32 * 1024 * 1024;

/// Default of `--rate`: commands per second in `commands`.
pub const DEFAULT_RATE: f64 = 10.0;
/// Default of `--max-in-flight`: commands waiting for their answer at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Default of `--revoke`: appliances `revoke` revokes.
pub const DEFAULT_REVOKE: usize = 10;
/// Default of `--revoke-concurrency`: revocations sent at once.
pub const DEFAULT_REVOKE_CONCURRENCY: usize = 1;

/// The Tether fleet simulator.
#[derive(Debug, Parser)]
#[command(name = "tether-loadtest", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run a scenario and write a report.
    Run(RunArgs),
    /// The bare echo server of `--baseline` (started by `run`, not by hand).
    #[command(hide = true)]
    BaselineServer(crate::baseline::ServerArgs),
}

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Every appliance connects at once (bounded by --concurrency); measures connect
    /// times and the handshake rate.
    Storm,
    /// Connect every appliance, then hold them with heartbeats for --duration; measures
    /// broker memory and CPU.
    Steady,
    /// Connect every appliance, then send --rate commands per second (`true`) to random
    /// connected appliances through control's API for --duration; measures the round trip.
    Commands,
    /// Connect every appliance, then revoke --revoke of them through control's API;
    /// measures revocation to session close and checks they cannot connect again.
    Revoke,
    /// Connect every appliance, then for --duration disconnect --rate random ones per
    /// second (a clean close, as a reboot) and bring each back after up to
    /// --rejoin-delay; measures reconnect times and that the brokers' session counts
    /// match the fleet's afterwards.
    Churn,
    /// Connect every appliance over --brokers (at least 2), then drain the first broker
    /// (SIGTERM: GoAway with up to --drain-jitter of delay); measures how fast its
    /// appliances come back on the others and that none is lost.
    Drain,
    /// Control (--control-replicas on PostgreSQL, default one on SQLite), --brokers
    /// (default 3) and the fleet under a schedule of faults drawn from --seed for
    /// --duration (broker SIGKILL and drain, SIGKILL of control or of one replica,
    /// PostgreSQL crashed and restarted, partitions between a broker and control, a full
    /// disk under a broker), with commands (--rate per second), revocations, disables and
    /// enables and churn going on; checks the invariants while it runs and at the end, and
    /// exits non-zero naming any that broke.
    Chaos,
}

/// The transport every simulated appliance uses (one per run: a run measures one
/// transport, never the agents' `auto` choice between them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC: the fleet shares --client-endpoints UDP sockets.
    #[default]
    Quic,
    /// TLS 1.3 over TCP with yamux streams (`docs/PROTOCOL.md` §13): one socket per
    /// appliance, in this process and in the broker.
    Tcp,
}

impl Transport {
    /// The agents' setting for it.
    pub fn mode(self) -> tether_agent::config::TransportMode {
        match self {
            Transport::Quic => tether_agent::config::TransportMode::Quic,
            Transport::Tcp => tether_agent::config::TransportMode::Tcp,
        }
    }

    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }

    /// What reports call `--baseline`'s server on this transport.
    pub fn baseline_name(self) -> &'static str {
        match self {
            Transport::Quic => "bare quinn",
            Transport::Tcp => "bare TLS/TCP",
        }
    }
}

impl RunArgs {
    /// The agent settings of every simulated appliance: the defaults, on `--transport`.
    pub fn agent_config(&self) -> tether_agent::AgentConfig {
        tether_agent::AgentConfig {
            transport: self.transport.mode(),
            ..tether_agent::AgentConfig::default()
        }
    }

    /// `--concurrency`, or the scenario's default.
    pub fn effective_concurrency(&self) -> Option<usize> {
        self.concurrency.or(match self.scenario {
            Scenario::Storm => None,
            Scenario::Steady
            | Scenario::Commands
            | Scenario::Revoke
            | Scenario::Churn
            | Scenario::Drain
            | Scenario::Chaos => Some(DEFAULT_STEADY_CONCURRENCY),
        })
    }

    /// `--brokers`, or the scenario's default.
    pub fn effective_brokers(&self) -> usize {
        self.brokers.unwrap_or(match self.scenario {
            Scenario::Drain => DEFAULT_DRAIN_BROKERS,
            Scenario::Chaos => crate::chaos::DEFAULT_BROKERS,
            _ => DEFAULT_BROKERS,
        })
    }
}

impl Scenario {
    /// Whether it calls control's API, with an operator credential.
    pub fn needs_operator(self) -> bool {
        matches!(
            self,
            Scenario::Commands | Scenario::Revoke | Scenario::Chaos
        )
    }

    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Storm => "storm",
            Scenario::Steady => "steady",
            Scenario::Commands => "commands",
            Scenario::Revoke => "revoke",
            Scenario::Churn => "churn",
            Scenario::Drain => "drain",
            Scenario::Chaos => "chaos",
        }
    }
}

/// `tether-loadtest run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Start control and the brokers as child processes on 127.0.0.1 (they are stopped
    /// when the run ends, on Ctrl-C and on a panic).
    #[arg(long, env = env::SPAWN, conflicts_with = "control", required_unless_present = "control")]
    pub spawn: bool,

    /// Run against the cluster of this control (its HTTPS URL) instead, as the operator
    /// logged in under --config-dir: appliances are registered and enrolled through its
    /// API, and the fleet connects to the brokers it lists. The brokers' memory and CPU
    /// are not measured (null in the report); `drain` needs --spawn.
    #[arg(long, env = env::CONTROL, value_name = "URL")]
    pub control: Option<String>,

    /// --control: the operator credential (`tether login` writes it) [default: the
    /// platform config directory's `tether/`, as the `tether` CLI].
    #[arg(long, env = env::CONFIG_DIR)]
    pub config_dir: Option<PathBuf>,

    /// --control: allow brokers on addresses other than loopback (load tests send traffic
    /// only to 127.0.0.0/8 and ::1 unless told otherwise).
    #[arg(long, env = env::ALLOW_NON_LOOPBACK)]
    pub allow_non_loopback: bool,

    /// The scenario.
    #[arg(long, value_enum, env = env::SCENARIO)]
    pub scenario: Scenario,

    /// The transport every appliance uses: QUIC, or TLS over TCP (then each appliance
    /// holds a socket here and one in the broker: the open-files limit must allow it).
    /// With --baseline the bare server speaks the same transport.
    #[arg(long, value_enum, env = env::TRANSPORT, default_value_t = Transport::Quic)]
    pub transport: Transport,

    /// Virtual appliances (each one a real agent with its own certificate).
    #[arg(long, env = env::APPLIANCES, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub appliances: u64,

    /// How long `steady` holds the connected fleet, `commands` sends commands and `chaos`
    /// injects faults.
    #[arg(long, env = env::DURATION, default_value = DEFAULT_DURATION, value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Brokers to start; appliances spread over them [default: 1; 2 for drain].
    #[arg(long, env = env::BROKERS, value_parser = clap::value_parser!(u64).range(1..=16).map(|v| v as usize))]
    pub brokers: Option<usize>,

    /// At most this many appliances connecting at the same time (a permit is held from
    /// an agent's start to its first session) [default: all at once for storm, 1024 for
    /// steady, whose subject is holding the fleet rather than admitting it].
    #[arg(long, env = env::CONCURRENCY, value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub concurrency: Option<usize>,

    /// Write the JSON report here (a summary is also printed), and next to it the same
    /// report as a page with charts (FILE with the extension `.html`).
    #[arg(long, env = env::REPORT)]
    pub report: Option<PathBuf>,

    /// The pool of enrolled appliances, kept between runs with control's data directory
    /// (only missing appliances enroll) [default: target/loadtest-pool next to this
    /// executable's target directory, else ~/.cache/tether-loadtest/pool].
    #[arg(long, env = env::POOL)]
    pub pool: Option<PathBuf>,

    /// Where the `tether-control` and `tether-broker` executables are [default: next to
    /// this executable].
    #[arg(long, env = env::BIN_DIR)]
    pub bin_dir: Option<PathBuf>,

    /// QUIC client endpoints (UDP sockets) shared by the fleet.
    #[arg(long, env = env::CLIENT_ENDPOINTS, default_value_t = DEFAULT_CLIENT_ENDPOINTS, value_parser = clap::value_parser!(u64).range(1..=64).map(|v| v as usize))]
    pub client_endpoints: usize,

    /// Give up on appliances not connected after this long (they count as
    /// `not_connected` errors).
    #[arg(long, env = env::CONNECT_TIMEOUT, default_value = DEFAULT_CONNECT_TIMEOUT, value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Enrollments running at once when the pool needs more appliances.
    #[arg(long, env = env::ENROLL_CONCURRENCY, default_value_t = DEFAULT_ENROLL_CONCURRENCY, value_parser = clap::value_parser!(u64).range(1..=1024).map(|v| v as usize))]
    pub enroll_concurrency: usize,

    /// Heartbeat interval the brokers ask the agents for.
    #[arg(long, env = env::HEARTBEAT_INTERVAL, default_value = DEFAULT_HEARTBEAT_INTERVAL, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// UDP receive/send buffer (bytes) asked for each client socket.
    #[arg(long, env = env::UDP_BUFFER, default_value_t = DEFAULT_UDP_BUFFER)]
    pub udp_buffer: usize,

    /// Run the same scenario, after Tether's, against a bare mutual-TLS echo server on the
    /// same transport (quinn with the broker's transport settings, or tokio-rustls over
    /// TCP), and report Tether/baseline ratios.
    #[arg(long, env = env::BASELINE)]
    pub baseline: bool,

    /// Keep the run directory (control and broker logs) even when the run succeeds.
    #[arg(long, env = env::KEEP_LOGS)]
    pub keep_logs: bool,

    /// No progress bars (they are also off when stderr is not a terminal).
    #[arg(long, env = env::NO_PROGRESS)]
    pub no_progress: bool,

    /// Sample the servers' memory and CPU and the connected count this often while the
    /// fleet connects (and while a broker drains); once it is connected, every second or
    /// this, whichever is longer. Long runs keep at most a few thousand samples (older
    /// ones after the connect phase are thinned first).
    #[arg(long, env = env::SAMPLE_EVERY, default_value = DEFAULT_SAMPLE_EVERY, value_parser = parse_sample_every)]
    pub sample_every: Duration,

    /// `commands` and `chaos`: commands per second, spread over random connected
    /// appliances;
    /// `churn`: appliances disconnected per second.
    #[arg(long, env = env::RATE, default_value_t = DEFAULT_RATE, value_parser = parse_rate)]
    pub rate: f64,

    /// `churn`: a disconnected appliance comes back after a random delay up to this.
    #[arg(long, env = env::REJOIN_DELAY, default_value = DEFAULT_REJOIN_DELAY, value_parser = humantime::parse_duration)]
    pub rejoin_delay: Duration,

    /// `drain`: the brokers tell drained appliances to reconnect after a random delay up
    /// to this (GoAway's jitter).
    #[arg(long, env = env::DRAIN_JITTER, default_value = DEFAULT_DRAIN_JITTER, value_parser = humantime::parse_duration)]
    pub drain_jitter: Duration,

    /// `commands`: at most this many commands waiting for their answer at once (a command
    /// due while all are busy is skipped and counted as `exec_in_flight_limit`).
    #[arg(long, env = env::MAX_IN_FLIGHT, default_value_t = DEFAULT_MAX_IN_FLIGHT, value_parser = clap::value_parser!(u64).range(1..=65_536).map(|v| v as usize))]
    pub max_in_flight: usize,

    /// `revoke`: how many connected appliances to revoke (at most --appliances).
    #[arg(long, env = env::REVOKE, default_value_t = DEFAULT_REVOKE, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|v| v as usize))]
    pub revoke: usize,

    /// `chaos`: the seed the fault schedule (and the work's choices) are drawn from; the
    /// same seed, duration, broker count and available fault kinds give the same
    /// schedule [default: a random one, printed].
    #[arg(long, env = env::SEED)]
    pub seed: Option<u64>,

    /// `chaos`: control replicas. 1 runs one control on its SQLite store (the pool's); 2
    /// or more run that many replicas on one PostgreSQL database (the pool's store copied
    /// into it after enrollment), faults `control_kill` one replica at a time and adds
    /// `pg_restart` (PostgreSQL crashed and started again). PostgreSQL is a server of the
    /// run's own (scripts/pg: initdb under the run directory, as the `postgres` user when
    /// root), unless --pg-url names one.
    #[arg(long, env = env::CONTROL_REPLICAS, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8).map(|v| v as usize))]
    pub control_replicas: usize,

    /// `chaos` with --control-replicas 2 or more: an empty PostgreSQL database to use
    /// instead of a server of the run's own (`pg_restart` is then left out: the run
    /// does not restart a server it did not start).
    #[arg(long, env = env::PG_URL)]
    pub pg_url: Option<String>,

    /// `revoke`: revocations sent at once.
    #[arg(long, env = env::REVOKE_CONCURRENCY, default_value_t = DEFAULT_REVOKE_CONCURRENCY, value_parser = clap::value_parser!(u64).range(1..=256).map(|v| v as usize))]
    pub revoke_concurrency: usize,
}

/// `--rate`: a positive number of commands per second (at most 100,000).
fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 && v <= 100_000.0 {
        Ok(v)
    } else {
        Err("must be above 0 and at most 100000".into())
    }
}

/// `--sample-every`: a duration from 10 ms (finer costs more than it shows) to a minute.
fn parse_sample_every(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&d) {
        Ok(d)
    } else {
        Err("must be from 10ms to 60s".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").expect("run subcommand");
        for arg in run.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "--{id} has no help");
        }
    }

    #[test]
    fn the_heartbeat_default_is_the_protocols() {
        assert_eq!(
            humantime::parse_duration(DEFAULT_HEARTBEAT_INTERVAL).expect("a duration"),
            tether_proto::session::DEFAULT_HEARTBEAT_INTERVAL
        );
    }

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from([
            "tether-loadtest",
            "run",
            "--spawn",
            "--scenario",
            "storm",
            "--appliances",
            "10",
        ])
        .expect("parse");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert!(args.spawn);
        assert_eq!(args.scenario, Scenario::Storm);
        assert_eq!(args.appliances, 10);
        assert_eq!(args.duration, Duration::from_secs(30));
        assert_eq!(args.transport, Transport::Quic);
        assert_eq!(args.sample_every, Duration::from_millis(100));
        assert!(parse_sample_every("5ms").is_err());
        assert_eq!(parse_sample_every("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(
            args.agent_config().transport,
            tether_agent::config::TransportMode::Quic
        );
        assert_eq!(args.effective_brokers(), DEFAULT_BROKERS);
        let drain = RunArgs {
            scenario: Scenario::Drain,
            ..args.clone()
        };
        assert_eq!(drain.effective_brokers(), DEFAULT_DRAIN_BROKERS);
        assert_eq!(
            drain.effective_concurrency(),
            Some(DEFAULT_STEADY_CONCURRENCY)
        );
        assert_eq!(args.concurrency, None);
        assert_eq!(args.effective_concurrency(), None);
        let steady = RunArgs {
            scenario: Scenario::Steady,
            ..args.clone()
        };
        assert_eq!(
            steady.effective_concurrency(),
            Some(DEFAULT_STEADY_CONCURRENCY)
        );
        let limited = RunArgs {
            concurrency: Some(7),
            ..steady
        };
        assert_eq!(limited.effective_concurrency(), Some(7));
    }

    #[test]
    fn transport_tcp_is_what_every_agent_uses() {
        let cli = Cli::try_parse_from([
            "tether-loadtest",
            "run",
            "--spawn",
            "--scenario",
            "storm",
            "--appliances",
            "10",
            "--transport",
            "tcp",
        ])
        .expect("parse");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.transport, Transport::Tcp);
        assert_eq!(args.transport.as_str(), "tcp");
        // Never `auto`: a run measures one transport.
        assert_eq!(
            args.agent_config().transport,
            tether_agent::config::TransportMode::Tcp
        );
        assert!(Cli::try_parse_from([
            "tether-loadtest",
            "run",
            "--spawn",
            "--scenario",
            "storm",
            "--appliances",
            "10",
            "--transport",
            "auto",
        ])
        .is_err());
    }

    #[test]
    fn rate_must_be_positive() {
        assert_eq!(parse_rate("50"), Ok(50.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("NaN").is_err());
        assert!(parse_rate("x").is_err());
    }
}
