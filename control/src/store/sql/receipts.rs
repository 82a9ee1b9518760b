//! Idempotent enrollment and renewal: the read-only token check, the one transaction that
//! redeems a token (if any), records the certificate and keeps its receipt
//! (`issue_receipts`), and the look-up of a receipt for a retry.

use sqlx::{AnyPool, Row};

use super::audit::{append_audit_in, check_event};
use super::rows::{cert_from_row, CERT_COLUMNS};
use super::trust::commit_trust_change;
use super::{db, insert_certificate, SqlStore};
use crate::store::{
    AllowlistDelta, CertRecord, Issue, Receipt, ReceiptKind, StoreError, TokenRefusal, UnixSeconds,
};

fn kind_str(kind: ReceiptKind) -> &'static str {
    match kind {
        ReceiptKind::Enroll => "enroll",
        ReceiptKind::Renew => "renew",
    }
}

/// Why token `token_hash` cannot be redeemed by `appliance_id` (called once it could not
/// be: a row that is neither used nor someone else's has expired).
pub(super) async fn token_refusal(
    pool: &AnyPool,
    appliance_id: &str,
    token_hash: &str,
) -> Result<TokenRefusal, StoreError> {
    let row = sqlx::query(
        "SELECT appliance_id, expires_at, used_at FROM enrollment_tokens WHERE token_hash = $1",
    )
    .bind(token_hash)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    Ok(match row {
        None => TokenRefusal::Unknown,
        Some(row) => {
            let owner: String = row.try_get("appliance_id").map_err(db)?;
            let used_at: Option<i64> = row.try_get("used_at").map_err(db)?;
            if owner != appliance_id {
                TokenRefusal::WrongAppliance
            } else if used_at.is_some() {
                TokenRefusal::AlreadyUsed
            } else {
                TokenRefusal::Expired
            }
        }
    })
}

pub(super) async fn check_token(
    pool: &AnyPool,
    appliance_id: &str,
    token_hash: &str,
    now: UnixSeconds,
) -> Result<(), StoreError> {
    let usable: Option<i64> = sqlx::query_scalar(
        "SELECT expires_at FROM enrollment_tokens \
         WHERE token_hash = $1 AND appliance_id = $2 AND used_at IS NULL AND expires_at > $3",
    )
    .bind(token_hash)
    .bind(appliance_id)
    .bind(now)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    match usable {
        Some(_) => Ok(()),
        None => Err(StoreError::Token(
            token_refusal(pool, appliance_id, token_hash).await?,
        )),
    }
}

pub(super) async fn find_receipt(
    pool: &AnyPool,
    kind: ReceiptKind,
    subject: &str,
    csr_key_sha256: &str,
    now: UnixSeconds,
) -> Result<Option<(Receipt, CertRecord)>, StoreError> {
    let columns = CERT_COLUMNS
        .split(", ")
        .map(|c| format!("c.{c} AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    // Only a certificate still current and in the allowlist is handed out again: one
    // revoked, disabled or replaced since is not.
    let Some(row) = sqlx::query(&format!(
        "SELECT {columns}, r.chain_pem AS chain_pem, r.expires_at AS receipt_expires_at \
         FROM issue_receipts r JOIN certificates c ON c.serial = r.serial \
         WHERE r.kind = $1 AND r.subject = $2 AND r.csr_key_sha256 = $3 AND r.expires_at > $4 \
         AND c.state = 'current' AND c.allowed = 1"
    ))
    .bind(kind_str(kind))
    .bind(subject)
    .bind(csr_key_sha256)
    .bind(now)
    .fetch_optional(pool)
    .await
    .map_err(db)?
    else {
        return Ok(None);
    };
    let receipt = Receipt {
        kind,
        subject: subject.to_owned(),
        csr_key_sha256: csr_key_sha256.to_owned(),
        chain_pem: row.try_get("chain_pem").map_err(db)?,
        expires_at: row.try_get("receipt_expires_at").map_err(db)?,
    };
    Ok(Some((receipt, cert_from_row(&row)?)))
}

pub(super) async fn record_issued(
    store: &SqlStore,
    issue: &Issue<'_>,
    now: UnixSeconds,
) -> Result<Vec<AllowlistDelta>, StoreError> {
    check_event(issue.audit)?;
    if let Some((_, redeemed)) = issue.token {
        check_event(redeemed)?;
    }
    let cert = issue.cert;
    let mut tx = store.begin_trust_change().await?;
    if let Some((token_hash, _)) = issue.token {
        let used = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = $1 \
             WHERE token_hash = $2 AND appliance_id = $3 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(token_hash)
        .bind(cert.appliance_id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if used == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Token(
                token_refusal(&store.pool, &cert.appliance_id, token_hash).await?,
            ));
        }
    }
    let deltas = insert_certificate(&mut tx, cert, now, issue.overlap_secs).await?;
    if let Some(r) = issue.receipt {
        // A stale receipt for the same request and key gives way; a live one means a
        // concurrent retry already recorded its certificate: this one is refused whole.
        sqlx::query(
            "DELETE FROM issue_receipts \
             WHERE kind = $1 AND subject = $2 AND csr_key_sha256 = $3 AND expires_at <= $4",
        )
        .bind(kind_str(r.kind))
        .bind(r.subject.as_str())
        .bind(r.csr_key_sha256.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let kept = sqlx::query(
            "INSERT INTO issue_receipts \
             (kind, subject, csr_key_sha256, serial, chain_pem, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(kind_str(r.kind))
        .bind(r.subject.as_str())
        .bind(r.csr_key_sha256.as_str())
        .bind(cert.serial.as_str())
        .bind(r.chain_pem.as_str())
        .bind(r.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if kept == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Replay("certificate request".into()));
        }
    }
    // The audit head last (the lock order of `sql.rs`): the redemption's entry, then the
    // certificate's.
    if let Some((_, redeemed)) = issue.token {
        append_audit_in(&mut tx, redeemed, now).await?;
    }
    commit_trust_change(&store.changed, tx, deltas, Some((issue.audit, now))).await
}

pub(super) async fn prune(pool: &AnyPool, now: UnixSeconds) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM issue_receipts WHERE expires_at < $1")
            .bind(now)
            .execute(pool)
            .await
            .map_err(db)?
            .rows_affected(),
    )
}
