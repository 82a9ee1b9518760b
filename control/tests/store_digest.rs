//! The allowlist's digest chain (issue 17, step 3): every version gets a digest in the
//! transaction that commits it, chained to the previous one, under concurrent writers on
//! several store handles (as several control replicas would be); versions committed
//! before the chain existed get theirs when a store opens the database.

mod common;

use sqlx::Connection;
use tether_api::appliances::ApplianceStatus;
use tether_control::store::sql::{version_digest, SqlStore};
use tether_control::store::{AllowlistDelta, Store};
use tether_proto::cluster::{to_hex, ALLOWLIST_GENESIS_DIGEST};

use common::*;

on_both_backends!(
    two_handles_make_one_gap_free_history_with_a_valid_digest_chain,
    digests_missing_from_older_versions_are_filled_in_on_open,
);

/// Recompute the chain from the recorded changes and compare it with the stored digests.
async fn check_chain(s: &SqlStore, last: i64) {
    let log = s.allowlist_changes_since(0, 0).await.unwrap();
    let stored = s.allowlist_digests(0, last).await.unwrap();
    assert_eq!(
        stored.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "one digest per version, no gap"
    );
    let mut prev = ALLOWLIST_GENESIS_DIGEST;
    for (version, digest) in stored {
        let changes: Vec<AllowlistDelta> = log
            .iter()
            .filter(|d| d.version == version)
            .cloned()
            .collect();
        assert!(!changes.is_empty(), "version {version} has changes");
        prev = version_digest(&prev, version, &changes);
        assert_eq!(digest, to_hex(&prev), "digest of version {version}");
    }
}

async fn two_handles_make_one_gap_free_history_with_a_valid_digest_chain(db: &TestDb) {
    let a = db.store.clone();
    let b = SqlStore::connect(&db.url).await.expect("second handle");
    const N: u32 = 12;
    for i in 0..N {
        register(&a, &format!("edge-{i:02}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..3 * N {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let id = format!("edge-{:02}", i % N);
            match i / N {
                0 => s.record_certificate(&cert(&id, 1), NOW, DAY, &ev()).await,
                1 => {
                    s.set_status(&id, ApplianceStatus::Disabled, NOW, &ev())
                        .await
                }
                _ => s.set_status(&id, ApplianceStatus::Active, NOW, &ev()).await,
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("trust change");
    }
    let last = a.allowlist_version().await.unwrap();
    assert_eq!(last, b.allowlist_version().await.unwrap());
    assert!(
        last >= i64::from(N),
        "at least the recordings bumped: {last}"
    );
    check_chain(&a, last).await;
    b.close().await;
}

async fn digests_missing_from_older_versions_are_filled_in_on_open(db: &TestDb) {
    let s = &db.store;
    for id in ["edge-1", "edge-2"] {
        register(s, id).await;
        s.record_certificate(&cert(id, 1), NOW, DAY, &ev())
            .await
            .unwrap();
    }
    s.set_status("edge-1", ApplianceStatus::Revoked, NOW, &ev())
        .await
        .unwrap();
    let before = s.allowlist_digests(0, 3).await.unwrap();
    assert_eq!(before.len(), 3);
    // As a database from before the chain (or written by an older replica) would be.
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    sqlx::query("DELETE FROM allowlist_versions WHERE version >= 2")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let reopened = SqlStore::connect(&db.url).await.unwrap();
    assert_eq!(reopened.allowlist_digests(0, 3).await.unwrap(), before);
    check_chain(&reopened, 3).await;
    // And the next commit chains to them.
    register(&reopened, "edge-3").await;
    reopened
        .record_certificate(&cert("edge-3", 1), NOW, DAY, &ev())
        .await
        .unwrap();
    check_chain(&reopened, 4).await;
    reopened.close().await;
}
