//! Smoke run of the simulator as CI runs it: a storm of 200 appliances against a spawned
//! control and broker, and the report says every one connected without an error; the
//! same with `--baseline` over QUIC and (20 appliances) over TLS/TCP; a short `revoke` whose revoked appliances cannot come back; `churn` and `drain`; and a
//! run against an existing cluster (`tether up`) with `--control`.
//!
//! Needs the `tether-control`, `tether-broker` and `tether` executables next to
//! `tether-loadtest` (`cargo build --workspace --bins` first, as CI does). The pool of enrolled appliances is
//! kept in cargo's test temporary directory, so only the first run enrolls.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole run (enrollment included, on a cold pool) must end within this.
const RUN_BOUND: Duration = Duration::from_secs(300);

fn loadtest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tether-loadtest"))
}

/// The tests share one pool, which a run locks: one run at a time.
static POOL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Run `tether-loadtest run --spawn --scenario storm --appliances 200 EXTRA…` on the
/// shared pool and return its report.
fn storm_200(extra: &[&str]) -> serde_json::Value {
    run(&["--scenario", "storm", "--appliances", "200"], extra)
}

/// Run `tether-loadtest run --spawn ARGS… EXTRA…` on the shared pool and return its
/// report.
fn run(args: &[&str], extra: &[&str]) -> serde_json::Value {
    let pool = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loadtest-smoke-pool");
    run_in(&["--spawn"], &pool, args, extra)
}

/// Run `tether-loadtest run MODE… ARGS… EXTRA…` on `pool` and return its report.
fn run_in(
    mode: &[&str],
    pool: &std::path::Path,
    args: &[&str],
    extra: &[&str],
) -> serde_json::Value {
    let _one_at_a_time = POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exe = loadtest();
    let bin_dir = exe.parent().expect("bin dir").to_owned();
    for bin in ["tether-control", "tether-broker"] {
        assert!(
            bin_dir.join(bin).is_file(),
            "{bin} is not built in {}: run `cargo build --workspace --bins` first",
            bin_dir.display()
        );
    }
    let out = tempfile::tempdir().expect("tempdir");
    let report_path = out.path().join("report.json");

    let mut child = Command::new(&exe)
        .arg("run")
        .args(mode)
        .args(args)
        .arg("--report")
        .arg(&report_path)
        .arg("--pool")
        .arg(pool)
        .arg("--no-progress")
        .arg("--connect-timeout")
        .arg("60s")
        .args(extra)
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
            panic!("tether-loadtest did not finish within {RUN_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "tether-loadtest failed: {status}");
    let page = std::fs::read_to_string(report_path.with_extension("html")).expect("report page");
    assert!(page.contains("<svg"), "the page has charts");
    // The time series come from the report's samples (flattened into the top
    // level of the JSON): a page without them has read the wrong place.
    assert!(
        page.contains("<polyline"),
        "the page has no chart over time"
    );

    serde_json::from_slice(&std::fs::read(&report_path).expect("report written"))
        .expect("report is JSON")
}

#[test]
fn storm_of_200_connects_every_appliance_without_errors() {
    let report = storm_200(&[]);
    assert_eq!(report["scenario"], "storm");
    assert_eq!(report["transport"], "quic", "the default transport");
    assert_eq!(report["appliances"], 200);
    assert_eq!(report["brokers"], 1);
    assert_eq!(report["connected"], 200, "report: {report:#}");
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "errors in the report: {report:#}"
    );
    for field in [
        "handshakes_per_sec",
        "connect_p50_ms",
        "connect_p99_ms",
        "broker_rss_bytes",
        "broker_cpu_seconds",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field} is not a positive number: {}",
            report[field]
        );
    }
    // Memory can shrink between two readings (allocator returns): a number, maybe 0.
    assert!(report["broker_bytes_per_conn"].as_f64().is_some());
    // What this scenario cannot measure is null, not invented.
    for field in [
        "command_rtt_p50_ms",
        "revoke_to_close_p99_ms",
        "revoked_reconnects_accepted",
    ] {
        assert!(report[field].is_null(), "{field} should be null");
    }
    assert!(report["machine"]["cores"].as_u64().is_some_and(|c| c > 0));
    assert!(report["baseline"].is_null() && report["ratios"].is_null());
    assert_eq!(report["baseline_warm_up"], false);
}

