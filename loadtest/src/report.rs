//! The JSON report: the fields issue 7 names (those a scenario cannot measure are `null`,
//! never invented), then the detail behind them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::measure::{Machine, UdpCounters};

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `storm`, `steady`, `commands`, `revoke`, `churn` or `drain`.
    pub scenario: &'static str,
    /// `quic` or `tcp`: the transport every appliance (and the baseline) used.
    pub transport: crate::cli::Transport,
    /// Appliances simulated.
    pub appliances: usize,
    /// Brokers started.
    pub brokers: usize,
    /// Appliances that connected (first sessions) divided by the seconds from the start
    /// until the last of them connected.
    pub handshakes_per_sec: Option<f64>,
    /// Median time from an appliance's start to its first session, ms.
    pub connect_p50_ms: Option<f64>,
    /// 99th percentile of the same, ms.
    pub connect_p99_ms: Option<f64>,
    /// Resident memory of the brokers (summed): after the fleet connected (`storm`) or at
    /// the end of the hold (`steady`).
    pub broker_rss_bytes: Option<u64>,
    /// (`broker_rss_bytes` − the brokers' memory before any appliance connected) /
    /// appliances connected.
    pub broker_bytes_per_conn: Option<f64>,
    /// CPU time the brokers used from the first connection attempt to the end of the
    /// scenario, seconds.
    pub broker_cpu_seconds: Option<f64>,
    /// `commands`: median time from sending `POST /v1/appliances/{id}/exec` to its final
    /// NDJSON line, successful commands, ms (`null` in other scenarios).
    pub command_rtt_p50_ms: Option<f64>,
    /// `commands`: 99th percentile of the same, ms.
    pub command_rtt_p99_ms: Option<f64>,
    /// `revoke`: median time from sending `POST /v1/appliances/{id}/revoke` to the
    /// appliance's agent seeing its session closed as revoked, ms.
    pub revoke_to_close_p50_ms: Option<f64>,
    /// `revoke`: 99th percentile of the same, ms.
    pub revoke_to_close_p99_ms: Option<f64>,
    /// `revoke`: sessions revoked certificates got again (one fresh connection tried per
    /// revoked appliance, plus the fleet's own agents); must be 0.
    pub revoked_reconnects_accepted: Option<u64>,
    /// Failed attempts and lost sessions by kind (`not_connected`: appliances still without
    /// a session when the connect timeout ended).
    pub errors: BTreeMap<String, u64>,
    /// The machine.
    pub machine: Machine,

    /// Everything else.
    #[serde(flatten)]
    pub detail: Detail,
    /// The same scenario against a bare echo server on the same transport (`--baseline`:
    /// quinn over QUIC, tokio-rustls over TCP): its headline fields and its `samples`
    /// (the same shape as Tether's, the server in the `broker_*` fields).
    pub baseline: Option<serde_json::Value>,
    /// Tether divided by baseline (`--baseline`).
    pub ratios: Option<serde_json::Value>,
}

