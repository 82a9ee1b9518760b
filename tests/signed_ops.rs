//! Signed operations attacked the way a fully compromised vendor would: the standalone
//! broker's admin API sends any frame it likes to a real `tether-agent` running with a
//! customer directory. The customer's key is made and used by stock `ssh-keygen`; a canary
//! file proves whether anything ran. Also: the agent's own plan signed by the customer
//! runs exactly once, its manifest verifies offline, the appliance audit log verifies and
//! a tampered one does not. One test takes the vendor's real path: control's API and
//! `tether exec --plan` / `--approval`, through an enrolled broker.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::customer::*;
use common::*;
use serde_json::{json, Value};
use tether_ops::approval::Approval;
use tether_ops::{sig, MANIFEST_NAMESPACE};

/// One appliance with a customer directory, its broker and its agent.
struct Rig {
    setup: Setup,
    broker: BrokerProc,
    agent: Option<AgentProc>,
    state: PathBuf,
    customer: PathBuf,
    canary_dir: PathBuf,
    key: PathBuf,
    appliance_key: String,
}

impl Rig {
    async fn new() -> Rig {
        let setup = Setup::new();
        let leaf = setup.pki.appliance("app-1").unwrap();
        setup.set_allowlist(&[("app-1", &leaf)]);
        // Heartbeats every second: a lost broker shows within about three.
        let broker = setup.broker("b1", "[session]\nheartbeat_interval = \"1s\"\n");
        let state = setup.agent_state("app-1", &leaf);
        let root = setup.dir.path().to_path_buf();
        chmod(&root, 0o755);
        let customer = root.join("customer");
        std::fs::create_dir(&customer).unwrap();
        chmod(&customer, 0o755);
        ssh_keygen(
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "alice@acme",
                "-f",
                "alice",
            ],
            &root,
        );
        let public = std::fs::read_to_string(root.join("alice.pub")).unwrap();
        std::fs::write(
            customer.join("approvers.toml"),
            format!(
                "[[key]]\nid = \"acme-ops\"\npublic_key = \"{}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2099-01-01T00:00:00Z\"\n",
                public.trim()
            ),
        )
        .unwrap();
        std::fs::write(customer.join("policy.toml"), POLICY).unwrap();
        for f in ["approvers.toml", "policy.toml"] {
            chmod(&customer.join(f), 0o644);
        }
        let canary_dir = root.join("canary");
        std::fs::create_dir(&canary_dir).unwrap();
        chmod(&canary_dir, 0o777);
        let out = Command::new(bin("tether-agent"))
            .args(["manifest-key", "show", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        assert!(out.status.success());
        let appliance_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mut rig = Rig {
            key: root.join("alice"),
            setup,
            broker,
            agent: None,
            state,
            customer,
            canary_dir,
            appliance_key,
        };
        rig.start_agent().await;
        rig
    }

    /// Restart the agent with `--transport tcp` and wait for its session over TCP.
    async fn restart_agent_over_tcp(&mut self) {
        self.start_agent_with(&["--transport", "tcp"]).await;
        wait_for(Duration::from_secs(15), || async {
            self.broker
                .sessions()
                .await
                .into_iter()
                .find(|s| s["transport"] == "tcp")
        })
        .await
        .expect("the agent's session runs over TCP");
    }

    async fn start_agent(&mut self) {
        self.start_agent_with(&[]).await;
    }

    async fn start_agent_with(&mut self, extra: &[&str]) {
        self.start_agent_env(extra, &[]).await;
    }

    async fn start_agent_env(&mut self, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) {
        self.agent = None;
        // A killed agent's session lingers until the broker notices: wait for a new one.
        let old: Vec<Value> = self
            .broker
            .sessions()
            .await
            .into_iter()
            .map(|r| r["session_id"].clone())
            .collect();
        let customer = self.customer.to_str().unwrap().to_owned();
        let mut args = vec!["--customer-dir", customer.as_str()];
        args.extend_from_slice(extra);
        self.agent = Some(AgentProc::start_env(
            &self.state,
            &[self.broker.quic],
            &args,
            env,
        ));
        wait_for(Duration::from_secs(15), || async {
            let s = self.broker.sessions().await;
            s.iter()
                .any(|r| {
                    r["appliance_id"] == "app-1"
                        && !old.contains(&r["session_id"])
                        && r["capabilities"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|c| c == "signed-ops/1")
                })
                .then_some(())
        })
        .await
        .expect("the agent connects announcing signed-ops/1");
    }

    fn canary(&self, name: &str) -> PathBuf {
        self.canary_dir.join(name)
    }

    fn root(&self) -> &Path {
        self.setup.dir.path()
    }

    async fn run(&self, body: Value) -> Vec<Value> {
        let (status, lines) = run_command(&self.broker, "app-1", body).await;
        assert_eq!(status, 200, "{lines:?}");
        lines
    }

    /// Ask the agent for the plan of `argv`, have the customer sign it with stock
    /// `ssh-keygen`, and return (document, signature).
    async fn approve(&self, argv: &[&str], timeout_ms: u64) -> (String, String) {
        let lines = self
            .run(json!({"argv": argv, "timeout_ms": timeout_ms, "plan": true, "request_id": "req-1", "reason": "INC-1"}))
            .await;
        let plan = lines
            .iter()
            .find(|l| l.get("plan").is_some())
            .unwrap_or_else(|| panic!("no plan: {lines:?}"));
        assert_eq!(plan["approval_required"], true);
        let doc = plan["plan"].as_str().unwrap().to_owned();
        self.sign(&doc)
    }

    fn sign(&self, doc: &str) -> (String, String) {
        let file = self.root().join("approval.json");
        std::fs::write(&file, doc).unwrap();
        let _ = std::fs::remove_file(self.root().join("approval.json.sig"));
        ssh_keygen(
            &[
                "-Y",
                "sign",
                "-n",
                "tether-approval-v1",
                "-f",
                self.key.to_str().unwrap(),
                "approval.json",
            ],
            self.root(),
        );
        (
            doc.to_owned(),
            std::fs::read_to_string(self.root().join("approval.json.sig")).unwrap(),
        )
    }
}

/// A customer directory under `root` (made world-readable, as an appliance's would be):
/// `alice`'s key made by stock `ssh-keygen` and pinned as `acme`, and `policy`.
fn error_of(lines: &[Value]) -> String {
    lines
        .last()
        .and_then(|l| l["error"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// The manifest line verifies under the appliance's key; returns it parsed.
fn manifest_of(lines: &[Value], appliance_key: &str) -> tether_ops::manifest::Manifest {
    let line = lines
        .iter()
        .find(|l| l.get("manifest").is_some())
        .unwrap_or_else(|| panic!("no manifest: {lines:?}"));
    let bytes = line["manifest"].as_str().unwrap().as_bytes();
    let signer = sig::verify(
        line["manifest_sig"].as_str().unwrap().as_bytes(),
        MANIFEST_NAMESPACE,
        bytes,
    )
    .expect("manifest signature");
    assert_eq!(
        tether_ops::manifest::Manifest::parse(bytes)
            .unwrap()
            .appliance
            .key,
        appliance_key
    );
    assert_eq!(signer.key.to_openssh().unwrap(), appliance_key);
    tether_ops::manifest::Manifest::parse(bytes).unwrap()
}

#[tokio::test]
async fn observe_runs_unsigned_everything_else_needs_the_customer() {
    let rig = Rig::new().await;
    let lines = rig
        .run(json!({"argv": ["echo", "hello"], "timeout_ms": 10000}))
        .await;
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}), "{lines:?}");
    let m = manifest_of(&lines, &rig.appliance_key);
    assert_eq!(m.phase, Some(tether_ops::Phase::Observe));
    assert_eq!(m.stdout, tether_ops::manifest::StreamDigest::of(b"hello\n"));
    assert!(m.approval.is_none());

    // Operate without an approval: refused, nothing ran, a signed refusal manifest.
    let canary = rig.canary("no-approval");
    let lines = rig
        .run(json!({"argv": ["touch", canary.to_str().unwrap()], "timeout_ms": 10000}))
        .await;
    assert_eq!(error_of(&lines), "approval_required", "{lines:?}");
    assert!(!canary.exists());
    let m = manifest_of(&lines, &rig.appliance_key);
    assert_eq!(
        m.outcome,
        tether_ops::manifest::Outcome::Refused("approval_required".into())
    );

    // A deny rule beats even a perfect signature over the re-derived document (the path
    // game `/usr/bin/../bin/rm` resolves to rm first).
    std::fs::write(rig.canary("keep"), "x").unwrap();
    let keep = rig.canary("keep");
    let lines = rig.run(json!({"argv": ["/usr/bin/../bin/rm", keep.to_str().unwrap()], "timeout_ms": 10000, "plan": true})).await;
    assert_eq!(error_of(&lines), "denied_by_policy", "{lines:?}");
    assert!(keep.exists());
}

#[tokio::test]
async fn an_approval_runs_exactly_its_command_exactly_once() {
    approval_exactly_once("quic").await;
}

/// The same over TLS/TCP: the signed manifest arrives with the result, and its delivery
/// is confirmed by the record layer's `ACK` as QUIC's acknowledgements confirm it.
#[tokio::test]
async fn over_tcp_an_approval_runs_exactly_its_command_exactly_once() {
    approval_exactly_once("tcp").await;
}

async fn approval_exactly_once(transport: &str) {
    let mut rig = Rig::new().await;
    if transport == "tcp" {
        rig.restart_agent_over_tcp().await;
    }
    let canary = rig.canary("approved");
    let argv = ["touch", canary.to_str().unwrap()];
    let (doc, sig) = rig.approve(&argv, 10_000).await;
    let send = |argv: Vec<&str>, timeout_ms: u64, doc: &str, sig: &str| json!({"argv": argv, "timeout_ms": timeout_ms, "approval": doc, "approval_sig": sig});

    // Widened or changed: every variant fails the signature, and nothing runs.
    let other = rig.canary("widened");
    for (argv2, timeout) in [
        (
            vec!["touch", canary.to_str().unwrap(), other.to_str().unwrap()],
            10_000,
        ),
        (vec!["touch", other.to_str().unwrap()], 10_000),
        (argv.to_vec(), 60_000),
    ] {
        let lines = rig.run(send(argv2, timeout, &doc, &sig)).await;
        assert_eq!(error_of(&lines), "approval_invalid", "{lines:?}");
    }
    let lines = rig
        .run(json!({"argv": argv, "timeout_ms": 10000, "env": ["LD_PRELOAD"], "approval": doc, "approval_sig": sig}))
        .await;
    assert_eq!(error_of(&lines), "approval_invalid", "{lines:?}");
    assert!(!canary.exists() && !other.exists());

    // Retargeted: the same command approved for another appliance or trust domain.
    for (from, to) in [
        ("\"id\":\"app-1\"", "\"id\":\"app-2\""),
        ("\"trust_domain\":\"", "\"trust_domain\":\"x"),
    ] {
        let (d, s) = rig.sign(&doc.replace(from, to));
        let lines = rig.run(send(argv.to_vec(), 10_000, &d, &s)).await;
        assert_eq!(error_of(&lines), "approval_invalid", "{lines:?}");
    }
    // Signed by a key the customer did not pin; a manifest signature as an approval.
    ssh_keygen(
        &["-q", "-t", "ed25519", "-N", "", "-f", "vendor"],
        rig.root(),
    );
    std::fs::write(rig.root().join("a2.json"), &doc).unwrap();
    ssh_keygen(
        &[
            "-Y",
            "sign",
            "-n",
            "tether-approval-v1",
            "-f",
            "vendor",
            "a2.json",
        ],
        rig.root(),
    );
    let vendor_sig = std::fs::read_to_string(rig.root().join("a2.json.sig")).unwrap();
    let lines = rig
        .run(send(argv.to_vec(), 10_000, &doc, &vendor_sig))
        .await;
    assert_eq!(error_of(&lines), "approval_invalid", "{lines:?}");
    std::fs::write(rig.root().join("a3.json"), &doc).unwrap();
    ssh_keygen(
        &[
            "-Y",
            "sign",
            "-n",
            "tether-manifest-v1",
            "-f",
            rig.key.to_str().unwrap(),
            "a3.json",
        ],
        rig.root(),
    );
    let wrong_ns = std::fs::read_to_string(rig.root().join("a3.json.sig")).unwrap();
    let lines = rig.run(send(argv.to_vec(), 10_000, &doc, &wrong_ns)).await;
    assert_eq!(error_of(&lines), "approval_invalid", "{lines:?}");
    // Not canonical (whitespace), though signed as sent.
    let (d, s) = rig.sign(&doc.replacen(',', ", ", 1));
    let lines = rig.run(send(argv.to_vec(), 10_000, &d, &s)).await;
    assert_eq!(error_of(&lines), "approval_invalid", "{lines:?}");
    assert!(!canary.exists());

    // The real thing runs, once; its manifest binds the approval.
    let lines = rig.run(send(argv.to_vec(), 10_000, &doc, &sig)).await;
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}), "{lines:?}");
    assert!(canary.exists());
    let m = manifest_of(&lines, &rig.appliance_key);
    assert_eq!(
        m.approval.as_ref().unwrap().sha256,
        tether_ops::sha256_hex(doc.as_bytes())
    );
    assert_eq!(
        m.approval.as_ref().unwrap().approval_id,
        Approval::parse(doc.as_bytes()).unwrap().approval_id
    );
    std::fs::remove_file(&canary).unwrap();

    // An auditor reproduces the agent's decision with stock ssh-keygen and the exported
    // allowed_signers file.
    let out = Command::new(bin("tether-agent"))
        .args(["approvers", "export-allowed-signers", "--customer-dir"])
        .arg(&rig.customer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(rig.root().join("allowed_signers"), &out.stdout).unwrap();
    std::fs::write(rig.root().join("approval.json"), &doc).unwrap();
    std::fs::write(rig.root().join("approval.json.sig"), &sig).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ssh-keygen -Y verify -f allowed_signers -I acme-ops -n tether-approval-v1 -s approval.json.sig -Overify-time=20270101000000 < approval.json")
        .current_dir(rig.root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Replayed: at once, and after the agent restarts.
    let lines = rig.run(send(argv.to_vec(), 10_000, &doc, &sig)).await;
    assert_eq!(error_of(&lines), "approval_replayed", "{lines:?}");
    rig.start_agent().await;
    let lines = rig.run(send(argv.to_vec(), 10_000, &doc, &sig)).await;
    assert_eq!(error_of(&lines), "approval_replayed", "{lines:?}");
    assert!(!canary.exists());

    // The appliance audit log verifies, and a single edited entry does not.
    let log = rig.state.join("audit.jsonl");
    let verify = |p: &Path| {
        Command::new(bin("tether-agent"))
            .args(["audit", "verify"])
            .arg(p)
            .output()
            .unwrap()
    };
    let out = verify(&log);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("approval.consumed"));
    let tampered = rig.root().join("tampered.jsonl");
    std::fs::write(
        &tampered,
        text.replacen("approval.consumed", "approval.consumeD", 1),
    )
    .unwrap();
    assert_eq!(verify(&tampered).status.code(), Some(1));
    assert_eq!(
        verify(&rig.root().join("missing.jsonl")).status.code(),
        Some(2)
    );

    // With the appliance key the customer recorded, the checkpoints hold too; a log
    // rewritten with every hash recomputed (a consistent chain) still fails there.
    let verify_key = |p: &Path, key: &str| {
        Command::new(bin("tether-agent"))
            .args(["audit", "verify", "--appliance-key", key])
            .arg(p)
            .output()
            .unwrap()
    };
    let out = verify_key(&log, &rig.appliance_key);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !said.contains(" 0 checkpoints"),
        "{said}"
    );
    let mut entries: Vec<tether_audit::AuditEntry> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    entries[1].details["argv"] = Value::from("echo harmless");
    let mut prev = tether_audit::GENESIS_HASH.to_owned();
    for e in &mut entries {
        e.prev_hash = prev.clone();
        e.hash = tether_audit::entry_hash(e.seq, e.at, &e.event(), &prev).unwrap();
        prev = e.hash.clone();
    }
    let rewritten = rig.root().join("rewritten.jsonl");
    let lines: Vec<String> = entries
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    std::fs::write(&rewritten, lines.join("\n") + "\n").unwrap();
    assert!(
        verify(&rewritten).status.success(),
        "the chain alone cannot tell"
    );
    let out = verify_key(&rewritten, &rig.appliance_key);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Another appliance's key: refused as well.
    let other = tether_ops::ssh_key::PrivateKey::random(
        &mut tether_ops::ssh_key::rand_core::OsRng,
        tether_ops::ssh_key::Algorithm::Ed25519,
    )
    .unwrap();
    let out = verify_key(&log, &other.public_key().to_openssh().unwrap());
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn the_customer_closing_a_phase_kills_what_runs_in_it() {
    let rig = Rig::new().await;
    let argv = ["sleep", "30"];
    let (doc, sig) = rig.approve(&argv, 60_000).await;
    let broker = &rig.broker;
    let run = tokio::spawn({
        let body = json!({"argv": argv, "timeout_ms": 60000, "approval": doc, "approval_sig": sig});
        let url = broker.url("/v1/sessions/app-1/commands");
        async move {
            http()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let closed = Instant::now();
    // The customer's switch-off, as their admin runs it on the appliance.
    let out = Command::new(bin("tether-agent"))
        .args(["lockdown", "--customer-dir"])
        .arg(&rig.customer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "locked down: observe=on/none,deploy=off,operate=off,install=off"
    );
    let text = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ended")
        .unwrap();
    let took = closed.elapsed();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["error"], "phase_revoked", "{text}");
    eprintln!("policy edit to kill: {took:?}");
    // And new commands in that phase are refused.
    let (_, lines) = run_command(
        &rig.broker,
        "app-1",
        json!({"argv": ["true"], "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(error_of(&lines), "phase_disabled", "{lines:?}");
}

#[tokio::test]
async fn approvers_anyone_else_could_write_verify_nothing() {
    let rig = Rig::new().await;
    let canary = rig.canary("writable");
    let argv = ["touch", canary.to_str().unwrap()];
    let (doc, sig) = rig.approve(&argv, 10_000).await;
    chmod(&rig.customer.join("approvers.toml"), 0o666);
    // The customer's own check says so before any command does.
    let check = |dir: &Path| {
        Command::new(bin("tether-agent"))
            .args(["policy", "check", "--customer-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = check(&rig.customer);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    let healthy = rig.root().join("healthy");
    std::fs::create_dir(&healthy).unwrap();
    chmod(&healthy, 0o755);
    for f in ["approvers.toml", "policy.toml"] {
        std::fs::copy(rig.customer.join(f), healthy.join(f)).unwrap();
        chmod(&healthy.join(f), 0o644);
    }
    // With a break-glass resource: the customer sees what a tunnel would reach and run.
    let with_resource = format!(
        "{POLICY}\n[[resource]]\nname = \"orders-db\"\ntarget = \"db.internal:5432\"\n[resource.privilege.readonly]\nmint = {{ argv = [\"/usr/local/bin/mint-ro\", \"{{duration_s}}\"], deadline_ms = 5000 }}\nrevoke = {{ argv = [\"/usr/local/bin/revoke-ro\"], deadline_ms = 5000 }}\n"
    );
    std::fs::write(healthy.join("policy.toml"), with_resource).unwrap();
    let out = check(&healthy);
    let healthy_said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{healthy_said}");
    assert!(
        healthy_said.contains("resource orders-db -> db.internal:5432 (phase operate)")
            && healthy_said.contains(
                "privilege readonly: mint /usr/local/bin/mint-ro {duration_s} | revoke /usr/local/bin/revoke-ro"
            ),
        "{healthy_said}"
    );
    assert!(
        said.contains("approvers: UNUSABLE") && said.contains("group- or world-writable"),
        "{said}"
    );
    assert!(said.contains("policy: sha256"), "{said}");
    let lines = rig
        .run(json!({"argv": argv, "timeout_ms": 10000, "approval": doc, "approval_sig": sig}))
        .await;
    assert_eq!(error_of(&lines), "approval_unavailable", "{lines:?}");
    assert!(!canary.exists());
    // Observe keeps working.
    let lines = rig
        .run(json!({"argv": ["echo", "still here"], "timeout_ms": 10000}))
        .await;
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}), "{lines:?}");
    // A policy anyone could write refuses everything.
    chmod(&rig.customer.join("policy.toml"), 0o666);
    let lines = rig
        .run(json!({"argv": ["echo", "x"], "timeout_ms": 10000}))
        .await;
    assert_eq!(error_of(&lines), "policy_unavailable", "{lines:?}");
}

#[tokio::test]
async fn an_observe_command_cannot_read_the_agents_secrets() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let rig = Rig::new().await;
    for secret in ["manifest.key", "client.key.pem", "audit.jsonl"] {
        let path = rig.state.join(secret);
        let lines = rig
            .run(json!({"argv": ["cat", path.to_str().unwrap()], "timeout_ms": 10000}))
            .await;
        // It ran (observe, as nobody) and cat failed: permission denied.
        assert_eq!(
            lines.last().unwrap(),
            &json!({"exit_code": 1}),
            "{secret}: {lines:?}"
        );
        let m = manifest_of(&lines, &rig.appliance_key);
        assert_eq!(m.run_as.as_ref().unwrap().user, "nobody");
        assert_eq!(m.stdout.bytes, 0, "{secret} leaked");
    }
}

#[tokio::test]
async fn nothing_runs_that_cannot_be_recorded() {
    let mut rig = Rig::new().await;
    // An audit log that cannot be opened for appending (a directory stands in for a
    // full or read-only disk: root ignores permissions, so a mode would not do).
    let dir = rig.root().join("not-a-file");
    std::fs::create_dir(&dir).unwrap();
    let dir = dir.to_str().unwrap().to_owned();
    rig.start_agent_with(&["--audit-log", &dir]).await;
    let lines = rig
        .run(json!({"argv": ["echo", "x"], "timeout_ms": 10000}))
        .await;
    assert_eq!(error_of(&lines), "audit_unavailable", "{lines:?}");
    let canary = rig.canary("unrecorded");
    let (doc, sig) = {
        // The plan itself needs the log too: sign the document the agent would expect.
        let appliance = tether_ops::approval::ApplianceRef {
            id: "app-1".into(),
            trust_domain: TRUST_DOMAIN.into(),
            key: rig.appliance_key.clone(),
        };
        let exec = tether_ops::approval::ExecSpec {
            kind: tether_proto::CommandKind::Exec,
            argv: vec!["touch".into(), canary.to_str().unwrap().into()],
            env_allowlist: vec![],
            deadline_ms: 10_000,
            stdin_sha256: String::new(),
        };
        let now = tether_agent::signed::now_ms();
        let doc = Approval::plan(
            &tether_ops::approval::Expected {
                appliance: &appliance,
                phase: tether_ops::Phase::Operate,
                exec: &exec,
            },
            "req-2",
            "",
            "alice",
            now - 1000,
            now + 600_000,
        );
        rig.sign(std::str::from_utf8(&doc.to_bytes()).unwrap())
    };
    let lines = rig
        .run(json!({"argv": ["touch", canary.to_str().unwrap()], "timeout_ms": 10000, "approval": doc, "approval_sig": sig}))
        .await;
    assert_eq!(error_of(&lines), "audit_unavailable", "{lines:?}");
    assert!(!canary.exists());
}

/// The vendor's real path: `tether exec --plan` through control and the broker, the
/// customer signs with stock `ssh-keygen`, `tether exec --approval` runs it once, its
/// manifest lands in a file `tether ops verify` accepts; a replay, a widened command and
/// no approval each exit 125 naming the reason.
#[tokio::test]
async fn through_control_plan_sign_run_once_and_verify() {
    let mut c = common::cluster::Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let state = c.enroll("app-1");
    let root = c.tmp().to_path_buf();
    let customer = customer_dir(&root, POLICY);
    let canary_dir = root.join("canary");
    std::fs::create_dir(&canary_dir).unwrap();
    chmod(&canary_dir, 0o777);
    let canary = canary_dir.join("via-control");
    let canary = canary.to_str().unwrap();
    let _agent = AgentProc::start(
        &state,
        &[b1.quic],
        &["--customer-dir", customer.to_str().unwrap()],
    );
    c.wait_connected("app-1", Some("edge-1")).await;

    // Control says which mode the appliance is in and what its customer's rules are (read
    // only: reported by the agent, relayed by the broker).
    let policy_sha = tether_ops::sha256_hex(POLICY.as_bytes());
    let shown = wait_for(Duration::from_secs(15), || async {
        let v = c.show("app-1");
        (v["connection"]["agent_status"]["policy.sha256"] == policy_sha.as_str()).then_some(v)
    })
    .await
    .expect("the agent's status reaches control");
    let conn = &shown["connection"];
    assert!(
        conn["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "signed-ops/1"),
        "{conn}"
    );
    assert_eq!(
        conn["agent_status"]["policy.phases"],
        "observe=on/none,deploy=off,operate=on/required,install=off"
    );
    assert!(
        conn["agent_status"]["approvers"]
            .as_str()
            .unwrap()
            .starts_with("acme:SHA256:"),
        "{conn}"
    );
    assert!(conn["agent_status"]["audit.head"].is_string(), "{conn}");
    // Root switches to the phases' run_as user; elsewhere the policy's allow_same_uid.
    let privsep = if nix::unistd::geteuid().is_root() {
        "on"
    } else {
        "off"
    };
    assert_eq!(conn["agent_status"]["privsep"], privsep, "{conn}");
    let text = c.tether(&["appliance", "show", "app-1"]).unwrap();
    assert!(text.contains("signed operations:  on"), "{text}");

    // No approval: refused, named, exit 125.
    let (code, _, err) = c.exec(&["app-1", "--", "touch", canary]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("approval_required"), "{err}");

    // The plan, narrowed to five minutes, signed by the customer's stock tool.
    let (code, doc, err) = c.exec(&[
        "app-1", "--plan", "--valid", "5m", "--reason", "INC-7", "--", "touch", canary,
    ]);
    assert_eq!(code, 0, "{err}");
    let plan = Approval::parse(doc.as_bytes()).expect("a canonical approval document");
    assert_eq!(
        (plan.appliance.id.as_str(), plan.reason.as_str()),
        ("app-1", "INC-7")
    );
    assert!(plan.not_after_ms - plan.not_before_ms <= 300_000);
    std::fs::write(root.join("approval.json"), &doc).unwrap();
    ssh_keygen(
        &[
            "-Y",
            "sign",
            "-n",
            "tether-approval-v1",
            "-f",
            "alice",
            "approval.json",
        ],
        &root,
    );

    // Widened: another argument, same approval.
    let approval = root.join("approval.json");
    let approval = approval.to_str().unwrap();
    let (code, _, err) = c.exec(&[
        "app-1",
        "--approval",
        approval,
        "--reason",
        "INC-7",
        "--",
        "touch",
        canary,
        "/tmp/x",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("approval_invalid"), "{err}");
    assert!(!Path::new(canary).exists());

    // The real thing, once, with its manifest kept.
    let m = root.join("m.json");
    let (code, _, err) = c.exec(&[
        "app-1",
        "--approval",
        approval,
        "--manifest-out",
        m.to_str().unwrap(),
        "--",
        "touch",
        canary,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(Path::new(canary).exists());
    let out = Command::new(bin("tether"))
        .args(["ops", "verify", "--approval", approval, "--manifest"])
        .arg(&m)
        .arg("--customer-keys")
        .arg(customer.join("approvers.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_file(canary).unwrap();

    // Replayed through control: refused, nothing ran.
    let (code, _, err) = c.exec(&["app-1", "--approval", approval, "--", "touch", canary]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("approval_replayed"), "{err}");
    assert!(!Path::new(canary).exists());

    // The customer's lockdown reaches the vendor's view within seconds (the agent reports
    // a change of its customer's files on its own).
    let out = Command::new(bin("tether-agent"))
        .args(["lockdown", "--customer-dir"])
        .arg(&customer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let locked = Instant::now();
    wait_for(Duration::from_secs(15), || async {
        let v = c.show("app-1");
        (v["connection"]["agent_status"]["policy.phases"]
            == "observe=on/none,deploy=off,operate=off,install=off")
            .then_some(())
    })
    .await
    .expect("control sees the lockdown");
    eprintln!("lockdown to control's view: {:?}", locked.elapsed());
}

/// A tmpfs of 64 KiB mounted for a test, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(at))
    }

    /// Write until the file system is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 1024];
        while f.write_all(&block).and_then(|()| f.sync_all()).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the agent may still hold the log open (after a failed assertion).
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_stops_everything_and_nothing_is_lost() {
    let mut rig = Rig::new().await;
    let Some(disk) = SmallDisk::mount(rig.root().join("small")) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let log = disk.0.join("audit.jsonl");
    let log_arg = log.to_str().unwrap().to_owned();
    rig.start_agent_with(&["--audit-log", &log_arg]).await;
    let lines = rig
        .run(json!({"argv": ["echo", "room"], "timeout_ms": 10000}))
        .await;
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}), "{lines:?}");

    // The customer's approval, made while there is room (a plan is logged too).
    let canary = rig.canary("disk-full");
    let (doc, sig) = rig
        .approve(&["touch", canary.to_str().unwrap()], 10_000)
        .await;

    // The disk fills. The log's last page may still hold an entry or two; from the first
    // refusal on, nothing runs, observe or approved, and nothing is half written.
    disk.fill();
    let mut refused = false;
    for _ in 0..20 {
        let lines = rig
            .run(json!({"argv": ["echo", "no room"], "timeout_ms": 10000}))
            .await;
        if error_of(&lines) == "audit_unavailable" {
            refused = true;
            break;
        }
    }
    assert!(refused, "a full disk must stop commands");
    let lines = rig
        .run(json!({"argv": ["echo", "still no room"], "timeout_ms": 10000}))
        .await;
    assert_eq!(error_of(&lines), "audit_unavailable", "{lines:?}");
    let lines = rig
        .run(json!({"argv": ["touch", canary.to_str().unwrap()], "timeout_ms": 10000, "approval": doc, "approval_sig": sig}))
        .await;
    assert_eq!(error_of(&lines), "audit_unavailable", "{lines:?}");
    assert!(!canary.exists());

    // Room again: the same approval works (it was never consumed), and the log verifies.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let lines = rig
        .run(json!({"argv": ["touch", canary.to_str().unwrap()], "timeout_ms": 10000, "approval": doc, "approval_sig": sig}))
        .await;
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}), "{lines:?}");
    assert!(canary.exists());
    let out = Command::new(bin("tether-agent"))
        .args(["audit", "verify", "--appliance-key", &rig.appliance_key])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    rig.agent = None;
}

/// A connection lost in the middle of a command: the agent keeps the command's signed
/// manifest in its spool, re-sends it on the session stream once it is back
/// (`ManifestBacklog`, capability `manifest-backlog/1`), and control records it in its
/// audit chain beside the command, so the vendor's copy is complete after all.
#[tokio::test]
async fn a_manifest_lost_with_the_connection_reaches_control_after_the_reconnect() {
    let mut c = common::cluster::Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let state = c.enroll("app-1");
    let policy =
        format!("{POLICY}\n[[classify]]\nargv = [\"sleep\", \"*\"]\nphase = \"observe\"\n");
    let customer = customer_dir(c.tmp(), &policy);
    let _agent = AgentProc::start(
        &state,
        &[b1.quic],
        &["--customer-dir", customer.to_str().unwrap()],
    );
    c.wait_connected("app-1", Some("edge-1")).await;
    let spool = state.join("manifest-spool");

    // A delivered manifest leaves the spool at once.
    let (code, out, err) = c.exec(&["app-1", "--", "echo", "hi"]);
    assert_eq!(code, 0, "{out} {err}");
    wait_for(Duration::from_secs(5), || async {
        let n = std::fs::read_dir(&spool).map_or(0, |d| d.count());
        (n == 0).then_some(())
    })
    .await
    .expect("a delivered manifest is not kept");

    // The broker dies while `sleep 30` runs.
    let exec = Command::new(bin("tether"))
        .args([
            "exec",
            "app-1",
            "--request-id",
            "req-lost",
            "--",
            "sleep",
            "30",
        ])
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = state.join("audit.jsonl");
    wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("req-lost")
            .then_some(())
    })
    .await
    .expect("the command starts");
    let listen = b1.quic;
    drop(b1); // SIGKILL
    let out = exec.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0));

    // Its manifest is spooled: signed, for the command that was cut off.
    let spooled = wait_for(Duration::from_secs(15), || async {
        let e = std::fs::read_dir(&spool).ok()?.next()?.ok()?;
        let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
        Some(v)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the manifest of the cut-off command is not spooled; appliance log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let manifest: Value = serde_json::from_str(spooled["manifest"].as_str().unwrap()).unwrap();
    assert_eq!(manifest["request_id"], "req-lost");
    assert_eq!(manifest["exec"]["argv"], json!(["sleep", "30"]));
    sig::verify(
        spooled["sig"].as_str().unwrap().as_bytes(),
        MANIFEST_NAMESPACE,
        spooled["manifest"].as_str().unwrap().as_bytes(),
    )
    .expect("the spooled manifest is signed by the appliance");

    // The broker comes back on the same address; the agent reconnects and re-sends.
    let _b1 = c.restart_broker("edge-1", listen);
    wait_for(Duration::from_secs(30), || async {
        let n = std::fs::read_dir(&spool).map_or(1, |d| d.count());
        (n == 0).then_some(())
    })
    .await
    .expect("the broker acknowledges the re-sent manifest");
    let export = c.tmp().join("audit.jsonl");
    let entry = wait_for(Duration::from_secs(10), || async {
        c.tether(&["audit", "export", "--out", export.to_str().unwrap()])
            .ok()?;
        std::fs::read_to_string(&export)
            .ok()?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["action"] == "appliance.exec.manifest")
    })
    .await
    .expect("control records the re-sent manifest");
    assert_eq!(
        entry["actor"],
        json!({"kind": "appliance", "name": "app-1"}),
        "{entry}"
    );
    assert_eq!(entry["details"]["request_id"], "req-lost", "{entry}");
    assert_eq!(
        entry["details"]["manifest"].as_str(),
        spooled["manifest"].as_str(),
        "the exact signed bytes"
    );
}

/// libfaketime, which `scripts/test` installs (Debian's `faketime`).
fn libfaketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
    ]
    .iter()
    .map(|d| Path::new(d).join("libfaketime.so.1"))
    .find(|p| p.exists())
}

