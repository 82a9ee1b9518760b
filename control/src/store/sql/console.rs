//! The console's sign-in in SQL: login links, sessions, and the audit search its pages
//! use (see `domain::console`). Every read of a link or a session joins `operators`, so
//! the role and status are the ones in force now.

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use tether_audit::{AuditEntry, AuditEvent};

use super::audit::{append_audit_in, audit_from_row, check_event, AUDIT_COLUMNS};
use super::db;
use super::rows::{parse_operator_status, parse_role};
use crate::store::{
    AuditSearch, ConsoleLink, ConsoleSessionRecord, NewConsoleLink, NewConsoleSession, StoreError,
    UnixSeconds,
};

/// Longest page of [`search`].
pub(super) const MAX_SEARCH: u32 = 1_000;

pub(super) async fn create_link(
    pool: &AnyPool,
    link: &NewConsoleLink,
    now: UnixSeconds,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    check_event(audit)?;
    let mut tx = pool.begin().await.map_err(db)?;
    sqlx::query(
        "INSERT INTO console_login_links (id, secret_sha256, operator, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(link.id.as_str())
    .bind(link.secret_sha256.as_str())
    .bind(link.operator.as_str())
    .bind(now)
    .bind(link.expires_at)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    append_audit_in(&mut tx, audit, now).await?;
    tx.commit().await.map_err(db)
}

pub(super) async fn find_link(pool: &AnyPool, id: &str) -> Result<Option<ConsoleLink>, StoreError> {
    let row = sqlx::query(
        "SELECT l.secret_sha256 AS secret_sha256, l.operator AS operator, \
         l.expires_at AS expires_at, l.used AS used, o.role AS role, o.status AS status \
         FROM console_login_links l JOIN operators o ON o.name = l.operator WHERE l.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    let Some(row) = row else { return Ok(None) };
    let used: i64 = row.try_get("used").map_err(db)?;
    Ok(Some(ConsoleLink {
        secret_sha256: row.try_get("secret_sha256").map_err(db)?,
        operator: row.try_get("operator").map_err(db)?,
        role: parse_role(&row)?,
        status: parse_operator_status(&row)?,
        expires_at: row.try_get("expires_at").map_err(db)?,
        used: used != 0,
    }))
}

pub(super) async fn redeem_link(
    pool: &AnyPool,
    id: &str,
    session: &NewConsoleSession,
    now: UnixSeconds,
    audit: &AuditEvent,
) -> Result<bool, StoreError> {
    check_event(audit)?;
    let mut tx = pool.begin().await.map_err(db)?;
    let spent = sqlx::query(
        "UPDATE console_login_links SET used = 1 \
         WHERE id = $1 AND used = 0 AND expires_at > $2 AND operator = $3 \
         AND EXISTS (SELECT 1 FROM operators o WHERE o.name = $3 AND o.status = 'active')",
    )
    .bind(id)
    .bind(now)
    .bind(session.operator.as_str())
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if spent == 0 {
        tx.rollback().await.map_err(db)?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO console_sessions (token_sha256, operator, created_at, last_seen_at, \
         idle_expires_at, abs_expires_at, user_agent, ip) \
         VALUES ($1, $2, $3, $3, $4, $5, $6, $7)",
    )
    .bind(session.token_sha256.as_str())
    .bind(session.operator.as_str())
    .bind(now)
    .bind(session.idle_expires_at)
    .bind(session.abs_expires_at)
    .bind(session.user_agent.as_str())
    .bind(session.ip.as_str())
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    append_audit_in(&mut tx, audit, now).await?;
    tx.commit().await.map_err(db)?;
    Ok(true)
}

const SESSION_COLUMNS: &str = "s.token_sha256 AS token_sha256, s.operator AS operator, \
     s.created_at AS created_at, s.last_seen_at AS last_seen_at, \
     s.idle_expires_at AS idle_expires_at, s.abs_expires_at AS abs_expires_at, \
     s.user_agent AS user_agent, s.ip AS ip, o.role AS role, o.status AS status";

fn session_from_row(row: &AnyRow) -> Result<ConsoleSessionRecord, StoreError> {
    Ok(ConsoleSessionRecord {
        token_sha256: row.try_get("token_sha256").map_err(db)?,
        operator: row.try_get("operator").map_err(db)?,
        role: parse_role(row)?,
        status: parse_operator_status(row)?,
        created_at: row.try_get("created_at").map_err(db)?,
        last_seen_at: row.try_get("last_seen_at").map_err(db)?,
        idle_expires_at: row.try_get("idle_expires_at").map_err(db)?,
        abs_expires_at: row.try_get("abs_expires_at").map_err(db)?,
        user_agent: row.try_get("user_agent").map_err(db)?,
        ip: row.try_get("ip").map_err(db)?,
    })
}

pub(super) async fn session(
    pool: &AnyPool,
    token_sha256: &str,
) -> Result<Option<ConsoleSessionRecord>, StoreError> {
    sqlx::query(&format!(
        "SELECT {SESSION_COLUMNS} FROM console_sessions s \
         JOIN operators o ON o.name = s.operator WHERE s.token_sha256 = $1"
    ))
    .bind(token_sha256)
    .fetch_optional(pool)
    .await
    .map_err(db)?
    .as_ref()
    .map(session_from_row)
    .transpose()
}

pub(super) async fn sessions_of(
    pool: &AnyPool,
    operator: &str,
) -> Result<Vec<ConsoleSessionRecord>, StoreError> {
    sqlx::query(&format!(
        "SELECT {SESSION_COLUMNS} FROM console_sessions s \
         JOIN operators o ON o.name = s.operator WHERE s.operator = $1 \
         ORDER BY s.created_at DESC, s.token_sha256"
    ))
    .bind(operator)
    .fetch_all(pool)
    .await
    .map_err(db)?
    .iter()
    .map(session_from_row)
    .collect()
}

pub(super) async fn touch(
    pool: &AnyPool,
    token_sha256: &str,
    now: UnixSeconds,
    idle_expires_at: UnixSeconds,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE console_sessions SET last_seen_at = $2, idle_expires_at = $3 \
         WHERE token_sha256 = $1",
    )
    .bind(token_sha256)
    .bind(now)
    .bind(idle_expires_at)
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

pub(super) async fn end(
    pool: &AnyPool,
    token_sha256: &str,
    now: UnixSeconds,
    audit: Option<&AuditEvent>,
) -> Result<bool, StoreError> {
    if let Some(a) = audit {
        check_event(a)?;
    }
    let mut tx = pool.begin().await.map_err(db)?;
    let gone = sqlx::query("DELETE FROM console_sessions WHERE token_sha256 = $1")
        .bind(token_sha256)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
    if gone == 0 {
        tx.rollback().await.map_err(db)?;
        return Ok(false);
    }
    if let Some(a) = audit {
        append_audit_in(&mut tx, a, now).await?;
    }
    tx.commit().await.map_err(db)?;
    Ok(true)
}

/// Expired links and sessions.
pub(super) async fn prune(pool: &AnyPool, now: UnixSeconds) -> Result<u64, StoreError> {
    super::jobs::delete_expired(
        pool,
        &[
            "DELETE FROM console_login_links WHERE expires_at < $1",
            "DELETE FROM console_sessions WHERE idle_expires_at < $1 OR abs_expires_at < $1",
        ],
        now,
    )
    .await
}

pub(super) async fn search(pool: &AnyPool, q: &AuditSearch) -> Result<Vec<AuditEntry>, StoreError> {
    // Placeholders are numbered as the filters present are bound, in this order.
    let mut clauses = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    if q.target.is_some() {
        clauses.push(format!("target = ${}", next()));
    }
    if q.actor.is_some() {
        clauses.push(format!("actor = ${}", next()));
    }
    if q.action_prefix.is_some() {
        clauses.push(format!(
            "substr(action, 1, CAST(${} AS INTEGER)) = ${}",
            next(),
            next()
        ));
    }
    if q.before.is_some() {
        clauses.push(format!("seq < ${}", next()));
    }
    if q.success_only {
        clauses.push("outcome = 'success'".to_owned());
    }
    let limit = next();
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let sql =
        format!("SELECT {AUDIT_COLUMNS} FROM audit_log {filter} ORDER BY seq DESC LIMIT ${limit}");
    let mut query = sqlx::query(&sql);
    if let Some(t) = &q.target {
        query = query.bind(t.as_str());
    }
    if let Some(a) = &q.actor {
        query = query.bind(a.as_str());
    }
    if let Some(p) = &q.action_prefix {
        query = query.bind(p.chars().count() as i64).bind(p.as_str());
    }
    if let Some(b) = q.before {
        query = query.bind(b);
    }
    let limit = q.limit.clamp(1, MAX_SEARCH);
    query
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(db)?
        .iter()
        .map(audit_from_row)
        .collect()
}
