//! The Tether broker: a QUIC/mTLS edge server that admits an appliance only if its
//! certificate chains to the fleet CA, names exactly one appliance of our trust domain, and
//! has its SHA-256 fingerprint pinned for that appliance — and that closes live sessions
//! within milliseconds when a fingerprint is removed.
//!
//! # Two modes
//!
//! - **Standalone** (`allowlist.file`, `tls.*`): the allowlist is a text file reloaded on
//!   change; the certificates are files.
//! - **Control** (`control.data_dir`, `--data-dir`): the broker enrolls once with a bundle
//!   from `tether broker add NAME` ([`credential::enroll`]), stores its credential in the
//!   data directory ([`datadir`]), holds a channel to control ([`channel`]) that brings the
//!   allowlist (snapshot, then deltas) and commands and carries presence back, keeps the
//!   last allowlist on disk ([`snapshot`]) to enforce it while control is away, and renews
//!   its own certificate before expiry ([`credential::Renewer`]), hot-swapped
//!   ([`tls::CertStore`]).
//!
//! Both sources apply changes through one function, [`apply_change`].
//!
//! # Layout
//!
//! - [`verifier`] — the client-certificate verifier (chain, identity, pin) and the
//!   [`verifier::VerifiedAppliance`] proof type. Start here.
//! - [`allowlist`] — immutable snapshots behind `ArcSwap`, persistent-map updates, the text
//!   file format and the [`allowlist::AllowlistSource`] trait of the file source.
//! - [`sessions`] — the session table (one session per appliance, supersede, revoke).
//! - [`server`] — the QUIC endpoint: admission control, connection drivers, drain, commands.
//! - [`admin`] — the local HTTP admin API (`/metrics`, `/healthz`, `/v1/sessions`, commands).
//! - [`tls`] — PEM loading, the swappable certificate, rustls/quinn configuration, the UDP
//!   socket.
//! - [`config`] — the TOML configuration and its environment overrides.
//! - [`metrics`] — Prometheus metrics.
//! - Control mode:
//!   - [`channel`] — the cluster channel to control ([`channel::ControlSync`]).
//!   - [`presence`] — session up/down and heartbeats from the drivers to the channel;
//!     manual-renewal generations from the channel to the drivers.
//!   - [`replicas`] — the control replicas a broker holds a channel to, the list kept in
//!     the data directory, and the presence fan-out to every channel.
//!   - [`snapshot`] — the allowlist snapshot file and its background writer.
//!   - [`datadir`] — the data directory's files and atomic writes; bundle parsing.
//!   - [`credential`] — enrollment and renewal of the broker's own certificate.
//!   - [`control_tls`] — how control's certificate is verified (SPIFFE URI, not hostname).
//!
//! The wire protocol itself (frames, codec, session state machine) and the cluster
//! channel's messages are in `tether-proto`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod allowlist;
pub mod channel;
pub mod config;
pub mod control_tls;
pub mod credential;
pub mod datadir;
pub mod metrics;
pub mod presence;
pub mod replicas;
pub mod server;
pub mod sessions;
pub mod snapshot;
pub mod tls;
pub mod tunnel;
pub mod verifier;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::allowlist::{Allowlist, AllowlistSource, Change, ChangeError, FileSource};
use crate::channel::ControlSync;
use crate::config::Config;
use crate::credential::{Renewer, Validity};
use crate::datadir::{DataDir, DataDirError};
use crate::metrics::{Metrics, Outcome};
use crate::presence::Generations;
use crate::server::{Broker, BrokerParts};
use crate::sessions::SessionTable;
use crate::snapshot::SnapshotWriter;
use crate::tls::CertStore;

/// A broker whose sockets are bound, ready to [`Running::serve`].
pub struct Running {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The admin listener.
    pub admin: tokio::net::TcpListener,
    source: Source,
}

/// Where allowlist changes come from.
enum Source {
    File(FileSource),
    Control {
        sync: Box<ControlSync>,
        renewer: Renewer,
        validity: Validity,
    },
}

