//! `tether-approve` as a customer uses it: keygen, show, sign (strict, narrowing only),
//! verify; its signatures verify with stock `ssh-keygen -Y verify`; and it carries no
//! network code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tether_ops::approval::{ApplianceRef, Approval, ExecSpec, Expected};
use tether_ops::Phase;

fn approve(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether-approve"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run tether-approve")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A plan as `tether exec --plan` writes it, valid for an hour from now.
fn plan(dir: &Path) -> PathBuf {
    let appliance = ApplianceRef {
        id: "app-0001".into(),
        trust_domain: "acme.example".into(),
        key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJnoO0PB0+0sgEd8BzTU0m5nWrpyQsbHUVpuXOfOQh/x"
            .into(),
    };
    let exec = ExecSpec {
        kind: tether_proto::CommandKind::Exec,
        argv: vec!["systemctl".into(), "restart".into(), "worker".into()],
        env_allowlist: vec![],
        deadline_ms: 60_000,
        stdin_sha256: String::new(),
    };
    let now = now_ms();
    let doc = Approval::plan(
        &Expected {
            appliance: &appliance,
            phase: Phase::Operate,
            exec: &exec,
        },
        "req_1",
        "INC-1",
        "vendor-suggested",
        now,
        now + 3_600_000,
    );
    let path = dir.join("approval.json");
    std::fs::write(&path, doc.to_bytes()).unwrap();
    path
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn keygen_sign_verify_and_stock_ssh_keygen_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = approve(&["keygen", "--out", "alice", "--comment", "alice@acme"], d);
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("alice")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Keygen never overwrites a key.
    assert_eq!(
        approve(&["keygen", "--out", "alice"], d).status.code(),
        Some(2)
    );
    let public = std::fs::read_to_string(d.join("alice.pub")).unwrap();
    std::fs::write(
        d.join("approvers.toml"),
        format!(
            "[[key]]\nid = \"alice\"\npublic_key = \"{}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2099-01-01T00:00:00Z\"\n",
            public.trim()
        ),
    )
    .unwrap();
    plan(d);
    let o = approve(&["show", "approval.json"], d);
    assert!(
        o.status.success() && text(&o).contains("[\"systemctl\", \"restart\", \"worker\"]"),
        "{}",
        text(&o)
    );
    let o = approve(
        &[
            "sign",
            "--key",
            "alice",
            "--approver",
            "alice@acme",
            "--valid",
            "5m",
            "approval.json",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    // Narrowed: the approver set, the window at most five minutes.
    let signed = Approval::parse(&std::fs::read(d.join("approval.json")).unwrap()).unwrap();
    assert_eq!(signed.approver, "alice@acme");
    assert!(signed.not_after_ms - signed.not_before_ms <= 300_000);
    let o = approve(
        &[
            "verify",
            "approval.json",
            "--customer-keys",
            "approvers.toml",
        ],
        d,
    );
    assert!(
        o.status.success() && text(&o).starts_with("valid: signed by alice"),
        "{}",
        text(&o)
    );
    // Stock OpenSSH accepts the signature.
    std::fs::write(
        d.join("allowed"),
        format!("alice namespaces=\"tether-approval-v1\" {public}"),
    )
    .unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg("ssh-keygen -Y verify -f allowed -I alice -n tether-approval-v1 -s approval.json.sig < approval.json")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // One changed byte: invalid (1).
    let changed = std::fs::read_to_string(d.join("approval.json"))
        .unwrap()
        .replace("restart", "restarT");
    std::fs::write(d.join("approval.json"), changed).unwrap();
    let o = approve(
        &[
            "verify",
            "approval.json",
            "--customer-keys",
            "approvers.toml",
        ],
        d,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // A missing signature: usage (2).
    std::fs::remove_file(d.join("approval.json.sig")).unwrap();
    let o = approve(
        &[
            "verify",
            "approval.json",
            "--customer-keys",
            "approvers.toml",
        ],
        d,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn a_document_that_is_not_canonical_is_never_signed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(approve(&["keygen", "--out", "k"], d).status.success());
    let path = plan(d);
    let text_doc = std::fs::read_to_string(&path).unwrap();
    for bad in [
        text_doc.replacen(',', ",\n", 1),
        text_doc.replacen('{', "{\"approver\":\"x\",", 1),
        text_doc.replacen('{', "{\"hidden\":\"x\",", 1),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let o = approve(&["sign", "--key", "k", "approval.json"], d);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(!d.join("approval.json.sig").exists());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            bad,
            "the file is left as it was"
        );
    }
}

#[test]
fn an_encrypted_key_needs_its_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = Command::new(env!("CARGO_BIN_EXE_tether-approve"))
        .args(["keygen", "--out", "k", "--passphrase-env", "PASS"])
        .env("PASS", "correct horse")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    plan(d);
    assert_eq!(
        approve(&["sign", "--key", "k", "approval.json"], d)
            .status
            .code(),
        Some(2)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_tether-approve"))
        .args([
            "sign",
            "--key",
            "k",
            "--passphrase-env",
            "PASS",
            "approval.json",
        ])
        .env("PASS", "wrong")
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_tether-approve"))
        .args([
            "sign",
            "--key",
            "k",
            "--passphrase-env",
            "PASS",
            "approval.json",
        ])
        .env("PASS", "correct horse")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// The signer must not be able to phone home: no async runtime, HTTP client or QUIC in
/// its dependency tree.
#[test]
fn no_network_code_in_the_dependency_tree() {
    let o = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "tether-approve",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(o.status.success(), "{}", text(&o));
    let tree = String::from_utf8_lossy(&o.stdout);
    assert!(tree.contains("tether-ops"), "{tree}");
    for forbidden in [
        "tokio ", "reqwest ", "quinn ", "hyper ", "rustls ", "mio ", "socket2 ",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden}in the tree:\n{tree}"
        );
    }
}

/// A break-glass plan as `tether tunnel request` writes it, valid for an hour from now.
fn tunnel_plan(dir: &Path) -> PathBuf {
    use tether_ops::policy::Policy;
    use tether_ops::tunnel::{TunnelApproval, TunnelExpected, TunnelRequest};
    let policy = Policy::parse(
        br#"
[phases.operate]
enabled = true
approval = "required"
run_as = "tether-ops"
[[resource]]
name = "orders-db"
target = "10.0.3.7:5432"
[resource.privilege.readonly]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--ro", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }
"#,
    )
    .unwrap();
    let appliance = ApplianceRef {
        id: "app-0001".into(),
        trust_domain: "acme.example".into(),
        key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJnoO0PB0+0sgEd8BzTU0m5nWrpyQsbHUVpuXOfOQh/x"
            .into(),
    };
    let now = now_ms();
    let expected = TunnelExpected::resolve(
        &appliance,
        &policy,
        &TunnelRequest {
            resource: "orders-db",
            privilege: "readonly",
            duration_s: 7200,
            max_connections: 4,
            idle_timeout_s: 3600,
            recipient: "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
        },
        now,
    )
    .unwrap();
    let doc = TunnelApproval::plan(
        &expected,
        "req_7",
        "INC-4411",
        "vendor-suggested",
        now,
        now + 3_600_000,
    );
    let path = dir.join("tunnel.json");
    std::fs::write(&path, doc.to_bytes()).unwrap();
    path
}

#[test]
fn a_break_glass_document_is_shown_narrowed_signed_and_verified() {
    use tether_ops::tunnel::TunnelApproval;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(approve(&["keygen", "--out", "alice"], d).status.success());
    let public = std::fs::read_to_string(d.join("alice.pub")).unwrap();
    let pin = |scopes: &str| {
        std::fs::write(
            d.join("approvers.toml"),
            format!(
                "[[key]]\nid = \"alice\"\npublic_key = \"{}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2099-01-01T00:00:00Z\"\n{scopes}",
                public.trim()
            ),
        )
        .unwrap()
    };
    pin("");
    tunnel_plan(d);
    let o = approve(&["show", "tunnel.json"], d);
    let shown = text(&o);
    assert!(o.status.success(), "{shown}");
    for line in [
        "break-glass approval ",
        "resource:    orders-db",
        "privilege:   readonly",
        "target:      10.0.3.7:5432 (via tether-tunnel)",
        "duration:    2h from activation",
        "connections: at most 4, each closed after 1h idle",
        "mint:      [\"/opt/acme/bin/mint-db-user\", \"--ro\", \"--ttl\", \"{duration_s}\"] (deadline 20000 ms)",
        "revoke:    [\"/opt/acme/bin/drop-db-user\", \"{credential_id}\"] (deadline 20000 ms)",
        "sealed to: age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
    ] {
        assert!(shown.contains(line), "{line:?} not in\n{shown}");
    }
    // Narrowing only: 30 minutes (the idle timeout with it), 2 connections; asking for
    // more connections than the document has changes nothing.
    let o = approve(
        &[
            "sign",
            "--key",
            "alice",
            "--approver",
            "alice@acme",
            "--duration",
            "30m",
            "--max-connections",
            "2",
            "tunnel.json",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let signed = TunnelApproval::parse(&std::fs::read(d.join("tunnel.json")).unwrap()).unwrap();
    let b = &signed.break_glass;
    assert_eq!(
        (b.duration_s, b.idle_timeout_s, b.max_connections),
        (1800, 1800, 2)
    );
    assert_eq!(signed.approver, "alice@acme");
    let o = approve(
        &[
            "sign",
            "--key",
            "alice",
            "--max-connections",
            "9",
            "tunnel.json",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let resigned = TunnelApproval::parse(&std::fs::read(d.join("tunnel.json")).unwrap()).unwrap();
    assert_eq!(resigned.break_glass.max_connections, 2);
    let verify = || {
        approve(
            &["verify", "tunnel.json", "--customer-keys", "approvers.toml"],
            d,
        )
    };
    let o = verify();
    assert!(
        o.status.success() && text(&o).starts_with("valid: signed by alice"),
        "{}",
        text(&o)
    );
    // Stock OpenSSH accepts the signature.
    std::fs::write(
        d.join("allowed"),
        format!("alice namespaces=\"tether-approval-v1\" {public}"),
    )
    .unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg("ssh-keygen -Y verify -f allowed -I alice -n tether-approval-v1 -s tunnel.json.sig < tunnel.json")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // A key pinned for commands only may not approve tunnels.
    pin("scopes = [\"exec\"]\n");
    let o = verify();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    pin("");
    // One changed byte of the target: invalid.
    let changed = std::fs::read_to_string(d.join("tunnel.json"))
        .unwrap()
        .replace("10.0.3.7", "10.0.3.9");
    std::fs::write(d.join("tunnel.json"), changed).unwrap();
    assert_eq!(verify().status.code(), Some(1));
    // The exec-only narrowing flags are refused for a command's document.
    plan(d);
    let o = approve(
        &[
            "sign",
            "--key",
            "alice",
            "--duration",
            "5m",
            "approval.json",
        ],
        d,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!d.join("approval.json.sig").exists());
}
