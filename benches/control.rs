//! Control-plane benches: what one enrollment costs control besides the database — the
//! CSR check (parse + proof of possession), issuing an appliance certificate with a local
//! P-256 intermediate key, and hashing one audit entry — plus a whole token enrollment
//! through the library and the store (SQLite file in a temporary directory: nonce, token
//! redemption, issuance, record with the allowlist change and its audit entries).
//!
//! Run: `cargo bench --bench control` (add `-- --quick` for a fast look).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tether_audit::{action, Actor, AuditEvent};
use tether_control::domain::ca::{verify_csr, Ca, CaConfig};

fn ca(dir: &std::path::Path) -> Ca {
    Ca::init(
        dir,
        &CaConfig {
            trust_domain: "bench.test".into(),
            ..CaConfig::default()
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(tmp.path());
    let (_, csr) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    let now = time::OffsetDateTime::now_utc();

    c.bench_function("control/csr_check", |b| {
        b.iter(|| verify_csr(black_box(&csr)).unwrap())
    });
    c.bench_function("control/issue_appliance", |b| {
        b.iter(|| ca.issue_appliance(black_box("app-1"), &csr, now).unwrap())
    });
    let event = AuditEvent::success(Actor::system("bench"), action::APPLIANCE_ENROLL, "app-1")
        .with("proof_kind", "token")
        .with("fingerprint", "ab".repeat(32))
        .with("allowlist_version", 42);
    c.bench_function("control/audit_entry_hash", |b| {
        b.iter(|| {
            tether_audit::entry_hash(black_box(7), 1_700_000_000, &event, &"0".repeat(64)).unwrap()
        })
    });
}

/// One whole token enrollment through the library, on SQLite: challenge (nonce stored),
/// nonce consumed, CSR checked, token redeemed, certificate issued and recorded with the
/// allowlist change and audit entries. The token is created outside the timed part.
fn enrollment(c: &mut Criterion) {
    use std::sync::Arc;
    use tether_api::appliances::{ApplianceStatus, PlatformBinding};
    use tether_api::enroll::{EnrollRequest, Proof};
    use tether_control::store::Appliance;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tether_control::config::ControlConfig {
        trust_domain: "bench.test".into(),
        ..Default::default()
    };
    let ca = ca(tmp.path());
    let store = rt
        .block_on(tether_control::store::sql::SqlStore::connect(
            &tether_control::store::sql::SqlStore::sqlite_url(&tmp.path().join("control.db")),
        ))
        .unwrap();
    let state = tether_control::run::app_state(
        &cfg,
        Arc::new(store),
        Arc::new(ca),
        Arc::new(tether_control::domain::proof::Verifiers::new(&Default::default()).unwrap()),
    );
    let admin = Actor::system("bench");
    rt.block_on(state.domain.store.register_appliance(
        &Appliance {
            id: "app-1".into(),
            tenant: "bench".into(),
            binding: PlatformBinding::TokenOnly,
            status: ApplianceStatus::Active,
            manual_renewal_generation: 0,
            created_at: 0,
        },
        &AuditEvent::success(admin.clone(), action::APPLIANCE_REGISTER, "app-1"),
    ))
    .unwrap();
    let (_, csr) = tether_agent::enroll::key_and_csr("app-1").unwrap();
    c.bench_function("control/enroll_token_sqlite", |b| {
        b.iter_batched(
            || {
                let token = tether_control::domain::token::Token::generate();
                let now = tether_control::now_unix();
                rt.block_on(state.domain.store.create_token(
                    "app-1",
                    &token.hash(),
                    now + 3600,
                    now,
                    &AuditEvent::success(admin.clone(), action::TOKEN_CREATE, "app-1"),
                ))
                .unwrap();
                token
            },
            |token| {
                rt.block_on(async {
                    let now = tether_control::now_unix();
                    let challenge = tether_control::domain::enroll::challenge(&state.domain, now)
                        .await
                        .unwrap();
                    let req = EnrollRequest {
                        appliance_id: "app-1".into(),
                        csr_pem: csr.clone(),
                        nonce: challenge.nonce,
                        proof: Proof::Token {
                            token: token.expose().to_owned(),
                        },
                    };
                    tether_control::domain::enroll::enroll(&state.domain, req, now)
                        .await
                        .unwrap()
                })
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(control, benches, enrollment);
criterion_main!(control);
