//! The store contract for the web console, on both backends (see `common`): login links
//! (single use, expiry, a revoked operator's refused), sessions (read with the operator's
//! current role, touched, ended, deleted with their operator), the audit search the pages
//! use, and listing appliances by id prefix.

mod common;

use tether_api::operators::{OperatorStatus, Role};
use tether_audit::{Actor, AuditEvent};
use tether_control::store::{
    ApplianceFilter, AuditSearch, NewConsoleLink, NewConsoleSession, OperatorCertificate, Store,
};

use common::*;

on_both_backends!(
    a_link_is_spent_once_and_only_before_it_expires,
    sessions_carry_the_operators_role_now_and_end_with_it,
    the_audit_search_filters_and_pages_newest_first,
    appliances_list_by_id_prefix,
);

async fn operator(s: &dyn Store, name: &str, role: Role) {
    let hash = format!("invite-{name}");
    s.create_invite(&hash, name, role, NOW + DAY, NOW, &ev())
        .await
        .unwrap();
    let cert = OperatorCertificate {
        fingerprint: format!("fp-{name}"),
        serial: format!("serial-{name}"),
        operator: name.into(),
        not_after: NOW + DAY,
    };
    s.redeem_invite(&hash, &cert, NOW, &ev())
        .await
        .unwrap()
        .unwrap();
}

fn session(token: &str, operator: &str) -> NewConsoleSession {
    NewConsoleSession {
        token_sha256: token.into(),
        operator: operator.into(),
        idle_expires_at: NOW + 1800,
        abs_expires_at: NOW + 43_200,
        user_agent: "test".into(),
        ip: "127.0.0.1".into(),
    }
}

async fn a_link_is_spent_once_and_only_before_it_expires(db: &TestDb) {
    let s = &db.store;
    operator(s, "alice", Role::Operator).await;
    let link = |id: &str| NewConsoleLink {
        id: id.into(),
        secret_sha256: format!("hash-{id}"),
        operator: "alice".into(),
        expires_at: NOW + 60,
    };
    s.create_console_link(&link("l1"), NOW, &ev())
        .await
        .unwrap();
    let found = s.find_console_link("l1").await.unwrap().unwrap();
    assert_eq!(found.secret_sha256, "hash-l1");
    assert_eq!(
        (found.role, found.status),
        (Role::Operator, OperatorStatus::Active)
    );
    assert!(!found.used);
    assert!(s.find_console_link("nope").await.unwrap().is_none());
    // Expired: not spent, nothing created.
    assert!(!s
        .redeem_console_link("l1", &session("t0", "alice"), NOW + 60, &ev())
        .await
        .unwrap());
    assert!(s.console_session("t0").await.unwrap().is_none());
    assert!(s
        .redeem_console_link("l1", &session("t1", "alice"), NOW + 59, &ev())
        .await
        .unwrap());
    assert!(s.find_console_link("l1").await.unwrap().unwrap().used);
    assert!(!s
        .redeem_console_link("l1", &session("t2", "alice"), NOW + 59, &ev())
        .await
        .unwrap());
    assert!(s.console_session("t2").await.unwrap().is_none());
    // A revoked operator's link is not spent.
    s.create_console_link(&link("l2"), NOW, &ev())
        .await
        .unwrap();
    s.revoke_operator("alice", NOW, &ev()).await.unwrap();
    assert_eq!(
        s.find_console_link("l2").await.unwrap().unwrap().status,
        OperatorStatus::Revoked
    );
    assert!(!s
        .redeem_console_link("l2", &session("t3", "alice"), NOW + 1, &ev())
        .await
        .unwrap());
}

