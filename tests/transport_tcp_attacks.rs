//! Attacks on the broker's TLS-over-TCP transport: what QUIC refuses, TCP refuses too, and
//! bad input on the TCP path closes that connection while the broker keeps serving.
//!
//! - Every certificate refusal of `verifier_attacks.rs`, over TCP: the alert the client
//!   reads, the `reason` counted once, no session. Plus what only TLS over TCP allows: a
//!   client offering a foreign ALPN, or none at all.
//! - Bytes that are not TLS, oversized frames, a stream flood, and a broken record layer
//!   (spoken below `tether_transport::tcp`, on raw yamux streams, as an attacker would).
//! - A drain over TCP: GoAway, the agent moves make-before-break, the broker exits 0.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use futures_util::io::AsyncReadExt as _;
use tether::pki::{Leaf, LeafSpec, Pki};
use tether_proto::{encode_frame, CloseCode, Frame, FrameDecoder, Hello, DEFAULT_MAX_FRAME_LEN};
use tether_transport::tcp;
use time::{Duration as TDuration, OffsetDateTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};

const PROTOCOL_ERROR: u64 = CloseCode::ProtocolError.code() as u64;
/// How long a refusal or a close may take to reach the client.
const LIMIT: Duration = Duration::from_secs(10);

// ---- the client ----

/// The rustls client setup of `raw_client` (TLS 1.3, WebPKI against the fleet root,
/// `leaf` or no certificate), offering `alpn`.
fn client_config(pki: &Pki, leaf: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    Arc::new(raw_tls(pki, leaf, alpn))
}

/// A TLS handshake over TCP to `addr`, offering `alpn`.
async fn tls_connect(
    pki: &Pki,
    leaf: Option<&Leaf>,
    alpn: &[&[u8]],
    addr: SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        LIMIT,
        tokio_rustls::TlsConnector::from(client_config(pki, leaf, alpn)).connect(name, tcp),
    )
    .await
    .expect("the TLS handshake ends in time")
}

/// How an I/O error from the TLS stream reads as an end: the broker's alert, the
/// connection closed under us, or something else.
fn io_ended(e: &std::io::Error) -> Ended {
    use std::io::ErrorKind as K;
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => Ended::Alert(u8::from(*a)),
        _ if matches!(
            e.kind(),
            K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted
        ) =>
        {
            closed()
        }
        _ => Ended::Other(format!("{:?}: {e}", e.kind())),
    }
}

/// The TCP connection ended without an alert (EOF, with or without `close_notify`, or RST).
fn closed() -> Ended {
    Ended::Other("closed".into())
}

