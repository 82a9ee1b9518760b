//! [`SqlStore`]: the [`Store`] over SQLite or PostgreSQL.
//!
//! One SQL text serves both backends (through `sqlx::Any`, with `$n` placeholders, which
//! SQLite accepts too); only the migrations differ (`control/migrations/{sqlite,postgres}`,
//! embedded and run on [`SqlStore::connect`]). Queries are checked at run time, not at
//! build time, so building needs no database.
//!
//! # Transactions and versions
//!
//! The allowlist is the set of certificate rows with `allowed = 1`. Every operation that
//! can change it ([`Store::set_status`], [`Store::record_certificate`],
//! [`Store::expire_overlaps`]) is one transaction whose first statement updates the single
//! row of `allowlist_version`. That row lock (PostgreSQL) or write lock (SQLite) makes
//! such transactions run one at a time, on one process or on several control replicas,
//! so they read current state and commit in version order: a reader never sees version
//! `v + 1` without `v`. The transaction collects the fingerprints it adds and removes; at
//! its end, if there is at least one, it bumps the counter by exactly one
//! (`UPDATE … SET version = version + 1 RETURNING version`, in the same transaction, so a
//! rollback leaves no gap) and writes one `allowlist_changes` row per fingerprint, all
//! carrying that version, keyed `(version, ordinal)` in the order the operation returns
//! them. An operation that changes nothing (disabling twice) writes nothing and leaves the
//! version alone. So a version is exactly one operation's changes, each fingerprint at
//! most once (a unique `(version, fingerprint)` key holds the store to that).
//!
//! # The audit log
//!
//! An append is three statements inside the caller's transaction, at its end:
//! `UPDATE audit_head SET seq = seq + 1 … RETURNING seq, hash` takes the single head row
//! (the row lock on PostgreSQL, the write lock on SQLite) and gives the entry its number
//! and the previous hash; the entry is inserted; the head gets the new hash. The head row
//! is held until commit, so appends on every replica run one at a time, chain to each
//! other, and commit in `seq` order; a rollback takes the number back (no gap). A
//! trust-changing transaction takes the allowlist version row first and the audit head
//! last; every other transaction takes only the audit head, last: no lock cycle. The
//! entry's details are stored as the canonical JSON the hash covers, and triggers refuse
//! `UPDATE` and `DELETE` on `audit_log` (and `TRUNCATE` on PostgreSQL).
//!
//! [`Store::allowlist_snapshot`] reads the version and the pairs in one transaction
//! (`REPEATABLE READ` on PostgreSQL; a WAL read transaction on SQLite), so the pairs are
//! exactly the state at that version.
//!
//! # Rules this implementation adds to the trait's
//!
//! - [`Store::record_certificate`] on an appliance that is not `Active` (disabled,
//!   revoked) gives its older certificates no overlap: they are revoked at once, whatever
//!   `overlap_secs` says. `overlap_secs <= 0` revokes every older certificate of the
//!   appliance (current and any still in an earlier overlap), so only the new one is
//!   allowed.
//! - [`Store::set_status`] to `Active` from `Revoked` changes the status only: revoked
//!   certificates never come back; the appliance needs a new certificate.
//! - [`Store::allowlist_changes_since`] with `limit = 0` uses [`DEFAULT_CHANGES_LIMIT`].
//! - [`Store::find_certificate`]'s "allowed now" is allowlist membership (`allowed = 1`):
//!   exactly what brokers accept at this moment. A previous certificate whose overlap
//!   ended stays allowed until [`Store::expire_overlaps`] runs, and a certificate past its
//!   `not_after` stays allowed until it leaves the allowlist some other way; the caller
//!   checks validity times itself.
//! - The store holds at most one current certificate per appliance (a unique index).
//! - A token is valid while `now < expires_at`; so is a nonce.
//!
//! # SQLite
//!
//! WAL journal, `synchronous = FULL` (a recorded revocation survives a power cut),
//! foreign keys on, a busy timeout of [`SQLITE_BUSY_TIMEOUT`]. Use a file URL
//! (`sqlite://PATH?mode=rwc`, see [`SqlStore::sqlite_url`]); an in-memory database would
//! be one per pooled connection.
//!
//! # Layout
//!
//! This file holds the connection and the [`Store`] implementation; its helpers are in
//! private submodules by concern: `sql/trust.rs` (allowlist changes and the versioned
//! commit of a trust-changing transaction), `sql/audit.rs` (appending to the audit log
//! and reading entries and checkpoints back), `sql/rows.rs` (rows to the store's types),
//! `sql/replicas.rs` (the replica registry), `sql/jobs.rs` (periodic jobs' lease rows and
//! pruning), `sql/commands.rs` (commands in flight) and `sql/receipts.rs` (idempotent enrollment and renewal). [`copy`] is public:
//! `store copy` from SQLite to PostgreSQL.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::AnyPoolOptions;
use sqlx::error::ErrorKind;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};
use tether_audit::checkpoint::Checkpoint;
use tether_audit::{action, system, Actor, AuditEntry, AuditEvent};

use super::{
    AllowlistDelta, Appliance, ApplianceFilter, ApplianceStatus, AuditArchive, BrokerRecord,
    BrokerRefusal, CertRecord, CommandInFlight, ControlMeta, Issue, JobClaim, JobRecord, Receipt,
    ReceiptKind, ReplicaInfo, ReplicaRecord, Store, StoreError, UnixSeconds,
};

mod audit;
mod commands;
mod console;
pub mod copy;
mod jobs;
pub mod notify;
pub mod reach;
mod receipts;
mod replicas;
mod rows;
mod trust;

use audit::{
    append_audit_in, audit_from_row, check_event, checkpoint_from_row, AUDIT_COLUMNS,
    CHECKPOINT_COLUMNS,
};
use rows::{
    appliance_from_row, broker_from_row, cert_from_row, delta_from_row, invite_from_row,
    parse_operator_status, parse_role, status_str, APPLIANCE_COLUMNS, BROKER_COLUMNS, CERT_COLUMNS,
};
pub use trust::version_digest;
use trust::{
    allowable_from_row, allowed_certs, appliance_status, commit_trust_change, pending, set_allowed,
};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long a SQLite connection waits for another writer before failing.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pooled connections to a SQLite file (writers take turns anyway).
pub const SQLITE_MAX_CONNECTIONS: u32 = 4;
/// Pooled connections to PostgreSQL, per control process.
pub const POSTGRES_MAX_CONNECTIONS: u32 = 10;
/// How long to wait for a pooled connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a PostgreSQL connection lives before the pool replaces it: a bound on how
/// long a connection opened before a failover or a configuration change can linger.
pub const POSTGRES_MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Whether a PostgreSQL connection can write, asked of every new connection and of every
/// pooled one before it is handed out (in place of sqlx's ping, so it costs no extra
/// round trip). A standby, or a primary demoted and restarted as one, answers `true`.
const READ_ONLY_CHECK: &str =
    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'";
