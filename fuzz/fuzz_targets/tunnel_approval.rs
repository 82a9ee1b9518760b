//! The break-glass approval parser and admission check on arbitrary bytes (a document,
//! then after a NUL byte a signature): never panics; whatever parses is canonical
//! (re-encodes to the same bytes), is never also an exec approval, and re-derives to
//! itself when the agent's view matches it; with no key pinned nothing verifies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_ops::approval::Approval;
use tether_ops::approvers::Approvers;
use tether_ops::policy::Policy;
use tether_ops::tunnel::{self, TunnelApproval, TunnelExpected, TunnelRequest};

/// A policy declaring the resources of the seeds, so the check gets past resolution.
const POLICY: &[u8] = br#"
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
[[resource]]
name = "bastion"
target = "[fd00::22]:22"
[resource.privilege.plain]
"#;

fuzz_target!(|data: &[u8]| {
    let (doc, sig) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(a) = TunnelApproval::parse(doc) else {
        return;
    };
    assert_eq!(a.to_bytes(), doc);
    assert!(
        Approval::parse(doc).is_err(),
        "a tunnel approval is never an exec approval"
    );
    let b = &a.break_glass;
    let expected = TunnelExpected {
        appliance: &a.appliance,
        phase: a.phase,
        break_glass: b.clone(),
        run_as: String::new(),
    };
    assert_eq!(a.derive(&expected), a);
    let policy = Policy::parse(POLICY).unwrap();
    let request = TunnelRequest {
        resource: &b.resource,
        privilege: &b.privilege,
        duration_s: b.duration_s,
        max_connections: b.max_connections,
        idle_timeout_s: b.idle_timeout_s,
        recipient: &b.recipient,
    };
    let r = tunnel::check(
        doc,
        sig,
        &request,
        &a.appliance,
        &policy,
        &Approvers::default(),
        a.not_before_ms,
    );
    assert!(r.is_err(), "no key is pinned: nothing may verify");
});