/// Try to get anything out of the broker with `leaf` over TCP: how the broker ended it.
/// Over TLS 1.3 the client's handshake completes before the broker has read the client's
/// certificate, so a refused certificate shows as the alert the first read returns.
async fn tcp_refusal(pki: &Pki, leaf: Option<&Leaf>, alpn: &[&[u8]], addr: SocketAddr) -> Ended {
    let mut tls = match tls_connect(pki, leaf, alpn, addr).await {
        Ok(tls) => tls,
        Err(e) => return io_ended(&e),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(LIMIT, tls.read(&mut buf)).await {
        Ok(Ok(0)) => closed(),
        Ok(Ok(n)) => Ended::Other(format!("the broker sent {n} bytes")),
        Ok(Err(e)) => io_ended(&e),
        Err(_) => Ended::Other("nothing happened".into()),
    }
}

/// The agent's side of the transport over a finished handshake.
fn transport(tls: TlsStream<TcpStream>, max_streams: usize) -> tether_transport::Connection {
    tcp::Connection::client(
        tls,
        tcp::Settings {
            max_streams,
            protocol_error: PROTOCOL_ERROR,
        },
    )
    .into()
}

/// A connection with the session stream open and welcomed, as the agent has it.
struct Session {
    conn: tether_transport::Connection,
    send: tether_transport::SendStream,
    _recv: tether_transport::RecvStream,
    welcome: tether_proto::Welcome,
}

fn hello_bytes() -> BytesMut {
    let mut buf = BytesMut::new();
    let hello = Frame::Hello(Hello {
        protocol_version: tether_proto::PROTOCOL_VERSION,
        agent_version: "tcp-attack-test".into(),
        capabilities: Vec::new(),
        cert_not_after_ms: 0,
    });
    encode_frame(&hello, &mut buf, DEFAULT_MAX_FRAME_LEN).unwrap();
    buf
}

/// `common::hello_with` over either transport: open the session stream, Hello, Welcome.
async fn hello(conn: &tether_transport::Connection) -> Result<Session, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&hello_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    loop {
        match recv.read_chunk(65536).await {
            Ok(Some(chunk)) => dec.push(&chunk),
            Ok(None) => return Err("stream finished".into()),
            Err(e) => return Err(e.to_string()),
        }
        match dec.poll_frame() {
            Ok(Some(Frame::Welcome(welcome))) => {
                return Ok(Session {
                    conn: conn.clone(),
                    send,
                    _recv: recv,
                    welcome,
                })
            }
            Ok(Some(other)) => return Err(format!("unexpected {other:?}")),
            Ok(None) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A welcomed session over TCP with `leaf`.
async fn tcp_session(pki: &Pki, leaf: &Leaf, addr: SocketAddr) -> Session {
    let tls = tls_connect(pki, Some(leaf), &[tether_proto::ALPN], addr)
        .await
        .expect("handshake");
    let conn = transport(tls, 64);
    tokio::time::timeout(LIMIT, hello(&conn))
        .await
        .expect("Welcome in time")
        .expect("Welcome")
}

/// How the broker ended `conn`.
async fn conn_ended(conn: &tether_transport::Connection) -> Ended {
    let e = tokio::time::timeout(LIMIT, conn.closed())
        .await
        .expect("the broker closed the connection");
    ended(&e)
}

/// After an attack: the broker process is alive, and an appliance it pins still gets a
/// session over TCP, reported as such.
async fn still_serves(setup: &Setup, broker: &mut BrokerProc, good: &Leaf, id: &str) {
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the broker is still running"
    );
    let s = tcp_session(&setup.pki, good, broker.tcp.unwrap()).await;
    let row = wait_for(LIMIT, || async {
        broker
            .sessions()
            .await
            .into_iter()
            .find(|r| r["appliance_id"] == id && r["session_id"] == s.welcome.session_id)
    })
    .await
    .expect("the good appliance's session is listed");
    assert_eq!(row["transport"], "tcp");
    s.conn.close(0u32.into(), b"done");
}

fn sample(name: &str, label: &str, value: &str) -> String {
    format!("{name}{{{label}=\"{value}\"}}")
}

fn spec(id: &str) -> LeafSpec {
    LeafSpec::appliance(TRUST_DOMAIN, id)
}

// ---- 1. refusals ----

/// Present `leaf` over TCP: the client reads `expect`, the broker counts `sample` once
/// and lists no session.
async fn refused_tcp(
    setup: &Setup,
    broker: &BrokerProc,
    leaf: Option<&Leaf>,
    alpn: &[&[u8]],
    expect: Ended,
    sample: &str,
) {
    let before = broker.metric(sample).await;
    let end = tcp_refusal(&setup.pki, leaf, alpn, broker.tcp.unwrap()).await;
    assert_eq!(end, expect, "{sample}");
    let after = broker.wait_metric(sample, before + 1.0).await;
    assert_eq!(after, before + 1.0, "{sample} counted once");
    assert!(broker.sessions().await.is_empty(), "{sample}: no session");
}

#[tokio::test]
async fn every_certificate_quic_refuses_tcp_refuses_with_the_same_alert_and_reason() {
    let setup = Setup::new();
    let good = setup.pki.appliance("app-a").unwrap();
    let unpinned = setup.pki.appliance("app-a").unwrap();
    let foreign = Pki::new("other.test").unwrap().appliance("app-a").unwrap();
    let mut s = spec("app-a");
    s.not_before = OffsetDateTime::now_utc() - TDuration::days(40);
    s.not_after = OffsetDateTime::now_utc() - TDuration::days(10);
    let expired = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.not_before = OffsetDateTime::now_utc() + TDuration::days(1);
    s.not_after = OffsetDateTime::now_utc() + TDuration::days(30);
    let not_yet = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.uris = vec!["spiffe://other.test/appliance/app-a".into()];
    let wrong_td = setup.pki.intermediate.issue(&s).unwrap();
    let mut s = spec("app-a");
    s.client_auth = false;
    s.server_auth = true;
    let wrong_eku = setup.pki.intermediate.issue(&s).unwrap();
    let names_b = setup.pki.appliance("app-b").unwrap();
    // Every fingerprint pinned but the one under test: each fails on its own property.
    setup.set_allowlist(&[
        ("app-a", &good),
        ("app-a", &foreign),
        ("app-a", &expired),
        ("app-a", &not_yet),
        ("app-a", &wrong_td),
        ("app-a", &wrong_eku),
        ("app-a", &names_b),
    ]);
    let broker = setup.broker("b1", "");
    let alpn: &[&[u8]] = &[tether_proto::ALPN];
    let rejected = |reason| sample("tether_handshake_rejected_total", "reason", reason);

    for (leaf, alert, reason) in [
        (
            Some(&unpinned),
            alert::CERTIFICATE_REVOKED,
            "unknown_fingerprint",
        ),
        (Some(&foreign), alert::UNKNOWN_CA, "unknown_issuer"),
        (Some(&expired), alert::CERTIFICATE_EXPIRED, "expired"),
        (Some(&not_yet), alert::CERTIFICATE_EXPIRED, "not_yet_valid"),
        (
            Some(&wrong_td),
            alert::BAD_CERTIFICATE,
            "wrong_trust_domain",
        ),
        (
            Some(&wrong_eku),
            alert::UNSUPPORTED_CERTIFICATE,
            "wrong_eku",
        ),
        (
            Some(&names_b),
            alert::ACCESS_DENIED,
            "fingerprint_for_other_appliance",
        ),
        (None, alert::CERTIFICATE_REQUIRED, "no_client_certificate"),
    ] {
        refused_tcp(
            &setup,
            &broker,
            leaf,
            alpn,
            Ended::Alert(alert),
            &rejected(reason),
        )
        .await;
    }
    // The same certificates over QUIC end the same way (the control for the alerts).
    assert_eq!(
        try_session(&setup.pki, Some(&unpinned), broker.quic).await,
        Some(Ended::Alert(alert::CERTIFICATE_REVOKED))
    );
    assert_eq!(
        broker
            .metric("tether_transport_sessions{transport=\"tcp\"}")
            .await,
        0.0
    );
    assert!(broker.log_contains("fingerprint_for_other_appliance"));
}

#[tokio::test]
async fn tcp_refuses_a_foreign_alpn_and_no_alpn_at_all() {
    let setup = Setup::new();
    let good = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &good)]);
    let mut broker = setup.broker("b1", "");
    let failed = sample("tether_handshake_failed_total", "kind", "alpn");

    // A foreign protocol: refused in the handshake with `no_application_protocol`, as
    // QUIC refuses it.
    refused_tcp(
        &setup,
        &broker,
        Some(&good),
        &[b"h2", b"http/1.1"],
        Ended::Alert(ALERT_NO_APPLICATION_PROTOCOL),
        &failed,
    )
    .await;
    // No ALPN at all (QUIC cannot do without; TLS can, and rustls lets the handshake
    // finish): a pinned certificate does not make up for it. The broker can send no alert
    // after the handshake, so the client sees the connection closed.
    assert_eq!(
        tcp_refusal(&setup.pki, Some(&good), &[], broker.tcp.unwrap()).await,
        closed(),
        "no ALPN"
    );
    assert_eq!(broker.wait_metric(&failed, 2.0).await, 2.0);
    assert!(broker.sessions().await.is_empty());
    // And it is refused before any stream could be opened: yamux over it gets nowhere.
    let tls = tls_connect(&setup.pki, Some(&good), &[], broker.tcp.unwrap())
        .await
        .unwrap();
    let conn = transport(tls, 64);
    let r = tokio::time::timeout(LIMIT, hello(&conn)).await.unwrap();
    assert!(r.is_err(), "no Welcome without ALPN");
    assert_eq!(broker.wait_metric(&failed, 3.0).await, 3.0);
    assert_eq!(
        broker
            .metric("tether_handshake_rejected_total{reason=\"unknown_fingerprint\"}")
            .await,
        0.0
    );
    still_serves(&setup, &mut broker, &good, "app-a").await;
}

