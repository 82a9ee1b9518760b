//! The audit log: [`verify_chain`] against each kind of tampering, on entries the real
//! store wrote (SQLite in a temporary directory), and enrollment and renewal through the
//! library leaving exactly one entry per refusal and per success.
//!
//! What no hash chain shows on its own, and these tests pin down as accepted: entries cut
//! from the end of the log (the newest ones), and a stretch that does not claim to start
//! at entry 1. A checkpoint (the seq and hash of a recent entry, held elsewhere) catches
//! both; see the `tether_control::audit` module docs.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tether_control::api::AppState;
use tether_control::audit::{
    action, entry_hash, system, verify_chain, Actor, ActorKind, AuditEntry, AuditEvent, ChainError,
    ChainVerifier, Outcome, GENESIS_HASH,
};
use tether_control::ca::Ca;
use tether_control::config::ControlConfig;
use tether_control::enroll::{self, EnrollRequest, Proof};
use tether_control::renew::{self, RenewRequest};
use tether_control::server::PeerCertificate;
use tether_control::store::sql::SqlStore;
use tether_control::store::{Appliance, ApplianceStatus, PlatformBinding, Store};
use tether_control::token::Token;

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
        &tether_control::ca_config(&cfg),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let store = sqlite_store(&dir).await;
    let state = AppState {
        store: Arc::new(store),
        ca: Arc::new(ca),
        config: Arc::new(cfg),
        proofs: Arc::new(tether_control::proof::Verifiers::new(&Default::default()).unwrap()),
        metrics: Arc::new(tether_control::metrics::Metrics::new()),
    };
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
            .with("token_ref", tether_control::audit::token_ref(&hash));
        self.state
            .store
            .create_token(id, &hash, now + 600, now, &event)
            .await
            .unwrap();
        token.expose().to_owned()
    }

    async fn nonce(&self, now: i64) -> String {
        enroll::challenge(&self.state, now).await.unwrap().nonce
    }

    async fn enroll(
        &self,
        id: &str,
        nonce: String,
        csr_pem: String,
        proof: Proof,
        now: i64,
    ) -> Result<enroll::EnrollResponse, tether_control::api::ApiError> {
        let req = EnrollRequest {
            appliance_id: id.into(),
            csr_pem,
            nonce,
            proof,
        };
        enroll::enroll(&self.state, req, now).await
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
    register(c.state.store.as_ref(), "app-1", now).await; // 1
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

    let entries = all_entries(c.state.store.as_ref()).await;
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
        c.state.store.allowlist_version().await.unwrap()
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
    register(c.state.store.as_ref(), "app-1", now).await;
    let t = c.token("app-1", now).await;
    let n = c.nonce(now).await;
    let enrolled = c
        .enroll("app-1", n, csr(), token_proof(&t), now)
        .await
        .unwrap();
    let first = all_entries(c.state.store.as_ref()).await.len() as i64 + 1;
    let leaf = rustls_pemfile::certs(&mut enrolled.certificate_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let peer = PeerCertificate(Some(Arc::from(leaf.as_ref())));
    let req = || RenewRequest { csr_pem: csr() };

    let err = renew::renew(&c.state, &PeerCertificate(None), req(), now)
        .await
        .unwrap_err();
    assert_eq!(err.code, "client_certificate_required");
    let renewed = renew::renew(&c.state, &peer, req(), now).await.unwrap();
    let err = renew::renew(
        &c.state,
        &peer,
        RenewRequest {
            csr_pem: "junk".into(),
        },
        now,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "csr_malformed");

    let entries = all_entries(c.state.store.as_ref()).await;
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
    assert!(all_entries(c.state.store.as_ref()).await.is_empty());
}
