//! The command runner without QUIC: frames are written into a `Vec<u8>` and decoded back.

use std::ffi::OsString;

use tether_agent::{AgentConfig, CommandRunner};
use tether_proto::{
    CommandKind, CommandOutcome, CommandRequest, FailureReason, Frame, FrameDecoder, OutputStream,
};
use tokio_util::sync::CancellationToken;

fn req(id: u64, argv: &[&str]) -> CommandRequest {
    CommandRequest {
        command_id: id,
        kind: CommandKind::Exec,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env_allowlist: vec![],
        deadline_ms: 10_000,
        signed: None,
    }
}

fn test_env(extra: &[(&str, &str)]) -> Vec<(String, OsString)> {
    let mut env = vec![(
        "PATH".to_string(),
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
    )];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v))),
    );
    env
}

fn runner(cfg: AgentConfig) -> CommandRunner {
    CommandRunner::with_env(&cfg, test_env(&[]))
}

struct Ran {
    outcome: CommandOutcome,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    frames: Vec<Frame>,
}

async fn run(runner: &CommandRunner, req: &CommandRequest) -> Ran {
    run_with(runner, req, &CancellationToken::new()).await
}

async fn run_with(runner: &CommandRunner, req: &CommandRequest, cancel: &CancellationToken) -> Ran {
    let mut out = Vec::new();
    let outcome = runner.run(req, &mut out, cancel).await.expect("run");
    let mut dec = FrameDecoder::new(tether_proto::DEFAULT_MAX_FRAME_LEN);
    dec.push(&out);
    let mut frames = Vec::new();
    while let Some(f) = dec.poll_frame().expect("valid frames") {
        frames.push(f);
    }
    assert_eq!(dec.buffered(), 0);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for f in &frames {
        if let Frame::CommandOutput(o) = f {
            assert_eq!(o.command_id, req.command_id);
            match o.stream {
                OutputStream::Stdout => stdout.extend_from_slice(&o.data),
                OutputStream::Stderr => stderr.extend_from_slice(&o.data),
            }
        }
    }
    match frames.last() {
        Some(Frame::CommandResult(r)) => {
            assert_eq!(r.command_id, req.command_id);
            assert_eq!(r.outcome, outcome);
        }
        other => panic!("last frame is not a result: {other:?}"),
    }
    Ran {
        outcome,
        stdout,
        stderr,
        frames,
    }
}

fn failure(outcome: &CommandOutcome) -> FailureReason {
    match outcome {
        CommandOutcome::Failed { reason, .. } => *reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn echo_streams_stdout_and_exits_zero() {
    let r = run(&runner(AgentConfig::default()), &req(1, &["echo", "hi"])).await;
    assert_eq!(r.stdout, b"hi\n");
    assert!(r.stderr.is_empty());
    assert_eq!(r.outcome, CommandOutcome::Exited(0));
}

#[tokio::test]
async fn stderr_is_separate_and_exit_code_propagates() {
    let r = run(
        &runner(AgentConfig::default()),
        &req(2, &["sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.outcome, CommandOutcome::Exited(3));
}

#[tokio::test]
async fn deadline_kills_the_process() {
    let mut request = req(3, &["sleep", "10"]);
    request.deadline_ms = 200;
    let started = std::time::Instant::now();
    let r = run(&runner(AgentConfig::default()), &request).await;
    assert_eq!(failure(&r.outcome), FailureReason::TimedOut);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn busy_when_over_the_limit() {
    let runner = runner(AgentConfig {
        max_concurrent_commands: 1,
        ..AgentConfig::default()
    });
    let held = runner.admit(&req(4, &["true"])).expect("first slot");
    assert_eq!(runner.running(), 1);
    let r = run(&runner, &req(5, &["echo", "no"])).await;
    assert_eq!(failure(&r.outcome), FailureReason::Busy);
    assert!(r.stdout.is_empty());
    drop(held);
    let r = run(&runner, &req(6, &["echo", "yes"])).await;
    assert_eq!(r.outcome, CommandOutcome::Exited(0));
    assert_eq!(runner.running(), 0);
}

#[tokio::test]
async fn env_allowlist_passes_only_named_variables() {
    let runner = CommandRunner::with_env(
        &AgentConfig::default(),
        test_env(&[("TETHER_FOO", "foo-value"), ("TETHER_BAR", "bar-value")]),
    );
    let mut request = req(7, &["env"]);
    request.env_allowlist = vec!["TETHER_FOO".into(), "TETHER_ABSENT".into()];
    let r = run(&runner, &request).await;
    assert_eq!(r.outcome, CommandOutcome::Exited(0));
    let out = String::from_utf8(r.stdout).unwrap();
    let mut names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort();
    assert_eq!(names, ["PATH", "TETHER_FOO"], "{out}");
    assert!(out.contains("TETHER_FOO=foo-value"));
}

#[tokio::test]
async fn empty_argv_and_disallowed_shell_are_refused() {
    let runner = runner(AgentConfig::default());
    let r = run(&runner, &req(8, &[])).await;
    assert_eq!(failure(&r.outcome), FailureReason::Refused);
    assert_eq!(r.frames.len(), 1);
    let mut shell = req(9, &["echo", "hi"]);
    shell.kind = CommandKind::Shell;
    let r = run(&runner, &shell).await;
    assert_eq!(failure(&r.outcome), FailureReason::Refused);
}

#[tokio::test]
async fn shell_runs_when_allowed() {
    let runner = runner(AgentConfig {
        allow_shell: true,
        ..AgentConfig::default()
    });
    let mut shell = req(10, &["echo", "$((1+2))"]);
    shell.kind = CommandKind::Shell;
    let r = run(&runner, &shell).await;
    assert_eq!(r.stdout, b"3\n");
    assert_eq!(r.outcome, CommandOutcome::Exited(0));
}

#[tokio::test]
async fn output_is_chunked() {
    let runner = runner(AgentConfig {
        output_chunk_bytes: 4,
        ..AgentConfig::default()
    });
    let r = run(&runner, &req(11, &["printf", "abcdefghij"])).await;
    assert_eq!(r.stdout, b"abcdefghij");
    for f in &r.frames {
        if let Frame::CommandOutput(o) = f {
            assert!(o.data.len() <= 4);
        }
    }
}

#[tokio::test]
async fn missing_program_is_a_spawn_failure() {
    let r = run(
        &runner(AgentConfig::default()),
        &req(12, &["/nonexistent/tether-test-program"]),
    )
    .await;
    assert_eq!(failure(&r.outcome), FailureReason::SpawnFailed);
}

#[tokio::test]
async fn killed_by_a_signal_is_reported() {
    let r = run(
        &runner(AgentConfig::default()),
        &req(13, &["sh", "-c", "kill -9 $$"]),
    )
    .await;
    assert_eq!(
        r.outcome,
        CommandOutcome::Failed {
            reason: FailureReason::Signaled,
            message: "signal 9".into()
        }
    );
}

#[tokio::test]
async fn cancellation_kills_and_reports_cancelled() {
    let cancel = CancellationToken::new();
    cancel.cancel();
    let r = run_with(
        &runner(AgentConfig::default()),
        &req(14, &["sleep", "10"]),
        &cancel,
    )
    .await;
    assert_eq!(failure(&r.outcome), FailureReason::Cancelled);
}