/// TLS alert `no_application_protocol` (RFC 7301).
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

// ---- 2. bad input ----

#[tokio::test]
async fn bytes_that_are_not_tls_close_that_connection_and_count_as_tls() {
    let setup = Setup::new();
    let good = setup.pki.appliance("app-good").unwrap();
    setup.set_allowlist(&[("app-good", &good)]);
    let mut broker = setup.broker("b1", "");
    let addr = broker.tcp.unwrap();
    let failed = sample("tether_handshake_failed_total", "kind", "tls");
    let mut junk = vec![0u8; 4096];
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(167).wrapping_add(13);
    }
    // A TLS record header announcing a handshake record, then noise.
    let mut fake_record = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    fake_record.extend_from_slice(&junk[..512]);
    let inputs: [(&str, &[u8]); 3] = [
        ("http", b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n"),
        ("noise", &junk),
        ("fake handshake record", &fake_record),
    ];
    for (i, (what, bytes)) in inputs.into_iter().enumerate() {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // The broker may close before every byte is written.
        let _ = tcp.write_all(bytes).await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "{what}: the broker closed the connection");
        assert!(
            !String::from_utf8_lossy(&sink).contains("HTTP"),
            "{what}: no HTTP answer"
        );
        broker.wait_metric(&failed, (i + 1) as f64).await;
    }
    assert_eq!(broker.metric(&failed).await, 3.0, "each counted once");
    assert!(broker.sessions().await.is_empty());
    still_serves(&setup, &mut broker, &good, "app-good").await;
}

