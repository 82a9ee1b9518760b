//! The agent's egress proxy against a real tinyproxy with Basic auth on 127.0.0.1:
//! `TETHER_TEST_PROXY_URL` (`http://user:password@127.0.0.1:PORT`) and
//! `TETHER_TEST_PROXY_LOG` (its log file, where each CONNECT is recorded), both exported
//! by `scripts/test`; by hand: `. scripts/proxy`. Without them every test says SKIPPED.
//!
//! Each check that a connection went through the proxy reads the proxy's log for the
//! CONNECT line of a destination port used by that test only, so a bypass would fail it.

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::Ca;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tether_agent::proxy::{NoProxy, ProxyConfig, ProxyError, ProxyUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const URL_VAR: &str = "TETHER_TEST_PROXY_URL";
const LOG_VAR: &str = "TETHER_TEST_PROXY_LOG";
const TIMEOUT: Duration = Duration::from_secs(10);

/// The running tinyproxy, or `None` (and a SKIPPED line) when not configured.
struct Tinyproxy {
    url: String,
    log: PathBuf,
}

impl Tinyproxy {
    fn from_env() -> Option<Tinyproxy> {
        let Ok(url) = std::env::var(URL_VAR) else {
            eprintln!("SKIPPED: set {URL_VAR} (scripts/proxy)");
            return None;
        };
        let log = std::env::var(LOG_VAR).unwrap_or_else(|_| {
            panic!("{URL_VAR} is set but {LOG_VAR} is not: export {LOG_VAR}=\"$(scripts/proxy log)\" (or `. scripts/proxy`)")
        });
        Some(Tinyproxy {
            url,
            log: log.into(),
        })
    }

    /// The proxy for every destination (no `NO_PROXY`, whatever the environment says).
    fn config(&self) -> ProxyConfig {
        ProxyConfig::from_lookup(Some(&self.url), |_| None).unwrap()
    }

    /// The same proxy URL with `password` instead of the right one.
    fn url_with_password(&self, password: Option<&str>) -> String {
        let mut u = reqwest::Url::parse(&self.url).unwrap();
        match password {
            Some(p) => u.set_password(Some(p)).unwrap(),
            None => {
                u.set_username("").unwrap();
                u.set_password(None).unwrap();
            }
        }
        u.to_string()
    }

    fn password(&self) -> String {
        reqwest::Url::parse(&self.url)
            .unwrap()
            .password()
            .unwrap()
            .to_owned()
    }

    /// Where the log ends now: only what is logged after counts.
    fn log_mark(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the proxy logged `CONNECT 127.0.0.1:port` since `mark`.
    fn logged_connect_since(&self, mark: u64, port: u16) -> bool {
        let log = std::fs::read(&self.log)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.log.display()));
        let new = String::from_utf8_lossy(&log[(mark as usize).min(log.len())..]).into_owned();
        new.contains(&format!("CONNECT 127.0.0.1:{port} "))
    }
}

/// A TCP echo server on 127.0.0.1:0; each accepted peer's address goes to the channel.
async fn echo_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = listener.accept().await else {
                return;
            };
            let _ = tx.send(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, rx)
}

fn proxy_error(e: &io::Error) -> Option<&ProxyError> {
    e.get_ref().and_then(|e| e.downcast_ref::<ProxyError>())
}

#[tokio::test]
async fn connect_tunnels_through_tinyproxy_to_an_echo_server() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let (addr, mut peers) = echo_server().await;
    let mark = proxy.log_mark();
    let mut s = proxy
        .config()
        .connect("127.0.0.1", addr.port(), TIMEOUT)
        .await
        .expect("tunnel through tinyproxy");
    // Bytes both ways, more than one segment's worth.
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let (got, ()) = tokio::join!(
        async {
            let mut got = vec![0u8; sent.len()];
            r.read_exact(&mut got).await.unwrap();
            got
        },
        async { w.write_all(&sent).await.unwrap() }
    );
    assert_eq!(got, sent);
    // The echo server's peer is the proxy, not us.
    let peer = peers.recv().await.unwrap();
    assert_ne!(peer, s.local_addr().unwrap());
    assert!(proxy.logged_connect_since(mark, addr.port()));
}

