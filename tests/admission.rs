//! Reconnect storms: the broker admits handshakes through a bounded queue and turns the
//! excess away at once (QUIC CONNECTION_REFUSED, no crypto spent), counting each refusal,
//! instead of letting every handshake time out. Over TCP the excess is not refused: the
//! broker stops accepting and the connections wait in the listen backlog. With
//! `transport.endpoints` above 1 the endpoints share one port and one queue.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tether_proto::CloseCode;

#[tokio::test]
async fn a_storm_beyond_the_queue_is_refused_early_and_counted() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker(
        "b1",
        "[limits]\nmax_concurrent_handshakes = 1\nmax_pending_handshakes = 2\npending_timeout = \"5s\"\n",
    );

    // 200 handshakes at once from one client socket.
    let (endpoint, config) = raw_client(&setup.pki, Some(&leaf));
    let attempts: Vec<_> = (0..200)
        .map(|_| {
            let connecting = endpoint
                .connect_with(config.clone(), broker.quic, "localhost")
                .unwrap();
            tokio::spawn(
                async move { tokio::time::timeout(Duration::from_secs(20), connecting).await },
            )
        })
        .collect();
    let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
    for a in attempts {
        match a.await.unwrap() {
            Ok(Ok(conn)) => {
                ok += 1;
                conn.close(0u32.into(), b"");
            }
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                refused += 1
            }
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push("client timeout".into()),
        }
    }
    eprintln!(
        "storm of 200: {ok} admitted, {refused} refused, {} other",
        other.len()
    );
    let mut kinds = other.clone();
    kinds.sort();
    kinds.dedup();
    assert!(
        other.is_empty(),
        "every attempt got a definite answer: {kinds:?}"
    );
    assert!(ok >= 1, "the queue admitted some");
    assert!(refused >= 1, "the excess was refused");
    assert_eq!(ok + refused, 200);
    let counted = broker
        .metric("tether_incoming_refused_total{reason=\"queue_full\"}")
        .await;
    assert_eq!(counted as usize, refused);

    // The broker is healthy afterwards.
    assert_eq!(
        try_session(&setup.pki, Some(&leaf), broker.quic).await,
        None
    );
}

/// Over TCP a storm beyond the queue is not turned away: the accept loop pauses, the
/// connections wait in the kernel's backlog, and every handshake completes, as against a
/// bare TLS server, instead of a refusal costing each agent a back-off and a second
/// handshake.
#[tokio::test]
async fn a_tcp_storm_beyond_the_queue_waits_in_the_backlog_and_none_is_refused() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker(
        "b1",
        "[limits]\nmax_concurrent_handshakes = 1\nmax_pending_handshakes = 2\npending_timeout = \"5s\"\n\
         [session]\nhello_timeout = \"60s\"\n",
    );
    let addr = broker.tcp.expect("TCP is on by default");
    let tls = std::sync::Arc::new(raw_tls(&setup.pki, Some(&leaf), &[tether_proto::ALPN]));

    // 100 TLS handshakes at once, each from its own TCP connection.
    const STORM: usize = 100;
    let attempts: Vec<_> = (0..STORM)
        .map(|_| {
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            tokio::spawn(async move {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                tokio::time::timeout(Duration::from_secs(30), async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    connector.connect(name, tcp).await
                })
                .await
            })
        })
        .collect();
    let mut streams = Vec::new();
    let mut failed = Vec::new();
    for a in attempts {
        match a.await.unwrap() {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(_) => failed.push("client timeout".into()),
        }
    }
    assert!(failed.is_empty(), "every handshake completes: {failed:?}");
    // The client finishes its side first; the broker verifies the client's certificate
    // after that. Every one is admitted, none refused.
    broker
        .wait_metric_eq(
            "tether_handshakes_accepted_total",
            STORM as f64,
            Duration::from_secs(20),
        )
        .await;
    let paused = broker.metric("tether_tcp_accept_paused_total").await;
    let refused = broker
        .metric("tether_incoming_refused_total{reason=\"queue_full\"}")
        .await;
    let timed_out = broker
        .metric("tether_incoming_refused_total{reason=\"queue_timeout\"}")
        .await;
    eprintln!("TCP storm of {STORM}: accept paused {paused} times, {refused} refused");
    assert!(paused >= 1.0, "the queue filled and accepting paused");
    assert_eq!(refused, 0.0);
    assert_eq!(timed_out, 0.0);
    assert_eq!(
        broker.metric("tether_incoming_tcp_total").await,
        STORM as f64
    );
    drop(streams);

    // The broker is healthy afterwards, on both transports.
    assert_eq!(
        try_session(&setup.pki, Some(&leaf), broker.quic).await,
        None
    );
}

