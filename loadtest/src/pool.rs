//! The pool: enrolled appliances kept on disk between runs, together with the control
//! data directory (CA, SQLite store) that knows them and the brokers' data directories,
//! so a second run with the same (or a smaller) fleet enrolls nothing.
//!
//! ```text
//! POOL/
//!   pool.json               marks the folder as a pool (layout, trust domain)
//!   .lock                   held (flock) by the run using the pool
//!   control/                tether-control's data directory
//!   appliances/sim-000001/  each appliance's state directory (key, certificate, CA)
//!   brokers/lt-edge-1/      each broker's data directory
//! ```
//!
//! Getting the pool ready takes two steps around control's start:
//!
//! 1. [`Pool::prepare`], while no control process runs: create control's data directory
//!    on first use, then, straight through the store (as `tether up` does), register each
//!    missing appliance with a one-time token and give each unenrolled broker a bundle.
//!    Doing it before control starts keeps the store single-writer.
//! 2. [`Prepared::enroll`], once control serves: the real enrollment (key made locally,
//!    CSR, challenge, token proof) of each missing appliance over HTTPS, with bounded
//!    concurrency and a progress bar.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use tether_agent::Credentials;
use tether_control::audit::{action, system, Actor, AuditEvent};
use tether_control::store::{Appliance, ApplianceStatus, PlatformBinding, StoreError};
use tether_proto::cluster::BrokerBundle;

use crate::progress::Progress;

/// Trust domain of the simulated fleet.
pub const TRUST_DOMAIN: &str = "loadtest.local";
/// Tenant of the simulated appliances.
pub const TENANT: &str = "loadtest";
/// Layout version written in `pool.json`; a pool of another layout is refused.
const LAYOUT: u64 = 1;
/// Marker file.
const MARKER: &str = "pool.json";
/// Lifetime of the one-time tokens and bundles made for a run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// An appliance whose certificate ends sooner than this enrolls again.
const MIN_CERT_LEFT: Duration = Duration::from_secs(2 * 86_400);

/// Appliance number `i` (1-based).
pub fn appliance_id(i: usize) -> String {
    format!("sim-{i:06}")
}

/// Broker number `i` (1-based).
pub fn broker_name(i: usize) -> String {
    format!("lt-edge-{i}")
}

fn local_admin() -> Actor {
    Actor::system(system::LOCAL_ADMIN)
}

/// An opened, locked pool.
#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    _lock: Flock<File>,
}

