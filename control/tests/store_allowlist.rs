//! The store contract for the allowlist log, on both backends (see `common`): one version
//! per changing operation with no gaps, ordered changes, pagination that never splits a
//! version, snapshots equal to the replayed deltas, and all of it under concurrent writes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use tether_api::appliances::ApplianceStatus;
use tether_control::store::sql::SqlStore;
use tether_control::store::{AllowlistDelta, CertState, Store, StoreError};

use common::*;

on_both_backends!(
    versions_have_no_gaps_and_changes_are_ordered,
    revoking_many_fingerprints_bumps_the_version_once,
    one_version_can_hold_hundreds_of_changes,
    operations_that_change_nothing_do_not_bump,
    pagination_never_splits_a_version,
    snapshot_equals_replayed_deltas,
    concurrent_recordings_get_each_version_once,
    concurrent_operations_get_one_version_each,
    snapshots_during_concurrent_writes_are_consistent,
);

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
