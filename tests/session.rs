//! Live-session behaviour of a real `tether-broker`: revocation by editing the allowlist,
//! supersede, bad input on the wire, and a malformed allowlist file.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::*;
use tether_proto::{
    encode_frame, CloseCode, CommandKind, CommandOutcome, CommandOutput, CommandResult, Frame,
    FrameDecoder, Heartbeat, OutputStream, TrustState, DEFAULT_MAX_FRAME_LEN,
};

const REVOKED: u64 = CloseCode::Revoked.code() as u64;
const SUPERSEDED: u64 = CloseCode::Superseded.code() as u64;
const PROTOCOL_ERROR: u64 = CloseCode::ProtocolError.code() as u64;

#[tokio::test]
async fn removing_a_fingerprint_closes_the_live_session_and_blocks_reconnect() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    let b = setup.pki.appliance("app-b").unwrap();
    setup.set_allowlist(&[("app-a", &a), ("app-b", &b)]);
    let broker = setup.broker("b1", "");

    let conn_a = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let _sa = hello(&conn_a).await.unwrap();
    let conn_b = connect(&setup.pki, Some(&b), broker.quic).await.unwrap();
    let _sb = hello(&conn_b).await.unwrap();
    broker.wait_session("app-a").await;

    // Revoke A by rewriting the file without its line.
    let started = Instant::now();
    setup.set_allowlist(&[("app-b", &b)]);
    let end = tokio::time::timeout(Duration::from_secs(10), conn_a.closed())
        .await
        .expect("session closed");
    let took = started.elapsed();
    assert_eq!(ended(&end), Ended::App(REVOKED));
    eprintln!("revocation: file rewritten -> session closed in {took:?}");

    // B is untouched.
    assert!(conn_b.close_reason().is_none());
    assert_eq!(broker.metric("tether_sessions_revoked_total").await, 1.0);
    // A can never handshake again with that certificate.
    assert_eq!(
        try_session(&setup.pki, Some(&a), broker.quic).await,
        Some(Ended::Alert(alert::CERTIFICATE_REVOKED))
    );
    let rows = broker.sessions().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["appliance_id"], "app-b");
}

#[tokio::test]
async fn sighup_reloads_the_allowlist() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[]);
    let broker = setup.broker("b1", "");
    assert!(try_session(&setup.pki, Some(&a), broker.quic)
        .await
        .is_some());
    setup.set_allowlist(&[("app-a", &a)]);
    broker.hangup();
    let ok = wait_for(Duration::from_secs(10), || async {
        try_session(&setup.pki, Some(&a), broker.quic)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(ok.is_some(), "pinned after reload");
}

#[tokio::test]
async fn a_second_session_supersedes_the_first() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &a)]);
    let broker = setup.broker("b1", "");
    let first = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let (_s1, _r1, w1) = hello(&first).await.unwrap();
    let second = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let (_s2, _r2, w2) = hello(&second).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), first.closed())
        .await
        .unwrap();
    assert_eq!(ended(&end), Ended::App(SUPERSEDED));
    assert!(second.close_reason().is_none());
    let row = broker.wait_session("app-a").await;
    assert_eq!(row["session_id"], w2.session_id);
    assert_ne!(w1.session_id, w2.session_id);
}

/// Open a session, send `bytes` on the session stream, and return how the broker ended it.
async fn send_raw(
    setup: &Setup,
    broker: &BrokerProc,
    leaf: &tether::pki::Leaf,
    bytes: &[u8],
) -> Ended {
    let conn = connect(&setup.pki, Some(leaf), broker.quic).await.unwrap();
    let (mut send, _recv, _w) = hello(&conn).await.unwrap();
    // The write may fail once the broker has closed; the close reason is what matters.
    let _ = send.write_all(bytes).await;
    let end = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("broker closed the connection");
    ended(&end)
}

