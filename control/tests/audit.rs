//! The audit log: [`verify_chain`] against each kind of tampering, on entries the real
//! store wrote (SQLite in a temporary directory), and enrollment and renewal through the
//! library leaving exactly one entry per refusal and per success.
//!
//! What no hash chain shows on its own, and these tests pin down as accepted: entries cut
//! from the end of the log (the newest ones), and a stretch that does not claim to start
//! at entry 1. A checkpoint (the seq and hash of a recent entry, held elsewhere) catches
//! both; see the `tether_audit` crate docs.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_api::enroll::{EnrollRequest, Proof, RenewRequest};
use tether_audit::{
    action, entry_hash, system, verify_chain, Actor, ActorKind, AuditEntry, AuditEvent, ChainError,
    ChainVerifier, Outcome, GENESIS_HASH,
};
use tether_control::config::ControlConfig;
use tether_control::domain::ca::Ca;
use tether_control::domain::enroll;
use tether_control::domain::renew;
use tether_control::domain::token::Token;
use tether_control::http::server::PeerCertificate;
use tether_control::http::AppState;
use tether_control::store::sql::SqlStore;
use tether_control::store::{Appliance, Store};

const NOW: i64 = 1_700_000_000;
const TRUST_DOMAIN: &str = "example.com";

// ---------------------------------------------------------------------------------------
// Helpers

async fn sqlite_store(dir: &tempfile::TempDir) -> SqlStore {
    SqlStore::connect(&SqlStore::sqlite_url(&dir.path().join("control.db")))
        .await
        .expect("open SQLite store")
}

fn admin() -> Actor {
    Actor::system(system::LOCAL_ADMIN)
}

async fn register(store: &dyn Store, id: &str, now: i64) {
    let a = Appliance {
        id: id.into(),
        tenant: "acme".into(),
        binding: PlatformBinding::TokenOnly,
        status: ApplianceStatus::Active,
        manual_renewal_generation: 0,
        created_at: now,
    };
    let event = AuditEvent::success(admin(), action::APPLIANCE_REGISTER, id).with("tenant", "acme");
    store
        .register_appliance(&a, &event)
        .await
        .expect("register");
}

/// Every entry, oldest first.
async fn all_entries(store: &dyn Store) -> Vec<AuditEntry> {
    let mut out: Vec<AuditEntry> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.seq);
        let page = store.audit_entries(after, 3).await.expect("audit entries");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// A log of a dozen entries written by the real store: registrations, a token, two
/// certificates, status changes, refusals.
async fn sample_log() -> Vec<AuditEntry> {
    let dir = tempfile::tempdir().unwrap();
    let s = sqlite_store(&dir).await;
    register(&s, "edge-1", NOW).await; // 1
    register(&s, "edge-2", NOW).await; // 2
    let create = AuditEvent::success(admin(), action::TOKEN_CREATE, "edge-1")
        .with("token_ref", "0123456789abcdef");
    s.create_token("edge-1", "hash-1", NOW + 600, NOW + 1, &create)
        .await
        .unwrap(); // 3
    let redeem = AuditEvent::success(Actor::appliance("edge-1"), action::TOKEN_REDEEM, "edge-1");
    s.redeem_token("edge-1", "hash-1", NOW + 2, &redeem)
        .await
        .unwrap(); // 4
    for (n, id) in [(1u32, "edge-1"), (2, "edge-2")] {
        let cert = tether_control::store::CertRecord {
            serial: format!("{n:040x}"),
            appliance_id: id.into(),
            fingerprint: format!("{n:064x}"),
            not_before: NOW,
            not_after: NOW + 86_400,
            state: tether_control::store::CertState::Current,
        };
        let enrolled = AuditEvent::success(Actor::appliance(id), action::APPLIANCE_ENROLL, id)
            .with("proof_kind", "token")
            .with("serial", cert.serial.as_str())
            .with("fingerprint", cert.fingerprint.as_str());
        s.record_certificate(&cert, NOW + 3, 0, &enrolled)
            .await
            .unwrap(); // 5, 6
    }
    for (i, code) in ["nonce_replayed", "token_used", "csr_malformed"]
        .into_iter()
        .enumerate()
    {
        let refusal = AuditEvent::refused(
            Actor::appliance("edge-2"),
            action::APPLIANCE_ENROLL,
            "edge-2",
            code,
        )
        .with("proof_kind", "token");
        s.append_audit(&refusal, NOW + 4 + i as i64).await.unwrap(); // 7, 8, 9
    }
    for (what, status) in [
        (action::APPLIANCE_DISABLE, ApplianceStatus::Disabled),
        (action::APPLIANCE_ENABLE, ApplianceStatus::Active),
        (action::APPLIANCE_REVOKE, ApplianceStatus::Revoked),
    ] {
        let event = AuditEvent::success(admin(), what, "edge-1");
        s.set_status("edge-1", status, NOW + 10, &event)
            .await
            .unwrap(); // 10, 11, 12
    }
    let entries = all_entries(&s).await;
    s.close().await;
    assert_eq!(entries.len(), 12);
    entries
}