/// The message of a use of the store refused while the database does not answer.
const DATABASE_SILENT: &str = "the database does not answer (refused at once until it does)";
/// The message of a connection refused because its server is read-only.
const READ_ONLY_SERVER: &str = "the server is read-only (a standby or in recovery)";
/// [`ApplianceFilter::limit`] when it is 0.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// [`Store::allowlist_changes_since`]'s `limit` when it is 0.
pub const DEFAULT_CHANGES_LIMIT: u32 = 1000;
/// [`Store::audit_entries`]' `limit` when it is 0.
pub const DEFAULT_AUDIT_LIMIT: u32 = 1000;

/// The database behind a [`SqlStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// SQLite: one file in the data directory, one control process.
    Sqlite,
    /// PostgreSQL: shared by several control replicas.
    Postgres,
}

impl Backend {
    /// The backend a database URL names: `sqlite:…`, `postgres://…` or `postgresql://…`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            // Not the URL itself: it may carry a password.
            let scheme = url.split(':').next().unwrap_or_default();
            Err(StoreError::Database(format!(
                "unsupported database URL scheme {scheme:?} (expected sqlite: or postgres:)"
            )))
        }
    }
}

/// The [`Store`] over SQLite or PostgreSQL. Cloning shares the connection pool.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// The latest allowlist version this store committed (see [`Store::allowlist_watch`]).
    changed: std::sync::Arc<tokio::sync::watch::Sender<i64>>,
    /// Set while a [`notify::Doorbell`] runs: the watch then also follows other replicas'
    /// commits (see [`Store::allowlist_watch_follows_replicas`]).
    doorbell_running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whether the database address leads to a read-only server (see [`ReadOnlyGate`]).
    read_only: std::sync::Arc<ReadOnlyGate>,
    /// Set while PostgreSQL does not answer its [`reach::ReachProbe`]: every use of the
    /// pool is then refused at once.
    unreachable: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Fail fast while the database address leads to a read-only server (a standby, or a
/// demoted primary the DNS name or proxy has not moved away from yet).
///
/// sqlx retries a connection its `after_connect` hook refuses until the acquire timeout,
/// so refusing there would make a request wait [`ACQUIRE_TIMEOUT`] before its 503. A new
/// connection found read-only closes the gate instead: from then on every use of the pool
/// is refused at once with [`StoreError::Unavailable`] (and `/readyz` answers 503), while
/// one probe at a time asks a pooled connection every [`READ_ONLY_PROBE_EVERY`] whether
/// it can write; the first that can opens the gate again. The request that got the
/// read-only connection reads from it, or has its write refused (25006) and its one retry
/// refused by the gate. Only a *new* connection closes it: a
/// pooled connection found read-only says where the address led when it was opened, not
/// where it leads now, and is only evicted.
#[derive(Debug, Default)]
struct ReadOnlyGate {
    closed: std::sync::atomic::AtomicBool,
    probing: std::sync::atomic::AtomicBool,
}

/// How often a closed [`ReadOnlyGate`] asks whether the database can be written again.
const READ_ONLY_PROBE_EVERY: Duration = Duration::from_millis(250);

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URL: it may carry a password.
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Connect to `url` (`sqlite://PATH?mode=rwc` or `postgres://…`) and bring the schema
    /// up to date (versioned migrations; on PostgreSQL under an advisory lock, so replicas
    /// starting together are safe).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let options = AnyPoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
        let read_only_gate = std::sync::Arc::new(ReadOnlyGate::default());
        let gate = read_only_gate.clone();
        let pool = match backend {
            Backend::Sqlite => options
                .max_connections(SQLITE_MAX_CONNECTIONS)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        let busy =
                            format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA foreign_keys = ON",
                            busy.as_str(),
                        ] {
                            conn.execute(pragma).await?;
                        }
                        Ok(())
                    })
                }),
            // Pool hygiene for failovers: a pooled connection to a read-only server is
            // evicted before acquire, so a write fails over with the DNS name or proxy
            // instead of failing with 25006 until the connection happens to close (see
            // `begin_trust_change` for the retry). A new connection that lands on a
            // read-only server closes the `ReadOnlyGate` rather than failing: sqlx would
            // retry a refused connection until the acquire timeout, and the request that
            // opened it would wait that long. Handed out, it serves a read, or refuses a
            // write with 25006, which the gate then answers at once.
            Backend::Postgres => options
                .max_connections(POSTGRES_MAX_CONNECTIONS)
                .max_lifetime(POSTGRES_MAX_LIFETIME)
                .test_before_acquire(false)
                .after_connect(move |conn, _meta| {
                    let gate = gate.clone();
                    Box::pin(async move {
                        use std::sync::atomic::Ordering;
                        let read_only = read_only(conn).await?;
                        if read_only && !gate.closed.swap(true, Ordering::AcqRel) {
                            tracing::warn!(
                                "the database address leads to a read-only server; \
                                 refusing requests at once until it can be written"
                            );
                        }
                        Ok(())
                    })
                })
                .before_acquire(|conn, _meta| {
                    Box::pin(async move {
                        let writable = !read_only(conn).await?;
                        if !writable {
                            tracing::warn!("evicting a pooled connection to a read-only server");
                        }
                        Ok(writable)
                    })
                }),
        }
        .connect(url)
        .await
        .map_err(|e| StoreError::Database(format!("cannot connect: {e}")))?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
            .fetch_one(&pool)
            .await
            .map_err(db)?;
        let (changed, _) = tokio::sync::watch::channel(version);
        let store = Self {
            pool,
            backend,
            changed: std::sync::Arc::new(changed),
            doorbell_running: Default::default(),
            read_only: read_only_gate,
            unreachable: Default::default(),
        };
        // Versions committed before the digest chain existed get their digests now.
        let mut tx = store.begin_trust_change().await?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        trust::chain_head(&mut tx, version).await?;
        tx.commit().await.map_err(db)?;
        Ok(store)
    }

    /// PostgreSQL: the change doorbell of a replica serving this store (see [`notify`]),
    /// listening at `listen_url` (`None`: polling only); `None` on SQLite.
    pub fn doorbell(&self, listen_url: Option<String>) -> Option<notify::Doorbell> {
        (self.backend == Backend::Postgres).then(|| notify::Doorbell {
            listen_url,
            pool: self.pool.clone(),
            changed: self.changed.clone(),
            running: self.doorbell_running.clone(),
        })
    }

    /// PostgreSQL: the reachability probe of a replica serving this store, asking at
    /// `url` (see [`reach`]); `None` on SQLite.
    pub fn reach_probe(&self, url: String) -> Option<reach::ReachProbe> {
        (self.backend == Backend::Postgres).then(|| reach::ReachProbe {
            url,
            pool: self.pool.clone(),
            unreachable: self.unreachable.clone(),
        })
    }

    /// The pool, unless the database does not answer ([`reach`]) or its address leads to
    /// a read-only server ([`ReadOnlyGate`]).
    fn pool(&self) -> Result<&AnyPool, StoreError> {
        use std::sync::atomic::Ordering;
        if self.unreachable.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(DATABASE_SILENT.into()));
        }
        let gate = &self.read_only;
        if !gate.closed.load(Ordering::Acquire) {
            return Ok(&self.pool);
        }
        if !gate.probing.swap(true, Ordering::AcqRel) {
            let (pool, gate) = (self.pool.clone(), self.read_only.clone());
            tokio::spawn(async move {
                while gate.closed.load(Ordering::Acquire) && !pool.is_closed() {
                    let probe = async {
                        let mut conn = pool.acquire().await?;
                        read_only(&mut conn).await
                    };
                    if let Ok(Ok(false)) = tokio::time::timeout(READ_ONLY_PROBE_EVERY, probe).await
                    {
                        gate.closed.store(false, Ordering::Release);
                        tracing::info!("the database can be written again");
                        break;
                    }
                    tokio::time::sleep(READ_ONLY_PROBE_EVERY).await;
                }
                // Idle connections opened before the address moved may still lead to the
                // read-only server: take each once, so the check before acquire evicts
                // those, and the pool holds only writable connections again.
                let idle = pool.num_idle();
                let sweep =
                    (0..idle).map(|_| tokio::time::timeout(READ_ONLY_PROBE_EVERY, pool.acquire()));
                drop(futures_util::future::join_all(sweep).await);
                gate.probing.store(false, Ordering::Release);
            });
        }
        Err(StoreError::Unavailable(READ_ONLY_SERVER.into()))
    }

    /// Current certificates of the appliances with ids in `(after, through]` (either
    /// end open when `None`), ordered by appliance id.
    async fn current_certs(
        &self,
        after: Option<&str>,
        through: Option<&str>,
    ) -> Result<Vec<CertRecord>, StoreError> {
        let mut sql = format!("SELECT {CERT_COLUMNS} FROM certificates WHERE state = 'current'");
        let mut n = 0;
        for (bound, clause) in [(after, "appliance_id >"), (through, "appliance_id <=")] {
            if bound.is_some() {
                n += 1;
                sql.push_str(&format!(" AND {clause} ${n}"));
            }
        }
        sql.push_str(" ORDER BY appliance_id");
        let mut query = sqlx::query(&sql);
        for bound in [after, through].into_iter().flatten() {
            query = query.bind(bound);
        }
        query
            .fetch_all(self.pool()?)
            .await
            .map_err(db)?
            .iter()
            .map(cert_from_row)
            .collect()
    }

    /// The URL of a SQLite store in the file `path`, created if missing.
    pub fn sqlite_url(path: &Path) -> String {
        format!("sqlite://{}?mode=rwc", path.display())
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Close every connection, waiting for those in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begin a transaction that may change the allowlist: take the version row first, so
    /// trust changes run one at a time and see each other's results. End it with
    /// [`commit_trust_change`] (dropping it rolls back).
    ///
    /// Its first statement is a write: on a connection to a server that became read-only
    /// since it was checked (SQLSTATE 25006), the connection goes back to the pool, whose
    /// check before the next acquire closes it, and the transaction is begun once more;
    /// a second refusal is [`StoreError::Unavailable`].
    async fn begin_trust_change(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let mut retried = false;
        loop {
            let mut tx = self.pool()?.begin().await.map_err(db)?;
            match sqlx::query("UPDATE allowlist_version SET version = version WHERE id = 1")
                .execute(&mut *tx)
                .await
            {
                Ok(_) => return Ok(tx),
                Err(e) if is_read_only_refusal(&e) && !retried => {
                    tracing::warn!(error = %e, "a write was refused as read-only; retrying on another connection");
                    drop(tx);
                    retried = true;
                }
                Err(e) => return Err(db(e)),
            }
        }
    }
}

