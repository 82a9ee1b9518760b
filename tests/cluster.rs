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
