//! `--spawn`: control and the brokers as child processes of the simulator (the real
//! binaries, so their memory and CPU can be read from `/proc`).
//!
//! Each child is held by a [`ChildGuard`]: dropping it (end of run, Ctrl-C, a panic that
//! unwinds) kills the process; [`ChildGuard::stop`] asks politely first (SIGTERM, then
//! SIGKILL after a grace period). A child's stderr (JSON log lines) goes to a file in the
//! run directory, and the first line with a given message is handed back parsed, which is
//! how the simulator learns the addresses a child bound on port 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// The control executable.
pub const CONTROL_BIN: &str = "tether-control";
/// The broker executable.
pub const BROKER_BIN: &str = "tether-broker";
/// How long a child may take to log that it is listening.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to exit after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where the binaries are: `--bin-dir`, else the folder of this executable.
pub fn bin_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match flag {
        Some(d) => d.to_owned(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("this executable has no folder")?
            .to_owned(),
    };
    for bin in [CONTROL_BIN, BROKER_BIN] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} not found in {}: build it (cargo build --release -p tether-control -p tether-broker) \
                 or point --bin-dir at its folder",
                bin,
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// A running child process, killed when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl ChildGuard {
    /// Start `program args…`, its stderr (and stdout) appended to `log`. Returns the guard
    /// and the first log line (JSON) whose `fields.message` starts with `ready_message`.
    pub async fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        ready_message: &'static str,
    ) -> anyhow::Result<(ChildGuard, serde_json::Value)> {
        Self::spawn_env(name, program, args, &[], log, ready_message).await
    }

    /// [`ChildGuard::spawn`] with the variables `env` set for the child.
    pub async fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
        ready_message: &'static str,
    ) -> anyhow::Result<(ChildGuard, serde_json::Value)> {
        let mut cmd = Command::new(program);
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("child exited at once")?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .await
            .with_context(|| format!("opening {}", log.display()))?;
        let (tx, rx) = oneshot::channel();
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let file = Arc::new(tokio::sync::Mutex::new(file));
        // Either stream may carry the logs (tether-control logs to stderr, tether-broker
        // to stdout).
        let ready = Arc::new(std::sync::Mutex::new(Some(tx)));
        tokio::spawn(copy_lines(
            stderr,
            file.clone(),
            ready_message,
            ready.clone(),
        ));
        tokio::spawn(copy_lines(stdout, file, ready_message, ready));
        let mut guard = ChildGuard {
            name: name.to_owned(),
            child,
            pid,
            log,
        };
        let ready = tokio::select! {
            line = rx => line.ok(),
            status = guard.child.wait() => {
                bail!("{name} exited during startup ({}); its log: {}\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    guard.log.display(), tail(&guard.log, 20))
            }
            _ = tokio::time::sleep(STARTUP_TIMEOUT) => None,
        };
        match ready {
            Some(line) => Ok((guard, line)),
            None => bail!(
                "{name} did not say {ready_message:?} within {STARTUP_TIMEOUT:?}; its log: {}\n{}",
                guard.log.display(),
                tail(&guard.log, 20)
            ),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How it exited, if it has (reaping it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL it (as a crash or the OOM killer would) and reap it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns whether it exited by itself.
    pub async fn stop(mut self, grace: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => true,
            Err(_) => {
                let _ = self.child.kill().await;
                false
            }
        }
    }
}

/// SIGTERM `pid` without waiting (a broker drains on it); its [`ChildGuard`] still reaps
/// it.
pub fn terminate(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// Who waits for the ready line.
type ReadySlot = Arc<std::sync::Mutex<Option<oneshot::Sender<serde_json::Value>>>>;

/// Copy lines to the log file; hand the first JSON line whose message starts with
/// `message` to whoever waits in `ready`.
async fn copy_lines(
    pipe: impl tokio::io::AsyncRead + Unpin,
    file: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    message: &'static str,
    ready: ReadySlot,
) {
    let mut lines = BufReader::new(pipe).lines();
    let mut waiting = true;
    while let Ok(Some(line)) = lines.next_line().await {
        if waiting {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let msg = v
                    .pointer("/fields/message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("");
                if msg.starts_with(message) {
                    if let Some(tx) = ready.lock().ok().and_then(|mut r| r.take()) {
                        let _ = tx.send(v);
                    }
                    waiting = false;
                }
            }
        }
        let mut f = file.lock().await;
        let _ = f.write_all(line.as_bytes()).await;
        let _ = f.write_all(b"\n").await;
    }
    let _ = file.lock().await.flush().await;
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A socket address field of a JSON log line (`fields.<name>`).
pub fn addr_field(line: &serde_json::Value, name: &str) -> anyhow::Result<SocketAddr> {
    line.pointer(&format!("/fields/{name}"))
        .and_then(|v| v.as_str())
        .with_context(|| format!("no {name} in the log line {line}"))?
        .parse()
        .with_context(|| format!("{name} in the log line {line} is not an address"))
}

/// GET `http://addr/path` over plain HTTP/1.0 (the admin and metrics listeners) and
/// return the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "GET http://{addr}{path}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_owned())
}

/// The value of an unlabelled Prometheus sample `name` in a text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_unlabelled_samples() {
        let text = "# HELP tether_sessions x\n# TYPE tether_sessions gauge\ntether_sessions 12\n\
                    tether_allowlist_entries 200\ntether_sessions_closed_total{code=\"normal\"} 3\n";
        assert_eq!(metric(text, "tether_sessions"), Some(12.0));
        assert_eq!(metric(text, "tether_allowlist_entries"), Some(200.0));
        assert_eq!(metric(text, "tether_allowlist"), None);
    }

    #[test]
    fn addr_field_reads_tracing_json() {
        let line: serde_json::Value = serde_json::from_str(
            r#"{"level":"INFO","fields":{"message":"tether-broker listening","quic":"127.0.0.1:4433"}}"#,
        )
        .expect("json");
        assert_eq!(
            addr_field(&line, "quic").expect("addr"),
            "127.0.0.1:4433".parse::<SocketAddr>().expect("addr")
        );
        assert!(addr_field(&line, "admin").is_err());
    }
}
