//! Attacks on the command runner from the trust-path review: a command must not leave
//! processes running past its deadline, its cancellation, or its stream being dropped.

use std::time::{Duration, Instant};

use tether_agent::{AgentConfig, CommandRunner};
use tether_proto::{
    CommandKind, CommandOutcome, CommandRequest, FailureReason, Frame, FrameDecoder,
    DEFAULT_MAX_FRAME_LEN,
};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// A command that starts a long-lived grandchild holding its output pipes, prints the
/// grandchild's pid, and waits.
fn spawns_grandchild(id: u64, deadline_ms: u32) -> CommandRequest {
    CommandRequest {
        command_id: id,
        kind: CommandKind::Exec,
        argv: ["sh", "-c", "sleep 300 & echo $!; wait"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        env_allowlist: vec![],
        deadline_ms,
        signed: None,
    }
}

fn runner() -> CommandRunner {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    CommandRunner::with_env(&AgentConfig::default(), [("PATH".to_string(), path)])
}

/// The first pid printed on stdout in `frames`.
fn printed_pid(frames: &[u8]) -> Option<i32> {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    dec.push(frames);
    let mut stdout = Vec::new();
    while let Ok(Some(f)) = dec.poll_frame() {
        if let Frame::CommandOutput(o) = f {
            stdout.extend_from_slice(&o.data);
        }
    }
    String::from_utf8_lossy(&stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is still a running process (a zombie waiting for its reaper is not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Poll until `pid` is gone (bounded); returns whether it went.
async fn gone(pid: i32) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if !running(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn failure(outcome: &CommandOutcome) -> FailureReason {
    match outcome {
        CommandOutcome::Failed { reason, .. } => *reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn deadline_kills_the_whole_process_tree() {
    let mut out = Vec::new();
    let outcome = runner()
        .run(
            &spawns_grandchild(1, 500),
            &mut out,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(failure(&outcome), FailureReason::TimedOut);
    let pid = printed_pid(&out).expect("grandchild pid printed");
    assert!(gone(pid).await, "grandchild {pid} survived the deadline");
}

#[tokio::test]
async fn cancellation_kills_the_whole_process_tree() {
    let runner = runner();
    let cancel = CancellationToken::new();
    // Read the output through a pipe so the pid is known while the command runs.
    let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
    let req = spawns_grandchild(2, 60_000);
    let run = runner.run(&req, &mut writer, &cancel);
    let watch = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "output ended before the pid");
            seen.extend_from_slice(&buf[..n]);
            if let Some(pid) = printed_pid(&seen) {
                cancel.cancel();
                return (pid, reader);
            }
        }
    };
    let (outcome, (pid, _reader)) = tokio::join!(run, watch);
    assert_eq!(failure(&outcome.unwrap()), FailureReason::Cancelled);
    assert!(
        gone(pid).await,
        "grandchild {pid} survived the cancellation"
    );
}

#[tokio::test]
async fn dropping_a_running_command_kills_the_whole_process_tree() {
    let runner = runner();
    let cancel = CancellationToken::new();
    let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
    let req = spawns_grandchild(3, 60_000);
    let pid = {
        // The session driver aborts command tasks when the connection ends: the run
        // future is dropped mid-command.
        let run = runner.run(&req, &mut writer, &cancel);
        tokio::pin!(run);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                r = &mut run => panic!("command ended on its own: {r:?}"),
                n = reader.read(&mut buf) => {
                    let n = n.unwrap();
                    assert!(n > 0, "output ended before the pid");
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(pid) = printed_pid(&seen) {
                        break pid;
                    }
                }
            }
        }
    };
    assert!(
        gone(pid).await,
        "grandchild {pid} survived the dropped command"
    );
}

#[tokio::test]
async fn a_leftover_holding_the_output_pipes_is_killed_when_the_command_ends() {
    // The shell exits at once; its background child keeps stdout open. The exit is still
    // reported (after the drain grace), and the leftover does not run on unbounded.
    let mut req = spawns_grandchild(4, 60_000);
    req.argv[2] = "sleep 300 & echo $!".into();
    let mut out = Vec::new();
    let outcome = runner()
        .run(&req, &mut out, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(outcome, CommandOutcome::Exited(0));
    let pid = printed_pid(&out).expect("grandchild pid printed");
    assert!(gone(pid).await, "leftover {pid} survived its command");
}
