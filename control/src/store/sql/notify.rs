//! The change doorbell on PostgreSQL: a transaction that commits an allowlist version
//! sends `NOTIFY tether_changes, 'allowlist:<v>'` ([`ring`], delivered at commit, so
//! never for a version that rolled back), and one [`Doorbell`] task per replica listens
//! (`sqlx::postgres::PgListener`, on a connection of its own, outside the pool) and
//! publishes the version in force on the store's watch, which wakes every broker link of
//! the replica. It also reads the version every second, so a notification lost (a
//! listener reconnecting, a transaction pooler between the replica and the database, or
//! notifications turned off) delays a change by a second at most. The replica that
//! commits does not wait for any of this: its own commit moves the watch at once.
//!
//! SQLite has no NOTIFY and one process: nothing here runs there.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::AnyPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::db;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// The channel every change is announced on.
pub const CHANNEL: &str = "tether_changes";
/// How often the version is read when no notification came.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long the self-probe at start may take to come back.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Announce allowlist version `version` in the transaction committing it (PostgreSQL
/// only; nothing on SQLite).
pub(super) async fn ring(conn: &mut sqlx::AnyConnection, version: i64) -> Result<(), StoreError> {
    if conn.backend_name() != "PostgreSQL" {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(format!("allowlist:{version}"))
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// One replica's listener and poller (see the module doc). Build it with
/// [`super::SqlStore::doorbell`], then [`Doorbell::run`] it.
pub struct Doorbell {
    /// Where the listener connects (a direct or session-mode URL: a transaction pooler
    /// does not deliver notifications). `None`: no listener, polling only.
    pub(super) listen_url: Option<String>,
    pub(super) pool: AnyPool,
    pub(super) changed: Arc<watch::Sender<i64>>,
    /// Set while [`Doorbell::run`] runs.
    pub(super) running: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No URL: it may carry a password.
        f.debug_struct("Doorbell")
            .field("listening", &self.listen_url.is_some())
            .finish_non_exhaustive()
    }
}

impl Doorbell {
    /// Listen and poll until `shutdown`.
    ///
    /// The listener runs in a task of its own that forwards what it hears, so the
    /// one-second poll never cancels a `try_recv` half way: a cancelled `try_recv` that
    /// was reconnecting would lose the "connection lost" answer, and with it the
    /// reconnect count and the log line (found by `postgres_restart_under_load`).
    pub async fn run(self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        /// Clears the flag however `run` ends.
        struct Running(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        self.running
            .store(true, std::sync::atomic::Ordering::Release);
        let _running = Running(self.running.clone());
        metrics.notify_ok.set(0);
        let (wake, mut woken) = tokio::sync::mpsc::channel::<()>(1);
        match &self.listen_url {
            Some(url) => {
                tokio::spawn(listen_forever(
                    url.clone(),
                    self.pool.clone(),
                    metrics.clone(),
                    wake,
                    shutdown.clone(),
                ));
            }
            None => {
                drop(wake);
                info!("change notifications off: reading the allowlist version every second");
            }
        }
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => {}
                Some(()) = woken.recv() => {}
            }
            self.catch_up().await;
        }
    }
}

/// The listener's loop (see [`Doorbell::run`]): wake the poller on every notification
/// and after every reconnection (whatever was announced meanwhile is lost); after a
/// failure, connect again a second later.
async fn listen_forever(
    url: String,
    pool: AnyPool,
    metrics: Arc<Metrics>,
    wake: tokio::sync::mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut listener = listen(&url, &pool, &metrics).await;
    loop {
        let Some(l) = listener.as_mut() else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
            listener = listen(&url, &pool, &metrics).await;
            continue;
        };
        let heard = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = l.try_recv() => r,
        };
        match heard {
            Ok(Some(n)) => {
                metrics.notifications.inc();
                debug!(payload = n.payload(), "change notification");
            }
            Ok(None) => {
                // The listener reconnected (it listens again by itself).
                metrics.notify_reconnects.inc();
                warn!("change listener lost its database connection; reconnected, catching up");
            }
            Err(e) => {
                metrics.notify_reconnects.inc();
                metrics.notify_ok.set(0);
                warn!(error = %e, "change listener failed; polling every second until it is back");
                listener = None;
            }
        }
        let _ = wake.try_send(());
    }
}

/// Connect, listen, and check that a notification comes back within [`PROBE_TIMEOUT`]
/// (`notify_ok`); `None` if the listener cannot connect or listen.
async fn listen(url: &str, pool: &AnyPool, metrics: &Metrics) -> Option<PgListener> {
    let mut listener = match PgListener::connect(url).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot connect the change listener; polling every second");
            return None;
        }
    };
    if let Err(e) = listener.listen(CHANNEL).await {
        warn!(error = %e, "cannot LISTEN for changes; polling every second");
        return None;
    }
    let probe = format!("probe:{:016x}", fastrand::u64(..));
    let sent = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(&probe)
        .execute(pool)
        .await;
    let arrived = sent.is_ok()
        && tokio::time::timeout(PROBE_TIMEOUT, async {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) if n.payload() == probe => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
    if arrived {
        info!(
            channel = CHANNEL,
            "listening for changes from other replicas"
        );
        metrics.notify_ok.set(1);
    } else {
        warn!(
            "notifications not delivered (transaction pooler?): changes from other \
                 replicas arrive by the one-second poll"
        );
        metrics.notify_ok.set(0);
    }
    Some(listener)
}

impl Doorbell {
    /// Read the version in force and publish it if it is newer.
    async fn catch_up(&self) {
        let version: Result<i64, _> =
            sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
                .fetch_one(&self.pool)
                .await;
        match version {
            Ok(v) => {
                self.changed.send_if_modified(|cur| {
                    let newer = v > *cur;
                    if newer {
                        *cur = v;
                    }
                    newer
                });
            }
            Err(e) => debug!(error = %e, "cannot read the allowlist version"),
        }
    }
}
