//! `tether ops verify`, the offline check either party runs, attacked the way a forger
//! would: one flipped byte of stdout, an exit code changed in the manifest, a manifest
//! binding another approval (re-signed with the appliance key), a manifest signed by
//! another appliance, an approval by an unpinned key. Each exits 1 naming the check; an
//! intact set exits 0; a missing file exits 2. The customer key is made by stock
//! `ssh-keygen`, which also signs the approval, and the auditor's recipe with stock
//! `ssh-keygen -Y verify`, `sha256sum` and `jq` (README) reaches the same verdicts.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::bin;
use tether_ops::approval::{ApplianceRef, Approval, ExecSpec, Expected};
use tether_ops::manifest::{
    ApprovalRef, Manifest, Outcome, Program, RunAs, StreamDigest, MANIFEST_TYPE,
};
use tether_ops::ssh_key::{rand_core::OsRng, Algorithm, PrivateKey};
use tether_ops::{sha256_hex, Phase};

const STDOUT: &[u8] = b"worker restarted\n";

struct Case {
    dir: tempfile::TempDir,
    appliance_key: PrivateKey,
}

impl Case {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything a real run leaves: the customer's key and approvers.toml, the signed
    /// approval, the appliance's signed manifest and the output.
    fn new() -> Case {
        let mut c = Case {
            dir: tempfile::tempdir().unwrap(),
            appliance_key: PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap(),
        };
        let key = c.path("customer");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
                .arg(&key),
        );
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        std::fs::write(
            c.path("approvers.toml"),
            format!(
                "[[key]]\nid = \"acme-ops\"\npublic_key = \"{}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2030-01-01T00:00:00Z\"\n",
                public.trim()
            ),
        )
        .unwrap();
        let appliance_key = c.appliance_key.clone();
        let appliance = ApplianceRef {
            id: "app-0001".into(),
            trust_domain: "acme.example".into(),
            key: appliance_key.public_key().to_openssh().unwrap(),
        };
        let exec = ExecSpec {
            kind: tether_proto::CommandKind::Exec,
            argv: vec!["systemctl".into(), "restart".into(), "worker".into()],
            env_allowlist: vec![],
            deadline_ms: 60_000,
            stdin_sha256: String::new(),
        };
        let now = 1_790_000_000_000;
        let approval = Approval::plan(
            &Expected {
                appliance: &appliance,
                phase: Phase::Operate,
                exec: &exec,
            },
            "req_1",
            "INC-4411",
            "alice@acme",
            now,
            now + 900_000,
        );
        let bytes = approval.to_bytes();
        std::fs::write(c.path("approval.json"), &bytes).unwrap();
        run_ok(
            Command::new("ssh-keygen")
                .args(["-Y", "sign", "-n", "tether-approval-v1", "-f"])
                .arg(&key)
                .arg(c.path("approval.json")),
        );
        std::fs::write(c.path("stdout.bin"), STDOUT).unwrap();
        std::fs::write(c.path("stderr.bin"), b"").unwrap();
        let manifest = Manifest {
            doc_type: MANIFEST_TYPE.into(),
            appliance,
            seq: 7,
            prev_sha256: sha256_hex(b"manifest 6"),
            request_id: "req_1".into(),
            command_id: 3,
            approval: Some(ApprovalRef {
                sha256: sha256_hex(&bytes),
                approval_id: approval.approval_id.clone(),
                signer: "SHA256:x".into(),
            }),
            phase: Some(Phase::Operate),
            policy_sha256: sha256_hex(b"policy"),
            exec,
            program: Some(Program {
                path: "/usr/bin/systemctl".into(),
                sha256: sha256_hex(b"systemctl"),
            }),
            run_as: Some(RunAs {
                user: "tether-ops".into(),
                uid: 990,
            }),
            started_ms: now + 1_000,
            finished_ms: now + 2_000,
            outcome: Outcome::Exited(0),
            stdout: StreamDigest::of(STDOUT),
            stderr: StreamDigest::of(b""),
            agent_version: "0.1.0".into(),
        };
        c.write_manifest(&manifest, &appliance_key);
        c.appliance_key = appliance_key;
        c
    }

    fn write_manifest(&self, m: &Manifest, key: &PrivateKey) {
        let (bytes, sig) = m.sign(key).unwrap();
        std::fs::write(self.path("m.json"), bytes).unwrap();
        std::fs::write(self.path("m.json.sig"), sig).unwrap();
    }

    fn manifest(&self) -> Manifest {
        Manifest::parse(&std::fs::read(self.path("m.json")).unwrap()).unwrap()
    }

    /// `tether ops verify` on this case: (exit code, stdout).
    fn verify(&self) -> (i32, String) {
        let out = Command::new(bin("tether"))
            .args(["ops", "verify", "--approval"])
            .arg(self.path("approval.json"))
            .arg("--manifest")
            .arg(self.path("m.json"))
            .arg("--customer-keys")
            .arg(self.path("approvers.toml"))
            .arg("--stdout")
            .arg(self.path("stdout.bin"))
            .arg("--stderr")
            .arg(self.path("stderr.bin"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_invalid(c: &Case, check: &str) {
    let (code, text) = c.verify();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with(&format!("invalid: {check}:")),
        "expected {check}: {text}"
    );
}

#[test]
fn an_intact_operation_verifies() {
    let c = Case::new();
    let (code, text) = c.verify();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("valid: approval") && text.contains("stdout, stderr"),
        "{text}"
    );
}

#[test]
fn one_flipped_byte_of_stdout_is_caught() {
    let c = Case::new();
    let mut out = STDOUT.to_vec();
    out[0] ^= 1;
    std::fs::write(c.path("stdout.bin"), out).unwrap();
    assert_invalid(&c, "stdout");
}

#[test]
fn an_exit_code_changed_in_the_manifest_is_caught() {
    let c = Case::new();
    let text = std::fs::read_to_string(c.path("m.json")).unwrap();
    std::fs::write(
        c.path("m.json"),
        text.replace("{\"exited\":0}", "{\"exited\":1}"),
    )
    .unwrap();
    assert_invalid(&c, "manifest_signature");
}

#[test]
fn a_manifest_binding_another_approval_is_caught_even_signed_by_the_appliance() {
    // The appliance key itself re-signs (a compromised appliance, or the vendor replaying
    // an old manifest): the hash binding still fails.
    let c = Case::new();
    let mut m = c.manifest();
    m.approval.as_mut().unwrap().sha256 = sha256_hex(b"another approval");
    let other = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
    c.write_manifest(&m, &c.appliance_key);
    assert_invalid(&c, "approval_hash");
    // Signed by a key that is not the approval's appliance key (another appliance).
    c.write_manifest(&m, &other);
    assert_invalid(&c, "manifest_signature");
}

#[test]
fn an_approval_by_an_unpinned_key_is_caught() {
    let c = Case::new();
    let key = c.path("vendor");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key),
    );
    std::fs::remove_file(c.path("approval.json.sig")).unwrap();
    run_ok(
        Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", "tether-approval-v1", "-f"])
            .arg(&key)
            .arg(c.path("approval.json")),
    );
    assert_invalid(&c, "approval_key");
}

