//! `store copy`: a SQLite store into a new PostgreSQL database, table by table in
//! foreign-key order inside one transaction, every value as it is (the audit log's
//! `seq`, `hash` and canonical `details` text, versions, deltas, digests and
//! checkpoints), then read back and compared row for row before the commit.
//!
//! The columns come from the target's schema (`information_schema`), so a table gains a
//! column without this file changing; a table this file does not know refuses the copy,
//! so a new table cannot be left behind silently. The checks that need the domain (the
//! audit chain and checkpoint signatures, the digest chain) are
//! `crate::domain::store_copy`'s.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, Row};
use thiserror::Error;

use super::{db, Backend, SqlStore};
use crate::store::StoreError;

/// The tables copied, parents before children.
pub const COPIED_TABLES: &[&str] = &[
    "control_meta",
    "appliances",
    "certificates",
    "enrollment_tokens",
    "nonces",
    "used_proofs",
    "allowlist_version",
    "allowlist_changes",
    "allowlist_versions",
    "audit_log",
    "audit_head",
    "audit_checkpoints",
    "audit_archives",
    "operators",
    "operator_certificates",
    "operator_invites",
    "brokers",
    "issue_receipts",
    // Commands the source's replicas relayed without an outcome yet: the new replicas
    // abandon them (`replica_lost`), as their relaying replica is not registered.
    "commands_in_flight",
];

/// Tables left behind: the migrations' own, and run-time state of the replicas that
/// served the source (the new replicas register and claim jobs themselves).
pub const SKIPPED_TABLES: &[&str] = &[
    "_sqlx_migrations",
    "control_replicas",
    "control_jobs",
    // Console sign-in state: short-lived; operators sign in again on the new database.
    "console_login_links",
    "console_sessions",
];

/// Tables a fresh store already has one row in (written by the migrations).
const SINGLETONS: &[&str] = &["allowlist_version", "audit_head"];

/// Why a copy was refused or failed. Nothing is written to the target unless the copy
/// succeeded whole.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CopyError {
    /// The source is not a SQLite store or the target not a PostgreSQL one.
    #[error("{0}")]
    Backends(&'static str),
    /// The target already holds data (the copy only fills a new database).
    #[error(
        "the target database is not empty ({table} has data): store copy only fills a new \
         database; create an empty one"
    )]
    TargetNotEmpty {
        /// The first table found with data.
        table: String,
    },
    /// The target's schema has a table this version does not know how to copy.
    #[error("table {0} of the target is unknown to store copy (is this tether-control older than the schema?)")]
    UnknownTable(String),
    /// A column of a type the copy does not carry.
    #[error("column {table}.{column} has type {ty}, which store copy does not carry")]
    UnsupportedColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Its PostgreSQL type.
        ty: String,
    },
    /// Something was committed on the source while it was read.
    #[error(
        "the source changed during the copy (audit head {before} → {after}): stop \
         tether-control on the source and copy again; nothing was written"
    )]
    SourceChanged {
        /// Audit seq and allowlist version when the copy started.
        before: String,
        /// And after it read everything.
        after: String,
    },
    /// The rows read back from the target differ from the source's.
    #[error("the copy of {table} differs from the source ({why}); nothing was written")]
    Mismatch {
        /// The table.
        table: String,
        /// How.
        why: String,
    },
    /// Verifying the copy failed (see `crate::domain::store_copy`).
    #[error("the copy does not verify: {0}")]
    Verify(String),
    /// A database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One value of a copied row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Null,
    Int(i64),
    Text(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
}

struct Column {
    name: String,
    kind: Kind,
    identity: bool,
}

/// What was copied: rows per table, in copy order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// (table, rows).
    pub tables: Vec<(String, u64)>,
}

/// The source's head: (audit seq, audit hash, allowlist version).
async fn head(conn: &mut AnyConnection) -> Result<(i64, String, i64), StoreError> {
    let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let version: i64 = sqlx::query_scalar("SELECT version FROM allowlist_version WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    Ok((
        row.try_get("seq").map_err(db)?,
        row.try_get("hash").map_err(db)?,
        version,
    ))
}

fn head_text((seq, hash, version): &(i64, String, i64)) -> String {
    format!("entry {seq} {hash}, allowlist version {version}")
}

/// The target's columns of `table`, in order.
async fn columns(conn: &mut AnyConnection, table: &str) -> Result<Vec<Column>, CopyError> {
    let rows = sqlx::query(
        "SELECT CAST(column_name AS TEXT) AS name, CAST(data_type AS TEXT) AS ty, \
         CAST(is_identity AS TEXT) AS is_identity \
         FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|row| {
            let name: String = row.try_get("name").map_err(db)?;
            let ty: String = row.try_get("ty").map_err(db)?;
            let identity: String = row.try_get("is_identity").map_err(db)?;
            let kind = match ty.as_str() {
                "bigint" | "integer" | "smallint" => Kind::Int,
                "text" | "character varying" => Kind::Text,
                _ => {
                    return Err(CopyError::UnsupportedColumn {
                        table: table.to_owned(),
                        column: name,
                        ty,
                    })
                }
            };
            Ok(Column {
                name,
                kind,
                identity: identity == "YES",
            })
        })
        .collect()
}

