//! `verify_session`: a break-glass session manifest checked offline against the approval
//! that opened it. A genuine pair verifies; every edit a vendor, a control plane or a
//! forger could make fails the named check.

use ssh_key::{Algorithm, PrivateKey};
use tether_ops::approval::ApplianceRef;
use tether_ops::approvers::Approvers;
use tether_ops::manifest::ApprovalRef;
use tether_ops::policy::Policy;
use tether_ops::session::{
    ConnectionRecord, CredentialRecord, SessionManifest, Teardown, SESSION_MANIFEST_TYPE,
};
use tether_ops::tunnel::{TunnelApproval, TunnelExpected, TunnelRequest};
use tether_ops::verify::verify_session;
use tether_ops::{sha256_hex, sig, APPROVAL_NAMESPACE, MANIFEST_NAMESPACE};

const NOW: i64 = 1_790_000_000_000;
const MIN: i64 = 60_000;
const SKEW: i64 = 60_000;
const OPERATOR: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

const POLICY: &str = r#"
[phases.operate]
enabled = true
approval = "required"
run_as = "tether-ops"

[[resource]]
name = "orders-db"
target = "10.0.3.7:5432"
[resource.privilege.readonly]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }
[resource.privilege.admin]
mint = { argv = ["/opt/acme/bin/mint-db-user", "--admin", "--ttl", "{duration_s}"], deadline_ms = 20000 }
revoke = { argv = ["/opt/acme/bin/drop-db-user", "{credential_id}"], deadline_ms = 20000 }
"#;

fn key() -> PrivateKey {
    PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519).unwrap()
}

fn public_line(k: &PrivateKey) -> String {
    let mut p = k.public_key().clone();
    p.set_comment("");
    p.to_openssh().unwrap()
}

struct World {
    customer: PrivateKey,
    appliance_key: PrivateKey,
    approvers: Approvers,
    approval: Vec<u8>,
    approval_sig: Vec<u8>,
}

impl World {
    fn new() -> World {
        let customer = key();
        let appliance_key = key();
        let approvers = Approvers::parse(&format!(
            "[[key]]\nid = \"acme-ops\"\npublic_key = \"{}\"\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2027-12-31T00:00:00Z\"\n",
            customer.public_key().to_openssh().unwrap()
        ))
        .unwrap();
        let (approval, approval_sig) = approve(&customer, &appliance_key, "readonly");
        World {
            customer,
            appliance_key,
            approvers,
            approval,
            approval_sig,
        }
    }

    /// The manifest the appliance signs for a session of the approval, activated a
    /// minute in and ended after ten of its thirty minutes.
    fn manifest(&self) -> SessionManifest {
        let a = TunnelApproval::parse(&self.approval).unwrap();
        let activated = NOW + MIN;
        SessionManifest {
            doc_type: SESSION_MANIFEST_TYPE.into(),
            appliance: a.appliance.clone(),
            request_id: a.request_id.clone(),
            session_id: "18446744073709551615".into(),
            approval: ApprovalRef {
                sha256: sha256_hex(&self.approval),
                approval_id: a.approval_id.clone(),
                signer: "SHA256:x".into(),
            },
            phase: a.phase,
            resource: a.break_glass.resource.clone(),
            privilege: a.break_glass.privilege.clone(),
            target: a.break_glass.target.clone(),
            pinned: vec!["10.0.3.7:5432".into()],
            duration_s: a.break_glass.duration_s,
            activated_ms: activated,
            ended_ms: activated + 10 * MIN,
            end_reason: "closed".into(),
            connections: vec![ConnectionRecord {
                n: 1,
                opened_ms: activated + 1000,
                closed_ms: activated + 5 * MIN,
                to_target_bytes: 1200,
                from_target_bytes: 56_000,
                reason: "finished".into(),
            }],
            connections_total: 1,
            to_target_bytes: 1200,
            from_target_bytes: 56_000,
            credential: CredentialRecord {
                id: "cred-1".into(),
                minted: true,
                delivered: true,
                revoked: true,
            },
            teardown: Teardown::Ok,
            agent_version: "0.1.0".into(),
        }
    }

