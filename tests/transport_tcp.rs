//! TLS over TCP beside QUIC, with the real binaries: a session and commands over TCP, the
//! transport reported and counted, and `--transport auto` finding its way out when UDP is
//! dropped, then moving back to QUIC without losing the appliance.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::control::Fleet;
use common::*;
use serde_json::json;
use tokio::net::UdpSocket;

async fn echo(broker: &BrokerProc, appliance: &str, text: &str) -> Vec<serde_json::Value> {
    let (status, lines) = run_command(
        broker,
        appliance,
        json!({"argv": ["sh", "-c", format!("echo {text}")], "timeout_ms": 10000}),
    )
    .await;
    assert_eq!(status, 200, "{lines:?}");
    lines
}

#[tokio::test]
async fn a_session_over_tcp_runs_commands_and_is_reported_as_tcp() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker("b1", "");
    let tcp = broker.tcp.expect("TCP is on by default");
    assert_eq!(
        tcp.port(),
        broker.quic.port(),
        "the same port number on TCP and UDP"
    );
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[broker.quic], &["--transport", "tcp"]);
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["transport"], "tcp");
    let lines = echo(&broker, "app-1", "over-tcp").await;
    assert_eq!(lines[0], json!({"stream": "stdout", "data": "over-tcp\n"}));
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}));
    // Larger output than one yamux window and one record.
    let (status, lines) = run_command(
        &broker,
        "app-1",
        json!({"argv": ["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x"], "timeout_ms": 20000}),
    )
    .await;
    assert_eq!(status, 200);
    let out: usize = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["data"].as_str().unwrap().len())
        .sum();
    assert_eq!(out, 1_000_000);
    assert_eq!(
        broker
            .metric("tether_transport_sessions{transport=\"tcp\"}")
            .await,
        1.0
    );
    assert!(
        broker
            .metric("tether_transport_handshakes_total{transport=\"tcp\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn revocation_closes_a_live_tcp_session_with_the_revoked_code() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker("b1", "");
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[broker.quic], &["--transport", "tcp"]);
    broker.wait_session("app-1").await;
    setup.set_allowlist(&[]);
    broker
        .wait_metric_eq(
            "tether_transport_sessions{transport=\"tcp\"}",
            0.0,
            Duration::from_secs(10),
        )
        .await;
    broker
        .wait_metric("tether_sessions_closed_total{code=\"revoked\"}", 1.0)
        .await;
}

/// Relay UDP datagrams arriving at `listen` to `to` and back: "UDP comes back".
async fn udp_forwarder(listen: SocketAddr, to: SocketAddr) {
    let front = Arc::new(UdpSocket::bind(listen).await.unwrap());
    let mut peers: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> = Default::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await.unwrap();
        let back = match peers.get(&from) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                s.connect(to).await.unwrap();
                let (s2, f2) = (s.clone(), front.clone());
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    while let Ok(n) = s2.recv(&mut b).await {
                        let _ = f2.send_to(&b[..n], from).await;
                    }
                });
                peers.insert(from, s.clone());
                s
            }
        };
        let _ = back.send(&buf[..n]).await;
    }
}

#[tokio::test]
async fn auto_falls_back_to_tcp_when_udp_is_dropped_and_moves_back_without_a_gap() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    // TCP on a port of its own, where nothing answers UDP: QUIC to it goes unanswered.
    let broker = setup.broker("b1", "tcp_listen = \"127.0.0.1:0\"\n");
    let tcp = broker.tcp.unwrap();
    assert_ne!(tcp.port(), broker.quic.port());
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(
        &state,
        &[tcp],
        &["--quic-fallback-after", "1s", "--quic-retry-every", "2s"],
    );
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["transport"], "tcp", "auto found TCP");
    let lines = echo(&broker, "app-1", "fallback").await;
    assert_eq!(lines[0]["data"], "fallback\n");

    // UDP comes back: the same port number now reaches the broker's QUIC.
    let forwarder = tokio::spawn(udp_forwarder(tcp, broker.quic));
    // The appliance stays connected all along: there is always a session.
    let gaps = std::cell::Cell::new(0);
    let moved = wait_for(Duration::from_secs(20), || async {
        let rows = broker.sessions().await;
        if rows.is_empty() {
            gaps.set(gaps.get() + 1);
        }
        rows.iter().any(|r| r["transport"] == "quic").then_some(())
    })
    .await;
    assert!(moved.is_some(), "the agent moved back to QUIC");
    assert_eq!(gaps.get(), 0, "make before break: never without a session");
    let lines = echo(&broker, "app-1", "back-on-quic").await;
    assert_eq!(lines[0]["data"], "back-on-quic\n");
    // The QUIC session replaced the TCP one at the broker (not a reconnect after a loss).
    let superseded = wait_for(Duration::from_secs(5), || async {
        broker
            .log_contains("superseding older session")
            .then_some(())
    })
    .await;
    assert!(
        superseded.is_some(),
        "{:?}",
        broker
            .logs
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
    );
    forwarder.abort();
}

