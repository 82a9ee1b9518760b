//! The real `tether-agent` binary against the real `tether-broker`: session, commands with
//! streamed output through the admin API, deadlines, and drain to a second broker.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;

#[tokio::test]
async fn agent_connects_and_runs_a_command_with_streamed_output() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker("b1", "");
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[broker.quic], &[]);
    let row = broker.wait_session("app-1").await;
    assert_eq!(row["fingerprint"], leaf.fingerprint_hex());
    assert_eq!(row["agent_version"], env!("CARGO_PKG_VERSION"));

    // stdout, stderr and the exit code, kept apart.
    let (status, lines) = run_command(
        &broker,
        "app-1",
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"], "timeout_ms": 10000}),
    )
    .await;
    assert_eq!(status, 200);
    let stdout: String = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    let stderr: String = lines
        .iter()
        .filter(|l| l["stream"] == "stderr")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    assert_eq!(stdout, "out\n");
    assert_eq!(stderr, "err\n");
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 3}));

    // Output streams while the command runs: the command prints, then waits until the
    // test has *seen* that line before it prints again and exits.
    let flag = setup.dir.path().join("go-on");
    let script = format!(
        "echo first; while [ ! -e {} ]; do sleep 0.02; done; echo second",
        flag.display()
    );
    let resp = common::http()
        .post(broker.url("/v1/sessions/app-1/commands"))
        .json(&json!({"argv": ["sh", "-c", script], "timeout_ms": 20000}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains('\n') {
        seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    let first: serde_json::Value = serde_json::from_str(seen.lines().next().unwrap()).unwrap();
    assert_eq!(first, json!({"stream": "stdout", "data": "first\n"}));
    std::fs::write(&flag, b"").unwrap();
    while let Some(chunk) = body.next().await {
        seen.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(seen.contains("second"), "{seen}");
    assert!(seen.trim_end().ends_with("{\"exit_code\":0}"), "{seen}");
}

#[tokio::test]
async fn command_errors_are_definite() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker("b1", "");
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[broker.quic], &[]);
    broker.wait_session("app-1").await;

    // Not connected: 404 with a stable code.
    let (status, lines) = run_command(&broker, "app-404", json!({"argv": ["true"]})).await;
    assert_eq!(status, 404);
    assert_eq!(lines[0]["error"], "not_connected");
    // Bad input: 400.
    let (status, lines) = run_command(&broker, "app-1", json!({"argv": []})).await;
    assert_eq!(status, 400);
    assert_eq!(lines[0]["error"], "bad_request");
    let (status, _) = run_command(&broker, "app-1", json!({"nope": 1})).await;
    assert_eq!(status, 400);
    // Deadline: the agent kills the process and says so.
    let (status, lines) = run_command(
        &broker,
        "app-1",
        json!({"argv": ["sleep", "30"], "timeout_ms": 300}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(lines.last().unwrap()["error"], "timed_out");
    // Program that does not exist.
    let (_, lines) = run_command(&broker, "app-1", json!({"argv": ["/nonexistent/prog"]})).await;
    assert_eq!(lines.last().unwrap()["error"], "spawn_failed");
    // Shell kind is refused unless the agent announced the shell capability, by the
    // broker itself: nothing reaches the agent.
    let (status, lines) = run_command(
        &broker,
        "app-1",
        json!({"argv": ["echo hi"], "kind": "shell"}),
    )
    .await;
    assert_eq!(status, 409, "{lines:?}");
    assert_eq!(lines[0]["error"], "shell_not_allowed");
    assert!(
        broker
            .metric("tether_commands_total{result=\"timed_out\"}")
            .await
            >= 1.0
    );
}

/// A broker configured with a 4 KiB frame limit announces it in `Welcome`; the agent cuts
/// 100 KiB of output to fit and it arrives whole (before, its 16 KiB chunks were refused
/// as oversized frames and the connection closed). An agent allowed to run shell
/// commands announces it, and the broker sends them.
#[tokio::test]
async fn output_fits_a_small_broker_frame_limit_and_shell_runs_when_announced() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker("b1", "[session]\nmax_frame_len = 4096\n");
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[broker.quic], &["--allow-shell"]);
    let row = broker.wait_session("app-1").await;
    // Over QUIC (the transport notices a silent broker itself) it also takes sparse,
    // quiet heartbeat answers, and keeps the path alive with QUIC PINGs between sparse
    // heartbeats.
    assert_eq!(
        row["capabilities"],
        json!([
            "exec",
            "shell",
            "max_frame_len",
            "sparse-heartbeat-acks/1",
            "quiet-heartbeats/1",
            "sparse-heartbeats/1"
        ])
    );

    let (status, lines) = run_command(
        &broker,
        "app-1",
        json!({"argv": ["seq", "1", "20000"], "timeout_ms": 20000}),
    )
    .await;
    assert_eq!(status, 200);
    let stdout: String = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 100 * 1024);
    assert_eq!(stdout.len(), expected.len());
    assert!(stdout == expected, "output differs");
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}));
    assert_eq!(
        broker
            .metric("tether_protocol_errors_total{kind=\"frame_too_large\"}")
            .await,
        0.0
    );

    let (status, lines) = run_command(
        &broker,
        "app-1",
        json!({"argv": ["echo", "$((6*7))"], "kind": "shell"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(lines[0], json!({"stream": "stdout", "data": "42\n"}));
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}));
}

