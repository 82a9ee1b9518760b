//! The command runner: admission (refused, busy), spawning without a shell, a cleared
//! environment, streaming stdout/stderr as `CommandOutput` frames, deadlines, cancellation
//! and the final `CommandResult`.
//!
//! Each command leads its own process group. A deadline, a cancellation, a dropped command
//! and a leftover still holding the output pipes after the command exited all end in
//! `SIGKILL` to the whole group, so a grandchild (`cmd &`) cannot outlive them. A
//! descendant that leaves the group on purpose (`setsid`) is beyond this.
//!
//! It writes frames into any [`AsyncWrite`] — a QUIC `SendStream` in production, a
//! `Vec<u8>` or a duplex pipe in tests — so it can be tested without QUIC.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether_proto::{
    CommandKind, CommandOutcome, CommandOutput, CommandRequest, CommandResult, FailureReason,
    Frame, OutputStream,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::signed::{Admitted, Decision, Ran, SignedOps};
use tether_ops::manifest::{Outcome as ManifestOutcome, StreamDigest, StreamHasher};
use tether_ops::Refusal;

/// How often a running command's phase is re-checked against the customer policy.
pub const PHASE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// `PATH` given to commands when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The shell used for `CommandKind::Shell`.
pub const SHELL: &str = "/bin/sh";
/// After the process exited, how long to keep reading output from pipes that a leftover
/// grandchild may hold open: 2 s. Then the leftover is killed with the process group.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Longest failure message sent to the broker (the protocol's limit).
const MAX_MESSAGE_LEN: usize = tether_proto::frame::MAX_MESSAGE_LEN;

/// Runs commands for one agent, enforcing `max_concurrent_commands` across all its
/// sessions. Share it behind an `Arc`.
#[derive(Debug)]
pub struct CommandRunner {
    allow_shell: bool,
    max_concurrent: usize,
    chunk: usize,
    max_frame_len: usize,
    permits: Arc<Semaphore>,
    /// Snapshot of the environment commands may draw allowlisted variables from.
    env: Arc<HashMap<String, OsString>>,
    /// Signed operations: the customer's policy and keys decide every command.
    signed: Option<Arc<SignedOps>>,
    /// Break-glass tunnels, decided under the same signed operations.
    tunnels: Option<Arc<crate::tunnel::Tunnels>>,
}

impl CommandRunner {
    /// A runner for `cfg` that passes allowlisted variables from the agent's own
    /// environment (snapshotted now).
    pub fn new(cfg: &AgentConfig) -> CommandRunner {
        // One snapshot per process, shared by every agent (simulators run thousands).
        static PROCESS_ENV: OnceLock<Arc<HashMap<String, OsString>>> = OnceLock::new();
        let env = PROCESS_ENV.get_or_init(|| {
            Arc::new(
                std::env::vars_os()
                    .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
                    .collect(),
            )
        });
        CommandRunner::build(cfg, env.clone())
    }

    /// A runner whose commands draw allowlisted variables (and `PATH`) from `env` instead
    /// of the agent's environment. Tests pass a map here.
    pub fn with_env(
        cfg: &AgentConfig,
        env: impl IntoIterator<Item = (String, OsString)>,
    ) -> CommandRunner {
        CommandRunner::build(cfg, Arc::new(env.into_iter().collect()))
    }

