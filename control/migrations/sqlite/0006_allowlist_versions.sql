-- The allowlist's digest chain (sqlite flavour). Keep in step with
-- ../postgres/0006_allowlist_versions.sql.
--
-- One row per allowlist version, written in the transaction that commits the version:
-- its digest (tether_proto::cluster::allowlist_digest, lowercase hex) chains the
-- version's changes to the previous version's digest, so a broker that followed another
-- history (an asynchronous failover, a restore from backup that reissued version
-- numbers) sees a different digest for the same version and takes a snapshot.
-- Versions committed before this table existed get their rows when a store first opens
-- the database (computed in Rust: SQLite has no SHA-256), and `committed_at` is then
-- that time, not the original commit's.
CREATE TABLE allowlist_versions (
    version      INTEGER NOT NULL PRIMARY KEY,
    digest       TEXT   NOT NULL,
    committed_at INTEGER NOT NULL
);
