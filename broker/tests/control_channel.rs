//! The broker's control mode against a scripted control: real sockets on 127.0.0.1, real
//! certificates, the real channel framing; control's side is written out by hand here so
//! each step of the contract (`tether_proto::cluster`) is asserted exactly.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use tether_broker::config::Config;
use tether_broker::datadir::{self, BrokerIdentity, DataDir};
use tether_proto::cluster::{ToBroker, ToControl, MAX_FRAME_LEN};
use tether_proto::{CloseCode, CommandFailure, CommandKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

const TD: &str = "example.test";

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Pki {
            ca: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn leaf(&self, uri: &str, eku: Vec<ExtendedKeyUsagePurpose>) -> (String, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = eku;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key)
    }
}

fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    datadir::parse_certs(pem.as_bytes()).unwrap()
}

/// A scripted control: TLS requiring a client certificate from our CA, the upgrade, frames.
struct FakeControl {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

type Chan = Framed<TlsStream<TcpStream>, LengthDelimitedCodec>;

impl FakeControl {
    async fn new(pki: &Pki) -> FakeControl {
        let (pem, key) = pki.leaf(
            &format!("spiffe://{TD}/control"),
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.der().clone()).unwrap();
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs(&pem), tether_broker::credential::key_der(&key))
            .unwrap();
        FakeControl {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.listener.local_addr().unwrap())
    }

    /// Accept one channel: TLS, the upgrade request, `101`.
    async fn accept(&self) -> Chan {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), self.listener.accept())
            .await
            .expect("the broker dials control")
            .unwrap();
        let mut tls = self.acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap().to_vec();
        assert!(!peer.is_empty(), "the broker presents its certificate");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "request ended early");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /v1/brokers/channel http/1.1"),
            "{head}"
        );
        assert!(head.contains("upgrade: tether-cluster/1"), "{head}");
        assert!(head.contains("connection: upgrade"), "{head}");
        tls.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: tether-cluster/1\r\n\r\n",
        )
        .await
        .unwrap();
        let codec = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME_LEN)
            .new_codec();
        Framed::new(tls, codec)
    }
}

async fn send(chan: &mut Chan, msg: ToBroker) {
    chan.send(Bytes::from(serde_json::to_vec(&msg).unwrap()))
        .await
        .unwrap();
}

/// The next frame that is not a ping or a heartbeat batch.
async fn recv(chan: &mut Chan) -> ToControl {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), chan.next())
            .await
            .expect("a frame from the broker")
            .expect("channel open")
            .unwrap();
        let msg: ToControl = tether_proto::cluster::decode(&frame).unwrap();
        if !matches!(msg, ToControl::Ping | ToControl::Heartbeats { .. }) {
            return msg;
        }
    }
}

fn fp(b: u8) -> String {
    format!("{b:02x}").repeat(32)
}