    fn verify(&self, m: &SessionManifest) -> Result<Vec<&'static str>, &'static str> {
        let (bytes, sig) = m.sign(&self.appliance_key).unwrap();
        self.verify_bytes(&self.approval, &self.approval_sig, &bytes, sig.as_bytes())
    }

    fn verify_bytes(
        &self,
        approval: &[u8],
        approval_sig: &[u8],
        manifest: &[u8],
        manifest_sig: &[u8],
    ) -> Result<Vec<&'static str>, &'static str> {
        verify_session(
            approval,
            approval_sig,
            manifest,
            manifest_sig,
            &self.approvers,
            SKEW,
        )
        .map(|r| r.passed)
        .map_err(|f| {
            eprintln!("invalid: {f}");
            f.check
        })
    }
}

/// The customer's signature on a thirty-minute `orders-db` session at `privilege` on
/// the appliance whose manifest key is `appliance_key`.
fn approve(
    customer: &PrivateKey,
    appliance_key: &PrivateKey,
    privilege: &str,
) -> (Vec<u8>, Vec<u8>) {
    let policy = Policy::parse(POLICY.as_bytes()).unwrap();
    let appliance = ApplianceRef {
        id: "app-0001".into(),
        trust_domain: "acme.example".into(),
        key: public_line(appliance_key),
    };
    let req = TunnelRequest {
        resource: "orders-db",
        privilege,
        duration_s: 1800,
        max_connections: 2,
        idle_timeout_s: 300,
        recipient: OPERATOR,
    };
    let expected = TunnelExpected::resolve(&appliance, &policy, &req, NOW).unwrap();
    let doc =
        TunnelApproval::plan(&expected, "req_7", "INC-1", "alice", NOW, NOW + 15 * MIN).to_bytes();
    let sig = sig::sign(customer, APPROVAL_NAMESPACE, &doc)
        .unwrap()
        .into_bytes();
    (doc, sig)
}

#[test]
fn a_genuine_session_verifies_every_check() {
    let w = World::new();
    assert_eq!(
        w.verify(&w.manifest()),
        Ok(vec![
            "approval_canonical",
            "approval_signature",
            "approval_key",
            "manifest_canonical",
            "manifest_signature",
            "approval_hash",
            "same_tunnel",
            "activated_in_window",
            "ended_in_time",
            "connections_in_session",
        ])
    );
    // A failed teardown is reported, not hidden: still a genuine manifest.
    let mut m = w.manifest();
    m.teardown = Teardown::Failed("exit status 1".into());
    m.credential.revoked = false;
    assert!(w.verify(&m).is_ok());
}

#[test]
fn an_edited_manifest_fails_its_signature_and_a_forged_one_its_checks() {
    let w = World::new();
    let (bytes, sig) = w.manifest().sign(&w.appliance_key).unwrap();
    // One byte changed after signing (a longer session claimed).
    let text = String::from_utf8(bytes.clone()).unwrap();
    let edited = text.replace("\"end_reason\":\"closed\"", "\"end_reason\":\"expired\"");
    assert_ne!(edited, text);
    assert_eq!(
        w.verify_bytes(
            &w.approval,
            &w.approval_sig,
            edited.as_bytes(),
            sig.as_bytes()
        ),
        Err("manifest_signature")
    );
    // Signed by another key than the approval names (a forger's, the vendor's).
    let forged = w.manifest().sign(&key()).unwrap();
    assert_eq!(
        w.verify_bytes(&w.approval, &w.approval_sig, &forged.0, forged.1.as_bytes()),
        Err("manifest_signature")
    );
    // Not canonical (whitespace), or not a session manifest at all.
    let spaced = text.replacen(',', ", ", 1);
    let spaced_sig = sig::sign(&w.appliance_key, MANIFEST_NAMESPACE, spaced.as_bytes()).unwrap();
    assert_eq!(
        w.verify_bytes(
            &w.approval,
            &w.approval_sig,
            spaced.as_bytes(),
            spaced_sig.as_bytes()
        ),
        Err("manifest_canonical")
    );
    // The approval's signature over the manifest (wrong namespace, wrong key).
    assert_eq!(
        w.verify_bytes(&w.approval, &w.approval_sig, &bytes, &w.approval_sig),
        Err("manifest_signature")
    );
}