#[tokio::test]
async fn no_proxy_connects_directly() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let (addr, mut peers) = echo_server().await;
    let cfg = ProxyConfig::new(
        proxy.config().proxy().cloned(),
        NoProxy::parse(&format!("127.0.0.1:{}", addr.port()), "NO_PROXY").unwrap(),
    );
    let mark = proxy.log_mark();
    let s = cfg
        .connect("127.0.0.1", addr.port(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(peers.recv().await.unwrap(), s.local_addr().unwrap());
    assert!(!proxy.logged_connect_since(mark, addr.port()));
}

#[tokio::test]
async fn a_wrong_password_is_a_407_that_never_shows_a_password() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let (addr, _peers) = echo_server().await;
    const WRONG: &str = "Wr0ng-Passw0rd-4242";
    let cfg =
        ProxyConfig::from_lookup(Some(&proxy.url_with_password(Some(WRONG))), |_| None).unwrap();
    let err = cfg
        .connect("127.0.0.1", addr.port(), TIMEOUT)
        .await
        .expect_err("tinyproxy refuses a wrong password");
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(
        matches!(
            proxy_error(&err),
            Some(ProxyError::AuthRequired {
                sent_credentials: true,
                ..
            })
        ),
        "{err:?}"
    );
    let text = format!("{err} {err:?} {cfg} {cfg:?}");
    assert!(text.contains("proxy authentication required"), "{text}");
    assert!(!text.contains(WRONG), "{text}");
    assert!(!text.contains(&proxy.password()), "{text}");

    // No credentials at all: the error says so.
    let cfg = ProxyConfig::from_lookup(Some(&proxy.url_with_password(None)), |_| None).unwrap();
    let err = cfg
        .connect("127.0.0.1", addr.port(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            proxy_error(&err),
            Some(ProxyError::AuthRequired {
                sent_credentials: false,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("no credentials configured"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_destination_is_a_refusal_with_the_status() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    // A port nobody listens on: bind, read the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = proxy
        .config()
        .connect("127.0.0.1", port, TIMEOUT)
        .await
        .unwrap_err();
    match proxy_error(&err) {
        Some(ProxyError::Refused { status, target, .. }) => {
            assert!(*status >= 500, "{err}");
            assert_eq!(target, &format!("127.0.0.1:{port}"));
        }
        other => panic!("{other:?}: {err}"),
    }
    assert!(!err.to_string().contains(&proxy.password()), "{err}");
}

/// A one-route HTTPS server on 127.0.0.1:0 with a certificate for 127.0.0.1 issued by a
/// fresh CA; returns its port and the CA's PEM. Every request gets `200 ok`.
async fn https_server() -> (u16, String) {
    let ca = Ca::new("proxy test CA");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, ca.pem())
}

#[tokio::test]
async fn the_enrollment_client_goes_through_the_proxy() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let (port, ca_pem) = https_server().await;
    let url = format!("https://127.0.0.1:{port}/v1/enroll/challenge");

    let mark = proxy.log_mark();
    let client =
        tether_agent::enroll::http_client_with_proxy(ca_pem.as_bytes(), None, &proxy.config())
            .unwrap();
    let resp = client
        .get(&url)
        .send()
        .await
        .expect("request through the proxy");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    assert!(
        proxy.logged_connect_since(mark, port),
        "no CONNECT 127.0.0.1:{port} in {}",
        proxy.log.display()
    );

    // NO_PROXY naming the server: straight there, the proxy never hears of it.
    let direct = ProxyConfig::new(
        proxy.config().proxy().cloned(),
        NoProxy::parse("127.0.0.0/8", "NO_PROXY").unwrap(),
    );
    let mark = proxy.log_mark();
    let client =
        tether_agent::enroll::http_client_with_proxy(ca_pem.as_bytes(), None, &direct).unwrap();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert!(!proxy.logged_connect_since(mark, port));

    // A wrong password: the request fails, and its error does not show the password.
    const WRONG: &str = "Wr0ng-Passw0rd-4343";
    let bad =
        ProxyConfig::from_lookup(Some(&proxy.url_with_password(Some(WRONG))), |_| None).unwrap();
    let client =
        tether_agent::enroll::http_client_with_proxy(ca_pem.as_bytes(), None, &bad).unwrap();
    let err = client.get(&url).send().await.unwrap_err();
    let mut text = format!("{err} {err:?}");
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" {s}"));
        source = s.source();
    }
    assert!(!text.contains(WRONG), "{text}");
    assert!(!text.contains(&proxy.password()), "{text}");
}

#[test]
fn the_test_proxy_url_parses() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let p = ProxyUrl::parse(&proxy.url, "TETHER_TEST_PROXY_URL").unwrap();
    assert!(p.has_credentials());
    assert!(!p.to_string().contains(&proxy.password()));
}

