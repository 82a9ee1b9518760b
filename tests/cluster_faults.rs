//! Faults across the whole system, with the real binaries on 127.0.0.1: `tether-control
//! serve`, two `tether-broker`s following it, appliances run by `tether-agent run`, the
//! operator's `tether` CLI.
//!
//! - Renewal with a short overlap: both certificates are admitted while it lasts, only
//!   the new one after it, and the appliance stays connected throughout.
//! - Control killed: brokers keep their sessions, admit enrolled appliances and refuse
//!   revoked ones from what they hold; a broker that was down while control revoked
//!   resyncs when it returns; a broker restarted while control is away enforces its
//!   on-disk snapshot (stale) until control is back.
//! - A broker SIGKILLed: a command in flight through it fails as lost, not a hang; its
//!   appliances move to the other broker and commands follow them.
//! - Control on PostgreSQL restarted: appliances, certificates, the revocation, brokers
//!   and the audit log are all there, the brokers' channels and presence come back.
//!
//! Measured times (reconnects, resyncs) are printed, never asserted.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::control::control;
use common::operators::audit_entries;
use common::pg::PgDb;
use common::{bin, wait_for, BrokerProc};
use serde_json::Value;
use tether_agent::{AgentConfig, Credentials};

const CONTROL_CONNECTED: &str = "tether_broker_control_connected";
const STALE: &str = "tether_broker_allowlist_stale";
const ACCEPTED: &str = "tether_handshakes_accepted_total";

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// What a broker decided about a certificate presented in a bare handshake.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Admitted,
    Refused,
}

/// Present `creds` to `broker` in a QUIC handshake only (no `Hello`, so no session that
/// would supersede the appliance's live one) and read the broker's verdict from its
/// counters: `handshakes_accepted` or `handshake_rejected{unknown_fingerprint}`.
async fn handshake_verdict(broker: &BrokerProc, creds: &Credentials) -> Verdict {
    let (accepted, refused) = (
        broker.metric(ACCEPTED).await,
        broker.metric(REFUSED_UNKNOWN).await,
    );
    let config = tether_agent::client_config(creds, &AgentConfig::default()).unwrap();
    let endpoint = tether_agent::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(config, broker.quic, "127.0.0.1")
        .unwrap();
    // The client may finish its side before the broker has judged the certificate; the
    // counters say what the broker decided.
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting).await;
    let verdict = wait_for(Duration::from_secs(10), || async {
        if broker.metric(REFUSED_UNKNOWN).await > refused {
            Some(Verdict::Refused)
        } else if broker.metric(ACCEPTED).await > accepted {
            Some(Verdict::Admitted)
        } else {
            None
        }
    })
    .await
    .expect("the broker judged the probe's certificate");
    if let Ok(Ok(conn)) = conn {
        conn.close(0u32.into(), b"probe");
    }
    endpoint.close(0u32.into(), b"probe");
    verdict
}