/// Replay after the appliance's clock went forward past the pruning of the used id and
/// then back (design §4 attack 2c): the agent's own wall clock is moved under it with
/// libfaketime (its monotonic clock left alone), and the pruning horizon refuses the
/// approval it no longer remembers by id.
#[tokio::test]
async fn a_replay_after_the_clock_went_forward_past_pruning_and_back_is_refused() {
    let Some(lib) = libfaketime() else {
        eprintln!(
            "SKIPPED: libfaketime is not installed (scripts/test installs Debian's faketime)"
        );
        return;
    };
    let mut rig = Rig::new().await;
    let clock = rig.root().join("clock");
    std::fs::write(&clock, "+0d\n").unwrap();
    rig.start_agent_env(
        &[],
        &[
            ("LD_PRELOAD", lib.as_os_str()),
            ("FAKETIME_TIMESTAMP_FILE", clock.as_os_str()),
            ("FAKETIME_NO_CACHE", "1".as_ref()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
        ],
    )
    .await;
    let canary = rig.canary("clock");
    let argv = ["touch", canary.to_str().unwrap()];
    let (doc, sig) = rig.approve(&argv, 10_000).await;
    let approved =
        json!({"argv": argv, "timeout_ms": 10_000, "approval": doc, "approval_sig": sig});
    let lines = rig.run(approved.clone()).await;
    assert!(canary.exists(), "{lines:?}");
    std::fs::remove_file(&canary).unwrap();

    // Two days later (on the agent's clock) the approval is long expired, and the next
    // approved command's admission prunes its id from the ledger.
    std::fs::write(&clock, "+2d\n").unwrap();
    let lines = rig.run(approved.clone()).await;
    assert_eq!(error_of(&lines), "approval_expired", "{lines:?}");
    let later = rig.canary("later");
    let later_argv = ["touch", later.to_str().unwrap()];
    let (doc2, sig2) = rig.approve(&later_argv, 10_000).await;
    let lines = rig
        .run(json!({"argv": later_argv, "timeout_ms": 10_000, "approval": doc2, "approval_sig": sig2}))
        .await;
    assert!(later.exists(), "{lines:?}");

    // The clock is set back to when the approval was valid: replay refused all the same.
    std::fs::write(&clock, "+0d\n").unwrap();
    let lines = rig.run(approved).await;
    assert_eq!(error_of(&lines), "approval_replayed", "{lines:?}");
    assert!(
        format!("{lines:?}").contains("pruning horizon"),
        "refused by the horizon, the id itself forgotten: {lines:?}"
    );
    assert!(!canary.exists(), "nothing ran");
}

/// A TCP echo server on 127.0.0.1 standing in for the customer's resource.
async fn open_tunnel(rig: &Rig, body: Value) -> (u16, Value) {
    let resp = http()
        .post(rig.broker.url("/v1/sessions/app-1/tunnels"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Plan a ten-minute tunnel to `echo`, have the customer sign it, open it; the answer.
async fn open_ten_minutes(rig: &Rig) -> Value {
    open_signed(rig, 600).await
}

/// Plan a tunnel of `duration_s` to `echo`, have the customer sign it, open it; the
/// answer.
async fn open_signed(rig: &Rig, duration_s: u64) -> Value {
    let ask = json!({"resource": "echo", "privilege": "rw", "duration_s": duration_s, "idle_timeout_s": duration_s});
    let mut plan_req = ask.clone();
    plan_req["plan"] = json!(true);
    let (_, plan) = open_tunnel(rig, plan_req).await;
    let (doc, sig) = rig.sign(plan["plan"].as_str().unwrap());
    let mut body = ask;
    body["approval"] = json!(doc);
    body["approval_sig"] = json!(sig);
    let (status, v) = open_tunnel(rig, body).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn tunnel_views(rig: &Rig) -> Vec<Value> {
    http()
        .get(rig.broker.url("/v1/tunnels"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Break glass the way a compromised vendor would try it, through the standalone
/// broker's admin API against a real agent: no approval, a longer duration or more
/// connections than signed, another resource; then the approved tunnel carries bytes to
/// exactly the customer's target, once, for exactly the signed time, by the agent's clock.
#[tokio::test]
async fn a_tunnel_opens_once_to_the_customers_target_for_the_signed_time() {
    tunnel_for_the_signed_time("quic").await;
}

/// The same over TLS/TCP: stream resets carry the close reasons (`limit`, `expired`) as
/// QUIC's `RESET_STREAM` codes do.
#[tokio::test]
async fn a_tunnel_over_tcp_opens_once_for_the_signed_time_with_the_same_reasons() {
    tunnel_for_the_signed_time("tcp").await;
}

async fn tunnel_for_the_signed_time(transport: &str) {
    let mut rig = Rig::new().await;
    if transport == "tcp" {
        rig.restart_agent_over_tcp().await;
    }
    let rig = rig;
    let echo = echo_server().await;
    // A name, resolved and pinned by the agent at activation.
    let target = format!("localhost:{}", echo.port());
    std::fs::write(rig.customer.join("policy.toml"), tunnel_policy(&target)).unwrap();
    let ask = json!({"resource": "echo", "privilege": "rw", "duration_s": 3, "max_connections": 1, "idle_timeout_s": 3, "request_id": "req-bg", "reason": "INC-9"});

    // The agent plans from the customer's own policy: target and phase are its own.
    let mut plan_req = ask.clone();
    plan_req["plan"] = json!(true);
    let (status, plan) = open_tunnel(&rig, plan_req).await;
    assert_eq!(status, 200, "{plan}");
    let doc = plan["plan"].as_str().unwrap().to_owned();
    let parsed: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(parsed["break_glass"]["target"], target.as_str());
    assert_eq!(parsed["break_glass"]["network"], "tether-tunnel");
    assert_eq!(parsed["phase"], "operate");
    let (doc, sig) = rig.sign(&doc);
    let with = |mut body: Value| {
        body["approval"] = json!(doc);
        body["approval_sig"] = json!(sig);
        body
    };

    // Refusals: none opens anything. No approval; a longer session or more connections
    // than signed; a resource or privilege the customer did not declare.
    let (status, v) = open_tunnel(&rig, ask.clone()).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("approval_required")),
        "{v}"
    );
    for (field, value, expected) in [
        ("duration_s", json!(3600), "approval_invalid"),
        ("max_connections", json!(5), "approval_invalid"),
        ("resource", json!("payroll-db"), "denied_by_policy"),
        ("privilege", json!("admin"), "denied_by_policy"),
    ] {
        let mut changed = ask.clone();
        changed[field] = value;
        let (status, v) = open_tunnel(&rig, with(changed)).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (403, Some(expected)),
            "{field}: {v}"
        );
    }
    assert!(tunnel_views(&rig).await.is_empty());

    // Approved: bytes reach the customer's echo server and come back.
    let (status, v) = open_tunnel(&rig, with(ask.clone())).await;
    assert_eq!(status, 200, "{v}");
    let opened = Instant::now();
    let listen: std::net::SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c1 = tokio::net::TcpStream::connect(listen).await.unwrap();
    c1.write_all(b"hello through the appliance").await.unwrap();
    let mut got = vec![0u8; 27];
    tokio::time::timeout(Duration::from_secs(5), c1.read_exact(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&got, b"hello through the appliance");

    // A second connection is over the signed maximum: closed with `limit`.
    let mut c2 = tokio::net::TcpStream::connect(listen).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), c2.read(&mut b))
        .await
        .expect("closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // Replay of the used approval: refused.
    let (status, v) = open_tunnel(&rig, with(ask.clone())).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("approval_replayed")),
        "{v}"
    );

    // Traffic keeps the connection from idling (3 s) before the session's end.
    tokio::time::sleep_until((opened + Duration::from_millis(1500)).into()).await;
    c1.write_all(b"!").await.unwrap();
    c1.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"!");

    // The agent's timer ends it at 3 s: the open connection is closed, with the reason.
    let n = tokio::time::timeout(Duration::from_secs(10), c1.read(&mut b))
        .await
        .expect("the tunnel closes at expiry");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(2_500),
        "ended early: {lived:?}"
    );
    let view = wait_for(Duration::from_secs(5), || async {
        tunnel_views(&rig)
            .await
            .into_iter()
            .find(|t| t["ended"].is_string() && t["connections"].as_array().unwrap().len() == 2)
    })
    .await
    .expect("the broker records the reasons");
    assert_eq!(view["ended"], "expired", "{view}");
    let reasons: Vec<&str> = view["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"limit") && reasons.contains(&"expired"),
        "{view}"
    );
    // And nothing listens for it any more.
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());

    // The customer's log has the whole story.
    let log = std::fs::read_to_string(rig.state.join("audit.jsonl")).unwrap();
    for action in [
        "tunnel.requested",
        "tunnel.refused",
        "approval.consumed",
        "session.activated",
        "connection.closed",
        "session.ended",
    ] {
        assert!(
            log.contains(&format!("\"action\":\"{action}\"")),
            "{action} missing"
        );
    }
    assert!(log.contains("\"reason\":\"expired\""));
}

