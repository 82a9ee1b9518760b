//! Trust-changing transactions: putting certificates into the allowlist or taking them
//! out, and the commit that gives all of one transaction's changes one new allowlist
//! version (see the parent module's docs, "Transactions and versions").

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use tether_audit::AuditEvent;

use super::audit::append_audit_in;
use super::db;
use super::rows::parse_status;
use crate::store::{AllowlistDelta, ApplianceStatus, StoreError, UnixSeconds};

/// A certificate row whose allowlist membership is about to change.
pub(super) struct Allowable {
    pub(super) seq: i64,
    pub(super) appliance_id: String,
    pub(super) fingerprint: String,
}

pub(super) fn allowable_from_row(row: &AnyRow) -> Result<Allowable, StoreError> {
    Ok(Allowable {
        seq: row.try_get("seq").map_err(db)?,
        appliance_id: row.try_get("appliance_id").map_err(db)?,
        fingerprint: row.try_get("fingerprint").map_err(db)?,
    })
}

/// A change made inside a trust-changing transaction, before it has a version:
/// [`commit_trust_change`] gives every change of the transaction the same one.
pub(super) fn pending(appliance_id: &str, fingerprint: &str, added: bool) -> AllowlistDelta {
    AllowlistDelta {
        version: 0,
        appliance_id: appliance_id.to_owned(),
        fingerprint: fingerprint.to_owned(),
        added,
    }
}

/// Rows per `INSERT` into `allowlist_changes` (5 parameters each; far below the parameter
/// limits of SQLite and PostgreSQL).
pub(super) const CHANGES_PER_INSERT: usize = 200;

/// End a transaction begun by [`super::SqlStore::begin_trust_change`]: if it changed at least
/// one fingerprint, bump the allowlist version once, give every change that version, log
/// them (in the order given); if it changed none, leave the version alone. Then append
/// `audit` (if any, at its time) with `allowlist_version` and `allowlist_changes` added
/// to its details, and commit. Returns the changes, versioned.
pub(super) async fn commit_trust_change(
    changed: &tokio::sync::watch::Sender<i64>,
    mut tx: sqlx::Transaction<'static, sqlx::Any>,
    mut deltas: Vec<AllowlistDelta>,
    audit: Option<(&AuditEvent, UnixSeconds)>,
) -> Result<Vec<AllowlistDelta>, StoreError> {
    let mut version = None;
    if !deltas.is_empty() {
        let new_version: i64 = sqlx::query_scalar(
            "UPDATE allowlist_version SET version = version + 1 WHERE id = 1 RETURNING version",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        version = Some(new_version);
        for d in &mut deltas {
            d.version = new_version;
        }
        let prev = chain_head(&mut tx, new_version - 1).await?;
        let digest = version_digest(&prev, new_version, &deltas);
        insert_digest(&mut tx, new_version, &digest).await?;
        // Other replicas hear of it at commit (PostgreSQL).
        super::notify::ring(&mut tx, new_version).await?;
        for (chunk_index, chunk) in deltas.chunks(CHANGES_PER_INSERT).enumerate() {
            let mut sql = String::from(
                "INSERT INTO allowlist_changes \
                 (version, ordinal, appliance_id, fingerprint, added) VALUES ",
            );
            for i in 0..chunk.len() {
                let p = 5 * i;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5
                ));
            }
            let mut query = sqlx::query(&sql);
            for (i, d) in chunk.iter().enumerate() {
                let ordinal = (chunk_index * CHANGES_PER_INSERT + i) as i64;
                query = query
                    .bind(new_version)
                    .bind(ordinal)
                    .bind(d.appliance_id.as_str())
                    .bind(d.fingerprint.as_str())
                    .bind(i16::from(d.added));
            }
            query.execute(&mut *tx).await.map_err(db)?;
        }
    }
    if let Some((event, at)) = audit {
        let version = match version {
            Some(v) => v,
            None => sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?,
        };
        let event = event
            .clone()
            .with("allowlist_version", version)
            .with("allowlist_changes", deltas.len());
        append_audit_in(&mut tx, &event, at).await?;
    }
    tx.commit().await.map_err(db)?;
    if let Some(v) = version {
        // Versions only grow; a slower commit never moves the watch back.
        changed.send_if_modified(|cur| {
            let newer = v > *cur;
            if newer {
                *cur = v;
            }
            newer
        });
    }
    Ok(deltas)
}

/// Put certificates into the allowlist (or take them out); each real change is pushed to
/// `deltas`, unversioned (see [`commit_trust_change`]).
pub(super) async fn set_allowed(
    conn: &mut AnyConnection,
    certs: &[Allowable],
    allowed: bool,
    deltas: &mut Vec<AllowlistDelta>,
) -> Result<(), StoreError> {
    let sql = if allowed {
        "UPDATE certificates SET allowed = 1 WHERE seq = $1 AND allowed = 0"
    } else {
        "UPDATE certificates SET allowed = 0 WHERE seq = $1 AND allowed = 1"
    };
    for cert in certs {
        let changed = sqlx::query(sql)
            .bind(cert.seq)
            .execute(&mut *conn)
            .await
            .map_err(db)?
            .rows_affected();
        if changed == 1 {
            deltas.push(pending(&cert.appliance_id, &cert.fingerprint, allowed));
        }
    }
    Ok(())
}