#[tokio::test]
async fn enroll_reaches_control_through_the_proxy_and_explains_a_refused_tunnel() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let (port, ca_pem) = https_server().await;
    let state = tempfile::tempdir().unwrap();
    let opts = |proxy: ProxyConfig| tether_agent::enroll::EnrollOptions {
        control_url: format!("https://127.0.0.1:{port}"),
        ca_pem: ca_pem.clone().into_bytes(),
        appliance_id: "appliance-1".into(),
        proof: tether_agent::proof::EnrollProof::Token("token".into()),
        state_dir: state.path().to_owned(),
        proxy,
    };

    // Our server is no control: it answers "ok" to the challenge request, which is not
    // JSON. Getting that far proves the request went through (the log says so too).
    let mark = proxy.log_mark();
    let err = tether_agent::enroll::enroll(&opts(proxy.config()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad answer"), "{err}");
    assert!(proxy.logged_connect_since(mark, port));

    // Refused credentials: the error says the proxy wants authentication, and shows no
    // password.
    const WRONG: &str = "Wr0ng-Passw0rd-4444";
    let bad =
        ProxyConfig::from_lookup(Some(&proxy.url_with_password(Some(WRONG))), |_| None).unwrap();
    let err = tether_agent::enroll::enroll(&opts(bad)).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("proxy authentication required"), "{text}");
    assert!(!text.contains(WRONG), "{text}");
    assert!(!text.contains(&proxy.password()), "{text}");
}

/// `tether-agent enroll` against the local HTTPS server; returns (success, stderr).
fn agent_enroll(port: u16, ca_pem: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"));
    cmd.args(["enroll", "--control"])
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--ca")
        .arg(&ca)
        .args(["--id", "appliance-1", "--token", "t", "--state-dir"])
        .arg(dir.path().join("state"))
        .args(args);
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "TETHER_AGENT_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_takes_the_proxy_from_the_flag_or_https_proxy() {
    let Some(proxy) = Tinyproxy::from_env() else {
        return;
    };
    let (port, ca_pem) = https_server().await;
    // The request reaches our (non-control) server through the proxy: "bad answer".
    for (args, env) in [
        (vec!["--proxy", proxy.url.as_str()], vec![]),
        (vec![], vec![("HTTPS_PROXY", proxy.url.as_str())]),
        (
            vec!["--proxy", proxy.url.as_str()],
            vec![("HTTPS_PROXY", "http://127.0.0.1:1")],
        ),
    ] {
        let mark = proxy.log_mark();
        let (ok, stderr) = tokio::task::block_in_place(|| agent_enroll(port, &ca_pem, &args, &env));
        assert!(!ok);
        assert!(stderr.contains("bad answer"), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains("reaching control through proxy http://tether:***@"),
            "{stderr}"
        );
        assert!(!stderr.contains(&proxy.password()), "{stderr}");
        assert!(proxy.logged_connect_since(mark, port), "{args:?} {env:?}");
    }
    // NO_PROXY wins over both: straight to the server.
    let mark = proxy.log_mark();
    let (_, stderr) = tokio::task::block_in_place(|| {
        agent_enroll(
            port,
            &ca_pem,
            &["--proxy", &proxy.url],
            &[("NO_PROXY", "127.0.0.1")],
        )
    });
    assert!(stderr.contains("bad answer"), "{stderr}");
    assert!(!proxy.logged_connect_since(mark, port));
}

#[test]
fn the_agent_binary_refuses_a_bad_proxy_without_showing_its_password() {
    const SECRET: &str = "Sup3r-s3cret-pw";
    for (args, env, expect) in [
        (
            vec!["--proxy".to_owned(), format!("socks5://u:{SECRET}@p:1080")],
            vec![],
            "unsupported proxy scheme \"socks5\" in --proxy",
        ),
        (
            vec![],
            vec![("HTTPS_PROXY", format!("https://u:{SECRET}@p:1"))],
            "unsupported proxy scheme \"https\" in HTTPS_PROXY",
        ),
        (
            vec![],
            vec![
                ("HTTPS_PROXY", format!("http://u:{SECRET}@p:1")),
                ("NO_PROXY", "10.0.0.0/99".to_owned()),
            ],
            "invalid NO_PROXY entry \"10.0.0.0/99\"",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, stderr) = agent_enroll(1, "unused", &args, &env);
        assert!(!ok);
        assert!(stderr.contains(expect), "{stderr}");
        assert!(!stderr.contains(SECRET), "{stderr}");
    }
}

#[test]
fn the_agent_run_command_refuses_a_bad_proxy_at_start() {
    const SECRET: &str = "Sup3r-s3cret-pw";
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["run", "--broker", "127.0.0.1:1", "--state-dir"])
        .arg(dir.path())
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env("TETHER_AGENT_PROXY", format!("ftp://u:{SECRET}@p:21"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unsupported proxy scheme \"ftp\" in --proxy"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET), "{stderr}");
}