#[tokio::test]
async fn sigterm_drains_the_broker_and_the_agent_moves_to_the_other() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let drain = "[drain]\ntimeout = \"5s\"\nreconnect_jitter = \"200ms\"\n";
    let mut b1 = setup.broker("b1", drain);
    let mut b2 = setup.broker("b2", drain);
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[b1.quic, b2.quic], &[]);

    // The agent starts at a random broker of its list: find which one holds it.
    let on_b1 = wait_for(Duration::from_secs(15), || async {
        if !b1.sessions().await.is_empty() {
            Some(true)
        } else if !b2.sessions().await.is_empty() {
            Some(false)
        } else {
            None
        }
    })
    .await
    .expect("agent connected somewhere");
    let (first, second) = if on_b1 {
        (&mut b1, &mut b2)
    } else {
        (&mut b2, &mut b1)
    };

    first.terminate();
    let row = second.wait_session("app-1").await;
    assert_eq!(row["fingerprint"], leaf.fingerprint_hex());
    let status = first.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "drained broker exits cleanly: {status}");
    assert!(first.log_contains("draining"));
    assert!(
        first.log_contains("drain finished"),
        "the agent left on GoAway before the timeout"
    );
}

/// At the default 25 s interval the agent's heartbeats are sparse (`sparse-heartbeats/1`):
/// one at the first interval, then one in four, QUIC keep-alive PINGs in between. The
/// broker's QUIC idle timeout here is 30 s, so without the PINGs the connection would die
/// about 54 s in (30 s after the first heartbeat, the next being due at 99 s): at 66 s it
/// is the same session, with still only the first heartbeat seen, and runs a command.
#[tokio::test]
async fn quic_keep_alives_carry_a_session_between_sparse_heartbeats() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    // Keys before any table header belong to the template's `[transport]`.
    let broker = setup.broker("b1", "idle_timeout = \"30s\"\n");
    let state = setup.agent_state("app-1", &leaf);
    let _agent = AgentProc::start(&state, &[broker.quic], &[]);
    let row = broker.wait_session("app-1").await;
    let up = std::time::Instant::now();
    assert!(row["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("sparse-heartbeats/1")));
    let session_id = row["session_id"].clone();

    // The first heartbeat, a little before 25 s.
    let first = wait_for(Duration::from_secs(40), || async {
        let row = broker.wait_session("app-1").await;
        let hb = row["last_heartbeat_ms"].as_i64().unwrap();
        (hb > 0).then_some(hb)
    })
    .await
    .expect("the first heartbeat");
    tokio::time::sleep(Duration::from_secs(66).saturating_sub(up.elapsed())).await;
    let row = broker.wait_session("app-1").await;
    assert_eq!(
        row["session_id"], session_id,
        "the session was replaced: {row}"
    );
    assert_eq!(
        row["last_heartbeat_ms"].as_i64().unwrap(),
        first,
        "a heartbeat between the first and the fifth interval"
    );
    let (status, lines) = run_command(&broker, "app-1", json!({"argv": ["true"]})).await;
    assert_eq!(status, 200);
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 0}));
}
