//! Replica identity and registry: `control_meta` (what the database belongs to) and
//! `control_replicas` (who serves it, with heartbeats on the database's clock).

use sqlx::{AnyPool, Row};

use super::{db, Backend};
use crate::store::{ControlMeta, ReplicaInfo, ReplicaRecord, StoreError, UnixSeconds};

/// "Now" in Unix seconds on the database's clock, as an SQL expression.
pub(super) fn db_now(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)",
        _ => "CAST(strftime('%s', 'now') AS INTEGER)",
    }
}

pub(super) async fn control_meta(pool: &AnyPool) -> Result<Option<ControlMeta>, StoreError> {
    let row = sqlx::query("SELECT trust_domain, root_fingerprint FROM control_meta WHERE id = 1")
        .fetch_optional(pool)
        .await
        .map_err(db)?;
    row.map(|row| {
        Ok(ControlMeta {
            trust_domain: row.try_get("trust_domain").map_err(db)?,
            root_fingerprint: row.try_get("root_fingerprint").map_err(db)?,
        })
    })
    .transpose()
}

pub(super) async fn record_control_meta(
    pool: &AnyPool,
    meta: &ControlMeta,
    now: UnixSeconds,
) -> Result<ControlMeta, StoreError> {
    sqlx::query(
        "INSERT INTO control_meta (id, trust_domain, root_fingerprint, created_at) \
         VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
    )
    .bind(meta.trust_domain.as_str())
    .bind(meta.root_fingerprint.as_str())
    .bind(now)
    .execute(pool)
    .await
    .map_err(db)?;
    control_meta(pool)
        .await?
        .ok_or_else(|| StoreError::Database("control_meta missing after insert".into()))
}

pub(super) async fn heartbeat(
    pool: &AnyPool,
    backend: Backend,
    info: &ReplicaInfo,
    starting: bool,
) -> Result<(), StoreError> {
    let now = db_now(backend);
    let started = if starting {
        "started_at = excluded.started_at, "
    } else {
        ""
    };
    sqlx::query(&format!(
        "INSERT INTO control_replicas (id, advertise, api_addr, version, started_at, heartbeat_at) \
         VALUES ($1, $2, $3, $4, {now}, {now}) \
         ON CONFLICT (id) DO UPDATE SET advertise = excluded.advertise, \
         api_addr = excluded.api_addr, version = excluded.version, {started}\
         heartbeat_at = excluded.heartbeat_at"
    ))
    .bind(info.id.as_str())
    .bind(info.advertise.as_str())
    .bind(info.api_addr.as_str())
    .bind(info.version.as_str())
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

pub(super) async fn live(
    pool: &AnyPool,
    backend: Backend,
    within: i64,
) -> Result<Vec<ReplicaRecord>, StoreError> {
    let now = db_now(backend);
    sqlx::query(&format!(
        "SELECT id, advertise, api_addr, version, started_at, heartbeat_at \
         FROM control_replicas WHERE heartbeat_at >= {now} - $1 ORDER BY id"
    ))
    .bind(within)
    .fetch_all(pool)
    .await
    .map_err(db)?
    .iter()
    .map(|row| {
        Ok(ReplicaRecord {
            info: ReplicaInfo {
                id: row.try_get("id").map_err(db)?,
                advertise: row.try_get("advertise").map_err(db)?,
                api_addr: row.try_get("api_addr").map_err(db)?,
                version: row.try_get("version").map_err(db)?,
            },
            started_at: row.try_get("started_at").map_err(db)?,
            heartbeat_at: row.try_get("heartbeat_at").map_err(db)?,
        })
    })
    .collect()
}
