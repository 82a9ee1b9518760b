//! Nothing grows without bound: a simulated week of enrollments at 10 per second, on both
//! backends (see `common`), with the prune job, signed checkpoints and hourly archiving
//! run as `serve`'s schedule would, leaves every table that traffic fills bounded by its
//! replay or retention window, not by the week; the archive segments and the live log
//! still verify end to end; and a used nonce or proof id is still refused after pruning.
//!
//! What is compressed, exactly:
//!
//! - **Time** is a simulated clock passed to the store (`now` arguments, checkpoint and
//!   archive times), advanced [`STEP`] (15 minutes) at a time over 7 days: 672 steps.
//!   No real time passes.
//! - **Volume**: each step performs one enrollment's store operations (a nonce created
//!   and consumed, a platform proof id recorded, an enrollment token created and
//!   redeemed, the enrollment's certificate recorded with its audit entry: one
//!   allowlist version adding it and removing the one before), standing for the 9,000 enrollments of
//!   those 15 minutes at 10 per second. Every row therefore stands for 9,000 rows of the
//!   real week, and every bound below is a number of steps' worth of rows: the claim
//!   tested is that the count is capped by (window / step) × (rows per step), which is
//!   what caps the real table at (window × 10/s) rows, independent of the duration.
//! - **Schedule**: the prune jobs (`nonce_prune` and `allowlist_prune`, every 60 s in
//!   `serve`, the latter keeping [`KEEP_VERSIONS`]) and the checkpoint job (every 60 s)
//!   run once per step, archiving (an operator's cron, hourly) every 4 steps,
//!   keeping [`KEEP`] entries live. Running them less often than `serve` does only
//!   loosens the bounds by one step.
//!
//! The allowlist history kept still chains: its oldest digest, then each kept version's
//! changes, give the head's digest, and a broker at the oldest kept version resumes from
//! it by deltas. Not exercised: certificates and appliances (records, never pruned).

mod common;

use std::io::BufReader;

use sqlx::AnyPool;
use tether_audit::checkpoint::CheckpointVerifier;
use tether_audit::export::verify_segments;
use tether_audit::{action, system, Actor, AuditEvent};
use tether_control::domain::audit::{archive, checkpoint_signer, write_checkpoint, write_export};
use tether_control::domain::ca::{Ca, CaConfig};
use tether_control::domain::enroll::{DEFAULT_NONCE_TTL, DEFAULT_TOKEN_TTL};
use tether_control::store::sql::version_digest;
use tether_control::store::{CertRecord, Store, StoreError, TOKEN_RETENTION_SECS};

use common::*;

on_both_backends!(a_week_of_enrollments_keeps_every_table_bounded);

/// One step of the simulated clock, seconds.
const STEP: i64 = 900;
/// Simulated days.
const DAYS: i64 = 7;
/// A platform proof's validity (a Kubernetes token's `exp`), seconds.
const PROOF_TTL: i64 = 3600;
/// Archiving runs every this many steps (hourly).
const ARCHIVE_EVERY: i64 = 4;
/// Entries archiving keeps live.
const KEEP: i64 = 50;
/// Audit entries one step writes (token created, token redeemed, enrollment).
const ENTRIES_PER_STEP: i64 = 3;
/// Allowlist versions `allowlist_prune` keeps (`[trust] allowlist_history`).
const KEEP_VERSIONS: u64 = 20;
/// Allowlist changes one step's version holds (the new certificate in, the last out).
const CHANGES_PER_VERSION: i64 = 2;

