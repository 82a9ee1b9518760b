//! GCP and Kubernetes enrollment end to end with the real binaries: `tether-control init`,
//! `[proofs.gcp]` / `[proofs.k8s]` written into its `control.toml`, `appliance register`
//! with a platform binding, `serve`; then `tether-agent enroll --proof gcp` against a
//! metadata server on 127.0.0.1 that stands in for Google's (it mints an RS256 identity
//! token for the audience the agent asks for, with a key whose JWKS it also serves), and
//! `tether-agent enroll --proof k8s` with a projected-token file signed by a test cluster
//! key. And the refusals: a replayed ServiceAccount token, another namespace, another
//! project.
//!
//! Keys are made with `openssl`, tokens signed with ring: nothing here shares code with
//! the verifier.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::control::{control, serve, ControlProc};
use common::{bin, TRUST_DOMAIN};
use serde_json::{json, Value};
const PROJECT: &str = "acme-fleet";
const EMAIL: &str = "appliance@acme-fleet.iam.gserviceaccount.com";
const ISSUER: &str = "https://oidc.cluster.test/id/one";
const NS: &str = "fleet";
const SA: &str = "tether-agent";

// ---------------------------------------------------------------------------------------
// Processes

/// `tether-agent enroll` with `proof_args`; Ok(stdout) or Err(stderr).
fn agent_enroll(
    control: &ControlProc,
    root: &Path,
    id: &str,
    proof_args: &[&str],
    state: &Path,
) -> Result<String, String> {
    let out = Command::new(bin("tether-agent"))
        .args(["enroll", "--control", &control.url(), "--id", id, "--ca"])
        .arg(root)
        .arg("--state-dir")
        .arg(state)
        .args(proof_args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `state.json` of an enrolled agent.
fn enrolled_state(state: &Path) -> Value {
    let text = std::fs::read_to_string(state.join("state.json")).expect("state.json written");
    serde_json::from_str(&text).unwrap()
}

/// Replace every `[proofs...]` table of `control.toml` with `proofs_toml`.
fn set_proofs(data: &Path, proofs_toml: &str) {
    let path = data.join("control.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut kept = String::new();
    let mut in_proofs = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            let name = t.trim_start_matches('[');
            in_proofs = name.starts_with("proofs.") || name.starts_with("proofs]");
        }
        if !in_proofs {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept.push_str(proofs_toml);
    std::fs::write(&path, kept).unwrap();
}

// ---------------------------------------------------------------------------------------
// Keys and tokens

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

struct TestKey {
    kid: String,
    pair: ring::rsa::KeyPair,
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
        TestKey {
            kid: kid.into(),
            pair: ring::rsa::KeyPair::from_pkcs8(&pkcs8).unwrap(),
        }
    }

    fn jwks(&self) -> Value {
        let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(self.pair.public());
        json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": b64url(&c.n), "e": b64url(&c.e),
        }]})
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", b64url(&sig))
    }
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
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

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A projected ServiceAccount token, issued now, valid 10 minutes.
fn k8s_token(key: &TestKey, ns: &str, sa: &str, jti: &str) -> String {
    let now = now();
    key.sign(&json!({
        "aud": ["tether"],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": jti,
        "kubernetes.io": {
            "namespace": ns,
            "pod": {"name": "tether-agent-0", "uid": "5c1b"},
            "serviceaccount": {"name": sa, "uid": "9f3e"},
        },
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
    }))
}

// ---------------------------------------------------------------------------------------
// The stand-in for Google: a metadata server and a JWKS endpoint on 127.0.0.1

const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

/// What the metadata server saw: (path, query, `Metadata-Flavor` header).
type Seen = Arc<Mutex<Vec<(String, HashMap<String, String>, Option<String>)>>>;

struct FakeGoogle {
    addr: SocketAddr,
    seen: Seen,
}

impl FakeGoogle {
    /// Serve until the test process ends; identity tokens name `project`.
    fn start(key: Arc<TestKey>, project: &'static str) -> FakeGoogle {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = handle(stream, &key, project, &log);
            }
        });
        FakeGoogle { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn identity_requests(&self) -> Vec<(HashMap<String, String>, Option<String>)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, ..)| p == IDENTITY_PATH)
            .map(|(_, q, h)| (q.clone(), h.clone()))
            .collect()
    }

    fn jwks_requests(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, ..)| p == "/oauth2/v3/certs")
            .count()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request, one answer, then close.
