//! The agent against a tiny in-process quinn broker on 127.0.0.1:0 with rcgen certificates:
//! client_config + BrokerVerifier + session + command path, end to end.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{appliance, broker, Ca};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tether_agent::{
    client_config, client_endpoint, connect_once, Agent, AgentConfig, AgentEvent, ConnectError,
    Credentials, DisconnectReason,
};
use tether_proto::{
    CloseCode, CommandKind, CommandOutcome, CommandRequest, Frame, FrameDecoder, GoAway,
    GoAwayReason, OutputStream, Welcome,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const TD: &str = "acme.test";
const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    ca: Ca,
    creds: Credentials,
}

fn fixture() -> Fixture {
    let ca = Ca::new("ca");
    let leaf = appliance(&ca, TD, "app-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let creds = Credentials::from_pem(
        leaf.cert_pem().as_bytes(),
        leaf.key_pem().as_bytes(),
        ca.pem().as_bytes(),
    )
    .unwrap();
    Fixture { ca, creds }
}

/// A broker endpoint on 127.0.0.1:0 presenting `cert`, requiring client certs from
/// `client_ca`.
fn broker_endpoint(server_cert: &common::Issued, client_ca: &Ca) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.der()).unwrap();
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![server_cert.der()], server_cert.key_der())
        .unwrap();
    tls.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    let config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
    quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn agent_endpoint() -> quinn::Endpoint {
    client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn write_frame(send: &mut SendStream, frame: Frame) {
    let mut buf = BytesMut::new();
    tether_proto::encode_frame(&frame, &mut buf, tether_proto::DEFAULT_MAX_FRAME_LEN).unwrap();
    send.write_all(&buf).await.unwrap();
}

async fn read_frame(recv: &mut RecvStream, dec: &mut FrameDecoder) -> Option<Frame> {
    loop {
        if let Some(f) = dec.poll_frame().unwrap() {
            return Some(f);
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            _ => return None,
        }
    }
}

/// Accept one connection and its session stream, read Hello, send Welcome.
async fn accept_session(
    ep: &quinn::Endpoint,
    session_id: u64,
) -> (Connection, SendStream, RecvStream) {
    let conn = ep.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut dec = FrameDecoder::new(tether_proto::DEFAULT_MAX_FRAME_LEN);
    match read_frame(&mut recv, &mut dec).await {
        Some(Frame::Hello(h)) => {
            assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
            assert!(h.capabilities.contains(&"exec".to_string()));
            assert!(h.cert_not_after_ms > 0);
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    write_frame(
        &mut send,
        Frame::Welcome(Welcome {
            protocol_version: 1,
            session_id,
            heartbeat_interval_ms: 1000,
            server_time_ms: 0,
            manual_renewal_generation: 0,
            max_frame_len: None,
            capabilities: Vec::new(),
        }),
    )
    .await;
    (conn, send, recv)
}

/// Send `echo hi` on a new command stream; return stdout and the outcome.
async fn run_echo(conn: &Connection) -> (Vec<u8>, CommandOutcome) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut send,
        Frame::CommandRequest(CommandRequest {
            command_id: 42,
            kind: CommandKind::Exec,
            argv: vec!["echo".into(), "hi".into()],
            env_allowlist: vec![],
            deadline_ms: 10_000,
            signed: None,
        }),
    )
    .await;
    send.finish().unwrap();
    let mut dec = FrameDecoder::new(tether_proto::DEFAULT_MAX_FRAME_LEN);
    let mut stdout = Vec::new();
    loop {
        match read_frame(&mut recv, &mut dec).await {
            Some(Frame::CommandOutput(o)) => {
                assert_eq!(o.command_id, 42);
                assert_eq!(o.stream, OutputStream::Stdout);
                stdout.extend_from_slice(&o.data);
            }
            Some(Frame::CommandResult(r)) => {
                assert_eq!(r.command_id, 42);
                // The agent finishes the stream after the result.
                assert!(read_frame(&mut recv, &mut dec).await.is_none());
                return (stdout, r.outcome);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn session_and_command_end_to_end() {
    let fx = fixture();
    let server = broker_endpoint(&broker(&fx.ca, TD, "edge-1"), &fx.ca);
    let addr = server.local_addr().unwrap();

    let broker_task = tokio::spawn(async move {
        let (conn, _send, _recv) = accept_session(&server, 7).await;
        let result = run_echo(&conn).await;
        conn.close(VarInt::from_u32(CloseCode::Revoked.code()), b"revoked");
        // Keep the endpoint alive until the close is sent.
        server.wait_idle().await;
        result
    });

    let cfg = AgentConfig::default();
    let client = client_config(&fx.creds, &cfg).unwrap();
    let end = tokio::time::timeout(
        WAIT,
        connect_once(
            &agent_endpoint(),
            addr,
            client,
            &fx.creds,
            &cfg,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("session ends")
    .expect("connected");
    assert_eq!(end.session_id, Some(7));
    assert_eq!(end.reason, DisconnectReason::Broker(CloseCode::Revoked));
    assert!(end.reason.is_refusal());

    let (stdout, outcome) = tokio::time::timeout(WAIT, broker_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stdout, b"hi\n");
    assert_eq!(outcome, CommandOutcome::Exited(0));
}

/// A broker that accepts frames of at most 4 KiB says so in `Welcome`; the agent cuts a
/// 100 KiB output into frames that fit, even for a command stream that overtook the
/// `Welcome` (opened before it was sent).
#[tokio::test]
async fn output_is_chunked_to_the_limit_the_broker_announces() {
    const LIMIT: usize = 4096;
    let fx = fixture();
    let server = broker_endpoint(&broker(&fx.ca, TD, "edge-1"), &fx.ca);
    let addr = server.local_addr().unwrap();

    let broker_task = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut session_send, mut session_recv) = conn.accept_bi().await.unwrap();
        let mut dec = FrameDecoder::new(LIMIT);
        match read_frame(&mut session_recv, &mut dec).await {
            Some(Frame::Hello(h)) => assert!(
                h.capabilities
                    .contains(&tether_proto::capability::MAX_FRAME_LEN.to_string()),
                "{:?}",
                h.capabilities
            ),
            other => panic!("expected Hello, got {other:?}"),
        }
        // The command first: its request reaches the agent before the Welcome.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(
            &mut send,
            Frame::CommandRequest(CommandRequest {
                command_id: 5,
                kind: CommandKind::Exec,
                argv: vec!["seq".into(), "1".into(), "20000".into()],
                env_allowlist: vec![],
                deadline_ms: 20_000,
                signed: None,
            }),
        )
        .await;
        send.finish().unwrap();
        // Let the request arrive and the agent read it before the Welcome goes out; the
        // agent waits for the Welcome either way, this only makes the race likely.
        tokio::task::yield_now().await;
        write_frame(
            &mut session_send,
            Frame::Welcome(Welcome {
                protocol_version: 1,
                session_id: 3,
                heartbeat_interval_ms: 1000,
                server_time_ms: 0,
                manual_renewal_generation: 0,
                max_frame_len: Some(LIMIT as u32),
                capabilities: Vec::new(),
            }),
        )
        .await;
        // Every frame must fit the announced limit: this decoder refuses anything larger.
        let mut dec = FrameDecoder::new(LIMIT);
        let mut stdout = Vec::new();
        let mut frames = 0;
        let outcome = loop {
            match read_frame(&mut recv, &mut dec).await {
                Some(Frame::CommandOutput(o)) => {
                    assert!(o.data.len() + 14 <= LIMIT);
                    stdout.extend_from_slice(&o.data);
                    frames += 1;
                }
                Some(Frame::CommandResult(r)) => break r.outcome,
                other => panic!("unexpected {other:?}"),
            }
        };
        conn.close(VarInt::from_u32(CloseCode::Normal.code()), b"normal");
        server.wait_idle().await;
        (stdout, frames, outcome)
    });

    let cfg = AgentConfig::default();
    let client = client_config(&fx.creds, &cfg).unwrap();
    tokio::time::timeout(
        WAIT,
        connect_once(
            &agent_endpoint(),
            addr,
            client,
            &fx.creds,
            &cfg,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("session ends")
    .expect("connected");
    let (stdout, frames, outcome) = tokio::time::timeout(WAIT, broker_task)
        .await
        .unwrap()
        .unwrap();
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 100 * 1024);
    assert_eq!(String::from_utf8(stdout).unwrap(), expected);
    assert!(
        frames >= expected.len().div_ceil(LIMIT - 14),
        "{frames} frames"
    );
    assert_eq!(outcome, CommandOutcome::Exited(0));
}

#[tokio::test]
async fn broker_of_another_trust_domain_is_refused_by_the_agent() {
    let fx = fixture();
    let server = broker_endpoint(&broker(&fx.ca, "evil.test", "edge-1"), &fx.ca);
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    let cfg = AgentConfig::default();
    let client = client_config(&fx.creds, &cfg).unwrap();
    let err = tokio::time::timeout(
        WAIT,
        connect_once(
            &agent_endpoint(),
            addr,
            client,
            &fx.creds,
            &cfg,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("attempt ends")
    .expect_err("refused");
    // The agent's TLS stack raised bad_certificate (42) against the broker.
    assert_eq!(
        err,
        ConnectError::Handshake(DisconnectReason::TlsAlert {
            alert: 42,
            by_peer: false
        })
    );
    assert!(!err.reason().is_refusal());
}

#[tokio::test]
async fn broker_refusing_the_client_certificate_is_a_refusal() {
    let fx = fixture();
    let other_ca = Ca::new("other");
    // The broker only trusts clients of another CA.
    let server = broker_endpoint(&broker(&fx.ca, TD, "edge-1"), &other_ca);
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    let cfg = AgentConfig::default();
    let client = client_config(&fx.creds, &cfg).unwrap();
    let reason = match tokio::time::timeout(
        WAIT,
        connect_once(
            &agent_endpoint(),
            addr,
            client,
            &fx.creds,
            &cfg,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("attempt ends")
    {
        Ok(end) => end.reason,
        Err(e) => e.reason(),
    };
    assert!(
        matches!(reason, DisconnectReason::TlsAlert { by_peer: true, .. }),
        "{reason:?}"
    );
    assert!(reason.is_refusal(), "{reason}");
}

async fn next_event(rx: &mut broadcast::Receiver<AgentEvent>) -> AgentEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("event in time")
        .expect("channel open")
}

async fn wait_for(
    rx: &mut broadcast::Receiver<AgentEvent>,
    pred: impl Fn(&AgentEvent) -> bool,
) -> AgentEvent {
    loop {
        let e = next_event(rx).await;
        if pred(&e) {
            return e;
        }
    }
}

#[tokio::test]
async fn run_loop_follows_goaway_then_backs_off_long_after_revocation() {
    let fx = fixture();
    let server = broker_endpoint(&broker(&fx.ca, TD, "edge-1"), &fx.ca);
    let addr: SocketAddr = server.local_addr().unwrap();

    let broker_task = tokio::spawn(async move {
        // First session: a command, then GoAway with a short delay.
        let (conn, mut send, _recv) = accept_session(&server, 1).await;
        let (stdout, _) = run_echo(&conn).await;
        assert_eq!(stdout, b"hi\n");
        write_frame(
            &mut send,
            Frame::GoAway(GoAway {
                reason: GoAwayReason::Draining,
                reconnect_after_ms: 50,
                message: "restarting".into(),
            }),
        )
        .await;
        // Make before break: the agent opens its next session while the first is still
        // up, and closes the first (normal) only once the next one is welcomed.
        let (conn2, _send2, mut recv) = accept_session(&server, 2).await;
        let closed = tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("first closed");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == VarInt::from_u32(CloseCode::Normal.code())),
            "{closed:?}"
        );
        // Second session: once the agent heartbeats (so it saw Welcome), revoked.
        let conn = conn2;
        let mut dec = FrameDecoder::new(tether_proto::DEFAULT_MAX_FRAME_LEN);
        assert!(matches!(
            read_frame(&mut recv, &mut dec).await,
            Some(Frame::Heartbeat(h)) if h.seq == 1
        ));
        conn.close(VarInt::from_u32(CloseCode::Revoked.code()), b"revoked");
        server.wait_idle().await;
    });

    let cfg = AgentConfig {
        revoked_backoff: Duration::from_secs(600),
        ..AgentConfig::default()
    };
    let agent = Agent::new(cfg, fx.creds.clone(), agent_endpoint(), vec![addr]).unwrap();
    let mut events = agent.events();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(agent.run(shutdown.clone()));

    assert_eq!(
        next_event(&mut events).await,
        AgentEvent::Connecting { broker: addr }
    );
    assert_eq!(
        next_event(&mut events).await,
        AgentEvent::Connected {
            broker: addr,
            session_id: 1
        }
    );
    let finished = wait_for(&mut events, |e| {
        matches!(e, AgentEvent::CommandFinished { .. })
    })
    .await;
    assert_eq!(
        finished,
        AgentEvent::CommandFinished {
            command_id: 42,
            outcome: CommandOutcome::Exited(0)
        }
    );
    let go_away = wait_for(&mut events, |e| matches!(e, AgentEvent::GoAway { .. })).await;
    assert_eq!(
        go_away,
        AgentEvent::GoAway {
            broker: addr,
            reason: GoAwayReason::Draining,
            reconnect_after: Duration::from_millis(50)
        }
    );
    assert_eq!(
        wait_for(&mut events, |e| matches!(
            e,
            AgentEvent::Disconnected { .. }
        ))
        .await,
        AgentEvent::Disconnected {
            broker: Some(addr),
            reason: DisconnectReason::Local(CloseCode::Normal)
        }
    );
    match wait_for(&mut events, |e| matches!(e, AgentEvent::Backoff { .. })).await {
        AgentEvent::Backoff { delay, refused } => {
            assert!(!refused);
            assert!(delay <= Duration::from_millis(50));
        }
        _ => unreachable!(),
    }
    assert_eq!(
        wait_for(&mut events, |e| matches!(e, AgentEvent::Connected { .. })).await,
        AgentEvent::Connected {
            broker: addr,
            session_id: 2
        }
    );
    assert_eq!(
        wait_for(&mut events, |e| matches!(
            e,
            AgentEvent::Disconnected { .. }
        ))
        .await,
        AgentEvent::Disconnected {
            broker: Some(addr),
            reason: DisconnectReason::Broker(CloseCode::Revoked)
        }
    );
    match next_event(&mut events).await {
        AgentEvent::Backoff { delay, refused } => {
            assert!(refused);
            assert!(delay >= Duration::from_secs(480), "{delay:?}");
        }
        other => panic!("expected the long backoff, got {other:?}"),
    }
    shutdown.cancel();
    assert_eq!(next_event(&mut events).await, AgentEvent::Stopped);
    tokio::time::timeout(WAIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, broker_task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_closes_the_session_normally() {
    let fx = fixture();
    let server = broker_endpoint(&broker(&fx.ca, TD, "edge-1"), &fx.ca);
    let addr = server.local_addr().unwrap();
    let broker_task = tokio::spawn(async move {
        let (conn, _send, _recv) = accept_session(&server, 9).await;
        conn.closed().await
    });
    let agent = Agent::new(
        AgentConfig::default(),
        fx.creds.clone(),
        agent_endpoint(),
        vec![addr],
    )
    .unwrap();
    let mut events = agent.events();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(agent.run(shutdown.clone()));
    wait_for(&mut events, |e| matches!(e, AgentEvent::Connected { .. })).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let closed = tokio::time::timeout(WAIT, broker_task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CloseCode::Normal.code())),
        "{closed:?}"
    );
}

/// Every appliance holds its agent's future for as long as it runs (the simulator holds
/// 100,000 of them): the handshake's state (TLS, proxy, QUIC `Connecting`, 5.8 KB) is
/// boxed for the attempt rather than kept in it, and `self` is held once. It measured
/// 9.5 KB before, 3.9 KB after (debug builds).
#[tokio::test]
async fn the_agent_future_stays_small() {
    let fx = fixture();
    let broker: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let agent = Agent::new(
        AgentConfig::default(),
        fx.creds.clone(),
        agent_endpoint(),
        vec![broker],
    )
    .unwrap();
    let run = agent.run(CancellationToken::new());
    let size = std::mem::size_of_val(&run);
    assert!(size <= 5 * 1024, "the agent's future is {size} bytes");
}
