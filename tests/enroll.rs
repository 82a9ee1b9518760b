//! Enrollment end to end with the real binaries: `tether-control init / appliance register
//! / token create / serve`, then `tether-agent enroll` with a one-time token, then the
//! enrolled credential connects to a real broker that pins the recorded fingerprint. And
//! the attacks on enrollment, each refused with its own code.

mod common;

use std::time::Duration;

use common::control::*;
use common::*;
use serde_json::json;

#[tokio::test]
async fn token_enrollment_then_the_credential_connects_to_a_pinned_broker() {
    let fleet = Fleet::new();
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    let token = fleet.token("app-1");
    let out = fleet.enroll("app-1", &token, &state).expect("enrolled");
    assert!(out.contains("enrolled app-1"), "{out}");

    // The credential is complete, the key private, the chain valid for the appliance.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("client.key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let creds = tether_agent::Credentials::load(&state).unwrap();
    assert_eq!(creds.appliance_id(), "app-1");
    assert_eq!(creds.trust_domain(), TRUST_DOMAIN);
    let shown = control(&[
        "appliance",
        "show",
        "--data-dir",
        fleet.data.to_str().unwrap(),
        "app-1",
    ]);
    assert!(
        shown.contains(creds.fingerprint()),
        "control recorded the fingerprint: {shown}"
    );

    // The same token cannot be used twice.
    let err = fleet.enroll("app-1", &token, &state).unwrap_err();
    assert!(err.contains("token_used"), "{err}");
    // A token for app-2 does not enroll app-1.
    let t2 = fleet.token("app-2");
    let err = fleet
        .enroll("app-1", &t2, &fleet.data.parent().unwrap().join("x"))
        .unwrap_err();
    assert!(err.contains("token_wrong_appliance"), "{err}");

    // A broker whose CA bundle is control's and whose allowlist holds the recorded
    // fingerprint admits the enrolled appliance.
    let setup_dir = fleet.data.parent().unwrap().join("broker");
    std::fs::create_dir_all(&setup_dir).unwrap();
    let ca = tether_control::domain::ca::Ca::load(
        &fleet.data,
        &tether_control::domain::ca::CaConfig {
            trust_domain: TRUST_DOMAIN.into(),
            ..Default::default()
        },
    )
    .unwrap();
    let (key_pem, csr) = tether_agent::enroll::key_and_csr("b1").unwrap();
    let broker_cert = ca
        .issue_broker(
            "b1",
            &csr,
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    std::fs::write(setup_dir.join("ca.pem"), ca.bundle_pem()).unwrap();
    std::fs::write(setup_dir.join("broker.pem"), &broker_cert.chain_pem).unwrap();
    std::fs::write(setup_dir.join("broker.key"), key_pem).unwrap();
    std::fs::write(
        setup_dir.join("allowlist.txt"),
        format!("app-1 {}\n", creds.fingerprint()),
    )
    .unwrap();
    std::fs::write(
        setup_dir.join("broker.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n[allowlist]\nfile = \"allowlist.txt\"\n"
        ),
    )
    .unwrap();
    let broker = BrokerProc::start(&setup_dir.join("broker.toml"));
    let _agent = AgentProc::start(&state, &[broker.quic], &[]);
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["fingerprint"], creds.fingerprint());
}

