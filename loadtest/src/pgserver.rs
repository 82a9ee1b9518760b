//! `chaos --control-replicas N`: a PostgreSQL server of the run's own, so the `pg_restart`
//! fault can crash and restart it without disturbing anything else.
//!
//! It is `scripts/pg` (the one the store tests use) pointed at a directory of the run:
//! `initdb` into `DIR/pg/data` on a free port, as the `postgres` user when this process
//! is root (PostgreSQL refuses to run as root), trusted on 127.0.0.1 only, with the
//! database `tether_test`: a fresh database each run. A crash is `pg_ctl stop -m
//! immediate` (no shutdown checkpoint: the next start replays the WAL, as after a power
//! cut), the start after it `pg_ctl restart`, which reuses the options of the last start
//! (the same port).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// `scripts/pg` of the source tree this binary was built from.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg");

/// How long a (re)start may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running PostgreSQL of the run, stopped when dropped.
#[derive(Debug)]
pub struct PgServer {
    /// What `scripts/pg` takes as its target directory (`pg/` is inside).
    dir: PathBuf,
    url: String,
}

impl PgServer {
    /// `initdb` and start a server under `dir` (created; it must be reachable by the
    /// `postgres` user when running as root). Returns it with the URL of its database.
    pub async fn start(dir: &Path) -> anyhow::Result<PgServer> {
        let script = Path::new(SCRIPT);
        if !script.is_file() {
            bail!(
                "{} not found: --control-replicas starts PostgreSQL with the source tree's scripts/pg \
                 (or give --pg-url)",
                script.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let url = run_script_async(dir, &["start"])
            .await
            .context("starting PostgreSQL (scripts/pg)")?;
        if !url.starts_with("postgres://") {
            bail!("scripts/pg printed {url:?}, not a URL");
        }
        Ok(PgServer {
            dir: dir.to_owned(),
            url,
        })
    }

    /// The URL of the run's database.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn data(&self) -> PathBuf {
        self.dir.join("pg").join("data")
    }

    /// Crash it: `pg_ctl stop -m immediate` (every backend killed at once, no checkpoint).
    pub async fn crash(&self) -> anyhow::Result<()> {
        let data = self.data();
        run_script_async(
            &self.dir,
            &[
                "ctl",
                &data.to_string_lossy(),
                "stop",
                "-m",
                "immediate",
                "-w",
            ],
        )
        .await
        .context("pg_ctl stop -m immediate")?;
        Ok(())
    }

    /// Start it again after [`PgServer::crash`], on the same port, waiting until it
    /// accepts connections (crash recovery included).
    pub async fn restart(&self) -> anyhow::Result<()> {
        let data = self.data();
        let timeout = START_TIMEOUT.as_secs().to_string();
        run_script_async(
            &self.dir,
            &[
                "ctl",
                &data.to_string_lossy(),
                "restart",
                "-m",
                "fast",
                "-w",
                "-t",
                &timeout,
            ],
        )
        .await
        .context("pg_ctl restart")?;
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = run_script(&self.dir, &["stop"]) {
            eprintln!("warning: stopping the run's PostgreSQL: {e:#}");
        }
    }
}

/// `scripts/pg ARGS` with `CARGO_TARGET_DIR=dir`: its stdout, trimmed.
fn run_script(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(SCRIPT)
        .args(args)
        .env("CARGO_TARGET_DIR", dir)
        .output()
        .with_context(|| format!("running {SCRIPT}"))?;
    if !out.status.success() {
        bail!(
            "scripts/pg {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// [`run_script`] without blocking the runtime (the driver waits for it, the fleet goes on).
async fn run_script_async(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let dir = dir.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_script(&dir, &args)
    })
    .await
    .context("the scripts/pg task")?
}
