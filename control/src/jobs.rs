//! Periodic work that runs once per period however many replicas share the database:
//! the overlap sweep, audit checkpoints and archiving, the registry, single-use and
//! allowlist-history pruning, and the outcome of commands whose replica was lost
//! (`abandon_commands`).
//!
//! Each job has a lease row (`control_jobs`). Every replica runs one task per job that
//! asks the store to claim the row ([`Store::claim_job`]): one `UPDATE … WHERE name = $1
//! AND next_run_at <= now … RETURNING epoch` on the database's clock, which moves
//! `next_run_at` one period on. One replica wins each period and runs the job; the others
//! sleep until the row is next due. No lock outlives the statement (no session advisory
//! lock: a pooler, a retired connection or a dead backend cannot leave two leaders or
//! none), and a replica that cannot write simply stops winning.
//!
//! Every job is idempotent and cumulative — the sweep removes whatever overlap ended by
//! now, a checkpoint covers the head whoever signs it (and one per `seq` at most), the
//! pruning deletes whatever is old enough — so a claimant that dies mid-run loses at most
//! that period's run, and the next claimant catches up. The same table serves SQLite's
//! single process, so there is one code path and `control_jobs` shows who ran what.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tether_audit::checkpoint::CheckpointSigner;
use tokio_util::sync::CancellationToken;

use crate::store::{JobClaim, Store};

/// Removes previous certificates whose renewal overlap ended (`[enroll] overlap_sweep`).
pub const OVERLAP_SWEEP: &str = "overlap_sweep";
/// Signs a checkpoint of the audit log's head (`[audit] checkpoint_every`).
pub const AUDIT_CHECKPOINT: &str = "audit_checkpoint";
/// Forgets replicas silent for [`REPLICA_FORGET_AFTER_SECS`].
pub const REPLICA_PRUNE: &str = "replica_prune";
/// Deletes expired nonces, used proof ids, issue receipts, console links and sessions,
/// and tokens and invites past `store::TOKEN_RETENTION_SECS` (`Store::prune_single_use`).
pub const NONCE_PRUNE: &str = "nonce_prune";
/// Archives the oldest audit entries (`[audit] archive_dir`, `archive_keep`,
/// `archive_every`).
pub const AUDIT_ARCHIVE: &str = "audit_archive";
/// Keeps the last `[trust] allowlist_history` allowlist versions' changes and digests
/// (`Store::prune_allowlist_history`).
pub const ALLOWLIST_PRUNE: &str = "allowlist_prune";
/// Gives commands whose replica is lost their outcome, `replica_lost`
/// (`[replica] abandon_commands_every`, `[replica] lost_after`).
pub const ABANDON_COMMANDS: &str = "abandon_commands";

/// How often [`REPLICA_PRUNE`] runs.
pub const REPLICA_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// A replica whose heartbeat is older than this (seconds, the database's clock) leaves
/// the registry.
pub const REPLICA_FORGET_AFTER_SECS: i64 = 600;
/// How often [`NONCE_PRUNE`] runs.
pub const NONCE_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often [`ALLOWLIST_PRUNE`] runs.
pub const ALLOWLIST_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// After a failed claim (the database unreachable or read-only), ask again after this
/// long, or after the job's period when that is shorter.
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// The shortest wait between two claims of one job by one replica.
const MIN_WAIT: Duration = Duration::from_millis(5);

/// The periods of the configurable jobs, and what the allowlist pruning keeps.
#[derive(Clone, Copy, Debug)]
pub struct JobPeriods {
    /// [`OVERLAP_SWEEP`]'s.
    pub overlap_sweep: Duration,
    /// [`AUDIT_CHECKPOINT`]'s.
    pub audit_checkpoint: Duration,
    /// [`ABANDON_COMMANDS`]'s.
    pub abandon_commands: Duration,
    /// A replica silent this long is lost ([`ABANDON_COMMANDS`]).
    pub lost_after: Duration,
    /// Allowlist versions [`ALLOWLIST_PRUNE`] keeps.
    pub allowlist_history: u64,
}

/// Automatic archiving ([`AUDIT_ARCHIVE`]), when `[audit] archive_dir` is set.
#[derive(Clone, Debug)]
pub struct ArchivePlan {
    /// Where segments go.
    pub dir: std::path::PathBuf,
    /// Entries kept live.
    pub keep: u64,
    /// How often it runs.
    pub every: Duration,
    /// Checks the segments' checkpoints (control's root and trust domain).
    pub verifier: tether_audit::checkpoint::CheckpointVerifier,
}

