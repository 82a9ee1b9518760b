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