/// Record `cert` as its appliance's current certificate inside a trust change (see
/// [`Store::record_certificate`]); returns the pending deltas for
/// [`commit_trust_change`]. `Conflict` if the serial or fingerprint is recorded (the
/// caller drops the transaction).
/// Take every certificate of `id` out of the allowlist (their removals pushed to
/// `deltas`) and mark them revoked.
async fn revoke_every_certificate(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    deltas: &mut Vec<AllowlistDelta>,
) -> Result<(), StoreError> {
    let certs = allowed_certs(conn, id).await?;
    set_allowed(conn, &certs, false, deltas).await?;
    sqlx::query(
        "UPDATE certificates SET state = 'revoked', previous_until = NULL \
         WHERE appliance_id = $1 AND state <> 'revoked'",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

async fn insert_certificate(
    conn: &mut sqlx::AnyConnection,
    cert: &CertRecord,
    now: UnixSeconds,
    overlap_secs: i64,
) -> Result<Vec<AllowlistDelta>, StoreError> {
    let id = cert.appliance_id.as_str();
    let status = appliance_status(conn, id).await?;
    let overlap = if status == ApplianceStatus::Active {
        overlap_secs
    } else {
        0
    };
    // The older certificates step aside first: one current certificate per appliance.
    // If the insert below is refused, the transaction rolls back whole.
    let mut removed = Vec::new();
    if overlap > 0 {
        sqlx::query(
            "UPDATE certificates SET state = 'previous', previous_until = $1 \
             WHERE appliance_id = $2 AND state = 'current'",
        )
        .bind(now.saturating_add(overlap))
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    } else {
        revoke_every_certificate(conn, id, &mut removed).await?;
    }
    let inserted = sqlx::query(
        "INSERT INTO certificates \
         (serial, appliance_id, fingerprint, not_before, not_after, state, previous_until, allowed) \
         VALUES ($1, $2, $3, $4, $5, 'current', NULL, 1) ON CONFLICT DO NOTHING",
    )
    .bind(&cert.serial)
    .bind(id)
    .bind(&cert.fingerprint)
    .bind(cert.not_before)
    .bind(cert.not_after)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        // The caller drops the transaction: it rolls back whole.
        return Err(StoreError::Conflict(format!(
            "certificate with serial {} or fingerprint {}",
            cert.serial, cert.fingerprint
        )));
    }
    if status != ApplianceStatus::Active {
        sqlx::query("UPDATE appliances SET status = 'active' WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    // The new fingerprint first, then the ones it replaces at once.
    let mut deltas = vec![pending(id, &cert.fingerprint, true)];
    deltas.append(&mut removed);
    Ok(deltas)
}

/// Whether a PostgreSQL connection's server is read-only ([`READ_ONLY_CHECK`]).
async fn read_only(conn: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(READ_ONLY_CHECK)
        .fetch_one(conn)
        .await
}

/// SQLSTATE 25006 `read_only_sql_transaction`: a write on a read-only server.
const SQLSTATE_READ_ONLY: &str = "25006";

/// Whether `e` is a write refused because the server is read-only.
fn is_read_only_refusal(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some(SQLSTATE_READ_ONLY))
}

/// Whether `e` says the database cannot be reached or written now, rather than that
/// the statement failed: I/O and TLS failures, no connection in time, SQLSTATE class 08
/// (connection exception), 53300 (too many connections), 57P01–57P03 (shutting down,
/// crashed, starting up) and 25006 (read-only).
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => {
            d.code().is_some_and(|c| {
                c.starts_with("08") || matches!(&*c, "53300" | "57P01" | "57P02" | "57P03")
            }) || is_read_only_refusal(e)
        }
        _ => false,
    }
}

