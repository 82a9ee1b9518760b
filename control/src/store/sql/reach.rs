//! Fail fast while PostgreSQL cannot be reached.
//!
//! A request that needs the database waits for a pooled connection up to
//! [`ACQUIRE_TIMEOUT`](super::ACQUIRE_TIMEOUT) (sqlx retries the connection meanwhile), so
//! while the server is down every request would hold its client for that long before its
//! 503, and they would pile up. One [`ReachProbe`] per serving replica asks the server,
//! on a connection of its own outside the pool, whether it answers: every
//! [`PROBE_EVERY`] while it does, every [`PROBE_FAST`] once it did not. When it has not
//! answered for [`UNREACHABLE_AFTER`] the store refuses every use of its pool at once
//! with [`StoreError::Unavailable`](crate::store::StoreError::Unavailable) (503
//! `database_unavailable` with `Retry-After`, and `/readyz` 503), until the probe's next
//! answer. The grace keeps a restart of a few seconds invisible: requests made meanwhile
//! wait for the server and go through, as they did before this probe existed.
//!
//! The probe owns its connection (not the pool's), so a pool that is only busy, every
//! connection in use, never looks like a server that is down. SQLite is a file of the
//! process: nothing here runs there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, Connection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How often the probe asks while the server answers.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often it asks once the server did not answer.
pub const PROBE_FAST: Duration = Duration::from_millis(250);
/// How long one question (a connect, or `SELECT 1` on the probe's connection) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server may not answer before requests are refused at once.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);

/// One replica's reachability probe (see the module doc). Build it with
/// [`SqlStore::reach_probe`](super::SqlStore::reach_probe).
pub struct ReachProbe {
    pub(super) url: String,
    pub(super) pool: AnyPool,
    /// The store's flag: set, every use of its pool is refused at once.
    pub(super) unreachable: Arc<AtomicBool>,
}

impl std::fmt::Debug for ReachProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No URL: it may carry a password.
        f.debug_struct("ReachProbe").finish_non_exhaustive()
    }
}

impl ReachProbe {
    /// Probe until `shutdown` or until the store closes; the gate opens when it ends.
    pub async fn run(self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let mut conn: Option<AnyConnection> = None;
        let mut silent_since: Option<Instant> = None;
        metrics.database_reachable.set(1);
        while !shutdown.is_cancelled() && !self.pool.is_closed() {
            let asked = Instant::now();
            let answered = tokio::time::timeout(PROBE_TIMEOUT, ask(&self.url, &mut conn)).await;
            match answered {
                Ok(Ok(())) => {
                    silent_since = None;
                    if self.unreachable.swap(false, Ordering::AcqRel) {
                        info!("the database answers again; serving requests");
                    }
                    metrics.database_reachable.set(1);
                }
                failed => {
                    // A connection that failed (or was cut by the timeout mid-way) is
                    // not asked again: the next question opens a new one.
                    if let Some(c) = conn.take() {
                        drop(tokio::time::timeout(PROBE_TIMEOUT, c.close()).await);
                    }
                    // Silent since the first question it did not answer was asked.
                    let since = *silent_since.get_or_insert(asked);
                    if since.elapsed() >= UNREACHABLE_AFTER
                        && !self.unreachable.swap(true, Ordering::AcqRel)
                    {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {PROBE_TIMEOUT:?}"),
                        };
                        warn!(
                            error = %why,
                            silent_for = ?since.elapsed(),
                            "the database does not answer; refusing requests at once (503) \
                             until it does"
                        );
                        metrics.database_reachable.set(0);
                    }
                }
            }
            let wait = if silent_since.is_some() {
                PROBE_FAST
            } else {
                PROBE_EVERY
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.unreachable.store(false, Ordering::Release);
        if let Some(c) = conn {
            drop(tokio::time::timeout(PROBE_TIMEOUT, c.close()).await);
        }
    }
}

/// One question: connect if there is no connection, then `SELECT 1` on it.
async fn ask(url: &str, conn: &mut Option<AnyConnection>) -> Result<(), sqlx::Error> {
    if conn.is_none() {
        *conn = Some(AnyConnection::connect(url).await?);
    }
    let c = conn.as_mut().expect("connected above");
    sqlx::query("SELECT 1").execute(c).await.map(drop)
}
