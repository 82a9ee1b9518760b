//! Attacks on the cluster's trust rules, against the real `tether-control` and
//! `tether-broker` on 127.0.0.1:
//!
//! - only a broker's own, current certificate opens the cluster channel (no client
//!   certificate, an operator's, an appliance's: refused; no `Upgrade`: 426);
//! - a broker speaks only as itself: a `Hello` naming another broker ends the channel;
//! - a broker bundle enrolls once, only the broker it names, and a garbage CSR is refused;
//! - only the current broker certificate renews; a revoked broker is cut off (channel
//!   closed, reconnects and renewal refused);
//! - a viewer can neither run commands nor add brokers; an offline appliance gives a
//!   definite `offline`, not a hang.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::*;
use common::operators::{call, client_from};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS client presenting the broker credential stored in a broker data directory.
fn broker_client(c: &Cluster, dir: &Path) -> reqwest::Client {
    let root = std::fs::read(&c.fleet.root).unwrap();
    let cert = std::fs::read(dir.join("broker.pem")).unwrap();
    let key = std::fs::read(dir.join("broker.key")).unwrap();
    tether_agent::enroll::http_client_with(&root, Some((&cert, &key))).unwrap()
}

fn broker_dir(c: &Cluster, name: &str) -> std::path::PathBuf {
    c.broker_dirs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
        .clone()
}

/// `POST /v1/brokers` as the admin: a bundle for `name`.
async fn bundle(c: &Cluster, name: &str) -> Value {
    let admin = client_from(&c.fleet, Some(&c.ops), false);
    let (status, b) = call(
        &admin,
        &c.fleet,
        "POST",
        "/v1/brokers",
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_current_broker_certificate_opens_the_channel() {
    let mut c = Cluster::new("");
    let _b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let path = tether_proto::cluster::CHANNEL_PATH;
    let upgrade = |client: reqwest::Client, url: String| async move {
        let resp = client
            .get(url)
            .header("connection", "upgrade")
            .header("upgrade", tether_proto::cluster::UPGRADE)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    };
    let url = format!("{}{path}", c.fleet.url());
    // No certificate.
    let (status, body) = upgrade(client_from(&c.fleet, None, false), url.clone()).await;
    assert_eq!(status, 401, "{body}");
    // An operator's certificate.
    let (status, body) = upgrade(client_from(&c.fleet, Some(&c.ops), false), url.clone()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("broker_required")),
        "{body}"
    );
    // An appliance's certificate.
    let state = c.enroll("app-1");
    let (status, body) = upgrade(client_from(&c.fleet, Some(&state), true), url.clone()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("broker_required")),
        "{body}"
    );
    // The broker's own certificate, without asking for the upgrade.
    let dir = broker_dir(&c, "edge-1");
    let resp = broker_client(&c, &dir).get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 426);
    let refused =
        |reason: &str| format!("tether_control_channel_errors_total{{reason=\"{reason}\"}}");
    assert!(c.fleet.metric(&refused("broker_required")).await >= 2.0);
}