impl Running {
    /// Load the allowlist (the file, or in control mode the credential and the cached
    /// snapshot, enrolling first if needed), bind the QUIC endpoint and the admin listener.
    /// Fails with a clear message on a bad file, certificate, bundle, refused enrollment or
    /// address.
    pub async fn bind(config: Config) -> anyhow::Result<Running> {
        config.validate()?;
        if config.control_mode() {
            return Running::bind_control(config).await;
        }
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let allowlist = Arc::new(Allowlist::new());
        let file = config
            .allowlist
            .file
            .clone()
            .context("allowlist.file is required")?;
        let entries = allowlist::load_file(&file).context("initial allowlist")?;
        let applied = allowlist.apply(Change::Replace {
            version: None,
            entries,
        })?;
        metrics.allowlist_version.set(applied.version as i64);
        metrics
            .allowlist_entries
            .set(allowlist.snapshot().len() as i64);
        info!(file = %file.display(), entries = allowlist.snapshot().len(), "allowlist loaded");
        let source = Source::File(FileSource::new(file));
        let sessions = Arc::new(SessionTable::new());
        let broker = Broker::bind(config.clone(), allowlist, sessions, metrics)
            .context("cannot start the QUIC endpoint")?;
        Running::finish_bind(broker, source, &config).await
    }

    async fn finish_bind(
        broker: Arc<Broker>,
        source: Source,
        config: &Config,
    ) -> anyhow::Result<Running> {
        let admin = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot bind admin listener {}", config.admin_listen))?;
        info!(
            version = env!("CARGO_PKG_VERSION"),
            quic = %broker.local_addr()?,
            quic_endpoints = config.transport.endpoints,
            tcp = %broker.tcp_addr().map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            admin = %admin.local_addr()?,
            trust_domain = %config.trust_domain,
            mode = if config.control_mode() { "control" } else { "standalone" },
            "tether-broker listening"
        );
        Ok(Running {
            broker,
            admin,
            source,
        })
    }

    /// [`Running::bind`] in control mode: enroll if the data directory has no credential
    /// yet, check the stored one, enforce the allowlist snapshot from disk until control
    /// sends its own, and prepare the cluster channel and the renewer.
    async fn bind_control(mut config: Config) -> anyhow::Result<Running> {
        let dir_path = config
            .control
            .data_dir
            .clone()
            .context("control.data_dir is required in control mode")?;
        let dir = DataDir::open(&dir_path)?;
        let now = presence::unix_secs(SystemTime::now());
        enroll_if_needed(&config, &dir, now).await?;
        let stored = dir.load()?;
        let identity = stored.identity.clone();
        if !config.trust_domain.is_empty() && config.trust_domain != identity.trust_domain {
            anyhow::bail!(
                "trust_domain {} differs from the stored credential's {}",
                config.trust_domain,
                identity.trust_domain
            );
        }
        config.trust_domain = identity.trust_domain.clone();
        let validity = unexpired_validity(&stored, &dir, now)?;
        let provider = tls::provider();
        let cert = Arc::new(
            CertStore::new(stored.chain, stored.key, &provider)
                .context("stored broker certificate and key")?,
        );
        let metrics = Arc::new(Metrics::new());
        metrics.allowlist_stale.set(1);
        let allowlist = Arc::new(Allowlist::new());
        let snapshot_path = dir.path(datadir::SNAPSHOT_FILE);
        let journal_path = dir.path(datadir::REVOKED_JOURNAL_FILE);
        let snapshot_saved_at =
            enforce_saved_snapshot(&snapshot_path, &journal_path, &allowlist, &metrics, now)?;
        let (presence, presence_rx) = presence::channel(metrics.clone());
        let config = Arc::new(config);
        let broker = Broker::bind_parts(
            config.clone(),
            BrokerParts {
                ca: stored.ca.clone(),
                cert: cert.clone(),
                allowlist: allowlist.clone(),
                sessions: Arc::new(SessionTable::new()),
                metrics: metrics.clone(),
                presence,
                generations: Arc::new(Generations::new()),
            },
        )
        .context("cannot start the QUIC endpoint")?;
        let quic_addr = advertised_addr(&config, broker.local_addr()?);
        let verifier = Arc::new(crate::control_tls::control_verifier(
            &stored.ca,
            &identity.trust_domain,
        )?);
        let sync = ControlSync {
            broker: broker.clone(),
            identity: identity.clone(),
            verifier: verifier.clone(),
            presence: presence_rx,
            writer: SnapshotWriter::spawn(snapshot_path, journal_path, allowlist),
            quic_addr: quic_addr.clone(),
            snapshot_saved_at,
            replicas_file: dir.path(crate::replicas::REPLICAS_FILE),
            drain: CancellationToken::new(),
        };
        let renewer = Renewer {
            identity: identity.clone(),
            verifier,
            cert,
            dir,
            metrics,
        };
        info!(broker = %identity.name, control = %identity.control_url, advertise = %quic_addr,
            not_after = validity.not_after, "control mode");
        Running::finish_bind(
            broker,
            Source::Control {
                sync: Box::new(sync),
                renewer,
                validity,
            },
            &config,
        )
        .await
    }