fn handle(stream: TcpStream, key: &TestKey, project: &str, seen: &Seen) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut flavor = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("metadata-flavor") {
                flavor = Some(value.trim().to_owned());
            }
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: HashMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    seen.lock()
        .unwrap()
        .push((path.to_owned(), query.clone(), flavor.clone()));
    let (status, body) = match path {
        IDENTITY_PATH if flavor.as_deref() != Some("Google") => {
            ("403 Forbidden", "missing Metadata-Flavor".to_owned())
        }
        IDENTITY_PATH => match query.get("audience") {
            Some(aud) if query.get("format").map(String::as_str) == Some("full") => {
                let now = now();
                let token = key.sign(&json!({
                    "iss": "https://accounts.google.com",
                    "aud": aud,
                    "azp": "112233445566778899000",
                    "sub": "112233445566778899000",
                    "email": EMAIL,
                    "email_verified": true,
                    "iat": now,
                    "exp": now + 3600,
                    "google": {"compute_engine": {
                        "project_id": project,
                        "project_number": 123456789012u64,
                        "zone": "europe-west1-b",
                        "instance_id": "4242424242424242424",
                        "instance_name": "appliance-7",
                        "instance_creation_timestamp": now - 86_400,
                    }},
                }));
                ("200 OK", token)
            }
            _ => ("400 Bad Request", "audience and format=full needed".into()),
        },
        "/oauth2/v3/certs" => ("200 OK", key.jwks().to_string()),
        _ => ("404 Not Found", "not found".into()),
    };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    // Drain anything left so the close is clean.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = stream.read(&mut [0u8; 512]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tests

