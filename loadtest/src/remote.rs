//! `--control URL`: a run against a cluster that is already there, as an operator.
//!
//! The operator credential is the one `tether login` wrote (`config.json`, `ca.pem`,
//! `operator.cert.pem`, `operator.key.pem` in the `tether` CLI's config directory).
//! Appliances are registered in the tenant `loadtest` and enrolled through control's API
//! with one-time tokens, and kept in a pool of their own per control; the fleet connects
//! to the brokers control lists as connected. The brokers' processes are not ours, so
//! their memory and CPU are `null` in the report; the session counts of `churn` come
//! from control's broker list instead of their admin listeners.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::{RunArgs, Scenario};
use crate::measure::Machine;
use crate::motion::BrokerRef;
use crate::ops::Api;
use crate::pool::{self, OperatorCredential, PendingAppliance, Pool, Prepared};
use crate::progress::Progress;
use crate::report::{round3, Limits, Report, UdpReport};

/// How long the brokers may take to apply the enrollments of this run.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// The file in a remote pool naming its control (URL and root CA).
const CONTROL_FILE: &str = "control.json";

/// The operator credential `tether login` keeps in `dir`.
fn load_operator(dir: &Path) -> anyhow::Result<(OperatorCredential, String)> {
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file)).with_context(|| {
            format!(
                "no operator credential in {} (missing {file}): log in with `tether login \
                 --bundle FILE` first, or give --config-dir",
                dir.display()
            )
        })
    };
    let profile: serde_json::Value = serde_json::from_str(&read("config.json")?)
        .with_context(|| format!("{} is not valid", dir.join("config.json").display()))?;
    let name = profile["name"].as_str().unwrap_or("operator").to_owned();
    Ok((
        OperatorCredential {
            name,
            cert_pem: read("operator.cert.pem")?,
            key_pem: read("operator.key.pem")?,
        },
        read("ca.pem")?,
    ))
}

