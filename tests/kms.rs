//! The KMS-backed CA end to end: `tether-control init --kms` against the moto emulator
//! (started by `./scripts/test`, URL in `TETHER_TEST_KMS_URL`), `serve`, a real agent
//! enrolls, its chain verifies with `openssl verify`, and it connects to a real broker.
//! The CA keys exist only in KMS: the data directory holds no private CA key.

mod common;

use std::process::Command;

use common::control::*;
use common::*;

#[tokio::test]
async fn kms_ca_enrolls_an_appliance_whose_chain_openssl_verifies() {
    let url = std::env::var("TETHER_TEST_KMS_URL").unwrap_or_else(|_| {
        panic!(
            "TETHER_TEST_KMS_URL is not set: this test needs the moto emulator; run \
             ./scripts/test (or `. scripts/moto` before cargo test)"
        )
    });
    // The children (init, serve) reach moto with the standard AWS chain.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::remove_var("AWS_SESSION_TOKEN");
    let fleet = Fleet::with_init(
        &[
            "--kms",
            "--kms-region",
            "us-east-1",
            "--kms-endpoint-url",
            &url,
        ],
        "",
    );

    // No CA private key on disk.
    for entry in std::fs::read_dir(fleet.data.join("ca")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            !text.contains("PRIVATE KEY")
                || path
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("control"),
            "{} holds a private key",
            path.display()
        );
    }

    let state = fleet.data.parent().unwrap().join("agent-app-1");
    fleet
        .enroll("app-1", &fleet.token("app-1"), &state)
        .expect("enrolled through the KMS CA");

    // An independent verifier accepts the chain for client authentication.
    let chain = std::fs::read_to_string(state.join("client.cert.pem")).unwrap();
    // The file is PEM: leaf block, then intermediate block.
    let blocks: Vec<String> = chain
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| format!("{}\n", b.trim()))
        .collect();
    assert_eq!(blocks.len(), 2, "leaf then intermediate");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("leaf.pem"), &blocks[0]).unwrap();
    std::fs::write(dir.path().join("inter.pem"), &blocks[1]).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&fleet.root)
        .arg("-untrusted")
        .arg(dir.path().join("inter.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .expect("openssl is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains(": OK"),
        "openssl verify: {text}"
    );

    // And the broker admits it.
    let (broker, _) = fleet.broker("b1", "");
    let _agent = AgentProc::start(&state, &[broker.quic], &[]);
    let row = broker.wait_session("app-1").await;
    assert_eq!(
        row["fingerprint"],
        tether_agent::Credentials::load(&state)
            .unwrap()
            .fingerprint()
    );
}