impl Pool {
    /// The default pool: `target/loadtest-pool` when this executable lives in a cargo
    /// target directory, else `~/.cache/tether-loadtest/pool`.
    pub fn default_root() -> anyhow::Result<PathBuf> {
        if let Ok(exe) = std::env::current_exe() {
            // target/<profile>/tether-loadtest (or target/<profile>/deps/…)
            for dir in exe.ancestors().skip(1).take(3) {
                if dir.join("CACHEDIR.TAG").is_file() {
                    return Ok(dir.join("loadtest-pool"));
                }
            }
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .context("no HOME: give --pool")?;
        Ok(cache.join("tether-loadtest").join("pool"))
    }

    /// Open (creating) the pool at `root` and lock it for this run.
    pub fn open(root: &Path) -> anyhow::Result<Pool> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let marker = root.join(MARKER);
        let wanted = serde_json::json!({ "layout": LAYOUT, "trust_domain": TRUST_DOMAIN });
        if marker.exists() {
            let seen: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker)?)
                .with_context(|| format!("{} is not valid", marker.display()))?;
            if seen != wanted {
                bail!(
                    "{} was made by another version of tether-loadtest: delete it (rm -r {}) \
                     or choose another --pool",
                    root.display(),
                    root.display()
                );
            }
        } else if std::fs::read_dir(root)?.next().is_some() {
            bail!(
                "{} is not empty and is not a tether-loadtest pool: choose another --pool",
                root.display()
            );
        }
        let lock_path = root.join(".lock");
        let file = File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!(
                "another tether-loadtest is using the pool {} ({e}); wait for it or give another --pool",
                root.display()
            )
        })?;
        if !marker.exists() {
            std::fs::write(&marker, serde_json::to_vec_pretty(&wanted)?)?;
        }
        Ok(Pool {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    /// The pool's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Control's data directory.
    pub fn control_dir(&self) -> PathBuf {
        self.root.join("control")
    }

    /// Appliance `id`'s state directory.
    pub fn appliance_dir(&self, id: &str) -> PathBuf {
        self.root.join("appliances").join(id)
    }

    /// Broker `name`'s data directory.
    pub fn broker_dir(&self, name: &str) -> PathBuf {
        self.root.join("brokers").join(name)
    }

    /// Load the credentials of appliances `1..=n`; `None` where the appliance must
    /// (re-)enroll (never enrolled, unreadable, or its certificate ends within
    /// [`MIN_CERT_LEFT`]).
    pub async fn load(&self, n: usize, progress: &Progress) -> Vec<Option<Credentials>> {
        let dirs: Vec<PathBuf> = (1..=n)
            .map(|i| self.appliance_dir(&appliance_id(i)))
            .collect();
        let bar = progress.bar(n as u64, "loading credentials");
        let bar2 = bar.clone();
        let creds = tokio::task::spawn_blocking(move || {
            let min_end_ms = (tether_control::now_unix() + MIN_CERT_LEFT.as_secs() as i64) * 1000;
            dirs.iter()
                .map(|d| {
                    bar2.inc(1);
                    Credentials::load(d)
                        .ok()
                        .filter(|c| c.not_after_ms() > min_end_ms)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| vec![None; n]);
        bar.finish_and_clear();
        creds
    }

    /// Step 1 (no control process running): create control's data directory on first
    /// use, register the appliances `missing` (1-based numbers) with a one-time token each
    /// and give each of brokers `1..=brokers` not yet enrolled a bundle.
    pub async fn prepare(
        &self,
        missing: &[usize],
        brokers: usize,
        progress: &Progress,
    ) -> anyhow::Result<Prepared> {
        let control = self.control_dir();
        if !control.join(tether_control::config::CONFIG_FILE).exists() {
            let mut cfg = tether_control::config::ControlConfig {
                trust_domain: TRUST_DOMAIN.into(),
                listen: ([127, 0, 0, 1], 0).into(),
                metrics_listen: ([127, 0, 0, 1], 0).into(),
                ips: vec![[127, 0, 0, 1].into()],
                dns_names: vec!["localhost".into()],
                ..Default::default()
            };
            // The whole fleet enrolls from one address: no per-client rate limit.
            cfg.http.public_rate_per_sec = 0;
            println!("creating control's CA and store in {}", control.display());
            tether_control::run::init(&control, &cfg, None)
                .await
                .context("initialising control's data directory")?;
        }
        let cfg = tether_control::config::ControlConfig::load(&control)?;
        let root_pem = std::fs::read_to_string(control.join("ca").join("root.pem"))
            .context("reading control's root CA")?;
        let store = tether_control::open_store(&cfg, &control)
            .await
            .context("opening control's store")?;
        let now = tether_control::now_unix();
        let expires = now + TOKEN_TTL.as_secs() as i64;

        let mut tokens = Vec::with_capacity(missing.len());
        if !missing.is_empty() {
            let bar = progress.bar(missing.len() as u64, "registering appliances");
            for &i in missing {
                let id = appliance_id(i);
                let appliance = Appliance {
                    id: id.clone(),
                    tenant: TENANT.into(),
                    binding: PlatformBinding::TokenOnly,
                    status: ApplianceStatus::Active,
                    manual_renewal_generation: 0,
                    created_at: now,
                };
                let event = AuditEvent::success(local_admin(), action::APPLIANCE_REGISTER, &id)
                    .with("tenant", TENANT);
                match store.register_appliance(&appliance, &event).await {
                    Ok(()) | Err(StoreError::Conflict(_)) => {}
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context(format!("registering {id}")))
                    }
                }
                let token = tether_control::token::Token::generate();
                let hash = token.hash();
                let event = AuditEvent::success(local_admin(), action::TOKEN_CREATE, &id)
                    .with("token_ref", tether_control::audit::token_ref(&hash));
                store
                    .create_token(&id, &hash, expires, now, &event)
                    .await
                    .with_context(|| format!("a token for {id}"))?;
                tokens.push(PendingAppliance {
                    index: i,
                    id,
                    token: token.expose().to_owned(),
                });
                bar.inc(1);
            }
            bar.finish_and_clear();
        }

        let mut bundles = Vec::new();
        for b in 1..=brokers {
            let name = broker_name(b);
            let dir = self.broker_dir(&name);
            std::fs::create_dir_all(&dir)?;
            if dir.join(BROKER_IDENTITY).exists() {
                continue;
            }
            // The control URL is filled in once control listens (see `Prepared::bundle`).
            let bundle = tether_control::brokers::add(
                store.as_ref(),
                "https://127.0.0.1:1".into(),
                root_pem.clone(),
                TRUST_DOMAIN,
                &name,
                TOKEN_TTL,
                local_admin(),
                now,
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => anyhow::anyhow!(
                    "broker {name} is enrolled in control but its data directory {} is gone: \
                     delete the pool ({}) and run again",
                    dir.display(),
                    self.root.display()
                ),
                other => anyhow::Error::from(other).context(format!("adding broker {name}")),
            })?;
            bundles.push(bundle);
        }
        drop(store);
        Ok(Prepared {
            root_pem,
            tokens,
            bundles,
        })
    }
}

/// `broker.json` in a broker's data directory: present once it enrolled.
const BROKER_IDENTITY: &str = "broker.json";

/// An appliance registered with a fresh one-time token, waiting for enrollment.
#[derive(Clone)]
pub struct PendingAppliance {
    /// 1-based number.
    pub index: usize,
    /// Appliance id.
    pub id: String,
    /// The token's secret.
    token: String,
}

impl std::fmt::Debug for PendingAppliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            index,
            id,
            token: _,
        } = self;
        f.debug_struct("PendingAppliance")
            .field("index", index)
            .field("id", id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// What step 1 made, for step 2.
#[derive(Debug)]
pub struct Prepared {
    /// Control's root CA (PEM).
    pub root_pem: String,
    /// Appliances to enroll.
    pub tokens: Vec<PendingAppliance>,
    /// Bundles of the brokers to enroll (control URL still a placeholder).
    bundles: Vec<BrokerBundle>,
}

impl Prepared {
    /// Where broker `name` should start from: `Some(bundle file)` to enroll, written into
    /// `run_dir` with `control_url`; `None` when it is enrolled (its stored control URL is
    /// then updated, as control listens on a new port each run).
    pub fn broker_start(
        &self,
        pool: &Pool,
        name: &str,
        control_url: &str,
        run_dir: &Path,
    ) -> anyhow::Result<Option<PathBuf>> {
        if let Some(bundle) = self.bundles.iter().find(|b| b.name == name) {
            let mut bundle = bundle.clone();
            bundle.control_url = control_url.to_owned();
            let path = run_dir.join(format!("{name}.bundle.json"));
            write_private(&path, &serde_json::to_vec_pretty(&bundle)?)?;
            return Ok(Some(path));
        }
        let path = pool.broker_dir(name).join(BROKER_IDENTITY);
        let mut identity: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{} is not valid", path.display()))?;
        identity["control_url"] = control_url.into();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&identity)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(None)
    }

    /// Step 2 (control serving at `control_url`): enroll every pending appliance, at most
    /// `concurrency` at once.
    pub async fn enroll(
        &self,
        pool: &Pool,
        control_url: &str,
        concurrency: usize,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let bar = progress.bar(self.tokens.len() as u64, "enrolling appliances");
        let started = std::time::Instant::now();
        let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for p in &self.tokens {
            let (limit, bar) = (limit.clone(), bar.clone());
            let opts = tether_agent::enroll::EnrollOptions {
                control_url: control_url.to_owned(),
                ca_pem: self.root_pem.clone().into_bytes(),
                appliance_id: p.id.clone(),
                proof: tether_agent::proof::EnrollProof::Token(p.token.clone()),
                state_dir: pool.appliance_dir(&p.id),
            };
            tasks.spawn(async move {
                let _slot = limit.acquire_owned().await;
                tether_agent::enroll::enroll(&opts)
                    .await
                    .with_context(|| format!("enrolling {}", opts.appliance_id))?;
                bar.inc(1);
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.context("an enrollment task failed")??;
        }
        bar.finish_and_clear();
        println!(
            "enrolled {} appliances in {:.1?}",
            self.tokens.len(),
            started.elapsed()
        );
        Ok(())
    }
}

/// Write a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_order() {
        assert_eq!(appliance_id(7), "sim-000007");
        assert!(appliance_id(99_999) < appliance_id(100_000));
        assert_eq!(broker_name(2), "lt-edge-2");
    }

    #[test]
    fn a_pool_is_locked_by_one_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("open");
        let again = Pool::open(dir.path()).expect_err("second open must fail");
        assert!(again.to_string().contains("another tether-loadtest"));
        drop(pool);
        Pool::open(dir.path()).expect("open after release");
    }

    #[test]
    fn a_foreign_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("precious.txt"), "keep").expect("write");
        let err = Pool::open(dir.path()).expect_err("must refuse");
        assert!(err.to_string().contains("not a tether-loadtest pool"));
    }
}