/// The documented hash, computed here from the module docs' table, independently of the
/// library (serde_json's default map sorts keys, which is the canonical order for the
/// ASCII keys used here).
fn documented_hash(e: &AuditEntry) -> String {
    fn put(m: &mut Vec<u8>, s: &str) {
        m.extend_from_slice(&(s.len() as u32).to_be_bytes());
        m.extend_from_slice(s.as_bytes());
    }
    let mut m = Vec::new();
    put(&mut m, "tether-audit-v1");
    m.extend_from_slice(&e.seq.to_be_bytes());
    m.extend_from_slice(&e.at.to_be_bytes());
    let kind = serde_json::to_value(e.actor.kind).unwrap();
    let outcome = serde_json::to_value(e.outcome).unwrap();
    put(&mut m, kind.as_str().unwrap());
    put(&mut m, &e.actor.name);
    put(&mut m, &e.action);
    put(&mut m, &e.target);
    put(&mut m, outcome.as_str().unwrap());
    put(&mut m, &serde_json::to_string(&e.details).unwrap());
    put(&mut m, &e.prev_hash);
    ring::digest::digest(&ring::digest::SHA256, &m)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Recompute an edited entry's hash, as someone covering their tracks would.
fn rehash(e: &mut AuditEntry) {
    e.hash = entry_hash(e.seq, e.at, &e.event(), &e.prev_hash).unwrap();
}

// ---------------------------------------------------------------------------------------
// Tampering

#[tokio::test]
async fn an_intact_log_verifies_and_its_hashes_follow_the_documented_encoding() {
    let log = sample_log().await;
    assert_eq!(verify_chain(&log), Ok(()));
    assert_eq!(log[0].prev_hash, GENESIS_HASH);
    for e in &log {
        assert_eq!(e.hash, documented_hash(e), "entry {}", e.seq);
    }
    // An export (JSON lines) read back verifies, whatever the key order or spacing of
    // its details.
    let exported: Vec<String> = log
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    let back: Vec<AuditEntry> = exported
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, log);
    let e = &log[4];
    let mut doc: Value = serde_json::from_str(&exported[4]).unwrap();
    let details = doc["details"].as_object().unwrap();
    let reordered = format!(
        "{{ \"serial\" : {}, \"proof_kind\": {},\n \"fingerprint\": {}, \"allowlist_version\": {}, \"allowlist_changes\": {} }}",
        details["serial"],
        details["proof_kind"],
        details["fingerprint"],
        details["allowlist_version"],
        details["allowlist_changes"]
    );
    doc["details"] = serde_json::from_str(&reordered).unwrap();
    let read: AuditEntry = serde_json::from_value(doc).unwrap();
    assert_eq!(read.computed_hash().unwrap(), e.hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_appended_at_once_each_land_once_and_chain() {
    // 300 callers at once (SQLite serialises them): each returns its own entry, and the
    // log holds each once, numbered without gaps, chained as if written one by one.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(sqlite_store(&dir).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let store = store.clone();
        tasks.spawn(async move {
            let event = AuditEvent::success(admin(), action::APPLIANCE_EXEC, format!("app-{i}"));
            let entry = store.append_audit(&event, NOW + i).await.expect("appended");
            (i, entry)
        });
    }
    let mut returned = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (i, entry) = r.unwrap();
        assert_eq!(
            entry.target,
            format!("app-{i}"),
            "each caller gets its own entry"
        );
        returned.push(entry);
    }
    let log = all_entries(store.as_ref()).await;
    assert_eq!(log.len(), 300);
    verify_chain(&log).expect("the chain holds");
    assert_eq!(
        log.first().map(|e| e.prev_hash.as_str()),
        Some(GENESIS_HASH)
    );
    returned.sort_by_key(|e| e.seq);
    assert_eq!(returned, log, "what the callers got is what the log holds");
}

#[tokio::test]
async fn edited_details_are_detected() {
    let log = sample_log().await;
    let mut t = log.clone();
    t[6].details["code"] = json!("nothing_to_see");
    assert_eq!(verify_chain(&t), Err(ChainError::HashMismatch { seq: 7 }));
    // Re-hashing the edited entry moves the break to the next entry's link.
    rehash(&mut t[6]);
    assert_eq!(verify_chain(&t), Err(ChainError::BrokenLink { seq: 8 }));
    // An added detail is an edit too.
    let mut t = log.clone();
    t[4].details["note"] = json!("added later");
    assert_eq!(verify_chain(&t), Err(ChainError::HashMismatch { seq: 5 }));
}

#[tokio::test]
async fn edited_outcome_actor_target_or_time_are_detected() {
    let log = sample_log().await;
    type Edit = fn(&mut AuditEntry);
    let edits: [(usize, Edit); 5] = [
        (7, |e| e.outcome = Outcome::Success),
        (6, |e| e.actor = Actor::new(ActorKind::Operator, "mallory")),
        (9, |e| e.target = "edge-2".into()),
        (2, |e| e.at += 1),
        (10, |e| e.action = action::APPLIANCE_REVOKE.into()),
    ];
    for (i, edit) in edits {
        let mut t = log.clone();
        edit(&mut t[i]);
        let err = verify_chain(&t).unwrap_err();
        assert_eq!(err, ChainError::HashMismatch { seq: i as i64 + 1 });
        assert_eq!(err.first_bad_seq(), i as i64 + 1);
    }
}

#[tokio::test]
async fn a_removed_middle_entry_is_detected() {
    let log = sample_log().await;
    let mut t = log.clone();
    t.remove(7); // seq 8
    let err = verify_chain(&t).unwrap_err();
    assert_eq!(
        err,
        ChainError::OutOfSequence {
            expected: 8,
            found: 9
        }
    );
    assert_eq!(err.first_bad_seq(), 8);
    // Renumbering the rest does not hide it: entry 9, now numbered 8, names the removed
    // one as its predecessor.
    for e in &mut t[7..] {
        e.seq -= 1;
    }
    assert_eq!(verify_chain(&t), Err(ChainError::BrokenLink { seq: 8 }));
}

#[tokio::test]
async fn reordered_entries_are_detected() {
    let log = sample_log().await;
    let mut t = log.clone();
    t.swap(4, 5); // seq 5 and 6
    let err = verify_chain(&t).unwrap_err();
    assert_eq!(
        err,
        ChainError::OutOfSequence {
            expected: 5,
            found: 6
        }
    );
    assert_eq!(err.first_bad_seq(), 5);
    // Swapping their numbers too: the links give it away.
    t[4].seq = 5;
    t[5].seq = 6;
    assert_eq!(verify_chain(&t), Err(ChainError::BrokenLink { seq: 5 }));
}