/// Every row of `table` (`columns` in order), sorted bytewise.
async fn read_rows(
    conn: &mut AnyConnection,
    table: &str,
    columns: &[Column],
) -> Result<Vec<Vec<Value>>, StoreError> {
    let list = columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let mut rows = sqlx::query(&format!("SELECT {list} FROM {table}"))
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| {
                    Ok(match c.kind {
                        Kind::Int => row
                            .try_get::<Option<i64>, _>(c.name.as_str())
                            .map_err(db)?
                            .map_or(Value::Null, Value::Int),
                        Kind::Text => row
                            .try_get::<Option<String>, _>(c.name.as_str())
                            .map_err(db)?
                            .map_or(Value::Null, Value::Text),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    rows.sort();
    Ok(rows)
}

/// Rows per multi-row INSERT (PostgreSQL takes at most 65,535 parameters).
const ROWS_PER_INSERT: usize = 500;

async fn insert_rows(
    conn: &mut AnyConnection,
    table: &str,
    columns: &[Column],
    rows: &[Vec<Value>],
) -> Result<(), StoreError> {
    let list = columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let overriding = if columns.iter().any(|c| c.identity) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut sql = format!("INSERT INTO {table} ({list}){overriding} VALUES ");
        let mut n = 0;
        for (i, _) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for j in 0..columns.len() {
                if j > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                sql.push_str(&format!("${n}"));
            }
            sql.push(')');
        }
        let mut query = sqlx::query(&sql);
        for row in chunk {
            for (value, column) in row.iter().zip(columns) {
                query = match (value, column.kind) {
                    (Value::Int(v), _) => query.bind(*v),
                    (Value::Text(v), _) => query.bind(v.as_str()),
                    (Value::Null, Kind::Int) => query.bind(None::<i64>),
                    (Value::Null, Kind::Text) => query.bind(None::<String>),
                };
            }
        }
        query.execute(&mut *conn).await.map_err(db)?;
    }
    // Identity columns continue after the copied values.
    for c in columns.iter().filter(|c| c.identity) {
        if !rows.is_empty() {
            sqlx::query(&format!(
                "SELECT CAST(setval(pg_get_serial_sequence('{table}', '{name}'), \
                 (SELECT MAX({name}) FROM {table})) AS BIGINT)",
                name = c.name
            ))
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        }
    }
    Ok(())
}

/// Copy every table of `source` (SQLite) into `target` (PostgreSQL, migrated, empty) in
/// one transaction; before committing, read every table back and compare it with the
/// source, and check that the source did not change meanwhile.
pub async fn copy_tables(source: &SqlStore, target: &SqlStore) -> Result<CopyReport, CopyError> {
    if source.backend() != Backend::Sqlite {
        return Err(CopyError::Backends(
            "the source must be a SQLite store (sqlite:DIR)",
        ));
    }
    if target.backend() != Backend::Postgres {
        return Err(CopyError::Backends(
            "the target must be a PostgreSQL database (postgres://…)",
        ));
    }
    let mut tx = target.pool.begin().await.map_err(db)?;
    // Every table of the target must be one this copy knows.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    if let Some(t) = tables
        .iter()
        .find(|t| !COPIED_TABLES.contains(&t.as_str()) && !SKIPPED_TABLES.contains(&t.as_str()))
    {
        return Err(CopyError::UnknownTable(t.clone()));
    }
    // Empty: no row anywhere but the fresh singletons, and those at their start.
    let fresh = head(&mut tx).await?;
    if fresh.0 != 0 || fresh.2 != 0 {
        return Err(CopyError::TargetNotEmpty {
            table: if fresh.0 != 0 {
                "audit_log"
            } else {
                "allowlist_version"
            }
            .into(),
        });
    }
    for table in COPIED_TABLES.iter().filter(|t| !SINGLETONS.contains(t)) {
        let any: Option<i64> = sqlx::query_scalar(&format!("SELECT 1 FROM {table} LIMIT 1"))
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if any.is_some() {
            return Err(CopyError::TargetNotEmpty {
                table: (*table).to_owned(),
            });
        }
    }
    let mut schema = BTreeMap::new();
    for table in COPIED_TABLES {
        schema.insert(*table, columns(&mut tx, table).await?);
    }

    // The source: its head, then everything in one read transaction (one snapshot).
    let mut src = source.pool.acquire().await.map_err(db)?;
    let before = head(&mut src).await?;
    let mut read = source.pool.begin().await.map_err(db)?;
    let snapshot_head = head(&mut read).await?;
    let mut data = Vec::new();
    for table in COPIED_TABLES {
        data.push(read_rows(&mut read, table, &schema[table]).await?);
    }
    read.rollback().await.map_err(db)?;

    let mut report = CopyReport::default();
    for table in SINGLETONS {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    for (table, rows) in COPIED_TABLES.iter().zip(&data) {
        insert_rows(&mut tx, table, &schema[table], rows).await?;
        report.tables.push(((*table).to_owned(), rows.len() as u64));
    }
    // Read back: every table exactly as the source's.
    for (table, rows) in COPIED_TABLES.iter().zip(&data) {
        let copied = read_rows(&mut tx, table, &schema[table]).await?;
        if copied.len() != rows.len() {
            return Err(CopyError::Mismatch {
                table: (*table).to_owned(),
                why: format!("{} rows, the source has {}", copied.len(), rows.len()),
            });
        }
        if let Some(i) = copied.iter().zip(rows).position(|(a, b)| a != b) {
            return Err(CopyError::Mismatch {
                table: (*table).to_owned(),
                why: format!("row {i} differs"),
            });
        }
    }
    let after = head(&mut src).await?;
    if before != after || before != snapshot_head {
        return Err(CopyError::SourceChanged {
            before: head_text(&before),
            after: head_text(&after),
        });
    }
    tx.commit().await.map_err(db)?;
    Ok(report)
}
