//! The store contract, on both backends: every case below runs once on SQLite (a file in a
//! temporary directory) and once on PostgreSQL (a fresh database per test on the server
//! that `TETHER_TEST_PG_URL` names). `./scripts/test` starts that server; by hand:
//! `export TETHER_TEST_PG_URL=$(scripts/pg)`. Without it the PostgreSQL half fails, it
//! never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_audit::{
    action, system, verify_chain, Actor, AuditEntry, AuditEvent, ChainVerifier, Outcome,
    GENESIS_HASH, MAX_DETAILS_LEN, MAX_TARGET_LEN,
};
use tether_control::store::sql::{Backend, SqlStore, DEFAULT_LIST_LIMIT};
use tether_control::store::{
    AllowlistDelta, Appliance, ApplianceFilter, CertRecord, CertState, Store, StoreError,
    TokenRefusal,
};

const PG_URL_VAR: &str = "TETHER_TEST_PG_URL";
/// Prefix of the per-test PostgreSQL databases: `tether_t_<pid>_<n>`.
const PG_DB_PREFIX: &str = "tether_t_";
const NOW: i64 = 1_700_000_000;
const DAY: i64 = 86_400;

// ---------------------------------------------------------------------------------------
// Harness

/// A fresh, empty store, and what to clean up after it.
struct TestDb {
    store: SqlStore,
    url: String,
    dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = SqlStore::sqlite_url(&dir.path().join("control.db"));
        let store = SqlStore::connect(&url).await.expect("open SQLite store");
        assert_eq!(store.backend(), Backend::Sqlite);
        Self {
            store,
            url,
            dir: Some(dir),
            pg: None,
        }
    }

    async fn postgres() -> Self {
        let admin_url = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{PG_URL_VAR} is not set: the store tests need PostgreSQL. Run ./scripts/test, \
                 or `export {PG_URL_VAR}=$(./scripts/pg)` and run cargo test again"
            )
        });
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PG_DB_PREFIX}{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach PostgreSQL at {PG_URL_VAR} ({e}); run ./scripts/pg")
            });
        drop_stale_databases(&mut admin).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let store = SqlStore::connect(&url)
            .await
            .expect("open PostgreSQL store");
        assert_eq!(store.backend(), Backend::Postgres);
        Self {
            store,
            url,
            dir: None,
            pg: Some((admin_url, name)),
        }
    }

    /// Close the store and drop its database (a failed test leaves it behind; the next
    /// run drops it).
    async fn finish(self) {
        self.store.close().await;
        if let Some((admin_url, name)) = &self.pg {
            let mut admin = sqlx::PgConnection::connect(admin_url)
                .await
                .expect("admin connection");
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .expect("drop test database");
            admin.close().await.ok();
        }
    }
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Drop the test databases of test processes that are gone (failed runs), once per run.
async fn drop_stale_databases(admin: &mut sqlx::PgConnection) {
    static DONE: std::sync::Once = std::sync::Once::new();
    let mut first = false;
    DONE.call_once(|| first = true);
    if !first || !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(PG_DB_PREFIX)
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name[PG_DB_PREFIX.len()..]
            .split('_')
            .next()
            .unwrap_or_default();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// Each case as two tests: `sqlite::<case>` and `postgres::<case>`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::TestDb::sqlite().await;
                    super::$case(&db).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::TestDb::postgres().await;
                    super::$case(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}

on_both_backends!(
    register_get_and_list_with_filters_and_pages,
    registering_an_existing_id_is_a_conflict,
    unknown_appliance_is_not_found,
    manual_renewal_generation_counts_up,
    disable_enable_revoke_move_fingerprints_with_deltas,
    enable_puts_back_only_what_is_still_valid,
    token_is_redeemed_once_by_its_appliance,
    token_refusals_say_why,
    nonce_is_single_use_and_expires,
    proof_replay_is_refused,
    expired_single_use_values_are_pruned,
    renewal_keeps_previous_for_the_overlap,
    renewal_without_overlap_removes_previous_at_once,
    recording_on_a_disabled_appliance_gives_no_overlap,
    duplicate_certificate_changes_nothing,
    expire_overlaps_removes_ended_windows_once,
    versions_have_no_gaps_and_changes_are_ordered,
    revoking_many_fingerprints_bumps_the_version_once,
    one_version_can_hold_hundreds_of_changes,
    operations_that_change_nothing_do_not_bump,
    pagination_never_splits_a_version,
    current_and_found_certificates,
    snapshot_equals_replayed_deltas,
    concurrent_recordings_get_each_version_once,
    concurrent_operations_get_one_version_each,
    snapshots_during_concurrent_writes_are_consistent,
    reconnecting_keeps_data_and_schema,
    audit_chain_verifies_after_mixed_operations,
    failed_operations_leave_neither_change_nor_entry,
    concurrent_appends_form_one_gap_free_chain,
    audit_log_is_append_only_in_the_database,
);

// ---------------------------------------------------------------------------------------
// Helpers

/// An audit event for an operation whose entry the case does not look at.
fn ev() -> AuditEvent {
    AuditEvent::success(Actor::system("test"), "test.operation", "t")
}

fn appliance(id: &str, tenant: &str) -> Appliance {
    Appliance {
        id: id.into(),
        tenant: tenant.into(),
        binding: PlatformBinding::TokenOnly,
        status: ApplianceStatus::Active,
        manual_renewal_generation: 0,
        created_at: NOW,
    }
}

fn cert(appliance_id: &str, n: u32) -> CertRecord {
    CertRecord {
        serial: format!("{:x}{n:04x}", appliance_id.len()) + &hex(appliance_id),
        appliance_id: appliance_id.into(),
        fingerprint: format!("{n:08x}{}", hex(appliance_id)),
        not_before: NOW,
        not_after: NOW + 30 * DAY,
        state: CertState::Current,
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn delta(version: i64, c: &CertRecord, added: bool) -> AllowlistDelta {
    AllowlistDelta {
        version,
        appliance_id: c.appliance_id.clone(),
        fingerprint: c.fingerprint.clone(),
        added,
    }
}

async fn register(store: &SqlStore, id: &str) {
    store
        .register_appliance(&appliance(id, "acme"), &ev())
        .await
        .expect("register");
}

/// Register `id` and record its first certificate; returns it.
async fn enrolled(store: &SqlStore, id: &str) -> CertRecord {
    register(store, id).await;
    let c = cert(id, 1);
    store
        .record_certificate(&c, NOW, DAY, &ev())
        .await
        .expect("record");
    c
}

async fn states(store: &SqlStore, id: &str) -> Vec<(String, CertState)> {
    store
        .certificates(id)
        .await
        .expect("certificates")
        .into_iter()
        .map(|c| (c.serial, c.state))
        .collect()
}

async fn snapshot_set(store: &SqlStore) -> (i64, BTreeSet<(String, String)>) {
    let (v, pairs) = store.allowlist_snapshot().await.expect("snapshot");
    let set: BTreeSet<_> = pairs.iter().cloned().collect();
    assert_eq!(set.len(), pairs.len(), "snapshot has duplicates");
    (v, set)
}

async fn status(store: &SqlStore, id: &str) -> ApplianceStatus {
    store
        .get_appliance(id)
        .await
        .expect("get")
        .expect("exists")
        .status
}

/// Apply deltas to a set, checking each one is a real change.
fn replay(set: &mut BTreeSet<(String, String)>, deltas: &[AllowlistDelta]) {
    for d in deltas {
        let pair = (d.appliance_id.clone(), d.fingerprint.clone());
        if d.added {
            assert!(
                set.insert(pair),
                "delta {} adds a pair already present",
                d.version
            );
        } else {
            assert!(
                set.remove(&pair),
                "delta {} removes a pair not present",
                d.version
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cases

async fn register_get_and_list_with_filters_and_pages(db: &TestDb) {
    let s = &db.store;
    let bindings = [
        PlatformBinding::Aws {
            role_arn: "arn:aws:iam::123456789012:role/edge".into(),
        },
        PlatformBinding::Gcp {
            project: "p-1".into(),
            service_account: "edge@p-1.iam.gserviceaccount.com".into(),
        },
        PlatformBinding::K8s {
            issuer: "https://k8s.example.test".into(),
            namespace: "edge".into(),
            service_account: "agent".into(),
        },
        PlatformBinding::TokenOnly,
    ];
    // ids chosen so that byte order differs from a case-insensitive or locale order.
    let ids = ["b-2", "B-1", "a.1", "a_0", "c-9", "Z", "a-10"];
    for (i, id) in ids.iter().enumerate() {
        let a = Appliance {
            id: (*id).into(),
            tenant: if i % 2 == 0 { "acme" } else { "globex" }.into(),
            binding: bindings[i % bindings.len()].clone(),
            status: ApplianceStatus::Active,
            manual_renewal_generation: 0,
            created_at: NOW + i as i64,
        };
        s.register_appliance(&a, &ev()).await.unwrap();
        assert_eq!(s.get_appliance(id).await.unwrap(), Some(a));
    }
    assert_eq!(s.get_appliance("nope").await.unwrap(), None);
    s.set_status("c-9", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .unwrap();
    s.set_status("a.1", ApplianceStatus::Revoked, NOW, &ev())
        .await
        .unwrap();

    let list = |filter: ApplianceFilter| async move {
        s.list_appliances(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    let mut sorted: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    sorted.sort(); // bytewise
    assert_eq!(list(ApplianceFilter::default()).await, sorted);
    assert_eq!(
        list(ApplianceFilter {
            tenant: Some("acme".into()),
            ..Default::default()
        })
        .await,
        ["a-10", "a.1", "b-2", "c-9"]
    );
    assert_eq!(
        list(ApplianceFilter {
            status: Some(ApplianceStatus::Disabled),
            ..Default::default()
        })
        .await,
        ["c-9"]
    );
    assert_eq!(
        list(ApplianceFilter {
            status: Some(ApplianceStatus::Active),
            tenant: Some("acme".into()),
            ..Default::default()
        })
        .await,
        ["a-10", "b-2"]
    );
    assert!(list(ApplianceFilter {
        tenant: Some("initech".into()),
        ..Default::default()
    })
    .await
    .is_empty());

    // Pages of 3 walk the whole list once, in order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = list(ApplianceFilter {
            after: after.clone(),
            limit: 3,
            ..Default::default()
        })
        .await;
        assert!(page.len() <= 3);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(seen, sorted);
    assert_eq!(
        list(ApplianceFilter {
            tenant: Some("globex".into()),
            after: Some("B-1".into()),
            limit: 1,
            ..Default::default()
        })
        .await,
        ["Z"]
    );

    // limit 0 means the default page size.
    for i in 0..DEFAULT_LIST_LIMIT {
        register(s, &format!("x-{i:04}")).await;
    }
    assert_eq!(
        list(ApplianceFilter::default()).await.len(),
        DEFAULT_LIST_LIMIT as usize
    );
    assert_eq!(
        list(ApplianceFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .len(),
        DEFAULT_LIST_LIMIT as usize + ids.len()
    );
}

async fn registering_an_existing_id_is_a_conflict(db: &TestDb) {
    let s = &db.store;
    let first = appliance("edge-1", "acme");
    s.register_appliance(&first, &ev()).await.unwrap();
    let again = Appliance {
        tenant: "globex".into(),
        ..first.clone()
    };
    match s.register_appliance(&again, &ev()).await {
        Err(StoreError::Conflict(what)) => assert!(what.contains("edge-1"), "{what}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get_appliance("edge-1").await.unwrap(), Some(first));
}

async fn unknown_appliance_is_not_found(db: &TestDb) {
    let s = &db.store;
    let nf = |r: Result<_, StoreError>| matches!(r, Err(StoreError::NotFound(_)));
    assert!(nf(s
        .set_status("ghost", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .map(drop)));
    assert!(nf(s
        .bump_manual_renewal("ghost", NOW, &ev())
        .await
        .map(drop)));
    assert!(nf(s.create_token("ghost", "h", NOW + 60, NOW, &ev()).await));
    assert!(nf(s
        .record_certificate(&cert("ghost", 1), NOW, DAY, &ev())
        .await
        .map(drop)));
    assert!(nf(s.certificates("ghost").await.map(drop)));
    assert_eq!(s.allowlist_version().await.unwrap(), 0);
    // Known but without certificates: empty, not an error.
    register(s, "edge-1").await;
    assert_eq!(s.certificates("edge-1").await.unwrap(), vec![]);
}

async fn manual_renewal_generation_counts_up(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    assert_eq!(
        s.bump_manual_renewal("edge-1", NOW, &ev()).await.unwrap(),
        1
    );
    assert_eq!(
        s.bump_manual_renewal("edge-1", NOW, &ev()).await.unwrap(),
        2
    );
    let a = s.get_appliance("edge-1").await.unwrap().unwrap();
    assert_eq!(a.manual_renewal_generation, 2);
    assert_eq!(
        s.allowlist_version().await.unwrap(),
        0,
        "not an allowlist change"
    );
}

async fn disable_enable_revoke_move_fingerprints_with_deltas(db: &TestDb) {
    let s = &db.store;
    let c1 = enrolled(s, "edge-1").await; // v1
    let other = enrolled(s, "edge-2").await; // v2
    let c2 = cert("edge-1", 2);
    assert_eq!(
        s.record_certificate(&c2, NOW, DAY, &ev()).await.unwrap(),
        vec![delta(3, &c2, true)]
    );

    // Disable: both allowed fingerprints leave, certificate states stay.
    let d = s
        .set_status("edge-1", ApplianceStatus::Disabled, NOW + 10, &ev())
        .await
        .unwrap();
    // One operation, one version: both deltas carry 4.
    assert_eq!(d, vec![delta(4, &c1, false), delta(4, &c2, false)]);
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Disabled);
    assert_eq!(
        states(s, "edge-1").await,
        vec![
            (c2.serial.clone(), CertState::Current),
            (c1.serial.clone(), CertState::PreviousUntil(NOW + DAY))
        ]
    );
    assert_eq!(
        snapshot_set(s).await,
        (
            4,
            BTreeSet::from([("edge-2".to_string(), other.fingerprint.clone())])
        )
    );
    // Disabling again changes nothing and writes nothing.
    assert_eq!(
        s.set_status("edge-1", ApplianceStatus::Disabled, NOW + 20, &ev())
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(s.allowlist_version().await.unwrap(), 4);

    // Enable: both come back (both still valid).
    let d = s
        .set_status("edge-1", ApplianceStatus::Active, NOW + 30, &ev())
        .await
        .unwrap();
    assert_eq!(d, vec![delta(5, &c1, true), delta(5, &c2, true)]);
    assert_eq!(
        s.set_status("edge-1", ApplianceStatus::Active, NOW + 30, &ev())
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(snapshot_set(s).await.1.len(), 3);

    // Revoke: removed, every certificate revoked.
    let d = s
        .set_status("edge-1", ApplianceStatus::Revoked, NOW + 40, &ev())
        .await
        .unwrap();
    assert_eq!(d, vec![delta(6, &c1, false), delta(6, &c2, false)]);
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Revoked);
    assert_eq!(
        states(s, "edge-1").await,
        vec![
            (c2.serial.clone(), CertState::Revoked),
            (c1.serial.clone(), CertState::Revoked)
        ]
    );
    assert_eq!(
        s.set_status("edge-1", ApplianceStatus::Revoked, NOW + 50, &ev())
            .await
            .unwrap(),
        vec![]
    );
    // Enabling a revoked appliance brings no certificate back.
    assert_eq!(
        s.set_status("edge-1", ApplianceStatus::Active, NOW + 60, &ev())
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Active);
    assert_eq!(
        snapshot_set(s).await,
        (
            6,
            BTreeSet::from([("edge-2".to_string(), other.fingerprint.clone())])
        )
    );

    // Revoking a disabled appliance: nothing left to remove, certificates revoked.
    let c3 = cert("edge-2", 3);
    assert_eq!(
        s.record_certificate(&c3, NOW, 0, &ev()).await.unwrap(),
        vec![delta(7, &c3, true), delta(7, &other, false)]
    );
    assert_eq!(
        s.set_status("edge-2", ApplianceStatus::Disabled, NOW, &ev())
            .await
            .unwrap(),
        vec![delta(8, &c3, false)]
    );
    assert_eq!(
        s.set_status("edge-2", ApplianceStatus::Revoked, NOW, &ev())
            .await
            .unwrap(),
        vec![]
    );
    assert!(states(s, "edge-2")
        .await
        .iter()
        .all(|(_, st)| *st == CertState::Revoked));
    assert_eq!(
        s.set_status("edge-2", ApplianceStatus::Active, NOW, &ev())
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(snapshot_set(s).await, (8, BTreeSet::new()));
}

async fn enable_puts_back_only_what_is_still_valid(db: &TestDb) {
    let s = &db.store;
    let c1 = enrolled(s, "edge-1").await; // v1, not_after NOW + 30 d
    let c2 = CertRecord {
        not_after: NOW + 2 * DAY,
        ..cert("edge-1", 2)
    };
    s.record_certificate(&c2, NOW, 3600, &ev()).await.unwrap(); // v2; c1 previous until NOW + 3600
    s.set_status("edge-1", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .unwrap(); // v3 (two deltas)

    // After the overlap: only the current one comes back.
    let d = s
        .set_status("edge-1", ApplianceStatus::Active, NOW + 3600, &ev())
        .await
        .unwrap();
    assert_eq!(d, vec![delta(4, &c2, true)]);
    assert_eq!(
        states(s, "edge-1").await,
        vec![
            (c2.serial.clone(), CertState::Current),
            (c1.serial.clone(), CertState::PreviousUntil(NOW + 3600))
        ]
    );

    // After the current one expired: nothing comes back.
    s.set_status("edge-1", ApplianceStatus::Disabled, NOW + 3600, &ev())
        .await
        .unwrap(); // v5
    let d = s
        .set_status("edge-1", ApplianceStatus::Active, NOW + 2 * DAY, &ev())
        .await
        .unwrap();
    assert_eq!(d, vec![]);
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Active);
    assert_eq!(snapshot_set(s).await, (5, BTreeSet::new()));
}

async fn token_is_redeemed_once_by_its_appliance(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    s.create_token("edge-1", "hash-1", NOW + 3600, NOW, &ev())
        .await
        .unwrap();
    s.redeem_token("edge-1", "hash-1", NOW, &ev())
        .await
        .unwrap();
    assert!(matches!(
        s.redeem_token("edge-1", "hash-1", NOW + 1, &ev()).await,
        Err(StoreError::Token(TokenRefusal::AlreadyUsed))
    ));
    // Creating the same hash again is a conflict, not a way to reset it.
    assert!(matches!(
        s.create_token("edge-1", "hash-1", NOW + 7200, NOW, &ev())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.redeem_token("edge-1", "hash-1", NOW + 2, &ev()).await,
        Err(StoreError::Token(TokenRefusal::AlreadyUsed))
    ));

    // Many redeemers at once: exactly one wins.
    s.create_token("edge-1", "hash-2", NOW + 3600, NOW, &ev())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.redeem_token("edge-1", "hash-2", NOW, &ev()).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Token(TokenRefusal::AlreadyUsed)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
}

async fn token_refusals_say_why(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-a").await;
    register(s, "edge-b").await;
    s.create_token("edge-a", "hash-a", NOW + 60, NOW, &ev())
        .await
        .unwrap();
    let refusal = |r: Result<(), StoreError>| match r {
        Err(StoreError::Token(why)) => why,
        other => panic!("expected a token refusal, got {other:?}"),
    };
    assert_eq!(
        refusal(s.redeem_token("edge-a", "no-such-hash", NOW, &ev()).await),
        TokenRefusal::Unknown
    );
    // A's token used for B: refused, and A's token is not burnt.
    assert_eq!(
        refusal(s.redeem_token("edge-b", "hash-a", NOW, &ev()).await),
        TokenRefusal::WrongAppliance
    );
    // Expiry is exclusive: at expires_at the token is expired.
    assert_eq!(
        refusal(s.redeem_token("edge-a", "hash-a", NOW + 60, &ev()).await),
        TokenRefusal::Expired
    );
    assert_eq!(
        refusal(s.redeem_token("edge-a", "hash-a", NOW + 61, &ev()).await),
        TokenRefusal::Expired
    );
    s.redeem_token("edge-a", "hash-a", NOW + 59, &ev())
        .await
        .unwrap();
    assert_eq!(
        refusal(s.redeem_token("edge-a", "hash-a", NOW + 59, &ev()).await),
        TokenRefusal::AlreadyUsed
    );
    // Used and for another appliance: still WrongAppliance (B learns nothing more).
    assert_eq!(
        refusal(s.redeem_token("edge-b", "hash-a", NOW, &ev()).await),
        TokenRefusal::WrongAppliance
    );
}

async fn nonce_is_single_use_and_expires(db: &TestDb) {
    let s = &db.store;
    s.create_nonce("n-1", NOW + 300).await.unwrap();
    assert!(matches!(
        s.create_nonce("n-1", NOW + 600).await,
        Err(StoreError::Conflict(_))
    ));
    s.consume_nonce("n-1", NOW).await.unwrap();
    assert!(matches!(
        s.consume_nonce("n-1", NOW + 1).await,
        Err(StoreError::Replay(_))
    ));
    assert!(matches!(
        s.consume_nonce("unknown", NOW).await,
        Err(StoreError::NonceInvalid)
    ));

    s.create_nonce("n-2", NOW + 300).await.unwrap();
    assert!(matches!(
        s.consume_nonce("n-2", NOW + 300).await,
        Err(StoreError::NonceInvalid)
    ));
    s.create_nonce("n-3", NOW + 300).await.unwrap();
    s.consume_nonce("n-3", NOW + 299).await.unwrap();

    // Many consumers at once: exactly one wins.
    s.create_nonce("n-4", NOW + 300).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { s.consume_nonce("n-4", NOW).await },
        ));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Replay(_)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
}

async fn proof_replay_is_refused(db: &TestDb) {
    let s = &db.store;
    s.record_proof("k8s", "jti-1", NOW + 600).await.unwrap();
    match s.record_proof("k8s", "jti-1", NOW + 600).await {
        Err(StoreError::Replay(what)) => assert!(what.contains("k8s"), "{what}"),
        other => panic!("expected Replay, got {other:?}"),
    }
    // Another kind with the same id is another proof.
    s.record_proof("gcp", "jti-1", NOW + 600).await.unwrap();
    assert!(matches!(
        s.record_proof("gcp", "jti-1", NOW + 601).await,
        Err(StoreError::Replay(_))
    ));
}

async fn expired_single_use_values_are_pruned(db: &TestDb) {
    let s = &db.store;
    s.record_proof("k8s", "old", NOW + 10).await.unwrap();
    s.record_proof("k8s", "fresh", NOW + 1000).await.unwrap();
    s.create_nonce("old", NOW + 10).await.unwrap();
    s.create_nonce("fresh", NOW + 1000).await.unwrap();
    s.consume_nonce("fresh", NOW + 11).await.unwrap(); // prunes what expired before NOW + 11
                                                       // The expired proof id is forgotten (its proof is expired anyway); the fresh one is not.
    s.record_proof("k8s", "old", NOW + 10).await.unwrap();
    assert!(matches!(
        s.record_proof("k8s", "fresh", NOW + 1000).await,
        Err(StoreError::Replay(_))
    ));
    // The expired nonce is gone (so it can be created again); the used one still refuses.
    s.create_nonce("old", NOW + 20).await.unwrap();
    assert!(matches!(
        s.consume_nonce("fresh", NOW + 12).await,
        Err(StoreError::Replay(_))
    ));
}

async fn renewal_keeps_previous_for_the_overlap(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    let c1 = cert("edge-1", 1);
    assert_eq!(
        s.record_certificate(&c1, NOW, DAY, &ev()).await.unwrap(),
        vec![delta(1, &c1, true)]
    );
    assert_eq!(
        states(s, "edge-1").await,
        vec![(c1.serial.clone(), CertState::Current)]
    );

    let c2 = cert("edge-1", 2);
    assert_eq!(
        s.record_certificate(&c2, NOW + 100, DAY, &ev())
            .await
            .unwrap(),
        vec![delta(2, &c2, true)]
    );
    let certs = s.certificates("edge-1").await.unwrap();
    assert_eq!(certs[0], c2, "newest first, as recorded");
    assert_eq!(
        certs[1],
        CertRecord {
            state: CertState::PreviousUntil(NOW + 100 + DAY),
            ..c1.clone()
        }
    );
    assert_eq!(
        snapshot_set(s).await,
        (
            2,
            BTreeSet::from([
                ("edge-1".to_string(), c1.fingerprint.clone()),
                ("edge-1".to_string(), c2.fingerprint.clone())
            ])
        )
    );

    // A third renewal inside the window: c2 starts its own window, c1 keeps its.
    let c3 = cert("edge-1", 3);
    assert_eq!(
        s.record_certificate(&c3, NOW + 200, DAY, &ev())
            .await
            .unwrap(),
        vec![delta(3, &c3, true)]
    );
    assert_eq!(
        states(s, "edge-1").await,
        vec![
            (c3.serial.clone(), CertState::Current),
            (c2.serial.clone(), CertState::PreviousUntil(NOW + 200 + DAY)),
            (c1.serial.clone(), CertState::PreviousUntil(NOW + 100 + DAY)),
        ]
    );
}

async fn renewal_without_overlap_removes_previous_at_once(db: &TestDb) {
    let s = &db.store;
    let c1 = enrolled(s, "edge-1").await; // v1
    let c2 = cert("edge-1", 2);
    s.record_certificate(&c2, NOW, DAY, &ev()).await.unwrap(); // v2, c1 previous
    let c3 = cert("edge-1", 3);
    // Overlap 0: the new one is added, every older allowed one removed, in one go (one
    // version).
    assert_eq!(
        s.record_certificate(&c3, NOW + 5, 0, &ev()).await.unwrap(),
        vec![
            delta(3, &c3, true),
            delta(3, &c1, false),
            delta(3, &c2, false)
        ]
    );
    assert_eq!(
        states(s, "edge-1").await,
        vec![
            (c3.serial.clone(), CertState::Current),
            (c2.serial.clone(), CertState::Revoked),
            (c1.serial.clone(), CertState::Revoked),
        ]
    );
    assert_eq!(
        snapshot_set(s).await,
        (
            3,
            BTreeSet::from([("edge-1".to_string(), c3.fingerprint.clone())])
        )
    );

    // Re-enrollment after revocation: status back to Active, only the new one allowed.
    s.set_status("edge-1", ApplianceStatus::Revoked, NOW + 10, &ev())
        .await
        .unwrap(); // v4
    let c4 = cert("edge-1", 4);
    assert_eq!(
        s.record_certificate(&c4, NOW + 20, 0, &ev()).await.unwrap(),
        vec![delta(5, &c4, true)]
    );
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Active);
    assert_eq!(
        snapshot_set(s).await,
        (
            5,
            BTreeSet::from([("edge-1".to_string(), c4.fingerprint.clone())])
        )
    );
}

async fn recording_on_a_disabled_appliance_gives_no_overlap(db: &TestDb) {
    let s = &db.store;
    let c1 = enrolled(s, "edge-1").await; // v1
    s.set_status("edge-1", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .unwrap(); // v2
    let c2 = cert("edge-1", 2);
    // Overlap asked for, but the old certificate was barred: it stays out, revoked.
    assert_eq!(
        s.record_certificate(&c2, NOW, DAY, &ev()).await.unwrap(),
        vec![delta(3, &c2, true)]
    );
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Active);
    assert_eq!(
        states(s, "edge-1").await,
        vec![
            (c2.serial.clone(), CertState::Current),
            (c1.serial.clone(), CertState::Revoked)
        ]
    );
    assert_eq!(
        snapshot_set(s).await,
        (
            3,
            BTreeSet::from([("edge-1".to_string(), c2.fingerprint.clone())])
        )
    );
}

async fn duplicate_certificate_changes_nothing(db: &TestDb) {
    let s = &db.store;
    let c1 = enrolled(s, "edge-1").await; // v1
    register(s, "edge-2").await;
    s.set_status("edge-2", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .unwrap();
    let same_serial = CertRecord {
        appliance_id: "edge-2".into(),
        fingerprint: "ff".repeat(32),
        ..c1.clone()
    };
    let same_fingerprint = CertRecord {
        appliance_id: "edge-2".into(),
        serial: "abcd".into(),
        ..c1.clone()
    };
    for dup in [&c1, &same_serial, &same_fingerprint] {
        assert!(matches!(
            s.record_certificate(dup, NOW, 0, &ev()).await,
            Err(StoreError::Conflict(_))
        ));
    }
    // Rolled back whole: no version used, no state changed.
    assert_eq!(s.allowlist_version().await.unwrap(), 1);
    assert_eq!(
        s.allowlist_changes_since(0, 0).await.unwrap(),
        vec![delta(1, &c1, true)]
    );
    assert_eq!(
        states(s, "edge-1").await,
        vec![(c1.serial.clone(), CertState::Current)]
    );
    assert_eq!(status(s, "edge-2").await, ApplianceStatus::Disabled);
    assert_eq!(s.certificates("edge-2").await.unwrap(), vec![]);
}

async fn expire_overlaps_removes_ended_windows_once(db: &TestDb) {
    let s = &db.store;
    let a1 = enrolled(s, "edge-a").await; // v1
    let a2 = cert("edge-a", 2);
    s.record_certificate(&a2, NOW, 100, &ev()).await.unwrap(); // v2, a1 until NOW + 100
    let b1 = enrolled(s, "edge-b").await; // v3
    s.record_certificate(&cert("edge-b", 2), NOW, 50, &ev())
        .await
        .unwrap(); // v4, b1 until NOW + 50
    let c1 = enrolled(s, "edge-c").await; // v5
    s.record_certificate(&cert("edge-c", 2), NOW, 10, &ev())
        .await
        .unwrap(); // v6, c1 until NOW + 10
    s.set_status("edge-c", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .unwrap(); // v7 (two deltas)

    assert_eq!(s.expire_overlaps(NOW + 9).await.unwrap(), vec![]);
    // edge-c's window ended but it was already out: revoked without a delta.
    assert_eq!(
        s.expire_overlaps(NOW + 50).await.unwrap(),
        vec![delta(8, &b1, false)]
    );
    assert_eq!(
        states(s, "edge-c").await[1],
        (c1.serial.clone(), CertState::Revoked)
    );
    assert_eq!(
        states(s, "edge-b").await[1],
        (b1.serial.clone(), CertState::Revoked)
    );
    assert_eq!(
        states(s, "edge-a").await[1],
        (a1.serial.clone(), CertState::PreviousUntil(NOW + 100))
    );
    assert_eq!(s.expire_overlaps(NOW + 50).await.unwrap(), vec![]);
    assert_eq!(
        s.expire_overlaps(NOW + 1000).await.unwrap(),
        vec![delta(9, &a1, false)]
    );
    assert_eq!(s.expire_overlaps(NOW + 2000).await.unwrap(), vec![]);
    assert_eq!(s.allowlist_version().await.unwrap(), 9);
    // Enabling edge-c later does not bring back its ended previous certificate.
    let d = s
        .set_status("edge-c", ApplianceStatus::Active, NOW + 60, &ev())
        .await
        .unwrap();
    assert_eq!(d.len(), 1);
    assert!(d[0].added && d[0].fingerprint == cert("edge-c", 2).fingerprint);
    let _ = a2;
}

/// A mix of every allowlist-changing operation on a few appliances: what each operation
/// returned, in call order (some change nothing and return no delta).
async fn churn(s: &SqlStore) -> Vec<Vec<AllowlistDelta>> {
    let mut ops = Vec::new();
    for id in ["edge-1", "edge-2", "edge-3"] {
        register(s, id).await;
        ops.push(
            s.record_certificate(&cert(id, 1), NOW, DAY, &ev())
                .await
                .unwrap(),
        );
    }
    ops.push(
        s.record_certificate(&cert("edge-1", 2), NOW + 10, DAY, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.set_status("edge-2", ApplianceStatus::Disabled, NOW + 20, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.set_status("edge-2", ApplianceStatus::Disabled, NOW + 21, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.record_certificate(&cert("edge-3", 2), NOW + 30, 0, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.set_status("edge-1", ApplianceStatus::Revoked, NOW + 40, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.set_status("edge-2", ApplianceStatus::Active, NOW + 50, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.record_certificate(&cert("edge-1", 3), NOW + 60, DAY, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.record_certificate(&cert("edge-2", 2), NOW + 70, 100, &ev())
            .await
            .unwrap(),
    );
    ops.push(
        s.record_certificate(&cert("edge-3", 3), NOW + 80, 50, &ev())
            .await
            .unwrap(),
    );
    ops.push(s.expire_overlaps(NOW + 170).await.unwrap());
    ops.push(
        s.set_status("edge-3", ApplianceStatus::Disabled, NOW + 180, &ev())
            .await
            .unwrap(),
    );
    ops
}

/// What [`Store::allowlist_changes_since`] must return for `log` (the whole log, in
/// order): the versions after `since` that have a row among the first `limit` rows after
/// it, whole.
fn expected_page(log: &[AllowlistDelta], since: i64, limit: usize) -> Vec<AllowlistDelta> {
    let after: Vec<&AllowlistDelta> = log.iter().filter(|d| d.version > since).collect();
    let Some(last) = after.iter().take(limit).next_back() else {
        return Vec::new();
    };
    after
        .iter()
        .filter(|d| d.version <= last.version)
        .map(|d| (*d).clone())
        .collect()
}

/// Check that every non-empty operation result carries one version, that those versions
/// are exactly `first..=top` (one per operation: no gap, no repeat), and that the log's
/// rows of each version are exactly that operation's deltas, in the same order.
fn check_one_version_per_operation(
    ops: &[Vec<AllowlistDelta>],
    first: i64,
    top: i64,
    log: &[AllowlistDelta],
) {
    let mut by_version = BTreeMap::new();
    for op in ops.iter().filter(|op| !op.is_empty()) {
        let v = op[0].version;
        assert!(
            op.iter().all(|d| d.version == v),
            "one operation, several versions: {op:?}"
        );
        assert!(
            by_version.insert(v, op.clone()).is_none(),
            "version {v} given to two operations"
        );
    }
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        (first..=top).collect::<Vec<_>>(),
        "one version per changing operation, no gaps"
    );
    let mut logged: BTreeMap<i64, Vec<AllowlistDelta>> = BTreeMap::new();
    let mut previous = 0;
    for d in log.iter().filter(|d| d.version >= first) {
        assert!(d.version >= previous, "log out of order at {}", d.version);
        previous = d.version;
        logged.entry(d.version).or_default().push(d.clone());
    }
    assert_eq!(
        logged, by_version,
        "the log is what the operations returned"
    );
}

/// Replay the whole log into a set.
fn replayed(log: &[AllowlistDelta]) -> BTreeSet<(String, String)> {
    let mut set = BTreeSet::new();
    replay(&mut set, log);
    set
}

async fn versions_have_no_gaps_and_changes_are_ordered(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.allowlist_version().await.unwrap(), 0);
    assert_eq!(s.allowlist_snapshot().await.unwrap(), (0, vec![]));
    let ops = churn(s).await;
    let all: Vec<AllowlistDelta> = ops.concat();
    let top = ops.iter().filter(|op| !op.is_empty()).count() as i64;
    assert!(top >= 10, "churn made {top} versions");
    assert!(
        ops.len() as i64 > top,
        "churn has an operation that changes nothing"
    );
    assert!(
        ops.iter().any(|op| op.len() > 1),
        "churn has a multi-change one"
    );
    check_one_version_per_operation(&ops, 1, top, &all);
    assert_eq!(s.allowlist_version().await.unwrap(), top);

    // The log returns exactly what the operations returned, in order, in any page size,
    // one whole version at least per page.
    assert_eq!(s.allowlist_changes_since(0, 0).await.unwrap(), all);
    assert_eq!(s.allowlist_changes_since(0, 1000).await.unwrap(), all);
    for limit in 1..=all.len() as u32 + 1 {
        let mut paged = Vec::new();
        let mut since = 0;
        loop {
            let page = s.allowlist_changes_since(since, limit).await.unwrap();
            assert_eq!(page, expected_page(&all, since, limit as usize));
            let Some(last) = page.last() else { break };
            since = last.version;
            paged.extend(page);
        }
        assert_eq!(paged, all, "pages of {limit}");
    }
    assert_eq!(s.allowlist_changes_since(top, 10).await.unwrap(), vec![]);
    assert_eq!(
        s.allowlist_changes_since(top + 100, 10).await.unwrap(),
        vec![]
    );
}

async fn revoking_many_fingerprints_bumps_the_version_once(db: &TestDb) {
    let s = &db.store;
    let other = enrolled(s, "edge-0").await; // v1
    let c1 = enrolled(s, "edge-1").await; // v2
    let c2 = cert("edge-1", 2);
    s.record_certificate(&c2, NOW + 1, DAY, &ev())
        .await
        .unwrap(); // v3
    let c3 = cert("edge-1", 3);
    s.record_certificate(&c3, NOW + 2, DAY, &ev())
        .await
        .unwrap(); // v4: three allowed now
    assert_eq!(s.allowlist_version().await.unwrap(), 4);
    let all_three = |version: i64, added: bool| {
        vec![
            delta(version, &c1, added),
            delta(version, &c2, added),
            delta(version, &c3, added),
        ]
    };

    // Disable, enable, revoke: each one version, three deltas sharing it.
    let d = s
        .set_status("edge-1", ApplianceStatus::Disabled, NOW + 3, &ev())
        .await
        .unwrap();
    assert_eq!(d, all_three(5, false));
    assert_eq!(s.allowlist_version().await.unwrap(), 5);
    let d = s
        .set_status("edge-1", ApplianceStatus::Active, NOW + 4, &ev())
        .await
        .unwrap();
    assert_eq!(d, all_three(6, true));
    assert_eq!(s.allowlist_version().await.unwrap(), 6);
    let d = s
        .set_status("edge-1", ApplianceStatus::Revoked, NOW + 5, &ev())
        .await
        .unwrap();
    assert_eq!(d, all_three(7, false));
    assert_eq!(s.allowlist_version().await.unwrap(), 7);

    // The log has them as one version, whole even in a page of one.
    assert_eq!(s.allowlist_changes_since(6, 0).await.unwrap(), d);
    assert_eq!(s.allowlist_changes_since(6, 1).await.unwrap(), d);
    assert_eq!(
        s.allowlist_changes_since(4, 1).await.unwrap(),
        all_three(5, false)
    );
    assert_eq!(
        snapshot_set(s).await,
        (
            7,
            BTreeSet::from([("edge-0".to_string(), other.fingerprint.clone())])
        )
    );
}

async fn one_version_can_hold_hundreds_of_changes(db: &TestDb) {
    let s = &db.store;
    // More than one batch of log rows (the store inserts them a few hundred at a time).
    const CERTS: u32 = 450;
    register(s, "edge-1").await;
    let mut certs = Vec::new();
    for n in 0..CERTS {
        let c = cert("edge-1", n);
        s.record_certificate(&c, NOW, DAY, &ev()).await.unwrap();
        certs.push(c);
    }
    let v = s.allowlist_version().await.unwrap();
    assert_eq!(v, i64::from(CERTS));
    let d = s
        .set_status("edge-1", ApplianceStatus::Revoked, NOW + 1, &ev())
        .await
        .unwrap();
    let expected: Vec<_> = certs.iter().map(|c| delta(v + 1, c, false)).collect();
    assert_eq!(d, expected);
    assert_eq!(s.allowlist_changes_since(v, 1).await.unwrap(), expected);
    assert_eq!(
        s.allowlist_changes_since(v - 1, 2).await.unwrap().len(),
        1 + CERTS as usize
    );
    assert_eq!(snapshot_set(s).await, (v + 1, BTreeSet::new()));
}

async fn operations_that_change_nothing_do_not_bump(db: &TestDb) {
    let s = &db.store;
    let unchanged = |version: i64, rows: usize| async move {
        assert_eq!(s.allowlist_version().await.unwrap(), version);
        let log = s.allowlist_changes_since(0, 0).await.unwrap();
        assert_eq!(log.len(), rows);
        assert!(log.iter().all(|d| d.version <= version));
        assert_eq!(s.allowlist_snapshot().await.unwrap().0, version);
    };

    // An appliance without certificates: every status change is allowlist-neutral.
    register(s, "edge-0").await;
    for st in [
        ApplianceStatus::Disabled,
        ApplianceStatus::Active,
        ApplianceStatus::Revoked,
        ApplianceStatus::Active,
    ] {
        assert_eq!(
            s.set_status("edge-0", st, NOW, &ev()).await.unwrap(),
            vec![]
        );
        assert_eq!(status(s, "edge-0").await, st);
    }
    assert_eq!(s.expire_overlaps(NOW).await.unwrap(), vec![]);
    unchanged(0, 0).await;

    let c1 = enrolled(s, "edge-1").await; // v1
    assert_eq!(
        s.set_status("edge-1", ApplianceStatus::Active, NOW, &ev())
            .await
            .unwrap(),
        vec![]
    );
    unchanged(1, 1).await;

    // A disabled appliance: its ended overlap and its revocation change states only.
    let e1 = enrolled(s, "edge-2").await; // v2
    s.record_certificate(&cert("edge-2", 2), NOW, 10, &ev())
        .await
        .unwrap(); // v3
    s.set_status("edge-2", ApplianceStatus::Disabled, NOW, &ev())
        .await
        .unwrap(); // v4
    unchanged(4, 5).await;
    assert_eq!(s.expire_overlaps(NOW + 10).await.unwrap(), vec![]);
    assert_eq!(
        states(s, "edge-2").await[1],
        (e1.serial.clone(), CertState::Revoked)
    );
    unchanged(4, 5).await;
    assert_eq!(
        s.set_status("edge-2", ApplianceStatus::Revoked, NOW, &ev())
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        s.set_status("edge-2", ApplianceStatus::Active, NOW, &ev())
            .await
            .unwrap(),
        vec![]
    );
    unchanged(4, 5).await;

    // Failed operations roll back whole, the version included.
    assert!(matches!(
        s.record_certificate(&c1, NOW, 0, &ev()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.record_certificate(&cert("nope", 1), NOW, 0, &ev()).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.set_status("nope", ApplianceStatus::Revoked, NOW, &ev())
            .await,
        Err(StoreError::NotFound(_))
    ));
    unchanged(4, 5).await;
    assert_eq!(
        states(s, "edge-1").await,
        vec![(c1.serial.clone(), CertState::Current)]
    );
}

async fn pagination_never_splits_a_version(db: &TestDb) {
    let s = &db.store;
    let mut ops = Vec::new();
    register(s, "edge-a").await;
    for n in 1..=3 {
        ops.push(
            s.record_certificate(&cert("edge-a", n), NOW, DAY, &ev())
                .await
                .unwrap(),
        ); // v1..v3
    }
    ops.push(
        s.set_status("edge-a", ApplianceStatus::Revoked, NOW, &ev())
            .await
            .unwrap(),
    ); // v4: 3 deltas
    register(s, "edge-b").await;
    register(s, "edge-c").await;
    for (id, n) in [
        ("edge-b", 1),
        ("edge-b", 2),
        ("edge-b", 3),
        ("edge-c", 1),
        ("edge-c", 2),
    ] {
        ops.push(
            s.record_certificate(&cert(id, n), NOW, 100, &ev())
                .await
                .unwrap(),
        ); // v5..v9
    }
    // Windows of two appliances end together: one version for the whole call.
    let expired = s.expire_overlaps(NOW + 100).await.unwrap(); // v10: 3 deltas
    assert_eq!(
        expired,
        vec![
            delta(10, &cert("edge-b", 1), false),
            delta(10, &cert("edge-b", 2), false),
            delta(10, &cert("edge-c", 1), false),
        ]
    );
    ops.push(expired);
    ops.push(
        s.record_certificate(&cert("edge-b", 4), NOW + 200, 0, &ev())
            .await
            .unwrap(),
    ); // v11: 2 deltas
    ops.push(
        s.set_status("edge-c", ApplianceStatus::Disabled, NOW + 300, &ev())
            .await
            .unwrap(),
    ); // v12
    let sizes: Vec<usize> = ops.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 1, 1, 3, 1, 1, 1, 1, 1, 3, 2, 1]);
    let log = ops.concat();
    check_one_version_per_operation(&ops, 1, 12, &log);
    assert_eq!(s.allowlist_changes_since(0, 0).await.unwrap(), log);

    // The limit falling inside a version takes the rest of it.
    let page = s.allowlist_changes_since(3, 1).await.unwrap();
    assert_eq!(page, ops[3]);
    assert_eq!(s.allowlist_changes_since(3, 2).await.unwrap(), ops[3]);
    assert_eq!(s.allowlist_changes_since(3, 3).await.unwrap(), ops[3]);
    assert_eq!(
        s.allowlist_changes_since(3, 4).await.unwrap(),
        ops[3..5].concat()
    );
    assert_eq!(
        s.allowlist_changes_since(2, 2).await.unwrap(),
        ops[2..4].concat()
    );
    assert_eq!(
        s.allowlist_changes_since(9, 4).await.unwrap(),
        ops[9..11].concat()
    );

    // Every starting point and page size: exactly the whole versions the rule says.
    for since in 0..=13 {
        for limit in 1..=log.len() + 1 {
            let page = s
                .allowlist_changes_since(since, limit as u32)
                .await
                .unwrap();
            assert_eq!(
                page,
                expected_page(&log, since, limit),
                "since {since}, limit {limit}"
            );
            if let Some(last) = page.last() {
                assert_eq!(page[0].version, since + 1);
                let remaining = log.iter().filter(|d| d.version > since).count();
                assert!(page.len() >= limit.min(remaining));
                let whole: usize = ops[since as usize..last.version as usize]
                    .iter()
                    .map(Vec::len)
                    .sum();
                assert_eq!(page.len(), whole, "since {since}, limit {limit}");
            }
        }
    }
}

async fn current_and_found_certificates(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.current_certificates().await.unwrap(), vec![]);
    assert_eq!(s.find_certificate(&"00".repeat(32)).await.unwrap(), None);
    for id in ["b-2", "B-1", "a.1", "never", "gone"] {
        register(s, id).await;
    }
    // Renewed inside its overlap: the new one is current, the old one still allowed.
    let b1_1 = cert("B-1", 1);
    s.record_certificate(&b1_1, NOW, DAY, &ev()).await.unwrap();
    let b1_2 = cert("B-1", 2);
    s.record_certificate(&b1_2, NOW + 10, DAY, &ev())
        .await
        .unwrap();
    // Disabled: current, but out of the allowlist.
    let a1 = cert("a.1", 1);
    s.record_certificate(&a1, NOW, DAY, &ev()).await.unwrap();
    s.set_status("a.1", ApplianceStatus::Disabled, NOW + 20, &ev())
        .await
        .unwrap();
    // Renewed without overlap: the old one revoked.
    let b2_1 = cert("b-2", 1);
    s.record_certificate(&b2_1, NOW, DAY, &ev()).await.unwrap();
    let b2_2 = cert("b-2", 2);
    s.record_certificate(&b2_2, NOW + 30, 0, &ev())
        .await
        .unwrap();
    // Revoked: no current certificate.
    let gone = cert("gone", 1);
    s.record_certificate(&gone, NOW, DAY, &ev()).await.unwrap();
    s.set_status("gone", ApplianceStatus::Revoked, NOW + 40, &ev())
        .await
        .unwrap();

    // Ordered bytewise by appliance id: "B-1" < "a.1" < "b-2".
    assert_eq!(
        s.current_certificates().await.unwrap(),
        vec![b1_2.clone(), a1.clone(), b2_2.clone()]
    );
    assert_eq!(
        s.current_certificate("B-1").await.unwrap(),
        Some(b1_2.clone())
    );
    assert_eq!(
        s.current_certificate("a.1").await.unwrap(),
        Some(a1.clone())
    );
    assert_eq!(
        s.current_certificate("b-2").await.unwrap(),
        Some(b2_2.clone())
    );
    assert_eq!(s.current_certificate("never").await.unwrap(), None);
    assert_eq!(s.current_certificate("gone").await.unwrap(), None);
    assert!(matches!(
        s.current_certificate("nope").await,
        Err(StoreError::NotFound(_))
    ));

    let found = |fp: String| async move { s.find_certificate(&fp).await.unwrap() };
    let with = |c: &CertRecord, state: CertState| CertRecord { state, ..c.clone() };
    assert_eq!(
        found(b1_2.fingerprint.clone()).await,
        Some((b1_2.clone(), true))
    );
    assert_eq!(
        found(b1_1.fingerprint.clone()).await,
        Some((with(&b1_1, CertState::PreviousUntil(NOW + 10 + DAY)), true))
    );
    assert_eq!(
        found(a1.fingerprint.clone()).await,
        Some((a1.clone(), false))
    );
    assert_eq!(
        found(b2_1.fingerprint.clone()).await,
        Some((with(&b2_1, CertState::Revoked), false))
    );
    assert_eq!(
        found(b2_2.fingerprint.clone()).await,
        Some((b2_2.clone(), true))
    );
    assert_eq!(
        found(gone.fingerprint.clone()).await,
        Some((with(&gone, CertState::Revoked), false))
    );
    assert_eq!(found("ff".repeat(32)).await, None);
    // The answers agree with the allowlist itself.
    let (_, allowed) = snapshot_set(s).await;
    for c in [&b1_1, &b1_2, &a1, &b2_1, &b2_2, &gone] {
        let (_, ok) = found(c.fingerprint.clone()).await.unwrap();
        assert_eq!(
            ok,
            allowed.contains(&(c.appliance_id.clone(), c.fingerprint.clone())),
            "{}",
            c.fingerprint
        );
    }

    // The overlap ends: the old one is no longer allowed. Enabling brings a.1 back.
    s.expire_overlaps(NOW + 10 + DAY).await.unwrap();
    assert_eq!(
        found(b1_1.fingerprint.clone()).await,
        Some((with(&b1_1, CertState::Revoked), false))
    );
    s.set_status("a.1", ApplianceStatus::Active, NOW + 50, &ev())
        .await
        .unwrap();
    assert_eq!(
        found(a1.fingerprint.clone()).await,
        Some((a1.clone(), true))
    );
    // Still one current certificate per appliance after all that.
    assert_eq!(
        s.current_certificates().await.unwrap(),
        vec![b1_2.clone(), a1.clone(), b2_2.clone()]
    );
}

async fn snapshot_equals_replayed_deltas(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-0").await;
    s.record_certificate(&cert("edge-0", 1), NOW, DAY, &ev())
        .await
        .unwrap();
    let (v_mid, mid) = snapshot_set(s).await;
    churn(s).await;
    let (v_end, end) = snapshot_set(s).await;

    // From nothing.
    assert_eq!(
        replayed(&s.allowlist_changes_since(0, 0).await.unwrap()),
        end
    );
    // From an earlier snapshot, as a reconnecting broker does.
    let mut resumed = mid.clone();
    let tail = s.allowlist_changes_since(v_mid, 0).await.unwrap();
    assert_eq!(tail.last().map(|d| d.version), Some(v_end));
    replay(&mut resumed, &tail);
    assert_eq!(resumed, end);
    assert_eq!(v_end, s.allowlist_version().await.unwrap());
}

async fn concurrent_recordings_get_each_version_once(db: &TestDb) {
    let s = &db.store;
    const N: u32 = 20;
    for i in 0..N {
        register(s, &format!("edge-{i:02}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..N {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.record_certificate(&cert(&format!("edge-{i:02}"), 1), NOW, DAY, &ev())
                .await
        }));
    }
    let mut ops = Vec::new();
    for t in tasks {
        let deltas = t.await.unwrap().expect("record_certificate");
        assert_eq!(deltas.len(), 1);
        ops.push(deltas);
    }
    let log = s.allowlist_changes_since(0, 0).await.unwrap();
    check_one_version_per_operation(&ops, 1, i64::from(N), &log);
    assert_eq!(snapshot_set(s).await.1.len(), N as usize);

    // The same under mixed operations on the same appliances: still no gap, no repeat.
    let mut tasks = Vec::new();
    for i in 0..N {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("edge-{:02}", i % 5);
            match i % 4 {
                0 => {
                    s.set_status(&id, ApplianceStatus::Disabled, NOW, &ev())
                        .await
                }
                1 => s.set_status(&id, ApplianceStatus::Active, NOW, &ev()).await,
                2 => {
                    s.record_certificate(&cert(&id, 100 + i), NOW, 0, &ev())
                        .await
                }
                _ => {
                    s.record_certificate(&cert(&id, 100 + i), NOW, DAY, &ev())
                        .await
                }
            }
        }));
    }
    let mut ops = Vec::new();
    for t in tasks {
        ops.push(t.await.unwrap().expect("operation"));
    }
    let top = s.allowlist_version().await.unwrap();
    let log = s.allowlist_changes_since(0, 0).await.unwrap();
    check_one_version_per_operation(&ops, i64::from(N) + 1, top, &log);
    assert_eq!(snapshot_set(s).await, (top, replayed(&log)));
}

async fn concurrent_operations_get_one_version_each(db: &TestDb) {
    let s = &db.store;
    const APPLIANCES: u32 = 6;
    const TASKS: u32 = 24;
    const ROUNDS: u32 = 3;
    // Each appliance starts with two allowed fingerprints, so the first disable of each
    // moves several at once whatever the interleaving.
    for a in 0..APPLIANCES {
        let id = format!("edge-{a}");
        register(s, &id).await;
        for n in [9001, 9002] {
            s.record_certificate(&cert(&id, n), NOW, 3600, &ev())
                .await
                .unwrap();
        }
    }
    let mut first = s.allowlist_version().await.unwrap() + 1;
    assert_eq!(first, 2 * i64::from(APPLIANCES) + 1);
    let mut several = false;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("edge-{}", i % APPLIANCES);
                let n = 1000 * round + i;
                let at = NOW + i64::from(n);
                match (i / APPLIANCES + round) % 6 {
                    // Renewals with overlap pile up several allowed fingerprints, which
                    // disable, enable, revoke and a renewal without overlap then move
                    // together.
                    0 | 1 => s.record_certificate(&cert(&id, n), at, 3600, &ev()).await,
                    2 => {
                        s.set_status(&id, ApplianceStatus::Disabled, at, &ev())
                            .await
                    }
                    3 => s.set_status(&id, ApplianceStatus::Active, at, &ev()).await,
                    4 if i % 2 == 0 => s.set_status(&id, ApplianceStatus::Revoked, at, &ev()).await,
                    4 => s.record_certificate(&cert(&id, n), at, 0, &ev()).await,
                    _ => s.expire_overlaps(at + 1800).await,
                }
            }));
        }
        let mut ops = Vec::new();
        for t in tasks {
            ops.push(t.await.unwrap().expect("operation"));
        }
        let top = s.allowlist_version().await.unwrap();
        let log = s.allowlist_changes_since(0, 0).await.unwrap();
        check_one_version_per_operation(&ops, first, top, &log);
        several |= ops.iter().any(|op| op.len() > 1);
        // The log replays to exactly the snapshot, at the same version.
        assert_eq!(snapshot_set(s).await, (top, replayed(&log)));
        // And paging by whole versions replays to the same.
        let mut paged = Vec::new();
        let mut since = 0;
        loop {
            let page = s.allowlist_changes_since(since, 2).await.unwrap();
            let Some(last) = page.last() else { break };
            since = last.version;
            paged.extend(page);
        }
        assert_eq!(paged, log);
        first = top + 1;
    }
    assert!(several, "no operation moved several fingerprints");
    // Whatever happened, at most one current certificate per appliance.
    let current = s.current_certificates().await.unwrap();
    let ids: BTreeSet<_> = current.iter().map(|c| c.appliance_id.clone()).collect();
    assert_eq!(ids.len(), current.len());
}

async fn snapshots_during_concurrent_writes_are_consistent(db: &TestDb) {
    let s = &db.store;
    const WRITERS: u32 = 4;
    const EACH: u32 = 15;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let id = format!("edge-{w}");
            register(&s, &id).await;
            for n in 0..EACH {
                let overlap = if n % 3 == 0 { 0 } else { 60 };
                s.record_certificate(&cert(&id, n), NOW + i64::from(n), overlap, &ev())
                    .await
                    .unwrap();
                if n % 5 == 4 {
                    s.set_status(&id, ApplianceStatus::Disabled, NOW, &ev())
                        .await
                        .unwrap();
                    s.set_status(&id, ApplianceStatus::Active, NOW, &ev())
                        .await
                        .unwrap();
                }
            }
        }));
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (s, done) = (s.clone(), done.clone());
        tokio::spawn(async move {
            let mut snaps = Vec::new();
            while !done.load(Ordering::Relaxed) && snaps.len() < 500 {
                snaps.push(snapshot_set(&s).await);
                tokio::task::yield_now().await;
            }
            snaps
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut snaps = reader.await.unwrap();
    snaps.push(snapshot_set(s).await);
    let log = s.allowlist_changes_since(0, 0).await.unwrap();
    let top = s.allowlist_version().await.unwrap();
    let versions: BTreeSet<i64> = log.iter().map(|d| d.version).collect();
    assert_eq!(
        versions,
        (1..=top).collect(),
        "every version has its changes"
    );
    let distinct: BTreeSet<i64> = snaps.iter().map(|(v, _)| *v).collect();
    eprintln!(
        "{} snapshots at {} distinct versions",
        snaps.len(),
        distinct.len()
    );
    for (version, pairs) in snaps {
        let upto: Vec<AllowlistDelta> = log
            .iter()
            .filter(|d| d.version <= version)
            .cloned()
            .collect();
        assert_eq!(pairs, replayed(&upto), "snapshot at version {version}");
    }
}

async fn reconnecting_keeps_data_and_schema(db: &TestDb) {
    let s = &db.store;
    let c = enrolled(s, "edge-1").await;
    // A second store on the same database (another replica, or a restart): migrations
    // are already applied and the data is there.
    let again = SqlStore::connect(&db.url).await.expect("reconnect");
    assert_eq!(again.allowlist_version().await.unwrap(), 1);
    assert_eq!(
        states(&again, "edge-1").await,
        vec![(c.serial.clone(), CertState::Current)]
    );
    let c2 = cert("edge-1", 2);
    assert_eq!(
        again
            .record_certificate(&c2, NOW, DAY, &ev())
            .await
            .unwrap(),
        vec![delta(2, &c2, true)]
    );
    assert_eq!(s.allowlist_version().await.unwrap(), 2);
    again.close().await;
    if let Some(dir) = &db.dir {
        // SQLite runs in WAL mode: the write-ahead log sits next to the file.
        assert!(dir.path().join("control.db-wal").exists(), "no WAL file");
    }
    let dbg = format!("{s:?}");
    assert!(dbg.contains("SqlStore") && !dbg.contains("://"), "{dbg}");
}

// ---------------------------------------------------------------------------------------
// The audit log

/// Every audit entry, read in pages of `page` (0: the store's default).
async fn all_entries(s: &SqlStore, page: u32) -> Vec<AuditEntry> {
    let mut out: Vec<AuditEntry> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.seq);
        let batch = s.audit_entries(after, page).await.expect("audit entries");
        if batch.is_empty() {
            return out;
        }
        if page > 0 {
            assert!(batch.len() <= page as usize, "page longer than its limit");
        }
        out.extend(batch);
    }
}

/// The whole log verifies from the first entry, with seq 1..=n.
fn check_chain(entries: &[AuditEntry]) {
    let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=entries.len() as i64).collect::<Vec<_>>());
    verify_chain(entries).expect("the chain verifies");
    let mut v = ChainVerifier::from_genesis();
    for e in entries {
        v.push(e).expect("the chain verifies from genesis");
    }
    if let Some(first) = entries.first() {
        assert_eq!(first.prev_hash, GENESIS_HASH);
    }
    for w in entries.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
}

/// Each allowlist version is carried by exactly one entry (the operation that made it).
fn check_one_entry_per_version(entries: &[AuditEntry], top: i64) {
    let versions: Vec<i64> = entries
        .iter()
        .filter(|e| e.details["allowlist_changes"].as_u64().unwrap_or(0) > 0)
        .map(|e| e.details["allowlist_version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, (1..=top).collect::<Vec<_>>());
}

async fn audit_chain_verifies_after_mixed_operations(db: &TestDb) {
    let s = &db.store;
    let admin = || Actor::system(system::LOCAL_ADMIN);
    let edge = || Actor::appliance("edge-1");
    s.register_appliance(
        &appliance("edge-1", "acme"),
        &AuditEvent::success(admin(), action::APPLIANCE_REGISTER, "edge-1").with("tenant", "acme"),
    )
    .await
    .unwrap(); // 1, at created_at = NOW
    s.create_token(
        "edge-1",
        "hash-1",
        NOW + 60,
        NOW + 1,
        &AuditEvent::success(admin(), action::TOKEN_CREATE, "edge-1").with("token_ref", "hash"),
    )
    .await
    .unwrap(); // 2
    s.redeem_token(
        "edge-1",
        "hash-1",
        NOW + 2,
        &AuditEvent::success(edge(), action::TOKEN_REDEEM, "edge-1"),
    )
    .await
    .unwrap(); // 3
    let c1 = cert("edge-1", 1);
    let enrolled = AuditEvent::success(edge(), action::APPLIANCE_ENROLL, "edge-1")
        .with("proof_kind", "token")
        .with("fingerprint", c1.fingerprint.as_str());
    s.record_certificate(&c1, NOW + 3, 100, &enrolled)
        .await
        .unwrap(); // 4, v1
    let c2 = cert("edge-1", 2);
    let renewed = AuditEvent::success(edge(), action::APPLIANCE_RENEW, "edge-1");
    s.record_certificate(&c2, NOW + 4, 100, &renewed)
        .await
        .unwrap(); // 5, v2; c1 allowed until NOW + 104
    let refusal = AuditEvent::refused(edge(), action::APPLIANCE_ENROLL, "edge-1", "nonce_replayed")
        .with("proof_kind", "token");
    let appended = s.append_audit(&refusal, NOW + 5).await.unwrap(); // 6
    assert_eq!(
        (appended.seq, appended.at, appended.event()),
        (6, NOW + 5, refusal)
    );
    let status_event =
        |what: &str| AuditEvent::success(admin(), what, "edge-1").with("reason", "test");
    let d = s
        .set_status(
            "edge-1",
            ApplianceStatus::Disabled,
            NOW + 6,
            &status_event(action::APPLIANCE_DISABLE),
        )
        .await
        .unwrap(); // 7, v3 (two fingerprints)
    assert_eq!(d.len(), 2);
    let d = s
        .set_status(
            "edge-1",
            ApplianceStatus::Disabled,
            NOW + 7,
            &status_event(action::APPLIANCE_DISABLE),
        )
        .await
        .unwrap(); // 8, no change: recorded, version unchanged
    assert!(d.is_empty());
    s.set_status(
        "edge-1",
        ApplianceStatus::Active,
        NOW + 8,
        &status_event(action::APPLIANCE_ENABLE),
    )
    .await
    .unwrap(); // 9, v4
    let generation = s
        .bump_manual_renewal(
            "edge-1",
            NOW + 9,
            &AuditEvent::success(admin(), action::APPLIANCE_REQUEST_RENEWAL, "edge-1"),
        )
        .await
        .unwrap(); // 10
    assert_eq!(generation, 1);
    assert_eq!(s.expire_overlaps(NOW + 200).await.unwrap().len(), 1); // 11, v5
    assert!(s.expire_overlaps(NOW + 300).await.unwrap().is_empty()); // no entry
    s.set_status(
        "edge-1",
        ApplianceStatus::Revoked,
        NOW + 10,
        &status_event(action::APPLIANCE_REVOKE),
    )
    .await
    .unwrap(); // 12, v6

    let entries = all_entries(s, 5).await;
    assert_eq!(entries, all_entries(s, 0).await);
    check_chain(&entries);
    let summary: Vec<(&str, &str, i64, Outcome)> = entries
        .iter()
        .map(|e| (e.actor.name.as_str(), e.action.as_str(), e.at, e.outcome))
        .collect();
    use Outcome::{Refused, Success};
    assert_eq!(
        summary,
        vec![
            ("local-admin", action::APPLIANCE_REGISTER, NOW, Success),
            ("local-admin", action::TOKEN_CREATE, NOW + 1, Success),
            ("edge-1", action::TOKEN_REDEEM, NOW + 2, Success),
            ("edge-1", action::APPLIANCE_ENROLL, NOW + 3, Success),
            ("edge-1", action::APPLIANCE_RENEW, NOW + 4, Success),
            ("edge-1", action::APPLIANCE_ENROLL, NOW + 5, Refused),
            ("local-admin", action::APPLIANCE_DISABLE, NOW + 6, Success),
            ("local-admin", action::APPLIANCE_DISABLE, NOW + 7, Success),
            ("local-admin", action::APPLIANCE_ENABLE, NOW + 8, Success),
            (
                "local-admin",
                action::APPLIANCE_REQUEST_RENEWAL,
                NOW + 9,
                Success
            ),
            (
                "control",
                action::ALLOWLIST_EXPIRE_OVERLAPS,
                NOW + 200,
                Success
            ),
            ("local-admin", action::APPLIANCE_REVOKE, NOW + 10, Success),
        ]
    );
    // The caller's details, plus what the store adds.
    assert_eq!(
        entries[3].details,
        serde_json::json!({
            "proof_kind": "token",
            "fingerprint": c1.fingerprint,
            "allowlist_version": 1,
            "allowlist_changes": 1,
        })
    );
    assert_eq!(entries[6].details["allowlist_changes"], 2);
    assert_eq!(
        entries[7].details,
        serde_json::json!({"reason": "test", "allowlist_version": 3, "allowlist_changes": 0})
    );
    assert_eq!(entries[9].details["manual_renewal_generation"], 1);
    assert_eq!(entries[10].actor, Actor::system(system::CONTROL));
    assert_eq!(entries[10].details["appliances"], 1);
    assert_eq!(entries[5], appended);
    check_one_entry_per_version(&entries, s.allowlist_version().await.unwrap());
    // Past the end: nothing.
    assert!(s.audit_entries(12, 10).await.unwrap().is_empty());
    assert_eq!(
        s.audit_entries(10, 1).await.unwrap(),
        vec![entries[10].clone()]
    );
}

async fn failed_operations_leave_neither_change_nor_entry(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await; // 1
    let c1 = cert("edge-1", 1);
    s.record_certificate(&c1, NOW, DAY, &ev()).await.unwrap(); // 2, v1
    s.create_token("edge-1", "hash-1", NOW + 60, NOW, &ev())
        .await
        .unwrap(); // 3
    let before = all_entries(s, 0).await;
    assert_eq!(before.len(), 3);
    let snapshot = snapshot_set(s).await;

    let conflict = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Conflict(_)));
    let not_found = |r: Result<(), StoreError>| matches!(r, Err(StoreError::NotFound(_)));
    let invalid = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Invalid(_)));
    assert!(conflict(
        s.register_appliance(&appliance("edge-1", "globex"), &ev())
            .await
    ));
    let same_serial = CertRecord {
        serial: c1.serial.clone(),
        ..cert("edge-1", 2)
    };
    let same_fingerprint = CertRecord {
        fingerprint: c1.fingerprint.clone(),
        ..cert("edge-1", 3)
    };
    for dup in [&same_serial, &same_fingerprint] {
        assert!(conflict(
            s.record_certificate(dup, NOW + 1, 0, &ev()).await.map(drop)
        ));
    }
    assert!(conflict(
        s.create_token("edge-1", "hash-1", NOW + 90, NOW, &ev())
            .await
    ));
    assert!(not_found(
        s.create_token("ghost", "hash-9", NOW + 90, NOW, &ev())
            .await
    ));
    assert!(matches!(
        s.redeem_token("edge-1", "nope", NOW, &ev()).await,
        Err(StoreError::Token(TokenRefusal::Unknown))
    ));
    assert!(matches!(
        s.redeem_token("edge-1", "hash-1", NOW + 60, &ev()).await,
        Err(StoreError::Token(TokenRefusal::Expired))
    ));
    assert!(not_found(
        s.set_status("ghost", ApplianceStatus::Disabled, NOW, &ev())
            .await
            .map(drop)
    ));
    assert!(not_found(
        s.bump_manual_renewal("ghost", NOW, &ev()).await.map(drop)
    ));
    assert!(not_found(
        s.record_certificate(&cert("ghost", 1), NOW, DAY, &ev())
            .await
            .map(drop)
    ));

    // An event the log will not take fails the operation before it changes anything.
    let too_long = AuditEvent::success(
        Actor::system("test"),
        "test.operation",
        "x".repeat(MAX_TARGET_LEN + 1),
    );
    assert!(invalid(
        s.register_appliance(&appliance("edge-2", "acme"), &too_long)
            .await
    ));
    assert_eq!(s.get_appliance("edge-2").await.unwrap(), None);
    let fractional = ev().with("ratio", 0.5);
    assert!(invalid(
        s.set_status("edge-1", ApplianceStatus::Disabled, NOW, &fractional)
            .await
            .map(drop)
    ));
    assert!(invalid(s.append_audit(&fractional, NOW).await.map(drop)));
    assert!(invalid(
        s.redeem_token("edge-1", "hash-1", NOW, &fractional).await
    ));
    // One that breaks the limits only once the store adds the allowlist version: the
    // certificate was already inserted and the version bumped inside the transaction,
    // and both roll back with the entry.
    let blob = "b".repeat(MAX_DETAILS_LEN - r#"{"blob":""}"#.len());
    let full = ev().with("blob", blob);
    assert!(full.validate().is_ok());
    assert!(invalid(
        s.record_certificate(&cert("edge-1", 4), NOW + 1, DAY, &full)
            .await
            .map(drop)
    ));
    assert!(invalid(
        s.set_status("edge-1", ApplianceStatus::Revoked, NOW + 1, &full)
            .await
            .map(drop)
    ));

    // Nothing changed: no entry, no version, no certificate, the token not burnt.
    assert_eq!(all_entries(s, 0).await, before);
    assert_eq!(snapshot_set(s).await, snapshot);
    assert_eq!(status(s, "edge-1").await, ApplianceStatus::Active);
    assert_eq!(
        states(s, "edge-1").await,
        vec![(c1.serial.clone(), CertState::Current)]
    );
    s.redeem_token("edge-1", "hash-1", NOW + 1, &ev())
        .await
        .unwrap(); // 4
    let after = all_entries(s, 0).await;
    assert_eq!(after.len(), 4);
    check_chain(&after);
}