async fn sessions_carry_the_operators_role_now_and_end_with_it(db: &TestDb) {
    let s = &db.store;
    operator(s, "bob", Role::Viewer).await;
    s.create_console_link(
        &NewConsoleLink {
            id: "l".into(),
            secret_sha256: "h".into(),
            operator: "bob".into(),
            expires_at: NOW + 60,
        },
        NOW,
        &ev(),
    )
    .await
    .unwrap();
    let login = AuditEvent::success(Actor::operator("bob"), "console.login", "bob");
    assert!(s
        .redeem_console_link("l", &session("tok", "bob"), NOW, &login)
        .await
        .unwrap());
    let rec = s.console_session("tok").await.unwrap().unwrap();
    assert_eq!((rec.operator.as_str(), rec.role), ("bob", Role::Viewer));
    assert_eq!((rec.created_at, rec.last_seen_at), (NOW, NOW));
    assert_eq!(
        (rec.idle_expires_at, rec.abs_expires_at),
        (NOW + 1800, NOW + 43_200)
    );
    // Its role is the operator's now: re-invited as operator.
    s.create_invite("again", "bob", Role::Operator, NOW + DAY, NOW, &ev())
        .await
        .unwrap();
    let cert = OperatorCertificate {
        fingerprint: "fp-bob-2".into(),
        serial: "serial-bob-2".into(),
        operator: "bob".into(),
        not_after: NOW + DAY,
    };
    s.redeem_invite("again", &cert, NOW, &ev())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.console_session("tok").await.unwrap().unwrap().role,
        Role::Operator
    );
    s.touch_console_session("tok", NOW + 120, NOW + 1920)
        .await
        .unwrap();
    let rec = s.console_session("tok").await.unwrap().unwrap();
    assert_eq!(
        (rec.last_seen_at, rec.idle_expires_at),
        (NOW + 120, NOW + 1920)
    );
    assert_eq!(s.console_sessions("bob").await.unwrap().len(), 1);
    // Logout deletes it, once.
    assert!(s.end_console_session("tok", NOW, &ev()).await.unwrap());
    assert!(!s.end_console_session("tok", NOW, &ev()).await.unwrap());
    assert!(s.console_session("tok").await.unwrap().is_none());
    // Revoking the operator deletes every session of it in the same transaction.
    for t in ["a", "b"] {
        s.create_console_link(
            &NewConsoleLink {
                id: format!("l{t}"),
                secret_sha256: "h".into(),
                operator: "bob".into(),
                expires_at: NOW + 60,
            },
            NOW,
            &ev(),
        )
        .await
        .unwrap();
        assert!(s
            .redeem_console_link(&format!("l{t}"), &session(t, "bob"), NOW, &ev())
            .await
            .unwrap());
    }
    operator(s, "root", Role::Admin).await;
    s.revoke_operator("bob", NOW, &ev()).await.unwrap();
    assert!(s.console_sessions("bob").await.unwrap().is_empty());
    // Expired sessions and links are pruned.
    s.create_console_link(
        &NewConsoleLink {
            id: "old".into(),
            secret_sha256: "h".into(),
            operator: "root".into(),
            expires_at: NOW + 60,
        },
        NOW,
        &ev(),
    )
    .await
    .unwrap();
    assert!(s.prune_single_use(NOW + 61).await.unwrap() >= 1);
    assert!(s.find_console_link("old").await.unwrap().is_none());
}

async fn the_audit_search_filters_and_pages_newest_first(db: &TestDb) {
    let s = &db.store;
    for (actor, action, target) in [
        ("alice", "appliance.disable", "a1"),
        ("bob", "appliance.enable", "a1"),
        ("alice", "token.create", "a2"),
        ("alice", "appliance.revoke", "a1"),
    ] {
        s.append_audit(
            &AuditEvent::success(Actor::operator(actor), action, target),
            NOW,
        )
        .await
        .unwrap();
    }
    let search = |q: AuditSearch| async move {
        s.audit_search(&AuditSearch { limit: 10, ..q })
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.actor.name, e.action, e.target))
            .collect::<Vec<_>>()
    };
    let a1 = search(AuditSearch {
        target: Some("a1".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        a1.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["appliance.revoke", "appliance.enable", "appliance.disable"]
    );
    let alice_appliance = search(AuditSearch {
        actor: Some("alice".into()),
        action_prefix: Some("appliance.".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(alice_appliance.len(), 2);
    let page = s
        .audit_search(&AuditSearch {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let older = s
        .audit_search(&AuditSearch {
            before: Some(page[1].seq),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(older.iter().all(|e| e.seq < page[1].seq));
    assert_eq!(page.len() + older.len(), 4);
}

async fn appliances_list_by_id_prefix(db: &TestDb) {
    let s = &db.store;
    for id in ["app-1", "app-10", "app-2", "apq", "b_app"] {
        register(s, id).await;
    }
    let list = |prefix: &str| {
        let prefix = prefix.to_owned();
        async move {
            s.list_appliances(&ApplianceFilter {
                id_prefix: Some(prefix),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(list("app-1").await, ["app-1", "app-10"]);
    assert_eq!(list("app").await, ["app-1", "app-10", "app-2"]);
    // `_` is not a wildcard.
    assert!(list("b%").await.is_empty());
    assert_eq!(list("b_").await, ["b_app"]);
    assert!(list("c").await.is_empty());
}