#[tokio::test]
async fn bad_input_closes_only_that_connection_with_protocol_error() {
    let setup = Setup::new();
    let bad = setup.pki.appliance("app-bad").unwrap();
    let good = setup.pki.appliance("app-good").unwrap();
    setup.set_allowlist(&[("app-bad", &bad), ("app-good", &good)]);
    let broker = setup.broker("b1", "");
    let good_conn = connect(&setup.pki, Some(&good), broker.quic).await.unwrap();
    let (mut good_send, _good_recv, _) = hello(&good_conn).await.unwrap();

    // Oversized frame: a length prefix of 1 MiB (the limit is 64 KiB), refused before the
    // body arrives.
    let mut oversized = BytesMut::new();
    oversized.put_u32(1 << 20);
    oversized.put_u8(0x03);
    assert_eq!(
        send_raw(&setup, &broker, &bad, &oversized).await,
        Ended::App(PROTOCOL_ERROR)
    );

    // Garbage: a valid length with a body that is not a frame.
    let garbage = [0u8, 0, 0, 5, 0x03, 0xde, 0xad, 0xbe, 0xef];
    assert_eq!(
        send_raw(&setup, &broker, &bad, &garbage).await,
        Ended::App(PROTOCOL_ERROR)
    );

    // Unknown frame type.
    let unknown = [0u8, 0, 0, 1, 0x7f];
    assert_eq!(
        send_raw(&setup, &broker, &bad, &unknown).await,
        Ended::App(PROTOCOL_ERROR)
    );

    // A frame the agent must never send (Welcome is broker -> agent).
    let mut wrong_dir = BytesMut::new();
    encode_frame(
        &Frame::Welcome(tether_proto::Welcome {
            protocol_version: 1,
            session_id: 1,
            heartbeat_interval_ms: 1,
            server_time_ms: 0,
            manual_renewal_generation: 0,
            max_frame_len: None,
            capabilities: Vec::new(),
        }),
        &mut wrong_dir,
        65536,
    )
    .unwrap();
    assert_eq!(
        send_raw(&setup, &broker, &bad, &wrong_dir).await,
        Ended::App(PROTOCOL_ERROR)
    );

    // Stream flood: the agent may open only its session stream.
    let conn = connect(&setup.pki, Some(&bad), broker.quic).await.unwrap();
    let _session = hello(&conn).await.unwrap();
    for _ in 0..64 {
        let Ok(Ok((mut s, _r))) =
            tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await
        else {
            break;
        };
        if s.write_all(b"\0\0\0\x01\x03").await.is_err() {
            break;
        }
    }
    let end = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert_eq!(ended(&end), Ended::App(PROTOCOL_ERROR));

    // Each was counted by kind.
    for kind in [
        "frame_too_large",
        "malformed_frame",
        "unknown_frame_type",
        "unexpected_frame",
        "extra_stream",
    ] {
        let v = broker
            .metric(&format!("tether_protocol_errors_total{{kind=\"{kind}\"}}"))
            .await;
        assert!(v >= 1.0, "{kind} counted");
    }

    // The well-behaved appliance was never disturbed and still talks.
    assert!(good_conn.close_reason().is_none());
    let mut hb = BytesMut::new();
    encode_frame(
        &Frame::Heartbeat(Heartbeat {
            seq: 1,
            trust_state: TrustState::Trusted,
            cert_not_after_ms: 0,
        }),
        &mut hb,
        65536,
    )
    .unwrap();
    good_send.write_all(&hb).await.unwrap();
    let row =
        wait_for(Duration::from_secs(10), || async {
            broker.sessions().await.into_iter().find(|s| {
                s["appliance_id"] == "app-good" && s["last_heartbeat_ms"].as_i64() > Some(0)
            })
        })
        .await;
    assert!(row.is_some(), "heartbeat from the good appliance recorded");
}

#[tokio::test]
async fn malformed_allowlist_is_refused_whole_and_the_previous_snapshot_stays() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &a)]);
    let broker = setup.broker("b1", "");
    let conn = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let _s = hello(&conn).await.unwrap();

    // A file that drops app-a *and* has a bad line: refused as a whole, so app-a is not
    // revoked by the half that parsed.
    write_atomic(
        &setup.allowlist_path(),
        "# broken\napp-b not-a-fingerprint\n",
    );
    broker
        .wait_metric("tether_allowlist_reloads_total{result=\"error\"}", 1.0)
        .await;
    assert!(broker.log_contains("previous snapshot stays in force"));
    assert!(conn.close_reason().is_none(), "live session kept");
    assert_eq!(try_session(&setup.pki, Some(&a), broker.quic).await, None);
    assert_eq!(broker.metric("tether_allowlist_entries").await, 1.0);
}

