//! The seeded chaos run CI makes: a small fleet on three brokers under about a minute and
//! a half of faults (broker SIGKILL and drain, control SIGKILL, partitions between a
//! broker and control, a full disk where a tmpfs can be mounted, a real agent aborting
//! between writing a renewed key and its certificate), with commands,
//! revocations, disables and enables and churn going on. `tether-loadtest` exits non-zero
//! when an invariant breaks; this test also reads the report: the faults injected, each
//! invariant's verdict and evidence.
//!
//! Needs `tether-control`, `tether-broker` and `tether` next to `tether-loadtest`
//! (`cargo build --workspace --bins` first, as CI does). The seed is fixed so a failure
//! can be repeated: `tether-loadtest run --spawn --scenario chaos --appliances 40
//! --duration 90s --seed 20261208`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The seed of CI's run.
const SEED: &str = "20261208";
/// Enrollment on a cold pool, the faults, the wait for the fleet and the checks.
const RUN_BOUND: Duration = Duration::from_secs(420);

/// The invariants the issue names, by the report's names.
const INVARIANTS: [&str; 9] = [
    "revocation_closes_sessions",
    "revoked_never_admitted_again",
    "changes_in_force_on_every_broker",
    "audit_log_verifies",
    "commands_end_exactly_once",
    "fleet_reconnects_after_faults",
    "agent_credentials_survive_crash",
    "memory_bounded",
    "no_unexpected_exit",
];

#[test]
fn a_seeded_chaos_run_keeps_every_invariant() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_tether-loadtest"));
    let bin_dir = exe.parent().expect("bin dir").to_owned();
    for bin in ["tether-control", "tether-broker", "tether"] {
        assert!(
            bin_dir.join(bin).is_file(),
            "{bin} is not built in {}: run `cargo build --workspace --bins` first",
            bin_dir.display()
        );
    }
    let pool = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loadtest-chaos-pool");
    let out = tempfile::tempdir().expect("tempdir");
    let report_path = out.path().join("chaos.json");
    let mut child = Command::new(&exe)
        .args(["run", "--spawn", "--scenario", "chaos"])
        .args(["--appliances", "40", "--duration", "90s", "--seed", SEED])
        .args(["--rate", "2", "--no-progress", "--connect-timeout", "60s"])
        .arg("--pool")
        .arg(&pool)
        .arg("--report")
        .arg(&report_path)
        .stdin(Stdio::null())
        .spawn()
        .expect("start tether-loadtest");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > RUN_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the chaos run did not finish within {RUN_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&report_path).expect("the report is written even when an invariant breaks"),
    )
    .expect("report is JSON");
    let broken: Vec<&serde_json::Value> = report["invariants"]
        .as_array()
        .expect("invariants")
        .iter()
        .filter(|i| i["ok"] != true)
        .collect();
    assert!(
        status.success() && broken.is_empty(),
        "tether-loadtest {status}; invariants broken (seed {SEED}): {broken:#?}"
    );

    // The shapes other tools read.
    assert_eq!(report["scenario"], "chaos");
    let faults = report["faults"].as_array().expect("faults");
    assert!(faults.len() >= 8, "{} faults in 90 s", faults.len());
    let mut kinds = std::collections::BTreeSet::new();
    for f in faults {
        assert!(f["at_ms"].as_u64().is_some(), "{f}");
        kinds.insert(f["kind"].as_str().expect("kind").to_owned());
    }
    // The seed draws every kind (disk_full only where a tmpfs can be mounted).
    for kind in [
        "broker_kill",
        "broker_drain",
        "control_kill",
        "partition",
        "agent_crash_mid_write",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
    let names: Vec<&str> = report["invariants"]
        .as_array()
        .expect("invariants")
        .iter()
        .map(|i| {
            assert!(i["detail"].as_str().is_some_and(|d| !d.is_empty()), "{i}");
            i["name"].as_str().expect("name")
        })
        .collect();
    for name in INVARIANTS {
        assert!(names.contains(&name), "no invariant {name} in {names:?}");
    }
    assert_eq!(report["chaos"]["seed"].as_u64(), SEED.parse().ok());
    // The work went on: commands ran, revocations and disables were acknowledged.
    assert!(
        report["chaos"]["commands"]["ok"].as_u64().unwrap_or(0) > 0,
        "{:#}",
        report["chaos"]
    );
    assert!(report["chaos"]["revocations"].as_u64().unwrap_or(0) > 0);
    assert!(report["chaos"]["reconnect_after_last_fault_ms"]
        .as_f64()
        .is_some());
}
