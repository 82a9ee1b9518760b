//! Reconnect storms: the broker admits handshakes through a bounded queue and turns the
//! excess away at once (QUIC CONNECTION_REFUSED, no crypto spent), counting each refusal,
//! instead of letting every handshake time out.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_storm_beyond_the_queue_is_refused_early_and_counted() {
    let setup = Setup::new();
    let leaf = setup.pki.appliance("app-1").unwrap();
    setup.set_allowlist(&[("app-1", &leaf)]);
    let broker = setup.broker(
        "b1",
        "[limits]\nmax_concurrent_handshakes = 1\nmax_pending_handshakes = 2\npending_timeout = \"5s\"\n",
    );

    // 200 handshakes at once from one client socket.
    let (endpoint, config) = raw_client(&setup.pki, Some(&leaf));
    let attempts: Vec<_> = (0..200)
        .map(|_| {
            let connecting = endpoint
                .connect_with(config.clone(), broker.quic, "localhost")
                .unwrap();
            tokio::spawn(
                async move { tokio::time::timeout(Duration::from_secs(20), connecting).await },
            )
        })
        .collect();
    let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
    for a in attempts {
        match a.await.unwrap() {
            Ok(Ok(conn)) => {
                ok += 1;
                conn.close(0u32.into(), b"");
            }
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                refused += 1
            }
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push("client timeout".into()),
        }
    }
    eprintln!(
        "storm of 200: {ok} admitted, {refused} refused, {} other",
        other.len()
    );
    let mut kinds = other.clone();
    kinds.sort();
    kinds.dedup();
    assert!(
        other.is_empty(),
        "every attempt got a definite answer: {kinds:?}"
    );
    assert!(ok >= 1, "the queue admitted some");
    assert!(refused >= 1, "the excess was refused");
    assert_eq!(ok + refused, 200);
    let counted = broker
        .metric("tether_incoming_refused_total{reason=\"queue_full\"}")
        .await;
    assert_eq!(counted as usize, refused);

    // The broker is healthy afterwards.
    assert_eq!(
        try_session(&setup.pki, Some(&leaf), broker.quic).await,
        None
    );
}
