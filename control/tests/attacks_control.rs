//! Attacks on enrollment and renewal through the library (SQLite store in a temporary
//! directory, the real CA):
//!
//! - a certificate recorded for appliance A whose SAN names B cannot renew as either;
//! - a certificate past its `notAfter` cannot renew, whatever the allowlist says (rustls
//!   checks validity at the handshake only; a connection can outlive it);
//! - two enrollments racing with one token, or with one nonce, give one certificate;
//! - ids with unicode look-alikes, case changes, path tricks or huge lengths are refused
//!   before any lookup, and an operator or broker certificate never renews.

use std::sync::Arc;

use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_api::enroll::{EnrollRequest, Proof, RenewRequest};
use tether_audit::{action, system, Actor, AuditEvent};
use tether_control::config::ControlConfig;
use tether_control::domain::ca::Ca;
use tether_control::domain::enroll;
use tether_control::domain::renew;
use tether_control::domain::token::Token;
use tether_control::http::AppState;
use tether_control::store::sql::SqlStore;
use tether_control::store::{Appliance, CertRecord, CertState};

const TRUST_DOMAIN: &str = "example.com";

struct Control {
    state: AppState,
    _dir: tempfile::TempDir,
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
    let store = SqlStore::connect(&SqlStore::sqlite_url(&dir.path().join("control.db")))
        .await
        .unwrap();
    let state = tether_control::run::app_state(
        &cfg,
        Arc::new(store),
        Arc::new(ca),
        Arc::new(tether_control::domain::proof::Verifiers::new(&Default::default()).unwrap()),
    );
    Control { state, _dir: dir }
}

fn admin() -> Actor {
    Actor::system(system::LOCAL_ADMIN)
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn leaf_der(chain_pem: &str) -> Arc<[u8]> {
    let der = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    Arc::from(der.as_ref())
}

impl Control {
    async fn register(&self, id: &str, now: i64) {
        let a = Appliance {
            id: id.into(),
            tenant: "acme".into(),
            binding: PlatformBinding::TokenOnly,
            status: ApplianceStatus::Active,
            manual_renewal_generation: 0,
            created_at: now,
        };
        let event = AuditEvent::success(admin(), action::APPLIANCE_REGISTER, id);
        self.state
            .domain
            .store
            .register_appliance(&a, &event)
            .await
            .unwrap();
    }

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
        nonce: &str,
        token: &str,
        now: i64,
    ) -> Result<tether_api::enroll::EnrollResponse, tether_control::http::ApiError> {
        let req = EnrollRequest {
            appliance_id: id.into(),
            csr_pem: csr(),
            nonce: nonce.into(),
            proof: Proof::Token {
                token: token.into(),
            },
        };
        enroll::enroll(&self.state.domain, req, now)
            .await
            .map_err(tether_control::http::ApiError::from)
    }

    async fn renew(
        &self,
        der: Arc<[u8]>,
        now: i64,
    ) -> Result<tether_api::enroll::EnrollResponse, tether_control::http::ApiError> {
        renew::renew(
            &self.state.domain,
            Some(&der),
            RenewRequest { csr_pem: csr() },
            now,
        )
        .await
        .map_err(tether_control::http::ApiError::from)
    }
}

