//! The operator half of the store contract, on both backends: invites (single use,
//! expiry, cancellation, each refusal named), the certificate recorded with the
//! redemption, lookup by fingerprint, listing, and revocation. Every case runs on SQLite
//! and on the PostgreSQL server that `TETHER_TEST_PG_URL` names (as control/tests/store.rs;
//! without it the PostgreSQL half fails, it never skips).

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;
use tether_api::operators::{OperatorStatus, Role};
use tether_audit::{verify_chain, Actor, AuditEvent, Outcome};
use tether_control::store::sql::SqlStore;
use tether_control::store::{Invite, InviteRefusal, OperatorCertificate, OperatorCredential};
use tether_control::store::{Store, StoreError};

const PG_URL_VAR: &str = "TETHER_TEST_PG_URL";
const NOW: i64 = 1_700_000_000;

struct TestDb {
    store: SqlStore,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = SqlStore::sqlite_url(&dir.path().join("control.db"));
        Self {
            store: SqlStore::connect(&url).await.unwrap(),
            _dir: Some(dir),
            pg: None,
        }
    }

    async fn postgres() -> Self {
        let admin_url = std::env::var(PG_URL_VAR)
            .unwrap_or_else(|_| panic!("{PG_URL_VAR} is not set: run ./scripts/test"));
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tether_op_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url.as_str(), String::new()),
        };
        let host_end = base[base.find("://").unwrap() + 3..]
            .find('/')
            .map_or(base.len(), |i| base.find("://").unwrap() + 3 + i);
        let url = format!("{}/{name}{query}", &base[..host_end]);
        Self {
            store: SqlStore::connect(&url).await.unwrap(),
            _dir: None,
            pg: Some((admin_url, name)),
        }
    }

    async fn finish(self) {
        self.store.close().await;
        if let Some((admin_url, name)) = &self.pg {
            let mut admin = sqlx::PgConnection::connect(admin_url).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.ok();
        }
    }
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::TestDb::sqlite().await;
                    super::$case(&db.store).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::TestDb::postgres().await;
                    super::$case(&db.store).await;
                    db.finish().await;
                }
            )*
        }
    };
}

on_both_backends!(
    invite_is_redeemed_once_with_its_certificate,
    invite_refusals_say_why_and_change_nothing,
    revoking_drops_fingerprints_and_cancels_pending_invites,
    a_duplicate_certificate_leaves_the_invite_unused,
);

fn event(action: &str, target: &str) -> AuditEvent {
    AuditEvent::success(Actor::system("test"), action, target)
}

fn cert(name: &str, n: u8) -> OperatorCertificate {
    OperatorCertificate {
        fingerprint: format!("{n:02x}").repeat(32),
        serial: format!("{n:02x}").repeat(16),
        operator: name.to_owned(),
        not_after: NOW + 365 * 86_400,
    }
}

async fn invite(store: &SqlStore, hash: &str, name: &str, role: Role, ttl: i64) {
    store
        .create_invite(
            hash,
            name,
            role,
            NOW + ttl,
            NOW,
            &event("operator.invite", name),
        )
        .await
        .unwrap();
}

async fn entries(store: &SqlStore) -> usize {
    let all = store.audit_entries(0, 0).await.unwrap();
    verify_chain(&all).unwrap();
    all.len()
}

async fn invite_is_redeemed_once_with_its_certificate(store: &SqlStore) {
    invite(store, "h1", "alice", Role::Operator, 60).await;
    assert_eq!(
        store.find_invite("h1").await.unwrap(),
        Some(Invite {
            name: "alice".into(),
            role: Role::Operator,
            expires_at: NOW + 60,
            used_at: None,
            cancelled: false
        })
    );
    assert!(matches!(
        store
            .create_invite(
                "h1",
                "bob",
                Role::Admin,
                NOW + 60,
                NOW,
                &event("operator.invite", "bob")
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    let c = cert("alice", 1);
    let got = store
        .redeem_invite("h1", &c, NOW + 1, &event("operator.login", "alice"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.name.as_str(), got.role), ("alice", Role::Operator));
    assert_eq!(
        store.operator_by_fingerprint(&c.fingerprint).await.unwrap(),
        Some(OperatorCredential {
            name: "alice".into(),
            role: Role::Operator,
            status: OperatorStatus::Active,
            not_after: c.not_after
        })
    );
    assert_eq!(
        store
            .operator_by_fingerprint(&"ff".repeat(32))
            .await
            .unwrap(),
        None
    );
    let list = store.list_operators().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].certificates, list[0].created_at), (1, NOW + 1));
    // Single use.
    assert_eq!(
        store
            .redeem_invite(
                "h1",
                &cert("alice", 2),
                NOW + 2,
                &event("operator.login", "alice")
            )
            .await
            .unwrap(),
        Err(InviteRefusal::Used)
    );
    assert_eq!(
        store
            .operator_by_fingerprint(&cert("alice", 2).fingerprint)
            .await
            .unwrap(),
        None
    );
    // invite + login; the login entry carries the role.
    assert_eq!(entries(store).await, 2);
    let last = store.audit_entries(1, 0).await.unwrap().pop().unwrap();
    assert_eq!(last.details["role"], "operator");
}