/// Accept the next command stream the broker opens on `conn` and read its request.
async fn accept_command(
    conn: &quinn::Connection,
) -> (
    quinn::SendStream,
    quinn::RecvStream,
    tether_proto::CommandRequest,
) {
    let (send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .expect("a command stream")
        .unwrap();
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    loop {
        if let Some(f) = dec.poll_frame().unwrap() {
            let Frame::CommandRequest(req) = f else {
                panic!("expected a command request, got {f:?}")
            };
            return (send, recv, req);
        }
        let chunk = recv
            .read_chunk(65536, true)
            .await
            .unwrap()
            .expect("request");
        dec.push(&chunk.bytes);
    }
}

fn frames(frames: &[Frame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in frames {
        encode_frame(f, &mut buf, DEFAULT_MAX_FRAME_LEN).unwrap();
    }
    buf.to_vec()
}

/// How a command stream may end, as `docs/PROTOCOL.md` §6.1 states it, against a raw
/// client that does whatever it is told: no shell command for an agent that did not
/// announce `shell`; a stream finished without a result fails the command and keeps the
/// session; a frame after the result closes the connection after the result was delivered;
/// a reset session stream closes the connection with `protocol_error`.
#[tokio::test]
async fn command_stream_endings_and_the_shell_capability_are_enforced() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &a)]);
    let broker = setup.broker("b1", "");
    let conn = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    // `hello` announces no capability at all.
    let (_send, _recv, welcome) = hello(&conn).await.unwrap();
    assert_eq!(welcome.max_frame_len, None, "not asked for");
    broker.wait_session("app-a").await;

    // 1. Shell to an agent without `shell`: refused by the broker, nothing is sent. The
    //    next stream this client sees is the exec command that follows.
    let (status, lines) = run_command(
        &broker,
        "app-a",
        serde_json::json!({ "argv": ["echo hi"], "kind": "shell" }),
    )
    .await;
    assert_eq!(status, 409, "{lines:?}");
    assert_eq!(lines[0]["error"], "shell_not_allowed");
    assert_eq!(
        broker
            .metric("tether_commands_total{result=\"shell_not_allowed\"}")
            .await,
        1.0
    );

    // 2. Finished without a result.
    let b = &broker;
    let request = || {
        run_command(
            b,
            "app-a",
            serde_json::json!({ "argv": ["true"], "timeout_ms": 10000 }),
        )
    };
    let agent = async {
        let (mut send, _recv, req) = accept_command(&conn).await;
        assert_eq!(req.kind, CommandKind::Exec);
        let out = Frame::CommandOutput(CommandOutput {
            command_id: req.command_id,
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from_static(b"partial\n"),
        });
        send.write_all(&frames(&[out])).await.unwrap();
        send.finish().unwrap();
        send
    };
    let ((status, lines), _send) = tokio::join!(request(), agent);
    assert_eq!(status, 200);
    assert_eq!(
        lines.last().unwrap(),
        &serde_json::json!({"error": "protocol_error", "message": "command stream ended without a result"})
    );
    assert!(conn.close_reason().is_none(), "the session stays");
    assert_eq!(
        broker
            .metric("tether_protocol_errors_total{kind=\"command_without_result\"}")
            .await,
        1.0
    );

    // 3. A frame after the result: the operator gets the result, then the connection is
    //    closed with protocol_error.
    let agent = async {
        let (mut send, _recv, req) = accept_command(&conn).await;
        let result = Frame::CommandResult(CommandResult {
            command_id: req.command_id,
            outcome: CommandOutcome::Exited(0),
        });
        let late = Frame::CommandOutput(CommandOutput {
            command_id: req.command_id,
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from_static(b"late\n"),
        });
        let _ = send.write_all(&frames(&[result])).await;
        let _ = send.write_all(&frames(&[late])).await;
        let _ = send.finish();
        send
    };
    let ((status, lines), _send) = tokio::join!(request(), agent);
    assert_eq!(status, 200);
    assert_eq!(lines.last().unwrap(), &serde_json::json!({"exit_code": 0}));
    let end = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed");
    assert_eq!(ended(&end), Ended::App(PROTOCOL_ERROR));
    assert_eq!(
        broker
            .metric("tether_protocol_errors_total{kind=\"frame_after_result\"}")
            .await,
        1.0
    );

    // 4. A reset session stream ends the session with protocol_error.
    let conn = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let (mut send, _recv, _) = hello(&conn).await.unwrap();
    send.reset(7u32.into()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed");
    assert_eq!(ended(&end), Ended::App(PROTOCOL_ERROR));
    assert_eq!(
        broker
            .metric("tether_protocol_errors_total{kind=\"session_stream_reset\"}")
            .await,
        1.0
    );
}