/// The customer closes the resource's phase while a tunnel is active: the agent ends
/// it (`revoked`) within about a second, connections included.
#[tokio::test]
async fn the_customer_closing_the_phase_ends_an_active_tunnel() {
    let rig = Rig::new().await;
    let echo = echo_server().await;
    let policy = tunnel_policy(&echo.to_string());
    std::fs::write(rig.customer.join("policy.toml"), &policy).unwrap();
    let v = open_ten_minutes(&rig).await;
    let listen: std::net::SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();

    let closed = policy.replace(
        "[phases.operate]\nenabled = true",
        "[phases.operate]\nenabled = false",
    );
    assert_ne!(closed, policy);
    std::fs::write(rig.customer.join("policy.toml"), closed).unwrap();
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
        .await
        .expect("the tunnel ends");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    eprintln!("tunnel ended {:?} after the policy change", t.elapsed());
    let view = wait_for(Duration::from_secs(5), || async {
        tunnel_views(&rig)
            .await
            .into_iter()
            .find(|t| t["ended"].is_string())
    })
    .await
    .unwrap();
    assert_eq!(view["ended"], "revoked", "{view}");
}

/// The appliance loses its broker while a tunnel is active. The session outlives the
/// loss by the customer's `teardown_on_disconnect_after` and no more: with a broker back
/// within it the session stays active; with none for that long the agent ends it itself
/// (`disconnected`) and says so in the customer's log; nothing waits for the vendor.
#[tokio::test]
async fn losing_the_broker_longer_than_the_customers_limit_ends_an_active_tunnel() {
    let mut rig = Rig::new().await;
    let echo = echo_server().await;
    let policy = |grace: &str| {
        format!(
            "{}\n[limits]\nteardown_on_disconnect_after = \"{grace}\"\n",
            tunnel_policy(&echo.to_string())
        )
    };
    std::fs::write(rig.customer.join("policy.toml"), policy("8s")).unwrap();
    let v = open_ten_minutes(&rig).await;
    let id = v["session_id"].as_u64().unwrap().to_string();
    let log = rig.state.join("audit.jsonl");
    let ended = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("\"action\":\"session.ended\""))
            .map(str::to_owned)
    };

    // 1. The broker dies (SIGKILL: no goodbye reaches the agent) and comes back on the same
    // address at once: the agent reconnects well within the 8 s, and the session lives.
    let killed = Instant::now();
    let quic = rig.broker.quic;
    let _ = rig.broker.child.kill();
    let config = rig.root().join("b1-again.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(rig.root().join("b1.toml"))
            .unwrap()
            .replace(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"{quic}\""),
            ),
    )
    .unwrap();
    rig.broker = BrokerProc::start(&config);
    rig.broker.wait_session("app-1").await;
    tokio::time::sleep_until((killed + Duration::from_secs(12)).into()).await;
    assert_eq!(
        ended(),
        None,
        "the session ended with a broker back in time"
    );
    let listed = Command::new(bin("tether-agent"))
        .args(["session", "list", "--state-dir"])
        .arg(&rig.state)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&id),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("\"action\":\"session.detached\""));

    // 2. The customer shortens the limit to 3 s; the broker dies for good. The agent ends
    // the session once it has had no broker for 3 s (after noticing the loss from missed
    // heartbeats, about 3 s more), never before.
    // Atomically: a half-written policy would end the session as no longer allowed.
    write_atomic(&rig.customer.join("policy.toml"), &policy("3s"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    let _ = rig.broker.child.kill();
    let line = wait_for(Duration::from_secs(20), || async { ended() })
        .await
        .expect("the agent ends the session itself");
    let after = killed.elapsed();
    assert!(line.contains("\"reason\":\"disconnected\""), "{line}");
    assert!(
        after >= Duration::from_secs(3) && after < Duration::from_secs(12),
        "ended {after:?} after the broker died"
    );
    eprintln!("session ended {after:?} after the broker died");
    rig.agent = None;
}

/// The customer sees the active session on the appliance and ends it there
/// (`tether-agent session list|end`): the vendor's connection closes `customer_ended`.
#[tokio::test]
async fn the_customer_lists_and_ends_a_tunnel_on_the_appliance() {
    let rig = Rig::new().await;
    let echo = echo_server().await;
    // One session at a time.
    std::fs::write(
        rig.customer.join("policy.toml"),
        format!(
            "{}\n[limits]\nmax_tunnel_sessions = 1\n",
            tunnel_policy(&echo.to_string())
        ),
    )
    .unwrap();
    let v = open_ten_minutes(&rig).await;
    // A second session is over the customer's limit: refused before its approval is
    // looked at, so the same approval opens it once the first has ended.
    let ask =
        json!({"resource": "echo", "privilege": "rw", "duration_s": 60, "idle_timeout_s": 60});
    let mut plan_req = ask.clone();
    plan_req["plan"] = json!(true);
    let (_, plan) = open_tunnel(&rig, plan_req).await;
    let (doc, sig) = rig.sign(plan["plan"].as_str().unwrap());
    let mut second = ask;
    second["approval"] = json!(doc);
    second["approval_sig"] = json!(sig);
    let (status, refused) = open_tunnel(&rig, second.clone()).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("limit")),
        "{refused}"
    );
    let id = v["session_id"].as_u64().unwrap();
    let listen: std::net::SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();

    let agent = |args: &[&str]| {
        let out = Command::new(bin("tether-agent"))
            .args(args)
            .arg("--state-dir")
            .arg(&rig.state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = agent(&["session", "list"]);
    assert!(
        listed.contains(&id.to_string()) && listed.contains("echo/rw"),
        "{listed}"
    );
    agent(&["session", "end", &id.to_string()]);
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
        .await
        .expect("the connection closes");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let view = wait_for(Duration::from_secs(5), || async {
        tunnel_views(&rig)
            .await
            .into_iter()
            .find(|t| t["ended"].is_string() && !t["connections"].as_array().unwrap().is_empty())
    })
    .await
    .unwrap();
    assert_eq!(view["ended"], "customer_ended", "{view}");
    assert_eq!(view["connections"][0], "customer_ended", "{view}");
    assert!(agent(&["session", "list"]).contains("no active break-glass session"));
    let (status, v) = open_tunnel(&rig, second).await;
    assert_eq!(status, 200, "the refused approval was not used up: {v}");
}

/// The one-time credential: minted by the customer's command as the phase's user, sealed
/// to the operator's one-time key named in the signed approval (nobody else opens it, and
/// the secret is in no log), revoked when the session ends, and revoked after a `kill -9`
/// of the agent when it starts again.
#[tokio::test]
async fn a_tunnel_credential_is_sealed_to_the_operator_and_revoked_even_after_a_crash() {
    use base64::Engine as _;
    let mut rig = Rig::new().await;
    let echo = echo_server().await;
    let secret = format!("s3cr3t-{}", tether_ops::approval::new_approval_id());
    let marker = rig.canary("revoked");
    let (mint, _) = credential_commands(rig.root(), &secret, &marker);
    let policy = credential_policy(&echo.to_string(), rig.root());
    std::fs::write(rig.customer.join("policy.toml"), policy).unwrap();

    let operator = age::x25519::Identity::generate();
    let recipient = operator.to_public().to_string();
    let open = |duration_s: u64| {
        let (rig, mint, recipient) = (&rig, &mint, recipient.clone());
        async move {
            let ask = json!({"resource": "echo", "privilege": "rw", "duration_s": duration_s, "idle_timeout_s": duration_s, "recipient": recipient});
            let mut plan_req = ask.clone();
            plan_req["plan"] = json!(true);
            let (_, plan) = open_tunnel(rig, plan_req).await;
            let doc = plan["plan"].as_str().unwrap().to_owned();
            // The customer signs the very commands and the operator's key.
            let parsed: Value = serde_json::from_str(&doc).unwrap();
            assert_eq!(parsed["break_glass"]["recipient"], recipient.as_str());
            assert_eq!(
                parsed["break_glass"]["credential"]["mint"]["argv"][0],
                mint.to_str().unwrap()
            );
            let (doc, sig) = rig.sign(&doc);
            let mut body = ask;
            body["approval"] = json!(doc);
            body["approval_sig"] = json!(sig);
            let (status, v) = open_tunnel(rig, body).await;
            assert_eq!(status, 200, "{v}");
            v
        }
    };

    // 1. A two-second session: the operator opens the credential; it is revoked at the end.
    let v = open(2).await;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(v["sealed_credential"].as_str().unwrap())
        .unwrap();
    assert!(!sealed.is_empty());
    let opened = age::decrypt(&operator, &sealed).expect("the operator's key opens it");
    let cred: Value = serde_json::from_slice(&opened).unwrap();
    assert_eq!(cred["secret"], secret.as_str());
    assert_eq!(cred["ttl"], "2", "{{duration_s}} substituted");
    let cred_id = cred["credential_id"].as_str().unwrap().to_owned();
    // Intercepted (as a compromised control or broker would): useless without the key.
    assert!(age::decrypt(&age::x25519::Identity::generate(), &sealed).is_err());
    let revoked = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(&marker)
            .ok()
            .filter(|m| m.contains(&cred_id))
    })
    .await
    .expect("revoked at expiry");
    assert_eq!(revoked.trim(), cred_id);

    // 2. A long session, then `kill -9` of the agent: nothing revokes it until the agent
    // starts again, which revokes it first thing.
    std::fs::remove_file(&marker).unwrap();
    let v = open(600).await;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(v["sealed_credential"].as_str().unwrap())
        .unwrap();
    let cred: Value = serde_json::from_slice(&age::decrypt(&operator, &sealed).unwrap()).unwrap();
    let cred_id = cred["credential_id"].as_str().unwrap().to_owned();
    rig.agent = None; // SIGKILL
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!marker.exists(), "nothing ran the revoke yet");
    rig.start_agent().await;
    let revoked = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(&marker).ok()
    })
    .await
    .expect("revoked after the restart");
    assert_eq!(revoked.trim(), cred_id);
    let log = wait_for(Duration::from_secs(5), || async {
        std::fs::read_to_string(rig.state.join("audit.jsonl"))
            .ok()
            .filter(|l| l.contains("recovered_after_crash"))
    })
    .await
    .expect("the log says why");
    // The session cut off by the crash has its signed manifest too, from the log's
    // record: it verifies against its approval (the last one signed).
    let (manifest, manifest_sig) = session_manifests(&rig).pop().unwrap();
    let m: Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(m["end_reason"], "recovered_after_crash", "{m}");
    assert_eq!(
        (
            &m["credential"]["id"],
            &m["credential"]["minted"],
            &m["credential"]["delivered"],
            &m["credential"]["revoked"]
        ),
        (&json!(cred_id), &json!(true), &json!(true), &json!(true)),
        "{m}"
    );
    let approvers = tether_ops::approvers::Approvers::parse(
        &std::fs::read_to_string(rig.customer.join("approvers.toml")).unwrap(),
    )
    .unwrap();
    let verified = tether_ops::verify::verify_session(
        &std::fs::read(rig.root().join("approval.json")).unwrap(),
        &std::fs::read(rig.root().join("approval.json.sig")).unwrap(),
        manifest.as_bytes(),
        manifest_sig.as_bytes(),
        &approvers,
        60_000,
    );
    assert!(verified.is_ok(), "{verified:?}");

    // The secret is in no log: not the customer's audit log, not the broker's.
    assert!(!log.contains(&secret), "secret in the appliance log");
    let broker_logs = rig.broker.logs.lock().unwrap().join("\n");
    assert!(!broker_logs.contains(&secret), "secret in the broker's log");
}

