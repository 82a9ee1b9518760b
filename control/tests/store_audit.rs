//! The store contract for the audit log, on both backends (see `common`): the hash chain
//! verifies after mixed operations, failed operations leave neither an allowlist change
//! nor an entry, concurrent appends form one gap-free chain, and the log is append-only in
//! the database itself.

mod common;

use sqlx::Connection;
use tether_api::appliances::ApplianceStatus;
use tether_audit::{
    action, system, verify_chain, Actor, AuditEntry, AuditEvent, ChainVerifier, Outcome,
    GENESIS_HASH, MAX_DETAILS_LEN, MAX_TARGET_LEN,
};
use tether_control::store::sql::SqlStore;
use tether_control::store::{CertRecord, CertState, Store, StoreError, TokenRefusal};

use common::*;

on_both_backends!(
    audit_chain_verifies_after_mixed_operations,
    failed_operations_leave_neither_change_nor_entry,
    concurrent_appends_form_one_gap_free_chain,
    audit_log_is_append_only_in_the_database,
);

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