#[test]
fn baseline_runs_the_same_storm_and_reports_ratios() {
    let report = storm_200(&["--baseline"]);
    assert_eq!(report["connected"], 200, "report: {report:#}");
    let baseline = &report["baseline"];
    assert_eq!(baseline["connected"], 200, "baseline: {baseline:#}");
    assert_eq!(report["baseline_warm_up"], true);
    assert!(baseline["handshakes_per_sec"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    // The clients' own CPU in each phase, side by side.
    for cpu in [
        &report["simulator_cpu_seconds"],
        &baseline["simulator_cpu_seconds"],
    ] {
        assert!(cpu.as_f64().is_some_and(|v| v > 0.0), "{cpu}");
    }
    for ratio in ["handshakes_per_sec", "broker_bytes_per_conn"] {
        assert!(
            report["ratios"][ratio].is_number() || report["ratios"][ratio].is_null(),
            "ratios.{ratio}: {}",
            report["ratios"][ratio]
        );
    }
    assert!(report["ratios"]["handshakes_per_sec"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
}

#[test]
fn baseline_over_tcp_runs_the_same_storm_on_tls_over_tcp() {
    let report = run(
        &["--scenario", "storm", "--appliances", "20"],
        &["--transport", "tcp", "--baseline"],
    );
    assert_eq!(report["transport"], "tcp", "report: {report:#}");
    assert_eq!(report["connected"], 20, "report: {report:#}");
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "errors in the report: {report:#}"
    );
    let baseline = &report["baseline"];
    assert_eq!(baseline["connected"], 20, "baseline: {baseline:#}");
    assert_eq!(
        baseline["errors"],
        serde_json::json!({}),
        "baseline: {baseline:#}"
    );
    assert!(report["ratios"]["handshakes_per_sec"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    // The spawned broker runs with the open-files limit this process raised.
    let nofile = report["limits"]["nofile"].as_u64().expect("nofile");
    assert_eq!(
        report["limits"]["broker_nofile"],
        serde_json::json!([nofile]),
        "limits: {:#}",
        report["limits"]
    );
}

#[test]
fn revoked_appliances_are_closed_and_cannot_come_back() {
    let report = run(
        &[
            "--scenario",
            "revoke",
            "--appliances",
            "50",
            "--revoke",
            "5",
        ],
        &[],
    );
    assert_eq!(report["scenario"], "revoke");
    assert_eq!(report["connected"], 50, "report: {report:#}");
    assert_eq!(
        report["revoked_reconnects_accepted"], 0,
        "report: {report:#}"
    );
    let revoke = &report["revoke"];
    assert_eq!(revoke["revoked"], 5, "revoke: {revoke:#}");
    // Five samples of revocation to close, and five refused fresh connections.
    assert_eq!(revoke["closed"], 5, "revoke: {revoke:#}");
    assert_eq!(revoke["reconnects_tried"], 5, "revoke: {revoke:#}");
    assert_eq!(revoke["reconnects_refused"], 5, "revoke: {revoke:#}");
    for field in ["revoke_to_close_p50_ms", "revoke_to_close_p99_ms"] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {}",
            report[field]
        );
    }
    assert_eq!(report["connected_at_end"], 45, "report: {report:#}");
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "errors in the report: {report:#}"
    );
    assert!(report["command_rtt_p50_ms"].is_null());
}

#[test]
fn churned_appliances_come_back_and_the_broker_counts_match() {
    let report = run(
        &[
            "--scenario",
            "churn",
            "--appliances",
            "100",
            "--rate",
            "20",
            "--duration",
            "2s",
            "--rejoin-delay",
            "200ms",
        ],
        &[],
    );
    assert_eq!(report["scenario"], "churn");
    assert_eq!(report["connected"], 100, "report: {report:#}");
    let churn = &report["churn"];
    let kicks = churn["kicks"].as_u64().expect("kicks");
    assert!(kicks >= 20, "churn: {churn:#}");
    assert_eq!(churn["rejoined"], kicks, "churn: {churn:#}");
    assert_eq!(churn["not_rejoined"], 0, "churn: {churn:#}");
    assert!(churn["reconnect_p99_ms"].as_f64().is_some_and(|v| v > 0.0));
    // Every kicked session closed on the broker: it counts exactly the fleet's.
    assert_eq!(churn["broker_sessions_at_end"], 100, "churn: {churn:#}");
    assert_eq!(churn["fleet_sessions_at_end"], 100, "churn: {churn:#}");
    assert_eq!(report["connected_at_end"], 100, "report: {report:#}");
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "errors in the report: {report:#}"
    );
}

#[test]
fn a_drained_broker_hands_every_appliance_to_the_other() {
    let report = run(
        &[
            "--scenario",
            "drain",
            "--appliances",
            "100",
            "--drain-jitter",
            "500ms",
        ],
        &[],
    );
    assert_eq!(report["scenario"], "drain");
    assert_eq!(report["brokers"], 2, "drain starts two brokers by default");
    assert_eq!(report["connected"], 100, "report: {report:#}");
    let drain = &report["drain"];
    let on_drained = drain["sessions"].as_u64().expect("sessions");
    assert!(on_drained > 0, "drain: {drain:#}");
    assert_eq!(drain["rejoined"], on_drained, "drain: {drain:#}");
    assert_eq!(drain["not_rejoined"], 0, "drain: {drain:#}");
    assert!(
        drain["broker_exit_secs"].as_f64().is_some(),
        "drain: {drain:#}"
    );
    // The whole fleet ends on the broker left, which counts exactly those sessions.
    assert_eq!(drain["broker_sessions_at_end"], 100, "drain: {drain:#}");
    assert_eq!(report["connected_at_end"], 100, "report: {report:#}");
    // Memory per connection is not comparable once a broker is gone.
    assert!(report["broker_bytes_per_conn"].is_null());
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "errors in the report: {report:#}"
    );
}

