//! Renewal end to end with the real binaries: mutual TLS to control with the current
//! certificate, the overlap window and its expiry, the attacks on renewal, the agent
//! renewing on its own and reconnecting with the new certificate, and what happens to a
//! token-only appliance whose certificate expired or whose credential was torn by a crash.

mod common;

use std::path::Path;
use std::time::Duration;

use common::control::*;
use common::*;
use serde_json::json;

/// POST `body` to control at `path`, presenting the credential in `state` (or none).
async fn post_as(
    fleet: &Fleet,
    state: Option<&Path>,
    path: &str,
    body: serde_json::Value,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let root = std::fs::read(&fleet.root).unwrap();
    let files = state.map(|d| {
        (
            std::fs::read(d.join("client.cert.pem")).unwrap(),
            std::fs::read(d.join("client.key.pem")).unwrap(),
        )
    });
    let client = tether_agent::enroll::http_client_with(
        &root,
        files.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    )
    .unwrap();
    let resp = client
        .post(format!("{}{path}", fleet.url()))
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(json!(null))))
}

fn csr(id: &str) -> String {
    tether_agent::enroll::key_and_csr(id).unwrap().1
}

fn fingerprint_of(state: &Path) -> String {
    tether_agent::Credentials::load(state)
        .unwrap()
        .fingerprint()
        .to_owned()
}

fn show(fleet: &Fleet, id: &str) -> String {
    control(&[
        "appliance",
        "show",
        "--data-dir",
        fleet.data.to_str().unwrap(),
        id,
    ])
}

#[tokio::test]
async fn renewal_keeps_the_old_certificate_for_the_overlap_only() {
    let fleet =
        Fleet::with_config("[enroll]\nrenewal_overlap = \"2s\"\noverlap_sweep = \"100ms\"\n");
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let old = fingerprint_of(&state);

    let renewed = tether_agent::renew::renew(&state, &tether_agent::ProxyConfig::direct())
        .await
        .expect("renewed");
    let new = fingerprint_of(&state);
    assert_ne!(old, new);
    assert_eq!(renewed.fingerprint, new);
    // The previous credential is kept next to the new one.
    assert!(state.join("previous").join("client.cert.pem").exists());

    // Both are allowed during the overlap...
    let allowlist = fleet.data.parent().unwrap().join("allowlist.txt");
    fleet.export_allowlist(&allowlist);
    let text = std::fs::read_to_string(&allowlist).unwrap();
    assert!(text.contains(&format!("app-1 {old}")), "{text}");
    assert!(text.contains(&format!("app-1 {new}")), "{text}");

    // ...and the old one leaves by itself when the overlap ends.
    let gone = wait_for(Duration::from_secs(10), || async {
        fleet.export_allowlist(&allowlist);
        let text = std::fs::read_to_string(&allowlist).unwrap();
        (!text.contains(&old)).then_some(text)
    })
    .await
    .expect("the previous fingerprint left the allowlist after the overlap");
    assert!(gone.contains(&format!("app-1 {new}")), "{gone}");

    // The old certificate cannot renew any more (it is past its overlap).
    let (s, v) = post_as(
        &fleet,
        Some(&state.join("previous")),
        "/v1/renew",
        json!({"csr_pem": csr("x")}),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("certificate_not_allowed")),
        "{v}"
    );
    // The new one can.
    let (s, v) = post_as(
        &fleet,
        Some(&state),
        "/v1/renew",
        json!({"csr_pem": csr("x")}),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(show(&fleet, "app-1").contains("trust:    trusted"));
}