#[tokio::test]
async fn a_wrong_first_prev_hash_is_detected() {
    let log = sample_log().await;
    let mut t = log.clone();
    t[0].prev_hash = "11".repeat(32);
    assert_eq!(verify_chain(&t), Err(ChainError::BrokenLink { seq: 1 }));
    rehash(&mut t[0]);
    assert_eq!(verify_chain(&t), Err(ChainError::BrokenLink { seq: 1 }));
    // A replaced hash without a matching content is caught on its own entry.
    let mut t = log.clone();
    t[0].hash = "22".repeat(32);
    assert_eq!(verify_chain(&t), Err(ChainError::HashMismatch { seq: 1 }));
}

/// The documented limits: a chain alone cannot show that its newest entries were cut,
/// nor (unanchored) that its oldest were; a checkpoint or starting from genesis can.
#[tokio::test]
async fn a_cut_head_is_not_detectable_without_a_checkpoint() {
    let log = sample_log().await;
    // The newest three entries removed: still a valid chain.
    let cut = &log[..9];
    assert_eq!(verify_chain(cut), Ok(()));
    // A checkpoint of the real head (seq 12) shows the cut: the verified head is older.
    let checkpoint = (log[11].seq, log[11].hash.clone());
    let mut v = ChainVerifier::from_genesis();
    for e in cut {
        v.push(e).unwrap();
    }
    let (head, _) = v.head().unwrap();
    assert!(head < checkpoint.0, "the log ends before the checkpoint");
    // And resuming from a checkpoint checks what follows it.
    let mut v = ChainVerifier::after(log[8].seq, log[8].hash.clone());
    for e in &log[9..] {
        v.push(e).unwrap();
    }
    assert_eq!(v.head(), Some((checkpoint.0, checkpoint.1.as_str())));
    let mut v = ChainVerifier::after(log[8].seq, "33".repeat(32));
    assert_eq!(v.push(&log[9]), Err(ChainError::BrokenLink { seq: 10 }));

    // The oldest entries removed: a page of the log, fine for verify_chain, refused by a
    // verifier that starts from genesis.
    assert_eq!(verify_chain(&log[3..]), Ok(()));
    let mut v = ChainVerifier::from_genesis();
    assert_eq!(
        v.push(&log[3]),
        Err(ChainError::OutOfSequence {
            expected: 1,
            found: 4
        })
    );
    // A page in the middle still catches an edit inside it.
    let mut page = log[3..8].to_vec();
    page[2].details["serial"] = json!("00");
    assert_eq!(
        verify_chain(&page),
        Err(ChainError::HashMismatch { seq: 6 })
    );
}

#[tokio::test]
async fn details_without_a_canonical_form_are_reported() {
    let log = sample_log().await;
    let mut t = log.clone();
    t[3].details["ratio"] = json!(0.5);
    assert!(matches!(
        verify_chain(&t),
        Err(ChainError::Unhashable { seq: 4, .. })
    ));
}

// ---------------------------------------------------------------------------------------
// Enrollment and renewal through the library

struct Control {
    state: AppState,
    dir: tempfile::TempDir,
}