/// `tether up` on free ports, killed when dropped.
struct Up {
    child: std::process::Child,
    control_url: String,
    operator_dir: PathBuf,
    _data: tempfile::TempDir,
}

impl Up {
    fn start(appliances: usize) -> Up {
        use std::io::BufRead;
        let exe = loadtest().parent().expect("bin dir").join("tether");
        assert!(
            exe.is_file(),
            "{} is not built: run `cargo build --workspace --bins` first",
            exe.display()
        );
        let data = tempfile::tempdir().expect("tempdir");
        let log = data.path().join("up.log");
        let mut child = Command::new(&exe)
            .args(["up", "--port-base", "0", "--appliances"])
            .arg(appliances.to_string())
            .arg("--data-dir")
            .arg(data.path().join("up"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("up.log"))
            .spawn()
            .expect("start tether up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = false;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("ready:") {
                    ready = true;
                }
                if let (true, Some(rest)) =
                    (ready, line.trim().strip_prefix("control (HTTPS, mTLS):"))
                {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let control_url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("tether up did not get ready within 120 s; it said:\n{log}");
            }
        };
        Up {
            child,
            control_url,
            operator_dir: data.path().join("up").join("operator"),
            _data: data,
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn against_an_existing_cluster_counts_only_its_own_fleet() {
    // A cluster with 3 appliances of its own: the run enrolls its 60 through control's
    // API and checks the brokers' counts less what they held before.
    let up = Up::start(3);
    let pool = tempfile::tempdir().expect("pool");
    let config_dir = up.operator_dir.display().to_string();
    let report = run_in(
        &["--control", &up.control_url, "--config-dir", &config_dir],
        &pool.path().join("remote"),
        &[
            "--scenario",
            "churn",
            "--appliances",
            "60",
            "--rate",
            "10",
            "--duration",
            "1s",
            "--rejoin-delay",
            "100ms",
        ],
        &[],
    );
    assert_eq!(report["scenario"], "churn");
    assert_eq!(report["brokers"], 2, "tether up runs two brokers");
    assert_eq!(report["connected"], 60, "report: {report:#}");
    assert_eq!(
        report["churn"]["broker_sessions_at_end"], 60,
        "report: {report:#}"
    );
    // The brokers are not this run's processes: not measured, not invented.
    for field in [
        "broker_rss_bytes",
        "broker_bytes_per_conn",
        "broker_cpu_seconds",
    ] {
        assert!(report[field].is_null(), "{field}: {}", report[field]);
    }
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "errors in the report: {report:#}"
    );
}