/// The appliance log's `session.manifest` entries, in order: (manifest, signature).
fn session_manifests(rig: &Rig) -> Vec<(String, String)> {
    std::fs::read_to_string(rig.state.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["action"] == "session.manifest")
        .map(|e| {
            (
                e["details"]["manifest"].as_str().unwrap().to_owned(),
                e["details"]["sig"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `tether ops verify --session` on files under the rig's root: (exit code, stdout).
fn verify_session(rig: &Rig, approval: &str, manifest: &str) -> (Option<i32>, String) {
    let out = Command::new(bin("tether"))
        .args(["ops", "verify", "--session", "--approval"])
        .arg(rig.root().join(approval))
        .arg("--manifest")
        .arg(rig.root().join(manifest))
        .arg("--customer-keys")
        .arg(rig.customer.join("approvers.toml"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

/// At its end the appliance signs the session's manifest: the approval's hash, the
/// tunnel as opened, its times, each connection with its bytes and close reason. The
/// customer's log has it; `tether ops verify --session` accepts it with its approval and
/// refuses it edited, or with another approval.
#[tokio::test]
async fn a_session_manifest_binds_the_approval_and_verifies_offline() {
    let rig = Rig::new().await;
    let echo = echo_server().await;
    std::fs::write(
        rig.customer.join("policy.toml"),
        tunnel_policy(&echo.to_string()),
    )
    .unwrap();
    let ask = json!({"resource": "echo", "privilege": "rw", "duration_s": 3, "idle_timeout_s": 3, "request_id": "req-m", "reason": "INC-12"});
    let mut plan_req = ask.clone();
    plan_req["plan"] = json!(true);
    let (_, plan) = open_tunnel(&rig, plan_req).await;
    let (doc, sig) = rig.sign(plan["plan"].as_str().unwrap());
    let mut body = ask;
    body["approval"] = json!(doc);
    body["approval_sig"] = json!(sig);
    let (status, v) = open_tunnel(&rig, body).await;
    assert_eq!(status, 200, "{v}");
    let session_id = v["session_id"].as_u64().unwrap();
    let listen: std::net::SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
    c.write_all(b"twelve bytes").await.unwrap();
    let mut got = [0u8; 12];
    c.read_exact(&mut got).await.unwrap();
    let agent_status = |key: &'static str| {
        let rig = &rig;
        async move {
            rig.broker
                .sessions()
                .await
                .into_iter()
                .find(|s| s["appliance_id"] == "app-1")
                .and_then(|s| s["agent_status"][key].as_str().map(str::to_owned))
        }
    };
    wait_for(Duration::from_secs(3), || async {
        (agent_status("tunnel.active").await.as_deref() == Some("1")).then_some(())
    })
    .await
    .expect("the agent's status counts the active session");
    // The agent's timer ends it at 3 s.
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut got))
        .await
        .expect("the tunnel closes at expiry");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    let (manifest, manifest_sig) = wait_for(Duration::from_secs(10), || async {
        session_manifests(&rig).pop()
    })
    .await
    .expect("the session manifest is in the appliance log");
    let m: Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(m["type"], "tether.session-manifest.v1", "{m}");
    assert_eq!(m["session_id"], session_id.to_string());
    assert_eq!(m["request_id"], "req-m");
    assert_eq!(
        m["approval"]["sha256"],
        tether_ops::sha256_hex(doc.as_bytes())
    );
    assert_eq!(m["target"], echo.to_string());
    assert_eq!(m["pinned"], json!([echo.to_string()]));
    assert_eq!(m["end_reason"], "expired");
    assert_eq!(m["connections_total"], 1, "{m}");
    let conn = &m["connections"][0];
    assert_eq!(
        (
            &conn["to_target_bytes"],
            &conn["from_target_bytes"],
            &conn["reason"]
        ),
        (&json!(12), &json!(12), &json!("expired")),
        "{m}"
    );
    assert_eq!(m["teardown"], "none");
    assert_eq!(m["credential"]["minted"], false);
    let lived = m["ended_ms"].as_i64().unwrap() - m["activated_ms"].as_i64().unwrap();
    assert!((3000..4000).contains(&lived), "{m}");
    // The log's end (just after) names it.
    let named = format!(
        "\"manifest_sha256\":\"{}\"",
        tether_ops::sha256_hex(manifest.as_bytes())
    );
    wait_for(Duration::from_secs(5), || async {
        std::fs::read_to_string(rig.state.join("audit.jsonl"))
            .unwrap()
            .contains(&named)
            .then_some(())
    })
    .await
    .expect("session.ended names the manifest");

    // The agent's status counts what it relayed: both ways, every connection.
    wait_for(Duration::from_secs(5), || async {
        (agent_status("tunnel.active").await.as_deref() == Some("0")
            && agent_status("tunnel.bytes").await.as_deref() == Some("24")
            && agent_status("tunnel.connections").await.as_deref() == Some("1"))
        .then_some(())
    })
    .await
    .expect("the agent's status counts the tunnel's bytes and connections");

    // Offline, with no agent: the approval (approval.json and .sig, as the customer signed
    // them) and the manifest.
    std::fs::write(rig.root().join("session.json"), &manifest).unwrap();
    std::fs::write(rig.root().join("session.json.sig"), &manifest_sig).unwrap();
    let (code, said) = verify_session(&rig, "approval.json", "session.json");
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.starts_with("valid:") && said.contains("ended_in_time"),
        "{said}"
    );

    // Edited: the session claimed shorter than it was.
    let edited = manifest.replace("\"end_reason\":\"expired\"", "\"end_reason\":\"closed\"");
    assert_ne!(edited, manifest);
    std::fs::write(rig.root().join("edited.json"), &edited).unwrap();
    std::fs::write(rig.root().join("edited.json.sig"), &manifest_sig).unwrap();
    let (code, said) = verify_session(&rig, "approval.json", "edited.json");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("manifest_signature"), "{said}");

    // Another genuine approval of the customer's (another session): not this one's.
    let ask = json!({"resource": "echo", "privilege": "rw", "duration_s": 60, "idle_timeout_s": 60, "plan": true});
    let (_, plan) = open_tunnel(&rig, ask).await;
    rig.sign(plan["plan"].as_str().unwrap());
    let (code, said) = verify_session(&rig, "approval.json", "session.json");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("approval_hash"), "{said}");
    // A usage error: a file that is not there.
    let (code, _) = verify_session(&rig, "missing.json", "session.json");
    assert_eq!(code, Some(2));
}

/// A revoke command that fails is retried with backoff (1 s, 2 s, 4 s, 8 s), each failure
/// in the customer's log and the session flagged in the agent's `Status`
/// (`tunnel.teardown_failed`) until it succeeds; one that still fails after the last
/// retry is signed as failed in the manifest and run again when the agent starts again.
#[tokio::test]
async fn a_failing_revoke_is_retried_flagged_and_run_again_at_the_next_start() {
    let mut rig = Rig::new().await;
    let echo = echo_server().await;
    let bin_dir = rig.root().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    chmod(&bin_dir, 0o755);
    // Fails while the counter is at most the number in `fail`, then writes the marker.
    let (counter, fail, marker) = (
        rig.canary("count"),
        rig.canary("fail"),
        rig.canary("revoked"),
    );
    let revoke = bin_dir.join("revoke");
    std::fs::write(
        &revoke,
        format!(
            "#!/bin/sh\nn=$(($(cat {c} 2>/dev/null || echo 0) + 1))\necho $n > {c}\n[ $n -le $(cat {f}) ] && exit 1\necho \"$1\" >> {m}\n",
            c = counter.display(),
            f = fail.display(),
            m = marker.display()
        ),
    )
    .unwrap();
    chmod(&revoke, 0o755);
    std::fs::write(
        rig.customer.join("policy.toml"),
        format!(
            "{POLICY}\n[[resource]]\nname = \"echo\"\ntarget = \"{echo}\"\n[resource.privilege.rw]\nrevoke = {{ argv = [\"{}\", \"{{session_id}}\"], deadline_ms = 5000 }}\n",
            revoke.display()
        ),
    )
    .unwrap();
    let open = |duration_s: u64| {
        let rig = &rig;
        async move {
            open_signed(rig, duration_s).await["session_id"]
                .as_u64()
                .unwrap()
                .to_string()
        }
    };
    let flagged = || async {
        rig.broker
            .sessions()
            .await
            .into_iter()
            .find(|s| s["appliance_id"] == "app-1")
            .and_then(|s| {
                s["agent_status"]["tunnel.teardown_failed"]
                    .as_str()
                    .map(str::to_owned)
            })
    };
    let log = rig.state.join("audit.jsonl");
    let entries = |action: &str, id: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["action"] == action && e["details"]["session_id"] == id)
            .count()
    };

    // 1. Fails twice, then succeeds (attempts at about 0, 1 and 3 s after the end): the
    // flag shows meanwhile and goes; the manifest says ok.
    std::fs::write(&fail, "2").unwrap();
    let id = open(1).await;
    let shown = wait_for(Duration::from_secs(10), flagged)
        .await
        .expect("the failing teardown is flagged in Status");
    assert_eq!(shown, id);
    let revoked = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(&marker).ok()
    })
    .await
    .expect("revoked at the third attempt");
    assert_eq!(revoked.trim(), id);
    assert_eq!(entries("teardown.failed", &id), 2);
    assert_eq!(entries("credential.revoked", &id), 1);
    let m = wait_for(Duration::from_secs(5), || async {
        session_manifests(&rig).pop()
    })
    .await
    .unwrap();
    let m: Value = serde_json::from_str(&m.0).unwrap();
    assert_eq!(
        (&m["teardown"], &m["credential"]["revoked"]),
        (&json!("ok"), &json!(true)),
        "{m}"
    );
    wait_for(Duration::from_secs(15), || async {
        flagged().await.is_none().then_some(())
    })
    .await
    .expect("the flag goes once revoked");

    // 2. Fails five times: every retry used up (about 15 s), the manifest says failed, the
    // flag stays; the agent's next start runs it again and it succeeds.
    std::fs::remove_file(&marker).unwrap();
    std::fs::write(&counter, "0").unwrap();
    std::fs::write(&fail, "5").unwrap();
    let id = open(1).await;
    let m = wait_for(Duration::from_secs(30), || async {
        session_manifests(&rig)
            .into_iter()
            .map(|(m, _)| serde_json::from_str::<Value>(&m).unwrap())
            .find(|m| m["session_id"] == id.as_str())
    })
    .await
    .expect("the manifest is signed once the retries are used up");
    assert!(m["teardown"]["failed"].is_string(), "{m}");
    assert_eq!(m["credential"]["revoked"], false);
    assert_eq!(entries("teardown.failed", &id), 5);
    wait_for(Duration::from_secs(5), || async {
        (entries("session.ended", &id) == 1).then_some(())
    })
    .await
    .expect("the session ends after its manifest");
    assert_eq!(flagged().await.as_deref(), Some(id.as_str()));
    assert!(!marker.exists());
    rig.start_agent().await;
    let revoked = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(&marker).ok()
    })
    .await
    .expect("revoked at the next start");
    assert_eq!(revoked.trim(), id);
    wait_for(Duration::from_secs(5), || async {
        (entries("credential.revoked", &id) == 1).then_some(())
    })
    .await
    .expect("the log records it");
}

