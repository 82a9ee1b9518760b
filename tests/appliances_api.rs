//! The appliance and token routes of the operator API, and the `tether appliance` /
//! `tether token` commands, end to end with the real binaries (SQLite): the role matrix
//! of every route, appliance certificates refused, the full CLI flow (register → token →
//! `tether-agent enroll` → list → revoke → show), pagination and filters, and bad input
//! refused with control still serving.

mod common;

use std::path::Path;

use common::control::*;
use common::operators::*;
use serde_json::{json, Value};

fn tether_json(config: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let out = tether(config, &args).unwrap_or_else(|e| panic!("tether {args:?}: {e}"));
    serde_json::from_str(&out).unwrap()
}

fn login(fleet: &Fleet, who: &str, bundle: &Path) {
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
    .expect("login");
}

/// Log in the first admin, and `olga` (operator) and `vic` (viewer) invited by it.
fn log_everyone_in(fleet: &Fleet) {
    login(fleet, "admin", &fleet.data.join("admin-bundle.json"));
    let admin = config_dir(fleet, "admin");
    for (name, role) in [("olga", "operator"), ("vic", "viewer")] {
        let out = fleet
            .data
            .parent()
            .unwrap()
            .join(format!("{name}.bundle.json"));
        tether(
            &admin,
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
        login(fleet, name, &out);
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["appliances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every appliance route, for a caller `who`: (method, path, body, needs operator).
fn routes(who: &str) -> Vec<(&'static str, String, Option<Value>, bool)> {
    let own = format!("new-{who}");
    vec![
        (
            "POST",
            "/v1/appliances".into(),
            Some(json!({"id": own, "tenant": "t", "binding": {"kind": "token_only"}})),
            true,
        ),
        ("GET", "/v1/appliances".into(), None, false),
        (
            "GET",
            "/v1/appliances?trust_state=not_enrolled&limit=1".into(),
            None,
            false,
        ),
        ("GET", "/v1/appliances/app-1".into(), None, false),
        ("POST", "/v1/appliances/app-2/disable".into(), None, true),
        ("POST", "/v1/appliances/app-2/enable".into(), None, true),
        ("POST", "/v1/appliances/app-2/renew".into(), None, true),
        (
            "POST",
            "/v1/appliances/app-2/tokens".into(),
            Some(json!({"ttl_secs": 60})),
            true,
        ),
        ("POST", format!("/v1/appliances/{own}/revoke"), None, true),
    ]
}

#[tokio::test]
async fn appliance_routes_hold_the_role_matrix() {
    let fleet = Fleet::new();
    log_everyone_in(&fleet);
    for who in ["admin", "olga", "vic"] {
        let client = client_from(&fleet, Some(&config_dir(&fleet, who)), false);
        let may_change = who != "vic";
        for (method, path, body, change) in routes(who) {
            let (s, v) = call(&client, &fleet, method, &path, body).await;
            if change && !may_change {
                assert_eq!(
                    (s, v["error"].as_str()),
                    (403, Some("role_forbidden")),
                    "{who} {method} {path}: {v}"
                );
            } else {
                let expected = if path == "/v1/appliances" && method == "POST" {
                    201
                } else {
                    200
                };
                assert_eq!(s, expected, "{who} {method} {path}: {v}");
            }
        }
    }
    let entries = audit_entries(&fleet);
    // Every role denial is audited, by the viewer, one per change route.
    let mut denied: Vec<_> = entries
        .iter()
        .filter(|e| e["details"]["code"] == "role_forbidden")
        .map(|e| {
            assert_eq!(e["actor"]["name"], "vic", "{e}");
            e["action"].as_str().unwrap().to_owned()
        })
        .collect();
    denied.sort();
    assert_eq!(
        denied,
        [
            "appliance.disable",
            "appliance.enable",
            "appliance.register",
            "appliance.request_renewal",
            "appliance.revoke",
            "token.create",
        ]
    );
    // Every change is audited as done by the operator that made it.
    for action in [
        "appliance.register",
        "appliance.disable",
        "appliance.enable",
        "appliance.request_renewal",
        "token.create",
        "appliance.revoke",
    ] {
        let by: Vec<_> = entries
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == "success")
            .filter(|e| e["actor"]["kind"] == "operator")
            .map(|e| e["actor"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(by, ["admin", "olga"], "{action}");
    }
    let revoke = entries
        .iter()
        .find(|e| e["action"] == "appliance.revoke" && e["outcome"] == "success")
        .unwrap();
    assert_eq!(revoke["target"], "new-admin");
    assert!(
        revoke["details"]["allowlist_version"].is_number(),
        "{revoke}"
    );
}

#[tokio::test]
async fn appliance_certificates_cannot_call_appliance_routes() {
    let fleet = Fleet::new();
    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .unwrap();
    let appliance = client_from(&fleet, Some(&state), true);
    let anonymous = client_from(&fleet, None, false);
    let routes = routes("app-1");
    for (method, path, body, _) in &routes {
        let (s, v) = call(&appliance, &fleet, method, path, body.clone()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (403, Some("operator_required")),
            "{method} {path}: {v}"
        );
        let (s, v) = call(&anonymous, &fleet, method, path, body.clone()).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("client_certificate_required")),
            "{method} {path}: {v}"
        );
    }
    // Nothing changed: app-2 is still active and its generation untouched, no new-app-1.
    let show = control(&[
        "appliance",
        "show",
        "--data-dir",
        fleet.data.to_str().unwrap(),
        "app-2",
    ]);
    assert!(
        show.contains("Active") && show.contains("renewal generation: 0"),
        "{show}"
    );
    let refused: Vec<_> = audit_entries(&fleet)
        .into_iter()
        .filter(|e| e["details"]["code"] == "operator_required")
        .map(|e| {
            (
                e["actor"]["kind"].as_str().unwrap().to_owned(),
                e["actor"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        vec![("appliance".to_owned(), "app-1".to_owned()); routes.len()]
    );
    assert!(!audit_entries(&fleet)
        .iter()
        .any(|e| e["target"] == "new-app-1" && e["outcome"] == "success"));
}

#[tokio::test]
async fn cli_registers_tokens_enrolls_lists_and_revokes() {
    let fleet = Fleet::new();
    log_everyone_in(&fleet);
    let olga = config_dir(&fleet, "olga");
    let vic = config_dir(&fleet, "vic");

    // --help everywhere.
    for args in [
        &["appliance", "--help"][..],
        &["appliance", "register", "--help"],
        &["appliance", "list", "--help"],
        &["appliance", "show", "--help"],
        &["appliance", "disable", "--help"],
        &["appliance", "enable", "--help"],
        &["appliance", "revoke", "--help"],
        &["appliance", "renew", "--help"],
        &["token", "create", "--help"],
    ] {
        let out = tether(&olga, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(out.contains("Usage: tether"), "{args:?}: {out}");
    }

    let out = tether(
        &olga,
        &[
            "appliance",
            "register",
            "edge-1",
            "--token-only",
            "--tenant",
            "t1",
        ],
    )
    .unwrap();
    assert!(out.contains("registered edge-1"), "{out}");
    let v = tether_json(
        &olga,
        &[
            "appliance",
            "register",
            "edge-aws",
            "--aws-role",
            "arn:aws:iam::123456789012:role/edge",
            "--tenant",
            "t1",
        ],
    );
    assert_eq!(
        v["binding"],
        json!({"kind": "aws", "role_arn": "arn:aws:iam::123456789012:role/edge"})
    );
    let v = tether_json(
        &olga,
        &[
            "appliance",
            "register",
            "edge-k8s",
            "--k8s-issuer",
            "https://k8s.example",
            "--k8s-namespace",
            "ns",
            "--k8s-service-account",
            "sa",
        ],
    );
    assert_eq!(
        (v["tenant"].as_str(), v["trust_state"].as_str()),
        (Some("default"), Some("not_enrolled"))
    );
    // The viewer reads but does not register.
    let err = tether(&vic, &["appliance", "register", "x", "--token-only"]).unwrap_err();
    assert!(err.contains("403 role_forbidden"), "{err}");

    // The token is alone on the last line of standard output.
    let out = tether(&olga, &["token", "create", "edge-1", "--ttl", "1h"]).unwrap();
    let token = out.lines().last().unwrap().trim().to_owned();
    assert!(token.starts_with("tt_") && out.trim() == token, "{out}");
    let state = fleet.data.parent().unwrap().join("agent-edge-1");
    fleet
        .enroll("edge-1", &token, &state)
        .expect("enrolls with the CLI's token");
    let err = fleet
        .enroll(
            "edge-1",
            &token,
            &fleet.data.parent().unwrap().join("again"),
        )
        .unwrap_err();
    assert!(err.contains("token_used"), "{err}");

    let list = tether_json(&vic, &["appliance", "list", "--tenant", "t1"]);
    assert_eq!(ids(&list), ["edge-1", "edge-aws"]);
    let edge = &list["appliances"][0];
    assert_eq!(
        (edge["status"].as_str(), edge["trust_state"].as_str()),
        (Some("active"), Some("trusted")),
        "{edge}"
    );
    assert!(edge["certificate"]["fingerprint"].is_string(), "{edge}");
    assert_eq!(list["next"], Value::Null);
    let table = tether(&vic, &["appliance", "list", "--trust-state", "trusted"]).unwrap();
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("edge-1") && l.contains("trusted")),
        "{table}"
    );

    // Disable, enable, renew.
    let v = tether_json(&olga, &["appliance", "disable", "edge-1"]);
    assert_eq!(v["status"], "disabled");
    let disabled_at = v["allowlist_version"].as_i64().unwrap();
    let v = tether_json(&olga, &["appliance", "enable", "edge-1"]);
    assert_eq!(v["status"], "active");
    assert_eq!(v["allowlist_version"].as_i64(), Some(disabled_at + 1));
    let out = tether(&olga, &["appliance", "renew", "edge-1"]).unwrap();
    assert!(out.contains("generation 1"), "{out}");

    let out = tether(&olga, &["appliance", "revoke", "edge-1"]).unwrap();
    assert!(out.contains("edge-1: revoked"), "{out}");
    let show = tether_json(&vic, &["appliance", "show", "edge-1"]);
    assert_eq!(show["trust_state"], "trust_revoked", "{show}");
    assert_eq!(show["manual_renewal_generation"], 1);
    assert_eq!(show["certificate"], Value::Null);
    let states: Vec<_> = show["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["revoked"]);
    let table = tether(&vic, &["appliance", "show", "edge-1"]).unwrap();
    assert!(table.contains("trust_revoked"), "{table}");
    // A revoked appliance is not enabled back; it needs a fresh proof.
    let err = tether(&olga, &["appliance", "enable", "edge-1"]).unwrap_err();
    assert!(err.contains("409 appliance_revoked"), "{err}");

    // The token never reached the audit log; its creation did, by olga.
    let entries = audit_entries(&fleet);
    assert!(!serde_json::to_string(&entries).unwrap().contains(&token));
    let created = entries
        .iter()
        .find(|e| e["action"] == "token.create" && e["target"] == "edge-1")
        .unwrap();
    assert_eq!(
        created["actor"],
        json!({"kind": "operator", "name": "olga"})
    );
    assert!(created["details"]["token_ref"].is_string(), "{created}");
}

#[tokio::test]
async fn list_paginates_and_filters() {
    let fleet = Fleet::new();
    log_everyone_in(&fleet);
    let olga = client_from(&fleet, Some(&config_dir(&fleet, "olga")), false);
    for i in 0..7 {
        let (s, v) = call(
            &olga,
            &fleet,
            "POST",
            "/v1/appliances",
            Some(json!({"id": format!("p-{i}"), "tenant": "pages", "binding": {"kind": "token_only"}})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    // Walk all 9 (app-1, app-2 and p-0..p-6) three at a time.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/appliances?limit=3&after={a}"),
            None => "/v1/appliances?limit=3".to_owned(),
        };
        let (s, v) = call(&olga, &fleet, "GET", &path, None).await;
        assert_eq!(s, 200, "{v}");
        pages += 1;
        let page = ids(&v);
        assert!(page.len() <= 3);
        seen.extend(page.clone());
        match v["next"].as_str() {
            Some(n) => {
                assert_eq!(Some(n), page.last().map(String::as_str));
                after = Some(n.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(pages, 3, "9 appliances, 3 a page, no empty trailing page");
    let mut expected = vec!["app-1".to_owned(), "app-2".to_owned()];
    expected.extend((0..7).map(|i| format!("p-{i}")));
    assert_eq!(seen, expected);

    // Filters: tenant, status, trust state (paginated too).
    let (_, v) = call(&olga, &fleet, "GET", "/v1/appliances?tenant=acme", None).await;
    assert_eq!(ids(&v), ["app-1", "app-2"]);
    call(&olga, &fleet, "POST", "/v1/appliances/p-3/disable", None).await;
    let (_, v) = call(&olga, &fleet, "GET", "/v1/appliances?status=disabled", None).await;
    assert_eq!(ids(&v), ["p-3"]);
    let state = fleet.data.parent().unwrap().join("agent-p-5");
    fleet.enroll("p-5", &fleet.token("p-5"), &state).unwrap();
    let (_, v) = call(
        &olga,
        &fleet,
        "GET",
        "/v1/appliances?trust_state=trusted",
        None,
    )
    .await;
    assert_eq!(ids(&v), ["p-5"]);
    let (_, v) = call(
        &olga,
        &fleet,
        "GET",
        "/v1/appliances?trust_state=not_enrolled&tenant=pages&limit=2&after=p-2",
        None,
    )
    .await;
    assert_eq!(ids(&v), ["p-3", "p-4"]);
    assert_eq!(v["next"], "p-4");
    let (_, v) = call(
        &olga,
        &fleet,
        "GET",
        "/v1/appliances?trust_state=not_enrolled&tenant=pages&limit=2&after=p-4",
        None,
    )
    .await;
    assert_eq!(ids(&v), ["p-6"]);
    assert_eq!(v["next"], Value::Null);

    // The CLI pages the same way.
    let vic = config_dir(&fleet, "vic");
    let v = tether_json(
        &vic,
        &["appliance", "list", "--limit", "4", "--after", "app-2"],
    );
    assert_eq!(ids(&v), ["p-0", "p-1", "p-2", "p-3"]);
    assert_eq!(v["next"], "p-3");

    // Bad queries: 400.
    for q in [
        "limit=0",
        "limit=1001",
        "status=lost",
        "trust_state=meh",
        "colour=red",
    ] {
        let (s, v) = call(&olga, &fleet, "GET", &format!("/v1/appliances?{q}"), None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("invalid_query")),
            "{q}: {v}"
        );
    }
}

#[tokio::test]
async fn bad_input_is_refused_and_control_keeps_serving() {
    let fleet = Fleet::new();
    log_everyone_in(&fleet);
    let olga_dir = config_dir(&fleet, "olga");
    let olga = client_from(&fleet, Some(&olga_dir), false);

    // Unknown ids: 404 on every route that names one.
    for (method, path) in [
        ("GET", "/v1/appliances/nope"),
        ("POST", "/v1/appliances/nope/disable"),
        ("POST", "/v1/appliances/nope/enable"),
        ("POST", "/v1/appliances/nope/revoke"),
        ("POST", "/v1/appliances/nope/renew"),
        ("POST", "/v1/appliances/nope/tokens"),
    ] {
        let (s, v) = call(&olga, &fleet, method, path, None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (404, Some("not_found")),
            "{path}: {v}"
        );
    }
    // Invalid ids: 400 before the store.
    let (s, v) = call(&olga, &fleet, "GET", "/v1/appliances/a%20b", None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_appliance_id")),
        "{v}"
    );
    let (s, v) = call(&olga, &fleet, "POST", "/v1/appliances/a%2Fb/revoke", None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_appliance_id")),
        "{v}"
    );

    // Bad registrations.
    for (body, code) in [
        (
            json!({"id": "a/b", "binding": {"kind": "token_only"}}),
            "invalid_appliance_id",
        ),
        (
            json!({"id": "x", "binding": {"kind": "azure"}}),
            "bad_request",
        ),
        (
            json!({"id": "x", "binding": {"kind": "aws", "role_arn": "arn:aws:iam::1:user/u"}}),
            "bad_request",
        ),
        (
            json!({"id": "x", "binding": {"kind": "gcp", "project": "p"}}),
            "bad_request",
        ),
        (
            json!({"id": "x", "binding": {"kind": "k8s", "issuer": "", "namespace": "n", "service_account": "s"}}),
            "bad_request",
        ),
        (
            json!({"id": "x", "tenant": "", "binding": {"kind": "token_only"}}),
            "bad_request",
        ),
        (json!({"id": "x"}), "bad_request"),
        (
            json!({"id": "x", "binding": {"kind": "token_only"}, "extra": 1}),
            "bad_request",
        ),
    ] {
        let (s, v) = call(&olga, &fleet, "POST", "/v1/appliances", Some(body.clone())).await;
        assert_eq!((s, v["error"].as_str()), (400, Some(code)), "{body}: {v}");
    }
    // A duplicate: 409, and the original is unchanged.
    let (s, v) = call(
        &olga,
        &fleet,
        "POST",
        "/v1/appliances",
        Some(json!({"id": "app-1", "tenant": "evil", "binding": {"kind": "token_only"}})),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let (_, v) = call(&olga, &fleet, "GET", "/v1/appliances/app-1", None).await;
    assert_eq!(v["tenant"], "acme");
    // Bad token lifetimes and bodies.
    for (body, status, code) in [
        ("{\"ttl_secs\": 0}".to_owned(), 400, "invalid_ttl"),
        (
            json!({"ttl_secs": 31 * 86_400}).to_string(),
            400,
            "invalid_ttl",
        ),
        ("{\"ttl_secs\":".to_owned(), 400, "bad_request"),
        (
            json!({"pad": "x".repeat(100 * 1024)}).to_string(),
            413,
            "payload_too_large",
        ),
    ] {
        let r = olga
            .post(format!("{}/v1/appliances/app-1/tokens", fleet.url()))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (s, v["error"].as_str()),
            (status, Some(code)),
            "{}",
            &body[..body.len().min(40)]
        );
    }

    // The CLI says so and exits non-zero.
    let err = tether(&olga_dir, &["appliance", "show", "nope"]).unwrap_err();
    assert!(err.contains("404 not_found"), "{err}");
    let err = tether(
        &olga_dir,
        &["appliance", "register", "app-1", "--token-only"],
    )
    .unwrap_err();
    assert!(err.contains("409 conflict"), "{err}");
    let err = tether(
        &olga_dir,
        &["appliance", "register", "x", "--aws-role", "nope"],
    )
    .unwrap_err();
    assert!(err.contains("400 bad_request"), "{err}");
    let err = tether(&olga_dir, &["appliance", "register", "x"]).unwrap_err();
    assert!(err.contains("--token-only"), "a binding is required: {err}");
    let err = tether(&olga_dir, &["appliance", "show", "../etc"]).unwrap_err();
    assert!(err.contains("invalid appliance id"), "{err}");

    // Refused changes are audited with their code, by olga.
    let codes: Vec<_> = audit_entries(&fleet)
        .into_iter()
        .filter(|e| e["outcome"] == "refused" && e["actor"]["name"] == "olga")
        .map(|e| e["details"]["code"].as_str().unwrap_or("").to_owned())
        .collect();
    for code in [
        "not_found",
        "invalid_appliance_id",
        "bad_request",
        "conflict",
        "invalid_ttl",
    ] {
        assert!(
            codes.iter().any(|c| c == code),
            "{code} not audited: {codes:?}"
        );
    }

    // Control still serves.
    let (s, _) = call(&olga, &fleet, "GET", "/healthz", None).await;
    assert_eq!(s, 200);
    let v = tether_json(&olga_dir, &["appliance", "list"]);
    assert_eq!(ids(&v), ["app-1", "app-2"]);
}
