//! The TCP transport against itself over real sockets and TLS: streams, their ends and
//! codes, and the connection close code, as QUIC reports them.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tether_transport::tcp::{self, Settings};
use tether_transport::{Connection, ConnectionError, ReadError, VarInt, WriteError};
use tokio::net::{TcpListener, TcpStream};

const SETTINGS: Settings = Settings {
    max_streams: 16,
    protocol_error: 3,
};

/// A connected (agent, broker) pair over loopback TLS.
async fn pair() -> (Connection, Connection) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = CertificateDer::from(key.cert.der().to_vec());
    let pkey = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], pkey)
        .unwrap();
    server.alpn_protocols = vec![b"tether/1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"tether/1".to_vec()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        Connection::from(tcp::Connection::server(tls, remote, SETTINGS))
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp::tune(&tcp, Duration::from_secs(30)).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let agent = Connection::from(tcp::Connection::client(tls, SETTINGS));
    (agent, server.await.unwrap())
}

#[tokio::test]
async fn streams_carry_bytes_both_ways_and_end_cleanly() {
    let (agent, broker) = pair().await;
    let (mut send, mut recv) = agent.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    let (mut bsend, mut brecv) = broker.accept_bi().await.unwrap();
    let mut buf = [0u8; 5];
    brecv.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    // A large write crosses yamux's window and the record size.
    let big = vec![7u8; 1 << 20];
    let writer = tokio::spawn(async move {
        bsend.write_all(&big).await.unwrap();
        bsend.finish().unwrap();
        bsend.stopped().await
    });
    let mut got = 0;
    while let Some(chunk) = recv.read_chunk(64 * 1024).await.unwrap() {
        assert!(chunk.iter().all(|b| *b == 7));
        got += chunk.len();
    }
    assert_eq!(got, 1 << 20);
    // The reader saw FIN and acknowledged it: the writer's `stopped()` says delivered.
    let stopped = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Ok(None));
    send.finish().unwrap();
    assert_eq!(brecv.read(&mut buf).await, Ok(None));
}

#[tokio::test]
async fn reset_and_stop_codes_reach_the_peer() {
    let (agent, broker) = pair().await;
    let (mut send, mut recv) = broker.open_bi().await.unwrap();
    send.write_all(b"x").await.unwrap();
    let (mut asend, mut arecv) = agent.accept_bi().await.unwrap();
    let mut b = [0u8; 1];
    arecv.read_exact(&mut b).await.unwrap();
    asend.reset(VarInt::from_u32(42)).unwrap();
    assert_eq!(
        recv.read(&mut b).await,
        Err(ReadError::Reset(VarInt::from_u32(42)))
    );
    // STOP: the peer's writes fail with the code, and its `stopped()` says so.
    arecv.stop(VarInt::from_u32(7)).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
        .await
        .unwrap();
    assert_eq!(stopped, Ok(Some(VarInt::from_u32(7))));
    assert_eq!(
        send.write_all(b"more").await,
        Err(WriteError::Stopped(VarInt::from_u32(7)))
    );
}

#[tokio::test]
async fn close_code_and_reason_reach_the_peer_and_its_streams() {
    let (agent, broker) = pair().await;
    let (mut send, mut recv) = agent.open_bi().await.unwrap();
    // As over QUIC, the broker learns of the stream with its first bytes.
    send.write_all(b"x").await.unwrap();
    let (_s, _r) = broker.accept_bi().await.unwrap();
    broker.close(VarInt::from_u32(0x11), b"revoked");
    let reason = tokio::time::timeout(Duration::from_secs(5), agent.closed())
        .await
        .unwrap();
    match &reason {
        ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, VarInt::from_u32(0x11));
            assert_eq!(&c.reason[..], b"revoked");
        }
        other => panic!("{other:?}"),
    }
    let mut b = [0u8; 1];
    assert_eq!(
        recv.read(&mut b).await,
        Err(ReadError::ConnectionLost(reason))
    );
    assert_eq!(broker.close_reason(), Some(ConnectionError::LocallyClosed));
}

#[tokio::test]
async fn a_dropped_tcp_connection_is_reported_reset() {
    let (agent, broker) = pair().await;
    let (_s, _r) = agent.open_bi().await.unwrap();
    drop(broker);
    let reason = tokio::time::timeout(Duration::from_secs(5), agent.closed())
        .await
        .unwrap();
    assert!(
        matches!(
            reason,
            ConnectionError::Reset | ConnectionError::ApplicationClosed(_)
        ),
        "{reason:?}"
    );
}

