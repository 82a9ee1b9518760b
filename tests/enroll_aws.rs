//! AWS enrollment end to end with the real binaries and moto's STS (`scripts/moto`;
//! `./scripts/test` exports `TETHER_TEST_KMS_URL`): `tether-control init`, `[proofs.aws]
//! sts_endpoints = [moto]`, `appliance register --aws-role`, `serve`; then `tether-agent
//! enroll --proof aws` with AssumeRole credentials in its environment (the standard
//! credential chain picks them up) signs GetCallerIdentity with the nonce, and control
//! checks it through moto.
//!
//! The moto fixture (roles, AssumeRole) lives in `common/aws.rs`.

mod common;

use common::aws::{assume_role, create_role, enroll_aws, moto_url};
use common::control::{control, serve};
use common::TRUST_DOMAIN;

#[tokio::test]
async fn an_appliance_enrolls_with_its_instance_role_and_only_with_it() {
    let moto = moto_url();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("control");
    let d = data.to_str().unwrap();
    control(&["init", "--data-dir", d, "--trust-domain", TRUST_DOMAIN]);
    // Control may send proofs to moto only.
    let mut cfg = tether_control::config::ControlConfig::load(&data).unwrap();
    cfg.proofs.aws.sts_endpoints = vec![moto.clone()];
    cfg.save(&data).unwrap();
    let saved = std::fs::read_to_string(data.join("control.toml")).unwrap();
    assert!(saved.contains("[proofs.aws]"), "{saved}");

    let role = create_role("appliance-fleet").await;
    let other_role = create_role("appliance-other").await;
    control(&[
        "appliance",
        "register",
        "--data-dir",
        d,
        "aws-1",
        "--aws-role",
        &role,
    ]);
    control(&[
        "appliance",
        "register",
        "--data-dir",
        d,
        "aws-2",
        "--aws-role",
        &other_role,
    ]);
    let root = data.join("ca").join("root.pem");
    let proc = serve(&data);
    let url = format!("https://127.0.0.1:{}", proc.addr.port());
    let creds = assume_role(&role).await;

    // The appliance running as `role` enrolls.
    let state = tmp.path().join("agent-aws-1");
    let out = enroll_aws(&url, &root, "aws-1", &format!("{moto}/"), &creds, &state)
        .unwrap_or_else(|e| panic!("aws-1 enrolls: {e}"));
    assert!(out.contains("enrolled aws-1"), "{out}");
    let issued = tether_agent::Credentials::load(&state).unwrap();
    assert_eq!(issued.appliance_id(), "aws-1");
    assert_eq!(issued.trust_domain(), TRUST_DOMAIN);
    let shown = control(&["appliance", "show", "--data-dir", d, "aws-1"]);
    assert!(
        shown.contains(issued.fingerprint()),
        "control recorded the fingerprint: {shown}"
    );

    // The same credentials cannot enroll the appliance bound to another role.
    let err = enroll_aws(
        &url,
        &root,
        "aws-2",
        &format!("{moto}/"),
        &creds,
        &tmp.path().join("agent-aws-2"),
    )
    .unwrap_err();
    assert!(err.contains("403 aws_role_mismatch"), "{err}");
    assert!(!tmp.path().join("agent-aws-2").join("state.json").exists());

    // A proof signed for an STS endpoint control is not configured for is refused, and
    // control never connects there.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("http://{}/", trap.local_addr().unwrap());
    let err = enroll_aws(
        &url,
        &root,
        "aws-1",
        &trap_url,
        &creds,
        &tmp.path().join("agent-trap"),
    )
    .unwrap_err();
    assert!(err.contains("400 aws_host_not_allowed"), "{err}");
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "control connected to a host that is not an STS endpoint"
    );

    // Without any credentials the agent says so and sends nothing.
    let err = enroll_aws(
        &url,
        &root,
        "aws-1",
        &format!("{moto}/"),
        &[],
        &tmp.path().join("agent-nocreds"),
    )
    .unwrap_err();
    assert!(err.contains("cannot load AWS credentials"), "{err}");
}
