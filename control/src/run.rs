//! Wiring: running control as a library. [`init`] makes a data directory,
//! [`Started::bind`] opens it (config, store, CA, proof verifiers, cluster) and binds its
//! listeners, [`Started::serve`] serves until cancelled (the HTTP server, the metrics
//! listener, the replica heartbeat and the periodic jobs of [`crate::jobs`]). The `tether-control` binary and
//! `tether up` both go through here.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tether_audit::{action, system, Actor, AuditEvent};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::ControlConfig;
use crate::domain::ca::{Ca, CaBackend, KmsSettings};
use crate::domain::proof::Verifiers;
use crate::domain::replica;
use crate::domain::{Context as Domain, Fleet};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::store::{ControlMeta, ReplicaInfo, Store};

/// The state the HTTP layer shares for `cfg`: the domain over `store`, `ca` and `proofs`,
/// a new cluster (the domain's [`Fleet`]) and new metrics.
pub fn app_state(
    cfg: &ControlConfig,
    store: Arc<dyn Store>,
    ca: Arc<Ca>,
    proofs: Arc<Verifiers>,
) -> AppState {
    let cluster = Arc::new(Cluster::new());
    let fleet: Arc<dyn Fleet> = cluster.clone();
    AppState {
        domain: Domain {
            store,
            ca,
            proofs,
            settings: Arc::new(cfg.domain_settings()),
            fleet,
        },
        http: Arc::new(cfg.http.clone()),
        shutdown: cfg.shutdown.clone(),
        metrics: Arc::new(Metrics::new()),
        cluster,
        replica_id: Arc::from(""),
        console_origin: None,
    }
}

/// Open (and migrate) the store the config names.
pub async fn open_store(
    cfg: &ControlConfig,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, crate::store::StoreError> {
    let url = cfg.database_url(data_dir);
    Ok(Arc::new(crate::store::sql::SqlStore::connect(&url).await?))
}

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
        Some(settings) => Ca::init_kms(data_dir, &cfg.ca_config(), &settings, now_utc)?,
        None => Ca::init(data_dir, &cfg.ca_config(), now_utc)?,
    };
    cfg.save(data_dir)?;
    let store = open_store(cfg, data_dir).await?;
    replica::claim_database(store.as_ref(), &control_meta(&ca), crate::now_unix())
        .await
        .context("recording what the database belongs to")?;
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

/// What a database serving `ca` must record (`control_meta`).
pub fn control_meta(ca: &Ca) -> ControlMeta {
    ControlMeta {
        trust_domain: ca.trust_domain().to_owned(),
        root_fingerprint: replica::root_fingerprint(ca.root_der()),
    }
}

/// Control with its listeners bound, ready to [`Started::serve`].
pub struct Started {
    /// What every handler shares.
    pub state: AppState,
    /// The configuration in force (`listen` is the bound address).
    pub config: ControlConfig,
    /// This replica as it registered itself.
    pub replica: ReplicaInfo,
    /// PostgreSQL: the change doorbell (NOTIFY listener and poller) to run.
    doorbell: Option<crate::store::sql::notify::Doorbell>,
    /// PostgreSQL: the reachability probe to run (503 at once while the database is down).
    reach_probe: Option<crate::store::sql::reach::ReachProbe>,
    listener: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    console_listener: Option<tokio::net::TcpListener>,
}