    /// Serve until `shutdown`, or until control asks for a drain
    /// ([`tether_proto::cluster::ToBroker::Drain`], `tether broker drain NAME`); then drain
    /// (the same path for both) and return.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Running {
            broker,
            admin,
            source,
        } = self;
        // Control's drain request stops this broker, never the caller's token.
        let shutdown = shutdown.child_token();
        let admin_shutdown = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(admin, broker.clone(), admin_shutdown.clone()));
        let sync_shutdown = CancellationToken::new();
        let sync_tasks = match source {
            Source::File(file) => vec![tokio::spawn(follow(file, broker.clone()))],
            Source::Control {
                mut sync,
                renewer,
                validity,
            } => vec![
                tokio::spawn({
                    sync.drain = shutdown.clone();
                    sync.run(sync_shutdown.clone())
                }),
                tokio::spawn(renewer.run(validity, sync_shutdown.clone())),
            ],
        };
        broker.clone().serve(shutdown).await;
        // The channel stayed up through the drain, so control saw every session leave.
        sync_shutdown.cancel();
        for t in sync_tasks {
            // The channel closes itself cleanly on cancel; give it a moment, then stop it.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        admin_shutdown.cancel();
        match admin_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "admin listener failed"),
            Err(e) => error!(error = %e, "admin task failed"),
        }
        info!("tether-broker stopped");
        Ok(())
    }
}

/// Enroll with the bundle `control.bundle` unless `dir` holds a credential already (the
/// bundle is then ignored).
async fn enroll_if_needed(config: &Config, dir: &DataDir, now: u64) -> anyhow::Result<()> {
    if dir.is_enrolled() {
        if let Some(bundle) = &config.control.bundle {
            info!(bundle = %bundle.display(), dir = %dir.root().display(),
                "a broker credential is already stored: the bundle is ignored");
        }
        return Ok(());
    }
    let path = config
        .control
        .bundle
        .clone()
        .ok_or_else(|| DataDirError::NotEnrolled(dir.root().to_path_buf()))?;
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read bundle {}", path.display()))?;
    let bundle = datadir::parse_bundle(&bytes, now)
        .with_context(|| format!("unusable bundle {}", path.display()))?;
    info!(broker = %bundle.name, control = %bundle.control_url, "enrolling with control");
    credential::enroll(&bundle, dir)
        .await
        .with_context(|| format!("enrollment with {} failed", bundle.control_url))?;
    Ok(())
}

/// The validity of the stored broker certificate, which must not have expired at `now`.
fn unexpired_validity(
    stored: &datadir::StoredCredential,
    dir: &DataDir,
    now: u64,
) -> anyhow::Result<Validity> {
    let leaf = stored
        .chain
        .first()
        .context("broker.pem holds no certificate")?;
    let validity = credential::leaf_validity(leaf)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.path(datadir::CERT_FILE).display()))?;
    if now >= validity.not_after {
        anyhow::bail!(
            "the broker certificate in {} expired at {} (Unix seconds): enroll again with a new \
             bundle (remove {} and start with --bundle)",
            dir.path(datadir::CERT_FILE).display(),
            validity.not_after,
            dir.path(datadir::IDENTITY_FILE).display()
        );
    }
    Ok(validity)
}

