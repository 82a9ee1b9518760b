//! A fresh PostgreSQL database per test, on the server `TETHER_TEST_PG_URL` names
//! (`scripts/pg`). Without the variable the test fails, it never skips.

use std::path::Path;

/// A fresh database on the PostgreSQL server `TETHER_TEST_PG_URL` names (`scripts/pg`).
pub struct PgDb {
    admin_url: String,
    name: String,
    /// The URL of the fresh database.
    pub url: String,
}

/// Prefix of these databases: `tether_e2e_<pid>_<random>`.
const PG_DB_PREFIX: &str = "tether_e2e_";

impl PgDb {
    pub async fn create() -> PgDb {
        use sqlx::Connection;
        let admin_url = std::env::var("TETHER_TEST_PG_URL").unwrap_or_else(|_| {
            panic!(
                "TETHER_TEST_PG_URL is not set: this test needs PostgreSQL. Run ./scripts/test, \
                 or `export TETHER_TEST_PG_URL=$(./scripts/pg)` and run cargo test again"
            )
        });
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin_url} ({e})"));
        // Databases of earlier runs that died before dropping theirs.
        let names: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
                .bind(PG_DB_PREFIX)
                .fetch_all(&mut admin)
                .await
                .unwrap();
        for old in names {
            let pid = old[PG_DB_PREFIX.len()..].split('_').next().unwrap_or("");
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {old} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        }
        let name = format!(
            "{PG_DB_PREFIX}{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        let (base, _) = admin_url.rsplit_once('/').expect("a URL with a database");
        let url = format!("{base}/{name}");
        PgDb {
            admin_url,
            name,
            url,
        }
    }

    pub async fn drop_db(self) {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&self.admin_url).await.unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        admin.close().await.ok();
    }
}