#[tokio::test]
async fn enrollment_attacks_are_refused_with_specific_codes() {
    let fleet = Fleet::new();
    let (_, good_csr) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    let token = fleet.token("app-1");
    let body = |nonce: &str, csr: &str, token: &str, id: &str| json!({"appliance_id": id, "csr_pem": csr, "nonce": nonce, "proof": {"kind": "token", "token": token}});

    // Unknown appliance: 404, whatever else is sent.
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &good_csr, &token, "app-nope"))
        .await;
    assert_eq!((s, v["error"].as_str()), (404, Some("unknown_appliance")));

    // Garbage CSR: 400, and the token is not burned by it.
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post(
            "/v1/enroll",
            body(
                &n,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &token,
                "app-1",
            ),
        )
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().starts_with("csr_"), "{v}");

    // A CSR for a key type control does not allow (RSA): 400, token not burned.
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=app-1",
        ])
        .args(["-keyout", "/dev/null"])
        .output()
        .expect("openssl is installed");
    let rsa_csr = String::from_utf8(out.stdout).unwrap();
    assert!(rsa_csr.contains("CERTIFICATE REQUEST"), "{rsa_csr}");
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &rsa_csr, &token, "app-1"))
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("csr_key_type_not_allowed")),
        "{v}"
    );

    // A nonce that was never handed out.
    let (s, v) = fleet
        .post(
            "/v1/enroll",
            body(&"0".repeat(64), &good_csr, &token, "app-1"),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("nonce_invalid")));

    // A CSR asking for another appliance's name gets a certificate naming only the record.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["app-2.example".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "app-2");
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(format!("spiffe://{TRUST_DOMAIN}/appliance/app-2"))
            .unwrap(),
    ));
    let evil_csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &evil_csr, &token, "app-1"))
        .await;
    assert_eq!(s, 200, "{v}");
    for field in ["certificate_pem", "ca_pem", "expires_at"] {
        assert!(v[field].is_string(), "{field} in {v}");
    }
    assert!(v["brokers"].is_array(), "{v}");
    let chain = v["certificate_pem"].as_str().unwrap();
    let der = rustls_pemfile::certs(&mut chain.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect();
    assert_eq!(
        names,
        vec![format!("URI(spiffe://{TRUST_DOMAIN}/appliance/app-1)")]
    );
    assert!(!format!("{}", cert.subject()).contains("app-2"));

    // Replayed nonce (the one just used), with a fresh valid token.
    let t = fleet.token("app-1");
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &good_csr, &t, "app-1"))
        .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("nonce_replayed")));
    // Replayed token.
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &good_csr, &token, "app-1"))
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("token_used")));
    // Token of app-1 for app-2.
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &good_csr, &t, "app-2"))
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("token_wrong_appliance"))
    );
    // Oversized body: refused before parsing.
    let n = fleet.nonce().await;
    let big = "A".repeat(200_000);
    let (s, v) = fleet.post("/v1/enroll", body(&n, &big, &t, "app-1")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    // Malformed JSON / unknown proof kind.
    let (s, v) = fleet
        .post("/v1/enroll", json!({"appliance_id": "app-1"}))
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
    // Expired token.
    let d = fleet.data.to_str().unwrap();
    let out = control(&["token", "create", "--data-dir", d, "app-1", "--ttl", "1s"]);
    let expired = out.lines().last().unwrap().trim().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &good_csr, &expired, "app-1"))
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("token_expired")));
    // Disabled appliance cannot enroll even with a valid token.
    control(&["appliance", "disable", "--data-dir", d, "app-2"]);
    let t2 = fleet.token("app-2");
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", body(&n, &good_csr, &t2, "app-2"))
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("appliance_disabled")));

    // The server is unharmed.
    let (s, _) = fleet.post("/v1/enroll/challenge", json!({})).await;
    assert_eq!(s, 200);

    // Every refusal is counted by its code.
    for (status, code, at_least) in [
        (404, "unknown_appliance", 1.0),
        (400, "nonce_invalid", 1.0),
        (409, "nonce_replayed", 1.0),
        (403, "token_used", 1.0),
        (403, "token_wrong_appliance", 1.0),
        (403, "token_expired", 1.0),
        (403, "appliance_disabled", 1.0),
        (413, "payload_too_large", 1.0),
        (400, "bad_request", 1.0),
        (400, "csr_key_type_not_allowed", 1.0),
        (200, "ok", 1.0),
    ] {
        let sample = format!(
            "tether_control_requests_total{{route=\"/v1/enroll\",status=\"{status}\",code=\"{code}\"}}"
        );
        let v = fleet.metric(&sample).await;
        assert!(v >= at_least, "{sample} = {v}");
    }

    // ...and audited: one refused entry per refusal, with its code, in an intact chain,
    // and no secret in it.
    let d = fleet.data.to_str().unwrap();
    let log = control(&["audit", "list", "--data-dir", d, "--limit", "1000"]);
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for code in [
        "unknown_appliance",
        "csr_malformed",
        "csr_key_type_not_allowed",
        "nonce_invalid",
        "nonce_replayed",
        "token_used",
        "token_wrong_appliance",
        "token_expired",
        "appliance_disabled",
    ] {
        assert!(
            entries.iter().any(|e| e["action"] == "appliance.enroll"
                && e["outcome"] == "refused"
                && e["details"]["code"] == code),
            "no refused appliance.enroll entry with code {code}: {log}"
        );
    }
    assert!(!log.contains(&token), "the audit log holds a token");
    assert!(
        !log.contains("CERTIFICATE REQUEST"),
        "the audit log holds a CSR"
    );
    control(&["audit", "verify", "--data-dir", d]);
}