/// Start every periodic job for replica `by` until `shutdown`.
pub fn spawn_all(
    store: Arc<dyn Store>,
    by: &str,
    signer: Arc<CheckpointSigner>,
    periods: JobPeriods,
    archive: Option<ArchivePlan>,
    shutdown: &CancellationToken,
) {
    let job = |name, every| Lease {
        store: store.clone(),
        name,
        every,
        by: by.to_owned(),
        shutdown: shutdown.clone(),
    };
    let s = store.clone();
    tokio::spawn(
        job(OVERLAP_SWEEP, periods.overlap_sweep).run_forever(move || {
            let s = s.clone();
            async move { crate::domain::renew::sweep_overlaps(s.as_ref(), crate::now_unix()).await }
        }),
    );
    let (s, archive_signer) = (store.clone(), signer.clone());
    tokio::spawn(
        job(AUDIT_CHECKPOINT, periods.audit_checkpoint).run_forever(move || {
            let (s, signer) = (s.clone(), signer.clone());
            async move {
                crate::domain::audit::checkpoint_now(s.as_ref(), &signer, crate::now_unix()).await
            }
        }),
    );
    if let Some(plan) = archive {
        let (s, signer) = (store.clone(), archive_signer);
        tokio::spawn(job(AUDIT_ARCHIVE, plan.every).run_forever(move || {
            let (s, signer, plan) = (s.clone(), signer.clone(), plan.clone());
            async move {
                let now = crate::now_unix();
                match crate::domain::audit::archive_due(
                    s.as_ref(),
                    &signer,
                    plan.verifier,
                    &plan.dir,
                    plan.keep,
                    now,
                )
                .await
                {
                    Ok(Some(a)) => tracing::info!(first = a.first, last = a.last, dir = %plan.dir.display(), "audit entries archived"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot archive the audit log; will retry"),
                }
            }
        }));
    }
    let s = store.clone();
    tokio::spawn(
        job(REPLICA_PRUNE, REPLICA_PRUNE_EVERY).run_forever(move || {
            let s = s.clone();
            async move {
                match s.prune_replicas(REPLICA_FORGET_AFTER_SECS).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(replicas = n, "silent replicas left the registry"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the replica registry"),
                }
            }
        }),
    );
    let (s, me) = (store.clone(), by.to_owned());
    let lost_after = i64::try_from(periods.lost_after.as_secs()).unwrap_or(i64::MAX);
    tokio::spawn(
        job(ABANDON_COMMANDS, periods.abandon_commands).run_forever(move || {
            let (s, me) = (s.clone(), me.clone());
            async move {
                let now = crate::now_unix();
                match crate::domain::exec::abandon_lost(s.as_ref(), Some(lost_after), &me, now)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(commands = n, "commands of lost replicas abandoned"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot abandon commands of lost replicas")
                    }
                }
            }
        }),
    );
    let (s, keep) = (store.clone(), periods.allowlist_history);
    tokio::spawn(
        job(ALLOWLIST_PRUNE, ALLOWLIST_PRUNE_EVERY).run_forever(move || {
            let s = s.clone();
            async move {
                match s.prune_allowlist_history(keep).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, keep, "old allowlist history pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the allowlist history"),
                }
            }
        }),
    );
    let s = store.clone();
    tokio::spawn(job(NONCE_PRUNE, NONCE_PRUNE_EVERY).run_forever(move || {
        let s = s.clone();
        async move {
            if let Err(e) = s.prune_single_use(crate::now_unix()).await {
                tracing::warn!(error = %e, "cannot prune expired nonces and proof ids");
            }
        }
    }));
}

/// One job's claim loop on one replica.
struct Lease {
    store: Arc<dyn Store>,
    name: &'static str,
    every: Duration,
    by: String,
    shutdown: CancellationToken,
}

impl Lease {
    /// Claim the job whenever it is due and run `work` when the claim is ours.
    async fn run_forever<F, Fut>(self, mut work: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let every_ms = i64::try_from(self.every.as_millis()).unwrap_or(i64::MAX);
        loop {
            let wait = match self.store.claim_job(self.name, every_ms, &self.by).await {
                Ok(JobClaim::Claimed { epoch }) => {
                    tracing::debug!(job = self.name, epoch, "periodic job claimed");
                    work().await;
                    self.every
                }
                Ok(JobClaim::NotDue { due_in_ms }) => {
                    Duration::from_millis(u64::try_from(due_in_ms).unwrap_or(0))
                        .clamp(MIN_WAIT, self.every.max(MIN_WAIT))
                }
                Err(e) => {
                    tracing::warn!(job = self.name, error = %e, "cannot claim a periodic job; will retry");
                    RETRY_AFTER_ERROR.min(self.every)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}
