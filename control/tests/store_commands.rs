//! The store contract for commands in flight (`commands_in_flight`), on both backends (see
//! `common`): the row goes in with the request entry and out with the outcome entry;
//! commands of a lost replica get exactly one `replica_lost` outcome, however many
//! replicas race to write it.

mod common;

use tether_audit::{Actor, AuditEvent, Outcome};
use tether_control::domain::exec::abandon_lost;
use tether_control::store::sql::SqlStore;
use tether_control::store::{CommandInFlight, ReplicaInfo, Store};

use common::*;

on_both_backends!(
    a_command_has_one_outcome,
    commands_of_a_lost_replica_are_abandoned_once,
);

fn command(id: &str, replica: &str) -> CommandInFlight {
    CommandInFlight {
        id: id.into(),
        replica: replica.into(),
        appliance: "app-1".into(),
        started_at: NOW,
        actor: Actor::operator("alice"),
        broker: "edge-1".into(),
        command_id: 7,
    }
}

fn request() -> AuditEvent {
    AuditEvent::success(Actor::operator("alice"), "appliance.exec", "app-1").with("argv", "true")
}

async fn heartbeat(s: &SqlStore, id: &str) {
    let info = ReplicaInfo {
        id: id.into(),
        advertise: "127.0.0.1:1".into(),
        api_addr: "127.0.0.1:1".into(),
        version: "0".into(),
    };
    s.replica_heartbeat(&info, true).await.unwrap();
}

async fn exec_entries(s: &SqlStore) -> Vec<tether_audit::AuditEntry> {
    s.audit_entries(0, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "appliance.exec")
        .collect()
}

async fn a_command_has_one_outcome(db: &TestDb) {
    let s = &db.store;
    heartbeat(s, "r1").await;
    s.command_started(&command("c1", "r1"), &request(), NOW)
        .await
        .unwrap();
    assert_eq!(exec_entries(s).await.len(), 1, "the request entry");
    // Its replica is live: not lost.
    assert!(s.lost_commands(Some(30)).await.unwrap().is_empty());
    assert_eq!(
        s.lost_commands(None).await.unwrap(),
        vec![command("c1", "r1")]
    );
    let outcome = request().with("exit_code", 0);
    assert!(s.command_ended("c1", &outcome, NOW).await.unwrap());
    // Twice: nothing more.
    assert!(!s.command_ended("c1", &outcome, NOW).await.unwrap());
    assert_eq!(exec_entries(s).await.len(), 2);
    assert!(s.lost_commands(None).await.unwrap().is_empty());
}

async fn commands_of_a_lost_replica_are_abandoned_once(db: &TestDb) {
    let s = &db.store;
    heartbeat(s, "live").await;
    for (id, replica) in [("c1", "live"), ("c2", "gone"), ("c3", "gone")] {
        s.command_started(&command(id, replica), &request(), NOW)
            .await
            .unwrap();
    }
    // "gone" never heartbeated (or was pruned): its two commands are lost.
    let lost: Vec<String> = s
        .lost_commands(Some(30))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(lost, ["c2", "c3"]);
    // Three replicas race to abandon them.
    let mut tasks = Vec::new();
    for i in 0..3 {
        let store = SqlStore::connect(&db.url).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let n = abandon_lost(&store, Some(30), &format!("r{i}"), NOW + 60)
                .await
                .unwrap();
            store.close().await;
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 2, "each lost command abandoned once");
    let entries = exec_entries(s).await;
    let outcomes: Vec<_> = entries
        .iter()
        .filter(|e| e.outcome == Outcome::Failed)
        .collect();
    assert_eq!(outcomes.len(), 2, "{entries:?}");
    for o in &outcomes {
        assert_eq!(o.details["code"], "replica_lost");
        assert_eq!(o.details["replica"], "gone");
        assert_eq!(o.details["broker"], "edge-1");
        assert_eq!(o.details["command_id"], 7);
        assert_eq!(o.actor, Actor::operator("alice"));
        assert_eq!(o.at, NOW + 60);
    }
    // The live replica's command is untouched and still ends normally.
    assert!(s
        .command_ended("c1", &request().with("exit_code", 0), NOW)
        .await
        .unwrap());
    // A single node starting abandons whatever is left (nothing now).
    assert_eq!(abandon_lost(s, None, "r0", NOW).await.unwrap(), 0);
}
