//! The admission check attacked the way a compromised vendor would: with the customer's
//! real signature on one document and a frame that asks for something else. Customer
//! keys are made with stock `ssh-keygen`, and signatures come from both `ssh-keygen -Y
//! sign` and this crate, so interoperability stays proven.

use std::path::{Path, PathBuf};
use std::process::Command;

use ssh_key::{Algorithm, PrivateKey};
use tether_ops::approval::{self, ApplianceRef, Approval, ExecSpec, Expected};
use tether_ops::approvers::Approvers;
use tether_ops::policy::Policy;
use tether_ops::{sig, CommandFailure, Phase, APPROVAL_NAMESPACE, MANIFEST_NAMESPACE};
use tether_proto::CommandKind;

const NOW: i64 = 1_790_000_000_000;
const MIN: i64 = 60_000;

struct Customer {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Customer {
    /// A key made by `ssh-keygen -t ed25519`.
    fn new() -> Customer {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@acme", "-f"])
            .arg(&key)
            .output()
            .expect("ssh-keygen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Customer { dir, key }
    }

    fn public_line(&self) -> String {
        std::fs::read_to_string(self.key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn approvers(&self, not_before: &str, not_after: &str) -> Approvers {
        Approvers::parse(&format!(
            "[[key]]\nid = \"acme-ops\"\npublic_key = \"{}\"\nnot_before = \"{not_before}\"\nnot_after = \"{not_after}\"\n",
            self.public_line()
        ))
        .unwrap()
    }

    fn pinned(&self) -> Approvers {
        self.approvers("2026-01-01T00:00:00Z", "2027-12-31T00:00:00Z")
    }

    /// `ssh-keygen -Y sign -n NAMESPACE` over `bytes`.
    fn ssh_keygen_sign(&self, namespace: &str, bytes: &[u8]) -> Vec<u8> {
        let file = self.dir.path().join("doc.json");
        std::fs::write(&file, bytes).unwrap();
        let _ = std::fs::remove_file(sig_path(&file));
        let out = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", namespace, "-f"])
            .arg(&self.key)
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(sig_path(&file)).unwrap()
    }

    fn private(&self) -> PrivateKey {
        PrivateKey::read_openssh_file(&self.key).unwrap()
    }
}

fn sig_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".sig");
    s.into()
}

fn appliance(id: &str) -> ApplianceRef {
    ApplianceRef {
        id: id.into(),
        trust_domain: "acme.example".into(),
        key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJnoO0PB0+0sgEd8BzTU0m5nWrpyQsbHUVpuXOfOQh/x"
            .into(),
    }
}

fn exec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        kind: CommandKind::Exec,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env_allowlist: vec![],
        deadline_ms: 60_000,
        stdin_sha256: String::new(),
    }
}

fn policy() -> Policy {
    Policy::parse(
        b"[phases.operate]\nenabled = true\napproval = \"required\"\nrun_as = \"tether-ops\"\n",
    )
    .unwrap()
}

/// The document for `app-0001` running `systemctl restart worker`, valid around `NOW`.
fn document() -> Vec<u8> {
    let a = appliance("app-0001");
    let e = exec(&["systemctl", "restart", "worker"]);
    Approval::plan(
        &Expected {
            appliance: &a,
            phase: Phase::Operate,
            exec: &e,
        },
        "req_1",
        "INC-4411",
        "alice@acme",
        NOW - MIN,
        NOW + 10 * MIN,
    )
    .to_bytes()
}

/// The customer's signed [`document`].
fn signed(c: &Customer, stock: bool) -> (Vec<u8>, Vec<u8>) {
    let doc = document();
    let sig = if stock {
        c.ssh_keygen_sign(APPROVAL_NAMESPACE, &doc)
    } else {
        sig::sign(&c.private(), APPROVAL_NAMESPACE, &doc)
            .unwrap()
            .into_bytes()
    };
    (doc, sig)
}

fn check(
    doc: &[u8],
    sig: &[u8],
    a: &ApplianceRef,
    phase: Phase,
    e: &ExecSpec,
    approvers: &Approvers,
    now: i64,
) -> Result<approval::Verified, CommandFailure> {
    approval::check(
        doc,
        sig,
        &Expected {
            appliance: a,
            phase,
            exec: e,
        },
        approvers,
        &policy().limits,
        now,
    )
    .map_err(|r| {
        eprintln!("refused: {r}");
        r.code
    })
}

#[test]
fn an_approval_signed_by_ssh_keygen_or_by_us_verifies_for_exactly_its_command() {
    let c = Customer::new();
    for stock in [true, false] {
        let (doc, sig) = signed(&c, stock);
        let v = check(
            &doc,
            &sig,
            &appliance("app-0001"),
            Phase::Operate,
            &exec(&["systemctl", "restart", "worker"]),
            &c.pinned(),
            NOW,
        )
        .unwrap();
        assert_eq!(v.sha256, tether_ops::sha256_hex(&doc));
        assert_eq!(v.key_id, "acme-ops");
    }
}

