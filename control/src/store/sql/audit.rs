//! The audit log in SQL: appending an entry inside the caller's transaction, and reading
//! entries and checkpoints back (see the parent module's docs, "The audit log").

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use tether_audit::checkpoint::Checkpoint;
use tether_audit::{Actor, ActorKind, AuditEntry, AuditEvent, Outcome};

use super::db;
use crate::store::{AuditArchive, StoreError, UnixSeconds};

/// Refuse an event the log would not take, before any work is done.
pub(super) fn check_event(event: &AuditEvent) -> Result<(), StoreError> {
    event
        .validate()
        .map(drop)
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Append `event` at `at` inside the caller's transaction (see the parent module's docs); returns
/// the entry.
pub(super) async fn append_audit_in(
    conn: &mut AnyConnection,
    event: &AuditEvent,
    at: UnixSeconds,
) -> Result<AuditEntry, StoreError> {
    let details = event
        .validate()
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    let head = sqlx::query("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let seq: i64 = head.try_get("seq").map_err(db)?;
    let prev_hash: String = head.try_get("hash").map_err(db)?;
    let hash = tether_audit::hash_parts(
        seq,
        at,
        &event.actor,
        &event.action,
        &event.target,
        event.outcome,
        &details,
        &prev_hash,
    );
    sqlx::query(
        "INSERT INTO audit_log \
         (seq, at, actor_kind, actor, action, target, outcome, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(seq)
    .bind(at)
    .bind(event.actor.kind.as_str())
    .bind(event.actor.name.as_str())
    .bind(event.action.as_str())
    .bind(event.target.as_str())
    .bind(event.outcome.as_str())
    .bind(details.as_str())
    .bind(prev_hash.as_str())
    .bind(hash.as_str())
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
        .bind(hash.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(AuditEntry {
        seq,
        at,
        actor: event.actor.clone(),
        action: event.action.clone(),
        target: event.target.clone(),
        outcome: event.outcome,
        details: event.details.clone(),
        prev_hash,
        hash,
    })
}

pub(super) const AUDIT_COLUMNS: &str =
    "seq, at, actor_kind, actor, action, target, outcome, details, prev_hash, hash";

pub(super) fn audit_from_row(row: &AnyRow) -> Result<AuditEntry, StoreError> {
    let kind: String = row.try_get("actor_kind").map_err(db)?;
    let kind = ActorKind::parse(&kind)
        .ok_or_else(|| StoreError::Database(format!("bad audit actor kind {kind:?}")))?;
    let outcome: String = row.try_get("outcome").map_err(db)?;
    let outcome = Outcome::parse(&outcome)
        .ok_or_else(|| StoreError::Database(format!("bad audit outcome {outcome:?}")))?;
    let details: String = row.try_get("details").map_err(db)?;
    let details = serde_json::from_str(&details)
        .map_err(|e| StoreError::Database(format!("bad audit details in the store: {e}")))?;
    Ok(AuditEntry {
        seq: row.try_get("seq").map_err(db)?,
        at: row.try_get("at").map_err(db)?,
        actor: Actor::new(kind, row.try_get::<String, _>("actor").map_err(db)?),
        action: row.try_get("action").map_err(db)?,
        target: row.try_get("target").map_err(db)?,
        outcome,
        details,
        prev_hash: row.try_get("prev_hash").map_err(db)?,
        hash: row.try_get("hash").map_err(db)?,
    })
}

pub(super) const CHECKPOINT_COLUMNS: &str = "seq, head_hash, at, signature, signer_chain_pem";

pub(super) fn checkpoint_from_row(row: &AnyRow) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        seq: row.try_get("seq").map_err(db)?,
        head_hash: row.try_get("head_hash").map_err(db)?,
        at: row.try_get("at").map_err(db)?,
        signature: row.try_get("signature").map_err(db)?,
        signer_chain_pem: row.try_get("signer_chain_pem").map_err(db)?,
    })
}

/// The archive with the highest seq (the live log's anchor).
pub(super) async fn last_archive(pool: &AnyPool) -> Result<Option<AuditArchive>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT seq, hash, first_seq, archived_at, file FROM audit_archives \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .map_err(db)?
    else {
        return Ok(None);
    };
    Ok(Some(AuditArchive {
        seq: row.try_get("seq").map_err(db)?,
        hash: row.try_get("hash").map_err(db)?,
        first_seq: row.try_get("first_seq").map_err(db)?,
        archived_at: row.try_get("archived_at").map_err(db)?,
        file: row.try_get("file").map_err(db)?,
    }))
}

/// `Store::archive_audit`: one transaction that takes the audit head first (so archives
/// run one at a time, and appends wait for this one; it takes no other lock that a
/// trust change holds before the head), checks the archive continues the last one and
/// ends at a checkpointed entry, records it and deletes what it covers.
pub(super) async fn archive(
    pool: &AnyPool,
    a: &AuditArchive,
    audit: &AuditEvent,
) -> Result<u64, StoreError> {
    check_event(audit)?;
    let mut tx = pool.begin().await.map_err(db)?;
    append_audit_in(&mut tx, audit, a.archived_at).await?;
    let anchor: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit_archives")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    if a.first_seq != anchor + 1 || a.seq < a.first_seq {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::Conflict(format!(
            "audit archive {}..={}: entries up to {anchor} are archived, the next archive starts at {}",
            a.first_seq,
            a.seq,
            anchor + 1
        )));
    }
    let entry: Option<String> = sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
        .bind(a.seq)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
    let checkpoint: Option<String> =
        sqlx::query_scalar("SELECT head_hash FROM audit_checkpoints WHERE seq = $1")
            .bind(a.seq)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    if entry.as_deref() != Some(a.hash.as_str()) || checkpoint.as_deref() != Some(a.hash.as_str()) {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::Invalid(format!(
            "audit entry {} is not in the log with a signed checkpoint of hash {}",
            a.seq, a.hash
        )));
    }
    sqlx::query(
        "INSERT INTO audit_archives (seq, hash, first_seq, archived_at, file) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(a.seq)
    .bind(a.hash.as_str())
    .bind(a.first_seq)
    .bind(a.archived_at)
    .bind(a.file.as_str())
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let gone = sqlx::query("DELETE FROM audit_log WHERE seq <= $1")
        .bind(a.seq)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
    sqlx::query("DELETE FROM audit_checkpoints WHERE seq < $1")
        .bind(a.seq)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(gone)
}