/// Enforce the allowlist snapshot saved on disk, if there is a usable one, less the
/// revocations journaled after it, until control confirms or replaces it. Returns when it
/// was saved (Unix seconds).
fn enforce_saved_snapshot(
    snapshot_path: &std::path::Path,
    journal_path: &std::path::Path,
    allowlist: &Allowlist,
    metrics: &Metrics,
    now: u64,
) -> anyhow::Result<Option<u64>> {
    let mut saved = match snapshot::load(snapshot_path) {
        Ok(Some(saved)) => saved,
        Ok(None) => {
            info!("no allowlist snapshot on disk: admitting no one until control sends one");
            return Ok(None);
        }
        Err(e) => {
            error!(error = %e, file = %snapshot_path.display(),
                "allowlist snapshot unusable: admitting no one until control sends one");
            return Ok(None);
        }
    };
    // Removals recorded after this snapshot was written (a crash inside the coalescing
    // interval) still hold: never admit what was revoked.
    match snapshot::load_journal(journal_path) {
        Ok(journal) => {
            let later = snapshot::removals_after(&journal, saved.version);
            // Keep only what the next start needs (crash-safe: an atomic rewrite).
            if let Err(e) = snapshot::compact_journal(journal_path, saved.version) {
                warn!(error = %e, file = %journal_path.display(), "cannot compact the revocation journal");
            }
            if !later.is_empty() {
                let before = saved.entries.len();
                saved.entries.retain(|e| !later.contains(&e.fingerprint));
                warn!(
                    snapshot_version = saved.version,
                    removed = before - saved.entries.len(),
                    "applied revocations journaled after the snapshot"
                );
            }
        }
        Err(e) => {
            error!(error = %e, file = %journal_path.display(),
                "revocation journal unusable: admitting no one until control sends the allowlist");
            saved.entries.clear();
        }
    }
    let entries = saved.entries.len();
    let applied = allowlist.apply(Change::Replace {
        version: Some(saved.version),
        entries: saved.entries,
    })?;
    metrics.allowlist_version.set(applied.version as i64);
    metrics.allowlist_entries.set(entries as i64);
    warn!(
        version = saved.version,
        entries,
        saved_at = saved.saved_at,
        age_secs = now.saturating_sub(saved.saved_at),
        "enforcing the allowlist snapshot from disk (stale until control confirms it)"
    );
    Ok(Some(saved.saved_at))
}

/// The QUIC address reported to control: `control.advertise`, else the bound address with
/// an unspecified IP replaced by `127.0.0.1`.
pub fn advertised_addr(config: &Config, bound: SocketAddr) -> String {
    if let Some(a) = &config.control.advertise {
        return a.clone();
    }
    let mut addr = bound;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr.to_string()
}

/// What [`apply_change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeReport {
    /// The version now in force.
    pub version: u64,
    /// Live sessions closed because their fingerprint was removed.
    pub sessions_closed: usize,
    /// The fingerprints removed.
    pub removed: Vec<allowlist::Fingerprint>,
}

/// Apply one allowlist change, whatever its source: swap it in, close the live sessions of
/// removed fingerprints as revoked, update the metrics, log. A change that fails keeps the
/// snapshot in force (and is counted and logged).
pub fn apply_change(
    broker: &Broker,
    source: &'static str,
    change: Change,
) -> Result<ChangeReport, ChangeError> {
    let metrics = broker.metrics();
    let started = Instant::now();
    match broker.allowlist().apply(change) {
        Ok(applied) => {
            let closed = broker.sessions().close_revoked(&applied.removed, metrics);
            let elapsed = started.elapsed();
            metrics
                .allowlist_apply_seconds
                .observe(elapsed.as_secs_f64());
            let snap = broker.allowlist().snapshot();
            metrics.allowlist_version.set(applied.version as i64);
            metrics.allowlist_entries.set(snap.len() as i64);
            metrics
                .allowlist_reloads
                .get_or_create(&Outcome { result: "ok" })
                .inc();
            info!(
                source,
                version = applied.version,
                entries = snap.len(),
                added = applied.added,
                removed = applied.removed.len(),
                sessions_closed = closed,
                apply_us = elapsed.as_micros() as u64,
                "allowlist updated"
            );
            Ok(ChangeReport {
                version: applied.version,
                sessions_closed: closed,
                removed: applied.removed.iter().map(|e| e.fingerprint).collect(),
            })
        }
        Err(e) => {
            refused(broker, source, &e.to_string());
            Err(e)
        }
    }
}

fn refused(broker: &Broker, source: &'static str, error: &str) {
    broker
        .metrics()
        .allowlist_reloads
        .get_or_create(&Outcome { result: "error" })
        .inc();
    error!(
        source,
        error,
        version = broker.allowlist().snapshot().version(),
        "allowlist change refused; the previous snapshot stays in force"
    );
}

/// Apply every change from `source`, closing the live sessions of removed fingerprints.
/// A change that fails keeps the snapshot in force.
pub async fn follow<S: AllowlistSource>(mut source: S, broker: Arc<Broker>) {
    while let Some(change) = source.next_change().await {
        match change {
            Ok(change) => {
                let _ = apply_change(&broker, source.name(), change);
            }
            Err(e) => refused(&broker, source.name(), &e.to_string()),
        }
    }
}