#[tokio::test]
async fn a_stream_dropped_after_the_close_reads_as_the_close_not_its_end() {
    // The broker's session driver closes the connection (a revocation), then drops its
    // session stream, which finishes it: the agent must see the close code, never a FIN
    // that would read as the broker ending the session. The FIN racing the close stream
    // was seen under load (a 50-appliance revoke run over TCP), not reproduced here: this
    // guards the order the close path gives, it does not force the race.
    for _ in 0..20 {
        let (agent, broker) = pair().await;
        let (mut asend, mut arecv) = agent.open_bi().await.unwrap();
        asend.write_all(b"hello").await.unwrap();
        let (bsend, mut brecv) = broker.accept_bi().await.unwrap();
        let mut b = [0u8; 5];
        brecv.read_exact(&mut b).await.unwrap();
        broker.close(VarInt::from_u32(0x01), b"revoked");
        drop(bsend);
        drop(brecv);
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(5), arecv.read(&mut buf))
            .await
            .unwrap()
        {
            Err(ReadError::ConnectionLost(ConnectionError::ApplicationClosed(c))) => {
                assert_eq!(c.error_code, VarInt::from_u32(0x01));
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Bytes written with no task of the stream's own (an idle stream has none): order and
/// content survive a slow reader, the writer waits for room rather than queueing without
/// bound, and a writer waiting for room learns of the peer's `STOP`.
#[tokio::test]
async fn a_slow_reader_gets_every_byte_in_order_and_holds_the_writer_back() {
    let (agent, broker) = pair().await;
    let (mut send, _recv) = agent.open_bi().await.unwrap();
    // 8 MiB of a counting pattern, written in odd-sized pieces.
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let total = data.len();
    let writer = tokio::spawn(async move {
        for piece in data.chunks(100_003) {
            send.write_all(piece).await.unwrap();
        }
        send.finish().unwrap();
        send.stopped().await
    });
    let (_bsend, mut brecv) = broker.accept_bi().await.unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 50_000];
    while let Some(n) = brecv.read(&mut buf).await.unwrap() {
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, ((got + k) % 251) as u8, "byte {} out of order", got + k);
        }
        got += n;
        if got % (1 << 20) < n {
            // Slow down now and then: the writer must wait, not fail or reorder.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(got, total);
    let stopped = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Ok(None));

    // A writer held back by an unread stream is woken by the reader's STOP.
    let (mut send, _recv) = agent.open_bi().await.unwrap();
    send.write_all(b"x").await.unwrap();
    let (_bsend, mut brecv) = broker.accept_bi().await.unwrap();
    let blocked = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        loop {
            if let Err(e) = send.write_all(&chunk).await {
                return e;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !blocked.is_finished(),
        "nothing reads: the writer must be waiting"
    );
    brecv.stop(VarInt::from_u32(9)).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the STOP wakes the waiting writer")
        .unwrap();
    assert_eq!(err, WriteError::Stopped(VarInt::from_u32(9)));
}

/// As a QUIC stream, a stream reaches the peer with the opener's first write: its kind
/// byte travels with that record (one yamux frame, one TLS record), not on its own.
#[tokio::test]
async fn a_stream_reaches_the_peer_with_its_first_write_as_over_quic() {
    let (agent, broker) = pair().await;
    let (mut send, _recv) = agent.open_bi().await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), broker.accept_bi()).await;
    assert!(
        early.is_err(),
        "the broker saw a stream nothing was written on"
    );
    send.write_all(b"hello").await.unwrap();
    let (_bsend, mut brecv) = tokio::time::timeout(Duration::from_secs(5), broker.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 5];
    brecv.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
}

/// A stream ended before anything was written on it still reaches the peer, with its end:
/// finished, it reads as empty; reset, as the code.
#[tokio::test]
async fn a_stream_ended_before_its_first_write_reaches_the_peer_with_its_end() {
    let (agent, broker) = pair().await;
    let accept = || async {
        tokio::time::timeout(Duration::from_secs(5), broker.accept_bi())
            .await
            .unwrap()
            .unwrap()
    };
    let (mut send, _recv) = agent.open_bi().await.unwrap();
    send.finish().unwrap();
    let (_bsend, mut brecv) = accept().await;
    let mut b = [0u8; 1];
    assert_eq!(brecv.read(&mut b).await, Ok(None));

    let (mut send, _recv) = agent.open_bi().await.unwrap();
    send.reset(VarInt::from_u32(9)).unwrap();
    let (_bsend, mut brecv) = accept().await;
    assert_eq!(
        brecv.read(&mut b).await,
        Err(ReadError::Reset(VarInt::from_u32(9)))
    );

    // Stopped: the peer learns the stream (the `STOP` itself names it on the control
    // stream, which may be read before the stream is: see `StreamShared::open_now`).
    let (_send, mut recv) = agent.open_bi().await.unwrap();
    recv.stop(VarInt::from_u32(5)).unwrap();
    accept().await;
}