/// Break glass the vendor's real way, through control: `tether tunnel request` (a fresh
/// one-time key), the customer's stock `ssh-keygen` signature, `tether tunnel open`
/// printing its local address, bytes through operator CLI → control → broker → agent →
/// the customer's target and back with half-close, the credential opened once (a second
/// fetch refused), a replayed or widened approval refused, `tether tunnel close` ending
/// the session on the appliance with the revoke run, every step audited by control, and
/// the secret in none of control's database, audit export or logs, nor the broker's.
#[tokio::test]
async fn break_glass_through_control_request_sign_open_credential_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_server().await;
    let secret = format!("s3cr3t-{}", tether_ops::approval::new_approval_id());
    let marker = std::sync::OnceLock::new();
    let (c, b1, _agent, root) = through_control(|root| {
        let canary_dir = root.join("canary");
        std::fs::create_dir(&canary_dir).unwrap();
        chmod(&canary_dir, 0o777);
        let m = canary_dir.join("revoked");
        credential_commands(root, &secret, &m);
        marker.set(m).unwrap();
        credential_policy(&echo.to_string(), root)
    })
    .await;
    let marker = marker.into_inner().unwrap();

    // The request: the appliance's own document, with the operator's one-time key in it.
    let doc = request_signed(
        &c,
        &root,
        "request.json",
        &[
            "--resource",
            "echo",
            "--privilege",
            "rw",
            "--duration",
            "2m",
            "--reason",
            "INC-9",
        ],
    );
    let plan = tether_ops::tunnel::TunnelApproval::parse(doc.as_bytes()).expect("canonical");
    assert_eq!(plan.break_glass.target, echo.to_string());
    assert_eq!(plan.break_glass.duration_s, 120);
    assert!(plan.break_glass.recipient.starts_with("age1"), "{doc}");
    assert!(plan.break_glass.credential.is_some());
    assert_eq!(
        std::fs::read_dir(c.ops.join("tunnel-keys"))
            .unwrap()
            .count(),
        1,
        "the one-time key stays with the operator"
    );

    // A vendor widening the signed document (a longer session): refused by the appliance.
    let widened = doc.replace("\"duration_s\":120", "\"duration_s\":7200");
    assert_ne!(widened, doc);
    std::fs::write(root.join("widened.json"), &widened).unwrap();
    std::fs::copy(root.join("request.json.sig"), root.join("widened.json.sig")).unwrap();
    let open_cmd = |file: &str| tunnel_open_cmd(&c, &root, file);
    let out = open_cmd("widened.json").wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("approval_invalid"), "{err}");

    // The real one: the local address first, then bytes both ways.
    let (open, addr) = tunnel_open(&c, &root, "request.json").await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        // Half-close: the echo server sees the end, echoes the rest and closes.
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, got) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
            .await
            .expect("the echo comes back through control");
    got.unwrap();
    assert_eq!(back, payload, "every byte, in order, both ways");

    // The session as control knows it: no secret, bytes counted.
    let list: Value =
        serde_json::from_str(&c.tether(&["tunnel", "list", "--output", "json"]).unwrap()).unwrap();
    let t = &list["items"][0];
    let id = t["id"].as_str().unwrap().to_owned();
    assert_eq!(t["state"], "active", "{t}");
    assert_eq!(t["credential"], true, "{t}");
    let counted = wait_for(Duration::from_secs(10), || async {
        let v: Value =
            serde_json::from_str(&c.tether(&["tunnel", "list", "--output", "json"]).unwrap())
                .unwrap();
        // What control relays is the framed stream: the payload and the chunk headers.
        (v["items"][0]["bytes_up"].as_u64() >= Some(payload.len() as u64)).then_some(v)
    })
    .await;
    assert!(counted.is_some(), "control counts the bytes it relays");

    // Other operators of the same vendor: another operator can neither take the
    // credential nor connect through the session; a viewer cannot open one; an operator
    // certificate cannot pose as a broker dialing back. Each refusal leaves the
    // credential where it was.
    let mut others = Vec::new();
    for (name, role) in [("olga", "operator"), ("vic", "viewer")] {
        let bundle = root.join(format!("{name}.bundle.json"));
        c.tether(&[
            "operator",
            "invite",
            name,
            "--role",
            role,
            "--out",
            bundle.to_str().unwrap(),
        ])
        .unwrap();
        let dir = root.join(format!("config-{name}"));
        common::operators::tether(
            &dir,
            &[
                "login",
                "--bundle",
                bundle.to_str().unwrap(),
                "--control",
                &c.fleet.url(),
            ],
        )
        .unwrap();
        others.push(dir);
    }
    let olga = common::operators::tether(&others[0], &["tunnel", "credential", &id]).unwrap_err();
    assert!(olga.contains("not_your_tunnel"), "{olga}");
    let olga_http = common::operators::client_from(&c.fleet, Some(&others[0]), false);
    let resp = olga_http
        .get(format!("{}/v1/tunnels/{id}/connect", c.fleet.url()))
        .header("connection", "upgrade")
        .header("upgrade", "tether-tunnel/1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = olga_http
        .get(format!(
            "{}/v1/brokers/tunnels/{}",
            c.fleet.url(),
            "0".repeat(32)
        ))
        .header("connection", "upgrade")
        .header("upgrade", "tether-tunnel/1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "an operator is not a broker");
    let vic = common::operators::tether(
        &others[1],
        &[
            "tunnel",
            "request",
            "app-1",
            "--resource",
            "echo",
            "--privilege",
            "rw",
            "--reason",
            "x",
        ],
    )
    .unwrap_err();
    assert!(vic.contains("403"), "{vic}");

    // The credential: opened once with the one-time key; a second fetch is refused.
    let cred = c.tether(&["tunnel", "credential", &id]).unwrap();
    let cred: Value = serde_json::from_str(&cred).expect("the minted JSON");
    assert_eq!(cred["secret"], secret.as_str());
    let again = c.tether(&["tunnel", "credential", &id]).unwrap_err();
    assert!(again.contains("credential_already_fetched"), "{again}");

    // The same approval again: single use on the appliance.
    let out = open_cmd("request.json").wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("approval_replayed"), "{err}");

    // The vendor closes it: the appliance ends it, revokes the credential, and the open
    // command says why and exits.
    c.tether(&["tunnel", "close", &id]).unwrap();
    let ended = wait_exit(open, Duration::from_secs(20)).await;
    let (status, err) = ended.expect("tether tunnel open ends with its session");
    assert!(status.success(), "{err}");
    assert!(err.contains("ended: closed"), "{err}");
    assert!(err.contains("connection from"), "{err}");
    let revoked = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(&marker).ok()
    })
    .await
    .expect("the revoke command ran at the end");
    assert!(revoked.contains("cred-"), "{revoked}");
    // No connection through an ended session.
    let refused = c.tether(&["tunnel", "credential", &id]).unwrap_err();
    assert!(refused.contains("credential_already_fetched"), "{refused}");

    // Control's audit: who asked and why, the approval's hash, the hand-over, the close,
    // the end; and nowhere the secret.
    let export = root.join("audit.ndjson");
    c.tether(&["audit", "export", "--out", export.to_str().unwrap()])
        .unwrap();
    let audit = std::fs::read_to_string(&export).unwrap();
    for action in [
        "appliance.tunnel.open",
        "appliance.tunnel.credential",
        "appliance.tunnel.close",
        "appliance.tunnel.ended",
    ] {
        assert!(audit.contains(action), "{action} audited");
    }
    assert!(audit.contains("INC-9"));
    assert!(audit.contains("approval_sha256"));
    assert!(audit.contains("approval_replayed"), "the replay is audited");
    assert!(
        audit.contains("manifest_sha256"),
        "the appliance's session manifest is audited with the end"
    );
    assert!(
        !audit.contains(&secret),
        "the secret is not in control's audit"
    );
    let db = std::fs::read(c.fleet.data.join("control.db")).unwrap_or_default();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret is not in control's database"
    );
    for (who, logs) in [("control", &c.fleet.control.logs), ("broker", &b1.logs)] {
        let logs = logs.lock().unwrap();
        assert!(
            !logs.iter().any(|l| l.contains(&secret)),
            "the secret is not in the {who}'s logs"
        );
    }
}

