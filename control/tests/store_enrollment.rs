//! The store contract for enrollment and certificates, on both backends (see `common`):
//! one-time tokens and their refusals, nonces, proof replay, pruning of expired
//! single-use values, recording certificates (renewal overlaps, duplicates, expiry of the
//! overlap windows), and the current and found certificates.

mod common;

use std::collections::BTreeSet;

use tether_api::appliances::ApplianceStatus;
use tether_control::store::{
    CertRecord, CertState, Issue, Receipt, ReceiptKind, Store, StoreError, TokenRefusal,
    TOKEN_RETENTION_SECS,
};

use common::*;

on_both_backends!(
    token_is_redeemed_once_by_its_appliance,
    token_refusals_say_why,
    nonce_is_single_use_and_expires,
    proof_replay_is_refused,
    expired_single_use_values_are_pruned,
    pruned_tokens_keep_their_refusal_for_the_retention,
    renewal_keeps_previous_for_the_overlap,
    renewal_without_overlap_removes_previous_at_once,
    recording_on_a_disabled_appliance_gives_no_overlap,
    duplicate_certificate_changes_nothing,
    expire_overlaps_removes_ended_windows_once,
    current_and_found_certificates,
    token_redemption_and_certificate_commit_together,
    a_receipt_answers_only_the_same_key_while_current,
);

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
    s.consume_nonce("fresh", NOW + 11).await.unwrap();
    // The nonce_prune job's call: what expired before NOW + 11 goes (one nonce, one proof).
    assert_eq!(s.prune_single_use(NOW + 11).await.unwrap(), 2);
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