#[tokio::test]
async fn an_oversized_frame_over_tcp_closes_with_protocol_error() {
    let setup = Setup::new();
    let bad = setup.pki.appliance("app-bad").unwrap();
    let good = setup.pki.appliance("app-good").unwrap();
    setup.set_allowlist(&[("app-bad", &bad), ("app-good", &good)]);
    let mut broker = setup.broker("b1", "");
    let mut s = tcp_session(&setup.pki, &bad, broker.tcp.unwrap()).await;
    // A length prefix of 1 MiB (the limit is 64 KiB): refused before the body arrives.
    let mut oversized = BytesMut::new();
    oversized.put_u32(1 << 20);
    oversized.put_u8(0x03);
    let _ = s.send.write_all(&oversized).await;
    assert_eq!(conn_ended(&s.conn).await, Ended::App(PROTOCOL_ERROR));
    broker
        .wait_metric(
            &sample("tether_protocol_errors_total", "kind", "frame_too_large"),
            1.0,
        )
        .await;
    still_serves(&setup, &mut broker, &good, "app-good").await;
}

#[tokio::test]
async fn a_stream_flood_over_tcp_closes_that_connection_and_the_broker_survives() {
    let setup = Setup::new();
    let bad = setup.pki.appliance("app-bad").unwrap();
    let good = setup.pki.appliance("app-good").unwrap();
    setup.set_allowlist(&[("app-bad", &bad), ("app-good", &good)]);
    let mut broker = setup.broker("b1", "");
    let tls = tls_connect(
        &setup.pki,
        Some(&bad),
        &[tether_proto::ALPN],
        broker.tcp.unwrap(),
    )
    .await
    .unwrap();
    // Our side lets us open more streams than the broker's 256.
    let conn = transport(tls, 1024);
    let _session = hello(&conn).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..300 {
        match conn.open_bi().await {
            Ok((mut send, recv)) => {
                let _ = send.write_all(b"\0\0\0\x01\x03").await;
                streams.push((send, recv));
            }
            Err(_) => break,
        }
    }
    let end = conn_ended(&conn).await;
    eprintln!("flood: opened {} streams, ended {end:?}", streams.len());
    // The broker closes with `protocol_error` on the second stream. While we keep
    // flooding, its socket still holds our unread bytes when it closes, so its kernel
    // answers with a TCP RST, which may discard the close stream before we read it: then
    // all we see is the reset. (QUIC's close cannot be lost that way.)
    assert!(
        end == Ended::App(PROTOCOL_ERROR) || end == Ended::Other("reset by peer".into()),
        "flood: {end:?}"
    );
    broker
        .wait_metric(
            &sample("tether_protocol_errors_total", "kind", "extra_stream"),
            1.0,
        )
        .await;
    drop(streams);
    still_serves(&setup, &mut broker, &good, "app-good").await;
}

