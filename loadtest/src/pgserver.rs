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
//!
//! The server is a daemon of its own (`pg_ctl` detaches it), so it would outlive this
//! process when that is SIGKILLed and [`PgServer`]'s `Drop` never runs. A watchdog
//! stops it then: a small shell started with the server, in a process group of its own
//! (a signal to ours spares it), that reads its stdin, a pipe whose only writer is this
//! process. The kernel closes the pipe when this process ends, however it ends; the
//! watchdog sees end-of-file and runs `pg_ctl stop -m immediate`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// `scripts/pg` of the source tree this binary was built from.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg");

/// How long a (re)start may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The watchdog (`sh -c`, `$0` the script, `$1` the data directory): wait for the end of
/// stdin, then stop the server at once.
const WATCHDOG: &str = r#"cat >/dev/null; exec "$0" ctl "$1" stop -m immediate -w"#;

/// A running PostgreSQL of the run, stopped when dropped.
#[derive(Debug)]
pub struct PgServer {
    /// What `scripts/pg` takes as its target directory (`pg/` is inside).
    dir: PathBuf,
    url: String,
    /// Stops the server if this process dies without dropping it (see the module docs).
    watchdog: Child,
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
        let watchdog = watchdog(dir, &dir.join("pg").join("data"));
        let watchdog = match watchdog {
            Ok(w) => w,
            Err(e) => {
                // Not left running without one.
                let _ = run_script_async(dir, &["stop"]).await;
                return Err(e);
            }
        };
        Ok(PgServer {
            dir: dir.to_owned(),
            url,
            watchdog,
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

/// Start the watchdog of the server in `data` (see the module docs).
fn watchdog(dir: &Path, data: &Path) -> anyhow::Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg(SCRIPT)
        .arg(data)
        .env("CARGO_TARGET_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the PostgreSQL watchdog (sh)")
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Stopped here; the watchdog has nothing left to do.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
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
        // Acknowledged commits survive the crashes the run injects (synchronous_commit):
        // the invariants hold control to what it acknowledged. The first hour-long run,
        // on the test default (off), lost a revocation PostgreSQL had acknowledged, and
        // the revoked appliance was admitted again.
        .env("TETHER_PG_DURABLE", "1")
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// Set in the child process of [`a_sigkilled_owner_leaves_no_server_running`]: the
    /// directory to start a server under.
    const OWNER_DIR: &str = "TETHER_TEST_PG_OWNER_DIR";

    /// Not a test on its own: the owner process of the test below, which starts a server,
    /// prints its URL and waits to be killed.
    #[tokio::test]
    async fn pg_owner() {
        let Some(dir) = std::env::var_os(OWNER_DIR) else {
            return;
        };
        let server = PgServer::start(Path::new(&dir)).await.expect("start");
        println!("url={}", server.url());
        std::future::pending::<()>().await;
    }

    /// The run's PostgreSQL dies with the run: an owner process SIGKILLed (no `Drop`)
    /// leaves no server behind; its watchdog stops it.
    #[test]
    fn a_sigkilled_owner_leaves_no_server_running() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        // The `postgres` user (when we are root) must reach its data directory.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        let dir = tmp.path().join("postgres");
        let mut owner = Command::new(std::env::current_exe().expect("exe"))
            .args(["--exact", "pgserver::tests::pg_owner", "--nocapture"])
            .env(OWNER_DIR, &dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("owner");
        let out = std::io::BufReader::new(owner.stdout.take().expect("stdout"));
        let url = out
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("url=").map(str::to_owned))
            .expect("the owner prints the server's URL");
        let port: u16 = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .expect("port");
        let up = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        assert!(up(), "the server answers while its owner lives");

        owner.kill().expect("SIGKILL the owner");
        owner.wait().expect("reap");
        let stopped = (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            !up()
        });
        let pid_file = dir.join("pg").join("data").join("postmaster.pid");
        if !stopped {
            let _ = run_script(&dir, &["stop"]);
        }
        assert!(
            stopped,
            "PostgreSQL still listens on {port} 30 s after its owner was killed"
        );
        assert!(!pid_file.exists(), "postmaster.pid left behind");
    }
}
