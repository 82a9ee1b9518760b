//! The AWS platform proof, verifier side, against moto's STS and IAM (`scripts/moto`;
//! `./scripts/test` exports `TETHER_TEST_KMS_URL`, the same server serves STS and IAM).
//!
//! Roles are created with IAM `CreateRole`, credentials come from STS `AssumeRole`, and
//! proofs are signed with `aws-sigv4` exactly as the agent signs them. moto answers
//! `GetCallerIdentity` with the assumed-role ARN of the key that signed; it does not check
//! signatures (real STS does), so every check that must not depend on STS — nonce signed,
//! host allowed — is shown to refuse before any connection. Local fake STS servers (listed
//! in the allowlist) stand in where the subject is how control treats the answer: too
//! large, too slow, a refusal, a redirect, and what is forwarded.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use axum::http::StatusCode;
use tether_api::enroll::AwsProof;
use tether_control::domain::proof::aws::{AwsSettings, AwsVerifier};
use tether_control::domain::proof::Verified;
use tether_control::domain::Error as ProofError;
use tether_control::http::status_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GCI: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";
const ACCOUNT: &str = "123456789012";
/// Bounds every verify call: a hang fails the test instead of stalling the suite.
const NO_HANG: Duration = Duration::from_secs(20);

fn moto_url() -> String {
    std::env::var("TETHER_TEST_KMS_URL").unwrap_or_else(|_| {
        panic!(
            "TETHER_TEST_KMS_URL is not set: the AWS proof tests need the moto emulator \
             (it serves STS and IAM too); run ./scripts/test (or `. scripts/moto` before \
             cargo test)"
        )
    })
}

/// The operator's credentials in moto (any key is the default account's).
fn admin() -> Credentials {
    Credentials::new("AKIAADMINEXAMPLE", "admin-secret", None, None, "test")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn authority(url: &str) -> String {
    let u = reqwest::Url::parse(url).unwrap();
    match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap()),
        None => u.host_str().unwrap().to_owned(),
    }
}

/// SigV4-sign a form POST to `url` for `service`: headers `host`, `content-type` and
/// `signed`, plus what the signer adds. `unsigned` headers are added afterwards.
fn sign_post(
    url: &str,
    service: &str,
    creds: &Credentials,
    body: &str,
    signed: &[(&str, &str)],
    unsigned: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let host = authority(url);
    let mut headers: Vec<(&str, &str)> = vec![("host", &host), ("content-type", FORM)];
    headers.extend_from_slice(signed);
    let identity = creds.clone().into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name(service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let request = SignableRequest::new(
        "POST",
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body.as_bytes()),
    )
    .unwrap();
    let (instructions, _) = sign(request, &params).unwrap().into_parts();
    let mut out: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in instructions.headers() {
        out.insert(k.to_owned(), v.to_owned());
    }
    for (k, v) in unsigned {
        out.insert(k.to_string(), v.to_string());
    }
    out
}

/// A signed IAM/STS call to moto; the answer's text, or a panic with it.
async fn moto_call(service: &str, creds: &Credentials, body: &str) -> String {
    let url = format!("{}/", moto_url());
    let headers = sign_post(&url, service, creds, body, &[], &[]);
    let mut req = http().post(&url).body(body.to_owned());
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.expect("moto answers");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(
        status.is_success(),
        "moto {service} {body}: {status} {text}"
    );
    text
}