#[tokio::test]
async fn renewal_attacks_are_refused() {
    let fleet = Fleet::new();
    let base = fleet.data.parent().unwrap().to_owned();
    let (s1, s2) = (base.join("agent-app-1"), base.join("agent-app-2"));
    fleet.enroll("app-1", &fleet.token("app-1"), &s1).unwrap();
    fleet.enroll("app-2", &fleet.token("app-2"), &s2).unwrap();

    // No client certificate.
    let (s, v) = post_as(&fleet, None, "/v1/renew", json!({"csr_pem": csr("app-1")}))
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("client_certificate_required"))
    );

    // An operator certificate can never renew as an appliance.
    let ops = base.join("operator");
    std::fs::create_dir_all(&ops).unwrap();
    let (key, op_csr) = tether_agent::enroll::key_and_csr("alice").unwrap();
    let op = fleet
        .ca()
        .issue_operator("alice", &op_csr, time::OffsetDateTime::now_utc())
        .unwrap();
    std::fs::write(ops.join("client.cert.pem"), &op.chain_pem).unwrap();
    std::fs::write(ops.join("client.key.pem"), key).unwrap();
    let (s, v) = post_as(
        &fleet,
        Some(&ops),
        "/v1/renew",
        json!({"csr_pem": csr("alice")}),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("not_an_appliance")),
        "{v}"
    );

    // A certificate from another CA does not even complete the TLS handshake.
    let pki = tether::pki::Pki::new(TRUST_DOMAIN).unwrap();
    let foreign = pki.appliance("app-1").unwrap();
    let fdir = base.join("foreign");
    foreign.write_agent_state(&fdir, &pki.root_pem()).unwrap();
    assert!(
        post_as(
            &fleet,
            Some(&fdir),
            "/v1/renew",
            json!({"csr_pem": csr("app-1")})
        )
        .await
        .is_err(),
        "a foreign certificate was accepted by the TLS layer"
    );

    // A CSR naming app-2, sent by app-1, gets a certificate naming app-1 only.
    let (s, v) = post_as(
        &fleet,
        Some(&s1),
        "/v1/renew",
        json!({"csr_pem": csr("app-2")}),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{v}");
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

    // Garbage CSR with a valid certificate: 400, nothing issued.
    let (s, v) = post_as(
        &fleet,
        Some(&s1),
        "/v1/renew",
        json!({"csr_pem": "garbage"}),
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().starts_with("csr_"), "{v}");

    // Disabled: refused; enabled again: allowed.
    let d = fleet.data.to_str().unwrap();
    control(&["appliance", "disable", "--data-dir", d, "app-2"]);
    let (s, v) = post_as(
        &fleet,
        Some(&s2),
        "/v1/renew",
        json!({"csr_pem": csr("app-2")}),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("appliance_disabled")),
        "{v}"
    );
    control(&["appliance", "enable", "--data-dir", d, "app-2"]);
    let (s, v) = post_as(
        &fleet,
        Some(&s2),
        "/v1/renew",
        json!({"csr_pem": csr("app-2")}),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{v}");

    // Revoked: refused until it enrolls again with a fresh proof.
    control(&["appliance", "revoke", "--data-dir", d, "app-1"]);
    let (s, v) = post_as(
        &fleet,
        Some(&s1),
        "/v1/renew",
        json!({"csr_pem": csr("app-1")}),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("appliance_revoked")),
        "{v}"
    );
    assert!(show(&fleet, "app-1").contains("trust:    trust_revoked"));
    fleet.enroll("app-1", &fleet.token("app-1"), &s1).unwrap();
    let (s, v) = post_as(
        &fleet,
        Some(&s1),
        "/v1/renew",
        json!({"csr_pem": csr("app-1")}),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "re-enrolled appliance renews: {v}");

    // The fleet view is for operators only.
    let (s, _) = post_as(&fleet, Some(&s1), "/v1/fleet/trust", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 405, "fleet trust is a GET");
    // Control is unharmed.
    let (s, _) = post_as(&fleet, None, "/v1/enroll/challenge", json!({}))
        .await
        .unwrap();
    assert_eq!(s, 200);
}

