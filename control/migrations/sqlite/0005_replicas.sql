-- Replica identity and registry (sqlite flavour). Keep in step with
-- ../postgres/0005_replicas.sql. Times are Unix seconds, read from the database's clock
-- (never a replica's), so replicas whose clocks disagree still agree on who is live.

-- What this database belongs to: one row, written by `tether-control init` (or by the
-- first `serve` of a store made before this table existed). `serve` refuses to start
-- when its own trust domain or root CA fingerprint (SHA-256 of the root's DER, lowercase
-- hex) differs, so a replica with another CA cannot join the fleet's history.
CREATE TABLE control_meta (
    id               SMALLINT NOT NULL PRIMARY KEY CHECK (id = 1),
    trust_domain     TEXT     NOT NULL,
    root_fingerprint TEXT     NOT NULL,
    created_at       INTEGER   NOT NULL
);

-- One row per control replica that ever served this database, keyed by the id it keeps
-- in its data directory (`replica.id`). Each replica rewrites `heartbeat_at` every 5 s;
-- one is live while its heartbeat is at most 15 s old.
CREATE TABLE control_replicas (
    id           TEXT   NOT NULL PRIMARY KEY,
    advertise    TEXT   NOT NULL,
    api_addr     TEXT   NOT NULL,
    version      TEXT   NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
