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
//!   operator/               the operator credential of `commands` and `revoke`
//! ```
//!
//! An appliance `revoke` revoked has a `revoked` file in its state directory (written
//! before the revocation is sent): the next run registers a fresh token for it and
//! enrolls it again (control accepts a token for a revoked appliance).
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
use tether_api::appliances::{ApplianceStatus, PlatformBinding};
use tether_api::brokers::BrokerBundle;
use tether_api::operators::{Bundle as OperatorBundle, LoginRequest, LoginResponse};
use tether_audit::{action, system, Actor, AuditEvent};
use tether_control::store::{Appliance, StoreError};

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

/// File in an appliance's state directory: control revoked it (it must enroll again).
const REVOKED_MARK: &str = "revoked";
/// `operator.json` in `operator/`: who the stored operator is and until when.
const OPERATOR_FILE: &str = "operator.json";
/// The stored operator certificate is renewed (a new invite) when it ends sooner than this.
const MIN_OPERATOR_LEFT: Duration = Duration::from_secs(3600);
/// Name prefix of the operators the pool invites.
const OPERATOR_PREFIX: &str = "loadtest";

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

    /// Mark appliance `id` revoked: the next run enrolls it again.
    pub fn mark_revoked(&self, id: &str) -> anyhow::Result<()> {
        let path = self.appliance_dir(id).join(REVOKED_MARK);
        std::fs::write(&path, b"revoked by tether-loadtest\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The operator credential's folder.
    pub fn operator_dir(&self) -> PathBuf {
        self.root.join("operator")
    }

    /// The stored operator credential, if any and not ending within an hour.
    pub fn load_operator(&self) -> Option<OperatorCredential> {
        let dir = self.operator_dir();
        let meta: OperatorMeta =
            serde_json::from_slice(&std::fs::read(dir.join(OPERATOR_FILE)).ok()?).ok()?;
        let not_after = parse_rfc3339(&meta.expires_at)?;
        if not_after < tether_control::now_unix() + MIN_OPERATOR_LEFT.as_secs() as i64 {
            return None;
        }
        Some(OperatorCredential {
            name: meta.name,
            cert_pem: std::fs::read_to_string(dir.join("cert.pem")).ok()?,
            key_pem: std::fs::read_to_string(dir.join("key.pem")).ok()?,
        })
    }

    /// Load the credentials of appliances `1..=n`; `None` where the appliance must
    /// (re-)enroll (never enrolled, unreadable, revoked by an earlier run, or its
    /// certificate ends within [`MIN_CERT_LEFT`]).
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
                    if d.join(REVOKED_MARK).exists() {
                        return None;
                    }
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
    /// and give each of brokers `1..=brokers` not yet enrolled a bundle. With `operator`
    /// and no stored operator credential: the bundles to redeem for one (control's
    /// `admin-bundle.json` when there is one, then a fresh invite).
    pub async fn prepare(
        &self,
        missing: &[usize],
        brokers: usize,
        operator: bool,
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
        let store = tether_control::run::open_store(&cfg, &control)
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
                let token = tether_control::domain::token::Token::generate();
                let hash = token.hash();
                let event = AuditEvent::success(local_admin(), action::TOKEN_CREATE, &id)
                    .with("token_ref", tether_audit::token_ref(&hash));
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
            let bundle = tether_control::domain::brokers::add(
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
        let mut operator_bundles = Vec::new();
        if operator && self.load_operator().is_none() {
            let admin = control.join("admin-bundle.json");
            if let Some(b) = std::fs::read(&admin)
                .ok()
                .and_then(|t| serde_json::from_slice::<OperatorBundle>(&t).ok())
                .filter(|b| parse_rfc3339(&b.expires_at).is_some_and(|e| e > now))
            {
                operator_bundles.push(b);
            }
            // If the admin bundle was used already (or there is none): a fresh invite,
            // made through the store as everything above.
            let bundle = tether_control::domain::operators::create_invite(
                store.as_ref(),
                "https://127.0.0.1:1".into(),
                root_pem.clone(),
                &format!("{OPERATOR_PREFIX}-{now}"),
                tether_api::operators::Role::Admin,
                TOKEN_TTL,
                local_admin(),
                now,
            )
            .await
            .context("inviting the load test's operator")?;
            operator_bundles.push(bundle);
        }
        drop(store);
        Ok(Prepared {
            root_pem,
            tokens,
            bundles,
            operator_bundles,
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
    pub(crate) token: String,
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
    /// Operator bundles to redeem, in order, when no operator credential is stored.
    operator_bundles: Vec<OperatorBundle>,
}

/// An operator's certificate and key, PEM.
#[derive(Clone)]
pub struct OperatorCredential {
    /// The operator's name.
    pub name: String,
    /// Leaf then intermediate.
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
}

impl std::fmt::Debug for OperatorCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorCredential")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `operator/operator.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct OperatorMeta {
    name: String,
    expires_at: String,
}

/// RFC 3339 → Unix seconds.
fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// The 1-based numbers of the appliances [`Pool::load`] found nothing usable for.
pub fn missing(creds: &[Option<Credentials>]) -> Vec<usize> {
    creds
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_none())
        .map(|(i, _)| i + 1)
        .collect()
}

impl Prepared {
    /// After [`Prepared::enroll`]: load the credentials just enrolled into their places
    /// in `creds`, and return the whole fleet's.
    pub fn fill(
        &self,
        pool: &Pool,
        creds: &mut [Option<Credentials>],
    ) -> anyhow::Result<Vec<Credentials>> {
        for p in &self.tokens {
            let dir = pool.appliance_dir(&p.id);
            creds[p.index - 1] = Some(
                Credentials::load(&dir)
                    .with_context(|| format!("loading the new credential in {}", dir.display()))?,
            );
        }
        creds
            .iter_mut()
            .map(|c| {
                c.take()
                    .context("an appliance neither in the pool nor enrolled")
            })
            .collect()
    }

    /// Appliances registered through an existing control's API (`--control`): nothing
    /// else to enroll.
    pub fn remote(root_pem: String, tokens: Vec<PendingAppliance>) -> Prepared {
        Prepared {
            root_pem,
            tokens,
            bundles: Vec::new(),
            operator_bundles: Vec::new(),
        }
    }

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

    /// The operator credential (control serving at `control_url`): the stored one, else
    /// the first bundle that redeems (key and CSR made here, `POST /v1/operators/login`,
    /// as `tether login` does), then stored in the pool for the next runs.
    pub async fn operator(
        &self,
        pool: &Pool,
        control_url: &str,
    ) -> anyhow::Result<OperatorCredential> {
        if let Some(c) = pool.load_operator() {
            return Ok(c);
        }
        let http = tether_agent::enroll::http_client(self.root_pem.as_bytes())
            .context("control's root CA")?;
        let mut last = anyhow::anyhow!("no operator bundle to redeem");
        for bundle in &self.operator_bundles {
            let (key_pem, csr_pem) = tether_agent::enroll::key_and_csr(&bundle.name)
                .context("generating the operator key")?;
            let resp = http
                .post(format!("{control_url}/v1/operators/login"))
                .json(&LoginRequest {
                    token: bundle.token.clone(),
                    csr_pem,
                })
                .send()
                .await;
            let resp = match resp {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    last = anyhow::anyhow!(
                        "operator login as {} refused: {status} {body}",
                        bundle.name
                    );
                    continue;
                }
                Err(e) => {
                    last = anyhow::Error::from(e).context("operator login");
                    continue;
                }
            };
            let login: LoginResponse = resp.json().await.context("operator login answer")?;
            let dir = pool.operator_dir();
            std::fs::create_dir_all(&dir)?;
            // Key first: a certificate never sits next to a key it does not match.
            write_private(&dir.join("key.pem"), key_pem.as_bytes())?;
            write_private(&dir.join("cert.pem"), login.certificate_pem.as_bytes())?;
            write_private(
                &dir.join(OPERATOR_FILE),
                &serde_json::to_vec_pretty(&OperatorMeta {
                    name: login.name.clone(),
                    expires_at: login.expires_at.clone(),
                })?,
            )?;
            println!(
                "operator {} logged in (certificate until {}), kept in {}",
                login.name,
                login.expires_at,
                dir.display()
            );
            return Ok(OperatorCredential {
                name: login.name,
                cert_pem: login.certificate_pem,
                key_pem,
            });
        }
        Err(last)
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
        // As the other HTTPS clients here (enroll::http_client): the environment's proxy.
        let proxy = tether_agent::ProxyConfig::from_env(None)?;
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
                proxy: proxy.clone(),
            };
            tasks.spawn(async move {
                let _slot = limit.acquire_owned().await;
                tether_agent::enroll::enroll(&opts)
                    .await
                    .with_context(|| format!("enrolling {}", opts.appliance_id))?;
                let mark = opts.state_dir.join(REVOKED_MARK);
                if mark.exists() {
                    std::fs::remove_file(&mark)
                        .with_context(|| format!("removing {}", mark.display()))?;
                }
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
    fn revoked_appliances_and_stale_operators_are_not_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("open");
        let id = appliance_id(1);
        std::fs::create_dir_all(pool.appliance_dir(&id)).expect("mkdir");
        pool.mark_revoked(&id).expect("mark");
        assert!(pool.appliance_dir(&id).join(REVOKED_MARK).is_file());

        assert!(pool.load_operator().is_none());
        let op = pool.operator_dir();
        std::fs::create_dir_all(&op).expect("mkdir");
        std::fs::write(op.join("cert.pem"), "C").expect("write");
        std::fs::write(op.join("key.pem"), "K").expect("write");
        let meta = |expires_at: &str| {
            serde_json::to_vec(&OperatorMeta {
                name: "loadtest-1".into(),
                expires_at: expires_at.into(),
            })
            .expect("json")
        };
        std::fs::write(op.join(OPERATOR_FILE), meta("2000-01-01T00:00:00Z")).expect("write");
        assert!(pool.load_operator().is_none(), "expired");
        std::fs::write(op.join(OPERATOR_FILE), meta("2999-01-01T00:00:00Z")).expect("write");
        let c = pool.load_operator().expect("valid");
        assert_eq!((c.name.as_str(), c.cert_pem.as_str()), ("loadtest-1", "C"));
        assert_eq!(parse_rfc3339("1970-01-01T00:01:00Z"), Some(60));
    }

    #[test]
    fn a_foreign_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("precious.txt"), "keep").expect("write");
        let err = Pool::open(dir.path()).expect_err("must refuse");
        assert!(err.to_string().contains("not a tether-loadtest pool"));
    }
}
