//! TLS over TCP beside QUIC, with the real binaries: a session and commands over TCP, the
//! transport reported and counted, and `--transport auto` finding its way out when UDP is
//! dropped, then moving back to QUIC without losing the appliance.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    assert!(broker.log_contains("superseding older session"));
    forwarder.abort();
}