/// `[transport] endpoints = 2`, written into the `[transport]` table `Setup::broker` opens.
const TWO_ENDPOINTS: &str = "endpoints = 2\n";

/// UDP sockets bound to `addr`, from `/proc/net/udp` (Linux; IPv4 loopback).
fn udp_sockets_bound_to(addr: SocketAddr) -> usize {
    let want = format!("0100007F:{:04X}", addr.port());
    std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        .count()
}

/// Connections received by each of two endpoints.
async fn incoming_by_endpoint(broker: &BrokerProc) -> [f64; 2] {
    [
        broker.metric("tether_incoming_total{endpoint=\"0\"}").await,
        broker.metric("tether_incoming_total{endpoint=\"1\"}").await,
    ]
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn two_endpoints_share_the_port_both_admit_and_both_drain() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    // Connections without a session wait for the drain, not for the Hello timeout.
    let mut broker = setup.broker(
        "b1",
        &format!("{TWO_ENDPOINTS}[session]\nhello_timeout = \"60s\"\n"),
    );
    assert_eq!(
        udp_sockets_bound_to(broker.quic),
        2,
        "two sockets, one port"
    );

    // The kernel spreads clients by address: 32 client sockets reach both endpoints
    // (all on one would happen with probability 2^-31).
    let mut conns = Vec::new();
    for _ in 0..32 {
        let conn = connect(&setup.pki, Some(&leaf), broker.quic)
            .await
            .expect("handshake admitted");
        conns.push(conn);
    }
    let [first, second] = incoming_by_endpoint(&broker).await;
    eprintln!("32 clients: {first} on endpoint 0, {second} on endpoint 1");
    assert_eq!(first + second, 32.0);
    assert!(first >= 1.0 && second >= 1.0, "{first} / {second}");
    assert_eq!(
        broker.metric("tether_handshakes_accepted_total").await,
        32.0
    );
    // A whole session, too.
    assert_eq!(
        try_session(&setup.pki, Some(&leaf), broker.quic).await,
        None
    );

    // Drain closes the connections of both endpoints.
    broker.terminate();
    for conn in conns {
        let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed())
            .await
            .expect("closed by the drain");
        assert_eq!(
            ended(&closed),
            Ended::App(CloseCode::Draining.code().into())
        );
    }
    let status = broker.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "drained broker exits cleanly: {status}");
    assert!(broker.log_contains("drain finished"));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_storm_over_two_endpoints_meets_one_queue() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker(
        "b1",
        &format!(
            "{TWO_ENDPOINTS}[limits]\nmax_concurrent_handshakes = 1\nmax_pending_handshakes = 2\n\
             pending_timeout = \"5s\"\n"
        ),
    );

    // 200 handshakes at once from 32 client sockets.
    let clients: Vec<_> = (0..32)
        .map(|_| raw_client(&setup.pki, Some(&leaf)))
        .collect();
    let attempts: Vec<_> = (0..200)
        .map(|i| {
            let (endpoint, config) = &clients[i % clients.len()];
            let connecting = endpoint
                .connect_with(config.clone(), broker.quic, "localhost")
                .unwrap();
            tokio::spawn(
                async move { tokio::time::timeout(Duration::from_secs(20), connecting).await },
            )
        })
        .collect();
    let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
    for a in attempts {
        match a.await.unwrap() {
            Ok(Ok(conn)) => {
                ok += 1;
                conn.close(0u32.into(), b"");
            }
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                refused += 1
            }
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push("client timeout".into()),
        }
    }
    let [first, second] = incoming_by_endpoint(&broker).await;
    eprintln!(
        "storm of 200 over two endpoints ({first} / {second}): {ok} admitted, {refused} \
         refused, {} other",
        other.len()
    );
    assert!(
        other.is_empty(),
        "every attempt got a definite answer: {other:?}"
    );
    assert!(ok >= 1, "the queue admitted some");
    assert!(refused >= 1, "the excess was refused");
    assert_eq!(ok + refused, 200);
    assert_eq!(first + second, 200.0);
    assert!(first >= 1.0 && second >= 1.0, "{first} / {second}");
    let counted = broker
        .metric("tether_incoming_refused_total{reason=\"queue_full\"}")
        .await;
    assert_eq!(counted as usize, refused);
}