fn write_credential(pki: &Pki, dir: &Path, control_url: &str) {
    let (pem, key) = pki.leaf(
        &format!("spiffe://{TD}/broker/edge-1"),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    DataDir::open(dir)
        .unwrap()
        .save_enrolled(
            &BrokerIdentity {
                name: "edge-1".into(),
                trust_domain: TD.into(),
                control_url: control_url.into(),
            },
            &pki.ca.pem(),
            &pem,
            &key.serialize_pem(),
        )
        .unwrap();
}

fn control_config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        control: tether_broker::config::ControlConfig {
            data_dir: Some(dir.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn broker_syncs_with_control_resumes_after_a_gap_and_restarts_from_its_snapshot() {
    let pki = Pki::new();
    let control = FakeControl::new(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    write_credential(&pki, dir.path(), &control.url());

    let running = tether_broker::Running::bind(control_config(dir.path()))
        .await
        .unwrap();
    let broker = running.broker.clone();
    let quic = broker.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(running.serve(shutdown.clone()));

    // 1. Hello: name, our QUIC address, no allowlist, no sessions.
    let mut chan = control.accept().await;
    match recv(&mut chan).await {
        ToControl::Hello {
            name,
            quic_addr,
            allowlist_version,
            sessions,
            ..
        } => {
            assert_eq!(name, "edge-1");
            assert_eq!(quic_addr, quic.to_string());
            assert_eq!(allowlist_version, 0);
            assert!(sessions.is_empty());
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    let metrics = || broker.metrics().render();
    assert!(metrics().contains("tether_broker_allowlist_stale 1"));

    // 2. A snapshot in two chunks, applied whole at its end.
    send(
        &mut chan,
        ToBroker::SnapshotBegin {
            version: 5,
            entries: 2,
        },
    )
    .await;
    send(
        &mut chan,
        ToBroker::SnapshotChunk {
            entries: vec![("a1".into(), fp(1))],
        },
    )
    .await;
    send(
        &mut chan,
        ToBroker::SnapshotChunk {
            entries: vec![("a2".into(), fp(2))],
        },
    )
    .await;
    send(
        &mut chan,
        ToBroker::SnapshotEnd {
            version: 5,
            digest: String::new(),
        },
    )
    .await;
    assert_eq!(
        recv(&mut chan).await,
        ToControl::Applied {
            version: 5,
            sessions_closed: 0
        }
    );
    assert_eq!(broker.allowlist().snapshot().len(), 2);
    send(
        &mut chan,
        ToBroker::Synced {
            version: 5,
            accepts: vec![],
        },
    )
    .await;
    wait_for("in sync", || {
        metrics().contains("tether_broker_allowlist_stale 0")
    })
    .await;
    assert!(metrics().contains("tether_broker_control_connected 1"));

    // 3. A delta.
    send(
        &mut chan,
        ToBroker::Delta {
            version: 6,
            add: vec![("a3".into(), fp(3))],
            remove: vec![fp(1)],
            digest: String::new(),
        },
    )
    .await;
    assert_eq!(
        recv(&mut chan).await,
        ToControl::Applied {
            version: 6,
            sessions_closed: 0
        }
    );
    let snapshot_path = dir.path().join(datadir::SNAPSHOT_FILE);
    wait_for(
        "snapshot at version 6 on disk",
        || matches!(tether_broker::snapshot::load(&snapshot_path), Ok(Some(s)) if s.version == 6),
    )
    .await;

    // 4. Commands and closes for appliances that are not here.
    send(
        &mut chan,
        ToBroker::Command {
            id: 7,
            appliance: "a2".into(),
            argv: vec!["true".into()],
            kind: CommandKind::Exec,
            env_allowlist: vec![],
            timeout_ms: 1000,
            signed: None,
        },
    )
    .await;
    match recv(&mut chan).await {
        ToControl::CommandFailed { id: 7, code, .. } => {
            assert_eq!(code, CommandFailure::Offline)
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    send(
        &mut chan,
        ToBroker::Command {
            id: 8,
            appliance: "a2".into(),
            // The kind can only be one the protocol names; an empty argv is the malformed
            // command control could still send.
            argv: vec![],
            kind: CommandKind::Shell,
            env_allowlist: vec![],
            timeout_ms: 1000,
            signed: None,
        },
    )
    .await;
    match recv(&mut chan).await {
        ToControl::CommandFailed { id: 8, code, .. } => {
            assert_eq!(code, CommandFailure::Invalid)
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    send(
        &mut chan,
        ToBroker::CloseSession {
            appliance: "a2".into(),
            session_id: 1,
            code: CloseCode::Superseded,
        },
    )
    .await;
    send(
        &mut chan,
        ToBroker::Renewals {
            generations: vec![("a2".into(), 3)],
        },
    )
    .await;
    wait_for("generation recorded", || {
        broker
            .generations()
            .get(&tether_broker::allowlist::ApplianceId::new("a2").unwrap())
            == 3
    })
    .await;

    // 5. A gap in versions drops the channel; the broker comes back at version 6.
    send(
        &mut chan,
        ToBroker::Delta {
            version: 8,
            add: vec![],
            remove: vec![],
            digest: String::new(),
        },
    )
    .await;
    let mut chan = control.accept().await;
    match recv(&mut chan).await {
        ToControl::Hello {
            allowlist_version, ..
        } => assert_eq!(allowlist_version, 6),
        other => panic!("expected Hello, got {other:?}"),
    }
    assert!(
        metrics().contains("tether_broker_control_channel_errors_total{reason=\"version_gap\"} 1"),
        "{}",
        metrics()
    );
    assert!(metrics().contains("tether_broker_allowlist_stale 1"));
    assert_eq!(broker.allowlist().snapshot().version(), 6);

    shutdown.cancel();
    served.await.unwrap().unwrap();
    drop(chan);
    drop(control);

    // 6. A restart with control gone enforces the snapshot from disk, marked stale.
    let running = tether_broker::Running::bind(control_config(dir.path()))
        .await
        .unwrap();
    let snap = running.broker.allowlist().snapshot();
    assert_eq!(snap.version(), 6);
    assert_eq!(snap.len(), 2);
    assert!(running
        .broker
        .metrics()
        .render()
        .contains("tether_broker_allowlist_stale 1"));
}

#[tokio::test]
async fn a_first_start_needs_a_bundle_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = tether_broker::Running::bind(control_config(&dir.path().join("state")))
        .await
        .err()
        .expect("no credential, no bundle");
    assert!(format!("{err:#}").contains("--bundle"), "{err:#}");

    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, b"{\"name\": 1}").unwrap();
    let mut config = control_config(&dir.path().join("state"));
    config.control.bundle = Some(bundle.clone());
    let err = tether_broker::Running::bind(config.clone())
        .await
        .err()
        .expect("garbage bundle");
    let text = format!("{err:#}");
    assert!(
        text.contains("unusable bundle") && text.contains("not a broker bundle"),
        "{text}"
    );

    // A bundle for a control that is not there: the enrollment error names it.
    let pki = Pki::new();
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", unused.local_addr().unwrap());
    drop(unused);
    let json = serde_json::json!({
        "name": "edge-1", "trust_domain": TD, "control_url": url,
        "ca_pem": pki.ca.pem(), "token": "t", "expires_at": u64::MAX,
    });
    std::fs::write(&bundle, serde_json::to_vec(&json).unwrap()).unwrap();
    let err = tether_broker::Running::bind(config)
        .await
        .err()
        .expect("control unreachable");
    let text = format!("{err:#}");
    assert!(
        text.contains("enrollment with") && text.contains("cannot reach control"),
        "{text}"
    );
}