    fn build(cfg: &AgentConfig, env: Arc<HashMap<String, OsString>>) -> CommandRunner {
        CommandRunner {
            allow_shell: cfg.allow_shell,
            max_concurrent: cfg.max_concurrent_commands,
            chunk: cfg.effective_output_chunk(),
            max_frame_len: cfg.max_frame_len,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_commands)),
            env,
            signed: None,
            tunnels: None,
        }
    }

    /// The same runner deciding every command under signed operations.
    #[must_use]
    pub fn with_signed_ops(mut self, ops: Arc<SignedOps>) -> CommandRunner {
        self.tunnels = Some(Arc::new(crate::tunnel::Tunnels::new(ops.clone())));
        self.signed = Some(ops);
        self
    }

    /// Break-glass tunnels (only under signed operations).
    pub fn tunnels(&self) -> Option<&Arc<crate::tunnel::Tunnels>> {
        self.tunnels.as_ref()
    }

    /// Signed operations, if this runner decides under them.
    pub fn signed_ops(&self) -> Option<&Arc<SignedOps>> {
        self.signed.as_ref()
    }

    /// The `PATH` commands get (and programs are resolved on).
    fn path_env(&self) -> OsString {
        self.env
            .get("PATH")
            .cloned()
            .unwrap_or_else(|| DEFAULT_PATH.into())
    }

    /// Commands running now.
    pub fn running(&self) -> usize {
        self.max_concurrent
            .saturating_sub(self.permits.available_permits())
    }

    /// Decide whether `req` may run: a permit, or the outcome to answer with.
    pub fn admit(&self, req: &CommandRequest) -> Result<CommandPermit, CommandOutcome> {
        if req.argv.is_empty() || req.argv.iter().all(|a| a.is_empty()) {
            return Err(failed(FailureReason::Refused, "empty argv"));
        }
        if req.kind == CommandKind::Shell && !self.allow_shell {
            return Err(failed(
                FailureReason::Refused,
                "shell commands are not allowed on this agent",
            ));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(CommandPermit(permit)),
            Err(_) => Err(failed(
                FailureReason::Busy,
                format!("already running {} commands", self.max_concurrent),
            )),
        }
    }

    /// Admit and run `req`, writing its output frames and its result frame to `out`, each
    /// within the agent's own `max_frame_len`. Returns the outcome sent, or the write error
    /// (the process is killed then).
    ///
    /// `cancel` kills the process and ends with `Failed{Cancelled}` (the broker reset or
    /// stopped the stream, or the connection is gone).
    pub async fn run<W: AsyncWrite + Unpin>(
        &self,
        req: &CommandRequest,
        out: &mut W,
        cancel: &CancellationToken,
    ) -> io::Result<CommandOutcome> {
        self.run_within(req, out, cancel, self.max_frame_len).await
    }

    /// [`CommandRunner::run`] for a peer that accepts frames of at most `peer_max_frame_len`
    /// bytes (the broker's `Welcome.max_frame_len`): output chunks are cut so that each
    /// `CommandOutput` frame fits it (and `output_chunk_bytes`), and a failure message is
    /// shortened until the `CommandResult` fits.
    pub async fn run_within<W: AsyncWrite + Unpin>(
        &self,
        req: &CommandRequest,
        out: &mut W,
        cancel: &CancellationToken,
        peer_max_frame_len: usize,
    ) -> io::Result<CommandOutcome> {
        let mut spooled = None;
        self.run_spooling(req, out, cancel, peer_max_frame_len, &mut spooled)
            .await
    }

    /// [`CommandRunner::run_within`], setting `spooled` to the `seq` of the manifest it
    /// sent (kept in the spool until the caller confirms its delivery:
    /// `SignedOps::spool`).
    pub async fn run_spooling<W: AsyncWrite + Unpin>(
        &self,
        req: &CommandRequest,
        out: &mut W,
        cancel: &CancellationToken,
        peer_max_frame_len: usize,
        spooled: &mut Option<u64>,
    ) -> io::Result<CommandOutcome> {
        let limit = peer_max_frame_len.min(self.max_frame_len);
        let outcome = match (self.admit(req), &self.signed) {
            (Ok(permit), Some(ops)) => {
                let outcome = self
                    .run_signed(ops, req, out, cancel, limit, spooled)
                    .await?;
                drop(permit);
                outcome
            }
            (Ok(permit), None) => {
                let outcome = self
                    .execute(req, out, cancel, limit, None, &mut Hashers::default())
                    .await?;
                drop(permit);
                outcome
            }
            (Err(outcome), Some(ops)) => {
                // Refused before the customer's rules were asked (busy, empty, shell off):
                // still a signed refusal manifest.
                let code = match &outcome {
                    CommandOutcome::Failed { reason, .. } => {
                        tether_proto::CommandFailure::from(*reason)
                    }
                    CommandOutcome::Exited(_) => tether_proto::CommandFailure::Refused,
                };
                let ran = Ran {
                    admitted: None,
                    partial: None,
                    started_ms: crate::signed::now_ms(),
                    outcome: ManifestOutcome::Refused(code.name().to_owned()),
                    stdout: StreamDigest::of(b""),
                    stderr: StreamDigest::of(b""),
                };
                *spooled = self.send_manifest(ops, req, ran, out, limit).await?;
                outcome
            }
            (Err(outcome), None) => outcome,
        };
        let outcome = fit_outcome(outcome, limit);
        // The result is written even after a cancellation: if only the broker's side was
        // reset it still wants to know; if our side was stopped the write fails at once.
        self.write_frame(
            out,
            None,
            Frame::CommandResult(CommandResult {
                command_id: req.command_id,
                outcome: outcome.clone(),
            }),
            limit,
        )
        .await?;
        out.flush().await?;
        Ok(outcome)
    }

    /// Decide `req` under signed operations, then run it (or answer the refusal or the
    /// plan), sending the signed manifest before the result to a broker that speaks
    /// `signed-ops/1`.
    async fn run_signed<W: AsyncWrite + Unpin>(
        &self,
        ops: &Arc<SignedOps>,
        req: &CommandRequest,
        out: &mut W,
        cancel: &CancellationToken,
        limit: usize,
        spooled: &mut Option<u64>,
    ) -> io::Result<CommandOutcome> {
        let started_ms = crate::signed::now_ms();
        let path = self.path_env();
        let decision = {
            let ops = ops.clone();
            let req = req.clone();
            // File reads, stats, hashing the program and an fsync: off the async threads.
            tokio::task::spawn_blocking(move || ops.admit(&req, &path))
                .await
                .map_err(io::Error::other)?
        };
        match decision {
            Err((refusal, partial)) => {
                tracing::warn!(command_id = req.command_id, code = %refusal.code, detail = %refusal.detail, "command refused by the customer's rules");
                ops.refused(req, &refusal);
                let ran = Ran {
                    admitted: None,
                    partial: Some(&partial),
                    started_ms,
                    outcome: ManifestOutcome::Refused(refusal.code.name().to_owned()),
                    stdout: StreamDigest::of(b""),
                    stderr: StreamDigest::of(b""),
                };
                *spooled = self.send_manifest(ops, req, ran, out, limit).await?;
                Ok(refused(&refusal, req.signed.is_some()))
            }
            Ok(Decision::Plan {
                document,
                approval_required,
            }) => {
                if req.signed.is_some() {
                    let frame = Frame::CommandPlan(tether_proto::CommandPlan {
                        command_id: req.command_id,
                        approval_required,
                        document: document.into(),
                    });
                    self.write_frame(out, Some(cancel), frame, limit).await?;
                }
                Ok(CommandOutcome::Exited(0))
            }
            Ok(Decision::Run(admitted)) => {
                let mut hashers = Hashers::default();
                let outcome = self
                    .execute(
                        req,
                        out,
                        cancel,
                        limit,
                        Some((&admitted, ops)),
                        &mut hashers,
                    )
                    .await?;
                let manifest_outcome = match &outcome {
                    CommandOutcome::Exited(code) => ManifestOutcome::Exited(*code),
                    CommandOutcome::Failed { reason, .. } => ManifestOutcome::Failed(
                        tether_proto::CommandFailure::from(*reason)
                            .name()
                            .to_owned(),
                    ),
                };
                let ran = Ran {
                    admitted: Some(&admitted),
                    partial: None,
                    started_ms,
                    outcome: manifest_outcome,
                    stdout: hashers.stdout.finish(),
                    stderr: hashers.stderr.finish(),
                };
                *spooled = self.send_manifest(ops, req, ran, out, limit).await?;
                Ok(outcome)
            }
        }
    }

    /// Sign and log the manifest; if the broker speaks `signed-ops/1`, spool it and send
    /// it. Returns the `seq` spooled (the caller removes it once delivery is confirmed).
    async fn send_manifest<W: AsyncWrite + Unpin>(
        &self,
        ops: &Arc<SignedOps>,
        req: &CommandRequest,
        ran: Ran<'_>,
        out: &mut W,
        limit: usize,
    ) -> io::Result<Option<u64>> {
        let Some(m) = ops.manifest(req, ran) else {
            return Ok(None);
        };
        if req.signed.is_none() {
            return Ok(None);
        }
        let spooled = match ops.spool().put(m.seq, req.command_id, &m.bytes, &m.sig) {
            Ok(()) => Some(m.seq),
            Err(e) => {
                // Sent all the same; only a lost connection now loses the vendor's copy.
                tracing::warn!(seq = m.seq, error = %e, "cannot spool the manifest");
                None
            }
        };
        let frame = Frame::CommandManifest(tether_proto::CommandManifest {
            command_id: req.command_id,
            manifest: m.bytes.into(),
            sig: m.sig.into_bytes().into(),
        });
        self.write_frame(out, None, frame, limit).await?;
        Ok(spooled)
    }

    fn command(&self, req: &CommandRequest, admitted: Option<&Admitted>) -> Command {
        let mut cmd = match (req.kind, admitted) {
            // Under signed operations, the program the rules matched is the one that runs.
            (CommandKind::Shell, Some(a)) => {
                let mut c = Command::new(&a.program);
                c.arg("-c").arg(req.argv.join(" "));
                c
            }
            (_, Some(a)) => {
                let mut c = Command::new(&a.program);
                c.args(&req.argv[1..]);
                c
            }
            (CommandKind::Shell, None) => {
                let mut c = Command::new(SHELL);
                c.arg("-c").arg(req.argv.join(" "));
                c
            }
            // Refused kinds never get here; treat anything else as a plain exec.
            (_, None) => {
                let mut c = Command::new(&req.argv[0]);
                c.args(&req.argv[1..]);
                c
            }
        };
        if let Some(user) = admitted.map(|a| &a.user).filter(|u| u.switch) {
            // std drops the supplementary groups (setgroups(0)) when it changes the uid of
            // a root parent, so the child keeps none of the agent's groups.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.env_clear();
        cmd.env(
            "PATH",
            self.env
                .get("PATH")
                .cloned()
                .unwrap_or_else(|| DEFAULT_PATH.into()),
        );
        for name in &req.env_allowlist {
            if let Some(value) = self.env.get(name) {
                cmd.env(name, value);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group (pgid = its pid), inherited by its descendants.
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    async fn execute<W: AsyncWrite + Unpin>(
        &self,
        req: &CommandRequest,
        out: &mut W,
        cancel: &CancellationToken,
        limit: usize,
        signed: Option<(&Admitted, &Arc<SignedOps>)>,
        hashers: &mut Hashers,
    ) -> io::Result<CommandOutcome> {
        let program = req.argv.first().map(String::as_str).unwrap_or_default();
        let mut child = match self.command(req, signed.map(|(a, _)| a)).spawn() {
            Ok(child) => child,
            Err(e) => {
                return Ok(failed(
                    FailureReason::SpawnFailed,
                    format!("cannot start {program}: {e}"),
                ))
            }
        };
        tracing::info!(
            command_id = req.command_id,
            program,
            pid = child.id(),
            "command started"
        );
        // Dropped with this future (the session aborts its commands): kills the group.
        let mut group = ProcessGroup::of(&child);
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        // Each read becomes one frame: read no more than one frame can carry to this peer.
        let chunk = self.chunk.min(CommandOutput::max_data_len(limit)).max(1);
        let mut out_buf = vec![0u8; chunk];
        let mut err_buf = vec![0u8; chunk];
        let deadline = (req.deadline_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(u64::from(req.deadline_ms)));
        let mut status: Option<ExitStatus> = None;
        let mut drain_until: Option<Instant> = None;
        let mut phase_check = tokio::time::interval(PHASE_CHECK_EVERY);
        phase_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let outcome = loop {
            if let Some(st) = status {
                if stdout.is_none() && stderr.is_none() {
                    // Ended on its own with nothing left on our pipes. The leader is reaped
                    // and its group may be empty, so its pgid could be reused: kill nothing.
                    group.release();
                    break exit_outcome(st);
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    group.kill();
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break failed(FailureReason::Cancelled, "cancelled by the broker");
                }
                _ = sleep_until(deadline), if status.is_none() => {
                    group.kill();
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break failed(
                        FailureReason::TimedOut,
                        format!("deadline of {} ms passed; process killed", req.deadline_ms),
                    );
                }
                _ = sleep_until(drain_until), if status.is_some() => {
                    // A grandchild keeps the pipes open: it goes with the group (which it
                    // keeps alive, so the pgid cannot have been reused); report the exit.
                    group.kill();
                    break exit_outcome(status.unwrap_or_default());
                }
                _ = phase_check.tick(), if signed.is_some() && status.is_none() => {
                    if let Some((admitted, ops)) = signed {
                        if !ops.phase_open(admitted.phase) {
                            group.kill();
                            let _ = child.start_kill();
                            let _ = child.wait().await;
                            break failed(
                                FailureReason::PhaseRevoked,
                                format!("the customer closed phase {} while the command ran; process killed", admitted.phase),
                            );
                        }
                    }
                }
                n = read_some(&mut stdout, &mut out_buf) => {
                    if let Ok(n) = &n { hashers.stdout.update(&out_buf[..*n]); }
                    self.forward(out, cancel, req.command_id, OutputStream::Stdout,
                        &mut stdout, &out_buf, n, limit).await?;
                }
                n = read_some(&mut stderr, &mut err_buf) => {
                    if let Ok(n) = &n { hashers.stderr.update(&err_buf[..*n]); }
                    self.forward(out, cancel, req.command_id, OutputStream::Stderr,
                        &mut stderr, &err_buf, n, limit).await?;
                }
                st = child.wait(), if status.is_none() => {
                    let st = st?;
                    status = Some(st);
                    drain_until = Some(Instant::now() + OUTPUT_DRAIN_GRACE);
                }
            }
        };
        tracing::info!(command_id = req.command_id, outcome = ?outcome, "command ended");
        Ok(outcome)
    }

    /// Send what a pipe read produced; close the pipe on EOF or error.
    #[allow(clippy::too_many_arguments)]
    async fn forward<W: AsyncWrite + Unpin, R>(
        &self,
        out: &mut W,
        cancel: &CancellationToken,
        command_id: u64,
        stream: OutputStream,
        pipe: &mut Option<R>,
        buf: &[u8],
        n: io::Result<usize>,
        limit: usize,
    ) -> io::Result<()> {
        match n {
            Ok(0) | Err(_) => *pipe = None,
            Ok(n) => {
                let data = Bytes::copy_from_slice(&buf[..n]);
                self.write_frame(
                    out,
                    Some(cancel),
                    Frame::CommandOutput(CommandOutput {
                        command_id,
                        stream,
                        data,
                    }),
                    limit,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Encode and write one frame; a cancelled command stops waiting for a slow reader.
    async fn write_frame<W: AsyncWrite + Unpin>(
        &self,
        out: &mut W,
        cancel: Option<&CancellationToken>,
        frame: Frame,
        limit: usize,
    ) -> io::Result<()> {
        let mut buf = BytesMut::new();
        tether_proto::encode_frame(&frame, &mut buf, limit).map_err(io::Error::other)?;
        let Some(cancel) = cancel else {
            return out.write_all(&buf).await;
        };
        tokio::select! {
            biased;
            r = out.write_all(&buf) => r,
            _ = cancel.cancelled() => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "command cancelled",
            )),
        }
    }
}

/// A command's process group, killed (`SIGKILL`) by [`ProcessGroup::kill`] or on drop
/// unless [`ProcessGroup::release`]d.
#[derive(Debug)]
struct ProcessGroup(Option<nix::unistd::Pid>);

impl ProcessGroup {
    /// The group `child` leads (it was spawned with `process_group(0)`).
    fn of(child: &tokio::process::Child) -> ProcessGroup {
        ProcessGroup(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(nix::unistd::Pid::from_raw),
        )
    }

    /// Kill every process of the group, once.
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// The command ended on its own: never signal this group.
    fn release(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Streaming digests of a command's stdout and stderr, as the manifest states them.
#[derive(Default)]
struct Hashers {
    stdout: StreamHasher,
    stderr: StreamHasher,
}

/// The outcome answering `refusal`: its own reason to a broker that speaks
/// `signed-ops/1`, else `refused` naming it in the message.
fn refused(refusal: &Refusal, broker_speaks_signed_ops: bool) -> CommandOutcome {
    match refusal.code.wire_reason() {
        Some(reason) if broker_speaks_signed_ops => failed(reason, refusal.detail.clone()),
        _ => failed(
            FailureReason::Refused,
            format!("{}: {}", refusal.code, refusal.detail),
        ),
    }
}

/// Proof that a command was admitted; holds one of the runner's slots until dropped.
#[derive(Debug)]
pub struct CommandPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// Read from an optional pipe; a closed pipe never completes.
async fn read_some<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn exit_outcome(status: ExitStatus) -> CommandOutcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => CommandOutcome::Exited(code),
        (None, Some(sig)) => failed(FailureReason::Signaled, format!("signal {sig}")),
        (None, None) => failed(FailureReason::Internal, "process ended without a status"),
    }
}

/// A `Failed` outcome with `message` cut to the protocol's limit.
pub(crate) fn failed(reason: FailureReason, message: impl Into<String>) -> CommandOutcome {
    let mut message = message.into();
    truncate(&mut message, MAX_MESSAGE_LEN);
    CommandOutcome::Failed { reason, message }
}

/// `outcome` with a failure message short enough for its `CommandResult` frame to fit
/// `max_frame_len` (at the 1 KiB minimum a full 1,024-byte message would not).
pub(crate) fn fit_outcome(outcome: CommandOutcome, max_frame_len: usize) -> CommandOutcome {
    match outcome {
        CommandOutcome::Failed {
            reason,
            mut message,
        } => {
            truncate(&mut message, CommandResult::max_message_len(max_frame_len));
            CommandOutcome::Failed { reason, message }
        }
        exited => exited,
    }
}

/// Cut `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
