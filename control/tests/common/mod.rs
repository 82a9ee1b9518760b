//! The harness and helpers shared by the store contract's test files (`store*.rs`, each
//! with `mod common;`): [`TestDb`], a fresh store on SQLite or PostgreSQL;
//! `on_both_backends!`, which makes each case two tests; and small builders and readers.
//!
//! PostgreSQL: a fresh database per test on the server that `TETHER_TEST_PG_URL` names.
//! `./scripts/test` starts that server; by hand: `export TETHER_TEST_PG_URL=$(scripts/pg)`.
//! Without it the PostgreSQL half fails, it never skips.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_audit::{Actor, AuditEvent};
use tether_control::store::sql::{Backend, SqlStore};
use tether_control::store::{AllowlistDelta, Appliance, CertRecord, CertState, Store};

/// The variable naming the PostgreSQL server.
pub const PG_URL_VAR: &str = "TETHER_TEST_PG_URL";
/// Prefix of the per-test PostgreSQL databases: `tether_t_<pid>_<n>`.
pub const PG_DB_PREFIX: &str = "tether_t_";
/// "Now" in the cases, Unix seconds.
pub const NOW: i64 = 1_700_000_000;
/// One day, seconds.
pub const DAY: i64 = 86_400;

// ---------------------------------------------------------------------------------------
// Harness

/// A fresh, empty store, and what to clean up after it.
pub struct TestDb {
    /// The store under test.
    pub store: SqlStore,
    /// Its URL (to open a second store on the same database).
    pub url: String,
    /// SQLite: the temporary directory holding the file.
    pub dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the admin URL and the test database's name.
    pub pg: Option<(String, String)>,
}

impl TestDb {
    /// A store on a SQLite file in a fresh temporary directory.
    pub async fn sqlite() -> Self {
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

    /// A store on a fresh database of the PostgreSQL server `TETHER_TEST_PG_URL` names.
    pub async fn postgres() -> Self {
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
    pub async fn finish(self) {
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
pub fn with_database(url: &str, db: &str) -> String {
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
                    let db = crate::common::TestDb::sqlite().await;
                    super::$case(&db).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = crate::common::TestDb::postgres().await;
                    super::$case(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

// ---------------------------------------------------------------------------------------
// Helpers

/// An audit event for an operation whose entry the case does not look at.
pub fn ev() -> AuditEvent {
    AuditEvent::success(Actor::system("test"), "test.operation", "t")
}

/// An active, token-only appliance `id` of `tenant`, created at [`NOW`].
pub fn appliance(id: &str, tenant: &str) -> Appliance {
    Appliance {
        id: id.into(),
        tenant: tenant.into(),
        binding: PlatformBinding::TokenOnly,
        status: ApplianceStatus::Active,
        manual_renewal_generation: 0,
        created_at: NOW,
    }
}

/// Certificate `n` of `appliance_id`: current, valid for 30 days from [`NOW`], with a
/// serial and a fingerprint unique to the pair.
pub fn cert(appliance_id: &str, n: u32) -> CertRecord {
    CertRecord {
        serial: format!("{:x}{n:04x}", appliance_id.len()) + &hex(appliance_id),
        appliance_id: appliance_id.into(),
        fingerprint: format!("{n:08x}{}", hex(appliance_id)),
        not_before: NOW,
        not_after: NOW + 30 * DAY,
        state: CertState::Current,
    }
}

/// `s` in lowercase hexadecimal.
pub fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The allowlist delta of version `version` adding (or removing) `c`'s fingerprint.
pub fn delta(version: i64, c: &CertRecord, added: bool) -> AllowlistDelta {
    AllowlistDelta {
        version,
        appliance_id: c.appliance_id.clone(),
        fingerprint: c.fingerprint.clone(),
        added,
    }
}

/// Register `id` in the tenant `acme`.
pub async fn register(store: &SqlStore, id: &str) {
    store
        .register_appliance(&appliance(id, "acme"), &ev())
        .await
        .expect("register");
}

/// Register `id` and record its first certificate; returns it.
pub async fn enrolled(store: &SqlStore, id: &str) -> CertRecord {
    register(store, id).await;
    let c = cert(id, 1);
    store
        .record_certificate(&c, NOW, DAY, &ev())
        .await
        .expect("record");
    c
}

/// The serial and state of each of `id`'s certificates.
pub async fn states(store: &SqlStore, id: &str) -> Vec<(String, CertState)> {
    store
        .certificates(id)
        .await
        .expect("certificates")
        .into_iter()
        .map(|c| (c.serial, c.state))
        .collect()
}

/// The allowlist snapshot as a set (checking it has no duplicates), with its version.
pub async fn snapshot_set(store: &SqlStore) -> (i64, BTreeSet<(String, String)>) {
    let (v, pairs) = store.allowlist_snapshot().await.expect("snapshot");
    let set: BTreeSet<_> = pairs.iter().cloned().collect();
    assert_eq!(set.len(), pairs.len(), "snapshot has duplicates");
    (v, set)
}

/// The status of appliance `id`, which must exist.
pub async fn status(store: &SqlStore, id: &str) -> ApplianceStatus {
    store
        .get_appliance(id)
        .await
        .expect("get")
        .expect("exists")
        .status
}

/// Apply deltas to a set, checking each one is a real change.
pub fn replay(set: &mut BTreeSet<(String, String)>, deltas: &[AllowlistDelta]) {
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