/// A certificate whose SAN names `b` but which the store records (serial, fingerprint)
/// as `a`'s: it renews as neither.
#[tokio::test]
async fn a_certificate_recorded_for_a_but_naming_b_cannot_renew() {
    let c = control().await;
    let now = tether_control::now_unix();
    c.register("app-a", now).await;
    c.register("app-b", now).await;
    let issued = c
        .state
        .domain
        .ca
        .issue_appliance("app-b", &csr(), time::OffsetDateTime::now_utc())
        .unwrap();
    let record = CertRecord {
        serial: issued.serial_hex.clone(),
        appliance_id: "app-a".into(),
        fingerprint: issued.fingerprint_hex.clone(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        state: CertState::Current,
    };
    let event = AuditEvent::success(Actor::appliance("app-a"), action::APPLIANCE_ENROLL, "app-a");
    c.state
        .domain
        .store
        .record_certificate(&record, now, 0, &event)
        .await
        .unwrap();
    let err = c.renew(leaf_der(&issued.chain_pem), now).await.unwrap_err();
    assert_eq!(err.code, "certificate_not_allowed", "{err:?}");
    assert!(c
        .state
        .domain
        .store
        .current_certificate("app-b")
        .await
        .unwrap()
        .is_none());
}

/// Past its `notAfter` a certificate cannot renew, even while it is still in the
/// allowlist (nothing removes an expired current certificate from it).
#[tokio::test]
async fn an_expired_certificate_cannot_renew() {
    let c = control().await;
    let now = tether_control::now_unix();
    c.register("app-1", now).await;
    let t = c.token("app-1", now).await;
    let n = c.nonce(now).await;
    let ok = c.enroll("app-1", &n, &t, now).await.unwrap();
    let der = leaf_der(&ok.certificate_pem);
    // Still allowed, still current: only time says no.
    let (rec, allowed) = c
        .state
        .domain
        .store
        .find_certificate(&ok.fingerprint)
        .await
        .unwrap()
        .unwrap();
    assert!(allowed && rec.state == CertState::Current);
    for at in [ok.not_after, ok.not_after + 86_400] {
        let err = c.renew(der.clone(), at).await.unwrap_err();
        assert_eq!(
            (err.status.as_u16(), err.code),
            (403, "certificate_expired"),
            "{err:?}"
        );
    }
    // A second before, it renews.
    c.renew(der, ok.not_after - 1)
        .await
        .expect("renews in time");
}

/// Two enrollments racing with the same token (two nonces), and two racing with the same
/// nonce (two tokens): exactly one certificate each time.
#[tokio::test]
async fn racing_enrollments_with_one_token_or_one_nonce_issue_one_certificate() {
    let c = Arc::new(control().await);
    let now = tether_control::now_unix();
    c.register("app-1", now).await;

    let token = c.token("app-1", now).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let n = c.nonce(now).await;
            c.enroll("app-1", &n, &token, now).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.code, "token_used", "{e:?}"),
        }
    }
    assert_eq!(wins, 1, "one token, one certificate");

    let nonce = c.nonce(now).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        let nonce = nonce.clone();
        tasks.push(tokio::spawn(async move {
            let token = c.token("app-1", now).await;
            c.enroll("app-1", &nonce, &token, now).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.code, "nonce_replayed", "{e:?}"),
        }
    }
    assert_eq!(wins, 1, "one nonce, one certificate");
    // Exactly one current certificate, and it is allowed.
    let current: Vec<_> = c
        .state
        .domain
        .store
        .certificates("app-1")
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.state == CertState::Current)
        .collect();
    assert_eq!(current.len(), 1);
}

/// Ids that look like a registered one (case, unicode look-alikes, padding), or that
/// try path tricks, or are huge, never reach a certificate.
#[tokio::test]
async fn tricky_appliance_ids_are_refused() {
    let c = control().await;
    let now = tether_control::now_unix();
    c.register("app-1", now).await;
    let t = c.token("app-1", now).await;
    let huge = "a".repeat(60_000);
    for id in [
        "APP-1",
        "app\u{2011}1", // non-breaking hyphen
        "аpp-1",        // Cyrillic a
        "app-1 ",
        " app-1",
        "app-1\0",
        "app-1/../app-2",
        "../app-1",
        "app-1%2f",
        "",
        huge.as_str(),
    ] {
        let n = c.nonce(now).await;
        let err = c.enroll(id, &n, &t, now).await.unwrap_err();
        assert!(
            matches!(err.code, "invalid_appliance_id" | "unknown_appliance"),
            "{:?}: {err:?}",
            tether_audit::clip(id, 40)
        );
    }
    // The token was not burnt by any of them.
    let n = c.nonce(now).await;
    c.enroll("app-1", &n, &t, now).await.expect("the real id");
    // The refusals' audit entries stay small.
    let entries = c.state.domain.store.audit_entries(0, 0).await.unwrap();
    assert!(entries
        .iter()
        .all(|e| e.target.len() <= enroll::MAX_APPLIANCE_ID_LEN));
}

/// Operator and broker certificates (both clientAuth, both from our CA) never renew as
/// an appliance, and no appliance certificate is issued for their names.
#[tokio::test]
async fn operator_and_broker_certificates_cannot_renew() {
    let c = control().await;
    let now = tether_control::now_unix();
    // Same names as a registered appliance, to tempt a lookup by name.
    c.register("alice", now).await;
    c.register("edge", now).await;
    let t = time::OffsetDateTime::now_utc();
    let op = c
        .state
        .domain
        .ca
        .issue_operator("alice", &csr(), t)
        .unwrap();
    let br = c
        .state
        .domain
        .ca
        .issue_broker("edge", &csr(), &["localhost".into()], &[], t)
        .unwrap();
    for chain in [&op.chain_pem, &br.chain_pem] {
        let err = c.renew(leaf_der(chain), now).await.unwrap_err();
        assert_eq!(err.code, "not_an_appliance", "{err:?}");
    }
    for id in ["alice", "edge"] {
        assert!(c
            .state
            .domain
            .store
            .current_certificate(id)
            .await
            .unwrap()
            .is_none());
    }
}
