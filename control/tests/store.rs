//! The store contract, on both backends: every case runs once on SQLite (a file in a
//! temporary directory) and once on PostgreSQL (a fresh database per test on the server
//! that `TETHER_TEST_PG_URL` names). `./scripts/test` starts that server; by hand:
//! `export TETHER_TEST_PG_URL=$(scripts/pg)`. Without it the PostgreSQL half fails, it
//! never skips.
//!
//! The cases are split by concern, sharing the harness in `common/mod.rs`:
//!
//! - this file: connecting (backends from URLs, reconnecting to the same data);
//! - `store_appliances.rs`: registering, listing, status changes;
//! - `store_enrollment.rs`: tokens, nonces, proofs, certificates and their overlaps;
//! - `store_allowlist.rs`: allowlist versions, deltas, pages, snapshots, concurrency;
//! - `store_audit.rs`: the audit log's chain;
//! - `store_operators.rs`: operators and their invites (its own harness).

mod common;

use tether_control::store::sql::{Backend, SqlStore};
use tether_control::store::{CertState, Store, StoreError};

use common::*;

on_both_backends!(reconnecting_keeps_data_and_schema);

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
