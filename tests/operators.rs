//! Operators end to end with the real binaries (SQLite): the first admin's bundle from
//! `tether-control init`, `tether login`, invites, the role matrix of every operator
//! route, revocation, and the attacks on operator routes (appliance certificates, unknown
//! or revoked operator certificates, malformed and oversized bodies).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::control::*;
use common::operators::*;
use common::*;
use serde_json::{json, Value};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `tether login` with `bundle` into `who`'s config directory (control at the fleet's
/// real port); Ok(stdout) or Err(stderr).
fn login(fleet: &Fleet, who: &str, bundle: &Path) -> Result<String, String> {
    tether(
        &config_dir(fleet, who),
        &[
            "login",
            "--bundle",
            bundle.to_str().unwrap(),
            "--control",
            &fleet.url(),
        ],
    )
}

fn admin_bundle(fleet: &Fleet) -> PathBuf {
    fleet.data.join("admin-bundle.json")
}

/// Log the first admin in; returns its config directory.
fn login_admin(fleet: &Fleet) -> PathBuf {
    login(fleet, "admin", &admin_bundle(fleet)).expect("admin logs in");
    config_dir(fleet, "admin")
}

/// `tether operator invite NAME --role ROLE --out FILE` as the operator in `config`.
fn invite(fleet: &Fleet, config: &Path, name: &str, role: &str) -> PathBuf {
    let out = fleet
        .data
        .parent()
        .unwrap()
        .join(format!("{name}.bundle.json"));
    tether(
        config,
        &[
            "operator",
            "invite",
            name,
            "--role",
            role,
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .expect("invite");
    out
}

#[tokio::test]
async fn admin_bundle_logs_in_once_and_the_credential_is_private() {
    let fleet = Fleet::new();
    let bundle_path = admin_bundle(&fleet);
    assert_eq!(mode(&bundle_path), 0o600, "the bundle is a secret");
    let bundle: Value = serde_json::from_slice(&std::fs::read(&bundle_path).unwrap()).unwrap();
    assert_eq!(
        (bundle["name"].as_str(), bundle["role"].as_str()),
        (Some("admin"), Some("admin"))
    );
    assert_eq!(
        bundle["ca_pem"].as_str().unwrap(),
        std::fs::read_to_string(&fleet.root).unwrap()
    );
    assert!(bundle["control_url"]
        .as_str()
        .unwrap()
        .starts_with("https://localhost:"));
    let token = bundle["token"].as_str().unwrap().to_owned();

    let out = login(&fleet, "admin", &bundle_path).expect("login");
    assert!(out.contains("admin"), "{out}");
    let dir = config_dir(&fleet, "admin");
    for f in [
        "operator.key.pem",
        "operator.cert.pem",
        "ca.pem",
        "config.json",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"control_url": fleet.url(), "name": "admin", "role": "admin"})
    );
    // The certificate names the operator.
    let chain = std::fs::read_to_string(dir.join("operator.cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut chain.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(
        san.contains(&format!("spiffe://{TRUST_DOMAIN}/operator/admin")),
        "{san}"
    );

    // The credential works.
    let out = tether(&dir, &["fleet", "trust", "--output", "json"]).expect("fleet trust");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 2, "{v}");
    let table = tether(&dir, &["fleet", "trust"]).unwrap();
    assert!(table.contains("2 appliance(s)"), "{table}");

    // The bundle is single use.
    let err = login(&fleet, "thief", &bundle_path).unwrap_err();
    assert!(err.contains("invite_used"), "{err}");
    assert!(!config_dir(&fleet, "thief")
        .join("operator.key.pem")
        .exists());

    // Login and its refusal are audited, without the token.
    let entries = audit_entries(&fleet);
    let logins: Vec<_> = entries
        .iter()
        .filter(|e| e["action"] == "operator.login")
        .map(|e| {
            (
                e["outcome"].as_str().unwrap(),
                e["details"]["code"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        logins,
        vec![("success", None), ("refused", Some("invite_used"))]
    );
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains(&token), "a token reached the audit log");
}

#[tokio::test]
async fn invited_operators_log_in_side_by_side_and_roles_hold_route_by_route() {
    let fleet = Fleet::new();
    let admin = login_admin(&fleet);
    for (name, role) in [("olga", "operator"), ("vic", "viewer")] {
        let b = invite(&fleet, &admin, name, role);
        assert_eq!(mode(&b), 0o600);
        let out = login(&fleet, name, &b).expect("invited operator logs in");
        assert!(out.contains(name) && out.contains(role), "{out}");
    }
    // Each identity keeps its own directory.
    let list = tether(&admin, &["operator", "list", "--output", "json"]).unwrap();
    let v: Value = serde_json::from_str(&list).unwrap();
    let rows: Vec<_> = v["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap(),
                o["role"].as_str().unwrap(),
                o["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("admin", "admin", "active"),
            ("olga", "operator", "active"),
            ("vic", "viewer", "active")
        ]
    );
    let table = tether(&admin, &["operator", "list"]).unwrap();
    assert!(
        table.starts_with("NAME") && table.contains("olga"),
        "{table}"
    );
    let err = tether(&config_dir(&fleet, "vic"), &["operator", "list"]).unwrap_err();
    assert!(err.contains("403 role_forbidden"), "{err}");

    // The matrix: every operator route × every role.
    let admin_only = [true, false, false];
    let everyone = [true, true, true];
    for (i, who) in ["admin", "olga", "vic"].into_iter().enumerate() {
        let client = client_from(&fleet, Some(&config_dir(&fleet, who)), false);
        // A pending invite to revoke (made by the admin each time).
        let target = format!("pending-{who}");
        invite(&fleet, &admin, &target, "viewer");
        let routes: [(&str, String, Option<Value>, [bool; 3]); 4] = [
            (
                "POST",
                "/v1/operators/invites".into(),
                Some(json!({"name": format!("new-{who}"), "role": "viewer", "ttl_secs": 60})),
                admin_only,
            ),
            ("GET", "/v1/operators".into(), None, admin_only),
            (
                "POST",
                format!("/v1/operators/{target}/revoke"),
                None,
                admin_only,
            ),
            ("GET", "/v1/fleet/trust".into(), None, everyone),
        ];
        for (method, path, body, allowed) in routes {
            let (s, v) = call(&client, &fleet, method, &path, body).await;
            if allowed[i] {
                assert_eq!(s, 200, "{who} {method} {path}: {v}");
            } else {
                assert_eq!(
                    (s, v["error"].as_str()),
                    (403, Some("role_forbidden")),
                    "{who} {method} {path}: {v}"
                );
            }
        }
    }
    // Every role denial is audited, by the operator.
    let denials = audit_entries(&fleet)
        .into_iter()
        .filter(|e| e["details"]["code"] == "role_forbidden")
        .map(|e| {
            (
                e["actor"]["name"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(denials.len(), 1 + 3 + 3, "{denials:?}");
    assert!(denials.iter().all(|(a, _)| a == "olga" || a == "vic"));
}

#[tokio::test]
async fn revoked_operator_is_refused_on_its_next_call_and_its_bundles_cancelled() {
    let fleet = Fleet::new();
    let admin = login_admin(&fleet);
    let olga_bundle = invite(&fleet, &admin, "olga", "operator");
    login(&fleet, "olga", &olga_bundle).unwrap();
    let olga = config_dir(&fleet, "olga");
    tether(&olga, &["fleet", "trust"]).expect("olga is in");
    // A second, unredeemed bundle for olga, and one for pat.
    let spare = invite(&fleet, &admin, "olga", "operator");
    let pat = invite(&fleet, &admin, "pat", "viewer");

    // The client keeps its connection open: the refusal must not depend on a new
    // handshake.
    let client = client_from(&fleet, Some(&olga), false);
    let (s, _) = call(&client, &fleet, "GET", "/v1/fleet/trust", None).await;
    assert_eq!(s, 200);
    let out = tether(&admin, &["operator", "revoke", "olga", "--output", "json"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v["certificates_removed"].as_u64(),
            v["invites_cancelled"].as_u64()
        ),
        (Some(1), Some(1)),
        "{v}"
    );
    let (s, v) = call(&client, &fleet, "GET", "/v1/fleet/trust", None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("operator_unknown")),
        "{v}"
    );
    let err = tether(&olga, &["fleet", "trust"]).unwrap_err();
    assert!(err.contains("operator_unknown"), "{err}");
    let err = login(&fleet, "olga2", &spare).unwrap_err();
    assert!(err.contains("invite_cancelled"), "{err}");

    // Revoking a name that has only a pending invite cancels it.
    tether(&admin, &["operator", "revoke", "pat"]).unwrap();
    let err = login(&fleet, "pat", &pat).unwrap_err();
    assert!(err.contains("invite_cancelled"), "{err}");
    // An unknown name: 404, exit non-zero.
    let err = tether(&admin, &["operator", "revoke", "nobody"]).unwrap_err();
    assert!(err.contains("404 not_found"), "{err}");
    // The last active admin cannot revoke itself (the fleet would have no admin).
    let err = tether(&admin, &["operator", "revoke", "admin"]).unwrap_err();
    assert!(err.contains("409 last_admin"), "{err}");
    tether(&admin, &["operator", "list"]).expect("the admin still works");

    // A new invite brings olga back (with a new certificate only).
    let again = invite(&fleet, &admin, "olga", "viewer");
    login(&fleet, "olga-new", &again).unwrap();
    tether(&config_dir(&fleet, "olga-new"), &["fleet", "trust"]).unwrap();
    let err = tether(&olga, &["fleet", "trust"]).unwrap_err();
    assert!(
        err.contains("operator_unknown"),
        "the old certificate stays refused: {err}"
    );
    let list = tether(&admin, &["operator", "list", "--output", "json"]).unwrap();
    assert!(list.contains("\"viewer\""), "{list}");
}

#[tokio::test]
async fn appliance_certificates_cannot_call_operator_routes_nor_operators_renew() {
    let fleet = Fleet::new();
    let admin = login_admin(&fleet);
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let appliance = client_from(&fleet, Some(&state), true);
    let anonymous = client_from(&fleet, None, false);
    let routes = [
        (
            "POST",
            "/v1/operators/invites",
            Some(json!({"name": "x", "role": "admin"})),
        ),
        ("GET", "/v1/operators", None),
        ("POST", "/v1/operators/admin/revoke", None),
        ("GET", "/v1/fleet/trust", None),
    ];
    for (method, path, body) in &routes {
        let (s, v) = call(&appliance, &fleet, method, path, body.clone()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (403, Some("operator_required")),
            "{path}: {v}"
        );
        let (s, v) = call(&anonymous, &fleet, method, path, body.clone()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("client_certificate_required")),
            "{path}: {v}"
        );
    }
    // The admin is still there (the appliance's revoke did nothing).
    tether(&admin, &["operator", "list"]).unwrap();
    let refused: Vec<_> = audit_entries(&fleet)
        .into_iter()
        .filter(|e| e["details"]["code"] == "operator_required")
        .map(|e| e["actor"]["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(refused, vec!["appliance"; 4]);

    // An operator certificate never renews as an appliance.
    let op = client_from(&fleet, Some(&admin), false);
    let csr = tether_agent::enroll::key_and_csr("app-1").unwrap().1;
    let (s, v) = call(
        &op,
        &fleet,
        "POST",
        "/v1/renew",
        Some(json!({"csr_pem": csr})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("not_an_appliance")),
        "{v}"
    );

    // An operator certificate signed by our CA but never recorded by a login is refused.
    let dir = fleet.data.parent().unwrap().join("forged");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, csr) = tether_agent::enroll::key_and_csr("admin").unwrap();
    let forged = fleet
        .ca()
        .issue_operator("admin", &csr, time::OffsetDateTime::now_utc())
        .unwrap();
    std::fs::write(dir.join("operator.cert.pem"), &forged.chain_pem).unwrap();
    std::fs::write(dir.join("operator.key.pem"), key).unwrap();
    let forged = client_from(&fleet, Some(&dir), false);
    let (s, v) = call(&forged, &fleet, "GET", "/v1/operators", None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("operator_unknown")),
        "{v}"
    );
}

#[tokio::test]
async fn login_refusals_and_bad_bodies_leave_control_serving() {
    let fleet = Fleet::new();
    let anonymous = client_from(&fleet, None, false);
    let url = format!("{}/v1/operators/login", fleet.url());
    let bundle: Value =
        serde_json::from_slice(&std::fs::read(admin_bundle(&fleet)).unwrap()).unwrap();
    let token = bundle["token"].as_str().unwrap();

    // Malformed JSON, wrong shape, unknown fields: 400.
    for body in [
        "{not json".to_owned(),
        "[]".to_owned(),
        json!({"token": token}).to_string(),
        json!({"token": token, "csr_pem": "x", "role": "admin"}).to_string(),
    ] {
        let r = anonymous
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "bad_request", "{v}");
    }
    // Oversized: 413.
    let huge = json!({"token": token, "csr_pem": "A".repeat(200 * 1024)}).to_string();
    let r = anonymous
        .post(&url)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // A bad CSR: 400 csr_*, and the bundle is not burned.
    let (s, v) = call(
        &anonymous,
        &fleet,
        "POST",
        "/v1/operators/login",
        Some(json!({"token": token, "csr_pem": "garbage"})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().starts_with("csr_"), "{v}");
    // An unknown token: 403 invite_unknown.
    let csr = tether_agent::enroll::key_and_csr("x").unwrap().1;
    let (s, v) = call(
        &anonymous,
        &fleet,
        "POST",
        "/v1/operators/login",
        Some(json!({"token": "tt_nope", "csr_pem": csr})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("invite_unknown")),
        "{v}"
    );

    // An expired bundle (made locally with a 1 s lifetime).
    let d = fleet.data.to_str().unwrap();
    let expired = fleet.data.parent().unwrap().join("short.json");
    control(&[
        "operator",
        "invite",
        "--data-dir",
        d,
        "shorty",
        "--role",
        "viewer",
        "--ttl",
        "1s",
        "--out",
        expired.to_str().unwrap(),
    ]);
    assert_eq!(mode(&expired), 0o600);
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let err = login(&fleet, "shorty", &expired).unwrap_err();
    assert!(err.contains("invite_expired"), "{err}");

    // Control is unharmed: the admin bundle still logs in, and the admin's own calls
    // with bad bodies get 400 / 413 too.
    let admin = login_admin(&fleet);
    let op = client_from(&fleet, Some(&admin), false);
    let invites = format!("{}/v1/operators/invites", fleet.url());
    for (body, status) in [
        ("{\"name\":".to_owned(), 400),
        (json!({"name": "a", "role": "root"}).to_string(), 400),
        (json!({"name": "a/b", "role": "viewer"}).to_string(), 400),
        (
            json!({"name": "a", "role": "viewer", "ttl_secs": 0}).to_string(),
            400,
        ),
        (
            json!({"name": "a", "role": "viewer", "pad": "x".repeat(100 * 1024)}).to_string(),
            413,
        ),
    ] {
        let r = op
            .post(&invites)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            status,
            "{}",
            &body[..body.len().min(60)]
        );
    }
    let (s, _) = call(&anonymous, &fleet, "GET", "/healthz", None).await;
    assert_eq!(s, 200);
    tether(&admin, &["fleet", "trust"]).unwrap();
}