async fn count(pool: &AnyPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn a_week_of_enrollments_keeps_every_table_bounded(db: &TestDb) {
    let s = &db.store;
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&db.url).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let ca = Ca::init(
        &home.path().join("ca-home"),
        &CaConfig {
            trust_domain: "example.com".into(),
            ..Default::default()
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let signer = checkpoint_signer(&ca).unwrap();
    let root = rustls::pki_types::CertificateDer::from(ca.root_der().to_vec());
    let verifier = CheckpointVerifier::new(&[root], "example.com").unwrap();
    register(s, "edge-1").await;

    let nonce_ttl = DEFAULT_NONCE_TTL.as_secs() as i64;
    let token_ttl = DEFAULT_TOKEN_TTL.as_secs() as i64;
    // Rows alive at once: those whose window (plus one step of prune lag) covers now.
    let bound = |window: i64| window / STEP + 2;
    let bounds = [
        ("nonces", bound(nonce_ttl)),
        ("used_proofs", bound(PROOF_TTL)),
        ("enrollment_tokens", bound(token_ttl + TOKEN_RETENTION_SECS)),
        (
            "audit_log",
            KEEP + ARCHIVE_EVERY * ENTRIES_PER_STEP + ARCHIVE_EVERY,
        ),
        // The kept versions and the anchor before them (a digest, no changes).
        ("allowlist_versions", KEEP_VERSIONS as i64 + 1),
        (
            "allowlist_changes",
            KEEP_VERSIONS as i64 * CHANGES_PER_VERSION,
        ),
        (
            "audit_checkpoints",
            (KEEP + ARCHIVE_EVERY * ENTRIES_PER_STEP) / ENTRIES_PER_STEP + ARCHIVE_EVERY + 2,
        ),
    ];

    // Inside the control leaf's validity (the signer refuses times outside it).
    let start = tether_control::now_unix() + 60;
    let steps = DAYS * 86_400 / STEP;
    let mut segments = Vec::new();
    let mut peak = std::collections::BTreeMap::new();
    for i in 0..steps {
        let now = start + i * STEP;
        let (nonce, proof, token) = (format!("n-{i}"), format!("jti-{i}"), format!("t-{i}"));
        s.create_nonce(&nonce, now + nonce_ttl).await.unwrap();
        s.consume_nonce(&nonce, now).await.unwrap();
        s.record_proof("k8s", &proof, now + PROOF_TTL)
            .await
            .unwrap();
        s.create_token("edge-1", &token, now + token_ttl, now, &ev())
            .await
            .unwrap();
        s.redeem_token("edge-1", &token, now, &ev()).await.unwrap();
        let enrolled = AuditEvent::success(
            Actor::appliance("edge-1"),
            action::APPLIANCE_ENROLL,
            "edge-1",
        );
        let issued = CertRecord {
            not_before: now,
            not_after: now + 30 * 86_400,
            ..cert("edge-1", i as u32 + 1)
        };
        // No overlap: the previous certificate leaves in the same version.
        s.record_certificate(&issued, now, 0, &enrolled)
            .await
            .unwrap();

        // The schedule: prune, checkpoint, and every hour archive.
        s.prune_single_use(now).await.unwrap();
        s.prune_allowlist_history(KEEP_VERSIONS).await.unwrap();
        write_checkpoint(s, &signer, now).await.unwrap();
        // A replay inside its window is still refused after the prune.
        assert!(s.consume_nonce(&nonce, now).await.is_err(), "nonce {i}");
        assert!(matches!(
            s.record_proof("k8s", &proof, now + PROOF_TTL).await,
            Err(StoreError::Replay(_))
        ));
        if (i + 1) % ARCHIVE_EVERY != 0 {
            continue;
        }
        // Counted at the top of each hour, before archiving: when the live log is longest.
        for (table, limit) in bounds {
            let n = count(&pool, table).await;
            assert!(n <= limit, "{table}: {n} rows at step {i}, bound {limit}");
            let p = peak.entry(table).or_insert(0);
            *p = (*p).max(n);
        }
        {
            let head = s.last_audit_checkpoint().await.unwrap().unwrap().seq;
            let archived = s.audit_archive().await.unwrap().map_or(0, |a| a.seq);
            let before = head - KEEP + 1;
            let out = home.path().join(format!("seg-{i:05}.jsonl"));
            if before - 1 > archived {
                archive(
                    s,
                    &signer,
                    verifier.clone(),
                    None,
                    Actor::system(system::CONTROL),
                    before,
                    &out,
                    now,
                )
                .await
                .unwrap();
                segments.push(out);
            }
        }
    }
    // The bounds held for the whole week, and they are far below what the week wrote:
    // pruning and archiving did the work, not a short test.
    assert!(bounds.iter().all(|(_, b)| *b * 3 < steps), "{bounds:?}");
    let archives = segments.len() as i64;
    // Every hour once the log is longer than KEEP.
    let first_hours = KEEP / (ARCHIVE_EVERY * ENTRIES_PER_STEP) + 1;
    assert!(
        archives >= steps / ARCHIVE_EVERY - first_hours,
        "{archives} archives"
    );
    assert_eq!(count(&pool, "audit_archives").await, archives);

    // Every entry of the week is still verifiable: the segments, then the live log.
    let mut live = Vec::new();
    write_export(s, None, &mut live).await.unwrap();
    let mut files: Vec<(String, BufReader<std::fs::File>)> = segments
        .iter()
        .map(|p| {
            (
                p.display().to_string(),
                BufReader::new(std::fs::File::open(p).unwrap()),
            )
        })
        .collect();
    let live_path = home.path().join("live.jsonl");
    std::fs::write(&live_path, &live).unwrap();
    files.push((
        "live".into(),
        BufReader::new(std::fs::File::open(&live_path).unwrap()),
    ));
    let summary = verify_segments(files, &verifier).expect("the week verifies end to end");
    let head = summary.head.unwrap().0;
    // register + 3 per step + one `audit.archive` entry per archive.
    assert_eq!(head, 1 + steps * ENTRIES_PER_STEP + archives);
    assert_eq!(summary.entries as i64, head);
    the_kept_allowlist_history_chains(s, steps).await;
    eprintln!("peak rows over the simulated week: {peak:?} (steps: {steps})");
    pool.close().await;
}

/// The kept history is the last [`KEEP_VERSIONS`] versions after an anchor, and it
/// chains: the anchor's digest and the kept changes give every kept digest, up to the
/// head; the snapshot is the week's last certificate alone.
async fn the_kept_allowlist_history_chains(s: &tether_control::store::sql::SqlStore, steps: i64) {
    let head = s.allowlist_version().await.unwrap();
    assert_eq!(head, steps, "one version per enrollment");
    let anchor = head - KEEP_VERSIONS as i64;
    let digests = s.allowlist_digests(0, head).await.unwrap();
    let versions: Vec<i64> = digests.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (anchor..=head).collect::<Vec<_>>());
    assert!(s.allowlist_digests(0, anchor - 1).await.unwrap().is_empty());
    // What a broker at the anchor is sent, and one further behind gets nothing to resume
    // from (`cluster::link` sends it a snapshot).
    let kept = s.allowlist_changes_since(anchor, 0).await.unwrap();
    assert_eq!(s.allowlist_changes_since(0, 0).await.unwrap(), kept);
    assert_eq!(
        kept.len() as i64,
        KEEP_VERSIONS as i64 * CHANGES_PER_VERSION
    );
    let mut prev = tether_proto::cluster::parse_digest(&digests[0].1).unwrap();
    for (version, stored) in &digests[1..] {
        let of: Vec<_> = kept
            .iter()
            .filter(|d| d.version == *version)
            .cloned()
            .collect();
        prev = version_digest(&prev, *version, &of);
        assert_eq!(
            &tether_proto::cluster::to_hex(&prev),
            stored,
            "version {version}"
        );
    }
    let (_, pairs) = s.allowlist_snapshot().await.unwrap();
    let last = cert("edge-1", steps as u32);
    assert_eq!(pairs, vec![("edge-1".to_owned(), last.fingerprint)]);
}