async fn concurrent_appends_form_one_gap_free_chain(db: &TestDb) {
    let s = &db.store;
    const APPLIANCES: u32 = 4;
    const TASKS: u32 = 16;
    const EACH: u32 = 8;
    for a in 0..APPLIANCES {
        register(s, &format!("edge-{a}")).await;
    }
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("edge-{}", t % APPLIANCES);
            let mut appended = Vec::new();
            for n in 0..EACH {
                let at = NOW + i64::from(n);
                match (t + n) % 4 {
                    0 | 1 => {
                        let refusal = AuditEvent::refused(
                            Actor::appliance(id.as_str()),
                            action::APPLIANCE_ENROLL,
                            id.as_str(),
                            "nonce_replayed",
                        )
                        .with("task", t)
                        .with("n", n);
                        appended.push(s.append_audit(&refusal, at).await.unwrap());
                    }
                    2 => {
                        s.record_certificate(&cert(&id, 1000 * t + n), at, 60, &ev())
                            .await
                            .unwrap();
                    }
                    _ => {
                        let st = if n % 2 == 0 {
                            ApplianceStatus::Disabled
                        } else {
                            ApplianceStatus::Active
                        };
                        s.set_status(&id, st, at, &ev()).await.unwrap();
                    }
                }
            }
            appended
        }));
    }
    let mut appended = Vec::new();
    for t in tasks {
        appended.extend(t.await.unwrap());
    }
    let entries = all_entries(s, 7).await;
    assert_eq!(entries.len() as u32, APPLIANCES + TASKS * EACH);
    check_chain(&entries);
    // What each append returned is what the log holds at that seq.
    assert_eq!(appended.len() as u32, TASKS * EACH / 2);
    for a in &appended {
        assert_eq!(&entries[(a.seq - 1) as usize], a);
    }
    check_one_entry_per_version(&entries, s.allowlist_version().await.unwrap());
}

async fn audit_log_is_append_only_in_the_database(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    register(s, "edge-2").await;
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let mut refused = vec![
        "UPDATE audit_log SET outcome = 'refused' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 2",
    ];
    if db.pg.is_some() {
        refused.push("TRUNCATE audit_log");
    }
    for sql in refused {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    conn.close().await.unwrap();
    let entries = all_entries(s, 0).await;
    assert_eq!(entries.len(), 2);
    check_chain(&entries);
}

#[test]
fn unsupported_url_is_refused_without_echoing_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(SqlStore::connect("mysql://root:secret@localhost/db")) {
        Err(StoreError::Database(msg)) => {
            assert!(msg.contains("mysql") && !msg.contains("secret"), "{msg}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        Backend::from_url("sqlite:///tmp/x.db?mode=rwc").unwrap(),
        Backend::Sqlite
    );
    assert_eq!(
        Backend::from_url("postgresql://h/db").unwrap(),
        Backend::Postgres
    );
}

#[test]
fn database_url_rewrite() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/tether_test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://h:1/a?sslmode=disable", "b"),
        "postgres://h:1/b?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h:1", "b"), "postgres://h:1/b");
}
