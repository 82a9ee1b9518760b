//! Archiving the audit log, on both backends (see `common`): the store never deletes an
//! entry no signed checkpoint covers, nor one not archived (the database refuses too);
//! `archive` signs the closing checkpoint when none is stored and the live log still
//! verifies and checkpoints after it; a tampered range is refused with nothing deleted.

mod common;

use sqlx::Connection;
use tether_audit::checkpoint::{CheckpointSigner, CheckpointVerifier};
use tether_audit::export::{verify_export, ExportLine, ExportVerifier, VerifyError};
use tether_audit::{system, Actor, AuditEvent};
use tether_control::domain::audit::{
    archive, archive_due, checkpoint_signer, write_checkpoint, write_export, ArchiveError,
};
use tether_control::domain::ca::{Ca, CaConfig};
use tether_control::store::sql::Backend;
use tether_control::store::{AuditArchive, Store, StoreError};

use common::*;

on_both_backends!(
    entries_no_checkpoint_covers_are_never_deleted,
    archive_signs_its_closing_checkpoint_and_the_live_log_goes_on,
    a_tampered_range_is_not_archived,
    automatic_archiving_keeps_the_newest_entries_live,
);

struct Keys {
    _home: tempfile::TempDir,
    signer: CheckpointSigner,
    verifier: CheckpointVerifier,
}

