//! The Tether broker: a QUIC/mTLS edge server that admits an appliance only if its
//! certificate chains to the fleet CA, names exactly one appliance of our trust domain, and
//! has its SHA-256 fingerprint pinned for that appliance — and that closes live sessions
//! within milliseconds when a fingerprint is removed.
//!
//! # Layout
//!
//! - [`verifier`] — the client-certificate verifier (chain, identity, pin) and the
//!   [`verifier::VerifiedAppliance`] proof type. Start here.
//! - [`allowlist`] — immutable snapshots behind `ArcSwap`, persistent-map updates, the text
//!   file format and the [`allowlist::AllowlistSource`] trait that control sync plugs into.
//! - [`sessions`] — the session table (one session per appliance, supersede, revoke).
//! - [`server`] — the QUIC endpoint: admission control, connection drivers, drain, commands.
//! - [`admin`] — the local HTTP admin API (`/metrics`, `/healthz`, `/v1/sessions`, commands).
//! - [`tls`] — PEM loading, rustls/quinn configuration, the UDP socket.
//! - [`config`] — the TOML configuration and its environment overrides.
//! - [`metrics`] — Prometheus metrics.
//!
//! The wire protocol itself (frames, codec, session state machine) is in `tether-proto`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod allowlist;
pub mod config;
pub mod metrics;
pub mod server;
pub mod sessions;
pub mod tls;
pub mod verifier;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::allowlist::{Allowlist, AllowlistSource, Change, FileSource};
use crate::config::Config;
use crate::metrics::{Metrics, Outcome};
use crate::server::Broker;
use crate::sessions::SessionTable;

/// A broker whose sockets are bound, ready to [`Running::serve`].
pub struct Running {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The admin listener.
    pub admin: tokio::net::TcpListener,
    source: FileSource,
}

impl Running {
    /// Load the allowlist, bind the QUIC endpoint and the admin listener. Fails with a
    /// clear message on a bad file, certificate or address.
    pub async fn bind(config: Config) -> anyhow::Result<Running> {
        config.validate()?;
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
        let source = FileSource::new(file);
        let sessions = Arc::new(SessionTable::new());
        let broker = Broker::bind(config.clone(), allowlist, sessions, metrics)
            .context("cannot start the QUIC endpoint")?;
        let admin = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot bind admin listener {}", config.admin_listen))?;
        info!(
            version = env!("CARGO_PKG_VERSION"),
            quic = %broker.local_addr()?,
            admin = %admin.local_addr()?,
            trust_domain = %config.trust_domain,
            "tether-broker listening"
        );
        Ok(Running {
            broker,
            admin,
            source,
        })
    }

    /// Serve until `shutdown`, then drain.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Running {
            broker,
            admin,
            source,
        } = self;
        let admin_shutdown = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(admin, broker.clone(), admin_shutdown.clone()));
        let sync_task = tokio::spawn(follow(source, broker.clone()));
        broker.clone().serve(shutdown).await;
        sync_task.abort();
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

/// Apply every change from `source`, closing the live sessions of removed fingerprints.
/// A change that fails keeps the snapshot in force.
pub async fn follow<S: AllowlistSource>(mut source: S, broker: Arc<Broker>) {
    let metrics = broker.metrics().clone();
    while let Some(change) = source.next_change().await {
        let started = Instant::now();
        let result = change
            .map_err(|e| e.to_string())
            .and_then(|c| broker.allowlist().apply(c).map_err(|e| e.to_string()));
        match result {
            Ok(applied) => {
                let closed = broker.sessions().close_revoked(&applied.removed, &metrics);
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
                    source = source.name(),
                    version = applied.version,
                    entries = snap.len(),
                    added = applied.added,
                    removed = applied.removed.len(),
                    sessions_closed = closed,
                    apply_us = elapsed.as_micros() as u64,
                    "allowlist updated"
                );
            }
            Err(e) => {
                metrics
                    .allowlist_reloads
                    .get_or_create(&Outcome { result: "error" })
                    .inc();
                error!(
                    source = source.name(),
                    error = %e,
                    version = broker.allowlist().snapshot().version(),
                    "allowlist change refused; the previous snapshot stays in force"
                );
            }
        }
    }
}
