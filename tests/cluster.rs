//! One system, end to end with the real binaries on 127.0.0.1: `tether-control serve`,
//! two `tether-broker --bundle` following it, appliances enrolled with one-time tokens
//! and run by `tether-agent run`, and the operator's `tether` CLI.
//!
//! Token flow: connect → `tether exec` with live output and the command's exit code →
//! `tether appliance revoke` → the session is closed by the broker holding it and the
//! certificate is refused by every broker → re-enroll with a fresh token → connected
//! again. The revoke-to-close time on each broker is printed (no thresholds here: see
//! the loadtest report).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::{bin, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_flow_across_two_brokers() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;

    let s1 = c.enroll("app-1");
    let s2 = c.enroll("app-2");
    // One broker each (agents start at a random broker of their list).
    let a1 = c.agent(&s1, &[b1.quic]);
    let a2 = c.agent(&s2, &[b2.quic]);
    let conn = c.wait_connected("app-1", Some("edge-1")).await;
    assert!(conn["session_id"].as_u64().is_some(), "{conn}");
    c.wait_connected("app-2", Some("edge-2")).await;
    b1.wait_session("app-1").await;
    b2.wait_session("app-2").await;

    // A command: stdout to stdout, stderr to stderr, the command's exit code.
    let (code, out, err) = c.exec(&[
        "app-1",
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 3",
    ]);
    assert_eq!(code, 3, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "to-stdout\n");
    assert!(err.contains("to-stderr"), "{err}");
    // Routed through the other broker just the same.
    let (code, out, _) = c.exec(&["app-2", "--", "echo", "via-edge-2"]);
    assert_eq!((code, out.as_str()), (0, "via-edge-2\n"));

    // Output arrives while the command still runs.
    let mut live = Command::new(bin("tether"))
        .args([
            "exec",
            "app-1",
            "--",
            "sh",
            "-c",
            "echo first; sleep 2; echo second",
        ])
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(live.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        live.try_wait().unwrap().is_none(),
        "the first line came only after the command ended"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert_eq!(live.wait().unwrap().code(), Some(0));

    // The deadline: a definite timed-out code, not a hang.
    let (code, _, err) = c.exec(&["app-2", "--timeout", "1s", "--", "sleep", "30"]);
    assert_eq!(code, 124, "{err}");

    // Revoke both; each broker closes its session.
    let mut times = Vec::new();
    for (id, broker, name) in [("app-1", &b1, "edge-1"), ("app-2", &b2, "edge-2")] {
        let start = Instant::now();
        c.tether(&["appliance", "revoke", id]).expect("revoke");
        let took = time_until(start, || async {
            !broker
                .sessions()
                .await
                .iter()
                .any(|s| s["appliance_id"] == id)
        })
        .await;
        times.push((name, took));
    }
    eprintln!(
        "revoke-to-close (tether CLI start → session gone from the broker): {}",
        times
            .iter()
            .map(|(n, t)| format!("{n} {:.1} ms", t.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop((a1, a2));
    // Control no longer sees them connected.
    wait_for(Duration::from_secs(10), || async {
        c.show("app-1")["connection"].is_null().then_some(())
    })
    .await
    .expect("control forgot app-1's session");
    let (code, _, err) = c.exec(&["app-1", "--", "true"]);
    assert_eq!(code, 125, "a revoked appliance runs nothing: {err}");
    assert!(err.contains("appliance_revoked"), "{err}");

    // The revoked certificate is refused by every broker.
    let refused = r#"tether_handshake_rejected_total{reason="unknown_fingerprint"}"#;
    for broker in [&b1, &b2] {
        let before = broker.metric(refused).await;
        let _probe = c.agent(&s1, &[broker.quic]);
        broker.wait_metric(refused, before + 1.0).await;
        assert!(
            !broker
                .sessions()
                .await
                .iter()
                .any(|s| s["appliance_id"] == "app-1"),
            "a revoked certificate got a session"
        );
    }

    // A fresh token: enrolled and connected again.
    let token = c.fleet.token("app-1");
    c.fleet
        .enroll("app-1", &token, &s1)
        .expect("re-enroll with a fresh token");
    let _a1 = c.agent(&s1, &[b2.quic, b1.quic]);
    c.wait_connected("app-1", None).await;
    let (code, out, _) = c.exec(&["app-1", "--", "echo", "back"]);
    assert_eq!((code, out.as_str()), (0, "back\n"));
}

/// The same appliance connecting to another broker (a copied credential, or a move):
/// control closes the older session, on the other broker, as `superseded`; control's
/// view and commands follow the newest session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_on_another_broker_supersedes_the_older_one() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let state = c.enroll("app-1");
    let first = c.agent(&state, &[b1.quic]);
    let older = c.wait_connected("app-1", Some("edge-1")).await;
    b1.wait_session("app-1").await;

    let superseded = r#"tether_sessions_closed_total{code="superseded"}"#;
    let before = b1.metric(superseded).await;
    let start = Instant::now();
    let second = c.agent(&state, &[b2.quic]);
    b2.wait_session("app-1").await;
    b1.wait_metric(superseded, before + 1.0).await;
    eprintln!(
        "older session on edge-1 closed as superseded {:.1} ms after the second agent started",
        start.elapsed().as_secs_f64() * 1e3
    );
    // Stop the first agent before it comes back and takes over again.
    drop(first);
    let newer = c.wait_connected("app-1", Some("edge-2")).await;
    assert_ne!(older["session_id"], newer["session_id"]);
    let (code, out, _) = c.exec(&["app-1", "--", "echo", "newest"]);
    assert_eq!((code, out.as_str()), (0, "newest\n"));
    drop(second);
}

/// A broker renews its own certificate before it expires and keeps working on the new
/// one: its channel to control stays usable and appliances still connect after the
/// first certificate's end (the QUIC server certificate is swapped live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_renews_its_own_certificate_before_expiry() {
    let mut c = Cluster::new("[certificates]\nbroker = \"8s\"\n");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let renewed = r#"tether_broker_certificate_renewals_total{result="ok"}"#;
    b1.wait_metric(renewed, 1.0).await;
    // Past the first certificate's end: a new appliance session and a command still work.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let state = c.enroll("app-1");
    let _agent = c.agent(&state, &[b1.quic]);
    c.wait_connected("app-1", Some("edge-1")).await;
    let (code, out, _) = c.exec(&["app-1", "--", "echo", "still-here"]);
    assert_eq!((code, out.as_str()), (0, "still-here\n"));
    assert!(
        b1.metric(renewed).await >= 2.0,
        "renewed again before the second expiry"
    );
}

/// A quiet cluster keeps its channels: control and brokers ping each other within the
/// 30 s idle limit, so nothing reconnects while nothing happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channel_stays_up() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let idle = Duration::from_secs(tether_proto::cluster::CHANNEL_IDLE_TIMEOUT_SECS + 5);
    tokio::time::sleep(idle).await;
    let errors: f64 = {
        let text = common::http()
            .get(b1.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("tether_broker_control_channel_errors_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(errors, 0.0, "the channel broke while idle");
    assert_eq!(b1.metric("tether_broker_control_connected").await, 1.0);
    assert_eq!(
        c.fleet
            .metric(r#"tether_control_channel_errors_total{reason="idle"}"#)
            .await,
        0.0
    );
}

/// A control link that black-holes (bytes stop both ways, no reset, the sockets stay
/// open) does not hold the broker's channel forever: the broker gives it up within the
/// idle limit (no frame from control, or none of its frames taken) and connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_control_link_is_given_up_and_the_broker_reconnects() {
    let mut c = Cluster::new("");
    let proxy = common::netfault::FaultProxy::start(&[c.fleet.control.addr]).await;
    let b1 = c.add_broker_via("edge-1", &format!("https://{}", proxy.addr));
    c.wait_brokers_up(1).await;
    let errors =
        |reason: &str| format!("tether_broker_control_channel_errors_total{{reason=\"{reason}\"}}");
    let (idle, stalled) = (errors("idle"), errors("write_stalled"));

    proxy.blackhole();
    let cut = Instant::now();
    let limit = Duration::from_secs(tether_proto::cluster::CHANNEL_IDLE_TIMEOUT_SECS + 20);
    let noticed = wait_for(limit, || async {
        (b1.metric(&idle).await + b1.metric(&stalled).await >= 1.0).then_some(())
    })
    .await;
    assert!(
        noticed.is_some(),
        "the broker still trusts a black-holed channel after {limit:?}"
    );
    eprintln!(
        "the broker gave up the black-holed channel after {:?}",
        cut.elapsed()
    );

    proxy.heal();
    let back = wait_for(Duration::from_secs(30), || async {
        (b1.metric("tether_broker_control_connected").await == 1.0).then_some(())
    })
    .await;
    assert!(back.is_some(), "the broker never connected again");
    c.wait_brokers_up(1).await;
    eprintln!(
        "connected again {:?} after the black hole began",
        cut.elapsed()
    );
}

/// `tether exec --selector`: every active appliance of the tenant runs the command, each
/// output line prefixed with its id, a summary, exit 0 only when all exited 0; an
/// appliance that goes away mid-command is a definite `connection_lost` (75), not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_fan_out_and_an_appliance_lost_mid_command() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let s1 = c.enroll("app-1");
    let s2 = c.enroll("app-2");
    let _a1 = c.agent(&s1, &[b1.quic]);
    let mut a2 = c.agent(&s2, &[b2.quic]);
    c.wait_connected("app-1", Some("edge-1")).await;
    c.wait_connected("app-2", Some("edge-2")).await;

    let (code, out, err) = c.exec(&["--selector", "tenant=acme", "--", "echo", "hi"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[app-1] hi\n") && out.contains("[app-2] hi\n"),
        "{out}"
    );
    assert!(err.contains("2 of 2 succeeded"), "{err}");

    // app-2 goes away while its command runs.
    let mut running = std::process::Command::new(bin("tether"))
        .args(["exec", "app-2", "--timeout", "60s", "--", "sleep", "30"])
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command is running once the broker has opened its stream; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    a2.child.kill().unwrap();
    let status = loop {
        if let Some(status) = running.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tether exec hung"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!(
        "appliance killed → tether exec ended in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut running.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(err.contains("connection_lost"), "{err}");

    // Now one of the tenant's appliances is offline: the fan-out says so and fails.
    wait_for(Duration::from_secs(10), || async {
        c.show("app-2")["connection"].is_null().then_some(())
    })
    .await
    .expect("control saw app-2 leave");
    let (code, out, err) = c.exec(&["--selector", "tenant=acme", "--", "echo", "hi"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("[app-1] hi\n"), "{out}");
    assert!(
        err.contains("offline") && err.contains("1 of 2 succeeded"),
        "{err}"
    );
}

/// Disable and enable travel like a revocation: disabling closes the live session at
/// once on the broker holding it; enabling lets the same certificate back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_closes_the_session_and_enable_lets_the_same_certificate_back() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let s1 = c.enroll("app-1");
    let a1 = c.agent(&s1, &[b1.quic]);
    b1.wait_session("app-1").await;
    let revoked = r#"tether_sessions_closed_total{code="revoked"}"#;
    let before = b1.metric(revoked).await;
    c.tether(&["appliance", "disable", "app-1"])
        .expect("disable");
    b1.wait_metric(revoked, before + 1.0).await;
    drop(a1);
    c.assert_refused(&s1, &b1, "app-1").await;
    let (code, _, err) = c.exec(&["app-1", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("appliance_disabled"), "{err}");
    c.tether(&["appliance", "enable", "app-1"]).expect("enable");
    let _a1 = c.agent(&s1, &[b1.quic]);
    c.wait_connected("app-1", Some("edge-1")).await;
    let (code, out, _) = c.exec(&["app-1", "--", "echo", "enabled"]);
    assert_eq!((code, out.as_str()), (0, "enabled\n"));
}

/// SIGTERM: control stops accepting, lets a command stream in flight finish, tells its
/// brokers it is going away (they reconnect at once rather than after a timeout), and
/// exits 0. Every answer carries the request's id, which the logs of that request name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_drains_on_sigterm_and_says_goodbye_to_its_brokers() {
    let mut c = Cluster::new("[shutdown]\ngrace = \"30s\"\n");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let s1 = c.enroll("app-1");
    let _a1 = c.agent(&s1, &[b1.quic]);
    c.wait_connected("app-1", Some("edge-1")).await;

    // A refused request: its answer names its id, and so does control's log of it.
    let resp = c
        .fleet
        .client()
        .post(format!("{}/v1/enroll", c.fleet.url()))
        .json(&serde_json::json!({
            "appliance_id": "..",
            "csr_pem": "x",
            "nonce": "x",
            "proof": {"kind": "token", "token": "x"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["error"],
        "invalid_appliance_id"
    );
    wait_for(Duration::from_secs(5), || async {
        c.fleet.control.log_contains(&id).then_some(())
    })
    .await
    .expect("control's log names the request id");

    // A command that outlives the SIGTERM.
    let running = Command::new(bin("tether"))
        .args([
            "exec",
            "app-1",
            "--timeout",
            "60s",
            "--",
            "sh",
            "-c",
            "sleep 2; echo done",
        ])
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command is running once the broker has opened its stream; give it a moment.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = nix::unistd::Pid::from_raw(c.fleet.control.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();

    let out = running.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("done"), "{stdout}");

    // Control exits 0 on its own, having told the broker.
    let mut control = c.fleet.control;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = control.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "control did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(control.log_contains("every in-flight request finished"));
    wait_for(Duration::from_secs(5), || async {
        b1.log_contains("going_away").then_some(())
    })
    .await
    .expect("the broker heard control was going away");
}
