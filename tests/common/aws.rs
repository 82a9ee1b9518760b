//! AWS for end-to-end tests: moto's IAM and STS (`scripts/moto`; `./scripts/test` exports
//! `TETHER_TEST_KMS_URL`) and `tether-agent enroll --proof aws` with AssumeRole
//! credentials in its environment.
//!
//! The fixture's own IAM/STS calls (CreateRole, AssumeRole) carry a placeholder SigV4
//! `Authorization` naming an access key: moto reads the key but checks no signature, and
//! this package has no signer of its own. What is under test — the agent's proof — is
//! really signed (`aws-sigv4` in the agent).

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use super::{bin, http};

pub const ACCOUNT: &str = "123456789012";

pub fn moto_url() -> String {
    std::env::var("TETHER_TEST_KMS_URL").unwrap_or_else(|_| {
        panic!(
            "TETHER_TEST_KMS_URL is not set: the AWS enrollment test needs the moto emulator \
             (it serves STS and IAM); run ./scripts/test (or `. scripts/moto` before cargo test)"
        )
    })
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> String {
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

/// An IAM/STS call to moto as the operator (see the module docs); the answer's text.
pub async fn moto_call(service: &str, body: &str) -> String {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential=AKIAADMINEXAMPLE/20240101/us-east-1/{service}/aws4_request, \
         SignedHeaders=content-type;host, Signature={}",
        "0".repeat(64)
    );
    let resp = http()
        .post(format!("{}/", moto_url()))
        .header("authorization", auth)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .expect("moto answers");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(
        status.is_success(),
        "moto {service} {body}: {status} {text}"
    );
    text
}

/// The text of the first `<tag>` in `xml`.
pub fn xml_field(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>")).unwrap();
    xml[start..end].to_owned()
}

/// A fresh role under `/appliances/` (unique: moto is shared by test runs); its ARN.
pub async fn create_role(prefix: &str) -> String {
    let name = format!("{prefix}-{:016x}", fastrand::u64(..));
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;
    let xml = moto_call(
        "iam",
        &form(&[
            ("Action", "CreateRole"),
            ("Version", "2010-05-08"),
            ("RoleName", &name),
            ("Path", "/appliances/"),
            ("AssumeRolePolicyDocument", policy),
        ]),
    )
    .await;
    let arn = xml_field(&xml, "Arn");
    assert_eq!(
        arn,
        format!("arn:aws:iam::{ACCOUNT}:role/appliances/{name}")
    );
    arn
}

/// AssumeRole credentials as the environment variables of the standard chain.
pub async fn assume_role(role_arn: &str) -> Vec<(&'static str, String)> {
    let xml = moto_call(
        "sts",
        &form(&[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", role_arn),
            ("RoleSessionName", "i-0123456789abcdef0"),
        ]),
    )
    .await;
    vec![
        ("AWS_ACCESS_KEY_ID", xml_field(&xml, "AccessKeyId")),
        ("AWS_SECRET_ACCESS_KEY", xml_field(&xml, "SecretAccessKey")),
        ("AWS_SESSION_TOKEN", xml_field(&xml, "SessionToken")),
    ]
}

/// `tether-agent enroll --proof aws`; Ok(stdout) or Err(stderr). The environment holds
/// only the given credentials: no profile files, no instance metadata.
pub fn enroll_aws(
    control_url: &str,
    root: &Path,
    id: &str,
    sts_url: &str,
    creds: &[(&str, String)],
    state: &Path,
) -> Result<String, String> {
    let mut cmd = Command::new(bin("tether-agent"));
    cmd.args([
        "enroll",
        "--control",
        control_url,
        "--id",
        id,
        "--proof",
        "aws",
        "--aws-sts-url",
        sts_url,
        "--aws-region",
        "us-east-1",
        "--ca",
    ])
    .arg(root)
    .arg("--state-dir")
    .arg(state);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_CONFIG_FILE", "/nonexistent/aws/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws/credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in creds {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
