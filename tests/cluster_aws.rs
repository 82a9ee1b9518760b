//! The AWS flow end to end with the real binaries on 127.0.0.1 and moto's IAM and STS
//! (`scripts/moto`; `./scripts/test` exports `TETHER_TEST_KMS_URL`): an appliance
//! registered with `--aws-role` enrolls with `tether-agent enroll --proof aws`, connects
//! through one of two brokers, runs commands with `tether exec` (output streamed while the
//! command runs), is revoked (its session closes, every broker refuses its certificate),
//! and comes back only with a fresh AWS proof.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::aws::{assume_role, create_role, enroll_aws, moto_url};
use common::cluster::*;
use common::{bin, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_flow_across_two_brokers() {
    let moto = moto_url();
    let mut c = Cluster::new(&format!("[proofs.aws]\nsts_endpoints = [\"{moto}\"]\n"));
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;

    let role = create_role("e2e-fleet").await;
    c.tether(&[
        "appliance",
        "register",
        "aws-1",
        "--aws-role",
        &role,
        "--tenant",
        "acme",
    ])
    .expect("register aws-1 bound to its role");
    let state = c.tmp().join("state-aws-1");
    let sts = format!("{moto}/");
    let out = enroll_aws(
        &c.fleet.url(),
        &c.fleet.root,
        "aws-1",
        &sts,
        &assume_role(&role).await,
        &state,
    )
    .unwrap_or_else(|e| panic!("aws-1 enrolls with its role: {e}"));
    assert!(out.contains("enrolled aws-1"), "{out}");
    let first = tether_agent::Credentials::load(&state).unwrap();

    // Connected through either broker; control knows which.
    let agent = c.agent(&state, &[b1.quic, b2.quic]);
    let conn = c.wait_connected("aws-1", None).await;
    assert_eq!(conn["fingerprint"], first.fingerprint(), "{conn}");
    let (holder, other) = if conn["broker"] == "edge-1" {
        (&b1, &b2)
    } else {
        (&b2, &b1)
    };
    holder.wait_session("aws-1").await;

    // A command: its exit code, stdout and stderr apart.
    let (code, out, err) = c.exec(&["aws-1", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!((code, out.as_str()), (7, "out\n"), "stderr {err:?}");
    assert!(err.contains("err"), "{err}");
    // Output arrives while the command still runs.
    let mut live = Command::new(bin("tether"))
        .args([
            "exec",
            "aws-1",
            "--",
            "sh",
            "-c",
            "echo first; sleep 2; echo second",
        ])
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(live.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        live.try_wait().unwrap().is_none(),
        "the first line came only after the command ended"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert_eq!(live.wait().unwrap().code(), Some(0));

    // Revoked: the broker holding it closes the session.
    let start = Instant::now();
    c.tether(&["appliance", "revoke", "aws-1"]).expect("revoke");
    let took = time_until(start, || async {
        !holder
            .sessions()
            .await
            .iter()
            .any(|s| s["appliance_id"] == "aws-1")
    })
    .await;
    eprintln!(
        "revoke-to-close for aws-1 on {}: {:.1} ms",
        conn["broker"],
        took.as_secs_f64() * 1e3
    );
    drop(agent);
    wait_for(Duration::from_secs(10), || async {
        c.show("aws-1")["connection"].is_null().then_some(())
    })
    .await
    .expect("control forgot aws-1's session");
    let (code, _, err) = c.exec(&["aws-1", "--", "true"]);
    assert_eq!(code, 125, "a revoked appliance runs nothing: {err}");
    assert!(err.contains("appliance_revoked"), "{err}");

    // Every broker refuses the revoked certificate.
    for broker in [holder, other] {
        c.assert_refused(&state, broker, "aws-1").await;
    }

    // A fresh proof (new AssumeRole credentials) enrolls it again, with a new certificate.
    let out = enroll_aws(
        &c.fleet.url(),
        &c.fleet.root,
        "aws-1",
        &sts,
        &assume_role(&role).await,
        &state,
    )
    .unwrap_or_else(|e| panic!("aws-1 re-enrolls with a fresh proof: {e}"));
    assert!(out.contains("enrolled aws-1"), "{out}");
    let second = tether_agent::Credentials::load(&state).unwrap();
    assert_ne!(second.fingerprint(), first.fingerprint());
    let _agent = c.agent(&state, &[b2.quic, b1.quic]);
    let conn = c.wait_connected("aws-1", None).await;
    assert_eq!(conn["fingerprint"], second.fingerprint(), "{conn}");
    let (code, out, err) = c.exec(&["aws-1", "--", "echo", "back"]);
    assert_eq!((code, out.as_str()), (0, "back\n"), "{err}");
}