/// The customer resource is a real database: a throwaway PostgreSQL (`scripts/pg`). The
/// privilege's mint command creates a login role for this session only (`bg_<session>`)
/// and its revoke command drops it; the operator opens the credential, speaks the
/// PostgreSQL protocol through `tether tunnel open` as that role, and once the vendor
/// closes the session the role is gone from the database.
#[tokio::test]
async fn break_glass_to_postgresql_with_a_role_made_for_the_session_and_dropped_after() {
    use sqlx::Connection as _;
    let admin_url = std::env::var("TETHER_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "TETHER_TEST_PG_URL is not set: this test needs PostgreSQL. Run ./scripts/test, \
             or `export TETHER_TEST_PG_URL=$(./scripts/pg)` and run cargo test again"
        )
    });
    // postgres://USER@HOST:PORT/DB
    let rest = admin_url.split_once('@').expect("a user in the URL").1;
    let (target, db) = rest.split_once('/').expect("a database in the URL");
    let target = target.to_owned();
    let db = db.split('?').next().unwrap().to_owned();
    let marker = std::sync::OnceLock::new();
    let (c, _b1, _agent, root) = through_control(|root| {
        let bin_dir = root.join("pgbin");
        std::fs::create_dir(&bin_dir).unwrap();
        chmod(&bin_dir, 0o755);
        let canary = root.join("canary");
        std::fs::create_dir(&canary).unwrap();
        chmod(&canary, 0o777);
        let m = canary.join("dropped");
        let mint = bin_dir.join("mint");
        std::fs::write(
            &mint,
            format!(
                "#!/bin/sh\nset -e\nrole=\"bg_$1\"\npsql -q -v ON_ERROR_STOP=1 '{admin_url}' -c \"CREATE ROLE $role LOGIN\" >/dev/null\nprintf '{{\"credential_id\":\"%s\",\"user\":\"%s\",\"secret\":\"trust\"}}' \"$role\" \"$role\"\n"
            ),
        )
        .unwrap();
        let revoke = bin_dir.join("revoke");
        std::fs::write(
            &revoke,
            format!(
                "#!/bin/sh\nset -e\npsql -q -v ON_ERROR_STOP=1 '{admin_url}' -c \"DROP ROLE $1\" >/dev/null\necho \"$1\" >> {}\n",
                m.display()
            ),
        )
        .unwrap();
        for f in [&mint, &revoke] {
            chmod(f, 0o755);
        }
        marker.set(m).unwrap();
        format!(
            "{POLICY}\n[[resource]]\nname = \"orders-db\"\ntarget = \"{target}\"\n[resource.privilege.readonly]\nmint = {{ argv = [\"{}\", \"{{session_id}}\"], deadline_ms = 10000 }}\nrevoke = {{ argv = [\"{}\", \"{{credential_id}}\"], deadline_ms = 10000 }}\n",
            mint.display(),
            revoke.display()
        )
    })
    .await;
    let marker = marker.into_inner().unwrap();
    request_signed(
        &c,
        &root,
        "db.json",
        &[
            "--resource",
            "orders-db",
            "--privilege",
            "readonly",
            "--duration",
            "5m",
            "--reason",
            "INC-PG",
        ],
    );
    let (mut open, addr) = tunnel_open(&c, &root, "db.json").await;
    let list: Value =
        serde_json::from_str(&c.tether(&["tunnel", "list", "--output", "json"]).unwrap()).unwrap();
    let id = list["items"][0]["id"].as_str().unwrap().to_owned();
    let cred: Value =
        serde_json::from_str(&c.tether(&["tunnel", "credential", &id]).unwrap()).unwrap();
    let user = cred["user"].as_str().unwrap().to_owned();
    assert!(user.starts_with("bg_"), "{cred}");

    // A real PostgreSQL client through the tunnel, as the session's own role.
    let mut conn = sqlx::PgConnection::connect(&format!("postgres://{user}@{addr}/{db}"))
        .await
        .expect("PostgreSQL through the tunnel");
    let me: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(me, user);
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();

    // Closed by the vendor: the role is dropped, so the credential opens nothing anymore.
    c.tether(&["tunnel", "close", &id]).unwrap();
    let dropped = wait_for(Duration::from_secs(20), || async {
        std::fs::read_to_string(&marker).ok()
    })
    .await
    .expect("the revoke command ran");
    assert_eq!(dropped.trim(), user);
    let direct = format!("postgres://{user}@{target}/{db}");
    let err = sqlx::PgConnection::connect(&direct)
        .await
        .expect_err("the session's role is gone");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let _ = open.kill();
    let _ = open.wait();
}