/// `--config-dir`, else the `tether` CLI's default.
fn config_dir(args: &RunArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.config_dir {
        return Ok(d.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("no HOME: give --config-dir")?;
    Ok(base.join("tether"))
}

/// `https://127.0.0.1:8443/` → `127.0.0.1_8443`: a folder name per control.
fn slug(url: &str) -> String {
    let host = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let s: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    // `.` and `..` are not folder names of their own.
    if s.chars().all(|c| c == '.') {
        "control".into()
    } else {
        s
    }
}

/// Whether the load may go to `ip` without --allow-non-loopback.
fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// The connected brokers control lists, resolved, and the allowlist version it holds.
async fn brokers(api: &Api, allow_non_loopback: bool) -> anyhow::Result<(Vec<BrokerRef>, u64)> {
    let list = api.brokers().await?;
    let version = list.allowlist_version;
    let mut out = Vec::new();
    for b in &list.brokers {
        if !b.connected {
            continue;
        }
        let (name, Some(addr)) = (b.name.as_str(), b.quic_addr.as_deref()) else {
            continue;
        };
        let quic = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving broker {name}'s address {addr}"))?
            .next()
            .with_context(|| format!("broker {name}'s address {addr} resolves to nothing"))?;
        if !allow_non_loopback && !is_loopback(quic.ip()) {
            bail!(
                "broker {name} is at {quic}, not a loopback address: a load test sends its \
                 traffic only to this machine unless you give --allow-non-loopback"
            );
        }
        out.push(BrokerRef {
            name: name.to_owned(),
            quic,
            admin: None,
            pid: None,
            sessions_before: 0,
        });
    }
    if out.is_empty() {
        bail!("control lists no connected broker with an address: start one first");
    }
    Ok((out, version))
}

/// Wait until every broker in `use_` applied allowlist version `version`.
async fn wait_applied(api: &Api, use_: &[BrokerRef], version: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let list = api.brokers().await?;
        let behind: Vec<String> = use_
            .iter()
            .filter(|b| {
                let applied = list
                    .brokers
                    .iter()
                    .find(|i| i.name == b.name)
                    .and_then(|i| i.allowlist_version);
                applied.is_none_or(|v| v < version)
            })
            .map(|b| b.name.clone())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "brokers {} did not apply allowlist version {version} within {SYNC_TIMEOUT:?}",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pool of this control: its own folder, which must name the same control.
fn open_pool(args: &RunArgs, url: &str, root_pem: &str) -> anyhow::Result<Pool> {
    let root = match &args.pool {
        Some(p) => p.clone(),
        None => Pool::default_root()?
            .with_file_name("loadtest-pool-remote")
            .join(slug(url)),
    };
    let pool = Pool::open(&root)?;
    let file = root.join(CONTROL_FILE);
    let wanted = serde_json::json!({ "control_url": url, "root_pem": root_pem });
    match std::fs::read(&file) {
        Ok(bytes) => {
            let seen: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not valid", file.display()))?;
            if seen != wanted {
                bail!(
                    "the pool {} holds appliances of another control (or one with another root \
                     CA): delete it or give another --pool",
                    root.display()
                );
            }
        }
        Err(_) => {
            if pool.control_dir().exists() {
                bail!(
                    "the pool {} belongs to a --spawn run: give another --pool",
                    root.display()
                );
            }
            std::fs::write(&file, serde_json::to_vec_pretty(&wanted)?)?;
        }
    }
    Ok(pool)
}

/// Register the `missing` appliances (1-based numbers) and get a token for each, at most
/// `concurrency` at once.
async fn register(
    api: &Api,
    missing: &[usize],
    concurrency: usize,
    progress: &Progress,
) -> anyhow::Result<Vec<PendingAppliance>> {
    let bar = progress.bar(missing.len() as u64, "registering appliances");
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for &index in missing {
        let (api, limit, bar) = (api.clone(), limit.clone(), bar.clone());
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            let id = pool::appliance_id(index);
            api.register(&id, pool::TENANT).await?;
            let token = api.token(&id).await?;
            bar.inc(1);
            anyhow::Ok(PendingAppliance { index, id, token })
        });
    }
    let mut out = Vec::with_capacity(missing.len());
    while let Some(r) = tasks.join_next().await {
        out.push(r.context("a registration task failed")??);
    }
    bar.finish_and_clear();
    out.sort_by_key(|p| p.index);
    Ok(out)
}

/// Run the scenario `args` describes against control at `url`.
pub async fn run(args: &RunArgs, url: &str, limits: Limits) -> anyhow::Result<Report> {
    if args.scenario == Scenario::Drain {
        bail!("drain stops a broker process: it needs --spawn");
    }
    if args.baseline {
        bail!("--baseline starts a bare echo server with a broker's certificate: it needs --spawn");
    }
    let url = url.trim_end_matches('/');
    let progress = Progress::new(args.no_progress);
    let machine = Machine::detect();
    let n = usize::try_from(args.appliances).context("--appliances is too large")?;
    let dir = config_dir(args)?;
    let (operator, root_pem) = load_operator(&dir)?;
    let api = Api::new(url, &root_pem, &operator)?;
    println!(
        "control: {url} (as operator {} from {})",
        operator.name,
        dir.display()
    );
    let (brokers, _) = brokers(&api, args.allow_non_loopback).await?;
    for b in &brokers {
        println!("broker {}: quic {}", b.name, b.quic);
    }

    let pool = open_pool(args, url, &root_pem)?;
    println!("pool: {}", pool.root().display());
    let mut creds = pool.load(n, &progress).await;
    let missing = pool::missing(&creds);
    let enroll_started = Instant::now();
    let prepared = if !missing.is_empty() {
        println!(
            "{} of {n} appliances need enrolling ({} ready in the pool)",
            missing.len(),
            n - missing.len()
        );
        let tokens = register(&api, &missing, args.enroll_concurrency, &progress).await?;
        Prepared::remote(root_pem.clone(), tokens)
    } else {
        Prepared::remote(root_pem.clone(), Vec::new())
    };
    prepared
        .enroll(&pool, url, args.enroll_concurrency, &progress)
        .await?;
    let creds = prepared.fill(&pool, &mut creds)?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();

    // Every broker must enforce what was just enrolled before the fleet connects, or the
    // first appliances would be refused (and back off for minutes).
    let (_, version) = self::brokers(&api, args.allow_non_loopback).await?;
    wait_applied(&api, &brokers, version).await?;

    let run_dir = tempfile::Builder::new()
        .prefix("tether-loadtest-")
        .tempdir()
        .context("creating the run directory")?;
    let udp = UdpReport {
        client_endpoints: args.client_endpoints,
        ..UdpReport::default()
    };
    crate::scenario::drive(
        args,
        &pool,
        Some(&api),
        creds,
        brokers,
        None,
        None,
        run_dir.path(),
        &progress,
        udp,
        machine,
        limits,
        round3(enroll_secs),
        missing.len(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_url_makes_a_folder_name() {
        assert_eq!(slug("https://127.0.0.1:8443/"), "127.0.0.1_8443");
        assert_eq!(slug("https://control.example.com"), "control.example.com");
        assert_eq!(slug("https://../../etc"), ".._.._etc");
        assert_eq!(slug("https://.."), "control");
        assert_eq!(slug("https://"), "control");
    }

    #[test]
    fn a_pool_serves_one_control() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pool");
        let cli = crate::cli::Cli::try_parse_from([
            "tether-loadtest",
            "run",
            "--control",
            "https://127.0.0.1:1",
            "--scenario",
            "storm",
            "--appliances",
            "1",
            "--pool",
            root.to_str().unwrap(),
        ])
        .unwrap();
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("not run")
        };
        drop(open_pool(&args, "https://127.0.0.1:1", "ROOT A").expect("a new pool"));
        drop(open_pool(&args, "https://127.0.0.1:1", "ROOT A").expect("the same control"));
        let e = open_pool(&args, "https://127.0.0.1:1", "ROOT B").unwrap_err();
        assert!(e.to_string().contains("another control"), "{e}");
        let e = open_pool(&args, "https://127.0.0.1:2", "ROOT A").unwrap_err();
        assert!(e.to_string().contains("another control"), "{e}");
    }

    #[test]
    fn only_loopback_is_allowed_by_default() {
        assert!(is_loopback("127.0.0.1".parse().unwrap()));
        assert!(is_loopback("127.3.2.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("192.168.1.1".parse().unwrap()));
    }
}