/// The appliance's certificates now in the allowlist, oldest first.
pub(super) async fn allowed_certs(
    conn: &mut AnyConnection,
    appliance_id: &str,
) -> Result<Vec<Allowable>, StoreError> {
    sqlx::query(
        "SELECT seq, appliance_id, fingerprint FROM certificates \
         WHERE appliance_id = $1 AND allowed = 1 ORDER BY seq",
    )
    .bind(appliance_id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?
    .iter()
    .map(allowable_from_row)
    .collect()
}

pub(super) async fn appliance_status(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<ApplianceStatus, StoreError> {
    let status = sqlx::query_scalar::<_, String>("SELECT status FROM appliances WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    match status {
        Some(s) => parse_status(&s),
        None => Err(StoreError::NotFound(format!("appliance {id}"))),
    }
}

/// The digest of `version` given the previous one's: [`tether_proto::cluster::allowlist_digest`]
/// over the version's changes as a delta frame carries them (additions, then removals,
/// each in recorded order).
pub fn version_digest(prev: &[u8; 32], version: i64, deltas: &[AllowlistDelta]) -> [u8; 32] {
    let add: Vec<(&str, &str)> = deltas
        .iter()
        .filter(|d| d.added)
        .map(|d| (d.appliance_id.as_str(), d.fingerprint.as_str()))
        .collect();
    let remove: Vec<&str> = deltas
        .iter()
        .filter(|d| !d.added)
        .map(|d| d.fingerprint.as_str())
        .collect();
    tether_proto::cluster::allowlist_digest(prev, version.max(0) as u64, &add, &remove)
}

async fn insert_digest(
    conn: &mut AnyConnection,
    version: i64,
    digest: &[u8; 32],
) -> Result<(), StoreError> {
    let now = if conn.backend_name() == "PostgreSQL" {
        "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)"
    } else {
        "CAST(strftime('%s', 'now') AS INTEGER)"
    };
    sqlx::query(&format!(
        "INSERT INTO allowlist_versions (version, digest, committed_at) VALUES ($1, $2, {now})"
    ))
    .bind(version)
    .bind(tether_proto::cluster::to_hex(digest))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// The digest of `version` (the genesis digest for 0), first writing the digests of any
/// versions up to it that have none: those committed before the chain existed, or by an
/// older replica during a rolling upgrade. Call it with the version row held.
pub(super) async fn chain_head(
    conn: &mut AnyConnection,
    version: i64,
) -> Result<[u8; 32], StoreError> {
    use tether_proto::cluster::{parse_digest, ALLOWLIST_GENESIS_DIGEST};
    if version <= 0 {
        return Ok(ALLOWLIST_GENESIS_DIGEST);
    }
    let known: Option<(i64, String)> = sqlx::query(
        "SELECT version, digest FROM allowlist_versions WHERE version <= $1 \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(version)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?
    .map(|row| {
        Ok::<_, StoreError>((
            row.try_get("version").map_err(db)?,
            row.try_get("digest").map_err(db)?,
        ))
    })
    .transpose()?;
    let (mut at, mut digest) = match known {
        Some((v, d)) => (
            v,
            parse_digest(&d).ok_or_else(|| {
                StoreError::Database(format!("allowlist version {v}: bad digest"))
            })?,
        ),
        None => (0, ALLOWLIST_GENESIS_DIGEST),
    };
    if at == version {
        return Ok(digest);
    }
    let changes = sqlx::query(
        "SELECT version, appliance_id, fingerprint, added FROM allowlist_changes \
         WHERE version > $1 AND version <= $2 ORDER BY version, ordinal",
    )
    .bind(at)
    .bind(version)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?
    .iter()
    .map(super::rows::delta_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let mut i = 0;
    while i < changes.len() {
        let v = changes[i].version;
        let end = changes[i..]
            .iter()
            .position(|d| d.version != v)
            .map_or(changes.len(), |n| i + n);
        if v != at + 1 {
            return Err(StoreError::Database(format!(
                "allowlist history has a gap: version {} has no changes",
                at + 1
            )));
        }
        digest = version_digest(&digest, v, &changes[i..end]);
        insert_digest(conn, v, &digest).await?;
        at = v;
        i = end;
    }
    if at != version {
        return Err(StoreError::Database(format!(
            "allowlist history ends at version {at}, not {version}"
        )));
    }
    Ok(digest)
}

/// Versions whose history one transaction of [`prune_history_step`] removes at most, so
/// the first prune of a long history holds the version row (and SQLite's write lock) for
/// a short while each time.
pub(super) const PRUNE_VERSIONS_PER_TX: i64 = 10_000;

/// One step of pruning the allowlist history to its last `keep` versions, in `tx` (begun
/// by [`super::SqlStore::begin_trust_change`], so no trust change commits meanwhile):
/// with `anchor = head - keep`, the changes of versions up to `anchor` and the digests of
/// versions before it go, at most [`PRUNE_VERSIONS_PER_TX`] versions at a time. The
/// anchor keeps its digest, so a broker at `anchor` still resumes by deltas and
/// [`chain_head`] and the digest check of `store copy` start from it. Commits; returns
/// the rows deleted and whether the history now starts at the anchor.
pub(super) async fn prune_history_step(
    mut tx: sqlx::Transaction<'static, sqlx::Any>,
    keep: u64,
) -> Result<(u64, bool), StoreError> {
    let head: i64 = sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let anchor = head.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
    let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(version) FROM allowlist_versions")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let Some(oldest) = oldest.filter(|&o| o < anchor) else {
        return Ok((0, true));
    };
    let upto = anchor.min(oldest.saturating_add(PRUNE_VERSIONS_PER_TX));
    let mut pruned = 0;
    for sql in [
        "DELETE FROM allowlist_changes WHERE version <= $1",
        "DELETE FROM allowlist_versions WHERE version < $1",
    ] {
        pruned += sqlx::query(sql)
            .bind(upto)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
    }
    tx.commit().await.map_err(db)?;
    Ok((pruned, upto == anchor))
}