/// Any other database failure ([`StoreError::Unavailable`] when the database cannot be
/// reached or written now, see [`is_unavailable`]).
fn db(e: sqlx::Error) -> StoreError {
    if is_unavailable(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Database(e.to_string())
    }
}

fn kind_of(e: &sqlx::Error) -> Option<ErrorKind> {
    e.as_database_error().map(|d| d.kind())
}

#[async_trait]
impl Store for SqlStore {
    async fn register_appliance(
        &self,
        appliance: &Appliance,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let binding = serde_json::to_string(&appliance.binding).map_err(|e| {
            StoreError::Database(format!("cannot encode the platform binding: {e}"))
        })?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let inserted = sqlx::query(
            "INSERT INTO appliances \
             (id, tenant, binding, status, manual_renewal_generation, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&appliance.id)
        .bind(&appliance.tenant)
        .bind(binding)
        .bind(status_str(appliance.status))
        .bind(appliance.manual_renewal_generation)
        .bind(appliance.created_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Conflict(format!("appliance {}", appliance.id)));
        }
        append_audit_in(&mut tx, audit, appliance.created_at).await?;
        tx.commit().await.map_err(db)
    }

    async fn get_appliance(&self, id: &str) -> Result<Option<Appliance>, StoreError> {
        sqlx::query(&format!(
            "SELECT {APPLIANCE_COLUMNS} FROM appliances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        .as_ref()
        .map(appliance_from_row)
        .transpose()
    }

    async fn list_appliances(
        &self,
        filter: &ApplianceFilter,
    ) -> Result<Vec<Appliance>, StoreError> {
        let mut sql = format!("SELECT {APPLIANCE_COLUMNS} FROM appliances WHERE 1 = 1");
        let mut n = 0;
        let mut arg = |sql: &mut String, clause: &str| {
            n += 1;
            sql.push_str(&format!(" AND {clause} ${n}"));
        };
        if filter.status.is_some() {
            arg(&mut sql, "status =");
        }
        if filter.tenant.is_some() {
            arg(&mut sql, "tenant =");
        }
        if filter.after.is_some() {
            arg(&mut sql, "id >");
        }
        if filter.id_prefix.is_some() {
            n += 2;
            sql.push_str(&format!(
                " AND substr(id, 1, CAST(${} AS INTEGER)) = ${n}",
                n - 1
            ));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY id LIMIT ${n}"));

        let mut query = sqlx::query(&sql);
        if let Some(status) = filter.status {
            query = query.bind(status_str(status));
        }
        if let Some(tenant) = &filter.tenant {
            query = query.bind(tenant.as_str());
        }
        if let Some(after) = &filter.after {
            query = query.bind(after.as_str());
        }
        if let Some(prefix) = &filter.id_prefix {
            query = query
                .bind(prefix.chars().count() as i64)
                .bind(prefix.as_str());
        }
        let limit = if filter.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            filter.limit
        };
        query
            .bind(i64::from(limit))
            .fetch_all(self.pool()?)
            .await
            .map_err(db)?
            .iter()
            .map(appliance_from_row)
            .collect()
    }

    async fn set_status(
        &self,
        id: &str,
        status: ApplianceStatus,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Vec<AllowlistDelta>, StoreError> {
        check_event(audit)?;
        let mut tx = self.begin_trust_change().await?;
        let old = appliance_status(&mut tx, id).await?;
        if old == status {
            return commit_trust_change(&self.changed, tx, Vec::new(), Some((audit, now))).await;
        }
        let mut deltas = Vec::new();
        match status {
            ApplianceStatus::Disabled => {
                let certs = allowed_certs(&mut tx, id).await?;
                set_allowed(&mut tx, &certs, false, &mut deltas).await?;
            }
            ApplianceStatus::Revoked => {
                revoke_every_certificate(&mut tx, id, &mut deltas).await?;
            }
            ApplianceStatus::Active => {
                let certs = sqlx::query(
                    "SELECT seq, appliance_id, fingerprint FROM certificates \
                     WHERE appliance_id = $1 AND allowed = 0 AND not_after > $2 \
                     AND (state = 'current' OR (state = 'previous' AND previous_until > $2)) \
                     ORDER BY seq",
                )
                .bind(id)
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?
                .iter()
                .map(allowable_from_row)
                .collect::<Result<Vec<_>, _>>()?;
                set_allowed(&mut tx, &certs, true, &mut deltas).await?;
            }
        }
        sqlx::query("UPDATE appliances SET status = $1 WHERE id = $2")
            .bind(status_str(status))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        commit_trust_change(&self.changed, tx, deltas, Some((audit, now))).await
    }

    async fn bump_manual_renewal(
        &self,
        id: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<i64, StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let generation: i64 = sqlx::query_scalar(
            "UPDATE appliances SET manual_renewal_generation = manual_renewal_generation + 1 \
             WHERE id = $1 RETURNING manual_renewal_generation",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound(format!("appliance {id}")))?;
        let event = audit.clone().with("manual_renewal_generation", generation);
        append_audit_in(&mut tx, &event, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(generation)
    }

    async fn create_token(
        &self,
        appliance_id: &str,
        token_hash: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let inserted = sqlx::query(
            "INSERT INTO enrollment_tokens (token_hash, appliance_id, expires_at) \
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(token_hash)
        .bind(appliance_id)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| match kind_of(&e) {
            Some(ErrorKind::ForeignKeyViolation) => {
                StoreError::NotFound(format!("appliance {appliance_id}"))
            }
            _ => db(e),
        })?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Conflict("enrollment token".into()));
        }
        append_audit_in(&mut tx, audit, now).await?;
        tx.commit().await.map_err(db)
    }

    async fn redeem_token(
        &self,
        appliance_id: &str,
        token_hash: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let redeemed = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = $1 \
             WHERE token_hash = $2 AND appliance_id = $3 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(token_hash)
        .bind(appliance_id)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if redeemed == 1 {
            append_audit_in(&mut tx, audit, now).await?;
            return tx.commit().await.map_err(db);
        }
        tx.rollback().await.map_err(db)?;
        // Refused: say why. The row can only have moved further from usable since.
        Err(StoreError::Token(
            receipts::token_refusal(self.pool()?, appliance_id, token_hash).await?,
        ))
    }

    async fn create_nonce(&self, nonce: &str, expires_at: UnixSeconds) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO nonces (nonce, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(nonce)
        .bind(expires_at)
        .execute(self.pool()?)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict("nonce".into()));
        }
        Ok(())
    }

