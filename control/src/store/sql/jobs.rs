//! Periodic jobs' lease rows (`control_jobs`) and the pruning the jobs do, on the
//! database's clock (see `migrations/*/0007_control_jobs.sql`).

use sqlx::{AnyPool, Row};

use super::replicas::db_now;
use super::{db, Backend};
use crate::store::{JobClaim, JobRecord, StoreError, UnixSeconds, TOKEN_RETENTION_SECS};

/// "Now" in Unix milliseconds on the database's clock, as an SQL expression.
fn db_now_ms(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        // julianday('now') carries milliseconds; 2440587.5 is the Unix epoch's day.
        _ => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

pub(super) async fn claim(
    pool: &AnyPool,
    backend: Backend,
    name: &str,
    every_ms: i64,
    by: &str,
) -> Result<JobClaim, StoreError> {
    let now = db_now_ms(backend);
    // First run of this job on this database: due at once. A no-op afterwards.
    sqlx::query(
        "INSERT INTO control_jobs (name, next_run_at) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .execute(pool)
    .await
    .map_err(db)?;
    // Due, or scheduled further out than one period (the period was shortened since):
    // claim it. One statement, so exactly one replica wins each period.
    let epoch: Option<i64> = sqlx::query_scalar(&format!(
        "UPDATE control_jobs SET next_run_at = {now} + $2, epoch = epoch + 1, \
         last_run_by = $3, last_run_at = {now} \
         WHERE name = $1 AND (next_run_at <= {now} OR next_run_at > {now} + $2) \
         RETURNING epoch"
    ))
    .bind(name)
    .bind(every_ms)
    .bind(by)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    if let Some(epoch) = epoch {
        return Ok(JobClaim::Claimed { epoch });
    }
    let due_in_ms: i64 = sqlx::query_scalar(&format!(
        "SELECT next_run_at - {now} FROM control_jobs WHERE name = $1"
    ))
    .bind(name)
    .fetch_one(pool)
    .await
    .map_err(db)?;
    Ok(JobClaim::NotDue {
        due_in_ms: due_in_ms.max(0),
    })
}

pub(super) async fn list(pool: &AnyPool) -> Result<Vec<JobRecord>, StoreError> {
    sqlx::query(
        "SELECT name, next_run_at, epoch, last_run_by, last_run_at FROM control_jobs ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?
    .iter()
    .map(|row| {
        Ok(JobRecord {
            name: row.try_get("name").map_err(db)?,
            next_run_at_ms: row.try_get("next_run_at").map_err(db)?,
            epoch: row.try_get("epoch").map_err(db)?,
            last_run_by: row.try_get("last_run_by").map_err(db)?,
            last_run_at_ms: row.try_get("last_run_at").map_err(db)?,
        })
    })
    .collect()
}

pub(super) async fn prune_replicas(
    pool: &AnyPool,
    backend: Backend,
    silent_secs: i64,
) -> Result<u64, StoreError> {
    let now = db_now(backend);
    Ok(sqlx::query(&format!(
        "DELETE FROM control_replicas WHERE heartbeat_at < {now} - $1"
    ))
    .bind(silent_secs)
    .execute(pool)
    .await
    .map_err(db)?
    .rows_affected())
}

pub(super) async fn prune_single_use(pool: &AnyPool, now: UnixSeconds) -> Result<u64, StoreError> {
    let single_use = delete_expired(
        pool,
        &[
            "DELETE FROM nonces WHERE expires_at < $1",
            "DELETE FROM used_proofs WHERE expires_at < $1",
        ],
        now,
    )
    .await?;
    // Tokens and invites answer "expired" or "already used" for a while after they
    // expired (`TOKEN_RETENTION_SECS`); then "unknown".
    let tokens = delete_expired(
        pool,
        &[
            "DELETE FROM enrollment_tokens WHERE expires_at < $1",
            "DELETE FROM operator_invites WHERE expires_at < $1",
        ],
        now.saturating_sub(TOKEN_RETENTION_SECS),
    )
    .await?;
    Ok(single_use + tokens)
}

/// Run each `DELETE … < $1` of `statements` with `now`; the rows removed in all.
pub(super) async fn delete_expired(
    pool: &AnyPool,
    statements: &[&str],
    now: UnixSeconds,
) -> Result<u64, StoreError> {
    let mut pruned = 0;
    for sql in statements {
        pruned += sqlx::query(sql)
            .bind(now)
            .execute(pool)
            .await
            .map_err(db)?
            .rows_affected();
    }
    Ok(pruned)
}