// ---- below tether_transport::tcp: raw yamux ----

type RawStream = Compat<yamux::Stream>;

/// A yamux client over a TLS stream that opens streams on request and reads the broker's
/// close stream: what an attacker holding a valid certificate speaks, with any first byte
/// and any record.
struct RawMux {
    opens: mpsc::UnboundedSender<oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>>,
    /// The broker's close code, once its close stream arrived; `None` if the connection
    /// ended without one.
    closed: oneshot::Receiver<Option<u64>>,
}

impl RawMux {
    fn start(tls: TlsStream<TcpStream>) -> RawMux {
        let mut mux =
            yamux::Connection::new(tls.compat(), yamux::Config::default(), yamux::Mode::Client);
        let (opens, mut open_rx) = mpsc::unbounded_channel::<
            oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>,
        >();
        let (close_tx, close_rx) = mpsc::unbounded_channel::<u64>();
        let (closed_tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            std::future::poll_fn(|cx| {
                use std::task::Poll;
                while let Poll::Ready(Some(tx)) = open_rx.poll_recv(cx) {
                    pending.push_back(tx);
                }
                while !pending.is_empty() {
                    match mux.poll_new_outbound(cx) {
                        Poll::Ready(r) => {
                            let _ = pending.pop_front().unwrap().send(r);
                        }
                        Poll::Pending => break,
                    }
                }
                loop {
                    match mux.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(stream))) => {
                            tokio::spawn(read_close(stream, close_tx.clone()));
                        }
                        Poll::Ready(_) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await;
            drop(close_tx);
            let mut close_rx = close_rx;
            // A close stream still being read wins over "ended without one".
            let code = tokio::time::timeout(Duration::from_secs(1), close_rx.recv())
                .await
                .ok()
                .flatten();
            let _ = closed_tx.send(code);
        });
        RawMux { opens, closed }
    }

    async fn open(&self) -> RawStream {
        let (tx, rx) = oneshot::channel();
        self.opens.send(tx).unwrap();
        rx.await.unwrap().expect("yamux stream").compat()
    }

    /// The broker's close code (bounded).
    async fn closed(self, what: &str) -> Option<u64> {
        tokio::time::timeout(LIMIT, self.closed)
            .await
            .unwrap_or_else(|_| panic!("{what}: the broker never ended the connection"))
            .unwrap()
    }
}