#[tokio::test]
async fn fleet_trust_counts_states_and_raises_alerts() {
    // Certificates of 2 days: under the 3-day recommendation, above the 1-day due mark.
    let fleet = Fleet::with_config("[certificates]\nappliance = \"2days\"\n");
    let base = fleet.data.parent().unwrap().to_owned();
    fleet
        .enroll("app-1", &fleet.token("app-1"), &base.join("a1"))
        .unwrap();
    let d = fleet.data.to_str().unwrap();
    let out = control(&["fleet", "trust", "--data-dir", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 2);
    assert_eq!(v["counts"]["renewal_recommended"], 1, "{v}");
    assert_eq!(v["counts"]["not_enrolled"], 1, "{v}");
    assert_eq!(v["alerts"].as_array().unwrap().len(), 0, "{v}");

    // Over HTTPS: an appliance certificate is refused, an operator's is served.
    let client_for = |dir: &Path| {
        tether_agent::enroll::http_client_with(
            &std::fs::read(&fleet.root).unwrap(),
            Some((
                &std::fs::read(dir.join("client.cert.pem")).unwrap(),
                &std::fs::read(dir.join("client.key.pem")).unwrap(),
            )),
        )
        .unwrap()
    };
    let url = format!("{}/v1/fleet/trust", fleet.url());
    let r = client_for(&base.join("a1")).get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = common::http_pinned(&fleet.root)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let ops = base.join("operator");
    std::fs::create_dir_all(&ops).unwrap();
    let (key, op_csr) = tether_agent::enroll::key_and_csr("alice").unwrap();
    let op = fleet
        .ca()
        .issue_operator("alice", &op_csr, time::OffsetDateTime::now_utc())
        .unwrap();
    std::fs::write(ops.join("client.cert.pem"), &op.chain_pem).unwrap();
    std::fs::write(ops.join("client.key.pem"), key).unwrap();
    // Signed by our CA but never recorded by a login: not honoured.
    let r = client_for(&ops).get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let refusal: serde_json::Value = r.json().await.unwrap();
    assert_eq!(refusal["error"], "operator_unknown", "{refusal}");
    fleet.honour_operator("alice", tether_api::operators::Role::Viewer, &op);
    let r = client_for(&ops).get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let served: serde_json::Value = r.json().await.unwrap();
    assert_eq!(served["counts"], v["counts"]);
}

#[tokio::test]
async fn fleet_trust_alerts_on_expired_certificates() {
    let fleet = Fleet::with_config("[certificates]\nappliance = \"2s\"\n");
    let base = fleet.data.parent().unwrap().to_owned();
    fleet
        .enroll("app-1", &fleet.token("app-1"), &base.join("a1"))
        .unwrap();
    let d = fleet.data.to_str().unwrap();
    let out = control(&["fleet", "trust", "--data-dir", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["counts"]["renewal_due"], 1, "{v}");
    assert_eq!(v["alerts"][0]["appliance_id"], "app-1", "{v}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let out = control(&["fleet", "trust", "--data-dir", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["counts"]["expired"], 1, "{v}");
    assert_eq!(v["alerts"][0]["state"], "expired", "{v}");
    assert!(
        v["alerts"][0]["message"]
            .as_str()
            .unwrap()
            .contains("token"),
        "a token-only appliance's alert says a new token is needed: {v}"
    );
    // Disabled appliances raise no alert.
    control(&["appliance", "disable", "--data-dir", d, "app-1"]);
    let out = control(&["fleet", "trust", "--data-dir", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v["disabled"].as_u64(),
            v["alerts"].as_array().unwrap().len()
        ),
        (Some(1), 0),
        "{v}"
    );

    // The agent of an expired token-only appliance says what to do, and stops.
    let out = std::process::Command::new(bin("tether-agent"))
        .args(["run", "--broker", "127.0.0.1:9", "--state-dir"])
        .arg(base.join("a1"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tether-control token create app-1"), "{err}");
}

#[tokio::test]
async fn agent_renews_by_itself_and_reconnects_with_the_new_certificate() {
    // Short certificates so the agent's renewal threshold is reached in a test.
    let fleet = Fleet::with_config(
        "[certificates]\nappliance = \"12s\"\n[enroll]\nrenewal_overlap = \"1h\"\n",
    );
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let first = fingerprint_of(&state);
    let (broker, allowlist) = fleet.broker("b1", "");
    let _agent = AgentProc::start(
        &state,
        &[broker.quic],
        &[
            "--renew-before",
            "5s",
            "--renew-check-every",
            "200ms",
            "--revoked-backoff",
            "200ms",
        ],
    );
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["fingerprint"], first.as_str());

    // About 7 s in (5 s before expiry), the agent renews; control allows the new fingerprint, and once the
    // broker's allowlist has it the agent is connected with the new certificate.
    // (The agent may be between its key and certificate writes: skip such a read.)
    let renewed = wait_for(Duration::from_secs(30), || async {
        let now = tether_agent::Credentials::load(&state)
            .ok()?
            .fingerprint()
            .to_owned();
        (now != first).then_some(now)
    })
    .await
    .expect("the agent renewed its certificate");
    fleet.export_allowlist(&allowlist);
    let row = wait_for(Duration::from_secs(30), || async {
        broker
            .sessions()
            .await
            .into_iter()
            .find(|s| s["appliance_id"] == "app-1" && s["fingerprint"] != first.as_str())
    })
    .await
    .expect("the agent reconnected with a renewed certificate");
    assert_ne!(row["fingerprint"], first.as_str());
    let shown = show(&fleet, "app-1");
    assert!(shown.contains(&renewed), "{shown}");
}

#[tokio::test]
async fn a_crash_between_key_and_certificate_writes_leads_to_re_enrollment() {
    let fleet = Fleet::new();
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    // The crash: the new key was written, the certificate was not.
    let (new_key, _) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    tether_agent::enroll::write_atomic(&state.join("client.key.pem"), new_key.as_bytes(), 0o600)
        .unwrap();
    assert!(
        tether_agent::Credentials::load(&state).is_err(),
        "a torn credential is refused"
    );

    // A token-only appliance cannot recover alone: the agent says how, and exits.
    let out = std::process::Command::new(bin("tether-agent"))
        .args(["run", "--broker", "127.0.0.1:9", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token create app-1"), "{err}");

    // With a new token it enrolls again and connects.
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let (broker, _) = fleet.broker("b1", "");
    let _agent = AgentProc::start(&state, &[broker.quic], &[]);
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["fingerprint"], fingerprint_of(&state).as_str());
}

#[tokio::test]
async fn a_renewal_torn_by_a_crash_is_undone_from_the_previous_credential() {
    let fleet = Fleet::new();
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let enrolled = fingerprint_of(&state);
    tether_agent::renew::renew(&state, &tether_agent::ProxyConfig::direct())
        .await
        .unwrap();
    let second = fingerprint_of(&state);
    // previous/ holds the enrolled credential; now tear the current one as a crash
    // between the key and certificate writes of the next renewal would.
    let (new_key, _) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    tether_agent::enroll::write_atomic(&state.join("client.key.pem"), new_key.as_bytes(), 0o600)
        .unwrap();
    assert!(tether_agent::Credentials::load(&state).is_err());

    // Even a token-only appliance recovers alone: the previous certificate is still in
    // its overlap, so the agent puts it back and renews with it at once (mutual TLS
    // with the torn pair is impossible, so a renewal proves the restore).
    let (broker, allowlist) = fleet.broker("b1", "");
    let _agent = AgentProc::start(
        &state,
        &[broker.quic],
        &["--renew-check-every", "200ms", "--revoked-backoff", "200ms"],
    );
    let renewed = wait_for(Duration::from_secs(30), || async {
        let now = tether_agent::Credentials::load(&state)
            .ok()?
            .fingerprint()
            .to_owned();
        (now != enrolled && now != second).then_some(now)
    })
    .await
    .expect("the agent restored the previous credential and renewed with it");
    assert!(show(&fleet, "app-1").contains(&renewed));
    // And it connects with the renewed certificate once brokers allow it.
    fleet.export_allowlist(&allowlist);
    let row = wait_for(Duration::from_secs(30), || async {
        broker
            .sessions()
            .await
            .into_iter()
            .find(|s| s["appliance_id"] == "app-1" && s["fingerprint"] == renewed.as_str())
    })
    .await
    .expect("connected with the renewed certificate");
    assert_eq!(row["fingerprint"], renewed.as_str());
}

/// Issue 17: a renewal whose answer was lost is retried with the same certificate and
/// the same new key and gets the same certificate (no second one, no second allowlist
/// version); a new key is a new renewal.
#[tokio::test]
async fn renewal_retry_with_the_same_key_gets_the_same_certificate() {
    let fleet = Fleet::new();
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let same = csr("app-1");
    let (s, first) = post_as(&fleet, Some(&state), "/v1/renew", json!({"csr_pem": same}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{first}");
    let (s, again) = post_as(&fleet, Some(&state), "/v1/renew", json!({"csr_pem": same}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["certificate_pem"], first["certificate_pem"]);
    let shown = show(&fleet, "app-1");
    assert_eq!(
        shown.matches("cert:").count(),
        2,
        "the enrolled certificate and one renewal: {shown}"
    );
    // Another key: a renewal of its own.
    let (s, other) = post_as(
        &fleet,
        Some(&state),
        "/v1/renew",
        json!({"csr_pem": csr("app-1")}),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{other}");
    assert_ne!(other["fingerprint"], first["fingerprint"]);
}