/// A name of ours in `/etc/hosts`, removed on drop.
struct HostsName {
    name: String,
}

impl HostsName {
    const HOSTS: &'static str = "/etc/hosts";

    /// `name` resolving to `ip`; `None` when `/etc/hosts` cannot be written (not root).
    fn add(name: &str, ip: &str) -> Option<HostsName> {
        let h = HostsName { name: name.into() };
        h.point(ip).ok()?;
        Some(h)
    }

    /// Re-point the name (the file is rewritten in place: other lines are kept).
    fn point(&self, ip: &str) -> std::io::Result<()> {
        let text = std::fs::read_to_string(Self::HOSTS)?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.split_whitespace().any(|w| w == self.name))
            .map(str::to_owned)
            .collect();
        lines.push(format!("{ip} {}", self.name));
        std::fs::write(Self::HOSTS, lines.join("\n") + "\n")
    }
}

impl Drop for HostsName {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(Self::HOSTS) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.split_whitespace().any(|w| w == self.name))
                .collect();
            let _ = std::fs::write(Self::HOSTS, kept.join("\n") + "\n");
        }
    }
}

/// The customer's target is a DNS name; the agent resolves it once, at activation, and
/// pins the addresses. An attacker who re-points the name afterwards (here: its
/// `/etc/hosts` entry moves from 127.0.0.1 to 127.0.0.2, where an impostor listens on the
/// same port) gets no new connection to the impostor.
#[tokio::test]
async fn a_tunnel_keeps_the_address_pinned_at_activation_when_the_name_moves() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = format!(
        "bg-pin-{}.test",
        &tether_ops::approval::new_approval_id()[..8]
    );
    let Some(hosts) = HostsName::add(&name, "127.0.0.1") else {
        eprintln!("SKIPPED: /etc/hosts is not writable (run as root, as CI does)");
        return;
    };
    let rig = Rig::new().await;
    let echo = echo_server().await;
    // The impostor on the same port of another loopback address answers "impostor".
    let impostor = tokio::net::TcpListener::bind(("127.0.0.2", echo.port()))
        .await
        .expect("127.0.0.2 on the echo's port");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = impostor.accept().await {
            let _ = s.write_all(b"impostor").await;
        }
    });
    let target = format!("{name}:{}", echo.port());
    std::fs::write(rig.customer.join("policy.toml"), tunnel_policy(&target)).unwrap();
    let opened = open_ten_minutes(&rig).await;
    let listen = opened["listen"].as_str().unwrap().to_owned();
    let echo_once = |listen: String| async move {
        let mut s = tokio::net::TcpStream::connect(&listen).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        back
    };
    assert_eq!(echo_once(listen.clone()).await, b"ping");

    hosts.point("127.0.0.2").unwrap();
    let now: Vec<_> = tokio::net::lookup_host(&target).await.unwrap().collect();
    assert!(
        now.iter().all(|a| a.ip().to_string() == "127.0.0.2"),
        "the name moved: {now:?}"
    );
    // A new connection still goes to the address pinned at activation.
    assert_eq!(echo_once(listen).await, b"ping");
    drop(hosts);
}