/// Open the channel with `dir`'s broker credential over raw TLS and send `hello`;
/// returns what came back before the connection ended (bytes after the 101 head).
async fn raw_channel(
    c: &Cluster,
    dir: &Path,
    hello: &tether_proto::cluster::ToControl,
) -> (String, Vec<u8>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(&c.fleet.root).unwrap().as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> =
        rustls_pemfile::certs(&mut std::fs::read(dir.join("broker.pem")).unwrap().as_slice())
            .map(|c| c.unwrap())
            .collect();
    let key =
        rustls_pemfile::private_key(&mut std::fs::read(dir.join("broker.key")).unwrap().as_slice())
            .unwrap()
            .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(c.fleet.control.addr)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: {}\r\n\r\n",
        tether_proto::cluster::CHANNEL_PATH,
        tether_proto::cluster::UPGRADE
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tls.read(&mut byte).await.unwrap(),
            1,
            "answer head cut short"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    tls.write_all(&tether_proto::cluster::encode(hello).unwrap())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    (head, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_speaks_only_as_itself() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let _b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    drop(b1);
    let dir = broker_dir(&c, "edge-1");
    let hello = tether_proto::cluster::ToControl::Hello {
        name: "edge-2".into(),
        version: "0".into(),
        quic_addr: "127.0.0.1:9".into(),
        allowlist_version: 0,
        allowlist_digest: String::new(),
        sessions: vec![],
        features: vec![],
    };
    let (head, rest) = raw_channel(&c, &dir, &hello).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        rest.is_empty(),
        "control answered a forged Hello: {} bytes",
        rest.len()
    );
    let bad = c
        .fleet
        .metric(r#"tether_control_channel_errors_total{reason="bad_hello"}"#)
        .await;
    assert!(bad >= 1.0);
    // edge-2's record keeps its own address.
    let out = c.tether(&["broker", "list", "--output", "json"]).unwrap();
    let list: Value = serde_json::from_str(&out).unwrap();
    let edge2 = list["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "edge-2")
        .unwrap()
        .clone();
    assert_ne!(edge2["quic_addr"], "127.0.0.1:9", "{edge2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_bundle_enrolls_once_and_only_its_broker() {
    let c = Cluster::new("");
    let b = bundle(&c, "edge-9").await;
    let token = b["token"].as_str().unwrap();
    let anon = client_from(&c.fleet, None, false);
    let (_, csr) = tether_agent::enroll::key_and_csr("edge-9").unwrap();
    let enroll =
        |name: &str, token: &str, csr: &str| json!({"name": name, "token": token, "csr_pem": csr});
    // Another broker's name with this token.
    let (status, body) = call(
        &anon,
        &c.fleet,
        "POST",
        "/v1/brokers/enroll",
        Some(enroll("edge-1", token, &csr)),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("token_unknown")),
        "{body}"
    );
    // A forged token.
    let (status, body) = call(
        &anon,
        &c.fleet,
        "POST",
        "/v1/brokers/enroll",
        Some(enroll("edge-9", "tt_forged", &csr)),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("token_unknown")),
        "{body}"
    );
    // Garbage instead of a CSR.
    let (status, body) = call(
        &anon,
        &c.fleet,
        "POST",
        "/v1/brokers/enroll",
        Some(enroll(
            "edge-9",
            token,
            "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n",
        )),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // The real thing, once.
    let (status, body) = call(
        &anon,
        &c.fleet,
        "POST",
        "/v1/brokers/enroll",
        Some(enroll("edge-9", token, &csr)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let chain = body["chain_pem"].as_str().unwrap();
    let der = rustls_pemfile::certs(&mut chain.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(
        sans.contains("spiffe://tether.test/broker/edge-9"),
        "{sans}"
    );
    let (status, body) = call(
        &anon,
        &c.fleet,
        "POST",
        "/v1/brokers/enroll",
        Some(enroll("edge-9", token, &csr)),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("token_used")),
        "{body}"
    );
    // An active broker's name cannot be given a new bundle.
    let admin = client_from(&c.fleet, Some(&c.ops), false);
    let (status, body) = call(
        &admin,
        &c.fleet,
        "POST",
        "/v1/brokers",
        Some(json!({"name": "edge-9"})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_current_certificate_renews_and_a_revoked_broker_is_cut_off() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    drop(b1);
    let dir = broker_dir(&c, "edge-1");
    let old = broker_client(&c, &dir);
    let (_, csr) = tether_agent::enroll::key_and_csr("edge-1").unwrap();
    let (status, body) = call(
        &old,
        &c.fleet,
        "POST",
        "/v1/brokers/renew",
        Some(json!({"csr_pem": csr})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The replaced certificate cannot renew again (a stolen copy cannot keep renewing).
    let (status, body) = call(
        &old,
        &c.fleet,
        "POST",
        "/v1/brokers/renew",
        Some(json!({"csr_pem": csr})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_not_current")),
        "{body}"
    );
    // An appliance certificate cannot renew as a broker.
    let state = c.enroll("app-1");
    let app = client_from(&c.fleet, Some(&state), true);
    let (status, body) = call(
        &app,
        &c.fleet,
        "POST",
        "/v1/brokers/renew",
        Some(json!({"csr_pem": csr})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("broker_required")),
        "{body}"
    );

    // A running broker, revoked: its channel is closed and stays closed.
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(1).await;
    c.tether(&["broker", "revoke", "edge-2"])
        .expect("revoke edge-2");
    b2.wait_metric(
        "tether_broker_control_channel_errors_total{reason=\"refused\"}",
        1.0,
    )
    .await;
    assert_eq!(b2.metric("tether_broker_control_connected").await, 0.0);
    let dir2 = broker_dir(&c, "edge-2");
    let (status, body) = call(
        &broker_client(&c, &dir2),
        &c.fleet,
        "POST",
        "/v1/brokers/renew",
        Some(json!({"csr_pem": csr})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("broker_unknown")),
        "{body}"
    );
    let out = c.tether(&["broker", "list", "--output", "json"]).unwrap();
    let list: Value = serde_json::from_str(&out).unwrap();
    let edge2 = list["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "edge-2")
        .unwrap()
        .clone();
    assert_eq!(
        (edge2["status"].as_str(), edge2["connected"].as_bool()),
        (Some("revoked"), Some(false)),
        "{edge2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_cannot_run_commands_or_add_brokers_and_offline_is_definite() {
    let c = Cluster::new("");
    let invite = c.fleet.data.parent().unwrap().join("viewer.json");
    c.tether(&[
        "operator",
        "invite",
        "vera",
        "--role",
        "viewer",
        "--out",
        invite.to_str().unwrap(),
    ])
    .expect("invite a viewer");
    let vera = c.fleet.data.parent().unwrap().join("config-vera");
    common::operators::tether(
        &vera,
        &[
            "login",
            "--bundle",
            invite.to_str().unwrap(),
            "--control",
            &c.fleet.url(),
        ],
    )
    .expect("the viewer logs in");
    let viewer = client_from(&c.fleet, Some(&vera), false);
    let (status, body) = call(
        &viewer,
        &c.fleet,
        "POST",
        "/v1/appliances/app-1/exec",
        Some(json!({"argv": ["id"]})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("role_forbidden")),
        "{body}"
    );
    let (status, body) = call(
        &viewer,
        &c.fleet,
        "POST",
        "/v1/brokers",
        Some(json!({"name": "sneaky"})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("role_forbidden")),
        "{body}"
    );
    // The admin's command to an appliance no broker holds: offline, at once.
    let (code, _, err) = c.exec(&["app-1", "--", "true"]);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("offline"), "{err}");
    // Both refusals and the offline attempt are in the audit log.
    let entries = common::operators::audit_entries(&c.fleet);
    let execs: Vec<_> = entries
        .iter()
        .filter(|e| e["action"] == "appliance.exec")
        .collect();
    assert!(execs.len() >= 2, "{execs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_history_diverged_is_sent_a_snapshot() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let _state = c.enroll("app-1");
    drop(b1);
    let store = tether_control::store::sql::SqlStore::connect(
        &tether_control::store::sql::SqlStore::sqlite_url(&c.fleet.data.join("control.db")),
    )
    .await
    .unwrap();
    let version = {
        use tether_control::store::Store;
        store.allowlist_version().await.unwrap()
    };
    assert!(version >= 1);
    store.close().await;
    // The same version number as the store's, another history (an asynchronous failover
    // or a restore reissued it): control must not trust the number.
    let hello = tether_proto::cluster::ToControl::Hello {
        name: "edge-1".into(),
        version: "0".into(),
        quic_addr: "127.0.0.1:9".into(),
        allowlist_version: version as u64,
        allowlist_digest: "ab".repeat(32),
        sessions: vec![],
        features: vec![],
    };
    let dir = broker_dir(&c, "edge-1");
    let (head, rest) = raw_channel(&c, &dir, &hello).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains(r#""type":"snapshot_begin""#) && text.contains(r#""type":"snapshot_end""#),
        "control sent no snapshot: {text}"
    );
    let diverged = c
        .fleet
        .metric("tether_control_allowlist_diverged_total")
        .await;
    assert!(diverged >= 1.0, "diverged counter: {diverged}");
    assert!(c.fleet.control.log_contains("allowlist history diverged"));
}