    async fn consume_nonce(&self, nonce: &str, now: UnixSeconds) -> Result<(), StoreError> {
        let consumed = sqlx::query(
            "UPDATE nonces SET used_at = $1 \
             WHERE nonce = $2 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(nonce)
        .execute(self.pool()?)
        .await
        .map_err(db)?
        .rows_affected();
        if consumed == 1 {
            return Ok(());
        }
        let used_at: Option<Option<i64>> =
            sqlx::query_scalar("SELECT used_at FROM nonces WHERE nonce = $1")
                .bind(nonce)
                .fetch_optional(self.pool()?)
                .await
                .map_err(db)?;
        match used_at {
            Some(Some(_)) => Err(StoreError::Replay("nonce".into())),
            _ => Err(StoreError::NonceInvalid),
        }
    }

    async fn record_proof(
        &self,
        kind: &str,
        proof_id: &str,
        expires_at: UnixSeconds,
    ) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO used_proofs (kind, proof_id, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(kind)
        .bind(proof_id)
        .bind(expires_at)
        .execute(self.pool()?)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Replay(format!("{kind} proof")));
        }
        Ok(())
    }

    async fn record_certificate(
        &self,
        cert: &CertRecord,
        now: UnixSeconds,
        overlap_secs: i64,
        audit: &AuditEvent,
    ) -> Result<Vec<AllowlistDelta>, StoreError> {
        check_event(audit)?;
        let mut tx = self.begin_trust_change().await?;
        let deltas = insert_certificate(&mut tx, cert, now, overlap_secs).await?;
        commit_trust_change(&self.changed, tx, deltas, Some((audit, now))).await
    }

    async fn certificates(&self, appliance_id: &str) -> Result<Vec<CertRecord>, StoreError> {
        let certs = sqlx::query(&format!(
            "SELECT {CERT_COLUMNS} FROM certificates WHERE appliance_id = $1 ORDER BY seq DESC"
        ))
        .bind(appliance_id)
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(cert_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() && self.get_appliance(appliance_id).await?.is_none() {
            return Err(StoreError::NotFound(format!("appliance {appliance_id}")));
        }
        Ok(certs)
    }

    async fn current_certificates(&self) -> Result<Vec<CertRecord>, StoreError> {
        self.current_certs(None, None).await
    }

    async fn current_certificates_between(
        &self,
        after: Option<&str>,
        through: &str,
    ) -> Result<Vec<CertRecord>, StoreError> {
        self.current_certs(after, Some(through)).await
    }

    async fn current_certificate(
        &self,
        appliance_id: &str,
    ) -> Result<Option<CertRecord>, StoreError> {
        let cert = sqlx::query(&format!(
            "SELECT {CERT_COLUMNS} FROM certificates \
             WHERE appliance_id = $1 AND state = 'current'"
        ))
        .bind(appliance_id)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        .as_ref()
        .map(cert_from_row)
        .transpose()?;
        if cert.is_none() && self.get_appliance(appliance_id).await?.is_none() {
            return Err(StoreError::NotFound(format!("appliance {appliance_id}")));
        }
        Ok(cert)
    }

    async fn find_certificate(
        &self,
        fingerprint: &str,
    ) -> Result<Option<(CertRecord, bool)>, StoreError> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {CERT_COLUMNS}, allowed FROM certificates WHERE fingerprint = $1"
        ))
        .bind(fingerprint)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        let allowed: i64 = row.try_get("allowed").map_err(db)?;
        Ok(Some((cert_from_row(&row)?, allowed != 0)))
    }

    async fn expire_overlaps(&self, now: UnixSeconds) -> Result<Vec<AllowlistDelta>, StoreError> {
        const ENDED: &str = "state = 'previous' AND previous_until <= $1";
        // Cheap check first, so the periodic call takes no write lock when idle.
        let any: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT seq FROM certificates WHERE {ENDED} LIMIT 1"
        ))
        .bind(now)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_trust_change().await?;
        let ended = sqlx::query(&format!(
            "SELECT seq, appliance_id, fingerprint FROM certificates \
             WHERE {ENDED} AND allowed = 1 ORDER BY seq"
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(allowable_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let mut deltas = Vec::new();
        set_allowed(&mut tx, &ended, false, &mut deltas).await?;
        sqlx::query(&format!(
            "UPDATE certificates SET state = 'revoked', previous_until = NULL WHERE {ENDED}"
        ))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let appliances = ended
            .iter()
            .map(|c| c.appliance_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let event = AuditEvent::success(
            Actor::system(system::CONTROL),
            action::ALLOWLIST_EXPIRE_OVERLAPS,
            "",
        )
        .with("appliances", appliances);
        let audit = (!deltas.is_empty()).then_some((&event, now));
        commit_trust_change(&self.changed, tx, deltas, audit).await
    }

    async fn allowlist_version(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
            .fetch_one(self.pool()?)
            .await
            .map_err(db)
    }

    async fn allowlist_snapshot(&self) -> Result<(i64, Vec<(String, String)>), StoreError> {
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        if self.backend == Backend::Postgres {
            tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .await
                .map_err(db)?;
        }
        let version: i64 = sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let pairs = sqlx::query(
            "SELECT appliance_id, fingerprint FROM certificates WHERE allowed = 1 \
             ORDER BY appliance_id, fingerprint",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("appliance_id").map_err(db)?,
                row.try_get("fingerprint").map_err(db)?,
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        tx.commit().await.map_err(db)?;
        Ok((version, pairs))
    }

    async fn allowlist_changes_since(
        &self,
        since: i64,
        limit: u32,
    ) -> Result<Vec<AllowlistDelta>, StoreError> {
        let limit = if limit == 0 {
            DEFAULT_CHANGES_LIMIT
        } else {
            limit
        };
        // Whole versions: every version that has a row among the first `limit` after
        // `since`, so the page ends at the first version boundary at or after `limit`
        // rows. One statement, so one snapshot: versions commit whole, in order.
        sqlx::query(
            "SELECT version, appliance_id, fingerprint, added FROM allowlist_changes \
             WHERE version > $1 AND version <= ( \
                 SELECT MAX(version) FROM ( \
                     SELECT version FROM allowlist_changes WHERE version > $1 \
                     ORDER BY version, ordinal LIMIT $2 \
                 ) AS page \
             ) \
             ORDER BY version, ordinal",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(delta_from_row)
        .collect()
    }

    async fn append_audit(
        &self,
        event: &AuditEvent,
        now: UnixSeconds,
    ) -> Result<AuditEntry, StoreError> {
        check_event(event)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let entry = append_audit_in(&mut tx, event, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(entry)
    }

    async fn audit_entries(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = if limit == 0 {
            DEFAULT_AUDIT_LIMIT
        } else {
            limit
        };
        sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn add_audit_checkpoint(&self, checkpoint: &Checkpoint) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO audit_checkpoints (seq, head_hash, at, signature, signer_chain_pem) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(checkpoint.seq)
        .bind(checkpoint.head_hash.as_str())
        .bind(checkpoint.at)
        .bind(checkpoint.signature.as_str())
        .bind(checkpoint.signer_chain_pem.as_str())
        .execute(self.pool()?)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn audit_checkpoints(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let limit = if limit == 0 {
            DEFAULT_AUDIT_LIMIT
        } else {
            limit
        };
        sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(checkpoint_from_row)
        .collect()
    }

    async fn audit_archive(&self) -> Result<Option<AuditArchive>, StoreError> {
        audit::last_archive(self.pool()?).await
    }

    async fn archive_audit(
        &self,
        archive: &AuditArchive,
        audit: &AuditEvent,
    ) -> Result<u64, StoreError> {
        audit::archive(self.pool()?, archive, audit).await
    }

    async fn last_audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"
        ))
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        .as_ref()
        .map(checkpoint_from_row)
        .transpose()
    }

    async fn create_invite(
        &self,
        token_hash: &str,
        name: &str,
        role: tether_api::operators::Role,
        expires_at: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let inserted = sqlx::query(
            "INSERT INTO operator_invites (token_hash, name, role, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(token_hash)
        .bind(name)
        .bind(role.as_str())
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Conflict("operator invite".into()));
        }
        append_audit_in(&mut tx, audit, now).await?;
        tx.commit().await.map_err(db)
    }

    async fn find_invite(
        &self,
        token_hash: &str,
    ) -> Result<Option<crate::store::Invite>, StoreError> {
        sqlx::query(
            "SELECT name, role, expires_at, used_at, cancelled FROM operator_invites \
             WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        .as_ref()
        .map(invite_from_row)
        .transpose()
    }

    async fn redeem_invite(
        &self,
        token_hash: &str,
        cert: &crate::store::OperatorCertificate,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Result<crate::store::Invite, crate::store::InviteRefusal>, StoreError> {
        use crate::store::InviteRefusal;
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let redeemed = sqlx::query(
            "UPDATE operator_invites SET used_at = $1 \
             WHERE token_hash = $2 AND name = $3 AND used_at IS NULL AND cancelled = 0 \
             AND expires_at > $1 \
             RETURNING name, role, expires_at, used_at, cancelled",
        )
        .bind(now)
        .bind(token_hash)
        .bind(cert.operator.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .as_ref()
        .map(invite_from_row)
        .transpose()?;
        let Some(invite) = redeemed else {
            tx.rollback().await.map_err(db)?;
            // Refused: say why. The row can only have moved further from usable since.
            let refusal = match self.find_invite(token_hash).await? {
                Some(i) if i.name == cert.operator => i.refusal(now).unwrap_or(InviteRefusal::Used),
                _ => InviteRefusal::Unknown,
            };
            return Ok(Err(refusal));
        };
        sqlx::query(
            "INSERT INTO operators (name, role, status, created_at) VALUES ($1, $2, 'active', $3) \
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, status = 'active'",
        )
        .bind(invite.name.as_str())
        .bind(invite.role.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let inserted = sqlx::query(
            "INSERT INTO operator_certificates (fingerprint, serial, operator, not_after, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(cert.fingerprint.as_str())
        .bind(cert.serial.as_str())
        .bind(cert.operator.as_str())
        .bind(cert.not_after)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Conflict(format!(
                "operator certificate with serial {} or fingerprint {}",
                cert.serial, cert.fingerprint
            )));
        }
        let audit = audit.clone().with("role", invite.role.as_str());
        append_audit_in(&mut tx, &audit, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(Ok(invite))
    }

    async fn operator_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<crate::store::OperatorCredential>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT o.name AS name, o.role AS role, o.status AS status, c.not_after AS not_after \
             FROM operator_certificates c JOIN operators o ON o.name = c.operator \
             WHERE c.fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        Ok(Some(crate::store::OperatorCredential {
            name: row.try_get("name").map_err(db)?,
            role: parse_role(&row)?,
            status: parse_operator_status(&row)?,
            not_after: row.try_get("not_after").map_err(db)?,
        }))
    }

    async fn list_operators(&self) -> Result<Vec<tether_api::operators::Operator>, StoreError> {
        sqlx::query(
            "SELECT o.name AS name, o.role AS role, o.status AS status, \
             o.created_at AS created_at, \
             (SELECT COUNT(*) FROM operator_certificates c WHERE c.operator = o.name) AS certificates \
             FROM operators o ORDER BY o.name",
        )
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(tether_api::operators::Operator {
                name: row.try_get("name").map_err(db)?,
                role: parse_role(row)?,
                status: parse_operator_status(row)?,
                created_at: row.try_get("created_at").map_err(db)?,
                certificates: row.try_get("certificates").map_err(db)?,
            })
        })
        .collect()
    }

    async fn revoke_operator(
        &self,
        name: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<tether_api::operators::Revoked, StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let operators = sqlx::query("UPDATE operators SET status = 'revoked' WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        let certificates = sqlx::query("DELETE FROM operator_certificates WHERE operator = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        // Its console sessions end with it: the next page it asks for is the login page.
        let sessions = sqlx::query("DELETE FROM console_sessions WHERE operator = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        let invites = sqlx::query(
            "UPDATE operator_invites SET cancelled = 1 \
             WHERE name = $1 AND used_at IS NULL AND cancelled = 0",
        )
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if operators == 0 && invites == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::NotFound(format!("operator {name}")));
        }
        let audit = audit
            .clone()
            .with("certificates_removed", certificates)
            .with("console_sessions_ended", sessions)
            .with("invites_cancelled", invites);
        append_audit_in(&mut tx, &audit, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(tether_api::operators::Revoked {
            certificates_removed: certificates,
            invites_cancelled: invites,
        })
    }

    async fn create_console_link(
        &self,
        link: &crate::store::NewConsoleLink,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        console::create_link(self.pool()?, link, now, audit).await
    }

    async fn find_console_link(
        &self,
        id: &str,
    ) -> Result<Option<crate::store::ConsoleLink>, StoreError> {
        console::find_link(self.pool()?, id).await
    }

    async fn redeem_console_link(
        &self,
        id: &str,
        session: &crate::store::NewConsoleSession,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        console::redeem_link(self.pool()?, id, session, now, audit).await
    }

    async fn console_session(
        &self,
        token_sha256: &str,
    ) -> Result<Option<crate::store::ConsoleSessionRecord>, StoreError> {
        console::session(self.pool()?, token_sha256).await
    }

    async fn touch_console_session(
        &self,
        token_sha256: &str,
        now: UnixSeconds,
        idle_expires_at: UnixSeconds,
    ) -> Result<(), StoreError> {
        console::touch(self.pool()?, token_sha256, now, idle_expires_at).await
    }

    async fn end_console_session(
        &self,
        token_sha256: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        console::end(self.pool()?, token_sha256, now, Some(audit)).await
    }

    async fn drop_console_session(&self, token_sha256: &str) -> Result<(), StoreError> {
        console::end(self.pool()?, token_sha256, 0, None)
            .await
            .map(drop)
    }

    async fn console_sessions(
        &self,
        operator: &str,
    ) -> Result<Vec<crate::store::ConsoleSessionRecord>, StoreError> {
        console::sessions_of(self.pool()?, operator).await
    }

    async fn audit_search(
        &self,
        q: &crate::store::AuditSearch,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        console::search(self.pool()?, q).await
    }

    async fn add_broker(
        &self,
        name: &str,
        token_hash: &str,
        expires_at: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let changed = sqlx::query(
            "INSERT INTO brokers (name, status, created_at, token_hash, token_expires_at) \
             VALUES ($1, 'pending', $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET status = 'pending', token_hash = excluded.token_hash, \
             token_expires_at = excluded.token_expires_at, fingerprint = NULL, not_after = NULL, \
             previous_fingerprint = NULL, previous_until = NULL \
             WHERE brokers.status <> 'active'",
        )
        .bind(name)
        .bind(now)
        .bind(token_hash)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::Conflict(format!("active broker {name}")));
        }
        append_audit_in(&mut tx, audit, now).await?;
        tx.commit().await.map_err(db)
    }

    async fn enroll_broker(
        &self,
        name: &str,
        token_hash: &str,
        fingerprint: &str,
        not_after: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let changed = sqlx::query(
            "UPDATE brokers SET status = 'active', token_hash = NULL, token_expires_at = NULL, \
             fingerprint = $1, not_after = $2, previous_fingerprint = NULL, previous_until = NULL \
             WHERE name = $3 AND status = 'pending' AND token_hash = $4 AND token_expires_at > $5",
        )
        .bind(fingerprint)
        .bind(not_after)
        .bind(name)
        .bind(token_hash)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await.map_err(db)?;
            let row = sqlx::query(
                "SELECT status, token_hash, token_expires_at FROM brokers WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(self.pool()?)
            .await
            .map_err(db)?;
            let refusal = match row {
                None => BrokerRefusal::Unknown,
                Some(row) => {
                    let status: String = row.try_get("status").map_err(db)?;
                    let hash: Option<String> = row.try_get("token_hash").map_err(db)?;
                    let expires: Option<i64> = row.try_get("token_expires_at").map_err(db)?;
                    match (status.as_str(), hash) {
                        ("active", None) => BrokerRefusal::AlreadyUsed,
                        ("pending", Some(h)) if h == token_hash => {
                            if expires.is_some_and(|e| e <= now) {
                                BrokerRefusal::Expired
                            } else {
                                BrokerRefusal::Unknown
                            }
                        }
                        _ => BrokerRefusal::Unknown,
                    }
                }
            };
            return Ok(Err(refusal));
        }
        append_audit_in(&mut tx, audit, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(Ok(()))
    }

    async fn renew_broker(
        &self,
        name: &str,
        presented: &str,
        fingerprint: &str,
        not_after: UnixSeconds,
        overlap_until: UnixSeconds,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let changed = sqlx::query(
            "UPDATE brokers SET previous_fingerprint = fingerprint, previous_until = $1, \
             fingerprint = $2, not_after = $3 \
             WHERE name = $4 AND status = 'active' AND fingerprint = $5",
        )
        .bind(overlap_until)
        .bind(fingerprint)
        .bind(not_after)
        .bind(name)
        .bind(presented)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::NotFound(format!(
                "active broker {name} with that certificate"
            )));
        }
        append_audit_in(&mut tx, audit, now).await?;
        tx.commit().await.map_err(db)
    }

    async fn broker_by_fingerprint(
        &self,
        fingerprint: &str,
        now: UnixSeconds,
    ) -> Result<Option<BrokerRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {BROKER_COLUMNS} FROM brokers WHERE status = 'active' AND \
             (fingerprint = $1 OR (previous_fingerprint = $1 AND previous_until > $2))"
        ))
        .bind(fingerprint)
        .bind(now)
        .fetch_optional(self.pool()?)
        .await
        .map_err(db)?
        .as_ref()
        .map(broker_from_row)
        .transpose()
    }

    async fn list_brokers(&self) -> Result<Vec<BrokerRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {BROKER_COLUMNS} FROM brokers ORDER BY name"
        ))
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(broker_from_row)
        .collect()
    }

    async fn broker_seen(
        &self,
        name: &str,
        quic_addr: &str,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE brokers SET quic_addr = $1, last_seen = $2 WHERE name = $3")
            .bind(quic_addr)
            .bind(now)
            .bind(name)
            .execute(self.pool()?)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn revoke_broker(
        &self,
        name: &str,
        now: UnixSeconds,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        check_event(audit)?;
        let mut tx = self.pool()?.begin().await.map_err(db)?;
        let changed = sqlx::query(
            "UPDATE brokers SET status = 'revoked', token_hash = NULL, token_expires_at = NULL, \
             fingerprint = NULL, previous_fingerprint = NULL, previous_until = NULL \
             WHERE name = $1",
        )
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::NotFound(format!("broker {name}")));
        }
        append_audit_in(&mut tx, audit, now).await?;
        tx.commit().await.map_err(db)
    }

    async fn renewal_generations(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, manual_renewal_generation FROM appliances \
             WHERE manual_renewal_generation > 0 ORDER BY id",
        )
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("id").map_err(db)?,
                    r.try_get("manual_renewal_generation").map_err(db)?,
                ))
            })
            .collect()
    }

    fn allowlist_watch(&self) -> tokio::sync::watch::Receiver<i64> {
        self.changed.subscribe()
    }

    fn allowlist_watch_follows_replicas(&self) -> bool {
        self.doorbell_running
            .load(std::sync::atomic::Ordering::Acquire)
    }

    async fn control_meta(&self) -> Result<Option<ControlMeta>, StoreError> {
        replicas::control_meta(self.pool()?).await
    }

    async fn record_control_meta(
        &self,
        meta: &ControlMeta,
        now: UnixSeconds,
    ) -> Result<ControlMeta, StoreError> {
        replicas::record_control_meta(self.pool()?, meta, now).await
    }

    async fn replica_heartbeat(
        &self,
        info: &ReplicaInfo,
        starting: bool,
    ) -> Result<(), StoreError> {
        replicas::heartbeat(self.pool()?, self.backend, info, starting).await
    }

    async fn live_replicas(&self, within: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        replicas::live(self.pool()?, self.backend, within).await
    }

    async fn writable(&self) -> Result<bool, StoreError> {
        match self.backend {
            Backend::Postgres => sqlx::query_scalar::<_, bool>("SELECT NOT pg_is_in_recovery()")
                .fetch_one(self.pool()?)
                .await
                .map_err(db),
            _ => sqlx::query_scalar::<_, i64>("SELECT version FROM allowlist_version WHERE id = 1")
                .fetch_one(self.pool()?)
                .await
                .map(|_| true)
                .map_err(db),
        }
    }

    async fn allowlist_digests(
        &self,
        after: i64,
        upto: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        sqlx::query(
            "SELECT version, digest FROM allowlist_versions \
             WHERE version > $1 AND version <= $2 ORDER BY version",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(self.pool()?)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("version").map_err(db)?,
                row.try_get("digest").map_err(db)?,
            ))
        })
        .collect()
    }

    async fn claim_job(&self, name: &str, every_ms: i64, by: &str) -> Result<JobClaim, StoreError> {
        jobs::claim(self.pool()?, self.backend, name, every_ms, by).await
    }

    async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        jobs::list(self.pool()?).await
    }

    async fn prune_replicas(&self, silent_secs: i64) -> Result<u64, StoreError> {
        jobs::prune_replicas(self.pool()?, self.backend, silent_secs).await
    }

    async fn prune_allowlist_history(&self, keep: u64) -> Result<u64, StoreError> {
        let mut pruned = 0;
        loop {
            let tx = self.begin_trust_change().await?;
            let (n, done) = trust::prune_history_step(tx, keep).await?;
            pruned += n;
            if done {
                return Ok(pruned);
            }
        }
    }

    async fn prune_single_use(&self, now: UnixSeconds) -> Result<u64, StoreError> {
        Ok(jobs::prune_single_use(self.pool()?, now).await?
            + receipts::prune(self.pool()?, now).await?
            + console::prune(self.pool()?, now).await?)
    }

    async fn command_started(
        &self,
        command: &CommandInFlight,
        request: &AuditEvent,
        at: UnixSeconds,
    ) -> Result<(), StoreError> {
        commands::started(self.pool()?, command, request, at).await
    }

    async fn command_ended(
        &self,
        id: &str,
        outcome: &AuditEvent,
        at: UnixSeconds,
    ) -> Result<bool, StoreError> {
        commands::ended(self.pool()?, id, outcome, at).await
    }

    async fn lost_commands(
        &self,
        silent_secs: Option<i64>,
    ) -> Result<Vec<CommandInFlight>, StoreError> {
        commands::lost(self.pool()?, self.backend, silent_secs).await
    }

    async fn check_token(
        &self,
        appliance_id: &str,
        token_hash: &str,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        receipts::check_token(self.pool()?, appliance_id, token_hash, now).await
    }

    async fn record_issued(
        &self,
        issue: &Issue<'_>,
        now: UnixSeconds,
    ) -> Result<Vec<AllowlistDelta>, StoreError> {
        receipts::record_issued(self, issue, now).await
    }

    async fn find_receipt(
        &self,
        kind: ReceiptKind,
        subject: &str,
        csr_key_sha256: &str,
        now: UnixSeconds,
    ) -> Result<Option<(Receipt, CertRecord)>, StoreError> {
        receipts::find_receipt(self.pool()?, kind, subject, csr_key_sha256, now).await
    }
}
