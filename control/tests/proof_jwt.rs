//! The GCP and Kubernetes JWT proofs against real RSA keys (made with `openssl` here) and a
//! real JWKS server on 127.0.0.1 (or a file). Tokens are signed with ring, independently of
//! the verifier's JWT library. Time is passed in: no sleeps, no clock.
//!
//! Each attack test is named after the rule it defends and asserts the exact refusal.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use tether_control::domain::proof::gcp::{GcpSettings, GcpVerifier};
use tether_control::domain::proof::k8s::{K8sCluster, K8sSettings, K8sVerifier};
use tether_control::domain::proof::Verified;
use tether_control::domain::Error as ProofError;
use tether_control::http::status_of;

/// "Now" of every test, Unix seconds.
const NOW: i64 = 1_800_000_000;
const PROJECT: &str = "acme-fleet";
const EMAIL: &str = "appliance@acme-fleet.iam.gserviceaccount.com";
const ISSUER: &str = "https://container.googleapis.com/v1/projects/acme/locations/eu/clusters/one";
const OTHER_ISSUER: &str = "https://oidc.eks.eu-west-1.amazonaws.com/id/OTHER";
const NS: &str = "fleet";
const SA: &str = "tether-agent";

// ---------------------------------------------------------------------------------------
// Keys and tokens

struct TestKey {
    kid: String,
    pair: ring::rsa::KeyPair,
    /// SubjectPublicKeyInfo PEM, what an attacker would use as an HMAC secret.
    public_pem: Vec<u8>,
}

impl TestKey {
    fn generate(kid: &str) -> TestKey {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("key.pem");
        let pem = pem.to_str().unwrap();
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            pem,
        ]);
        let pkcs8 = openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", pem, "-outform", "DER"]);
        let public_pem = openssl(&["pkey", "-in", pem, "-pubout"]);
        let pair = ring::rsa::KeyPair::from_pkcs8(&pkcs8).unwrap();
        TestKey {
            kid: kid.into(),
            pair,
            public_pem,
        }
    }

    fn jwk(&self) -> Value {
        let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(self.pair.public());
        json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e),
        })
    }

    /// An RS256 token with header `{"alg":"RS256","kid":<kid>}`.
    fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn signature_sha256(jwt: &str) -> String {
    let sig = URL_SAFE_NO_PAD
        .decode(jwt.rsplit('.').next().unwrap())
        .unwrap();
    tether_control::domain::token::sha256_hex(&sig)
}

struct Keys {
    google: TestKey,
    google_next: TestKey,
    cluster: TestKey,
    attacker: TestKey,
}