/// Read an inbound stream: the close stream's code goes to `tx`.
async fn read_close(stream: yamux::Stream, tx: mpsc::UnboundedSender<u64>) {
    let mut stream = stream;
    let mut kind = [0u8; 1];
    if stream.read_exact(&mut kind).await.is_err() || kind[0] != tcp::KIND_CLOSE {
        // A control stream (ACKs): keep it open and read it, as the transport does.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        return;
    }
    let mut body = Vec::new();
    let _ = (&mut stream)
        .take(8 + tcp::MAX_REASON as u64)
        .read_to_end(&mut body)
        .await;
    if body.len() >= 8 {
        let _ = tx.send(u64::from_be_bytes(body[..8].try_into().unwrap()));
    }
}

fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Open the session stream by hand (kind byte, a `DATA` record with Hello) and read the
/// broker's records up to Welcome.
async fn raw_hello(mux: &RawMux) -> RawStream {
    let mut s = mux.open().await;
    let mut first = vec![tcp::KIND_STREAM];
    first.extend(record(0x00, &hello_bytes()));
    tokio::io::AsyncWriteExt::write_all(&mut s, &first)
        .await
        .unwrap();
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    loop {
        let mut header = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut header)
            .await
            .unwrap();
        let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
        assert_eq!(header[0], 0x00, "a DATA record");
        let mut payload = vec![0u8; len];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut payload)
            .await
            .unwrap();
        dec.push(&payload);
        match dec.poll_frame().unwrap() {
            Some(Frame::Welcome(_)) => return s,
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
}

async fn raw_mux(setup: &Setup, leaf: &Leaf, broker: &BrokerProc) -> RawMux {
    let tls = tls_connect(
        &setup.pki,
        Some(leaf),
        &[tether_proto::ALPN],
        broker.tcp.unwrap(),
    )
    .await
    .unwrap();
    RawMux::start(tls)
}

#[tokio::test]
async fn a_broken_record_layer_closes_that_connection_with_protocol_error() {
    let setup = Setup::new();
    let bad = setup.pki.appliance("app-bad").unwrap();
    let good = setup.pki.appliance("app-good").unwrap();
    setup.set_allowlist(&[("app-bad", &bad), ("app-good", &good)]);
    let mut broker = setup.broker("b1", "");

    // A stream of an unknown kind, as the first stream of a connection.
    let mux = raw_mux(&setup, &bad, &broker).await;
    let mut s = mux.open().await;
    tokio::io::AsyncWriteExt::write_all(&mut s, &[0x07, 0, 0, 0, 0])
        .await
        .unwrap();
    assert_eq!(
        mux.closed("unknown stream kind").await,
        Some(PROTOCOL_ERROR)
    );
    assert!(broker.sessions().await.is_empty());

    // On a welcomed session stream: records the mapping does not allow.
    let mut big = vec![0x00];
    big.extend_from_slice(&(tcp::MAX_RECORD as u32 + 1).to_be_bytes());
    let broken: [(&str, Vec<u8>); 6] = [
        ("unknown record type", record(0x09, b"x")),
        ("STOP is no stream record", record(0x03, &[0; 8])),
        ("empty DATA", record(0x00, b"")),
        ("DATA over the record limit", big),
        ("FIN with a payload", record(0x01, b"x")),
        ("RESET without its 8-byte code", record(0x02, &[0; 4])),
    ];
    for (what, bytes) in broken {
        let mux = raw_mux(&setup, &bad, &broker).await;
        let mut s = raw_hello(&mux).await;
        broker.wait_session("app-bad").await;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, &bytes).await;
        assert_eq!(mux.closed(what).await, Some(PROTOCOL_ERROR), "{what}");
        let gone = wait_for(LIMIT, || async {
            broker.sessions().await.is_empty().then_some(())
        })
        .await;
        assert!(gone.is_some(), "{what}: the session ended");
    }

    // A control message of an unknown type, whatever stream it names.
    for id in [1u32, 0xdead_beef] {
        let mux = raw_mux(&setup, &bad, &broker).await;
        let _session = raw_hello(&mux).await;
        let mut control = mux.open().await;
        let mut msg = vec![tcp::KIND_CONTROL, 0x7f];
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&0u64.to_be_bytes());
        let _ = tokio::io::AsyncWriteExt::write_all(&mut control, &msg).await;
        let what = format!("unknown control message about stream {id:#x}");
        assert_eq!(mux.closed(&what).await, Some(PROTOCOL_ERROR), "{what}");
    }
    still_serves(&setup, &mut broker, &good, "app-good").await;
}