fn keys() -> Keys {
    let home = tempfile::tempdir().unwrap();
    let ca = Ca::init(
        &home.path().join("ca"),
        &CaConfig {
            trust_domain: "example.com".into(),
            ..Default::default()
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let root = rustls::pki_types::CertificateDer::from(ca.root_der().to_vec());
    Keys {
        signer: checkpoint_signer(&ca).unwrap(),
        verifier: CheckpointVerifier::new(&[root], "example.com").unwrap(),
        _home: home,
    }
}

async fn append(s: &dyn Store, n: i64, now: i64) {
    for _ in 0..n {
        s.append_audit(&ev(), now).await.unwrap();
    }
}

async fn seqs(s: &dyn Store) -> Vec<i64> {
    s.audit_entries(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

fn admin() -> Actor {
    Actor::system(system::LOCAL_ADMIN)
}

async fn entries_no_checkpoint_covers_are_never_deleted(db: &TestDb) {
    let s = &db.store;
    let now = tether_control::now_unix();
    append(s, 5, now).await;
    let e3 = s.audit_entries(2, 1).await.unwrap().remove(0);
    let record = |seq: i64, hash: &str, first: i64| AuditArchive {
        seq,
        hash: hash.to_owned(),
        first_seq: first,
        archived_at: now,
        file: "seg.jsonl".into(),
    };
    let event = AuditEvent::success(admin(), "audit.archive", "seg.jsonl");
    // No checkpoint of entry 3: refused, nothing deleted.
    assert!(matches!(
        s.archive_audit(&record(3, &e3.hash, 1), &event).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(seqs(s).await, vec![1, 2, 3, 4, 5]);
    // The database itself refuses deleting unarchived entries.
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let err = sqlx::query("DELETE FROM audit_log WHERE seq = 1")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    // With a checkpoint of entry 3 it goes through; a second archive must start at 4.
    let keys = keys();
    let cp = keys.signer.sign(3, &e3.hash, now).unwrap();
    s.add_audit_checkpoint(&cp).await.unwrap();
    assert_eq!(
        s.archive_audit(&record(3, &e3.hash, 1), &event)
            .await
            .unwrap(),
        3
    );
    assert_eq!(seqs(s).await, vec![4, 5, 6]);
    assert!(matches!(
        s.archive_audit(&record(5, &e3.hash, 2), &event).await,
        Err(StoreError::Conflict(_))
    ));
    // Entries after the anchor stay protected, and the anchor's checkpoint too.
    for sql in [
        "DELETE FROM audit_log WHERE seq = 4",
        "DELETE FROM audit_checkpoints WHERE seq = 3",
        "DELETE FROM audit_archives",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    conn.close().await.unwrap();
}

async fn archive_signs_its_closing_checkpoint_and_the_live_log_goes_on(db: &TestDb) {
    let s = &db.store;
    let keys = keys();
    let now = tether_control::now_unix();
    append(s, 5, now).await;
    write_checkpoint(s, &keys.signer, now).await.unwrap(); // at 5
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seg1.jsonl");
    // Entry 3 has no checkpoint: one is signed, and the segment ends at it.
    let done = archive(
        s,
        &keys.signer,
        keys.verifier.clone(),
        None,
        admin(),
        4,
        &out,
        now,
    )
    .await
    .unwrap();
    assert!(done.signed);
    assert_eq!((done.first, done.last, done.deleted), (1, 3, 3));
    let text = std::fs::read_to_string(&out).unwrap();
    let last = ExportLine::parse(text.lines().last().unwrap().as_bytes()).unwrap();
    assert!(matches!(last, ExportLine::Checkpoint(c) if c.seq == 3));
    assert!(!dir.path().join("seg1.jsonl.partial").exists());
    // The live log: the anchor's checkpoint, entries 4..; it checkpoints on.
    append(s, 2, now).await;
    let cp = write_checkpoint(s, &keys.signer, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.seq, 8); // 5 + the archive's entry + 2
    let mut live = Vec::new();
    write_export(s, None, &mut live).await.unwrap();
    let summary = verify_export(live.as_slice(), ExportVerifier::live(keys.verifier.clone()))
        .expect("the live log verifies from its anchor");
    assert_eq!(summary.head.unwrap().0, 8);
    // As a whole log it is refused, saying why.
    assert_eq!(
        verify_export(live.as_slice(), ExportVerifier::new(keys.verifier.clone())).unwrap_err(),
        VerifyError::StartsAfterArchive { first: 4 }
    );
    // Archiving again from inside the first archive is refused.
    let again = archive(
        s,
        &keys.signer,
        keys.verifier.clone(),
        None,
        admin(),
        3,
        &dir.path().join("seg0.jsonl"),
        now,
    )
    .await;
    assert!(matches!(
        again,
        Err(ArchiveError::AlreadyArchived { archived: 3 })
    ));
}

async fn a_tampered_range_is_not_archived(db: &TestDb) {
    let s = &db.store;
    let keys = keys();
    let now = tether_control::now_unix();
    append(s, 3, now).await;
    write_checkpoint(s, &keys.signer, now).await.unwrap(); // at 3
    append(s, 3, now).await;
    // Someone with write access edits entry 2, triggers dropped first.
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let drop = match s.backend() {
        Backend::Sqlite => "DROP TRIGGER audit_log_no_update",
        _ => "DROP TRIGGER audit_log_no_change ON audit_log",
    };
    sqlx::query(drop).execute(&mut conn).await.unwrap();
    sqlx::query("UPDATE audit_log SET target = 'x' WHERE seq = 2")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seg.jsonl");
    let err = archive(s, &keys.signer, keys.verifier, None, admin(), 6, &out, now)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Tampered(e) if e.first_bad_seq() == Some(2)),
        "{err}"
    );
    assert!(!out.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    assert_eq!(seqs(s).await, vec![1, 2, 3, 4, 5, 6]);
    assert!(s.audit_archive().await.unwrap().is_none());
}

/// `[audit] archive_dir`'s run: everything but the newest `keep` checkpointed entries, in
/// files named by their range, each run continuing the last; segments + live verify.
async fn automatic_archiving_keeps_the_newest_entries_live(db: &TestDb) {
    let s = &db.store;
    let keys = keys();
    let now = tether_control::now_unix();
    let dir = tempfile::tempdir().unwrap();
    let run = || archive_due(s, &keys.signer, keys.verifier.clone(), dir.path(), 4, now);
    append(s, 3, now).await;
    assert!(run().await.unwrap().is_none(), "no checkpoint yet");
    write_checkpoint(s, &keys.signer, now).await.unwrap(); // at 3
    assert!(run().await.unwrap().is_none(), "fewer than 4 entries");
    append(s, 7, now).await;
    write_checkpoint(s, &keys.signer, now).await.unwrap(); // at 10
    let first = run().await.unwrap().unwrap();
    assert_eq!((first.first, first.last), (1, 6));
    append(s, 5, now).await; // 12..=16 after the archive's entry 11
    write_checkpoint(s, &keys.signer, now).await.unwrap(); // at 16
    let second = run().await.unwrap().unwrap();
    assert_eq!((second.first, second.last), (7, 12));
    assert!(run().await.unwrap().is_none(), "nothing new to archive");
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "audit-000000000001-000000000006.jsonl",
            "audit-000000000007-000000000012.jsonl"
        ]
    );
    let mut live = Vec::new();
    write_export(s, None, &mut live).await.unwrap();
    let mut segments: Vec<(String, Box<dyn std::io::BufRead>)> = files
        .iter()
        .map(|p| {
            let r: Box<dyn std::io::BufRead> =
                Box::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
            (p.display().to_string(), r)
        })
        .collect();
    segments.push(("live".into(), Box::new(std::io::Cursor::new(live))));
    let summary = tether_audit::export::verify_segments(segments, &keys.verifier).unwrap();
    assert_eq!(summary.head.unwrap().0, 17);
}