/// Made once per test binary (RSA key generation takes a moment).
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut made: Vec<TestKey> = std::thread::scope(|s| {
            let handles: Vec<_> = ["google-1", "google-2", "cluster-1", "google-1"]
                .into_iter()
                .map(|kid| s.spawn(move || TestKey::generate(kid)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The attacker's key claims the kid of Google's current key.
        let attacker = made.pop().unwrap();
        let cluster = made.pop().unwrap();
        let google_next = made.pop().unwrap();
        let google = made.pop().unwrap();
        Keys {
            google,
            google_next,
            cluster,
            attacker,
        }
    })
}

fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// A full-format Compute Engine identity token's claims.
fn gcp_claims(aud: &str) -> Value {
    json!({
        "iss": "https://accounts.google.com",
        "aud": aud,
        "azp": "112233445566778899000",
        "sub": "112233445566778899000",
        "email": EMAIL,
        "email_verified": true,
        "iat": NOW - 5,
        "exp": NOW + 3595,
        "google": {"compute_engine": {
            "project_id": PROJECT,
            "project_number": 123456789012u64,
            "zone": "europe-west1-b",
            "instance_id": "4242424242424242424",
            "instance_name": "appliance-7",
            "instance_creation_timestamp": NOW - 86_400,
        }},
    })
}

/// A projected ServiceAccount token's claims.
fn k8s_claims(ns: &str, sa: &str, aud: &str) -> Value {
    json!({
        "aud": [aud],
        "exp": NOW + 595,
        "iat": NOW - 5,
        "nbf": NOW - 5,
        "iss": ISSUER,
        "jti": "6f0e9a1c-8d2b-4c47-9a3e-2b7f4e1d0c55",
        "kubernetes.io": {
            "namespace": ns,
            "node": {"name": "node-1", "uid": "c3a1"},
            "pod": {"name": "tether-agent-5d8f", "uid": "9b2e"},
            "serviceaccount": {"name": sa, "uid": "77aa"},
        },
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
    })
}

fn set(v: &mut Value, key: &str, value: Value) {
    v.as_object_mut().unwrap().insert(key.into(), value);
}

fn remove(v: &mut Value, key: &str) {
    v.as_object_mut().unwrap().remove(key);
}

// ---------------------------------------------------------------------------------------
// A JWKS server on 127.0.0.1

#[derive(Clone)]
struct JwksServer {
    url: String,
    doc: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(doc: Value) -> JwksServer {
        let doc = Arc::new(Mutex::new(doc));
        let hits = Arc::new(AtomicUsize::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        let app = axum::Router::new()
            .route(
                "/oauth2/v3/certs",
                axum::routing::get(move || {
                    let (d, h) = (d.clone(), h.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        axum::Json(d.lock().unwrap().clone())
                    }
                }),
            )
            .route(
                "/broken",
                axum::routing::get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "down") }),
            )
            .route(
                "/huge",
                axum::routing::get(|| async {
                    let pad = "x".repeat(300 * 1024);
                    axum::Json(json!({"keys": [], "pad": pad}))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        JwksServer {
            url: format!("http://{addr}/oauth2/v3/certs"),
            doc,
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn publish(&self, doc: Value) {
        *self.doc.lock().unwrap() = doc;
    }

    fn base(&self) -> &str {
        self.url.trim_end_matches("/oauth2/v3/certs")
    }
}

async fn gcp_fixture() -> (JwksServer, GcpVerifier) {
    let k = keys();
    let server = JwksServer::start(jwks(&[&k.google])).await;
    let verifier = GcpVerifier::new(&GcpSettings {
        jwks_url: Some(server.url.clone()),
        ..GcpSettings::default()
    })
    .unwrap();
    (server, verifier)
}

async fn gcp(v: &GcpVerifier, jwt: &str, nonce: &str, now: i64) -> Result<Verified, ProofError> {
    v.verify(jwt, nonce, PROJECT, EMAIL, now).await
}

fn k8s_settings(clusters: Vec<K8sCluster>) -> K8sSettings {
    K8sSettings {
        clusters,
        ..K8sSettings::default()
    }
}

async fn k8s_fixture() -> (JwksServer, K8sVerifier) {
    let k = keys();
    let server = JwksServer::start(jwks(&[&k.cluster])).await;
    let verifier = K8sVerifier::new(&k8s_settings(vec![K8sCluster {
        issuer: ISSUER.into(),
        jwks_url: Some(server.url.clone()),
        ..K8sCluster::default()
    }]))
    .unwrap();
    (server, verifier)
}

async fn k8s(v: &K8sVerifier, jwt: &str, now: i64) -> Result<Verified, ProofError> {
    v.verify(jwt, ISSUER, NS, SA, now).await
}

#[track_caller]
fn assert_refused(r: Result<Verified, ProofError>, status: StatusCode, code: &str) {
    match r {
        Ok(v) => panic!("accepted ({v:?}), expected {code}"),
        Err(e) => {
            assert_eq!((status_of(e.kind), e.code), (status, code), "{e}");
            assert!(!e.message.is_empty());
        }
    }
}

const NONCE: &str = "5c1b0a3f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b";

// ---------------------------------------------------------------------------------------
// GCP

#[tokio::test]
async fn gcp_token_for_the_nonce_is_accepted() {
    let (server, v) = gcp_fixture().await;
    let jwt = keys().google.sign(&gcp_claims(NONCE));
    let ok = gcp(&v, &jwt, NONCE, NOW).await.unwrap();
    assert_eq!(
        ok,
        Verified {
            kind: "gcp",
            proof_id: signature_sha256(&jwt),
            remember_until: NOW + 3595 + 30,
        }
    );
    // The bare issuer form Google also uses, and an array audience.
    let mut claims = gcp_claims(NONCE);
    set(&mut claims, "iss", json!("accounts.google.com"));
    set(&mut claims, "aud", json!([NONCE]));
    let jwt = keys().google.sign(&claims);
    gcp(&v, &jwt, NONCE, NOW + 60).await.unwrap();
    assert_eq!(server.hits(), 1, "keys are cached");
}

#[tokio::test]
async fn gcp_token_must_carry_this_enrollments_nonce() {
    let (_server, v) = gcp_fixture().await;
    let other = "0".repeat(64);
    let jwt = keys().google.sign(&gcp_claims(&other));
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_wrong_audience",
    );
    let mut claims = gcp_claims(NONCE);
    set(&mut claims, "aud", json!(format!("https://{NONCE}")));
    let jwt = keys().google.sign(&claims);
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_wrong_audience",
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let (server, gv) = gcp_fixture().await;
    let header = json!({"alg": "none", "typ": "JWT", "kid": "google-1"});
    let unsigned = format!("{}.", signing_input(&header, &gcp_claims(NONCE)));
    assert_refused(
        gcp(&gv, &unsigned, NONCE, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_alg_not_allowed",
    );
    let header = json!({"alg": "None", "kid": "google-1"});
    let unsigned = format!("{}.", signing_input(&header, &gcp_claims(NONCE)));
    assert_refused(
        gcp(&gv, &unsigned, NONCE, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_alg_not_allowed",
    );
    assert_eq!(server.hits(), 0, "refused before any key is fetched");

    let (_server, kv) = k8s_fixture().await;
    let header = json!({"alg": "none", "kid": "cluster-1"});
    let unsigned = format!("{}.", signing_input(&header, &k8s_claims(NS, SA, "tether")));
    assert_refused(
        k8s(&kv, &unsigned, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_alg_not_allowed",
    );
}

#[tokio::test]
async fn hs256_keyed_with_the_public_key_is_refused() {
    let k = keys();
    let (_server, gv) = gcp_fixture().await;
    let (_server2, kv) = k8s_fixture().await;
    let n = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(k.google.pair.public()).n;
    let jwk_text = k.google.jwk().to_string();
    for secret in [&k.google.public_pem[..], &n[..], jwk_text.as_bytes()] {
        for alg in ["HS256", "HS384", "HS512"] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": "google-1"});
            let jwt = hs256(secret, &header, &gcp_claims(NONCE));
            assert_refused(
                gcp(&gv, &jwt, NONCE, NOW).await,
                StatusCode::BAD_REQUEST,
                "jwt_alg_not_allowed",
            );
        }
    }
    let header = json!({"alg": "HS256", "kid": "cluster-1"});
    let jwt = hs256(
        &k.cluster.public_pem,
        &header,
        &k8s_claims(NS, SA, "tether"),
    );
    assert_refused(
        k8s(&kv, &jwt, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_alg_not_allowed",
    );
    // Other asymmetric algorithms are refused too (RS256 only).
    for alg in ["RS384", "PS256", "ES256", "EdDSA"] {
        let header = json!({"alg": alg, "kid": "google-1"});
        let jwt = k.google.sign_with_header(&header, &gcp_claims(NONCE));
        assert_refused(
            gcp(&gv, &jwt, NONCE, NOW).await,
            StatusCode::BAD_REQUEST,
            "jwt_alg_not_allowed",
        );
    }
}

#[tokio::test]
async fn token_signed_by_another_key_under_a_known_kid_is_refused() {
    let (_server, v) = gcp_fixture().await;
    // `attacker` claims kid "google-1".
    let jwt = keys().attacker.sign(&gcp_claims(NONCE));
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_bad_signature",
    );
    // A genuine token whose claims were edited after signing.
    let jwt = keys().google.sign(&gcp_claims("x"));
    let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(gcp_claims(NONCE).to_string());
    assert_refused(
        gcp(&v, &parts.join("."), NONCE, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_bad_signature",
    );
}

#[tokio::test]
async fn unknown_kid_is_refused_after_one_refresh() {
    let k = keys();
    let (server, v) = gcp_fixture().await;
    gcp(&v, &k.google.sign(&gcp_claims(NONCE)), NONCE, NOW)
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);
    let header = json!({"alg": "RS256", "kid": "made-up"});
    let jwt = k.google.sign_with_header(&header, &gcp_claims(NONCE));
    // One minute later: the unknown kid triggers one refresh, which does not have it.
    let t = NOW + 60;
    assert_refused(
        gcp(&v, &jwt, NONCE, t).await,
        StatusCode::FORBIDDEN,
        "jwt_unknown_key",
    );
    assert_eq!(server.hits(), 2, "one refresh for the unknown kid");
    assert_refused(
        gcp(&v, &jwt, NONCE, t + 1).await,
        StatusCode::FORBIDDEN,
        "jwt_unknown_key",
    );
    assert_eq!(
        server.hits(),
        2,
        "no second refresh within jwks_min_refetch"
    );
    // No kid at all.
    let header = json!({"alg": "RS256"});
    let jwt = k.google.sign_with_header(&header, &gcp_claims(NONCE));
    assert_refused(
        gcp(&v, &jwt, NONCE, t + 2).await,
        StatusCode::FORBIDDEN,
        "jwt_unknown_key",
    );
}

#[tokio::test]
async fn random_kids_cannot_hammer_the_jwks_source() {
    let k = keys();
    let (server, v) = gcp_fixture().await;
    let v = Arc::new(v);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let v = v.clone();
        let header = json!({"alg": "RS256", "kid": format!("random-{i}")});
        let jwt = k.google.sign_with_header(&header, &gcp_claims(NONCE));
        tasks.push(tokio::spawn(async move {
            gcp(&v, &jwt, NONCE, NOW + i / 10).await
        }));
    }
    for t in tasks {
        assert_refused(t.await.unwrap(), StatusCode::FORBIDDEN, "jwt_unknown_key");
    }
    assert_eq!(server.hits(), 1, "50 random kids, one fetch");
    // After jwks_min_refetch (default 1 min) a random kid may refresh again, once.
    for i in 0..20 {
        let header = json!({"alg": "RS256", "kid": format!("again-{i}")});
        let jwt = k.google.sign_with_header(&header, &gcp_claims(NONCE));
        assert_refused(
            gcp(&v, &jwt, NONCE, NOW + 120).await,
            StatusCode::FORBIDDEN,
            "jwt_unknown_key",
        );
    }
    assert_eq!(server.hits(), 2);
    // The genuine key still works throughout, without fetching.
    gcp(&v, &k.google.sign(&gcp_claims(NONCE)), NONCE, NOW + 121)
        .await
        .unwrap();
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn rotated_google_key_is_picked_up_on_its_first_token() {
    let k = keys();
    let (server, v) = gcp_fixture().await;
    gcp(&v, &k.google.sign(&gcp_claims(NONCE)), NONCE, NOW)
        .await
        .unwrap();
    server.publish(jwks(&[&k.google, &k.google_next]));
    let jwt = k.google_next.sign(&gcp_claims(NONCE));
    gcp(&v, &jwt, NONCE, NOW + 60).await.unwrap();
    assert_eq!(server.hits(), 2);
    // A set older than jwks_max_age (1 h) is fetched again even for a known kid; a key
    // the issuer withdrew stops working then.
    server.publish(jwks(&[&k.google_next]));
    let jwt = k.google.sign(&gcp_claims(NONCE));
    gcp(&v, &jwt, NONCE, NOW + 600).await.unwrap();
    assert_eq!(server.hits(), 2, "still fresh");
    let mut claims = gcp_claims(NONCE);
    set(&mut claims, "exp", json!(NOW + 7200));
    let jwt = k.google.sign(&claims);
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW + 60 + 3600).await,
        StatusCode::FORBIDDEN,
        "jwt_unknown_key",
    );
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn expired_gcp_token_is_refused() {
    let (_server, v) = gcp_fixture().await;
    let jwt = keys().google.sign(&gcp_claims(NONCE));
    // Within the leeway (30 s) after exp: still accepted; one second later: not.
    gcp(&v, &jwt, NONCE, NOW + 3595 + 30).await.unwrap();
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW + 3595 + 31).await,
        StatusCode::FORBIDDEN,
        "jwt_expired",
    );
    // A token without exp is not a token this proof accepts.
    let mut claims = gcp_claims(NONCE);
    remove(&mut claims, "exp");
    assert_refused(
        gcp(&v, &keys().google.sign(&claims), NONCE, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_malformed",
    );
    // Nor one issued in the future.
    let mut claims = gcp_claims(NONCE);
    set(&mut claims, "iat", json!(NOW + 600));
    assert_refused(
        gcp(&v, &keys().google.sign(&claims), NONCE, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_not_yet_valid",
    );
}

#[tokio::test]
async fn gcp_token_from_another_issuer_is_refused() {
    let (_server, v) = gcp_fixture().await;
    for iss in [
        "https://evil.example",
        "https://accounts.google.com.evil",
        "",
    ] {
        let mut claims = gcp_claims(NONCE);
        set(&mut claims, "iss", json!(iss));
        assert_refused(
            gcp(&v, &keys().google.sign(&claims), NONCE, NOW).await,
            StatusCode::FORBIDDEN,
            "jwt_wrong_issuer",
        );
    }
}

#[tokio::test]
async fn gcp_appliance_cannot_present_another_project_or_service_account() {
    let (_server, v) = gcp_fixture().await;
    let k = keys();
    let mut wrong_project = gcp_claims(NONCE);
    wrong_project["google"]["compute_engine"]["project_id"] = json!("other-project");
    let mut wrong_email = gcp_claims(NONCE);
    set(
        &mut wrong_email,
        "email",
        json!("other@acme-fleet.iam.gserviceaccount.com"),
    );
    let mut unverified = gcp_claims(NONCE);
    set(&mut unverified, "email_verified", json!(false));
    let mut no_email = gcp_claims(NONCE);
    remove(&mut no_email, "email");
    // A standard-format token (no `google` claim) does not name the project.
    let mut standard = gcp_claims(NONCE);
    remove(&mut standard, "google");
    for claims in [wrong_project, wrong_email, unverified, no_email, standard] {
        assert_refused(
            gcp(&v, &k.google.sign(&claims), NONCE, NOW).await,
            StatusCode::FORBIDDEN,
            "gcp_identity_mismatch",
        );
    }
    // The same genuine token, checked against another appliance's binding.
    let jwt = k.google.sign(&gcp_claims(NONCE));
    assert_refused(
        v.verify(&jwt, NONCE, "other-project", EMAIL, NOW).await,
        StatusCode::FORBIDDEN,
        "gcp_identity_mismatch",
    );
    assert_refused(
        v.verify(&jwt, NONCE, PROJECT, "x@other.iam.gserviceaccount.com", NOW)
            .await,
        StatusCode::FORBIDDEN,
        "gcp_identity_mismatch",
    );
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let (server, v) = gcp_fixture().await;
    let good = keys().google.sign(&gcp_claims(NONCE));
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "abc".into(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.extra"),
        format!("!!!.{}.{}", parts[1], parts[2]),
        format!("{}.{}.", parts[0], parts[1]),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("[1,2]"),
            parts[1],
            parts[2]
        ),
        "a.".repeat(10_000),
    ];
    for jwt in &cases {
        assert_refused(
            gcp(&v, jwt, NONCE, NOW).await,
            StatusCode::BAD_REQUEST,
            "jwt_malformed",
        );
    }
    // Claims that are not what the issuer writes (signed, but `exp` is a string).
    let mut claims = gcp_claims(NONCE);
    set(&mut claims, "exp", json!("tomorrow"));
    assert_refused(
        gcp(&v, &keys().google.sign(&claims), NONCE, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_malformed",
    );
    // Critical header extensions are not understood, so refused.
    let header = json!({"alg": "RS256", "kid": "google-1", "crit": ["b64"], "b64": false});
    let jwt = keys().google.sign_with_header(&header, &gcp_claims(NONCE));
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_malformed",
    );
    assert!(server.hits() <= 1);
}

#[tokio::test]
async fn unreachable_key_source_is_a_502_and_is_not_hammered() {
    let server = JwksServer::start(jwks(&[&keys().google])).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let jwt = keys().google.sign(&gcp_claims(NONCE));
    for url in [
        format!("http://{closed}/certs"),
        format!("{}/broken", server.base()),
        format!("{}/huge", server.base()),
    ] {
        let v = GcpVerifier::new(&GcpSettings {
            jwks_url: Some(url.clone()),
            ..GcpSettings::default()
        })
        .unwrap();
        assert_refused(
            gcp(&v, &jwt, NONCE, NOW).await,
            StatusCode::BAD_GATEWAY,
            "jwks_unavailable",
        );
    }
    // A failed fetch counts for the rate limit too; once the source is back, the next
    // attempt after jwks_min_refetch succeeds.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("certs.json");
    let v = GcpVerifier::new(&GcpSettings {
        jwks_file: Some(file.clone()),
        ..GcpSettings::default()
    })
    .unwrap();
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW).await,
        StatusCode::BAD_GATEWAY,
        "jwks_unavailable",
    );
    std::fs::write(&file, jwks(&[&keys().google]).to_string()).unwrap();
    assert_refused(
        gcp(&v, &jwt, NONCE, NOW + 30).await,
        StatusCode::BAD_GATEWAY,
        "jwks_unavailable",
    );
    gcp(&v, &jwt, NONCE, NOW + 60).await.unwrap();
}

#[tokio::test]
async fn keys_from_a_file_are_reread_when_rotated() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("certs.json");
    std::fs::write(&file, jwks(&[&k.google]).to_string()).unwrap();
    let v = GcpVerifier::new(&GcpSettings {
        jwks_file: Some(file.clone()),
        ..GcpSettings::default()
    })
    .unwrap();
    let jwt = k.google.sign(&gcp_claims(NONCE));
    let ok = gcp(&v, &jwt, NONCE, NOW).await.unwrap();
    assert_eq!(ok.proof_id, signature_sha256(&jwt));
    let next = k.google_next.sign(&gcp_claims(NONCE));
    assert_refused(
        gcp(&v, &next, NONCE, NOW + 1).await,
        StatusCode::FORBIDDEN,
        "jwt_unknown_key",
    );
    std::fs::write(&file, jwks(&[&k.google, &k.google_next]).to_string()).unwrap();
    gcp(&v, &next, NONCE, NOW + 61).await.unwrap();

    // The k8s verifier reads a cluster's file the same way.
    let kfile = dir.path().join("cluster.json");
    std::fs::write(&kfile, jwks(&[&k.cluster]).to_string()).unwrap();
    let kv = K8sVerifier::new(&k8s_settings(vec![K8sCluster {
        issuer: ISSUER.into(),
        jwks_file: Some(kfile),
        ..K8sCluster::default()
    }]))
    .unwrap();
    k8s(&kv, &k.cluster.sign(&k8s_claims(NS, SA, "tether")), NOW)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Kubernetes

#[tokio::test]
async fn k8s_token_is_accepted_with_its_jti_as_proof_id() {
    let (server, v) = k8s_fixture().await;
    let jwt = keys().cluster.sign(&k8s_claims(NS, SA, "tether"));
    assert_eq!(
        k8s(&v, &jwt, NOW).await.unwrap(),
        Verified {
            kind: "k8s",
            proof_id: "6f0e9a1c-8d2b-4c47-9a3e-2b7f4e1d0c55".into(),
            remember_until: NOW + 595 + 30,
        }
    );
    // Without a jti, the proof id is the token's SHA-256.
    let mut claims = k8s_claims(NS, SA, "tether");
    remove(&mut claims, "jti");
    let jwt = keys().cluster.sign(&claims);
    assert_eq!(
        k8s(&v, &jwt, NOW).await.unwrap().proof_id,
        tether_control::domain::token::sha256_hex(jwt.as_bytes())
    );
    // A single-string audience, as some issuers write it.
    let mut claims = k8s_claims(NS, SA, "tether");
    set(&mut claims, "aud", json!("tether"));
    k8s(&v, &keys().cluster.sign(&claims), NOW).await.unwrap();
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn k8s_token_from_another_namespace_or_service_account_is_refused() {
    let (_server, v) = k8s_fixture().await;
    let k = keys();
    for claims in [
        k8s_claims("other", SA, "tether"),
        k8s_claims(NS, "default", "tether"),
    ] {
        assert_refused(
            k8s(&v, &k.cluster.sign(&claims), NOW).await,
            StatusCode::FORBIDDEN,
            "k8s_identity_mismatch",
        );
    }
    // `sub` and `kubernetes.io` must agree: neither alone is enough.
    let mut claims = k8s_claims(NS, SA, "tether");
    set(
        &mut claims,
        "sub",
        json!(format!("system:serviceaccount:other:{SA}")),
    );
    assert_refused(
        k8s(&v, &k.cluster.sign(&claims), NOW).await,
        StatusCode::FORBIDDEN,
        "k8s_identity_mismatch",
    );
    let mut claims = k8s_claims("other", SA, "tether");
    set(
        &mut claims,
        "sub",
        json!(format!("system:serviceaccount:{NS}:{SA}")),
    );
    assert_refused(
        k8s(&v, &k.cluster.sign(&claims), NOW).await,
        StatusCode::FORBIDDEN,
        "k8s_identity_mismatch",
    );
    let mut claims = k8s_claims(NS, SA, "tether");
    remove(&mut claims, "kubernetes.io");
    assert_refused(
        k8s(&v, &k.cluster.sign(&claims), NOW).await,
        StatusCode::FORBIDDEN,
        "k8s_identity_mismatch",
    );
}

#[tokio::test]
async fn k8s_token_for_another_audience_is_refused() {
    let (_server, v) = k8s_fixture().await;
    let k = keys();
    // The pod's default API token (audience: the API server) cannot enroll.
    for aud in [
        "https://kubernetes.default.svc.cluster.local",
        "vault",
        "Tether",
    ] {
        assert_refused(
            k8s(&v, &k.cluster.sign(&k8s_claims(NS, SA, aud)), NOW).await,
            StatusCode::FORBIDDEN,
            "jwt_wrong_audience",
        );
    }
}

#[tokio::test]
async fn k8s_token_must_be_fresh() {
    let (_server, v) = k8s_fixture().await;
    let k = keys();
    // Issued 11 minutes ago and valid for a day: stale (max_age 10 min).
    let mut claims = k8s_claims(NS, SA, "tether");
    set(&mut claims, "iat", json!(NOW - 660));
    set(&mut claims, "nbf", json!(NOW - 660));
    set(&mut claims, "exp", json!(NOW + 86_400));
    assert_refused(
        k8s(&v, &k.cluster.sign(&claims), NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_stale",
    );
    // 9 minutes old: fine.
    set(&mut claims, "iat", json!(NOW - 540));
    k8s(&v, &k.cluster.sign(&claims), NOW).await.unwrap();
    // No iat: cannot tell its age.
    remove(&mut claims, "iat");
    assert_refused(
        k8s(&v, &k.cluster.sign(&claims), NOW).await,
        StatusCode::BAD_REQUEST,
        "jwt_malformed",
    );
    // Expired.
    let jwt = k.cluster.sign(&k8s_claims(NS, SA, "tether"));
    assert_refused(
        k8s(&v, &jwt, NOW + 595 + 31).await,
        StatusCode::FORBIDDEN,
        "jwt_expired",
    );
    // Not yet valid.
    let mut claims = k8s_claims(NS, SA, "tether");
    set(&mut claims, "nbf", json!(NOW + 300));
    assert_refused(
        k8s(&v, &k.cluster.sign(&claims), NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_not_yet_valid",
    );
    // A shorter max_age from the config applies.
    let server = JwksServer::start(jwks(&[&k.cluster])).await;
    let strict = K8sVerifier::new(&K8sSettings {
        max_age: Duration::from_secs(60),
        ..k8s_settings(vec![K8sCluster {
            issuer: ISSUER.into(),
            jwks_url: Some(server.url.clone()),
            ..K8sCluster::default()
        }])
    })
    .unwrap();
    let jwt = k.cluster.sign(&k8s_claims(NS, SA, "tether"));
    k8s(&strict, &jwt, NOW + 55).await.unwrap();
    assert_refused(
        k8s(&strict, &jwt, NOW + 66).await,
        StatusCode::FORBIDDEN,
        "jwt_stale",
    );
}

#[tokio::test]
async fn k8s_issuer_must_be_the_recorded_and_a_configured_cluster() {
    let k = keys();
    // Two clusters that (badly) share a signing key: the signature alone cannot tell them
    // apart, `iss` must.
    let server = JwksServer::start(jwks(&[&k.cluster])).await;
    let v = K8sVerifier::new(&k8s_settings(vec![
        K8sCluster {
            issuer: ISSUER.into(),
            jwks_url: Some(server.url.clone()),
            ..K8sCluster::default()
        },
        K8sCluster {
            issuer: OTHER_ISSUER.into(),
            audience: "tether-eks".into(),
            jwks_url: Some(server.url.clone()),
            ..K8sCluster::default()
        },
    ]))
    .unwrap();
    let mut claims = k8s_claims(NS, SA, "tether");
    set(&mut claims, "iss", json!(OTHER_ISSUER));
    let jwt = k.cluster.sign(&claims);
    assert_refused(
        k8s(&v, &jwt, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_wrong_issuer",
    );
    // Recorded on the other cluster: that cluster's audience applies.
    assert_refused(
        v.verify(&jwt, OTHER_ISSUER, NS, SA, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_wrong_audience",
    );
    let mut claims = k8s_claims(NS, SA, "tether-eks");
    set(&mut claims, "iss", json!(OTHER_ISSUER));
    v.verify(&k.cluster.sign(&claims), OTHER_ISSUER, NS, SA, NOW)
        .await
        .unwrap();
    // An appliance recorded on a cluster control does not know.
    let jwt = k.cluster.sign(&k8s_claims(NS, SA, "tether"));
    assert_refused(
        v.verify(&jwt, "https://unknown.example", NS, SA, NOW).await,
        StatusCode::FORBIDDEN,
        "k8s_issuer_not_configured",
    );
    let none = K8sVerifier::new(&K8sSettings::default()).unwrap();
    assert_refused(
        k8s(&none, &jwt, NOW).await,
        StatusCode::FORBIDDEN,
        "k8s_issuer_not_configured",
    );
    // A token signed by a key of another issuer (Google's) is not this cluster's.
    let header = json!({"alg": "RS256", "kid": "google-1"});
    let jwt = k
        .google
        .sign_with_header(&header, &k8s_claims(NS, SA, "tether"));
    assert_refused(
        k8s(&v, &jwt, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_unknown_key",
    );
    let header = json!({"alg": "RS256", "kid": "cluster-1"});
    let jwt = k
        .google
        .sign_with_header(&header, &k8s_claims(NS, SA, "tether"));
    assert_refused(
        k8s(&v, &jwt, NOW).await,
        StatusCode::FORBIDDEN,
        "jwt_bad_signature",
    );
}

// ---------------------------------------------------------------------------------------
// Settings

#[test]
fn settings_parse_from_control_toml() {
    let text = r#"
trust_domain = "tether.test"

[proofs.gcp]
jwks_file = "/etc/tether/google-certs.json"
leeway = "10s"

[proofs.k8s]
max_age = "5m"

[[proofs.k8s.clusters]]
issuer = "https://kubernetes.default.svc"
jwks_url = "https://10.0.0.1/openid/v1/jwks"
jwks_ca_file = "/etc/tether/cluster-ca.pem"

[[proofs.k8s.clusters]]
issuer = "https://oidc.eks.eu-west-1.amazonaws.com/id/ABC"
audience = "tether-eu"
jwks_url = "https://oidc.eks.eu-west-1.amazonaws.com/id/ABC/keys"
"#;
    let cfg: tether_control::config::ControlConfig = toml::from_str(text).unwrap();
    let gcp = &cfg.proofs.gcp;
    assert_eq!(gcp.leeway, Duration::from_secs(10));
    assert_eq!(
        gcp.jwks_file.as_deref(),
        Some(Path::new("/etc/tether/google-certs.json"))
    );
    assert_eq!(gcp.jwks_min_refetch, Duration::from_secs(60));
    let k8s = &cfg.proofs.k8s;
    assert_eq!(k8s.max_age, Duration::from_secs(300));
    assert_eq!(k8s.clusters.len(), 2);
    assert_eq!(k8s.clusters[0].audience, "tether");
    assert_eq!(k8s.clusters[1].audience, "tether-eu");
    gcp.validate().unwrap();

    // Unknown fields are refused, not ignored.
    for bad in [
        "[proofs.gcp]\njwks_uri = \"https://x\"\n",
        "[proofs.k8s]\nmaxage = \"5m\"\n",
        "[[proofs.k8s.clusters]]\nissuer = \"https://x\"\njwks_url = \"https://x\"\naud = \"t\"\n",
        "[[proofs.k8s.clusters]]\njwks_url = \"https://x\"\n",
    ] {
        let text = format!("trust_domain = \"tether.test\"\n{bad}");
        assert!(
            toml::from_str::<tether_control::config::ControlConfig>(&text).is_err(),
            "{bad}"
        );
    }
    // The defaults round-trip through the file `init` writes.
    let text = toml::to_string_pretty(&tether_control::config::ControlConfig::default()).unwrap();
    let back: tether_control::config::ControlConfig = toml::from_str(&text).unwrap();
    assert_eq!(back.proofs.gcp, GcpSettings::default());
    assert_eq!(back.proofs.k8s, K8sSettings::default());
}

#[test]
fn unsafe_settings_are_refused_at_build() {
    let invalid = |s: &GcpSettings| GcpVerifier::new(s).unwrap_err().to_string();
    let both = GcpSettings {
        jwks_url: Some("https://x.example/certs".into()),
        jwks_file: Some("/tmp/certs.json".into()),
        ..GcpSettings::default()
    };
    assert!(invalid(&both).contains("proofs.gcp"), "{}", invalid(&both));
    let plain_http = GcpSettings {
        jwks_url: Some("http://keys.example.com/certs".into()),
        ..GcpSettings::default()
    };
    assert!(invalid(&plain_http).contains("https"));
    let no_rate_limit = GcpSettings {
        jwks_min_refetch: Duration::ZERO,
        ..GcpSettings::default()
    };
    assert!(invalid(&no_rate_limit).contains("jwks_min_refetch"));
    let huge_leeway = GcpSettings {
        leeway: Duration::from_secs(3600),
        ..GcpSettings::default()
    };
    assert!(invalid(&huge_leeway).contains("proofs.gcp.leeway"));
    let missing_ca = GcpSettings {
        jwks_url: Some("https://x.example/certs".into()),
        jwks_ca_file: Some("/nonexistent/ca.pem".into()),
        ..GcpSettings::default()
    };
    assert!(invalid(&missing_ca).contains("jwks_ca_file"));
    GcpVerifier::new(&GcpSettings::default()).expect("Google's URL by default");

    let k8s_invalid = |s: &K8sSettings| K8sVerifier::new(s).unwrap_err().to_string();
    let cluster = K8sCluster {
        issuer: ISSUER.into(),
        jwks_url: Some("https://x.example/jwks".into()),
        ..K8sCluster::default()
    };
    let no_source = k8s_settings(vec![K8sCluster {
        jwks_url: None,
        ..cluster.clone()
    }]);
    assert!(k8s_invalid(&no_source).contains("jwks_url or jwks_file"));
    let twice = k8s_settings(vec![cluster.clone(), cluster.clone()]);
    assert!(k8s_invalid(&twice).contains("twice"));
    let no_issuer = k8s_settings(vec![K8sCluster {
        issuer: String::new(),
        ..cluster.clone()
    }]);
    assert!(k8s_invalid(&no_issuer).contains("issuer"));
    let no_audience = k8s_settings(vec![K8sCluster {
        audience: String::new(),
        ..cluster.clone()
    }]);
    assert!(k8s_invalid(&no_audience).contains("audience"));
    let ageless = K8sSettings {
        max_age: Duration::ZERO,
        ..k8s_settings(vec![cluster.clone()])
    };
    assert!(k8s_invalid(&ageless).contains("max_age"));
    K8sVerifier::new(&k8s_settings(vec![cluster])).unwrap();
}
