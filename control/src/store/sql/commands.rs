//! Commands in flight (`commands_in_flight`, see `migrations/*/0009_commands_in_flight.sql`):
//! the row goes in with the command's request entry and out with its outcome entry, so a
//! command whose replica died is found and given exactly one outcome.

use sqlx::{AnyPool, Row};
use tether_audit::{Actor, ActorKind, AuditEvent};

use super::audit::{append_audit_in, check_event};
use super::replicas::db_now;
use super::{db, Backend};
use crate::store::{CommandInFlight, StoreError, UnixSeconds};

pub(super) async fn started(
    pool: &AnyPool,
    c: &CommandInFlight,
    request: &AuditEvent,
    at: UnixSeconds,
) -> Result<(), StoreError> {
    check_event(request)?;
    let mut tx = pool.begin().await.map_err(db)?;
    sqlx::query(
        "INSERT INTO commands_in_flight \
         (id, replica, appliance, started_at, actor_kind, actor, broker, command_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(c.id.as_str())
    .bind(c.replica.as_str())
    .bind(c.appliance.as_str())
    .bind(c.started_at)
    .bind(c.actor.kind.as_str())
    .bind(c.actor.name.as_str())
    .bind(c.broker.as_str())
    .bind(c.command_id)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    // The audit head last, as every transaction takes it (no lock cycle).
    append_audit_in(&mut tx, request, at).await?;
    tx.commit().await.map_err(db)
}

pub(super) async fn ended(
    pool: &AnyPool,
    id: &str,
    outcome: &AuditEvent,
    at: UnixSeconds,
) -> Result<bool, StoreError> {
    check_event(outcome)?;
    let mut tx = pool.begin().await.map_err(db)?;
    // Whoever deletes the row writes the outcome; a racer waits on the row (PostgreSQL)
    // or the write lock (SQLite) and then deletes nothing.
    let deleted = sqlx::query("DELETE FROM commands_in_flight WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
    if deleted == 0 {
        tx.rollback().await.map_err(db)?;
        return Ok(false);
    }
    append_audit_in(&mut tx, outcome, at).await?;
    tx.commit().await.map_err(db)?;
    Ok(true)
}

pub(super) async fn lost(
    pool: &AnyPool,
    backend: Backend,
    silent_secs: Option<i64>,
) -> Result<Vec<CommandInFlight>, StoreError> {
    const COLUMNS: &str = "c.id, c.replica, c.appliance, c.started_at, c.actor_kind, c.actor, \
                           c.broker, c.command_id";
    let rows = match silent_secs {
        None => sqlx::query(&format!(
            "SELECT {COLUMNS} FROM commands_in_flight c ORDER BY c.started_at, c.id"
        ))
        .fetch_all(pool)
        .await
        .map_err(db)?,
        Some(silent) => {
            let now = db_now(backend);
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM commands_in_flight c \
                 WHERE NOT EXISTS (SELECT 1 FROM control_replicas r \
                                   WHERE r.id = c.replica AND r.heartbeat_at >= {now} - $1) \
                 ORDER BY c.started_at, c.id"
            ))
            .bind(silent)
            .fetch_all(pool)
            .await
            .map_err(db)?
        }
    };
    rows.iter()
        .map(|row| {
            let kind: String = row.try_get("actor_kind").map_err(db)?;
            let kind = ActorKind::parse(&kind).ok_or_else(|| {
                StoreError::Database(format!("bad actor kind {kind:?} in commands_in_flight"))
            })?;
            Ok(CommandInFlight {
                id: row.try_get("id").map_err(db)?,
                replica: row.try_get("replica").map_err(db)?,
                appliance: row.try_get("appliance").map_err(db)?,
                started_at: row.try_get("started_at").map_err(db)?,
                actor: Actor::new(kind, row.try_get::<String, _>("actor").map_err(db)?),
                broker: row.try_get("broker").map_err(db)?,
                command_id: row.try_get("command_id").map_err(db)?,
            })
        })
        .collect()
}
