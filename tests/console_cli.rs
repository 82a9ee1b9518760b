//! The web console with the real binaries: `tether-control serve` with `[console] listen`
//! opens its own listener (server-only TLS, ALPN h2), `tether console --print-url` gets a
//! single-use link from it with the operator credential, and the link signs a client in
//! over that listener exactly once. (The browser tests drive the pages themselves.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::control::*;
use common::operators::*;

/// The console's address, from control's log.
fn console_addr(fleet: &Fleet) -> std::net::SocketAddr {
    for _ in 0..100 {
        let logs = fleet.control.logs.lock().unwrap().clone();
        for line in logs {
            if line.contains("console listening") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                return v["fields"]["listen"].as_str().unwrap().parse().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("control did not log the console's address");
}

#[tokio::test]
async fn tether_console_prints_a_single_use_link_that_signs_in_over_the_consoles_listener() {
    let fleet = Fleet::with_config("[console]\nlisten = \"127.0.0.1:0\"\n");
    let addr = console_addr(&fleet);
    let config = config_dir(&fleet, "admin");
    let bundle = fleet.data.join("admin-bundle.json");
    tether(
        &config,
        &[
            "login",
            "--bundle",
            bundle.to_str().unwrap(),
            "--control",
            &fleet.url(),
        ],
    )
    .expect("admin logs in");
    let url = tether(&config, &["console", "--print-url"]).expect("a link");
    let url = url.trim();
    let origin = format!("https://{addr}");
    let rest = url
        .strip_prefix(&format!("{origin}/console/login/"))
        .unwrap_or_else(|| panic!("{url} is on the console's origin {origin}"));
    let (id, secret) = rest.split_once('#').expect("the secret is in the fragment");

    // Server-only TLS with h2 offered.
    let root = std::fs::read(&fleet.root).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &root[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .expect("a TLS handshake without a client certificate");
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(conn);

    let client = tether_agent::enroll::http_client_with(&root, None).unwrap();
    let page = client
        .get(format!("{origin}/console/login/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(
        page.headers()["content-security-policy"],
        tether_control::console::CSP
    );
    let exchange = || {
        client
            .post(format!("{origin}/console/login/{id}"))
            .header("origin", &origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("secret={secret}"))
            .send()
    };
    let first = exchange().await.unwrap();
    assert_eq!(first.status(), 303);
    let cookie = first.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-tether_console="), "{cookie}");
    assert!(cookie.contains("; Secure; HttpOnly; SameSite=Strict; Path=/"));
    let second = exchange().await.unwrap();
    assert_eq!(second.status(), 403, "a link works once");
    let session = cookie.split(';').next().unwrap();
    let fleet_page = client
        .get(format!("{origin}/console/"))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(fleet_page.status(), 200);
    let html = fleet_page.text().await.unwrap();
    assert!(html.contains("data-appliance-id=\"app-1\""));
    assert!(html.contains("admin (admin)"));
}
