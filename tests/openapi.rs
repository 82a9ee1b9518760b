//! `GET /openapi.json` from the real server: it parses, it is OpenAPI 3.x, it lists exactly
//! the routes of `tether_control::http::router` (the list below, compared both ways), every
//! operation answers errors with the `Error` schema, and operator routes name the
//! `mutualTLS` scheme.

mod common;

use std::collections::BTreeSet;

use common::control::*;
use serde_json::Value;

/// Every route of `tether_control::http::router`, as (method, path). A route added there
/// and not here (or the reverse) fails [`openapi_lists_every_route`].
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/openapi.json"),
    ("post", "/v1/enroll/challenge"),
    ("post", "/v1/enroll"),
    ("post", "/v1/renew"),
    ("get", "/v1/fleet/trust"),
    ("get", "/v1/audit"),
    ("post", "/v1/appliances"),
    ("get", "/v1/appliances"),
    ("get", "/v1/appliances/{id}"),
    ("post", "/v1/appliances/{id}/disable"),
    ("post", "/v1/appliances/{id}/enable"),
    ("post", "/v1/appliances/{id}/revoke"),
    ("post", "/v1/appliances/{id}/renew"),
    ("post", "/v1/appliances/{id}/tokens"),
    ("post", "/v1/operators/login"),
    ("post", "/v1/operators/invites"),
    ("get", "/v1/operators"),
    ("post", "/v1/operators/{name}/revoke"),
    ("get", "/v1/control/replicas"),
    ("post", "/v1/console/login-links"),
    ("post", "/v1/appliances/{id}/exec"),
    ("post", "/v1/appliances/{id}/tunnels"),
    ("get", "/v1/tunnels"),
    ("get", "/v1/tunnels/{id}"),
    ("delete", "/v1/tunnels/{id}"),
    ("post", "/v1/tunnels/{id}/credential"),
    ("get", "/v1/tunnels/{id}/connect"),
    ("get", "/v1/brokers/tunnels/{conn}"),
    ("post", "/v1/brokers"),
    ("get", "/v1/brokers"),
    ("post", "/v1/brokers/enroll"),
    ("post", "/v1/brokers/renew"),
    ("get", "/v1/brokers/channel"),
    ("post", "/v1/brokers/{name}/revoke"),
    ("post", "/v1/brokers/{name}/drain"),
];

/// Routes that need no client certificate.
const OPEN: &[&str] = &[
    "/healthz",
    "/openapi.json",
    "/v1/enroll/challenge",
    "/v1/enroll",
    "/v1/operators/login",
    "/v1/brokers/enroll",
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch"];
const ERROR_REF: &str = "#/components/schemas/Error";

async fn fetch(fleet: &Fleet) -> Value {
    // No client certificate: the document is public.
    let resp = fleet
        .client()
        .get(format!("{}/openapi.json", fleet.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).expect("/openapi.json is JSON")
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let fleet = Fleet::new();
    let doc = fetch(&fleet).await;
    let version = doc["openapi"].as_str().expect("an `openapi` version");
    assert!(version.starts_with("3."), "OpenAPI 3.x, got {version}");

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<_> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&expected).collect();
    assert!(
        missing.is_empty(),
        "routes not in /openapi.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "/openapi.json documents unknown routes: {extra:?}"
    );

    // The error schema is defined and every operation but the two public documents
    // answers its errors with it.
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["type"], "object", "{error}");
    for field in ["error", "message"] {
        assert!(
            error["required"]
                .as_array()
                .unwrap()
                .contains(&Value::from(field)),
            "{error}"
        );
    }
    for (method, path) in ROUTES {
        let op = &doc["paths"][path][method];
        let responses = op["responses"].as_object().expect("responses");
        // The cluster channel's success is `101 Switching Protocols`.
        assert!(
            responses.keys().any(|s| s.starts_with('2') || s == "101"),
            "{method} {path}: no success answer"
        );
        if ["/healthz", "/openapi.json"].contains(path) {
            continue;
        }
        let errors: Vec<_> = responses
            .iter()
            .filter(|(s, _)| s.starts_with('4') || s.starts_with('5'))
            .collect();
        assert!(!errors.is_empty(), "{method} {path}: no error answer");
        for (status, r) in errors {
            assert_eq!(
                r["content"]["application/json"]["schema"]["$ref"], ERROR_REF,
                "{method} {path} {status}"
            );
        }
        let statuses: Vec<&str> = responses.keys().map(String::as_str).collect();
        if OPEN.contains(path) {
            assert!(op.get("security").is_none(), "{method} {path}");
        } else {
            for s in ["401", "403"] {
                assert!(statuses.contains(&s), "{method} {path}: no {s}");
            }
            let scheme = op["security"][0]
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_else(|| panic!("{method} {path}: no security requirement"));
            assert_eq!(
                doc["components"]["securitySchemes"][&scheme]["type"], "mutualTLS",
                "{method} {path}"
            );
        }
        if *method == "post" && op.get("requestBody").is_some() {
            assert!(
                statuses.contains(&"400") && statuses.contains(&"413"),
                "{method} {path}"
            );
        }
        if path.contains('{') {
            assert_eq!(op["parameters"][0]["in"], "path", "{method} {path}");
        }
    }
}
