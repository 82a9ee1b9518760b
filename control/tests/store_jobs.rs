//! The store contract for periodic jobs' lease rows (`control_jobs`), on both backends
//! (see `common`): several stores on one database — several replicas — claim a job, and
//! exactly one wins each period; the pruning the jobs do.

mod common;

use tether_control::store::sql::SqlStore;
use tether_control::store::{JobClaim, ReplicaInfo, Store};

use common::*;

on_both_backends!(
    a_job_is_claimed_once_per_period_across_replicas,
    a_shortened_period_takes_effect_at_once,
    silent_replicas_are_pruned,
);

const MINUTE_MS: i64 = 60_000;

async fn a_job_is_claimed_once_per_period_across_replicas(db: &TestDb) {
    // Three replicas, each with its own pool on the same database, racing for one job.
    let mut stores = vec![db.store.clone()];
    for _ in 0..2 {
        stores.push(SqlStore::connect(&db.url).await.unwrap());
    }
    let mut tasks = Vec::new();
    for round in 0..5 {
        for (i, s) in stores.iter().enumerate() {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let by = format!("replica-{i}");
                (
                    by.clone(),
                    round,
                    s.claim_job("sweep", MINUTE_MS, &by).await.unwrap(),
                )
            }));
        }
    }
    let mut claimed = Vec::new();
    for t in tasks {
        let (by, _, claim) = t.await.unwrap();
        match claim {
            JobClaim::Claimed { epoch } => claimed.push((by, epoch)),
            JobClaim::NotDue { due_in_ms } => {
                assert!(due_in_ms <= MINUTE_MS, "due within one period: {due_in_ms}")
            }
        }
    }
    assert_eq!(claimed.len(), 1, "one claim per period: {claimed:?}");
    let (winner, epoch) = &claimed[0];
    assert_eq!(*epoch, 1);
    let jobs = db.store.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].name, "sweep");
    assert_eq!(jobs[0].epoch, 1);
    assert_eq!(jobs[0].last_run_by.as_deref(), Some(winner.as_str()));
    let (next, last) = (jobs[0].next_run_at_ms, jobs[0].last_run_at_ms.unwrap());
    assert_eq!(
        next - last,
        MINUTE_MS,
        "scheduled one period after the claim"
    );
    // Another job is its own row, due at once.
    assert_eq!(
        stores[1]
            .claim_job("checkpoint", MINUTE_MS, "replica-1")
            .await
            .unwrap(),
        JobClaim::Claimed { epoch: 1 }
    );
    for s in stores.into_iter().skip(1) {
        s.close().await;
    }
}

async fn a_shortened_period_takes_effect_at_once(db: &TestDb) {
    let s = &db.store;
    assert_eq!(
        s.claim_job("sweep", 60 * MINUTE_MS, "a").await.unwrap(),
        JobClaim::Claimed { epoch: 1 }
    );
    assert!(matches!(
        s.claim_job("sweep", 60 * MINUTE_MS, "b").await.unwrap(),
        JobClaim::NotDue { .. }
    ));
    // The configuration now says every minute: an hour-long schedule is stale.
    assert_eq!(
        s.claim_job("sweep", MINUTE_MS, "b").await.unwrap(),
        JobClaim::Claimed { epoch: 2 }
    );
    assert!(matches!(
        s.claim_job("sweep", MINUTE_MS, "a").await.unwrap(),
        JobClaim::NotDue { .. }
    ));
}

async fn silent_replicas_are_pruned(db: &TestDb) {
    let s = &db.store;
    let info = ReplicaInfo {
        id: "r1".into(),
        advertise: "127.0.0.1:1".into(),
        api_addr: "127.0.0.1:1".into(),
        version: "0".into(),
    };
    s.replica_heartbeat(&info, true).await.unwrap();
    // Just heard from: kept.
    assert_eq!(s.prune_replicas(600).await.unwrap(), 0);
    assert_eq!(s.live_replicas(15).await.unwrap().len(), 1);
    // Silent for longer than -1 s, i.e. any heartbeat at all: forgotten.
    assert_eq!(s.prune_replicas(-1).await.unwrap(), 1);
    assert!(s.live_replicas(15).await.unwrap().is_empty());
}
