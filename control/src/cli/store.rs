//! `tether-control store copy --from sqlite:DIR --to postgres://…`
//! ([`tether_control::domain::store_copy`]).

use std::path::PathBuf;

use anyhow::{bail, Context};
use tether_control::config::ControlConfig;
use tether_control::domain::store_copy::copy_and_verify;
use tether_control::store::sql::{Backend, SqlStore};

/// `store copy`.
pub async fn copy(from: &str, to: &str) -> anyhow::Result<()> {
    let Some(dir) = from.strip_prefix("sqlite:") else {
        bail!("--from must be sqlite:DIR (the data directory of the SQLite store), not {from:?}");
    };
    let dir = PathBuf::from(dir.strip_prefix("//").unwrap_or(dir));
    if !matches!(Backend::from_url(to), Ok(Backend::Postgres)) {
        // Not the URL itself: it may carry a password.
        bail!("--to must be a PostgreSQL URL (postgres://…)");
    }
    let cfg = ControlConfig::load(&dir)
        .with_context(|| format!("{} is not a tether-control data directory", dir.display()))?;
    let source_url = cfg.database_url(&dir);
    if !matches!(Backend::from_url(&source_url), Ok(Backend::Sqlite)) {
        bail!(
            "the store of {} is not SQLite (control.toml names another database_url)",
            dir.display()
        );
    }
    if cfg.database_url.is_none() && !dir.join("control.db").is_file() {
        bail!("{} has no control.db", dir.display());
    }
    let root_path = dir.join("ca").join("root.pem");
    let root_pem =
        std::fs::read(&root_path).with_context(|| format!("reading {}", root_path.display()))?;
    let roots = rustls_pemfile::certs(&mut root_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate", root_path.display()))?;
    let source = SqlStore::connect(&source_url)
        .await
        .context("opening the source")?;
    let target = SqlStore::connect(to).await.context("opening the target")?;
    let result = copy_and_verify(&source, &target, &roots, &cfg.trust_domain).await;
    source.close().await;
    target.close().await;
    let summary = result?;
    for (table, rows) in &summary.report.tables {
        println!("{table:<24} {rows:>10} rows");
    }
    match &summary.audit.head {
        Some((seq, hash)) => println!(
            "audit log verified: {} entries, {} checkpoints, head {seq} {hash}",
            summary.audit.entries, summary.audit.checkpoints
        ),
        None => println!("audit log verified: empty"),
    }
    println!(
        "allowlist version {} digest {}",
        summary.allowlist_version,
        summary.allowlist_digest.as_deref().unwrap_or("(genesis)")
    );
    println!(
        "copied and verified; start replicas with --database-url on the target (and stop \
         using {})",
        dir.display()
    );
    Ok(())
}
