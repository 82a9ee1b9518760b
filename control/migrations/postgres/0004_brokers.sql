-- Brokers of the edge cluster (postgres flavour). Keep in step with
-- ../sqlite/0004_brokers.sql. Times are Unix seconds.

-- One row per broker name. `tether broker add NAME` creates it 'pending' with a one-time
-- token (only its hash); enrollment with the token makes it 'active' and records its
-- certificate; renewal moves the current fingerprint to `previous_fingerprint` (still
-- accepted until `previous_until`). 'revoked' brokers are refused on every route.
CREATE TABLE brokers (
    name                 TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    status               TEXT     NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
    created_at           BIGINT     NOT NULL,
    token_hash           TEXT,
    token_expires_at     BIGINT,
    fingerprint          TEXT UNIQUE,
    not_after            BIGINT,
    previous_fingerprint TEXT,
    previous_until       BIGINT,
    quic_addr            TEXT,
    last_seen            BIGINT
);