/// Signed operations on the wire (docs/PROTOCOL.md §11), against a raw client: an approval
/// for an agent that did not announce `signed-ops/1` is refused before anything is sent;
/// an agent that did gets the extension with the exact approval bytes, and its manifest
/// reaches the operator before the result; a frame after the manifest other than the
/// result closes the connection with `protocol_error`.
#[tokio::test]
async fn signed_ops_frames_are_relayed_and_their_order_enforced() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    let b = setup.pki.appliance("app-b").unwrap();
    setup.set_allowlist(&[("app-a", &a), ("app-b", &b)]);
    let broker = setup.broker("b1", "");
    let plain = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let _plain_session = hello(&plain).await.unwrap();
    broker.wait_session("app-a").await;
    let (status, lines) = run_command(
        &broker,
        "app-a",
        serde_json::json!({"argv": ["true"], "approval": "{}", "approval_sig": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{lines:?}");
    assert!(lines[0]["message"]
        .as_str()
        .unwrap()
        .contains("signed-ops/1"));

    let conn = connect(&setup.pki, Some(&b), broker.quic).await.unwrap();
    let _session = hello_with(&conn, &["exec", "signed-ops/1"]).await.unwrap();
    broker.wait_session("app-b").await;
    let body = serde_json::json!({"argv": ["true"], "timeout_ms": 10000, "approval": "{\"a\":1}", "approval_sig": "SIG", "request_id": "r1"});
    let request = || run_command(&broker, "app-b", body.clone());
    // A manifest, then the result: both reach the operator, in order.
    let agent = async {
        let (mut send, _recv, req) = accept_command(&conn).await;
        let signed = req.signed.clone().expect("the extension");
        assert_eq!(
            (
                &signed.approval[..],
                &signed.approval_sig[..],
                signed.request_id.as_str()
            ),
            (&b"{\"a\":1}"[..], &b"SIG"[..], "r1")
        );
        let manifest = Frame::CommandManifest(tether_proto::CommandManifest {
            command_id: req.command_id,
            manifest: bytes::Bytes::from_static(b"{\"m\":1}"),
            sig: bytes::Bytes::from_static(b"MSIG"),
        });
        let result = Frame::CommandResult(CommandResult {
            command_id: req.command_id,
            outcome: CommandOutcome::Failed {
                reason: tether_proto::FailureReason::ApprovalInvalid,
                message: "no".into(),
            },
        });
        send.write_all(&frames(&[manifest, result])).await.unwrap();
        send.finish().unwrap();
        send
    };
    let ((status, lines), _send) = tokio::join!(request(), agent);
    assert_eq!(status, 200);
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"manifest": "{\"m\":1}", "manifest_sig": "MSIG"}),
            serde_json::json!({"error": "approval_invalid", "message": "no"}),
        ]
    );
    // Output after the manifest: a protocol error that closes the connection.
    let agent = async {
        let (mut send, _recv, req) = accept_command(&conn).await;
        let manifest = Frame::CommandManifest(tether_proto::CommandManifest {
            command_id: req.command_id,
            manifest: bytes::Bytes::from_static(b"{}"),
            sig: bytes::Bytes::new(),
        });
        let late = Frame::CommandOutput(CommandOutput {
            command_id: req.command_id,
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from_static(b"forged\n"),
        });
        let _ = send.write_all(&frames(&[manifest, late])).await;
        send
    };
    let ((_, lines), _send) = tokio::join!(request(), agent);
    assert_eq!(
        lines.last().unwrap()["error"],
        "protocol_error",
        "{lines:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed");
    assert_eq!(ended(&end), Ended::App(PROTOCOL_ERROR));
}
