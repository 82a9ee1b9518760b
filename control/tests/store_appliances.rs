//! The store contract for appliances, on both backends (see `common`): registering,
//! reading and listing with filters and pages, conflicts, the manual-renewal generation,
//! and the status changes (disable, enable, revoke) with the allowlist deltas they make.

mod common;

use std::collections::BTreeSet;

use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_control::store::sql::DEFAULT_LIST_LIMIT;
use tether_control::store::{Appliance, ApplianceFilter, CertRecord, CertState, Store, StoreError};

use common::*;

on_both_backends!(
    register_get_and_list_with_filters_and_pages,
    registering_an_existing_id_is_a_conflict,
    unknown_appliance_is_not_found,
    manual_renewal_generation_counts_up,
    disable_enable_revoke_move_fingerprints_with_deltas,
    enable_puts_back_only_what_is_still_valid,
);

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