/// The detail behind the headline fields.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Detail {
    /// `tether-loadtest` version.
    pub version: &'static str,
    /// When the scenario started (RFC 3339, UTC).
    pub started_at: String,
    /// `--concurrency`.
    pub concurrency: Option<usize>,
    /// Whether an unmeasured storm of the bare clients ran before the measured phases
    /// (with `--baseline`), so that both start with this process's heap and the kernel's
    /// socket caches warm.
    pub baseline_warm_up: bool,
    /// How long `steady` held the fleet, seconds.
    pub hold_secs: Option<f64>,
    /// Appliances with a first session.
    pub connected: usize,
    /// Appliances with a session at the end of the scenario.
    pub connected_at_end: usize,
    /// Seconds from the start until the last first session.
    pub connect_secs: Option<f64>,
    /// 90th percentile connect time, ms.
    pub connect_p90_ms: Option<f64>,
    /// Slowest connect time, ms.
    pub connect_max_ms: Option<f64>,
    /// Sessions that came up again after one was lost.
    pub reconnects: u64,
    /// Brokers' memory before any appliance connected, bytes.
    pub broker_rss_before_bytes: Option<u64>,
    /// Brokers' memory once every appliance connected, bytes.
    pub broker_rss_after_connect_bytes: Option<u64>,
    /// Broker CPU per connected appliance during the connect phase, µs (handshake,
    /// session setup and the heartbeats of the connected meanwhile).
    pub broker_cpu_per_handshake_us: Option<f64>,
    /// Broker CPU while holding the fleet (`steady`), percent of one core.
    pub broker_hold_cpu_percent: Option<f64>,
    /// Control's memory at the end, bytes.
    pub control_rss_bytes: Option<u64>,
    /// Control's CPU during the scenario, seconds (what `commands` and `revoke` cost it).
    pub control_cpu_seconds: Option<f64>,
    /// This process's memory at the end (the whole simulated fleet), bytes.
    pub simulator_rss_bytes: Option<u64>,
    /// This process's CPU during the scenario, seconds.
    pub simulator_cpu_seconds: Option<f64>,
    /// Appliances enrolled by this run (the rest came from the pool).
    pub enrolled_this_run: usize,
    /// Seconds this run spent enrolling.
    pub enroll_secs: f64,
    /// UDP buffers and drops.
    pub udp: UdpReport,
    /// Limits in force.
    pub limits: Limits,
    /// How often the connect phase was sampled, ms (`--sample-every`; after it, every
    /// second or this, whichever is longer).
    pub sample_every_ms: Option<f64>,
    /// Samples from the start of the scenario: every `sample_every_ms` while the fleet
    /// connects, then every second; at most [`MAX_SAMPLES`] (a long hold is thinned).
    pub samples: Vec<Sample>,
    /// `commands`: what was sent and answered.
    pub commands: Option<crate::ops::CommandsDetail>,
    /// `revoke`: what was revoked, closed, and refused again.
    pub revoke: Option<crate::ops::RevokeDetail>,
    /// `churn`: disconnections, reconnect times, session counts at the end.
    pub churn: Option<crate::motion::ChurnDetail>,
    /// `drain`: the drained broker's appliances moving to the others.
    pub drain: Option<crate::motion::DrainDetail>,
    /// `chaos`: the faults injected, in order (`kind`, `at_ms`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<Vec<crate::chaos::Fault>>,
    /// `chaos`: every invariant's verdict (`name`, `ok`, `detail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invariants: Option<Vec<crate::chaos::Invariant>>,
    /// `chaos`: the seed, the work done, worst cases, memory per process life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<crate::chaos::ChaosDetail>,
}

/// UDP buffers and drops.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UdpReport {
    /// Client endpoints (sockets) the fleet shared.
    pub client_endpoints: usize,
    /// `SO_RCVBUF` of a client socket as the kernel reports it.
    pub client_recv_buffer_bytes: usize,
    /// `SO_SNDBUF` of a client socket as the kernel reports it.
    pub client_send_buffer_bytes: usize,
    /// What each broker says the kernel granted its socket (`udp_recv_buffer_bytes`).
    pub broker_recv_buffer_bytes: Vec<Option<u64>>,
    /// Machine-wide UDP drops during the scenario (`/proc/net/snmp`).
    pub drops: UdpCounters,
}

/// Limits in force.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Limits {
    /// RLIMIT_NOFILE after raising the soft limit.
    pub nofile: u64,
    /// The spawned brokers' open-files limits as they run (inherited from this process;
    /// each TCP connection holds one), in start order; empty when not spawned here.
    pub broker_nofile: Vec<Option<u64>>,
    /// The baseline server's likewise (`--baseline`).
    pub baseline_nofile: Option<u64>,
    /// `net.core.rmem_max`.
    pub rmem_max: Option<u64>,
    /// `net.core.wmem_max`.
    pub wmem_max: Option<u64>,
}

/// Most samples a phase keeps (a 100 ms connect phase of five minutes, or a one-second
/// hold of fifty).
pub const MAX_SAMPLES: usize = 3000;

/// One moment of a run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the scenario started.
    pub t: f64,
    /// Appliances with a session.
    pub connected: usize,
    /// Brokers' resident memory, bytes (null when not measured: --control).
    pub broker_rss_bytes: Option<u64>,
    /// Brokers' CPU since the scenario started, seconds (null when not measured).
    pub broker_cpu_seconds: Option<f64>,
    /// This process's resident memory, bytes.
    pub simulator_rss_bytes: u64,
}