/// Every close reaches the operator through control with its reason: a second connection
/// over `max_connections` is refused as `limit`, the open one is cut as `expired` when
/// the appliance's timer ends the session, and `tether tunnel open` says the session
/// ended as `expired` and exits; a connection after that is refused by control.
#[tokio::test]
async fn through_control_the_operator_sees_why_each_connection_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_server().await;
    let (c, _b1, _agent, root) = through_control(|_| tunnel_policy(&echo.to_string())).await;
    request_signed(
        &c,
        &root,
        "short.json",
        &[
            "--resource",
            "echo",
            "--privilege",
            "rw",
            "--duration",
            "4s",
            "--max-connections",
            "1",
            "--reason",
            "INC-10",
        ],
    );
    // The privilege mints nothing: the request asked again without a one-time key, and
    // keeps none.
    let keys = c.ops.join("tunnel-keys");
    assert!(
        std::fs::read_dir(&keys).map_or(true, |mut d| d.next().is_none()),
        "no one-time key kept for a session without a credential"
    );
    let (open, addr) = tunnel_open(&c, &root, "short.json").await;
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"one");
    // Over the limit: the appliance refuses, the local socket closes.
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut rest))
        .await
        .expect("the refused connection closes");
    assert!(n.map(|n| n == 0).unwrap_or(true));
    // The first one is cut when the session expires.
    let cut = tokio::time::timeout(Duration::from_secs(15), first.read_to_end(&mut rest))
        .await
        .expect("the connection ends with the session");
    assert!(cut.map(|n| n == 0).unwrap_or(true));
    let (_, ended) = wait_exit(open, Duration::from_secs(20))
        .await
        .expect("tether tunnel open ends with its session");
    assert!(ended.contains("closed: limit"), "{ended}");
    assert!(ended.contains("closed: expired"), "{ended}");
    assert!(ended.contains("ended: expired"), "{ended}");
    let list: Value =
        serde_json::from_str(&c.tether(&["tunnel", "list", "--output", "json"]).unwrap()).unwrap();
    assert_eq!(list["items"][0]["ended"], "expired", "{list}");
}

/// The broker holding a session's stream dies (SIGKILL) and comes back: the appliance
/// keeps the session through the customer's grace, control (told nothing) keeps routing
/// connections to whichever broker holds the appliance, and the vendor's close reaches
/// the agent on a new stream (`TunnelClose`), which ends the session and answers with its
/// signed session manifest; control audits the end with it.
#[tokio::test]
async fn a_session_outlives_its_brokers_restart_and_the_vendor_closes_it_with_its_manifest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_server().await;
    let (c, mut b1, _agent, root) = through_control(|_| {
        format!(
            "{}\n[limits]\nteardown_on_disconnect_after = \"60s\"\n",
            tunnel_policy(&echo.to_string())
        )
    })
    .await;
    request_signed(
        &c,
        &root,
        "r.json",
        &[
            "--resource",
            "echo",
            "--privilege",
            "rw",
            "--duration",
            "5m",
            "--reason",
            "INC-11",
            "--no-credential",
        ],
    );
    let (open, addr) = tunnel_open(&c, &root, "r.json").await;
    let echo_once = || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
        back
    };
    assert_eq!(echo_once().await, b"hi");

    let listen = b1.quic;
    let _ = b1.child.kill();
    let _ = b1.child.wait();
    let _b1 = c.restart_broker("edge-1", listen);
    c.wait_connected("app-1", Some("edge-1")).await;
    // Through the restarted broker, which never saw the session opened.
    let relayed = wait_for(Duration::from_secs(20), || async {
        (echo_once().await == b"hi").then_some(())
    })
    .await;
    assert!(relayed.is_some(), "the detached session still relays");

    let list: Value =
        serde_json::from_str(&c.tether(&["tunnel", "list", "--output", "json"]).unwrap()).unwrap();
    let id = list["items"][0]["id"].as_str().unwrap().to_owned();
    c.tether(&["tunnel", "close", &id]).unwrap();
    let (_, err) = wait_exit(open, Duration::from_secs(30))
        .await
        .expect("tether tunnel open ends with its session");
    assert!(err.contains("ended: closed"), "{err}");
    let export = root.join("audit.ndjson");
    c.tether(&["audit", "export", "--out", export.to_str().unwrap()])
        .unwrap();
    let ended: Value = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e.to_string().contains("appliance.tunnel.ended"))
        .expect("the end is audited");
    let text = ended.to_string();
    assert!(text.contains("manifest_sha256"), "{text}");
    assert!(text.contains("tether.session-manifest"), "{text}");
}