#[test]
fn a_widened_command_fails_the_signature() {
    let c = Customer::new();
    let (doc, sig) = signed(&c, true);
    let a = appliance("app-0001");
    let mut widened = vec![
        exec(&["systemctl", "restart", "worker", "--now"]),
        exec(&["systemctl", "stop", "worker"]),
        exec(&["systemctl", "restart"]),
    ];
    let mut e = exec(&["systemctl", "restart", "worker"]);
    e.kind = CommandKind::Shell;
    widened.push(e);
    let mut e = exec(&["systemctl", "restart", "worker"]);
    e.env_allowlist = vec!["LD_PRELOAD".into()];
    widened.push(e);
    let mut e = exec(&["systemctl", "restart", "worker"]);
    e.deadline_ms = 3_600_000;
    widened.push(e);
    let mut e = exec(&["systemctl", "restart", "worker"]);
    e.stdin_sha256 = tether_ops::sha256_hex(b"rm -rf /");
    widened.push(e);
    for e in widened {
        assert_eq!(
            check(&doc, &sig, &a, Phase::Operate, &e, &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{e:?}"
        );
    }
    // The phase is the appliance's own classification, not the document's.
    let e = exec(&["systemctl", "restart", "worker"]);
    assert_eq!(
        check(&doc, &sig, &a, Phase::Install, &e, &c.pinned(), NOW).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn an_approval_for_another_appliance_trust_domain_or_key_fails() {
    let c = Customer::new();
    let (doc, sig) = signed(&c, false);
    let e = exec(&["systemctl", "restart", "worker"]);
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
            check(&doc, &sig, &a, Phase::Operate, &e, &c.pinned(), NOW).unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{a:?}"
        );
    }
}

#[test]
fn windows_are_the_appliances_clock_and_the_policys_limit() {
    let c = Customer::new();
    let (doc, sig) = signed(&c, false);
    let (a, e) = (
        appliance("app-0001"),
        exec(&["systemctl", "restart", "worker"]),
    );
    // 60 s skew: a minute and a bit outside either end.
    assert_eq!(
        check(
            &doc,
            &sig,
            &a,
            Phase::Operate,
            &e,
            &c.pinned(),
            NOW - 2 * MIN - 1
        )
        .unwrap_err(),
        CommandFailure::ApprovalExpired
    );
    assert_eq!(
        check(
            &doc,
            &sig,
            &a,
            Phase::Operate,
            &e,
            &c.pinned(),
            NOW + 11 * MIN + 1
        )
        .unwrap_err(),
        CommandFailure::ApprovalExpired
    );
    check(
        &doc,
        &sig,
        &a,
        Phase::Operate,
        &e,
        &c.pinned(),
        NOW + 11 * MIN,
    )
    .unwrap();
    // A window longer than the policy's one hour.
    let long = Approval {
        not_after_ms: NOW + 2 * 60 * MIN,
        ..Approval::parse(&doc).unwrap()
    }
    .to_bytes();
    let long_sig = sig::sign(&c.private(), APPROVAL_NAMESPACE, &long).unwrap();
    assert_eq!(
        check(
            &long,
            long_sig.as_bytes(),
            &a,
            Phase::Operate,
            &e,
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalTooLong
    );
}

#[test]
fn keys_that_are_not_pinned_now_or_signatures_for_another_purpose_fail() {
    let c = Customer::new();
    let (doc, sig) = signed(&c, true);
    let (a, e) = (
        appliance("app-0001"),
        exec(&["systemctl", "restart", "worker"]),
    );
    // Another key (the vendor's own) made a perfect signature.
    let vendor = PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519).unwrap();
    let forged = sig::sign(&vendor, APPROVAL_NAMESPACE, &doc).unwrap();
    assert_eq!(
        check(
            &doc,
            forged.as_bytes(),
            &a,
            Phase::Operate,
            &e,
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
    // The customer's key, outside its window.
    let old = c.approvers("2025-01-01T00:00:00Z", "2025-12-31T00:00:00Z");
    assert_eq!(
        check(&doc, &sig, &a, Phase::Operate, &e, &old, NOW).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
    // No keys at all.
    assert_eq!(
        check(
            &doc,
            &sig,
            &a,
            Phase::Operate,
            &e,
            &Approvers::default(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
    // A manifest signature (same key, other namespace) presented as an approval.
    let manifest_sig = c.ssh_keygen_sign(MANIFEST_NAMESPACE, &doc);
    assert_eq!(
        check(
            &doc,
            &manifest_sig,
            &a,
            Phase::Operate,
            &e,
            &c.pinned(),
            NOW
        )
        .unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}

#[test]
fn a_non_canonical_approval_fails_even_with_a_signature_over_its_bytes() {
    let c = Customer::new();
    let (doc, _) = signed(&c, false);
    let text = String::from_utf8(doc.clone()).unwrap();
    let (a, e) = (
        appliance("app-0001"),
        exec(&["systemctl", "restart", "worker"]),
    );
    let variants = [
        text.replacen(',', ", ", 1),
        format!("{text}\n"),
        text.replacen("{", "{\"approver\":\"mallory\",", 1),
        text.replacen("{", "{\"extra\":1,", 1),
        text.replace("\"deadline_ms\":60000", "\"deadline_ms\":60000.0"),
    ];
    for v in variants {
        let sig = sig::sign(&c.private(), APPROVAL_NAMESPACE, v.as_bytes()).unwrap();
        assert_eq!(
            check(
                v.as_bytes(),
                sig.as_bytes(),
                &a,
                Phase::Operate,
                &e,
                &c.pinned(),
                NOW
            )
            .unwrap_err(),
            CommandFailure::ApprovalInvalid,
            "{v}"
        );
    }
}

/// An `sk-ssh-ed25519@openssh.com` signature as a FIDO token makes it (made here in
/// software, with the token's `flags`): the Ed25519 signature covers SHA-256 of the
/// application, the flags, the counter and SHA-256 of the SSHSIG blob.
fn sk_sign(
    key: &ssh_key::private::Ed25519Keypair,
    namespace: &str,
    msg: &[u8],
    flags: u8,
) -> (String, Vec<u8>) {
    use ssh_key::sha2::{Digest, Sha256};
    use ssh_key::{public, HashAlg, LineEnding, SshSig};
    let application = "ssh:";
    let blob = SshSig::signed_data(namespace, HashAlg::Sha512, msg).unwrap();
    let counter = 7u32.to_be_bytes();
    let mut signed = Sha256::digest(application).to_vec();
    signed.push(flags);
    signed.extend_from_slice(&counter);
    signed.extend_from_slice(&Sha256::digest(&blob));
    let ed: ssh_key::Signature = signature::Signer::try_sign(key, &signed).unwrap();
    let mut data = ed.as_bytes().to_vec();
    data.push(flags);
    data.extend_from_slice(&counter);
    let sk = public::SkEd25519::new(key.public, application);
    let sig = SshSig::new(
        public::KeyData::SkEd25519(sk.clone()),
        namespace,
        HashAlg::Sha512,
        ssh_key::Signature::new(Algorithm::SkEd25519, data).unwrap(),
    )
    .unwrap();
    let line = ssh_key::PublicKey::new(public::KeyData::SkEd25519(sk), "")
        .to_openssh()
        .unwrap();
    (line, sig.to_pem(LineEnding::LF).unwrap().into_bytes())
}

/// A hardware key pinned with `require_touch`: its signature counts only with the
/// user-presence flag set; without `require_touch` it counts either way. Nothing about
/// the flag is taken from anywhere but the signed bytes.
#[test]
fn a_hardware_key_without_the_touch_flag_is_refused_where_the_customer_requires_touch() {
    let key = ssh_key::private::Ed25519Keypair::random(&mut ssh_key::rand_core::OsRng);
    let a = appliance("app-0001");
    let e = exec(&["systemctl", "restart", "worker"]);
    let doc = document();
    let (line, touched) = sk_sign(&key, APPROVAL_NAMESPACE, &doc, 0x01);
    let (_, untouched) = sk_sign(&key, APPROVAL_NAMESPACE, &doc, 0x00);
    assert!(line.starts_with("sk-ssh-ed25519@openssh.com "), "{line}");
    let pinned = |touch: bool| {
        Approvers::parse(&format!(
            "[[key]]\nid = \"yubikey\"\npublic_key = \"{line}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2027-12-31T00:00:00Z\"\nrequire_touch = {touch}\n"
        ))
        .unwrap()
    };
    let run = |sig: &[u8], approvers: &Approvers| {
        check(&doc, sig, &a, Phase::Operate, &e, approvers, NOW)
    };
    assert!(run(&touched, &pinned(true)).is_ok());
    assert_eq!(
        run(&untouched, &pinned(true)).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
    assert!(run(&untouched, &pinned(false)).is_ok());
    // The flag is signed: setting it in the armor of an untouched signature breaks it.
    let forged = {
        let sig = ssh_key::SshSig::from_pem(&untouched).unwrap();
        let mut data = sig.signature_bytes().to_vec();
        data[64] |= 0x01;
        ssh_key::SshSig::new(
            sig.public_key().clone(),
            APPROVAL_NAMESPACE,
            ssh_key::HashAlg::Sha512,
            ssh_key::Signature::new(Algorithm::SkEd25519, data).unwrap(),
        )
        .unwrap()
        .to_pem(ssh_key::LineEnding::LF)
        .unwrap()
    };
    assert_eq!(
        run(forged.as_bytes(), &pinned(true)).unwrap_err(),
        CommandFailure::ApprovalInvalid
    );
}
