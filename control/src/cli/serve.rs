//! `tether-control init` and `tether-control serve`.

use std::path::Path;

use tether_control::config::ControlConfig;
use tether_control::domain::ca::KmsSettings;
use tether_control::domain::operators::{self, Caller};
use tokio_util::sync::CancellationToken;

use super::{write_secret, Cmd};

/// `init`: the CA, the config, the store, and the first admin's bundle.
pub async fn init(cmd: Cmd, now: i64) -> anyhow::Result<()> {
    let Cmd::Init {
        dir,
        trust_domain,
        dns_names,
        ips,
        listen,
        brokers,
        database_url,
        kms,
        kms_region,
        kms_endpoint_url,
        kms_root_key,
        kms_intermediate_key,
        admin_bundle,
    } = cmd
    else {
        unreachable!("init is called with Cmd::Init")
    };
    let data_dir = dir.data_dir;
    let mut cfg = ControlConfig {
        trust_domain,
        brokers,
        database_url,
        ..ControlConfig::default()
    };
    if !dns_names.is_empty() {
        cfg.dns_names = dns_names;
    }
    if !ips.is_empty() {
        cfg.ips = ips;
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    let kms = kms.then(|| KmsSettings {
        region: kms_region,
        endpoint_url: kms_endpoint_url,
        root_key: kms_root_key,
        intermediate_key: kms_intermediate_key,
        ..Default::default()
    });
    let (ca, store) = tether_control::run::init(&data_dir, &cfg, kms).await?;
    let root = data_dir.join("ca").join("root.pem");
    println!(
        "initialised {} for trust domain {}",
        data_dir.display(),
        cfg.trust_domain
    );
    println!(
        "root CA (give it to appliances and operators): {}",
        root.display()
    );
    let bundle_path = admin_bundle.unwrap_or_else(|| data_dir.join("admin-bundle.json"));
    let bundle = operators::create_invite(
        store.as_ref(),
        cfg.control_url(),
        ca.root_pem(),
        operators::FIRST_ADMIN,
        tether_api::operators::Role::Admin,
        operators::ADMIN_BUNDLE_TTL,
        Caller::LocalAdmin.actor(),
        now,
    )
    .await?;
    write_secret(&bundle_path, &serde_json::to_vec_pretty(&bundle)?)?;
    println!(
        "first admin's one-time bundle (valid {}; `tether login --bundle FILE`): {}",
        humantime::format_duration(operators::ADMIN_BUNDLE_TTL),
        bundle_path.display()
    );
    Ok(())
}

/// `serve`: until SIGTERM or Ctrl-C, then drain.
pub async fn serve(
    data_dir: &Path,
    overrides: tether_control::run::Overrides,
) -> anyhow::Result<()> {
    let started = tether_control::run::Started::bind_with(data_dir, overrides).await?;
    if let Some(origin) = started.console_origin() {
        println!("console: {origin}/console/ (sign in with `tether console`)");
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        trigger.cancel();
    });
    started.serve(shutdown).await?;
    Ok(())
}

/// `ca export --no-root-key --out DIR`: the data directory a new replica starts from.
pub fn ca_export(data_dir: &Path, out: &Path, no_root_key: bool) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    use std::os::unix::fs::DirBuilderExt;
    use tether_control::config::CONFIG_FILE;
    if !no_root_key {
        bail!("the root key is never exported (keep it offline): pass --no-root-key to confirm");
    }
    let cfg = ControlConfig::load(data_dir)?;
    if cfg.database_url.is_none() {
        bail!(
            "this control keeps its store in SQLite ({}): replicas share a PostgreSQL \
             database (move it with `tether-control store copy` first)",
            cfg.database_url(data_dir)
        );
    }
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        bail!("{} is not empty", out.display());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("creating {}", out.display()))?;
    let mut written = tether_control::domain::ca::Ca::export_for_replica(data_dir, out)?;
    // The config as it is, but the advertised address: each replica has its own.
    let path = data_dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    if let Some(toml::Value::Table(replica)) = table.get_mut("replica") {
        replica.remove("advertise");
    }
    // It names the database's password, if the URL carries one: 0600.
    write_secret(&out.join(CONFIG_FILE), toml::to_string(&table)?.as_bytes())?;
    written.insert(0, CONFIG_FILE.into());
    for f in &written {
        println!("{}", out.join(f).display());
    }
    eprintln!(
        "wrote the data directory of a new replica to {} (no root key, no control leaf: the \
         replica issues its own at first start). Set its [replica] advertise and, if its \
         names differ, dns_names/ips in control.toml, then `tether-control serve --data-dir {}`",
        out.display(),
        out.display()
    );
    Ok(())
}

/// `replica list`: the live replicas of the database at `url`.
pub async fn replica_list(url: &str, json: bool) -> anyhow::Result<()> {
    use tether_control::domain::replica::LIVE_WITHIN_SECS;
    use tether_control::store::Store;
    let store = tether_control::store::sql::SqlStore::connect(url).await?;
    let live = store.live_replicas(LIVE_WITHIN_SECS).await?;
    if json {
        let replicas = live
            .into_iter()
            .map(tether_control::http::control::replica_view)
            .collect::<Vec<_>>();
        println!("{}", serde_json::to_string_pretty(&replicas)?);
    } else {
        let now = tether_control::now_unix();
        println!(
            "{:<32}  {:<24}  {:<24}  {:<10}  HEARTBEAT",
            "ID", "ADVERTISE", "API", "VERSION"
        );
        for r in live {
            println!(
                "{:<32}  {:<24}  {:<24}  {:<10}  {}s ago",
                r.info.id,
                r.info.advertise,
                r.info.api_addr,
                r.info.version,
                (now - r.heartbeat_at).max(0)
            );
        }
    }
    store.close().await;
    Ok(())
}