/// What the command line (flags, `TETHER_CONTROL_*` variables) overrides in
/// `control.toml` when binding.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `listen`.
    pub listen: Option<SocketAddr>,
    /// `metrics_listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// `database_url`.
    pub database_url: Option<String>,
    /// `[console] listen` (turns the console on).
    pub console_listen: Option<SocketAddr>,
    /// `[console] origin`.
    pub console_origin: Option<String>,
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
        Self::bind_to(data_dir, listen, metrics_listen, None).await
    }

    /// [`Started::bind`], with `database_url` overriding the config's too.
    pub async fn bind_to(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        metrics_listen: Option<SocketAddr>,
        database_url: Option<String>,
    ) -> anyhow::Result<Started> {
        Self::bind_with(
            data_dir,
            Overrides {
                listen,
                metrics_listen,
                database_url,
                ..Overrides::default()
            },
        )
        .await
    }

    /// [`Started::bind`] with `overrides` over the config.
    pub async fn bind_with(data_dir: &Path, overrides: Overrides) -> anyhow::Result<Started> {
        let Overrides {
            listen,
            metrics_listen,
            database_url,
            console_listen,
            console_origin,
        } = overrides;
        let mut cfg = ControlConfig::load(data_dir)?;
        if database_url.is_some() {
            cfg.database_url = database_url;
        }
        if console_listen.is_some() {
            cfg.console.listen = console_listen;
        }
        if console_origin.is_some() {
            cfg.console.origin = console_origin;
        }
        // A relative archive directory is under the data directory.
        cfg.audit.archive_dir = cfg.audit.archive_dir.take().map(|d| data_dir.join(d));
        cfg.console.validate()?;
        let url = cfg.database_url(data_dir);
        let sql = crate::store::sql::SqlStore::connect(&url).await?;
        let postgres = sql.backend() == crate::store::sql::Backend::Postgres;
        let listen_url = cfg.replica.notify.then(|| {
            cfg.replica
                .listen_database_url
                .clone()
                .unwrap_or(url.clone())
        });
        let doorbell = sql.doorbell(listen_url);
        let reach_probe = sql.reach_probe(url);
        let single_node = sql.backend() == crate::store::sql::Backend::Sqlite;
        let store: Arc<dyn Store> = Arc::new(sql);
        if let Some(l) = listen {
            cfg.listen = l;
        }
        if let Some(l) = metrics_listen {
            cfg.metrics_listen = l;
        }
        let mut ca = Ca::load(data_dir, &cfg.ca_config())?;
        // Before anything else touches the database: is it this CA's?
        replica::claim_database(store.as_ref(), &control_meta(&ca), crate::now_unix()).await?;
        let replica_id = replica::replica_id(data_dir)?;
        ca.ensure_control_leaf(
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(7 * 86_400),
        )?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        // Port 0 picks a free port: bundles and answers must name the real one.
        cfg.listen = listener.local_addr()?;
        let proofs =
            Verifiers::new(&cfg.proofs).context("building the platform proof verifiers")?;
        let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {} (metrics)", cfg.metrics_listen))?;
        let console_listener = match cfg.console.listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (console)"))?;
                cfg.console.listen = Some(l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let mut state = app_state(&cfg, store, Arc::new(ca), Arc::new(proofs));
        state.replica_id = Arc::from(replica_id.as_str());
        state.console_origin = cfg
            .console
            .listen
            .map(|bound| Arc::from(cfg.console.origin_for(bound)));
        let replica = ReplicaInfo {
            id: replica_id,
            advertise: cfg
                .replica
                .advertise
                .clone()
                .unwrap_or_else(|| cfg.listen.to_string()),
            api_addr: cfg.listen.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        if postgres && Ca::root_key_present(data_dir) {
            tracing::warn!(
                code = "root_key_on_replica",
                path = %data_dir.join("ca").join("root.key").display(),
                "the root CA key is on a replica serving a shared PostgreSQL database: it only \
                 signs intermediates, so move it offline (`tether-control ca export \
                 --no-root-key` makes a replica's data directory without it)"
            );
        }
        if postgres && replica::is_wildcard_advertise(&replica.advertise) {
            tracing::warn!(
                code = "wildcard_advertise",
                advertise = %replica.advertise,
                "this replica advertises a wildcard address, which brokers cannot dial: set \
                 [replica] advertise to an address they reach"
            );
        }
        state
            .domain
            .store
            .replica_heartbeat(&replica, true)
            .await
            .context("registering the replica")?;
        if single_node {
            // One process per SQLite store: a command still in flight at start was relayed
            // by a previous process that crashed.
            let n = crate::domain::exec::abandon_lost(
                state.domain.store.as_ref(),
                None,
                &replica.id,
                crate::now_unix(),
            )
            .await
            .context("abandoning the commands of a previous process")?;
            if n > 0 {
                tracing::warn!(
                    commands = n,
                    "commands of a previous process abandoned (replica_lost)"
                );
            }
        }
        crate::fault::announce();
        Ok(Started {
            state,
            replica,
            doorbell,
            reach_probe,
            config: cfg,
            listener,
            metrics_listener,
            console_listener,
        })
    }

    /// The console's address, when it is on.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The console's origin (`https://host:port`), when it is on.
    pub fn console_origin(&self) -> Option<String> {
        self.state.console_origin.as_deref().map(str::to_owned)
    }

    /// The API address.
    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// Serve until `shutdown`: the API, metrics, the heartbeat and the periodic jobs
    /// ([`crate::jobs`]: overlap sweep, audit checkpoints, pruning), each claimed once per
    /// period across the replicas sharing the database.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Started {
            state,
            replica,
            doorbell,
            reach_probe,
            config,
            listener,
            metrics_listener,
            console_listener,
        } = self;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), replica = %replica.id, advertise = %replica.advertise, listen = %listener.local_addr()?, trust_domain = %config.trust_domain, "tether-control serving");
        tracing::info!(listen = %metrics_listener.local_addr()?, "metrics listening (HTTP, /metrics, /healthz, /readyz)");
        let ready_store = state.domain.store.clone();
        let metrics_app = crate::metrics::router(state.metrics.clone()).route(
            "/readyz",
            axum::routing::get(move || {
                let store = ready_store.clone();
                async move {
                    use axum::http::StatusCode;
                    match replica::readiness(store.as_ref()).await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        );
        let metrics_stop = shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(metrics_listener, metrics_app)
                .with_graceful_shutdown(async move { metrics_stop.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
        let replica_id = replica.id.clone();
        if let Some(doorbell) = doorbell {
            tokio::spawn(doorbell.run(state.metrics.clone(), shutdown.clone()));
        }
        if let Some(probe) = reach_probe {
            tokio::spawn(probe.run(state.metrics.clone(), shutdown.clone()));
        }
        tokio::spawn(replica::heartbeat_forever(
            state.domain.store.clone(),
            replica,
            state.domain.fleet.clone(),
            shutdown.clone(),
        ));
        let signer = crate::domain::audit::checkpoint_signer(&state.domain.ca)
            .context("the control certificate cannot sign audit checkpoints")?;
        crate::jobs::spawn_all(
            state.domain.store.clone(),
            &replica_id,
            Arc::new(signer),
            crate::jobs::JobPeriods {
                overlap_sweep: config.enroll.overlap_sweep,
                audit_checkpoint: config.audit.checkpoint_every,
                abandon_commands: config.replica.abandon_commands_every,
                lost_after: config.replica.lost_after,
                allowlist_history: config.trust.allowlist_history,
            },
            archive_plan(&config, &state.domain.ca)?,
            &shutdown,
        );
        if let (Some(l), Some(origin)) = (console_listener, state.console_origin.clone()) {
            let (chain, key) = crate::console::server::certificate(&config.console, &state)?;
            let tls = crate::console::server::tls_config(&chain, &key)
                .context("the console's certificate")?;
            let console = crate::console::ConsoleState::new(
                state.clone(),
                origin.to_string(),
                config.console.policy(),
                shutdown.clone(),
            );
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::console::server::serve(console, tls, l, stop).await {
                    tracing::error!(error = %e, "console listener failed");
                }
            });
        }
        crate::http::server::serve(state, listener, shutdown).await
    }
}

/// Automatic archiving's plan, when `[audit] archive_dir` is set.
fn archive_plan(
    config: &ControlConfig,
    ca: &Ca,
) -> anyhow::Result<Option<crate::jobs::ArchivePlan>> {
    let Some(dir) = config.audit.archive_dir.clone() else {
        return Ok(None);
    };
    let root = rustls::pki_types::CertificateDer::from(ca.root_der().to_vec());
    let verifier = tether_audit::checkpoint::CheckpointVerifier::new(&[root], &config.trust_domain)
        .context("audit archiving: the checkpoint verifier")?;
    Ok(Some(crate::jobs::ArchivePlan {
        dir,
        keep: config.audit.archive_keep,
        every: config.audit.archive_every,
        verifier,
    }))
}