fn token_body(nonce: &str, csr: &str, token: &str, id: &str) -> serde_json::Value {
    json!({"appliance_id": id, "csr_pem": csr, "nonce": nonce, "proof": {"kind": "token", "token": token}})
}

/// Issue 17: an enrollment whose answer was lost (a replica crashed after the commit, a
/// connection dropped) is retried with a fresh nonce, the same token and the same key,
/// and gets the same certificate; the token is redeemed once.
#[tokio::test]
async fn enrollment_retry_with_the_same_key_gets_the_same_certificate() {
    let fleet = Fleet::new();
    let token = fleet.token("app-1");
    let (_, csr) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    let n = fleet.nonce().await;
    let (s, first) = fleet
        .post("/v1/enroll", token_body(&n, &csr, &token, "app-1"))
        .await;
    assert_eq!(s, 200, "{first}");
    let n = fleet.nonce().await;
    let (s, again) = fleet
        .post("/v1/enroll", token_body(&n, &csr, &token, "app-1"))
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["certificate_pem"], first["certificate_pem"]);
    assert_eq!(again["fingerprint"], first["fingerprint"]);
    // One certificate recorded, one redemption; the retry is audited as one.
    let shown = control(&[
        "appliance",
        "show",
        "--data-dir",
        fleet.data.to_str().unwrap(),
        "app-1",
    ]);
    assert_eq!(shown.matches("cert:").count(), 1, "{shown}");
    let entries = common::operators::audit_entries(&fleet);
    let count = |action: &str, retry: bool| {
        entries
            .iter()
            .filter(|e| {
                e["action"] == action
                    && e["outcome"] == "success"
                    && (e["details"]["retry"] == true) == retry
            })
            .count()
    };
    assert_eq!(count("token.redeem", false), 1);
    assert_eq!(count("appliance.enroll", false), 1);
    assert_eq!(count("appliance.enroll", true), 1);
}

/// The rule the idempotent retry must not weaken: a token enrolls one key. Whoever else
/// holds it, with any other key, is refused `token_used`, before or after the owner's
/// retry; and once the certificate is revoked even the same key gets no copy of it.
#[tokio::test]
async fn enrollment_token_is_single_use_for_any_other_key() {
    let fleet = Fleet::new();
    let token = fleet.token("app-1");
    let (_, csr) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    let (_, thief_csr) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    let n = fleet.nonce().await;
    let (s, first) = fleet
        .post("/v1/enroll", token_body(&n, &csr, &token, "app-1"))
        .await;
    assert_eq!(s, 200, "{first}");
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", token_body(&n, &thief_csr, &token, "app-1"))
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("token_used")), "{v}");
    assert!(v.get("certificate_pem").is_none());
    // The same key under another appliance's name: the token is not that appliance's.
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", token_body(&n, &csr, &token, "app-2"))
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("token_wrong_appliance"))
    );
    // Revoked: the retry gets nothing back.
    control(&[
        "appliance",
        "revoke",
        "--data-dir",
        fleet.data.to_str().unwrap(),
        "app-1",
    ]);
    let n = fleet.nonce().await;
    let (s, v) = fleet
        .post("/v1/enroll", token_body(&n, &csr, &token, "app-1"))
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("token_used")), "{v}");
}