/// Used and expired tokens are pruned only `TOKEN_RETENTION_SECS` after they expired:
/// until then a second redemption still answers "already used" and a late one "expired";
/// after, "unknown" (the token could not be redeemed either way).
async fn pruned_tokens_keep_their_refusal_for_the_retention(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    s.create_token("edge-1", "used", NOW + 60, NOW, &ev())
        .await
        .unwrap();
    s.create_token("edge-1", "late", NOW + 60, NOW, &ev())
        .await
        .unwrap();
    s.redeem_token("edge-1", "used", NOW + 1, &ev())
        .await
        .unwrap();
    let refusal = |r: Result<(), StoreError>| match r {
        Err(StoreError::Token(why)) => why,
        other => panic!("expected a token refusal, got {other:?}"),
    };
    // The prune job runs through the validity window and the retention after it.
    let last_kept = NOW + 60 + TOKEN_RETENTION_SECS;
    for at in [NOW + 30, NOW + 61, last_kept] {
        s.prune_single_use(at).await.unwrap();
        assert_eq!(
            refusal(s.redeem_token("edge-1", "used", at, &ev()).await),
            TokenRefusal::AlreadyUsed,
            "at {at}"
        );
        if at >= NOW + 60 {
            assert_eq!(
                refusal(s.redeem_token("edge-1", "late", at, &ev()).await),
                TokenRefusal::Expired
            );
        }
    }
    assert_eq!(s.prune_single_use(last_kept + 1).await.unwrap(), 2);
    for hash in ["used", "late"] {
        assert_eq!(
            refusal(s.redeem_token("edge-1", hash, last_kept + 1, &ev()).await),
            TokenRefusal::Unknown
        );
    }
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
    // One page's worth, bounded as `list_appliances` pages are: after "B-1" through
    // "b-2"; from the start through "a.1"; past the last one.
    assert_eq!(
        s.current_certificates_between(Some("B-1"), "b-2")
            .await
            .unwrap(),
        vec![a1.clone(), b2_2.clone()]
    );
    assert_eq!(
        s.current_certificates_between(None, "a.1").await.unwrap(),
        vec![b1_2.clone(), a1.clone()]
    );
    assert_eq!(
        s.current_certificates_between(Some("b-2"), "zzz")
            .await
            .unwrap(),
        vec![]
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

fn receipt(kind: ReceiptKind, subject: &str, key: &str, expires_at: i64) -> Receipt {
    Receipt {
        kind,
        subject: subject.into(),
        csr_key_sha256: key.into(),
        chain_pem: format!("chain for {key}"),
        expires_at,
    }
}

async fn token_redemption_and_certificate_commit_together(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    s.create_token("edge-1", "hash-1", NOW + 3600, NOW, &ev())
        .await
        .unwrap();
    // The read-only check redeems nothing.
    s.check_token("edge-1", "hash-1", NOW).await.unwrap();
    s.check_token("edge-1", "hash-1", NOW).await.unwrap();
    assert!(matches!(
        s.check_token("edge-2", "hash-1", NOW).await,
        Err(StoreError::Token(TokenRefusal::WrongAppliance))
    ));
    let c1 = cert("edge-1", 1);
    let r1 = receipt(ReceiptKind::Enroll, "hash-1", "key-a", NOW + 300);
    let (redeemed, enrolled) = (ev(), ev());
    let issue = Issue {
        cert: &c1,
        overlap_secs: 0,
        audit: &enrolled,
        token: Some(("hash-1", &redeemed)),
        receipt: Some(&r1),
    };
    let entries = s.audit_entries(0, 0).await.unwrap().len();
    assert_eq!(
        s.record_issued(&issue, NOW).await.unwrap(),
        vec![delta(1, &c1, true)]
    );
    assert_eq!(
        s.audit_entries(0, 0).await.unwrap().len(),
        entries + 2,
        "the redemption's entry and the enrollment's, in one transaction"
    );
    assert!(matches!(
        s.check_token("edge-1", "hash-1", NOW + 1).await,
        Err(StoreError::Token(TokenRefusal::AlreadyUsed))
    ));
    // A second issuance on the used token changes nothing: no certificate, no entry.
    let c2 = cert("edge-1", 2);
    let r2 = receipt(ReceiptKind::Enroll, "hash-1", "key-b", NOW + 300);
    let issue = Issue {
        cert: &c2,
        receipt: Some(&r2),
        ..issue
    };
    assert!(matches!(
        s.record_issued(&issue, NOW + 1).await,
        Err(StoreError::Token(TokenRefusal::AlreadyUsed))
    ));
    assert_eq!(s.audit_entries(0, 0).await.unwrap().len(), entries + 2);
    assert_eq!(s.certificates("edge-1").await.unwrap().len(), 1);
    assert_eq!(s.allowlist_version().await.unwrap(), 1);
}

async fn a_receipt_answers_only_the_same_key_while_current(db: &TestDb) {
    let s = &db.store;
    register(s, "edge-1").await;
    let c1 = cert("edge-1", 1);
    let r1 = receipt(ReceiptKind::Renew, "presented", "key-a", NOW + 300);
    let audit = ev();
    let issue = Issue {
        cert: &c1,
        overlap_secs: DAY,
        audit: &audit,
        token: None,
        receipt: Some(&r1),
    };
    s.record_issued(&issue, NOW).await.unwrap();
    let (found, c) = s
        .find_receipt(ReceiptKind::Renew, "presented", "key-a", NOW + 1)
        .await
        .unwrap()
        .expect("the same request and key");
    assert_eq!(found, r1);
    assert_eq!(c.serial, c1.serial);
    // Another key, another kind, another subject, or too late: nothing.
    for (kind, subject, key, at) in [
        (ReceiptKind::Renew, "presented", "key-b", NOW + 1),
        (ReceiptKind::Enroll, "presented", "key-a", NOW + 1),
        (ReceiptKind::Renew, "other", "key-a", NOW + 1),
        (ReceiptKind::Renew, "presented", "key-a", NOW + 300),
    ] {
        assert!(s
            .find_receipt(kind, subject, key, at)
            .await
            .unwrap()
            .is_none());
    }
    // A concurrent retry of the same request and key that recorded second is refused
    // whole (its certificate never recorded).
    let c2 = cert("edge-1", 2);
    let issue2 = Issue { cert: &c2, ..issue };
    assert!(matches!(
        s.record_issued(&issue2, NOW + 2).await,
        Err(StoreError::Replay(_))
    ));
    assert_eq!(s.certificates("edge-1").await.unwrap().len(), 1);
    // Revoked since: the receipt no longer answers.
    s.set_status("edge-1", ApplianceStatus::Revoked, NOW + 3, &ev())
        .await
        .unwrap();
    assert!(s
        .find_receipt(ReceiptKind::Renew, "presented", "key-a", NOW + 4)
        .await
        .unwrap()
        .is_none());
    // Pruned once expired.
    assert!(s.prune_single_use(NOW + 301).await.unwrap() >= 1);
}