/// The running test proxy (`scripts/proxy`): its URL and log, or `None` (SKIPPED).
fn test_proxy() -> Option<(String, std::path::PathBuf)> {
    let url = std::env::var("TETHER_TEST_PROXY_URL").ok();
    let log = std::env::var("TETHER_TEST_PROXY_LOG").ok();
    match (url, log) {
        (Some(u), Some(l)) => Some((u, l.into())),
        _ => {
            eprintln!(
                "SKIPPED: set TETHER_TEST_PROXY_URL and TETHER_TEST_PROXY_LOG (scripts/proxy)"
            );
            None
        }
    }
}

/// How many `CONNECT 127.0.0.1:PORT` requests the proxy logged.
fn connects_to(log: &std::path::Path, port: u16) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let needle = format!("CONNECT 127.0.0.1:{port} ");
    text.matches(&needle).count()
}

#[tokio::test]
async fn through_a_real_http_connect_proxy_enrollment_session_command_renewal_and_revocation() {
    let Some((proxy, log)) = test_proxy() else {
        return;
    };
    // Short certificates, so the agent renews (through the proxy) within the test.
    let fleet = Fleet::with_config(
        "[certificates]\nappliance = \"12s\"\n[enroll]\nrenewal_overlap = \"1h\"\n",
    );
    let control_port = fleet.control.addr.port();
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    // Enrollment through the proxy.
    let token = fleet.token("app-1");
    let out = std::process::Command::new(bin("tether-agent"))
        .args([
            "enroll",
            "--control",
            &fleet.url(),
            "--id",
            "app-1",
            "--token",
            &token,
        ])
        .arg("--ca")
        .arg(&fleet.root)
        .arg("--state-dir")
        .arg(&state)
        .args(["--proxy", &proxy])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enrolled = connects_to(&log, control_port);
    assert!(enrolled >= 1, "enrollment went through the proxy");
    let password = proxy
        .split(':')
        .nth(2)
        .and_then(|p| p.split('@').next())
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains(password));

    let (broker, allowlist) = fleet.broker("b1", "");
    let tcp_port = broker.tcp.unwrap().port();
    let first = tether_agent::Credentials::load(&state)
        .unwrap()
        .fingerprint()
        .to_owned();
    let _agent = AgentProc::start(
        &state,
        &[broker.quic],
        &[
            "--transport",
            "tcp",
            "--proxy",
            &proxy,
            "--renew-before",
            "5s",
            "--renew-check-every",
            "200ms",
            "--revoked-backoff",
            "200ms",
        ],
    );
    // The session over TCP, through the proxy.
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["transport"], "tcp");
    assert!(
        connects_to(&log, tcp_port) >= 1,
        "the session went through the proxy"
    );
    let lines = echo(&broker, "app-1", "via-proxy").await;
    assert_eq!(lines[0]["data"], "via-proxy\n");

    // Renewal through the proxy, then a session with the new certificate.
    let renewed = wait_for(Duration::from_secs(30), || async {
        let now = tether_agent::Credentials::load(&state)
            .ok()?
            .fingerprint()
            .to_owned();
        (now != first).then_some(now)
    })
    .await
    .expect("the agent renewed its certificate");
    assert!(
        connects_to(&log, control_port) > enrolled,
        "renewal went through the proxy"
    );
    fleet.export_allowlist(&allowlist);
    wait_for(Duration::from_secs(30), || async {
        broker
            .sessions()
            .await
            .into_iter()
            .find(|s| s["fingerprint"] == renewed.as_str() && s["transport"] == "tcp")
    })
    .await
    .expect("the agent reconnected over TCP with its renewed certificate");

    // Revocation closes the live TCP session at once.
    write_atomic(&allowlist, &allowlist_text(&[]));
    broker
        .wait_metric_eq(
            "tether_transport_sessions{transport=\"tcp\"}",
            0.0,
            Duration::from_secs(10),
        )
        .await;
    broker
        .wait_metric("tether_sessions_closed_total{code=\"revoked\"}", 1.0)
        .await;
    // Nothing in the proxy's log or ours carries the password.
    assert!(!std::fs::read_to_string(&log).unwrap().contains(password));
}
