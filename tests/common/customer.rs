//! The customer's side of signed operations and break glass, for the tests and the
//! tunnel bench: a customer directory with a key made by stock `ssh-keygen`, a policy,
//! credential commands, and a TCP echo server standing in for a customer resource.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The customer policy most tests start from: `observe` open, `operate` needing approvals.
pub const POLICY: &str = r#"
allow_same_uid = true

[phases.observe]
enabled = true
approval = "none"
run_as = "nobody"

[phases.operate]
enabled = true
approval = "required"
run_as = "nobody"

[[classify]]
argv = ["echo", "**"]
phase = "observe"
[[classify]]
argv = ["cat", "**"]
phase = "observe"

[[deny]]
program = ["rm"]
"#;

/// Run stock `ssh-keygen` with `args` in `cwd`; panics with its stderr if it fails.
pub fn ssh_keygen(args: &[&str], cwd: &Path) {
    let out = Command::new("ssh-keygen")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Set `p`'s mode.
pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `root/customer` (0755) with `approvers.toml` pinning a fresh Ed25519 key `root/alice`
/// (made by `ssh-keygen`) as `acme`, and `policy`.
pub fn customer_dir(root: &Path, policy: &str) -> PathBuf {
    chmod(root, 0o755);
    let customer = root.join("customer");
    std::fs::create_dir(&customer).unwrap();
    chmod(&customer, 0o755);
    ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-f", "alice"], root);
    let public = std::fs::read_to_string(root.join("alice.pub")).unwrap();
    std::fs::write(
        customer.join("approvers.toml"),
        format!("[[key]]\nid = \"acme\"\npublic_key = \"{}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2099-01-01T00:00:00Z\"\n", public.trim()),
    )
    .unwrap();
    std::fs::write(customer.join("policy.toml"), policy).unwrap();
    customer
}

/// A TCP echo server on 127.0.0.1 (each connection echoed until its half-close).
pub async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The customer's policy with break-glass resource `echo` at `target`.
pub fn tunnel_policy(target: &str) -> String {
    format!(
        "{POLICY}\n[[resource]]\nname = \"echo\"\ntarget = \"{target}\"\n[resource.privilege.rw]\n"
    )
}

/// The customer's mint and revoke commands in `root/bin`: mint prints a JSON credential
/// holding `secret` (and writes the secret to its stderr too, which must reach no log);
/// revoke appends the credential id to `marker`. Returns (mint, revoke).
pub fn credential_commands(root: &Path, secret: &str, marker: &Path) -> (PathBuf, PathBuf) {
    let bin_dir = root.join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    chmod(&bin_dir, 0o755);
    let mint = bin_dir.join("mint");
    std::fs::write(
        &mint,
        format!("#!/bin/sh\nprintf '{{\"credential_id\":\"cred-%s\",\"secret\":\"{secret}\",\"ttl\":\"%s\"}}' \"$2\" \"$1\"\necho \"{secret}\" >&2\n"),
    )
    .unwrap();
    let revoke = bin_dir.join("revoke");
    std::fs::write(
        &revoke,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", marker.display()),
    )
    .unwrap();
    for f in [&mint, &revoke] {
        chmod(f, 0o755);
    }
    (mint, revoke)
}

/// [`POLICY`] with resource `echo` at `target` whose privilege `rw` mints and revokes
/// with the commands [`credential_commands`] made in `root/bin`.
pub fn credential_policy(target: &str, root: &Path) -> String {
    let bin = root.join("bin");
    format!(
        "{POLICY}\n[[resource]]\nname = \"echo\"\ntarget = \"{target}\"\n[resource.privilege.rw]\nmint = {{ argv = [\"{}\", \"{{duration_s}}\", \"{{session_id}}\"], deadline_ms = 5000 }}\nrevoke = {{ argv = [\"{}\", \"{{credential_id}}\"], deadline_ms = 5000 }}\n",
        bin.join("mint").display(),
        bin.join("revoke").display()
    )
}

/// Control, an enrolled broker `edge-1`, and appliance `app-1` whose agent runs with a
/// customer directory holding the policy `policy(root)` returns (given the directory
/// everything lives in, 0755 so the phases' users can reach what is made there), connected.
/// Returns them and that directory.
pub async fn through_control(
    policy: impl FnOnce(&Path) -> String,
) -> (
    super::cluster::Cluster,
    super::BrokerProc,
    super::AgentProc,
    PathBuf,
) {
    let mut c = super::cluster::Cluster::new("");
    let broker = c.add_broker("edge-1");
    let state = c.enroll("app-1");
    let root = c.tmp().to_path_buf();
    chmod(&root, 0o755);
    let policy = policy(&root);
    let customer = customer_dir(&root, &policy);
    let agent = super::AgentProc::start(
        &state,
        &[broker.quic],
        &["--customer-dir", customer.to_str().unwrap()],
    );
    c.wait_connected("app-1", Some("edge-1")).await;
    (c, broker, agent, root)
}

/// `tether tunnel request app-1 ARGS` as the admin, the document written to `root/file`
/// and signed there by the customer's key (`root/alice`, stock `ssh-keygen`). Returns
/// the document.
pub fn request_signed(
    c: &super::cluster::Cluster,
    root: &Path,
    file: &str,
    args: &[&str],
) -> String {
    let mut all = vec!["tunnel", "request", "app-1"];
    all.extend_from_slice(args);
    let doc = c.tether(&all).expect("the appliance answers a plan");
    std::fs::write(root.join(file), &doc).unwrap();
    ssh_keygen(
        &[
            "-Y",
            "sign",
            "-n",
            "tether-approval-v1",
            "-f",
            "alice",
            file,
        ],
        root,
    );
    doc
}

/// `tether tunnel open --approval root/file` as the admin (stderr piped), started.
pub fn tunnel_open_cmd(
    c: &super::cluster::Cluster,
    root: &Path,
    file: &str,
) -> std::process::Child {
    Command::new(super::bin("tether"))
        .args(["tunnel", "open", "--approval"])
        .arg(root.join(file))
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`tunnel_open_cmd`], and the local address it prints first.
pub async fn tunnel_open(
    c: &super::cluster::Cluster,
    root: &Path,
    file: &str,
) -> (std::process::Child, std::net::SocketAddr) {
    let mut open = tunnel_open_cmd(c, root, file);
    let stdout = open.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let addr = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("tether tunnel open prints its address, got {line:?}"));
    (open, addr)
}
