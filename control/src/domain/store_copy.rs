//! Moving from one machine to many: copy a SQLite store into a new PostgreSQL database
//! (`tether-control store copy --from sqlite:DIR --to postgres://…`), then prove the copy
//! is the same history.
//!
//! The store copies the tables and compares them row for row before committing
//! ([`crate::store::sql::copy`]); this module then checks what the fleet relies on, on
//! the committed copy:
//!
//! - the audit log: exported and verified exactly as `tether audit verify` does (the
//!   hash chain from genesis and every checkpoint's signature against the root), and the
//!   export identical to the source's, byte for byte;
//! - the allowlist: the snapshot (version and pairs) identical to the source's;
//! - the digest chain: recomputed from the copied deltas, version by version, and equal
//!   to the stored digests, so brokers that followed the source resume on a replica of
//!   the copy without a snapshot.

use rustls::pki_types::CertificateDer;
use tether_audit::checkpoint::CheckpointVerifier;
use tether_audit::export::{verify_export, ExportSummary, ExportVerifier};

use crate::domain::audit::write_export;
use crate::store::sql::copy::{copy_tables, CopyError, CopyReport};
use crate::store::sql::{version_digest, SqlStore};
use crate::store::{AllowlistDelta, Store};

/// What a verified copy holds.
#[derive(Clone, Debug)]
pub struct CopySummary {
    /// Rows per table.
    pub report: CopyReport,
    /// The audit log as verified.
    pub audit: ExportSummary,
    /// The allowlist version.
    pub allowlist_version: i64,
    /// Its digest (lowercase hex), `None` at version 0.
    pub allowlist_digest: Option<String>,
}

/// Copy `source` (SQLite) into `target` (PostgreSQL, empty) and verify the copy against
/// the fleet's `roots` and `trust_domain` (see the module docs).
pub async fn copy_and_verify(
    source: &SqlStore,
    target: &SqlStore,
    roots: &[CertificateDer<'_>],
    trust_domain: &str,
) -> Result<CopySummary, CopyError> {
    let verifier = |what| {
        CheckpointVerifier::new(roots, trust_domain)
            .map(ExportVerifier::live)
            .map_err(|e| CopyError::Verify(format!("{what}: {e}")))
    };
    // Refuse a source that does not verify before writing anything.
    let source_export = export(source).await?;
    verify_export(
        source_export.as_slice(),
        verifier("the source's checkpoint keys")?,
    )
    .map_err(|e| CopyError::Verify(format!("the source's audit log: {e}")))?;

    let report = copy_tables(source, target).await?;

    let copied_export = export(target).await?;
    let audit = verify_export(copied_export.as_slice(), verifier("the checkpoint keys")?)
        .map_err(|e| CopyError::Verify(format!("the copied audit log: {e}")))?;
    if copied_export != source_export {
        return Err(CopyError::Verify(
            "the copied audit log differs from the source's".into(),
        ));
    }
    let snapshot = target.allowlist_snapshot().await?;
    if snapshot != source.allowlist_snapshot().await? {
        return Err(CopyError::Verify(
            "the copied allowlist differs from the source's".into(),
        ));
    }
    let version = snapshot.0;
    let allowlist_digest = check_digest_chain(target, version).await?;
    Ok(CopySummary {
        report,
        audit,
        allowlist_version: version,
        allowlist_digest,
    })
}

async fn export(store: &SqlStore) -> Result<Vec<u8>, CopyError> {
    let mut out = Vec::new();
    write_export(store, None, &mut out)
        .await
        .map_err(|e| CopyError::Verify(format!("exporting the audit log: {e}")))?;
    Ok(out)
}

/// Recompute every version's digest from the deltas and compare with the stored chain;
/// returns the last digest. A pruned history (`Store::prune_allowlist_history`) is
/// checked from its anchor: the oldest version kept, which keeps its digest and not its
/// changes.
async fn check_digest_chain(store: &SqlStore, upto: i64) -> Result<Option<String>, CopyError> {
    let stored = store.allowlist_digests(0, upto).await?;
    let first_change = store
        .allowlist_changes_since(0, 1)
        .await?
        .first()
        .map_or(upto + 1, |d| d.version);
    let anchor = stored.first().filter(|(v, _)| *v < first_change);
    let (mut prev, mut since) = match anchor {
        Some((v, d)) if *v > 0 => (
            tether_proto::cluster::parse_digest(d).ok_or_else(|| {
                CopyError::Verify(format!("allowlist version {v}: the digest is not hex"))
            })?,
            *v,
        ),
        _ => (tether_proto::cluster::ALLOWLIST_GENESIS_DIGEST, 0),
    };
    let held = if since > 0 { upto - since + 1 } else { upto };
    if stored.len() as i64 != held {
        return Err(CopyError::Verify(format!(
            "{} allowlist digests for {held} versions",
            stored.len()
        )));
    }
    let mut stored = stored.into_iter();
    if since > 0 {
        stored.next();
    }
    loop {
        let page = store.allowlist_changes_since(since, 0).await?;
        let Some(last) = page.last() else { break };
        since = last.version;
        let mut start = 0;
        while start < page.len() {
            let v = page[start].version;
            let end = page[start..]
                .iter()
                .position(|d| d.version != v)
                .map_or(page.len(), |n| start + n);
            let deltas: &[AllowlistDelta] = &page[start..end];
            let digest = version_digest(&prev, v, deltas);
            match stored.next() {
                Some((sv, sd)) if sv == v && sd == tether_proto::cluster::to_hex(&digest) => {}
                Some((sv, _)) => {
                    return Err(CopyError::Verify(format!(
                        "allowlist version {sv}: the stored digest is not the one its changes give"
                    )))
                }
                None => {
                    return Err(CopyError::Verify(format!(
                        "allowlist version {v} has no digest"
                    )))
                }
            }
            prev = digest;
            start = end;
        }
    }
    if stored.next().is_some() {
        return Err(CopyError::Verify(
            "allowlist digests for versions without changes".into(),
        ));
    }
    Ok((upto > 0).then(|| tether_proto::cluster::to_hex(&prev)))
}
