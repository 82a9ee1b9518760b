//! Running control as a library: [`init`] makes a data directory, [`Started::bind`] opens
//! it and binds its listeners, [`Started::serve`] serves until cancelled. The
//! `tether-control` binary and `tether up` both go through here.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tether_audit::{action, system, Actor, AuditEvent};
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::ca::{Ca, CaBackend, KmsSettings};
use crate::config::ControlConfig;
use crate::store::Store;

/// Create the CA (local key files, or in KMS with `kms`), save `cfg` and create the
/// store in `data_dir`; record `control.init`. Returns the CA and the store.
pub async fn init(
    data_dir: &Path,
    cfg: &ControlConfig,
    kms: Option<KmsSettings>,
) -> anyhow::Result<(Ca, Arc<dyn Store>)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    cfg.validate()?;
    let now_utc = time::OffsetDateTime::now_utc();
    let ca = match kms {
        Some(settings) => Ca::init_kms(data_dir, &crate::ca_config(cfg), &settings, now_utc)?,
        None => Ca::init(data_dir, &crate::ca_config(cfg), now_utc)?,
    };
    cfg.save(data_dir)?;
    let store = crate::open_store(cfg, data_dir).await?;
    let backend = match ca.backend() {
        CaBackend::Local => "local",
        _ => "kms",
    };
    store
        .append_audit(
            &AuditEvent::success(
                Actor::system(system::LOCAL_ADMIN),
                action::CONTROL_INIT,
                cfg.trust_domain.clone(),
            )
            .with("ca_keys", backend),
            crate::now_unix(),
        )
        .await?;
    std::fs::write(data_dir.join("ca").join("root.pem"), ca.root_pem())?;
    Ok((ca, store))
}

/// Control with its listeners bound, ready to [`Started::serve`].
pub struct Started {
    /// What every handler shares.
    pub state: AppState,
    listener: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
}

impl Started {
    /// Open `data_dir` (config, CA, store), renew control's own certificate if it is
    /// close to expiry, and bind the API and metrics listeners (`listen` /
    /// `metrics_listen` override the config).
    pub async fn bind(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        metrics_listen: Option<SocketAddr>,
    ) -> anyhow::Result<Started> {
        let mut cfg = ControlConfig::load(data_dir)?;
        let store = crate::open_store(&cfg, data_dir).await?;
        if let Some(l) = listen {
            cfg.listen = l;
        }
        if let Some(l) = metrics_listen {
            cfg.metrics_listen = l;
        }
        let mut ca = Ca::load(data_dir, &crate::ca_config(&cfg))?;
        ca.ensure_control_leaf(
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(7 * 86_400),
        )?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        // Port 0 picks a free port: bundles and answers must name the real one.
        cfg.listen = listener.local_addr()?;
        let proofs = crate::proof::Verifiers::new(&cfg.proofs)
            .context("building the platform proof verifiers")?;
        let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {} (metrics)", cfg.metrics_listen))?;
        let state = AppState {
            store,
            ca: Arc::new(ca),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            proofs: Arc::new(proofs),
            config: Arc::new(cfg),
            cluster: Arc::new(crate::cluster::Cluster::new()),
        };
        Ok(Started {
            state,
            listener,
            metrics_listener,
        })
    }

    /// The API address.
    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// Serve until `shutdown`: the API, metrics, the overlap sweep and audit checkpoints.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Started {
            state,
            listener,
            metrics_listener,
        } = self;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), listen = %listener.local_addr()?, trust_domain = %state.config.trust_domain, "tether-control serving");
        tracing::info!(listen = %metrics_listener.local_addr()?, "metrics listening (HTTP, /metrics)");
        let metrics_app = crate::metrics::router(state.metrics.clone());
        let metrics_stop = shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(metrics_listener, metrics_app)
                .with_graceful_shutdown(async move { metrics_stop.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
        tokio::spawn(crate::renew::expire_overlaps_forever(
            state.store.clone(),
            state.config.enroll.overlap_sweep,
            shutdown.clone(),
        ));
        let signer = crate::audit_log::checkpoint_signer(&state.ca)
            .context("the control certificate cannot sign audit checkpoints")?;
        tokio::spawn(crate::audit_log::checkpoint_forever(
            state.store.clone(),
            Arc::new(signer),
            state.config.audit.checkpoint_every,
            shutdown.clone(),
        ));
        crate::server::serve(state, listener, shutdown).await
    }
}