async fn invite_refusals_say_why_and_change_nothing(store: &SqlStore) {
    invite(store, "expiring", "bob", Role::Viewer, 10).await;
    invite(store, "other", "carol", Role::Viewer, 10).await;
    let before = entries(store).await;
    let login = event("operator.login", "bob");
    let cases = [
        ("unknown", "bob", NOW, InviteRefusal::Unknown),
        ("expiring", "bob", NOW + 10, InviteRefusal::Expired),
        // An invite for carol cannot make bob.
        ("other", "bob", NOW, InviteRefusal::Unknown),
    ];
    for (hash, name, at, why) in cases {
        assert_eq!(
            store
                .redeem_invite(hash, &cert(name, 3), at, &login)
                .await
                .unwrap(),
            Err(why),
            "{hash}"
        );
    }
    // Cancelled by revoking the name before it was used.
    store
        .revoke_operator("bob", NOW, &event("operator.revoke", "bob"))
        .await
        .unwrap();
    assert_eq!(
        store
            .redeem_invite("expiring", &cert("bob", 3), NOW + 1, &login)
            .await
            .unwrap(),
        Err(InviteRefusal::Cancelled)
    );
    assert_eq!(
        entries(store).await,
        before + 1,
        "only the revocation was recorded"
    );
    assert!(store.list_operators().await.unwrap().is_empty());
}

async fn revoking_drops_fingerprints_and_cancels_pending_invites(store: &SqlStore) {
    invite(store, "a1", "alice", Role::Admin, 60).await;
    invite(store, "a2", "alice", Role::Admin, 60).await;
    invite(store, "a3", "alice", Role::Admin, 60).await;
    let login = event("operator.login", "alice");
    for (hash, n) in [("a1", 1), ("a2", 2)] {
        store
            .redeem_invite(hash, &cert("alice", n), NOW, &login)
            .await
            .unwrap()
            .unwrap();
    }
    let r = store
        .revoke_operator("alice", NOW + 5, &event("operator.revoke", "alice"))
        .await
        .unwrap();
    assert_eq!((r.certificates_removed, r.invites_cancelled), (2, 1));
    for n in [1, 2] {
        assert_eq!(
            store
                .operator_by_fingerprint(&cert("alice", n).fingerprint)
                .await
                .unwrap(),
            None
        );
    }
    let list = store.list_operators().await.unwrap();
    assert_eq!(
        (list[0].status, list[0].certificates),
        (OperatorStatus::Revoked, 0)
    );
    let last = store.audit_entries(0, 0).await.unwrap().pop().unwrap();
    assert_eq!(
        (last.action.as_str(), last.outcome),
        ("operator.revoke", Outcome::Success)
    );
    assert_eq!(last.details["certificates_removed"], 2);
    // Unknown name: NotFound, no entry.
    let before = entries(store).await;
    assert!(matches!(
        store
            .revoke_operator("nobody", NOW, &event("operator.revoke", "nobody"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(entries(store).await, before);
    // A new invite re-activates the name with its role; the old fingerprints stay gone.
    invite(store, "a4", "alice", Role::Viewer, 60).await;
    store
        .redeem_invite("a4", &cert("alice", 4), NOW + 6, &login)
        .await
        .unwrap()
        .unwrap();
    let cred = store
        .operator_by_fingerprint(&cert("alice", 4).fingerprint)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cred.role, cred.status),
        (Role::Viewer, OperatorStatus::Active)
    );
    assert_eq!(
        store
            .operator_by_fingerprint(&cert("alice", 1).fingerprint)
            .await
            .unwrap(),
        None
    );
}

async fn a_duplicate_certificate_leaves_the_invite_unused(store: &SqlStore) {
    invite(store, "d1", "dave", Role::Viewer, 60).await;
    invite(store, "d2", "dave", Role::Viewer, 60).await;
    let login = event("operator.login", "dave");
    store
        .redeem_invite("d1", &cert("dave", 7), NOW, &login)
        .await
        .unwrap()
        .unwrap();
    let before = entries(store).await;
    assert!(matches!(
        store
            .redeem_invite("d2", &cert("dave", 7), NOW, &login)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.find_invite("d2").await.unwrap().unwrap().used_at,
        None
    );
    assert_eq!(entries(store).await, before);
}