#[test]
fn a_manifest_checked_against_another_approval_fails() {
    let w = World::new();
    let (bytes, sig) = w.manifest().sign(&w.appliance_key).unwrap();
    // Another genuine approval of the same customer, for the admin privilege.
    let (other, other_sig) = approve(&w.customer, &w.appliance_key, "admin");
    assert_eq!(
        w.verify_bytes(&other, &other_sig, &bytes, sig.as_bytes()),
        Err("approval_hash")
    );
    // The approval edited (the signature no longer covers it) or signed by a stranger.
    let a = String::from_utf8(w.approval.clone()).unwrap();
    let widened = a.replace("\"duration_s\":1800", "\"duration_s\":18000");
    assert_ne!(widened, a);
    assert_eq!(
        w.verify_bytes(widened.as_bytes(), &w.approval_sig, &bytes, sig.as_bytes()),
        Err("approval_signature")
    );
    let stranger = sig::sign(&key(), APPROVAL_NAMESPACE, &w.approval).unwrap();
    assert_eq!(
        w.verify_bytes(&w.approval, stranger.as_bytes(), &bytes, sig.as_bytes()),
        Err("approval_key")
    );
    assert_eq!(
        w.verify_bytes(b"{}", &w.approval_sig, &bytes, sig.as_bytes()),
        Err("approval_canonical")
    );
}

/// An edit of a manifest.
type Edit = Box<dyn Fn(&mut SessionManifest)>;

#[test]
fn a_session_other_than_approved_fails_even_signed_by_the_appliance() {
    let w = World::new();
    let cases: Vec<(&str, Edit)> = vec![
        (
            "same_tunnel",
            Box::new(|m| m.resource = "billing-db".into()),
        ),
        ("same_tunnel", Box::new(|m| m.privilege = "admin".into())),
        (
            "same_tunnel",
            Box::new(|m| m.target = "10.0.3.9:5432".into()),
        ),
        ("same_tunnel", Box::new(|m| m.duration_s = 3600)),
        (
            "same_tunnel",
            Box::new(|m| m.appliance.id = "app-0002".into()),
        ),
        (
            "approval_hash",
            Box::new(|m| m.approval.sha256 = sha256_hex(b"another")),
        ),
        // Activated before the window opened, or after it closed (beyond the skew).
        (
            "activated_in_window",
            Box::new(|m| {
                m.activated_ms = NOW - 2 * MIN;
                m.connections.clear();
            }),
        ),
        (
            "activated_in_window",
            Box::new(|m| {
                m.activated_ms = NOW + 17 * MIN;
                m.ended_ms = m.activated_ms + MIN;
                m.connections.clear();
            }),
        ),
        // Kept open past activation + the approved thirty minutes (+ skew).
        (
            "ended_in_time",
            Box::new(|m| m.ended_ms = m.activated_ms + 31 * MIN + 1),
        ),
        (
            "ended_in_time",
            Box::new(|m| m.ended_ms = m.activated_ms - 1),
        ),
        (
            "connections_in_session",
            Box::new(|m| m.connections[0].closed_ms = m.ended_ms + SKEW + 1),
        ),
        (
            "connections_in_session",
            Box::new(|m| m.connections[0].opened_ms = m.activated_ms - 1),
        ),
        (
            "connections_in_session",
            Box::new(|m| m.to_target_bytes = 0),
        ),
    ];
    for (check, edit) in cases {
        let mut m = w.manifest();
        edit(&mut m);
        assert_eq!(w.verify(&m), Err(check), "{m:?}");
    }
    // Ended right at the approved duration plus the skew: still valid.
    let mut m = w.manifest();
    m.ended_ms = m.activated_ms + 30 * MIN + SKEW;
    assert!(w.verify(&m).is_ok());
}
