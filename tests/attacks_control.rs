//! Attacks on the control HTTPS listener and on the agent's credential storage, with the
//! real binaries (see `tests/common/control.rs`):
//!
//! - a certificate that has expired cannot renew, even over a connection (or a resumed TLS
//!   session) opened while it was still valid;
//! - a client that completes the TLS handshake and then sends nothing, dribbles its
//!   headers, dribbles its body, keeps an idle keep-alive connection, or speaks HTTP/2
//!   and goes quiet, is disconnected (no unbounded idle connections on the listener);
//! - the agent's private key is written `0600` even when a stale temporary file with a
//!   wider mode sits where it writes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::control::*;
use serde_json::json;

fn csr(id: &str) -> String {
    tether_agent::enroll::key_and_csr(id).unwrap().1
}

/// A rustls client config presenting the credential in `state`, pinned to control's root
/// (with rustls' default in-memory session cache: it resumes sessions when it can).
fn tls_as(fleet: &Fleet, state: &Path) -> rustls::ClientConfig {
    let root = std::fs::read(&fleet.root).unwrap();
    let chain = std::fs::read(state.join("client.cert.pem")).unwrap();
    let key = std::fs::read(state.join("client.key.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut chain.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key.as_slice())
        .unwrap()
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls
}

/// A reqwest client (connection pool, keep-alive) presenting the credential in `state`.
fn client_as(fleet: &Fleet, state: &Path) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_as(fleet, state))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One HTTP/1.1 request (`Connection: close`) on a new TLS connection made with `cfg`;
/// the whole answer, or the error (e.g. the handshake was refused).
fn one_request(
    fleet: &Fleet,
    cfg: &Arc<rustls::ClientConfig>,
    request: &str,
) -> std::io::Result<String> {
    let conn = rustls::ClientConnection::new(
        cfg.clone(),
        rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(fleet.control.addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(request.as_bytes())?;
    s.flush()?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // The server may close without close_notify.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn not_after(state: &Path) -> i64 {
    tether_agent::Credentials::load(state)
        .unwrap()
        .not_after_ms()
        / 1000
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An expired certificate must not renew: rustls checks validity only at the handshake,
/// so a keep-alive connection (or a resumed TLS 1.3 session) opened while the
/// certificate was valid must not carry a renewal once it has expired.
#[tokio::test]
async fn an_expired_certificate_cannot_renew_over_an_old_connection() {
    let fleet = Fleet::with_config("[certificates]\nappliance = \"4s\"\n");
    let base = fleet.data.parent().unwrap().to_owned();
    let state = base.join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let expiry = not_after(&state);

    // A keep-alive connection, and a TLS session to resume, made while the certificate is
    // valid.
    let kept = client_as(&fleet, &state);
    let r = kept
        .get(format!("{}/healthz", fleet.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let session = Arc::new(tls_as(&fleet, &state));
    let answer = one_request(
        &fleet,
        &session,
        "GET /healthz HTTP/1.1\r\nHost: control\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Wait until it has expired (whole seconds, plus a margin).
    while unix_now() <= expiry + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A new connection offering the session made before expiry: if the server resumed it,
    // rustls would not look at the certificate again.
    let body = json!({"csr_pem": csr("app-1")}).to_string();
    let request = format!(
        "POST /v1/renew HTTP/1.1\r\nHost: control\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    match one_request(&fleet, &session, &request) {
        Err(e) => eprintln!("resumed session: refused at the TLS layer: {e}"),
        Ok(answer) => {
            eprintln!("resumed session: {}", answer.lines().next().unwrap_or(""));
            assert!(
                answer.starts_with("HTTP/1.1 403") && answer.contains("certificate_expired"),
                "an expired certificate renewed over a resumed TLS session: {answer}"
            );
        }
    }

    for (what, c) in [
        ("kept-alive connection", &kept),
        ("new connection", &client_as(&fleet, &state)),
    ] {
        match c
            .post(format!("{}/v1/renew", fleet.url()))
            .json(&json!({"csr_pem": csr("app-1")}))
            .send()
            .await
        {
            // Refused at the TLS layer: fine.
            Err(e) => eprintln!("{what}: refused at the TLS layer: {e}"),
            Ok(r) => {
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap_or(json!(null));
                eprintln!("{what}: {status} {}", v["error"]);
                assert_eq!(
                    (status, v["error"].as_str()),
                    (403, Some("certificate_expired")),
                    "an expired certificate renewed over a {what}: {v}"
                );
            }
        }
    }
}

/// A TLS client to control over a blocking socket, with a read timeout.
fn tls_to(fleet: &Fleet) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let root = std::fs::read(&fleet.root).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(fleet.control.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Finish the handshake.
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

/// Whether the server closed `s` within `limit`, writing `drip` every `every` meanwhile
/// (an empty drip writes nothing). Returns the time it took.
fn closed_within(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    limit: Duration,
    drip: &[u8],
    every: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut last_drip = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        if !drip.is_empty() && last_drip.elapsed() >= every {
            last_drip = Instant::now();
            if s.write_all(drip).and_then(|_| s.flush()).is_err() {
                return Some(start.elapsed());
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {} // e.g. a 408 answer before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// Slowloris on the HTTPS listener: after the handshake, a client that sends nothing,
/// dribbles its header, dribbles its body, or idles on a keep-alive connection is cut off
/// in bounded time instead of holding a task and a file descriptor forever.
#[test]
fn idle_and_slow_connections_are_cut_off() {
    // Short limits so the test takes seconds; the defaults are 10 s and 60 s.
    let fleet =
        Fleet::with_config("[http]\nheader_read_timeout = \"2s\"\nrequest_timeout = \"4s\"\n");
    let limit = Duration::from_secs(30);
    let every = Duration::from_millis(500);

    // Four clients at once, so the test takes as long as the slowest.
    let mut silent = tls_to(&fleet);
    let mut header = tls_to(&fleet);
    header
        .write_all(b"POST /v1/enroll HTTP/1.1\r\nHost: control\r\n")
        .unwrap();
    let mut body = tls_to(&fleet);
    body.write_all(
        b"POST /v1/enroll HTTP/1.1\r\nHost: control\r\nContent-Type: application/json\r\n\
          Content-Length: 60000\r\n\r\n{",
    )
    .unwrap();
    let mut idle = tls_to(&fleet);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: control\r\n\r\n")
        .unwrap();
    // HTTP/2 by prior knowledge (ALPN said http/1.1), then silence.
    let mut h2 = tls_to(&fleet);
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();

    let results = std::thread::scope(|scope| {
        let a = scope.spawn(|| closed_within(&mut silent, limit, b"", every));
        let b = scope.spawn(|| closed_within(&mut header, limit, b"X", every));
        let c = scope.spawn(|| closed_within(&mut body, limit, b" ", every));
        let d = scope.spawn(|| closed_within(&mut idle, limit, b"", every));
        let e = scope.spawn(|| closed_within(&mut h2, limit, b"", every));
        [a, b, c, d, e].map(|h| h.join().unwrap())
    });
    for (what, r) in [
        "silent",
        "slow header",
        "slow body",
        "idle keep-alive",
        "silent HTTP/2",
    ]
    .iter()
    .zip(results)
    {
        assert!(
            r.is_some(),
            "a {what} connection was still open after {limit:?}"
        );
        eprintln!("{what} connection closed after {:?}", r.unwrap());
    }
    // Control still answers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (s, _) = fleet.post("/v1/enroll/challenge", json!({})).await;
        assert_eq!(s, 200);
    });
}

/// The key is written through a temporary sibling; a stale one left with a wide mode (a
/// crash, an old tool, a careless copy) must not make the key world-readable.
#[test]
fn the_agent_key_stays_private_over_a_stale_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("previous")).unwrap();
    for tmp in [
        state.join("client.key.tmp"),
        state.join("previous").join("client.key.tmp"),
    ] {
        std::fs::write(&tmp, "stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (key, _) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    let st = tether_agent::enroll::EnrollState {
        appliance_id: "app-1".into(),
        control_url: "https://control.invalid".into(),
        brokers: vec![],
        fingerprint: "00".into(),
        not_after: 0,
        proof: None,
        manual_renewal_generation: 0,
    };
    // Twice: the second write moves the first key to previous/.
    for _ in 0..2 {
        tether_agent::enroll::store_credential(&state, &key, "cert", "ca", &st).unwrap();
    }
    for path in [
        state.join("client.key.pem"),
        state.join("previous").join("client.key.pem"),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
    }
}

/// TLS session resumption skips the client certificate's checks: a session made while an
/// operator certificate was valid must not let it in once expired.
#[test]
fn an_expired_operator_certificate_cannot_resume_its_session() {
    let fleet = Fleet::new();
    let ops = fleet.data.parent().unwrap().join("operator");
    std::fs::create_dir_all(&ops).unwrap();
    let ca = tether_control::domain::ca::Ca::load(
        &fleet.data,
        &tether_control::domain::ca::CaConfig {
            trust_domain: common::TRUST_DOMAIN.into(),
            operator_validity: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .unwrap();
    let (key, op_csr) = tether_agent::enroll::key_and_csr("alice").unwrap();
    let op = ca
        .issue_operator("alice", &op_csr, time::OffsetDateTime::now_utc())
        .unwrap();
    std::fs::write(ops.join("client.cert.pem"), &op.chain_pem).unwrap();
    std::fs::write(ops.join("client.key.pem"), key).unwrap();
    fleet.honour_operator("alice", tether_api::operators::Role::Viewer, &op);

    let session = Arc::new(tls_as(&fleet, &ops));
    let get = "GET /v1/fleet/trust HTTP/1.1\r\nHost: control\r\nConnection: close\r\n\r\n";
    let answer = one_request(&fleet, &session, get).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    while unix_now() <= op.not_after + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    match one_request(&fleet, &session, get) {
        Err(e) => eprintln!("refused at the TLS layer: {e}"),
        Ok(answer) => panic!("an expired operator certificate got in again: {answer}"),
    }
}