/// Copy the credential files of a state directory (what `tether-agent` keeps).
fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["client.key.pem", "client.cert.pem", "ca.cert.pem"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Parse an RFC 3339 time from control's JSON.
fn rfc3339(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        v.as_str().unwrap_or_else(|| panic!("not a time: {v}")),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_overlap_admits_both_certificates_then_only_the_new_one() {
    // An overlap long enough for the probes below on a loaded machine, a fast sweep.
    let mut c = Cluster::new("[enroll]\nrenewal_overlap = \"15s\"\noverlap_sweep = \"1s\"\n");
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let state = c.enroll("app-1");
    let old_dir = c.tmp().join("app-1-before-renewal");
    copy_state(&state, &old_dir);
    let old = Credentials::load(&old_dir).unwrap();
    let _agent = c.agent(&state, &[b1.quic]);
    let first = b1.wait_session("app-1").await;
    assert_eq!(first["fingerprint"], old.fingerprint());
    c.wait_connected("app-1", Some("edge-1")).await;

    // The operator asks for a renewal; the agent sees it on a heartbeat answer, renews over
    // mTLS and reconnects with the new certificate.
    let start = Instant::now();
    let out = c.tether(&["appliance", "renew", "app-1"]).expect("renew");
    assert!(out.contains("manual renewal generation 1"), "{out}");
    let renewed = wait_for(Duration::from_secs(30), || async {
        b1.sessions()
            .await
            .into_iter()
            .find(|s| s["appliance_id"] == "app-1" && s["fingerprint"] != old.fingerprint())
    })
    .await
    .expect("the agent reconnected with a renewed certificate");
    eprintln!(
        "renew request to session on the new certificate: {}",
        ms(start.elapsed())
    );
    let new = Credentials::load(&state).unwrap();
    assert_eq!(renewed["fingerprint"], new.fingerprint());
    assert_ne!(renewed["session_id"], first["session_id"]);

    // Control: a new current certificate, the old one previous until the overlap ends.
    let shown = c.show("app-1");
    let certs = shown["certificates"].as_array().unwrap();
    assert_eq!(certs[0]["fingerprint"], new.fingerprint(), "{shown}");
    assert_eq!(certs[0]["state"], "current", "{shown}");
    assert_eq!(certs[1]["fingerprint"], old.fingerprint(), "{shown}");
    assert_eq!(certs[1]["state"], "previous", "{shown}");
    let until = rfc3339(&certs[1]["previous_until"]);
    let conn = c.wait_connected("app-1", Some("edge-1")).await;
    assert_eq!(conn["fingerprint"], new.fingerprint(), "{conn}");

    // During the overlap the other broker admits both certificates.
    assert_eq!(handshake_verdict(&b2, &old).await, Verdict::Admitted);
    assert_eq!(handshake_verdict(&b2, &new).await, Verdict::Admitted);
    let left = until - time::OffsetDateTime::now_utc();
    assert!(
        left.is_positive(),
        "the probes ran after the overlap ended ({until}); the machine is too slow for a 15 s overlap"
    );
    eprintln!(
        "both certificates admitted with {:.1} s of the overlap left",
        left.as_seconds_f64()
    );

    // After it, the sweep drops the old certificate: both brokers refuse it.
    let refused = wait_for(Duration::from_secs(60), || async {
        (handshake_verdict(&b2, &old).await == Verdict::Refused).then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "edge-2 kept admitting the old certificate"
    );
    eprintln!(
        "old certificate refused {:.1} s after the overlap's end",
        (time::OffsetDateTime::now_utc() - until).as_seconds_f64()
    );
    assert_eq!(handshake_verdict(&b1, &old).await, Verdict::Refused);
    let shown = c.show("app-1");
    let old_row = shown["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["fingerprint"] == old.fingerprint())
        .cloned()
        .unwrap_or(Value::Null);
    assert_ne!(old_row["state"], "previous", "{shown}");
    assert_ne!(old_row["state"], "current", "{shown}");

    // The appliance stayed connected on the new certificate, in the same session.
    assert_eq!(handshake_verdict(&b2, &new).await, Verdict::Admitted);
    let now = b1.wait_session("app-1").await;
    assert_eq!(now["session_id"], renewed["session_id"], "{now}");
    assert_eq!(now["fingerprint"], new.fingerprint());
    let conn = c.wait_connected("app-1", Some("edge-1")).await;
    assert_eq!(conn["fingerprint"], new.fingerprint(), "{conn}");
    let (code, out, err) = c.exec(&["app-1", "--", "echo", "renewed"]);
    assert_eq!((code, out.as_str()), (0, "renewed\n"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_outlive_control_and_resync_when_it_returns() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let mut b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let s1 = c.enroll("app-1");
    let s2 = c.enroll("app-2");
    let s3 = c.enroll("app-3");
    let a1 = c.agent(&s1, &[b1.quic]);
    let a2 = c.agent(&s2, &[b2.quic]);
    let first1 = b1.wait_session("app-1").await;
    let first2 = b2.wait_session("app-2").await;
    c.wait_connected("app-1", Some("edge-1")).await;
    c.wait_connected("app-2", Some("edge-2")).await;
    // app-3 is revoked while control is up: both brokers refuse it.
    c.tether(&["appliance", "revoke", "app-3"]).expect("revoke");
    c.assert_refused(&s3, &b1, "app-3").await;
    c.assert_refused(&s3, &b2, "app-3").await;

    // --- Control dies.
    c.kill_control();
    let killed = Instant::now();
    for b in [&b1, &b2] {
        b.wait_metric_eq(CONTROL_CONNECTED, 0.0, Duration::from_secs(30))
            .await;
    }
    eprintln!(
        "control SIGKILLed → both brokers see the channel down: {}",
        ms(killed.elapsed())
    );
    for b in [&b1, &b2] {
        b.wait_metric(STALE, 1.0).await;
    }
    // Live sessions stay, the same ones.
    assert_eq!(
        b1.wait_session("app-1").await["session_id"],
        first1["session_id"]
    );
    assert_eq!(
        b2.wait_session("app-2").await["session_id"],
        first2["session_id"]
    );
    // A new connection of an enrolled appliance is admitted.
    drop(a1);
    let a1 = c.agent(&s1, &[b1.quic]);
    wait_for(Duration::from_secs(20), || async {
        b1.sessions()
            .await
            .into_iter()
            .find(|s| s["appliance_id"] == "app-1" && s["session_id"] != first1["session_id"])
    })
    .await
    .expect("app-1 reconnected to edge-1 while control is down");
    // The revoked one stays refused.
    c.assert_refused(&s3, &b1, "app-3").await;
    c.assert_refused(&s3, &b2, "app-3").await;

    // --- edge-2 is down while control (back) revokes app-2; it resyncs when it returns.
    // app-2's agent keeps knocking on edge-2's address all along, so it may come in on the
    // stale snapshot before the resync: the resync must throw it out.
    let b2_addr = b2.quic;
    b2.terminate();
    b2.wait_exit(Duration::from_secs(15));
    drop(b2);
    let restarted = Instant::now();
    c.restart_control();
    b1.wait_metric_eq(STALE, 0.0, Duration::from_secs(30)).await;
    eprintln!(
        "control restarted → edge-1 back in sync: {}",
        ms(restarted.elapsed())
    );
    c.tether(&["appliance", "revoke", "app-2"]).expect("revoke");
    c.assert_refused(&s2, &b1, "app-2").await;
    let started = Instant::now();
    let b2 = c.restart_broker("edge-2", b2_addr);
    b2.wait_metric_eq(STALE, 0.0, Duration::from_secs(30)).await;
    eprintln!(
        "edge-2 restarted on its data dir → in sync with control: {}",
        ms(started.elapsed())
    );
    assert_eq!(b2.metric(CONTROL_CONNECTED).await, 1.0);
    wait_for(Duration::from_secs(10), || async {
        (!b2.sessions()
            .await
            .iter()
            .any(|s| s["appliance_id"] == "app-2"))
        .then_some(())
    })
    .await
    .expect("edge-2 kept a session of the appliance revoked while it was down");
    eprintln!(
        "edge-2 sessions closed by the resync (app-2 admitted on the stale snapshot first): {}",
        b2.metric("tether_sessions_revoked_total").await
    );
    drop(a2);
    c.assert_refused(&s2, &b2, "app-2").await;
    wait_for(Duration::from_secs(10), || async {
        c.show("app-2")["connection"].is_null().then_some(())
    })
    .await
    .expect("control still shows the revoked app-2 connected");
    c.wait_brokers_up(2).await;
    // Control learned where app-1 is from edge-1 again; commands reach it.
    c.wait_connected("app-1", Some("edge-1")).await;
    let (code, out, err) = c.exec(&["app-1", "--", "echo", "after-restart"]);
    assert_eq!((code, out.as_str()), (0, "after-restart\n"), "{err}");

    // --- edge-1 restarts while control is down: it enforces its on-disk snapshot.
    c.kill_control();
    b1.wait_metric_eq(CONTROL_CONNECTED, 0.0, Duration::from_secs(30))
        .await;
    b1.wait_metric(STALE, 1.0).await;
    let b1_addr = b1.quic;
    let mut b1 = b1;
    b1.terminate();
    b1.wait_exit(Duration::from_secs(15));
    drop(b1);
    let b1 = c.restart_broker("edge-1", b1_addr);
    assert_eq!(b1.metric(STALE).await, 1.0, "a snapshot from disk is stale");
    assert_eq!(b1.metric(CONTROL_CONNECTED).await, 0.0);
    assert!(
        b1.log_contains("enforcing the allowlist snapshot from disk"),
        "edge-1 did not start from its snapshot"
    );
    // The running agent of app-1 comes back to it: admitted from the snapshot.
    let back = b1.wait_session("app-1").await;
    assert_ne!(back["session_id"], Value::Null);
    // Both revocations are in the snapshot (app-3 before the first kill, app-2 after).
    c.assert_refused(&s3, &b1, "app-3").await;
    c.assert_refused(&s2, &b1, "app-2").await;
    assert_eq!(b1.metric(STALE).await, 1.0);

    // Control returns: the gauge goes back to 0.
    let restarted = Instant::now();
    c.restart_control();
    b1.wait_metric_eq(STALE, 0.0, Duration::from_secs(30)).await;
    eprintln!(
        "control restarted → edge-1 (started from its snapshot) in sync: {}",
        ms(restarted.elapsed())
    );
    assert_eq!(b1.metric(CONTROL_CONNECTED).await, 1.0);
    c.wait_connected("app-1", Some("edge-1")).await;
    let (code, out, err) = c.exec(&["app-1", "--", "echo", "synced"]);
    assert_eq!((code, out.as_str()), (0, "synced\n"), "{err}");
    drop(a1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_fails_commands_in_flight_and_its_appliances_move() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let ids = ["app-1", "app-2", "app-3"];
    let mut agents = Vec::new();
    for id in ids {
        let state = c.enroll(id);
        agents.push(c.agent(&state, &[b1.quic, b2.quic]));
    }
    // Agents start at a random broker of their list: A is wherever app-1 landed.
    let mut on = Vec::new();
    for id in ids {
        let conn = c.wait_connected(id, None).await;
        on.push(conn["broker"].as_str().unwrap().to_owned());
    }
    let mut brokers = [("edge-1", b1), ("edge-2", b2)];
    let ia = brokers.iter().position(|(n, _)| *n == on[0]).unwrap();
    let (a_name, b_name) = (brokers[ia].0, brokers[1 - ia].0);
    let moving: Vec<&str> = ids
        .iter()
        .zip(&on)
        .filter(|(_, b)| *b == a_name)
        .map(|(id, _)| *id)
        .collect();
    eprintln!("on {a_name} (to be killed): {moving:?}; the others on {b_name}");
    brokers[ia].1.wait_session("app-1").await;

    // A command in flight through A.
    let mut inflight = Command::new(bin("tether"))
        .args([
            "exec",
            "app-1",
            "--timeout",
            "60s",
            "--",
            "sh",
            "-c",
            "echo started; sleep 30; echo finished",
        ])
        .env("TETHER_CONFIG_DIR", &c.ops)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(inflight.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");

    // kill -9 A.
    let killed = Instant::now();
    brokers[ia].1.child.kill().unwrap();
    brokers[ia].1.child.wait().unwrap();

    // The command fails as lost, long before its 30 s of sleep would end.
    let status = loop {
        if let Some(status) = inflight.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(25),
            "tether exec hung after its broker died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "broker SIGKILLed → tether exec of the in-flight command exited: {}",
        ms(killed.elapsed())
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut inflight.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(75), "stderr: {err}");
    assert!(err.contains("broker_lost"), "{err}");
    assert!(lines.next().is_none(), "no more output after the loss");

    // Its appliances reconnect to B; control says so; commands are routed there.
    let b = &brokers[1 - ia].1;
    for id in &moving {
        c.wait_connected(id, Some(b_name)).await;
        eprintln!(
            "broker SIGKILLed → {id} connected to {b_name} as control sees it: {}",
            ms(killed.elapsed())
        );
        b.wait_session(id).await;
    }
    for id in ids {
        assert_eq!(c.show(id)["connection"]["broker"], b_name);
        let (code, out, err) = c.exec(&[id, "--", "echo", id]);
        assert_eq!((code, out), (0, format!("{id}\n")), "{err}");
    }
    drop(agents);
}

/// `tether appliance list` as (id, status, tenant) rows.
fn appliance_rows(c: &Cluster) -> Vec<(String, String, String)> {
    let out = c
        .tether(&["appliance", "list", "--output", "json"])
        .expect("appliance list");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["appliances"]
        .as_array()
        .unwrap_or_else(|| panic!("no appliances in {v}"))
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
            (s("id"), s("status"), s("tenant"))
        })
        .collect()
}

/// `tether broker list` as (name, status) rows.
fn broker_rows(c: &Cluster) -> Vec<(String, String)> {
    let out = c
        .tether(&["broker", "list", "--output", "json"])
        .expect("broker list");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_on_postgres_restarts_with_everything_in_place() {
    let db = PgDb::create().await;
    let mut c = Cluster::with_init(&["--database-url", &db.url], "");
    assert!(
        !c.fleet.data.join("control.db").exists(),
        "control keeps its store in PostgreSQL, not SQLite"
    );
    let b1 = c.add_broker("edge-1");
    let b2 = c.add_broker("edge-2");
    c.wait_brokers_up(2).await;
    let s1 = c.enroll("app-1");
    let s2 = c.enroll("app-2");
    let s3 = c.enroll("app-3");
    let _a1 = c.agent(&s1, &[b1.quic]);
    let _a2 = c.agent(&s2, &[b2.quic]);
    let a3 = c.agent(&s3, &[b2.quic]);
    for (id, b) in [
        ("app-1", "edge-1"),
        ("app-2", "edge-2"),
        ("app-3", "edge-2"),
    ] {
        c.wait_connected(id, Some(b)).await;
    }
    c.tether(&["appliance", "revoke", "app-3"]).expect("revoke");
    wait_for(Duration::from_secs(10), || async {
        (!b2.sessions()
            .await
            .iter()
            .any(|s| s["appliance_id"] == "app-3"))
        .then_some(())
    })
    .await
    .expect("edge-2 closed app-3's session");
    drop(a3);

    let appliances = appliance_rows(&c);
    assert!(
        appliances.contains(&("app-3".into(), "revoked".into(), "acme".into())),
        "{appliances:?}"
    );
    let certs: Vec<Value> = ["app-1", "app-2", "app-3"]
        .iter()
        .map(|id| c.show(id)["certificates"].clone())
        .collect();
    let brokers = broker_rows(&c);
    assert_eq!(
        brokers,
        vec![
            ("edge-1".into(), "active".into()),
            ("edge-2".into(), "active".into())
        ]
    );
    let audit = audit_entries(&c.fleet);
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "appliance.revoke" && e["target"] == "app-3"),
        "{audit:?}"
    );

    // Restart control on the same port and the same database.
    c.kill_control();
    let restarted = Instant::now();
    c.restart_control();
    c.wait_brokers_up(2).await;
    eprintln!(
        "control (PostgreSQL) restarted → both broker channels up: {}",
        ms(restarted.elapsed())
    );
    for (id, b) in [("app-1", "edge-1"), ("app-2", "edge-2")] {
        c.wait_connected(id, Some(b)).await;
    }
    eprintln!(
        "control (PostgreSQL) restarted → presence of both connected appliances back: {}",
        ms(restarted.elapsed())
    );

    // Everything is still there.
    assert_eq!(appliance_rows(&c), appliances);
    for (id, before) in ["app-1", "app-2", "app-3"].iter().zip(&certs) {
        assert_eq!(&c.show(id)["certificates"], before, "{id}");
    }
    assert_eq!(broker_rows(&c), brokers);
    let after = audit_entries(&c.fleet);
    assert!(
        after.len() >= audit.len() && after[..audit.len()] == audit[..],
        "the audit log lost or changed entries across the restart"
    );
    let verified = control(&[
        "audit",
        "verify",
        "--data-dir",
        c.fleet.data.to_str().unwrap(),
    ]);
    eprintln!("audit verify: {}", verified.trim());

    // Commands work; the revoked appliance stays refused, by control and by both brokers.
    for id in ["app-1", "app-2"] {
        let (code, out, err) = c.exec(&[id, "--", "echo", id]);
        assert_eq!((code, out), (0, format!("{id}\n")), "{err}");
    }
    let (code, _, err) = c.exec(&["app-3", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("appliance_revoked"), "{err}");
    c.assert_refused(&s3, &b1, "app-3").await;
    c.assert_refused(&s3, &b2, "app-3").await;

    drop(c);
    db.drop_db().await;
}

/// A broker SIGKILLed right after it closed a revoked session (inside the snapshot
/// writer's one-second coalescing interval), then restarted while control is away: the
/// revocation journal keeps the certificate out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_survives_a_broker_crash_right_after_it() {
    let mut c = Cluster::new("");
    let mut b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let s1 = c.enroll("app-1");
    let s2 = c.enroll("app-2");
    let a1 = c.agent(&s1, &[b1.quic]);
    let _a2 = c.agent(&s2, &[b1.quic]);
    b1.wait_session("app-1").await;
    b1.wait_session("app-2").await;
    // Let the snapshot settle at the enrollments, so the revocation lands in a fresh
    // coalescing interval.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.tether(&["appliance", "revoke", "app-1"]).expect("revoke");
    wait_for(Duration::from_secs(10), || async {
        (!b1.sessions()
            .await
            .iter()
            .any(|s| s["appliance_id"] == "app-1"))
        .then_some(())
    })
    .await
    .expect("the revoked session closed");
    drop(a1);
    // Crash at once, then take control away too.
    let quic = b1.quic;
    b1.child.kill().unwrap();
    b1.wait_exit(Duration::from_secs(5));
    c.kill_control();
    let b1 = c.restart_broker("edge-1", quic);
    b1.wait_metric(STALE, 1.0).await;
    c.assert_refused(&s1, &b1, "app-1").await;
    // The appliance that was not revoked is still admitted from the snapshot.
    b1.wait_session("app-2").await;
}

/// A broker SIGKILLed and started again on its address answers its previous life's QUIC
/// connections with stateless resets the agents accept (its reset key and its
/// connection-id key live in its data directory), so its agents reconnect at their next
/// packet instead of waiting out their 30 s idle timeout — as the chaos run found they
/// did before, 40 s without a session after every broker crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_on_its_address_resets_its_previous_connections() {
    let mut c = Cluster::new("");
    let b1 = c.add_broker("edge-1");
    c.wait_brokers_up(1).await;
    let state = c.enroll("app-1");
    let log = c.tmp().join("agent-app-1.log");
    let mut agent = Command::new(bin("tether-agent"))
        .arg("run")
        .arg("--state-dir")
        .arg(&state)
        .args(["--broker", &b1.quic.to_string()])
        .args(["--backoff-initial", "100ms", "--backoff-max", "1s"])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).expect("agent log"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tether-agent");
    c.wait_connected("app-1", Some("edge-1")).await;
    assert!(
        c.broker_dir("edge-1").join("quic-reset.key").is_file(),
        "the broker keeps no reset key in its data directory"
    );

    let addr = b1.quic;
    let mut b1 = b1;
    b1.child.kill().expect("SIGKILL");
    let _ = b1.child.wait();
    drop(b1);
    let killed = Instant::now();
    let b1 = c.restart_broker("edge-1", addr);
    b1.wait_session("app-1").await;
    eprintln!(
        "SIGKILL → the agent back on the restarted broker: {:?}",
        killed.elapsed()
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let text = std::fs::read_to_string(&log).expect("agent log");
    assert!(
        text.contains("reset by broker"),
        "the agent did not see a stateless reset from the broker's new life; its log:\n{text}"
    );
    assert!(
        !text.contains("timed out"),
        "the agent waited out its idle timeout; its log:\n{text}"
    );
}
