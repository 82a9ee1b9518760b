-- Operators, their certificates and their one-time invites (PostgreSQL flavour). Keep in
-- step with ../sqlite/0002_operators.sql. Times are Unix seconds; flags are 0/1 integers.
-- Names sort bytewise (COLLATE "C"), as in SQLite.

-- One row per operator name. An operator is created (or re-activated, with the invite's
-- role) when an invite for its name is redeemed; revoking keeps the row, status 'revoked'.
CREATE TABLE operators (
    name       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    role       TEXT    NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    status     TEXT    NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at BIGINT  NOT NULL
);

-- The operator certificates control issued and still honours: a request authenticates
-- only with a certificate whose fingerprint is here, of an active operator. Revoking an
-- operator deletes its rows.
CREATE TABLE operator_certificates (
    fingerprint TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    serial      TEXT    NOT NULL UNIQUE,
    operator    TEXT COLLATE "C" NOT NULL REFERENCES operators (name),
    not_after   BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL
);
CREATE INDEX operator_certificates_by_operator ON operator_certificates (operator);

-- One-time operator enrollment bundles: only the token's hash is stored.
CREATE TABLE operator_invites (
    token_hash TEXT     NOT NULL PRIMARY KEY,
    name       TEXT COLLATE "C" NOT NULL,
    role       TEXT     NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at BIGINT   NOT NULL,
    expires_at BIGINT   NOT NULL,
    used_at    BIGINT,
    cancelled  SMALLINT NOT NULL DEFAULT 0 CHECK (cancelled IN (0, 1))
);
CREATE INDEX operator_invites_by_name ON operator_invites (name);