#[test]
fn a_missing_file_is_a_usage_error() {
    let c = Case::new();
    std::fs::remove_file(c.path("m.json.sig")).unwrap();
    let (code, text) = c.verify();
    assert_eq!(code, 2, "{text}");
}

/// The auditor's recipe from README.md, with no Tether binary: stock `ssh-keygen -Y
/// verify` for both signatures, `sha256sum` and `jq` for the bindings.
#[test]
fn the_stock_tools_recipe_reaches_the_same_verdict() {
    let c = Case::new();
    let approvers = tether_ops::approvers::Approvers::parse(
        &std::fs::read_to_string(c.path("approvers.toml")).unwrap(),
    )
    .unwrap();
    std::fs::write(c.path("allowed_signers"), approvers.allowed_signers()).unwrap();
    let recipe = |dir: &Path| {
        let script = r#"set -e
ssh-keygen -Y verify -f allowed_signers -I acme-ops -n tether-approval-v1 -s approval.json.sig -Overify-time=20261231000000 < approval.json
echo "app-0001 namespaces=\"tether-manifest-v1\" $(jq -r .appliance.key approval.json)" > appliance_signers
ssh-keygen -Y verify -f appliance_signers -I app-0001 -n tether-manifest-v1 -s m.json.sig < m.json
[ "$(sha256sum < approval.json | cut -c1-64)" = "$(jq -r .approval.sha256 m.json)" ]
[ "$(sha256sum < stdout.bin | cut -c1-64)" = "$(jq -r .stdout.sha256 m.json)" ]
"#;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let out = recipe(c.dir.path());
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut flipped = STDOUT.to_vec();
    flipped[3] ^= 1;
    std::fs::write(c.path("stdout.bin"), flipped).unwrap();
    assert!(!recipe(c.dir.path()).status.success());
}