/// The text of the first `<tag>` in `xml`.
fn xml_field(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>")).unwrap();
    xml[start..end].to_owned()
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A fresh role (unique name: moto is shared by test runs); its ARN.
async fn create_role(prefix: &str, path: &str) -> String {
    let name = format!("{prefix}-{:016x}", fastrand::u64(..));
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;
    let xml = moto_call(
        "iam",
        &admin(),
        &form(&[
            ("Action", "CreateRole"),
            ("Version", "2010-05-08"),
            ("RoleName", &name),
            ("Path", path),
            ("AssumeRolePolicyDocument", policy),
        ]),
    )
    .await;
    let arn = xml_field(&xml, "Arn");
    assert_eq!(arn, format!("arn:aws:iam::{ACCOUNT}:role{path}{name}"));
    arn
}

/// Temporary credentials of `role_arn` from STS AssumeRole.
async fn assume_role(role_arn: &str) -> Credentials {
    let xml = moto_call(
        "sts",
        &admin(),
        &form(&[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", role_arn),
            ("RoleSessionName", "i-0123456789abcdef0"),
        ]),
    )
    .await;
    Credentials::new(
        xml_field(&xml, "AccessKeyId"),
        xml_field(&xml, "SecretAccessKey"),
        Some(xml_field(&xml, "SessionToken")),
        None,
        "assumed",
    )
}

/// A proof as the agent makes it: GetCallerIdentity to `url`, nonce signed.
fn proof(url: &str, creds: &Credentials, nonce: &str) -> AwsProof {
    AwsProof {
        method: "POST".into(),
        url: url.into(),
        headers: sign_post(url, "sts", creds, GCI, &[("x-tether-nonce", nonce)], &[]),
        body: GCI.into(),
    }
}

fn http() -> reqwest::Client {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::new()
}

fn verifier(endpoints: &[&str], timeout: Duration) -> AwsVerifier {
    AwsVerifier::new(&AwsSettings {
        sts_endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
        timeout,
        ..AwsSettings::default()
    })
    .unwrap()
}

fn moto_verifier() -> AwsVerifier {
    verifier(&[&moto_url()], Duration::from_secs(10))
}

async fn verify(
    v: &AwsVerifier,
    p: &AwsProof,
    nonce: &str,
    role: &str,
) -> Result<Verified, ProofError> {
    tokio::time::timeout(NO_HANG, v.verify(p, nonce, role))
        .await
        .expect("the verifier answers in bounded time")
}

#[track_caller]
fn assert_refused(r: Result<Verified, ProofError>, status: StatusCode, code: &str) {
    match r {
        Ok(v) => panic!("accepted, expected {code}: {v:?}"),
        Err(e) => assert_eq!((status_of(e.kind), e.code), (status, code), "{e}"),
    }
}

/// The signature of a proof (its Authorization's `Signature=`).
fn signature(p: &AwsProof) -> String {
    let auth = &p.headers["authorization"];
    auth.rsplit("Signature=").next().unwrap().to_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A TCP listener nothing must connect to.
struct Tripwire(std::net::TcpListener);

impl Tripwire {
    fn new() -> Tripwire {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        Tripwire(l)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    #[track_caller]
    fn assert_untouched(&self) {
        match self.0.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("a connection was made to the tripwire from {peer}"),
            Err(e) => panic!("tripwire: {e}"),
        }
    }
}

/// How a fake STS answers.
#[derive(Clone)]
enum Answer {
    /// Status and body (with a content-length, or close-delimited).
    Reply {
        status: u16,
        extra: String,
        body: String,
        content_length: bool,
    },
    /// Read the request, then say nothing.
    Silent,
    /// Headers, then one byte every 200 ms, forever.
    Trickle,
}

/// A local HTTP server listed as an STS endpoint; counts connections and keeps requests.
struct FakeSts {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeSts {
    async fn start(answer: Answer) -> FakeSts {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (answer, r) = (answer.clone(), r.clone());
                tokio::spawn(async move {
                    let request = read_request(&mut sock).await;
                    r.lock().unwrap().push(request);
                    match answer {
                        Answer::Reply {
                            status,
                            extra,
                            body,
                            content_length,
                        } => {
                            let mut head = format!("HTTP/1.1 {status} X\r\n{extra}");
                            if content_length {
                                head.push_str(&format!("content-length: {}\r\n", body.len()));
                            }
                            head.push_str("connection: close\r\n\r\n");
                            let _ = sock.write_all(head.as_bytes()).await;
                            let _ = sock.write_all(body.as_bytes()).await;
                            let _ = sock.shutdown().await;
                        }
                        Answer::Silent => {
                            let mut sink = [0u8; 1024];
                            while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                        }
                        Answer::Trickle => {
                            let _ = sock
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n<")
                                .await;
                            let mut tick = tokio::time::interval(Duration::from_millis(200));
                            loop {
                                tick.tick().await;
                                if sock.write_all(b" ").await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        FakeSts {
            addr,
            connections,
            requests,
        }
    }

    async fn reply(status: u16, body: &str) -> FakeSts {
        FakeSts::start(Answer::Reply {
            status,
            extra: String::new(),
            body: body.into(),
            content_length: true,
        })
        .await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Head and body of one HTTP/1.1 request (content-length framed).
async fn read_request(sock: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf).into_owned();
            }
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).into_owned(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn gci_answer(arn: &str) -> String {
    format!(
        "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <GetCallerIdentityResult><Arn>{arn}</Arn><UserId>AROAEXAMPLE:s</UserId>\
         <Account>{ACCOUNT}</Account></GetCallerIdentityResult>\
         <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>\
         </GetCallerIdentityResponse>"
    )
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn assumed_role_proof_is_accepted_by_moto_sts() {
    let role = create_role("tether-app", "/tether/").await;
    let creds = assume_role(&role).await;
    let v = moto_verifier();
    let url = format!("{}/", moto_url());
    let nonce = "a1b2c3d4e5f6";
    let p = proof(&url, &creds, nonce);
    let before = now();
    let verified = verify(&v, &p, nonce, &role).await.expect("accepted");
    assert_eq!(verified.kind, "aws");
    assert_eq!(verified.proof_id, sha256_hex(signature(&p).as_bytes()));
    assert!(
        (before + 900..=now() + 900).contains(&verified.remember_until),
        "remembered for the 15-minute presign lifetime: {verified:?}"
    );
    // The same proof has the same id (the store refuses its second use).
    let again = verify(&v, &p, nonce, &role).await.expect("accepted");
    assert_eq!(again.proof_id, verified.proof_id);

    // A role recorded with its path matches the assumed-role ARN (which has none), and so
    // does the same role recorded without the path.
    let name = role.rsplit('/').next().unwrap();
    let without_path = format!("arn:aws:iam::{ACCOUNT}:role/{name}");
    let p2 = proof(&url, &creds, "other-nonce");
    verify(&v, &p2, "other-nonce", &without_path)
        .await
        .expect("accepted without the path");
    // moto's own answer for these credentials, for the record.
    let xml = moto_call("sts", &creds, GCI).await;
    assert_eq!(
        xml_field(&xml, "Arn"),
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/{name}/i-0123456789abcdef0")
    );
}

#[tokio::test]
async fn enrollment_nonce_must_be_inside_the_signed_headers() {
    let role = create_role("tether-nonce", "/").await;
    let creds = assume_role(&role).await;
    let url = format!("{}/", moto_url());
    let nonce = "n-signed";
    // A fake STS listed next to moto sees whether anything is sent.
    let fake = FakeSts::reply(
        200,
        &gci_answer(&format!("arn:aws:sts::{ACCOUNT}:assumed-role/x/s")),
    )
    .await;
    let v = verifier(&[&moto_url(), &fake.url()], Duration::from_secs(10));

    // Signed without the nonce, the header added afterwards: STS (real or moto) would
    // accept this request, so control must refuse it itself.
    let mut p = AwsProof {
        method: "POST".into(),
        url: url.clone(),
        headers: sign_post(&url, "sts", &creds, GCI, &[], &[("x-tether-nonce", nonce)]),
        body: GCI.into(),
    };
    assert_refused(
        verify(&v, &p, nonce, &role).await,
        StatusCode::BAD_REQUEST,
        "aws_nonce_not_signed",
    );
    // No nonce at all.
    p.headers.remove("x-tether-nonce");
    assert_refused(
        verify(&v, &p, nonce, &role).await,
        StatusCode::BAD_REQUEST,
        "aws_nonce_not_signed",
    );
    // The nonce signed under another header name.
    let p = AwsProof {
        headers: sign_post(
            &url,
            "sts",
            &creds,
            GCI,
            &[("x-other-nonce", nonce)],
            &[("x-tether-nonce", nonce)],
        ),
        ..p
    };
    let r = verify(&v, &p, nonce, &role).await;
    assert!(
        matches!(&r, Err(e) if e.code == "aws_nonce_not_signed"),
        "{r:?}"
    );
    // The same, sent to the fake: nothing is forwarded.
    let fake_url = format!("{}/", fake.url());
    let p = AwsProof {
        method: "POST".into(),
        url: fake_url.clone(),
        headers: sign_post(
            &fake_url,
            "sts",
            &creds,
            GCI,
            &[],
            &[("x-tether-nonce", nonce)],
        ),
        body: GCI.into(),
    };
    assert_refused(
        verify(&v, &p, nonce, &role).await,
        StatusCode::BAD_REQUEST,
        "aws_nonce_not_signed",
    );
    assert_eq!(fake.connections(), 0, "a refused proof is never forwarded");
}

#[tokio::test]
async fn a_proof_for_another_nonce_is_refused() {
    let role = create_role("tether-other-nonce", "/").await;
    let creds = assume_role(&role).await;
    let v = moto_verifier();
    let p = proof(&format!("{}/", moto_url()), &creds, "nonce-of-yesterday");
    assert_refused(
        verify(&v, &p, "nonce-of-today", &role).await,
        StatusCode::FORBIDDEN,
        "aws_nonce_mismatch",
    );
    // Sanity: the same proof with its own nonce is fine.
    verify(&v, &p, "nonce-of-yesterday", &role)
        .await
        .expect("accepted with its own nonce");
}

#[tokio::test]
async fn a_proof_for_a_host_not_allowed_is_refused_without_a_connection() {
    let role = create_role("tether-host", "/").await;
    let creds = assume_role(&role).await;
    let nonce = "n-host";
    let trap = Tripwire::new();
    let port = trap.port();
    let moto = moto_url();
    let moto_port = reqwest::Url::parse(&moto).unwrap().port().unwrap();
    let v = moto_verifier();

    for url in [
        // The tripwire itself, by IP and by name.
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        // moto's host with the tripwire's port; moto's port with another scheme.
        format!("https://127.0.0.1:{moto_port}/"),
        // User info naming the allowed host, then the tripwire.
        format!("http://127.0.0.1:{moto_port}@127.0.0.1:{port}/"),
        format!("http://user:pass@127.0.0.1:{port}/"),
    ] {
        let p = proof(&url, &creds, nonce);
        assert_refused(
            verify(&v, &p, nonce, &role).await,
            StatusCode::BAD_REQUEST,
            "aws_host_not_allowed",
        );
    }
    trap.assert_untouched();

    // Even with the tripwire allowed, user info in the URL is refused.
    let with_trap = verifier(
        &[&moto, &format!("http://127.0.0.1:{port}")],
        Duration::from_secs(2),
    );
    let p = proof(&format!("http://user@127.0.0.1:{port}/"), &creds, nonce);
    assert_refused(
        verify(&with_trap, &p, nonce, &role).await,
        StatusCode::BAD_REQUEST,
        "aws_host_not_allowed",
    );
    // An allowed URL whose host header names the tripwire is refused too.
    let mut p = proof(&format!("{moto}/"), &creds, nonce);
    p.headers.insert("host".into(), format!("127.0.0.1:{port}"));
    assert_refused(
        verify(&v, &p, nonce, &role).await,
        StatusCode::BAD_REQUEST,
        "aws_host_header_mismatch",
    );
    trap.assert_untouched();
}

#[tokio::test]
async fn a_redirect_from_sts_is_not_followed() {
    let role = create_role("tether-redirect", "/").await;
    let creds = assume_role(&role).await;
    let trap = Tripwire::new();
    let fake = FakeSts::start(Answer::Reply {
        status: 307,
        extra: format!("location: http://127.0.0.1:{}/\r\n", trap.port()),
        body: String::new(),
        content_length: true,
    })
    .await;
    let v = verifier(&[&fake.url()], Duration::from_secs(5));
    let p = proof(&format!("{}/", fake.url()), &creds, "n");
    assert_refused(
        verify(&v, &p, "n", &role).await,
        StatusCode::FORBIDDEN,
        "aws_sts_refused",
    );
    assert_eq!(fake.connections(), 1);
    trap.assert_untouched();
}

#[tokio::test]
async fn another_role_or_a_user_is_refused() {
    let recorded = create_role("tether-recorded", "/").await;
    let other = create_role("tether-intruder", "/").await;
    let v = moto_verifier();
    let url = format!("{}/", moto_url());

    let intruder = assume_role(&other).await;
    let p = proof(&url, &intruder, "n1");
    let r = verify(&v, &p, "n1", &recorded).await;
    assert_refused(r.clone(), StatusCode::FORBIDDEN, "aws_role_mismatch");
    assert!(r.unwrap_err().message.contains("tether-intruder"));

    // Long-term keys: moto names the caller `arn:aws:sts::ACCT:user/moto`, an IAM user.
    let p = proof(&url, &admin(), "n2");
    assert_refused(
        verify(&v, &p, "n2", &recorded).await,
        StatusCode::FORBIDDEN,
        "aws_role_mismatch",
    );

    // Same role name in another account.
    let name = recorded.rsplit('/').next().unwrap();
    let creds = assume_role(&recorded).await;
    let p = proof(&url, &creds, "n3");
    assert_refused(
        verify(
            &v,
            &p,
            "n3",
            &format!("arn:aws:iam::210987654321:role/{name}"),
        )
        .await,
        StatusCode::FORBIDDEN,
        "aws_role_mismatch",
    );
    // A recorded binding that is not a role ARN is control's fault, said before any call.
    assert_refused(
        verify(&v, &p, "n3", &format!("arn:aws:iam::{ACCOUNT}:user/{name}")).await,
        StatusCode::INTERNAL_SERVER_ERROR,
        "aws_binding_invalid",
    );
}

#[tokio::test]
async fn only_get_caller_identity_is_forwarded() {
    let role = create_role("tether-action", "/").await;
    let creds = assume_role(&role).await;
    let fake = FakeSts::reply(
        200,
        &gci_answer(&format!("arn:aws:sts::{ACCOUNT}:assumed-role/x/s")),
    )
    .await;
    let v = verifier(&[&moto_url(), &fake.url()], Duration::from_secs(5));
    let nonce = "n-action";

    for url in [format!("{}/", moto_url()), format!("{}/", fake.url())] {
        // A properly signed AssumeRole (a call with side effects) is not forwarded.
        let body = form(&[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", &role),
            ("RoleSessionName", "x"),
        ]);
        let p = AwsProof {
            method: "POST".into(),
            url: url.clone(),
            headers: sign_post(
                &url,
                "sts",
                &creds,
                &body,
                &[("x-tether-nonce", nonce)],
                &[],
            ),
            body,
        };
        assert_refused(
            verify(&v, &p, nonce, &role).await,
            StatusCode::BAD_REQUEST,
            "aws_wrong_action",
        );
        // GetCallerIdentity with a second action appended.
        let body = format!("{GCI}&Action=AssumeRole");
        let p = AwsProof {
            headers: sign_post(
                &url,
                "sts",
                &creds,
                &body,
                &[("x-tether-nonce", nonce)],
                &[],
            ),
            body,
            ..p
        };
        assert_refused(
            verify(&v, &p, nonce, &role).await,
            StatusCode::BAD_REQUEST,
            "aws_wrong_action",
        );
        // GET with the action in the query string.
        let mut p = proof(&url, &creds, nonce);
        p.method = "GET".into();
        assert_refused(
            verify(&v, &p, nonce, &role).await,
            StatusCode::BAD_REQUEST,
            "aws_proof_malformed",
        );
        let q = format!("{url}?{GCI}");
        let p = proof(&q, &creds, nonce);
        assert_refused(
            verify(&v, &p, nonce, &role).await,
            StatusCode::BAD_REQUEST,
            "aws_proof_malformed",
        );
        // Signed for IAM instead of STS.
        let p = AwsProof {
            method: "POST".into(),
            url: url.clone(),
            headers: sign_post(&url, "iam", &creds, GCI, &[("x-tether-nonce", nonce)], &[]),
            body: GCI.into(),
        };
        assert_refused(
            verify(&v, &p, nonce, &role).await,
            StatusCode::BAD_REQUEST,
            "aws_proof_malformed",
        );
    }
    assert_eq!(fake.connections(), 0);
}

#[tokio::test]
async fn only_the_signed_headers_reach_sts() {
    let fake_arn = format!("arn:aws:sts::{ACCOUNT}:assumed-role/app/i-1");
    let fake = FakeSts::reply(200, &gci_answer(&fake_arn)).await;
    let v = verifier(&[&fake.url()], Duration::from_secs(5));
    let creds = Credentials::new("ASIAEXAMPLE", "secret", Some("token".into()), None, "t");
    let url = format!("{}/", fake.url());
    let mut p = proof(&url, &creds, "n");
    p.headers
        .insert("x-forwarded-for".into(), "10.0.0.1".into());
    p.headers.insert("cookie".into(), "session=1".into());
    p.headers.insert(
        "x-amz-target".into(),
        "AWSSecurityTokenServiceV20110615.AssumeRole".into(),
    );
    verify(&v, &p, "n", &format!("arn:aws:iam::{ACCOUNT}:role/app"))
        .await
        .expect("accepted");
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    assert_eq!(body, GCI);
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("POST / HTTP/1.1"));
    let mut names: Vec<String> = lines
        .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "user-agent",
            "x-amz-date",
            "x-amz-security-token",
            "x-tether-nonce"
        ],
        "{head}"
    );
    assert!(head.contains(&format!("host: {}", fake.addr)), "{head}");
}

#[tokio::test]
async fn sts_answers_that_are_refusals_or_garbage_are_refused() {
    let role = format!("arn:aws:iam::{ACCOUNT}:role/app");
    let creds = Credentials::new("ASIAEXAMPLE", "secret", Some("token".into()), None, "t");
    let cases = [
        (
            FakeSts::reply(
                403,
                "<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code>\
                 <Message>no</Message></Error></ErrorResponse>",
            )
            .await,
            StatusCode::FORBIDDEN,
            "aws_sts_refused",
        ),
        (
            FakeSts::reply(500, "oops").await,
            StatusCode::FORBIDDEN,
            "aws_sts_refused",
        ),
        // moto's answer to a request without credentials: S3's bucket list.
        (
            FakeSts::reply(
                200,
                "<ListAllMyBucketsResult><Buckets/></ListAllMyBucketsResult>",
            )
            .await,
            StatusCode::BAD_GATEWAY,
            "aws_sts_bad_response",
        ),
        (
            FakeSts::reply(200, "not xml at all").await,
            StatusCode::BAD_GATEWAY,
            "aws_sts_bad_response",
        ),
    ];
    for (fake, status, code) in cases {
        let v = verifier(&[&fake.url()], Duration::from_secs(5));
        let p = proof(&format!("{}/", fake.url()), &creds, "n");
        assert_refused(verify(&v, &p, "n", &role).await, status, code);
        assert_eq!(fake.connections(), 1);
    }
}

#[tokio::test]
async fn oversized_sts_answers_are_refused() {
    let role = format!("arn:aws:iam::{ACCOUNT}:role/app");
    let creds = Credentials::new("ASIAEXAMPLE", "secret", Some("token".into()), None, "t");
    // A valid answer padded past 64 KiB, announced by content-length or not.
    let padded = gci_answer(&format!("arn:aws:sts::{ACCOUNT}:assumed-role/app/s")).replace(
        "<ResponseMetadata>",
        &format!("<Pad>{}</Pad><ResponseMetadata>", "x".repeat(100 * 1024)),
    );
    for content_length in [true, false] {
        let fake = FakeSts::start(Answer::Reply {
            status: 200,
            extra: String::new(),
            body: padded.clone(),
            content_length,
        })
        .await;
        let v = verifier(&[&fake.url()], Duration::from_secs(5));
        let p = proof(&format!("{}/", fake.url()), &creds, "n");
        let r = verify(&v, &p, "n", &role).await;
        assert_refused(r.clone(), StatusCode::BAD_GATEWAY, "aws_sts_bad_response");
        assert!(
            r.unwrap_err().message.contains("65536"),
            "content-length {content_length}"
        );
    }
    // The same answer under the limit is accepted (the limit is what refused it).
    let small = FakeSts::reply(
        200,
        &gci_answer(&format!("arn:aws:sts::{ACCOUNT}:assumed-role/app/s")),
    )
    .await;
    let v = verifier(&[&small.url()], Duration::from_secs(5));
    let p = proof(&format!("{}/", small.url()), &creds, "n");
    verify(&v, &p, "n", &role).await.expect("accepted");
}

#[tokio::test]
async fn silent_or_slow_sts_hits_the_time_limit() {
    let role = format!("arn:aws:iam::{ACCOUNT}:role/app");
    let creds = Credentials::new("ASIAEXAMPLE", "secret", Some("token".into()), None, "t");
    for answer in [Answer::Silent, Answer::Trickle] {
        let fake = FakeSts::start(answer).await;
        let v = verifier(&[&fake.url()], Duration::from_millis(500));
        let p = proof(&format!("{}/", fake.url()), &creds, "n");
        assert_refused(
            verify(&v, &p, "n", &role).await,
            StatusCode::BAD_GATEWAY,
            "aws_sts_unreachable",
        );
        assert_eq!(fake.connections(), 1);
    }
    // Nothing listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let v = verifier(&[&format!("http://{closed}")], Duration::from_secs(2));
    let p = proof(&format!("http://{closed}/"), &creds, "n");
    assert_refused(
        verify(&v, &p, "n", &role).await,
        StatusCode::BAD_GATEWAY,
        "aws_sts_unreachable",
    );
}