// ---- 3. drain ----

/// The broker's sessions, or none when its admin API no longer answers (it exited).
async fn sessions_or_none(broker: &BrokerProc) -> Vec<serde_json::Value> {
    let Ok(resp) = http().get(broker.url("/v1/sessions")).send().await else {
        return Vec::new();
    };
    resp.json().await.unwrap_or_default()
}

#[tokio::test]
async fn sigterm_drains_tcp_sessions_to_the_other_broker() {
    drain_over_tcp(false).await;
}

/// The appliance is never without a session across both brokers while it moves: on
/// hand-over the agent keeps the old session stream open (dropping it would finish it and
/// end the session on the drained broker) until the next session is welcomed.
#[tokio::test]
async fn sigterm_drain_over_tcp_is_make_before_break_in_the_session_tables() {
    drain_over_tcp(true).await;
}

/// SIGTERM the broker holding a `--transport tcp` agent; `strict`: no round may see the
/// appliance on neither broker.
async fn drain_over_tcp(strict: bool) {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let drain = "[drain]\ntimeout = \"5s\"\nreconnect_jitter = \"200ms\"\n";
    let mut b1 = setup.broker("b1", drain);
    let mut b2 = setup.broker("b2", drain);
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[b1.quic, b2.quic], &["--transport", "tcp"]);

    let on_b1 = wait_for(Duration::from_secs(15), || async {
        if !b1.sessions().await.is_empty() {
            Some(true)
        } else if !b2.sessions().await.is_empty() {
            Some(false)
        } else {
            None
        }
    })
    .await
    .expect("agent connected somewhere");
    let (first, second) = if on_b1 {
        (&mut b1, &mut b2)
    } else {
        (&mut b2, &mut b1)
    };
    let row = first.wait_session("app-1").await;
    assert_eq!(row["transport"], "tcp");

    first.terminate();
    // Ask the broker being left first, then the one being joined: the new session starts
    // before the old one ends, so a round seeing neither is a real gap.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut gaps, mut overlaps) = (0, 0);
    let row = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never reached the other broker"
        );
        let old = sessions_or_none(first).await;
        let new = sessions_or_none(second).await;
        if old.is_empty() && new.is_empty() {
            gaps += 1;
        }
        if !old.is_empty() && !new.is_empty() {
            overlaps += 1;
        }
        if let Some(row) = new.into_iter().find(|r| r["appliance_id"] == "app-1") {
            if old.is_empty() {
                break row;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("drain: {overlaps} rounds with a session on both brokers, {gaps} on neither");
    if strict {
        assert_eq!(gaps, 0, "make before break: never without a session");
    }
    assert_eq!(row["transport"], "tcp", "the agent stayed on TCP");
    assert_eq!(row["fingerprint"], leaf.fingerprint_hex());
    let status = first.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "drained broker exits cleanly: {status}");
    assert!(first.log_contains("draining"));
    assert!(
        first.log_contains("drain finished"),
        "the agent left on GoAway before the timeout"
    );
    // The session it moved to is still there.
    let rows = second.sessions().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["transport"], "tcp");
}