/// Milliseconds (3 decimals) of a histogram value in µs.
pub fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Round to 3 decimals.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Report {
    /// `chaos`: the invariants that broke and the seed, if any broke.
    pub fn broken_invariants(&self) -> Option<String> {
        let broken: Vec<&str> = self
            .detail
            .invariants
            .as_ref()?
            .iter()
            .filter(|i| !i.ok)
            .map(|i| i.name)
            .collect();
        if broken.is_empty() {
            return None;
        }
        let seed = self
            .detail
            .chaos
            .as_ref()
            .map(|c| c.seed)
            .unwrap_or_default();
        Some(format!(
            "invariants broken: {} (seed {seed}: repeat with --seed {seed})",
            broken.join(", ")
        ))
    }

    /// The few lines a person reads first.
    pub fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "{} over {} with {} appliances on {} broker(s): {} connected ({} at the end), {} handshakes/s, \
             connect p50 {} ms, p99 {} ms",
            self.scenario,
            self.transport.as_str(),
            self.appliances,
            self.brokers,
            self.detail.connected,
            self.detail.connected_at_end,
            f(self.handshakes_per_sec),
            f(self.connect_p50_ms),
            f(self.connect_p99_ms),
        );
        s.push_str(&format!(
            "\nbroker: rss {} MiB, {} bytes/connection, cpu {} s ({} µs per connect{})",
            self.broker_rss_bytes
                .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                .unwrap_or_else(|| "-".into()),
            f(self.broker_bytes_per_conn),
            f(self.broker_cpu_seconds),
            f(self.detail.broker_cpu_per_handshake_us),
            self.detail
                .broker_hold_cpu_percent
                .map(|p| format!(", {p:.1}% of a core while holding"))
                .unwrap_or_default(),
        ));
        if let Some(r) = &self.ratios {
            let get = |k: &str| {
                r.get(k)
                    .and_then(|v| v.as_f64())
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "-".into())
            };
            s.push_str(&format!(
                "\nTether / {}: handshakes/s x{}, bytes/connection x{}, CPU per connect x{}, connect p99 x{}",
                self.transport.baseline_name(),
                get("handshakes_per_sec"),
                get("broker_bytes_per_conn"),
                get("broker_cpu_per_handshake_us"),
                get("connect_p99_ms"),
            ));
        }
        if let Some(c) = &self.detail.commands {
            s.push_str(&format!(
                "\ncommands: {} sent of {} due at {}/s, {} ok, round trip p50 {} ms, p99 {} ms",
                c.sent,
                c.due,
                c.rate,
                c.ok,
                f(c.rtt_p50_ms),
                f(c.rtt_p99_ms)
            ));
        }
        if let Some(r) = &self.detail.revoke {
            s.push_str(&format!(
                "\nrevoke: {} revoked, {} closed, revoke to close p50 {} ms, p99 {} ms; \
                 reconnects with revoked certificates: {} tried, {} accepted",
                r.revoked,
                r.closed,
                f(r.close_p50_ms),
                f(r.close_p99_ms),
                r.reconnects_tried,
                r.reconnects_accepted
            ));
        }
        if self.errors.is_empty() {
            s.push_str("\nerrors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            s.push_str(&format!("\nerrors: {}", list.join(", ")));
        }
        if let Some(c) = &self.detail.chaos {
            let kinds: Vec<String> = c
                .faults_by_kind
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            s.push_str(&format!(
                "\nchaos seed {}: faults {}",
                c.seed,
                if kinds.is_empty() {
                    "none".to_owned()
                } else {
                    kinds.join(", ")
                }
            ));
            for (k, why) in &c.unavailable {
                s.push_str(&format!("\n  no {k}: {why}"));
            }
        }
        for i in self.detail.invariants.iter().flatten() {
            s.push_str(&format!(
                "\n{} {}: {}",
                if i.ok { "ok  " } else { "FAIL" },
                i.name,
                i.detail
            ));
        }
        s
    }
}
