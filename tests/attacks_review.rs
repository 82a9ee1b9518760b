//! Attacks from the trust-path review, against a real `tether-broker` process. Each test is
//! named after the rule it defends and asserts the exact refusal.

mod common;

use std::time::Duration;

use common::*;
use tether_proto::CloseCode;

const REVOKED: u64 = CloseCode::Revoked.code() as u64;
const PROTOCOL_ERROR: u64 = CloseCode::ProtocolError.code() as u64;

/// An agent that resets its own session stream leaves the session table; the broker must
/// close the connection too. Left open, it is an authenticated connection that no
/// revocation can reach (revocation closes what is in the table) and that the peer can keep
/// alive for ever, one more per reconnect.
#[tokio::test]
async fn a_session_that_leaves_the_table_leaves_no_live_connection() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &a)]);
    let broker = setup.broker("b1", "");

    let conn = connect(&setup.pki, Some(&a), broker.quic).await.unwrap();
    let (mut send, mut recv, _) = hello(&conn).await.unwrap();
    broker.wait_session("app-a").await;

    // Abandon the session stream, keep the connection.
    send.reset(0u32.into()).unwrap();
    recv.stop(0u32.into()).unwrap();
    let gone = wait_for(Duration::from_secs(10), || async {
        broker.sessions().await.is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "session left the table");

    // Revoking the certificate must not leave it behind either.
    setup.set_allowlist(&[]);
    let end = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the broker closed the connection");
    assert_eq!(ended(&end), Ended::App(PROTOCOL_ERROR));
}

/// A certificate revoked after its handshake but before its `Hello` is refused at `Hello`
/// without ever entering the session table, so it cannot knock the appliance's live session
/// (on its renewed, still pinned certificate) off as "superseded".
#[tokio::test]
async fn revoked_certificate_cannot_supersede_a_live_session() {
    let setup = Setup::new();
    let old = setup.pki.appliance("app-a").unwrap();
    let renewed = setup.pki.appliance("app-a").unwrap();
    assert_ne!(old.fingerprint_hex(), renewed.fingerprint_hex());
    setup.set_allowlist(&[("app-a", &old), ("app-a", &renewed)]);
    let broker = setup.broker("b1", "");

    // The holder of the old key completes a handshake and waits.
    let stale = connect(&setup.pki, Some(&old), broker.quic).await.unwrap();
    // The appliance itself is connected on its renewed certificate.
    let live = connect(&setup.pki, Some(&renewed), broker.quic)
        .await
        .unwrap();
    let (_s, _r, welcome) = hello(&live).await.unwrap();
    broker.wait_session("app-a").await;

    // The old certificate is revoked (the overlap window ended, or the key leaked).
    setup.set_allowlist(&[("app-a", &renewed)]);
    broker.wait_metric("tether_allowlist_version", 2.0).await;

    // Now the stale connection says Hello: refused as revoked.
    assert!(
        hello(&stale).await.is_err(),
        "no Welcome for a revoked cert"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), stale.closed())
        .await
        .expect("stale connection closed");
    assert_eq!(ended(&end), Ended::App(REVOKED));

    // The live session was not superseded.
    let rows = broker.sessions().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["session_id"], welcome.session_id);
    assert_eq!(rows[0]["fingerprint"], renewed.fingerprint_hex());
    assert!(live.close_reason().is_none(), "{:?}", live.close_reason());
    assert_eq!(
        broker
            .metric("tether_sessions_closed_total{code=\"superseded\"}")
            .await,
        0.0
    );
}

/// TLS resumption would skip the verifier: a client that kept its TLS session state from
/// before a revocation must still be refused with `certificate_revoked`.
#[tokio::test]
async fn revoked_certificate_cannot_resume_a_tls_session() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &a)]);
    let broker = setup.broker("b1", "");

    // One client configuration (rustls resumption enabled by default) for both attempts.
    let (endpoint, config) = raw_client(&setup.pki, Some(&a));
    let first = endpoint
        .connect_with(config.clone(), broker.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    hello(&first).await.unwrap();
    first.close(0u32.into(), b"done");

    setup.set_allowlist(&[]);
    broker.wait_metric("tether_allowlist_version", 2.0).await;

    let second = endpoint
        .connect_with(config, broker.quic, "localhost")
        .unwrap()
        .into_0rtt();
    let end = match second {
        // No 0-RTT keys: the full handshake runs and must fail.
        Err(connecting) => match connecting.await {
            Ok(conn) => {
                let _ = tokio::time::timeout(Duration::from_secs(10), hello(&conn)).await;
                ended(&conn.closed().await)
            }
            Err(e) => ended(&e),
        },
        Ok((conn, _accepted)) => {
            let _ = tokio::time::timeout(Duration::from_secs(10), hello(&conn)).await;
            ended(&conn.closed().await)
        }
    };
    assert_eq!(end, Ended::Alert(alert::CERTIFICATE_REVOKED));
    assert!(broker.sessions().await.is_empty());
}

/// An appliance that never lets the broker open a command stream (no stream credit) must
/// not hold the operator's command request for ever: the request ends by its deadline.
#[tokio::test]
async fn appliance_cannot_hang_a_command_request_past_its_deadline() {
    let setup = Setup::new();
    let a = setup.pki.appliance("app-a").unwrap();
    setup.set_allowlist(&[("app-a", &a)]);
    let broker = setup.broker("b1", "");

    let (endpoint, mut config) = raw_client(&setup.pki, Some(&a));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(0u32.into());
    config.transport_config(std::sync::Arc::new(transport));
    let conn = endpoint
        .connect_with(config, broker.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    let _session = hello(&conn).await.unwrap();
    broker.wait_session("app-a").await;

    let (status, lines) = tokio::time::timeout(
        Duration::from_secs(15),
        run_command(
            &broker,
            "app-a",
            serde_json::json!({ "argv": ["true"], "timeout_ms": 500 }),
        ),
    )
    .await
    .expect("the command request ended");
    assert_eq!(status, 502, "{lines:?}");
    assert_eq!(lines[0]["error"], "connection_lost", "{lines:?}");
    assert!(conn.close_reason().is_none(), "the session itself stays");
}