struct Setup {
    tmp: tempfile::TempDir,
    data: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("control");
        control(&[
            "init",
            "--data-dir",
            data.to_str().unwrap(),
            "--trust-domain",
            TRUST_DOMAIN,
        ]);
        Setup { tmp, data }
    }

    fn register(&self, id: &str, binding: &[&str]) {
        let mut args = vec!["appliance", "register", "--data-dir"];
        args.push(self.data.to_str().unwrap());
        args.push(id);
        args.extend_from_slice(binding);
        control(&args);
    }

    fn root(&self) -> PathBuf {
        self.data.join("ca").join("root.pem")
    }

    fn state(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

#[test]
fn gcp_appliance_enrolls_with_an_identity_token_for_its_nonce() {
    let setup = Setup::new();
    let key = Arc::new(TestKey::generate("google-1"));
    let google = FakeGoogle::start(key.clone(), PROJECT);
    set_proofs(
        &setup.data,
        &format!(
            "[proofs.gcp]\njwks_url = \"{}/oauth2/v3/certs\"\nleeway = \"10s\"\n",
            google.url()
        ),
    );
    setup.register(
        "gcp-1",
        &["--gcp-project", PROJECT, "--gcp-service-account", EMAIL],
    );
    setup.register(
        "gcp-2",
        &[
            "--gcp-project",
            "another-project",
            "--gcp-service-account",
            EMAIL,
        ],
    );
    let control = serve(&setup.data);
    let gcp_args = ["--proof", "gcp", "--gcp-metadata-url"];
    let metadata = google.url();
    let args: Vec<&str> = gcp_args
        .iter()
        .copied()
        .chain([metadata.as_str()])
        .collect();

    let state = setup.state("agent-gcp-1");
    let out = agent_enroll(&control, &setup.root(), "gcp-1", &args, &state)
        .unwrap_or_else(|e| panic!("gcp-1 should enroll: {e}"));
    assert!(out.contains("enrolled gcp-1"), "{out}");
    assert_eq!(enrolled_state(&state)["appliance_id"], "gcp-1");
    // The agent asked the metadata server the documented way: header, full format, and a
    // fresh nonce as audience.
    let asked = google.identity_requests();
    assert_eq!(asked.len(), 1);
    let (query, flavor) = &asked[0];
    assert_eq!(flavor.as_deref(), Some("Google"));
    assert_eq!(query.get("format").map(String::as_str), Some("full"));
    let nonce = query.get("audience").expect("audience");
    assert!(nonce.len() >= 32, "{nonce}");
    assert_eq!(
        google.jwks_requests(),
        1,
        "control fetched Google's keys once"
    );

    // Enrolling again asks for a new token (new nonce) and works; the keys are cached.
    let state2 = setup.state("agent-gcp-1-again");
    agent_enroll(&control, &setup.root(), "gcp-1", &args, &state2).unwrap();
    let asked = google.identity_requests();
    assert_ne!(asked[0].0.get("audience"), asked[1].0.get("audience"));
    assert_eq!(google.jwks_requests(), 1);

    // The same instance cannot enroll an appliance bound to another project.
    let err = agent_enroll(
        &control,
        &setup.root(),
        "gcp-2",
        &args,
        &setup.state("agent-gcp-2"),
    )
    .expect_err("another project must be refused");
    assert!(err.contains("403 gcp_identity_mismatch"), "{err}");
    assert!(!setup.state("agent-gcp-2").join("state.json").exists());
    assert!(control.warned("gcp_identity_mismatch"));
}

#[test]
fn k8s_appliance_enrolls_once_per_service_account_token() {
    let setup = Setup::new();
    let key = TestKey::generate("cluster-1");
    let jwks_file = setup.data.join("cluster-one-jwks.json");
    std::fs::write(&jwks_file, key.jwks().to_string()).unwrap();
    set_proofs(
        &setup.data,
        &format!(
            "[proofs.k8s]\nmax_age = \"10m\"\n\n[[proofs.k8s.clusters]]\nissuer = \"{ISSUER}\"\n\
             audience = \"tether\"\njwks_file = \"{}\"\n",
            jwks_file.display()
        ),
    );
    let binding = [
        "--k8s-issuer",
        ISSUER,
        "--k8s-namespace",
        NS,
        "--k8s-service-account",
        SA,
    ];
    setup.register("k8s-1", &binding);
    let control = serve(&setup.data);
    let token_file = setup.tmp.path().join("token");
    let token_path = token_file.to_str().unwrap();
    let args = ["--proof", "k8s", "--k8s-token-file", token_path];

    std::fs::write(&token_file, k8s_token(&key, NS, SA, "jti-0001")).unwrap();
    let state = setup.state("agent-k8s-1");
    let out = agent_enroll(&control, &setup.root(), "k8s-1", &args, &state)
        .unwrap_or_else(|e| panic!("k8s-1 should enroll: {e}"));
    assert!(out.contains("enrolled k8s-1"), "{out}");
    assert_eq!(enrolled_state(&state)["appliance_id"], "k8s-1");

    // The same token again (the agent asks for a fresh nonce; the token cannot carry it):
    // refused, single use.
    let replay_state = setup.state("agent-k8s-1-replay");
    let err = agent_enroll(&control, &setup.root(), "k8s-1", &args, &replay_state)
        .expect_err("a replayed token must be refused");
    assert!(err.contains("409 proof_replayed"), "{err}");
    assert!(!replay_state.join("state.json").exists());
    assert!(control.warned("proof_replayed"));

    // A token of the same cluster for another namespace.
    std::fs::write(&token_file, k8s_token(&key, "other", SA, "jti-0002")).unwrap();
    let err = agent_enroll(&control, &setup.root(), "k8s-1", &args, &replay_state)
        .expect_err("another namespace must be refused");
    assert!(err.contains("403 k8s_identity_mismatch"), "{err}");
    assert!(control.warned("k8s_identity_mismatch"));

    // The kubelet rotated the token: it enrolls again.
    std::fs::write(&token_file, k8s_token(&key, NS, SA, "jti-0003")).unwrap();
    agent_enroll(&control, &setup.root(), "k8s-1", &args, &replay_state).unwrap();
    assert_eq!(enrolled_state(&replay_state)["appliance_id"], "k8s-1");
}

#[tokio::test]
async fn an_appliance_whose_certificate_expired_offline_enrolls_again_by_itself() {
    let setup = Setup::new();
    let key = TestKey::generate("cluster-1");
    let jwks_file = setup.data.join("cluster-one-jwks.json");
    std::fs::write(&jwks_file, key.jwks().to_string()).unwrap();
    set_proofs(
        &setup.data,
        &format!(
            "[proofs.k8s]\nmax_age = \"10m\"\n\n[[proofs.k8s.clusters]]\nissuer = \"{ISSUER}\"\n\
             audience = \"tether\"\njwks_file = \"{}\"\n",
            jwks_file.display()
        ),
    );
    // Certificates of 3 s, so one can expire while the appliance is "offline".
    common::control::merge_config(&setup.data, "[certificates]\nappliance = \"3s\"\n");
    setup.register(
        "k8s-1",
        &[
            "--k8s-issuer",
            ISSUER,
            "--k8s-namespace",
            NS,
            "--k8s-service-account",
            SA,
        ],
    );
    let control = serve(&setup.data);
    let token_file = setup.tmp.path().join("token");
    std::fs::write(&token_file, k8s_token(&key, NS, SA, "jti-offline-1")).unwrap();
    let state = setup.state("agent-k8s-1");
    let args = [
        "--proof",
        "k8s",
        "--k8s-token-file",
        token_file.to_str().unwrap(),
    ];
    agent_enroll(&control, &setup.root(), "k8s-1", &args, &state).unwrap();
    let first = tether_agent::Credentials::load(&state).unwrap();
    let wait_ms = (first.not_after_ms() - now() * 1000 + 500).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;

    // Back online with an expired certificate and a token the kubelet rotated meanwhile:
    // the agent enrolls again on its own (no broker needed to see it).
    std::fs::write(&token_file, k8s_token(&key, NS, SA, "jti-offline-2")).unwrap();
    let unreachable: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let _agent = common::AgentProc::start(&state, &[unreachable], &[]);
    let again = common::wait_for(Duration::from_secs(20), || async {
        let c = tether_agent::Credentials::load(&state).ok()?;
        (c.fingerprint() != first.fingerprint()).then_some(c)
    })
    .await
    .expect("the agent enrolled again with a fresh Kubernetes token");
    assert_eq!(again.appliance_id(), "k8s-1");
    let shown = control_show(&setup.data, "k8s-1");
    assert!(shown.contains(again.fingerprint()), "{shown}");
}

fn control_show(data: &Path, id: &str) -> String {
    control(&[
        "appliance",
        "show",
        "--data-dir",
        data.to_str().unwrap(),
        id,
    ])
}