async fn control() -> Control {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        trust_domain: TRUST_DOMAIN.into(),
        ..ControlConfig::default()
    };
    let ca = Ca::init(
        dir.path(),
        &cfg.ca_config(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let store = sqlite_store(&dir).await;
    let state = tether_control::run::app_state(
        &cfg,
        Arc::new(store),
        Arc::new(ca),
        Arc::new(tether_control::domain::proof::Verifiers::new(&Default::default()).unwrap()),
    );
    Control { state, dir }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

impl Control {
    async fn token(&self, id: &str, now: i64) -> String {
        let token = Token::generate();
        let hash = token.hash();
        let event = AuditEvent::success(admin(), action::TOKEN_CREATE, id)
            .with("token_ref", tether_audit::token_ref(&hash));
        self.state
            .domain
            .store
            .create_token(id, &hash, now + 600, now, &event)
            .await
            .unwrap();
        token.expose().to_owned()
    }

    async fn nonce(&self, now: i64) -> String {
        enroll::challenge(&self.state.domain, now)
            .await
            .unwrap()
            .nonce
    }

    async fn enroll(
        &self,
        id: &str,
        nonce: String,
        csr_pem: String,
        proof: Proof,
        now: i64,
    ) -> Result<tether_api::enroll::EnrollResponse, tether_control::http::ApiError> {
        let req = EnrollRequest {
            appliance_id: id.into(),
            csr_pem,
            nonce,
            proof,
        };
        enroll::enroll(&self.state.domain, req, now)
            .await
            .map_err(tether_control::http::ApiError::from)
    }
}

fn token_proof(token: &str) -> Proof {
    Proof::Token {
        token: token.into(),
    }
}

/// `(actor, action, outcome, code)` of each entry from `from` (1-based seq) on.
fn summary(entries: &[AuditEntry], from: i64) -> Vec<(String, String, Outcome, Option<String>)> {
    entries
        .iter()
        .filter(|e| e.seq >= from)
        .map(|e| {
            (
                e.actor.to_string(),
                e.action.clone(),
                e.outcome,
                e.details["code"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test]
async fn enrollment_records_one_entry_per_refusal_and_one_per_success() {
    let c = control().await;
    let now = tether_control::now_unix();
    register(c.state.domain.store.as_ref(), "app-1", now).await; // 1
    let t1 = c.token("app-1", now).await; // 2
    let t2 = c.token("app-1", now).await; // 3
    let n1 = c.nonce(now).await;

    // A good enrollment: the redemption and the enrollment, each with its change.
    let ok = c
        .enroll("app-1", n1.clone(), csr(), token_proof(&t1), now)
        .await
        .expect("enrolled"); // 4 token.redeem, 5 appliance.enroll
                             // The same nonce again.
    let err = c
        .enroll("app-1", n1, csr(), token_proof(&t2), now)
        .await
        .unwrap_err(); // 6
    assert_eq!(
        (err.status, err.code),
        (StatusCode::CONFLICT, "nonce_replayed")
    );
    // The used token, with a fresh nonce.
    let n = c.nonce(now).await;
    let err = c
        .enroll("app-1", n, csr(), token_proof(&t1), now)
        .await
        .unwrap_err(); // 7
    assert_eq!(
        (err.status, err.code),
        (StatusCode::FORBIDDEN, "token_used")
    );
    // A bad CSR: refused before the proof, so t2 is not burnt.
    let n = c.nonce(now).await;
    let err = c
        .enroll("app-1", n, "not a CSR".into(), token_proof(&t2), now)
        .await
        .unwrap_err(); // 8
    assert_eq!(
        (err.status, err.code),
        (StatusCode::BAD_REQUEST, "csr_malformed")
    );
    // A proof of a kind the appliance is not bound to (no verifier runs).
    let n = c.nonce(now).await;
    let err = c
        .enroll(
            "app-1",
            n,
            csr(),
            Proof::Gcp {
                jwt: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(),
            },
            now,
        )
        .await
        .unwrap_err(); // 9
    assert_eq!(err.code, "proof_kind_mismatch");
    // An appliance nobody registered, and an id that is no id at all.
    let n = c.nonce(now).await;
    let err = c
        .enroll("ghost", n, csr(), token_proof(&t2), now)
        .await
        .unwrap_err(); // 10
    assert_eq!(err.code, "unknown_appliance");
    let bad_id = format!("bad id\n{}", "x".repeat(500));
    let n = c.nonce(now).await;
    let err = c
        .enroll(&bad_id, n, csr(), token_proof(&t2), now)
        .await
        .unwrap_err(); // 11
    assert_eq!(err.code, "invalid_appliance_id");

    let entries = all_entries(c.state.domain.store.as_ref()).await;
    assert_eq!(verify_chain(&entries), Ok(()));
    assert_eq!(entries.len(), 11);
    let s = |a: &str, act: &str, o, code: Option<&str>| {
        (a.to_owned(), act.to_owned(), o, code.map(str::to_owned))
    };
    use Outcome::{Refused, Success};
    assert_eq!(
        summary(&entries, 4),
        vec![
            s("appliance/app-1", action::TOKEN_REDEEM, Success, None),
            s("appliance/app-1", action::APPLIANCE_ENROLL, Success, None),
            s(
                "appliance/app-1",
                action::APPLIANCE_ENROLL,
                Refused,
                Some("nonce_replayed")
            ),
            s(
                "appliance/app-1",
                action::APPLIANCE_ENROLL,
                Refused,
                Some("token_used")
            ),
            s(
                "appliance/app-1",
                action::APPLIANCE_ENROLL,
                Refused,
                Some("csr_malformed")
            ),
            s(
                "appliance/app-1",
                action::APPLIANCE_ENROLL,
                Refused,
                Some("proof_kind_mismatch")
            ),
            s(
                "appliance/ghost",
                action::APPLIANCE_ENROLL,
                Refused,
                Some("unknown_appliance")
            ),
            s(
                "system/unknown",
                action::APPLIANCE_ENROLL,
                Refused,
                Some("invalid_appliance_id")
            ),
        ]
    );
    // The success carries what was issued and the allowlist version it made.
    let success = &entries[4];
    assert_eq!(success.details["proof_kind"], "token");
    assert_eq!(success.details["fingerprint"], ok.fingerprint.as_str());
    assert_eq!(success.details["not_after"], ok.not_after);
    assert!(success.details["serial"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(success.details["allowlist_version"], 1);
    assert_eq!(
        success.details["allowlist_version"],
        c.state.domain.store.allowlist_version().await.unwrap()
    );
    // Each refusal: its code and the proof kind, nothing else.
    assert_eq!(
        entries[5].details,
        json!({"code": "nonce_replayed", "proof_kind": "token"})
    );
    assert_eq!(entries[8].details["proof_kind"], "gcp");
    // The invalid id is recorded bounded.
    assert!(entries[10].target.len() <= enroll::MAX_APPLIANCE_ID_LEN);
    assert!(bad_id.starts_with(&entries[10].target));
    // No secret anywhere: not the tokens, not the JWT, not a CSR.
    let all = serde_json::to_string(&entries).unwrap();
    for secret in [t1.as_str(), t2.as_str(), "eyJhbGciOiJSUzI1NiJ9", "BEGIN"] {
        assert!(!all.contains(secret), "{secret} in the audit log");
    }
}

#[tokio::test]
async fn renewal_records_its_success_and_its_refusals() {
    let c = control().await;
    let now = tether_control::now_unix();
    register(c.state.domain.store.as_ref(), "app-1", now).await;
    let t = c.token("app-1", now).await;
    let n = c.nonce(now).await;
    let enrolled = c
        .enroll("app-1", n, csr(), token_proof(&t), now)
        .await
        .unwrap();
    let first = all_entries(c.state.domain.store.as_ref()).await.len() as i64 + 1;
    let leaf = rustls_pemfile::certs(&mut enrolled.certificate_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let peer = PeerCertificate(Some(Arc::from(leaf.as_ref())));
    let req = || RenewRequest { csr_pem: csr() };

    let err = renew::renew(&c.state.domain, None, req(), now)
        .await
        .unwrap_err();
    assert_eq!(err.code, "client_certificate_required");
    let renewed = renew::renew(&c.state.domain, peer.der(), req(), now)
        .await
        .unwrap();
    let err = renew::renew(
        &c.state.domain,
        peer.der(),
        RenewRequest {
            csr_pem: "junk".into(),
        },
        now,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "csr_malformed");

    let entries = all_entries(c.state.domain.store.as_ref()).await;
    assert_eq!(verify_chain(&entries), Ok(()));
    let s = |a: &str, o, code: Option<&str>| {
        (
            a.to_owned(),
            action::APPLIANCE_RENEW.to_owned(),
            o,
            code.map(str::to_owned),
        )
    };
    assert_eq!(
        summary(&entries, first),
        vec![
            s(
                "system/unknown",
                Outcome::Refused,
                Some("client_certificate_required")
            ),
            s("appliance/app-1", Outcome::Success, None),
            s("appliance/app-1", Outcome::Refused, Some("csr_malformed")),
        ]
    );
    let success = &entries[first as usize];
    assert_eq!(
        success.details["previous_fingerprint"],
        enrolled.fingerprint.as_str()
    );
    assert_eq!(success.details["fingerprint"], renewed.fingerprint.as_str());
    assert_eq!(success.details["allowlist_version"], 2);
    let refused = &entries[first as usize + 1];
    assert_eq!(
        refused.details["presented_fingerprint"],
        enrolled.fingerprint.as_str()
    );
}

/// A refusal whose entry cannot be written is still answered as that refusal (the append
/// failure goes to the error log), never turned into a 500.
#[tokio::test]
async fn a_refusal_is_answered_even_when_it_cannot_be_recorded() {
    use sqlx::Connection;
    let c = control().await;
    let now = tether_control::now_unix();
    let url = SqlStore::sqlite_url(&c.dir.path().join("control.db"));
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER audit_log_broken BEFORE INSERT ON audit_log \
         BEGIN SELECT RAISE(ABORT, 'disk on fire'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let n = c.nonce(now).await;
    let err = c
        .enroll("ghost", n, csr(), token_proof("tt_x"), now)
        .await
        .unwrap_err();
    assert_eq!(
        (err.status, err.code),
        (StatusCode::NOT_FOUND, "unknown_appliance")
    );
    assert!(all_entries(c.state.domain.store.as_ref()).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Signed checkpoints and exports, on SQLite and PostgreSQL (`TETHER_TEST_PG_URL`, e.g.
// `export TETHER_TEST_PG_URL=$(scripts/pg)`; without it the PostgreSQL half fails, it
// never skips). Tampering is done the way someone with write access to the database
// would: drop the append-only triggers, then edit, delete or renumber rows.

mod signed {
    use std::sync::atomic::{AtomicU32, Ordering};

    use sqlx::Connection;
    use tether_audit::checkpoint::{
        checkpoint_message, root_trust_domain, Checkpoint, CheckpointError, CheckpointSigner,
        CheckpointVerifier, VerifierError,
    };
    use tether_audit::export::{
        verify_export, ExportHeader, ExportLine, ExportSummary, ExportVerifier, VerifyError,
        EXPORT_VERSION,
    };
    use tether_audit::{entry_hash, AuditEntry, AuditEvent, ChainError};
    use tether_control::domain::audit::{
        checkpoint_signer, write_checkpoint, write_export, WriteCheckpointError,
    };
    use tether_control::domain::ca::{Ca, CaConfig};
    use tether_control::store::sql::{Backend, SqlStore};
    use tether_control::store::Store;

    use super::{admin, all_entries, register, TRUST_DOMAIN};

    const PG_URL_VAR: &str = "TETHER_TEST_PG_URL";
    const PG_DB_PREFIX: &str = "tether_a_";

    /// A store (SQLite file or a fresh PostgreSQL database) and control's CA.
    pub(super) struct Db {
        store: SqlStore,
        url: String,
        _dir: tempfile::TempDir,
        pg: Option<(String, String)>,
        ca: Ca,
    }

    fn new_ca(dir: &std::path::Path) -> Ca {
        let cfg = CaConfig {
            trust_domain: TRUST_DOMAIN.into(),
            ..Default::default()
        };
        Ca::init(dir, &cfg, time::OffsetDateTime::now_utc()).unwrap()
    }

    impl Db {
        pub(super) async fn sqlite() -> Db {
            let dir = tempfile::tempdir().unwrap();
            let url = SqlStore::sqlite_url(&dir.path().join("control.db"));
            let store = SqlStore::connect(&url).await.unwrap();
            let ca = new_ca(&dir.path().join("ca-home"));
            Db {
                store,
                url,
                _dir: dir,
                pg: None,
                ca,
            }
        }

        pub(super) async fn postgres() -> Db {
            let admin_url = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
                panic!("{PG_URL_VAR} is not set: run `export {PG_URL_VAR}=$(scripts/pg)`")
            });
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "{PG_DB_PREFIX}{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.ok();
            let (base, query) = admin_url
                .split_once('?')
                .map_or((admin_url.as_str(), None), |(b, q)| (b, Some(q)));
            let host_end = base[base.find("://").map_or(0, |i| i + 3)..]
                .find('/')
                .map_or(base.len(), |i| base.find("://").map_or(0, |j| j + 3) + i);
            let mut url = format!("{}/{name}", &base[..host_end]);
            if let Some(q) = query {
                url = format!("{url}?{q}");
            }
            let store = SqlStore::connect(&url).await.unwrap();
            assert_eq!(store.backend(), Backend::Postgres);
            let dir = tempfile::tempdir().unwrap();
            let ca = new_ca(&dir.path().join("ca-home"));
            Db {
                store,
                url,
                _dir: dir,
                pg: Some((admin_url, name)),
                ca,
            }
        }

        pub(super) async fn finish(self) {
            self.store.close().await;
            if let Some((admin_url, name)) = &self.pg {
                let mut admin = sqlx::PgConnection::connect(admin_url).await.unwrap();
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                admin.close().await.ok();
            }
        }

        fn signer(&self) -> CheckpointSigner {
            checkpoint_signer(&self.ca).unwrap()
        }

        fn verifier(&self) -> CheckpointVerifier {
            let root = rustls::pki_types::CertificateDer::from(self.ca.root_der().to_vec());
            CheckpointVerifier::new(&[root], TRUST_DOMAIN).unwrap()
        }

        /// Twelve entries with checkpoints at 4, 8 and 12.
        async fn signed_log(&self) {
            let signer = self.signer();
            let now = tether_control::now_unix();
            for i in 1..=12 {
                if i % 3 == 0 {
                    register(&self.store, &format!("edge-{i}"), now).await;
                } else {
                    let e = AuditEvent::refused(
                        super::Actor::appliance(format!("edge-{i}")),
                        super::action::APPLIANCE_ENROLL,
                        format!("edge-{i}"),
                        "token_used",
                    );
                    self.store.append_audit(&e, now).await.unwrap();
                }
                if i % 4 == 0 {
                    let cp = write_checkpoint(&self.store, &signer, now)
                        .await
                        .unwrap()
                        .expect("a new checkpoint");
                    assert_eq!(cp.seq, i);
                }
            }
        }

        /// The export, line by line.
        async fn export(&self) -> Vec<String> {
            let header = ExportHeader {
                tether_audit_export: EXPORT_VERSION,
                trust_domain: TRUST_DOMAIN.into(),
                root_pem: self.ca.root_pem(),
            };
            let mut out = Vec::new();
            write_export(&self.store, Some(&header), &mut out)
                .await
                .unwrap();
            String::from_utf8(out)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }

        fn verify(&self, lines: &[String]) -> Result<ExportSummary, VerifyError> {
            verify_lines(lines, self.verifier())
        }

        /// Run `sql` as someone who can write the database: the triggers go first.
        async fn tamper(&self, sql: &[&str]) {
            let mut conn = sqlx::AnyConnection::connect(&self.url).await.unwrap();
            let drop = match self.store.backend() {
                Backend::Sqlite => vec![
                    "DROP TRIGGER IF EXISTS audit_log_no_update",
                    "DROP TRIGGER IF EXISTS audit_log_no_delete",
                ],
                _ => vec!["DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log"],
            };
            for q in drop.iter().chain(sql) {
                sqlx::query(q).execute(&mut conn).await.unwrap();
            }
            conn.close().await.unwrap();
        }
    }

    fn verify_lines(
        lines: &[String],
        verifier: CheckpointVerifier,
    ) -> Result<ExportSummary, VerifyError> {
        let text = lines.join("\n") + "\n";
        verify_export(text.as_bytes(), ExportVerifier::new(verifier))
    }

    /// The checkpoint line for `seq`: its index and the checkpoint.
    fn checkpoint_line(lines: &[String], seq: i64) -> (usize, Checkpoint) {
        lines
            .iter()
            .enumerate()
            .find_map(|(i, l)| match ExportLine::parse(l.as_bytes()) {
                Ok(ExportLine::Checkpoint(c)) if c.seq == seq => Some((i, c)),
                _ => None,
            })
            .expect("checkpoint in the export")
    }

    fn line_of(cp: Checkpoint) -> String {
        ExportLine::Checkpoint(cp).to_json()
    }

    macro_rules! on_both_backends {
        ($($case:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let db = super::Db::sqlite().await;
                        super::$case(&db).await;
                        db.finish().await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let db = super::Db::postgres().await;
                        super::$case(&db).await;
                        db.finish().await;
                    }
                )*
            }
        };
    }

    on_both_backends!(
        an_intact_export_verifies,
        an_edited_row_fails_at_that_entry,
        a_deleted_row_fails_at_that_entry,
        swapped_rows_fail_at_the_first_of_them,
        a_cut_tail_fails_at_the_first_missing_entry,
        entries_after_the_last_checkpoint_can_be_cut_undetected,
        a_rehashed_rewrite_fails_at_the_next_checkpoint,
        control_refuses_to_checkpoint_a_rewritten_log,
        checkpoints_are_append_only,
    );

    async fn an_intact_export_verifies(db: &Db) {
        db.signed_log().await;
        let lines = db.export().await;
        // Header, 12 entries, 3 checkpoints, each right after its entry.
        assert_eq!(lines.len(), 16);
        assert!(lines[0].starts_with(r#"{"tether_audit_export":1,"#));
        assert_eq!(checkpoint_line(&lines, 4).0, 5);
        assert_eq!(checkpoint_line(&lines, 12).0, 15);
        let summary = db.verify(&lines).unwrap();
        let head = all_entries(&db.store).await.pop().unwrap();
        assert_eq!(
            summary,
            ExportSummary {
                entries: 12,
                checkpoints: 3,
                head: Some((12, head.hash)),
                last_checkpoint: Some(12),
            }
        );
        // Without the header too: it is information only.
        assert!(db.verify(&lines[1..]).is_ok());
        // Nothing new: no new checkpoint.
        let now = tether_control::now_unix();
        assert_eq!(
            write_checkpoint(&db.store, &db.signer(), now)
                .await
                .unwrap(),
            None
        );
    }

    async fn an_edited_row_fails_at_that_entry(db: &Db) {
        db.signed_log().await;
        db.tamper(&[
            r#"UPDATE audit_log SET details = '{"code":"nonce_replayed"}' WHERE seq = 5"#,
            "UPDATE audit_log SET outcome = 'success' WHERE seq = 10",
        ])
        .await;
        let err = db.verify(&db.export().await).unwrap_err();
        assert_eq!(err, VerifyError::Chain(ChainError::HashMismatch { seq: 5 }));
        assert_eq!(err.first_bad_seq(), Some(5));
    }

    async fn a_deleted_row_fails_at_that_entry(db: &Db) {
        db.signed_log().await;
        db.tamper(&["DELETE FROM audit_log WHERE seq = 6"]).await;
        let err = db.verify(&db.export().await).unwrap_err();
        assert_eq!(
            err,
            VerifyError::Chain(ChainError::OutOfSequence {
                expected: 6,
                found: 7
            })
        );
        assert_eq!(err.first_bad_seq(), Some(6));
    }

    async fn swapped_rows_fail_at_the_first_of_them(db: &Db) {
        db.signed_log().await;
        db.tamper(&[
            "UPDATE audit_log SET seq = -6 WHERE seq = 6",
            "UPDATE audit_log SET seq = 6 WHERE seq = 7",
            "UPDATE audit_log SET seq = 7 WHERE seq = -6",
        ])
        .await;
        // Entry 7 now stands at 6: it does not follow entry 5.
        let err = db.verify(&db.export().await).unwrap_err();
        assert_eq!(err, VerifyError::Chain(ChainError::BrokenLink { seq: 6 }));
        assert_eq!(err.first_bad_seq(), Some(6));
    }

    async fn a_cut_tail_fails_at_the_first_missing_entry(db: &Db) {
        db.signed_log().await;
        db.tamper(&["DELETE FROM audit_log WHERE seq > 9"]).await;
        let err = db.verify(&db.export().await).unwrap_err();
        assert_eq!(
            err,
            VerifyError::Truncated {
                checkpoint: 12,
                last_entry: 9
            }
        );
        assert_eq!(err.first_bad_seq(), Some(10));
    }

    /// The documented limit: entries newer than the last checkpoint were never vouched
    /// for, so cutting them leaves a valid export (the verifier's summary shows where
    /// the last checkpoint is).
    async fn entries_after_the_last_checkpoint_can_be_cut_undetected(db: &Db) {
        db.signed_log().await;
        let now = tether_control::now_unix();
        for _ in 0..2 {
            let e = AuditEvent::success(admin(), super::action::TOKEN_CREATE, "edge-1");
            db.store.append_audit(&e, now).await.unwrap(); // 13, 14
        }
        let full = db.verify(&db.export().await).unwrap();
        assert_eq!((full.entries, full.last_checkpoint), (14, Some(12)));
        db.tamper(&["DELETE FROM audit_log WHERE seq > 12"]).await;
        let cut = db.verify(&db.export().await).unwrap();
        assert_eq!((cut.entries, cut.last_checkpoint), (12, Some(12)));
    }

    /// Someone who rewrites an entry and recomputes every hash after it keeps a valid
    /// chain; the next checkpoint does not match.
    async fn a_rehashed_rewrite_fails_at_the_next_checkpoint(db: &Db) {
        db.signed_log().await;
        let mut entries = all_entries(&db.store).await;
        entries[5].details = serde_json::json!({"code": "forged"}); // seq 6
        let mut prev = entries[4].hash.clone();
        let mut sql = Vec::new();
        for e in &mut entries[5..] {
            e.prev_hash = prev.clone();
            e.hash = entry_hash(e.seq, e.at, &e.event(), &e.prev_hash).unwrap();
            prev = e.hash.clone();
            sql.push(format!(
                "UPDATE audit_log SET details = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {}",
                tether_audit::canonical_json(&e.details).unwrap(),
                e.prev_hash,
                e.hash,
                e.seq
            ));
        }
        let sql: Vec<&str> = sql.iter().map(String::as_str).collect();
        db.tamper(&sql).await;
        let rewritten: Vec<AuditEntry> = all_entries(&db.store).await;
        assert_eq!(super::verify_chain(&rewritten), Ok(()), "a valid chain");
        let err = db.verify(&db.export().await).unwrap_err();
        assert!(
            matches!(&err, VerifyError::CheckpointMismatch { seq: 8, found, .. } if *found == rewritten[7].hash),
            "{err:?}"
        );
        assert_eq!(err.first_bad_seq(), Some(8));
    }

    async fn control_refuses_to_checkpoint_a_rewritten_log(db: &Db) {
        db.signed_log().await;
        let e = AuditEvent::success(admin(), super::action::TOKEN_CREATE, "edge-1");
        db.store
            .append_audit(&e, tether_control::now_unix())
            .await
            .unwrap(); // 13
        db.tamper(&[r#"UPDATE audit_log SET target = 'edge-x' WHERE seq = 13"#])
            .await;
        let err = write_checkpoint(&db.store, &db.signer(), tether_control::now_unix())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WriteCheckpointError::Tampered {
                    checkpoint: 12,
                    error: ChainError::HashMismatch { seq: 13 }
                }
            ),
            "{err:?}"
        );
        // Nor after the checkpointed entry itself was changed.
        db.tamper(&[r#"UPDATE audit_log SET target = 'edge-y' WHERE seq = 12"#])
            .await;
        let err = write_checkpoint(&db.store, &db.signer(), tether_control::now_unix())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WriteCheckpointError::Tampered {
                    checkpoint: 12,
                    error: ChainError::HashMismatch { seq: 12 }
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            db.store.last_audit_checkpoint().await.unwrap().unwrap().seq,
            12
        );
    }

    async fn checkpoints_are_append_only(db: &Db) {
        db.signed_log().await;
        let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        for q in [
            "UPDATE audit_checkpoints SET at = 0 WHERE seq = 4",
            "DELETE FROM audit_checkpoints WHERE seq = 12",
        ] {
            let err = sqlx::query(q).execute(&mut conn).await.unwrap_err();
            assert!(err.to_string().contains("append-only"), "{q}: {err}");
        }
        conn.close().await.unwrap();
        // A second checkpoint at a seq that has one is not stored.
        let again = db
            .signer()
            .sign(
                4,
                &all_entries(&db.store).await[3].hash,
                tether_control::now_unix(),
            )
            .unwrap();
        assert!(!db.store.add_audit_checkpoint(&again).await.unwrap());
        assert_eq!(db.store.audit_checkpoints(0, 0).await.unwrap().len(), 3);
    }

    // Forged checkpoints in the export itself: the backend plays no part (SQLite).

    #[tokio::test]
    async fn a_forged_checkpoint_signature_is_refused() {
        let db = Db::sqlite().await;
        db.signed_log().await;
        let lines = db.export().await;
        let (i, cp) = checkpoint_line(&lines, 8);
        // A signature bit flipped.
        let mut t = lines.clone();
        let mut forged = cp.clone();
        let last = forged.signature.pop().unwrap();
        forged.signature.push(if last == '0' { '1' } else { '0' });
        t[i] = line_of(forged);
        assert_eq!(
            db.verify(&t),
            Err(VerifyError::Checkpoint {
                seq: 8,
                error: CheckpointError::BadSignature
            })
        );
        // A genuine signature over another head.
        let mut t = lines.clone();
        let mut moved = cp.clone();
        moved.head_hash = "ab".repeat(32);
        t[i] = line_of(moved);
        assert_eq!(
            db.verify(&t),
            Err(VerifyError::Checkpoint {
                seq: 8,
                error: CheckpointError::BadSignature
            })
        );
        // Garbage in the signature field.
        let mut t = lines;
        let mut junk = cp;
        junk.signature = "zz".into();
        t[i] = line_of(junk);
        assert!(matches!(
            db.verify(&t),
            Err(VerifyError::Checkpoint {
                seq: 8,
                error: CheckpointError::Malformed(_)
            })
        ));
    }

    #[tokio::test]
    async fn a_checkpoint_signed_by_another_ca_is_refused() {
        let db = Db::sqlite().await;
        db.signed_log().await;
        let lines = db.export().await;
        let (i, cp) = checkpoint_line(&lines, 8);
        // Another control of the same trust domain, with its own CA.
        let other_dir = tempfile::tempdir().unwrap();
        let other = new_ca(other_dir.path());
        let forged = checkpoint_signer(&other)
            .unwrap()
            .sign(cp.seq, &cp.head_hash, cp.at)
            .unwrap();
        let mut t = lines.clone();
        t[i] = line_of(forged);
        assert!(
            matches!(
                db.verify(&t),
                Err(VerifyError::Checkpoint {
                    seq: 8,
                    error: CheckpointError::UntrustedSigner(_)
                })
            ),
            "{:?}",
            db.verify(&t)
        );
        // And the root in the header is never trusted: the genuine export, checked with
        // the other root, fails at its first checkpoint.
        let root = rustls::pki_types::CertificateDer::from(other.root_der().to_vec());
        let with_other_root = CheckpointVerifier::new(&[root], TRUST_DOMAIN).unwrap();
        assert!(matches!(
            verify_lines(&lines, with_other_root),
            Err(VerifyError::Checkpoint {
                seq: 4,
                error: CheckpointError::UntrustedSigner(_)
            })
        ));
    }

    #[tokio::test]
    async fn a_checkpoint_signed_by_a_broker_of_the_same_ca_is_refused() {
        let db = Db::sqlite().await;
        db.signed_log().await;
        let lines = db.export().await;
        let (i, cp) = checkpoint_line(&lines, 8);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let broker = db
            .ca
            .issue_broker(
                "b1",
                &csr,
                &["localhost".into()],
                &[],
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        let forged = CheckpointSigner::new(&key.serialize_pem(), &broker.chain_pem)
            .unwrap()
            .sign(cp.seq, &cp.head_hash, cp.at)
            .unwrap();
        let mut t = lines;
        t[i] = line_of(forged);
        assert_eq!(
            db.verify(&t),
            Err(VerifyError::Checkpoint {
                seq: 8,
                error: CheckpointError::NotControl(format!("spiffe://{TRUST_DOMAIN}/broker/b1"))
            })
        );
    }

    #[tokio::test]
    async fn misplaced_duplicate_and_foreign_lines_are_refused() {
        let db = Db::sqlite().await;
        db.signed_log().await;
        let lines = db.export().await;
        let (i, _) = checkpoint_line(&lines, 8);
        // A checkpoint moved after later entries.
        let mut t = lines.clone();
        let cp = t.remove(i);
        t.insert(i + 2, cp);
        assert_eq!(
            db.verify(&t),
            Err(VerifyError::CheckpointOutOfPlace { seq: 8, after: 10 })
        );
        // A checkpoint repeated.
        let mut t = lines.clone();
        let cp = t[i].clone();
        t.insert(i + 1, cp);
        assert_eq!(
            db.verify(&t),
            Err(VerifyError::CheckpointOutOfPlace { seq: 8, after: 8 })
        );
        // The header of another trust domain, or not first.
        let mut t = lines.clone();
        t[0] = t[0].replace(TRUST_DOMAIN, "other.example");
        assert!(matches!(
            db.verify(&t),
            Err(VerifyError::WrongTrustDomain { .. })
        ));
        let mut t = lines.clone();
        let header = t.remove(0);
        t.insert(3, header);
        assert_eq!(db.verify(&t), Err(VerifyError::MisplacedHeader { line: 4 }));
        // An unknown field, a non-object, an empty export.
        let mut t = lines.clone();
        t[2] = t[2].replacen('{', r#"{"extra":1,"#, 1);
        assert!(matches!(
            db.verify(&t),
            Err(VerifyError::Malformed { line: 3, .. })
        ));
        let mut t = lines.clone();
        t[2] = "[]".into();
        assert!(matches!(
            db.verify(&t),
            Err(VerifyError::Malformed { line: 3, .. })
        ));
        assert_eq!(db.verify(&lines[..1]), Err(VerifyError::Empty));
        // A line over the limit.
        let long = vec![b'x'; tether_audit::export::MAX_LINE_LEN + 10];
        assert_eq!(
            verify_export(&long[..], ExportVerifier::new(db.verifier())).unwrap_err(),
            VerifyError::LineTooLong { line: 1 }
        );
    }

    #[test]
    fn a_verifier_needs_a_root_and_the_root_names_its_trust_domain() {
        assert_eq!(
            CheckpointVerifier::new(&[], TRUST_DOMAIN).unwrap_err(),
            VerifierError::NoRoot
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(dir.path());
        assert_eq!(
            root_trust_domain(ca.root_der()).as_deref(),
            Some(TRUST_DOMAIN)
        );
    }

    /// The signed string, byte for byte as the module docs describe it.
    #[test]
    fn the_checkpoint_string_is_length_prefixed() {
        let hash = "0f".repeat(32);
        let msg = checkpoint_message(7, &hash, 1_700_000_000);
        let mut want = Vec::new();
        want.extend_from_slice(&26u32.to_be_bytes());
        want.extend_from_slice(b"tether-audit-checkpoint-v1");
        want.extend_from_slice(&7i64.to_be_bytes());
        want.extend_from_slice(&64u32.to_be_bytes());
        want.extend_from_slice(hash.as_bytes());
        want.extend_from_slice(&1_700_000_000i64.to_be_bytes());
        assert_eq!(msg, want);
    }
}
