//! The console at fleet scale (issue 18): what one Fleet page and one header summary cost
//! control with 100,000 appliances in the store, beside the bare store reads they are
//! built from.
//!
//! - `console/fleet_page`: the first page, no filter (101 appliances read, their
//!   certificates, trust evaluated, presence looked up).
//! - `console/fleet_filtered`: `trust_state=renewal_due` (1 % of the fleet): the page scans
//!   until it has 100 rows.
//! - `console/fleet_no_match`: `trust_state=expired` (none): the page scans its whole
//!   budget, [`tether_control::console::pages::SCAN_LIMIT`] appliances, and offers the next.
//! - `console/summary`: the header's counts and every alert (`alerts::collect`, what the
//!   Fleet page and each live update compute at most once a second per process).
//! - `baseline/list_page`, `baseline/list_scan`: the same appliances read bare through
//!   `Store::list_appliances` (101, then [`SCAN_LIMIT`] in pages of 500);
//!   `baseline/certificate_per_appliance`: the [`SCAN_LIMIT`] appliances' certificates one
//!   query each (what a scanning page did before), `baseline/certificates_per_500`: the
//!   same in pages of 500 (what it does now), and `baseline/current_certificates`: every
//!   current certificate in one query (what the summary reads).
//!
//! The store is SQLite in `$CARGO_TARGET_TMPDIR/console-100k/` (made once, about a
//! minute, then reused; delete it to start again). Run:
//! `cargo bench --bench console` (add `-- --quick` for a fast look).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_audit::{action, Actor, AuditEvent};
use tether_control::console::pages::{fleet_rows, FleetFilter, SCAN_LIMIT};
use tether_control::domain::ca::{Ca, CaConfig};
use tether_control::http::AppState;
use tether_control::store::sql::SqlStore;
use tether_control::store::{Appliance, ApplianceFilter, CertRecord, CertState, Store};

const FLEET: usize = 100_000;

fn id(n: usize) -> String {
    format!("app-{n:06}")
}

/// Register and enroll [`FLEET`] appliances: every 100th with 12 hours left (renewal
/// due), the rest with 29 days.
async fn seed(store: &SqlStore, now: i64) {
    let admin = Actor::system("bench");
    for n in 0..FLEET {
        let id = id(n);
        store
            .register_appliance(
                &Appliance {
                    id: id.clone(),
                    tenant: format!("tenant-{}", n % 20),
                    binding: PlatformBinding::TokenOnly,
                    status: ApplianceStatus::Active,
                    manual_renewal_generation: 0,
                    created_at: now,
                },
                &AuditEvent::success(admin.clone(), action::APPLIANCE_REGISTER, &id),
            )
            .await
            .unwrap();
        let left = if n % 100 == 0 { 12 * 3600 } else { 29 * 86_400 };
        store
            .record_certificate(
                &CertRecord {
                    serial: format!("{n:032x}"),
                    appliance_id: id.clone(),
                    fingerprint: format!("{n:064x}"),
                    not_before: now - 86_400,
                    not_after: now + left,
                    state: CertState::Current,
                },
                now,
                0,
                &AuditEvent::success(admin.clone(), action::APPLIANCE_ENROLL, &id),
            )
            .await
            .unwrap();
        if n % 10_000 == 9_999 {
            eprintln!("console bench: seeded {} appliances", n + 1);
        }
    }
}

/// Control's state on the seeded store (made now if absent).
fn state(rt: &tokio::runtime::Runtime, dir: &Path, now: i64) -> AppState {
    let seeded = dir.join("seeded");
    if !seeded.exists() {
        let _ = std::fs::remove_dir_all(dir);
    }
    std::fs::create_dir_all(dir).unwrap();
    let url = SqlStore::sqlite_url(&dir.join("control.db"));
    let store = rt.block_on(SqlStore::connect(&url)).unwrap();
    if !seeded.exists() {
        rt.block_on(seed(&store, now));
        std::fs::write(&seeded, FLEET.to_string()).unwrap();
    }
    // The CA signs nothing here: a fresh one each run.
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(
        ca_dir.path(),
        &CaConfig {
            trust_domain: "bench.test".into(),
            ..CaConfig::default()
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let cfg = tether_control::config::ControlConfig {
        trust_domain: "bench.test".into(),
        ..Default::default()
    };
    tether_control::run::app_state(
        &cfg,
        Arc::new(store),
        Arc::new(ca),
        Arc::new(tether_control::domain::proof::Verifiers::new(&Default::default()).unwrap()),
    )
}

fn filter(trust_state: &str) -> FleetFilter {
    FleetFilter {
        trust_state: trust_state.into(),
        ..FleetFilter::default()
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let now = tether_control::now_unix();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-100k");
    let app = state(&rt, &dir, now);
    let store = app.domain.store.clone();

    let mut g = c.benchmark_group("console");
    g.sample_size(10);
    for (name, f) in [
        ("fleet_page", filter("")),
        ("fleet_filtered", filter("renewal_due")),
        ("fleet_no_match", filter("expired")),
    ] {
        let (rows, _, scanned_out) = rt.block_on(fleet_rows(&app, &f, now)).unwrap();
        eprintln!(
            "{name}: {} rows, scan budget spent: {scanned_out}",
            rows.len()
        );
        g.bench_function(name, |b| {
            b.iter(|| rt.block_on(fleet_rows(&app, black_box(&f), now)).unwrap())
        });
    }
    g.bench_function("summary", |b| {
        b.iter(|| {
            rt.block_on(tether_control::console::alerts::collect(&app, now))
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("baseline");
    g.sample_size(10);
    g.bench_function("list_page", |b| {
        b.iter(|| {
            rt.block_on(store.list_appliances(&ApplianceFilter {
                limit: 101,
                ..ApplianceFilter::default()
            }))
            .unwrap()
        })
    });
    g.bench_function("list_scan", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut after = None;
                let mut n = 0;
                while n < SCAN_LIMIT {
                    let page = store
                        .list_appliances(&ApplianceFilter {
                            after: after.clone(),
                            limit: 500,
                            ..ApplianceFilter::default()
                        })
                        .await
                        .unwrap();
                    n += page.len();
                    after = page.last().map(|a| a.id.clone());
                }
                n
            })
        })
    });
    // What a scanning page cost before it read certificates a page at a time: one query
    // per appliance, against one per 500.
    let ids: Vec<String> = (0..SCAN_LIMIT).map(id).collect();
    g.bench_function("certificate_per_appliance", |b| {
        b.iter(|| {
            rt.block_on(async {
                for id in &ids {
                    black_box(store.current_certificate(id).await.unwrap());
                }
            })
        })
    });
    g.bench_function("certificates_per_500", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut after: Option<&str> = None;
                for chunk in ids.chunks(500) {
                    let last = chunk.last().unwrap();
                    black_box(
                        store
                            .current_certificates_between(after, last)
                            .await
                            .unwrap(),
                    );
                    after = Some(last);
                }
            })
        })
    });
    g.bench_function("current_certificates", |b| {
        b.iter(|| rt.block_on(store.current_certificates()).unwrap().len())
    });
    g.finish();
}

criterion_group!(console, benches);
criterion_main!(console);
