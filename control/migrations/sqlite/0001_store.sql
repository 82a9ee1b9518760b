-- The control store, SQLite flavour. Keep in step with ../postgres/0001_store.sql: the
-- same tables, columns and meanings; only the types differ. Times are Unix seconds;
-- flags are 0/1 integers (the same SQL then runs on both backends).

CREATE TABLE appliances (
    id                        TEXT    NOT NULL PRIMARY KEY,
    tenant                    TEXT    NOT NULL,
    -- PlatformBinding as JSON ({"kind": "aws", "role_arn": ...}).
    binding                   TEXT    NOT NULL,
    status                    TEXT    NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    manual_renewal_generation INTEGER NOT NULL DEFAULT 0,
    created_at                INTEGER NOT NULL
);
CREATE INDEX appliances_by_tenant ON appliances (tenant, id);
CREATE INDEX appliances_by_status ON appliances (status, id);

CREATE TABLE certificates (
    -- Insertion order: "newest first" is seq descending.
    seq            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    serial         TEXT    NOT NULL UNIQUE,
    appliance_id   TEXT    NOT NULL REFERENCES appliances (id),
    fingerprint    TEXT    NOT NULL UNIQUE,
    not_before     INTEGER NOT NULL,
    not_after      INTEGER NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('current', 'previous', 'revoked')),
    -- Set exactly when state = 'previous': the end of the overlap window.
    previous_until INTEGER,
    -- 1 while the fingerprint is in the allowlist (the allowlist is exactly these rows).
    allowed        INTEGER NOT NULL CHECK (allowed IN (0, 1)),
    CHECK ((state = 'previous') = (previous_until IS NOT NULL)),
    CHECK (state <> 'revoked' OR allowed = 0)
);
CREATE INDEX certificates_by_appliance ON certificates (appliance_id, seq);
CREATE INDEX certificates_allowed ON certificates (appliance_id, fingerprint) WHERE allowed = 1;
CREATE INDEX certificates_overlap ON certificates (previous_until) WHERE state = 'previous';
-- At most one current certificate per appliance (also serves "every current certificate,
-- by appliance").
CREATE UNIQUE INDEX certificates_current ON certificates (appliance_id) WHERE state = 'current';

CREATE TABLE enrollment_tokens (
    -- Only the hash the caller computed; never the token.
    token_hash   TEXT    NOT NULL PRIMARY KEY,
    appliance_id TEXT    NOT NULL REFERENCES appliances (id),
    expires_at   INTEGER NOT NULL,
    used_at      INTEGER
);
CREATE INDEX enrollment_tokens_by_appliance ON enrollment_tokens (appliance_id);

CREATE TABLE nonces (
    nonce      TEXT    NOT NULL PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
CREATE INDEX nonces_by_expiry ON nonces (expires_at);

CREATE TABLE used_proofs (
    kind       TEXT    NOT NULL,
    proof_id   TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (kind, proof_id)
);
CREATE INDEX used_proofs_by_expiry ON used_proofs (expires_at);

-- The allowlist version: one row. Every trust-changing transaction updates it first, so
-- such transactions run one at a time and commit in version order. A transaction that
-- changes at least one fingerprint bumps it by exactly one, at its end, and all of its
-- changes carry that version; one that changes none leaves it alone (no sequence: a
-- rolled-back transaction leaves no gap).
CREATE TABLE allowlist_version (
    id      INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO allowlist_version (id, version) VALUES (1, 0);

-- One row per fingerprint added to or removed from the allowlist; one version (one
-- operation) has one or more rows, `ordinal` 0, 1, ... in the order the operation
-- returned them. A fingerprint changes at most once per version, so a version is a set
-- of additions and removals that a broker applies as a whole.
CREATE TABLE allowlist_changes (
    version      INTEGER NOT NULL,
    ordinal      INTEGER NOT NULL,
    appliance_id TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    added        INTEGER NOT NULL CHECK (added IN (0, 1)),
    PRIMARY KEY (version, ordinal),
    UNIQUE (version, fingerprint)
);

-- The audit log (see control/src/audit.rs): append-only, one row per entry, each carrying
-- the SHA-256 of the one before. `seq` is 1, 2, 3, ... with no gap: an append takes the
-- next number from `audit_head` in the transaction of the change it records, so a
-- rollback leaves no gap and appends commit in `seq` order.
CREATE TABLE audit_log (
    seq        INTEGER NOT NULL PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor_kind TEXT    NOT NULL CHECK (actor_kind IN ('operator', 'appliance', 'broker', 'system')),
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    outcome    TEXT    NOT NULL CHECK (outcome IN ('success', 'refused', 'failed')),
    -- A JSON object, in the canonical form the hash covers.
    details    TEXT    NOT NULL,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL
);
CREATE INDEX audit_log_by_target ON audit_log (target, seq);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

-- The head of the audit log: one row, the last entry's seq and hash (0 and 64 zeros when
-- empty). Every append updates it before writing its entry, so appends (on every control
-- replica) run one at a time and each chains to the one before.
CREATE TABLE audit_head (
    id   INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
