-- The web console's sign-in (postgres flavour). Keep in step with
-- ../sqlite/0010_console.sql. Times are Unix seconds; flags are 0/1 integers.

-- Single-use login links minted by `tether console` (POST /v1/console/login-links): the
-- secret travels in the URL's fragment and only its SHA-256 is stored. A link is good
-- once, before expires_at, for an operator that is still active.
CREATE TABLE console_login_links (
    id            TEXT    NOT NULL PRIMARY KEY,
    secret_sha256 TEXT    NOT NULL,
    operator      TEXT    NOT NULL REFERENCES operators (name),
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used          INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1))
);

-- Console sessions, shared by every replica: the cookie carries a 256-bit secret, the
-- row its SHA-256. A session ends at idle_expires_at (moved forward as it is used, at
-- most once a minute) or abs_expires_at, at logout (row deleted) or when its operator is
-- revoked (rows deleted in the same transaction).
CREATE TABLE console_sessions (
    token_sha256    TEXT    NOT NULL PRIMARY KEY,
    operator        TEXT    NOT NULL REFERENCES operators (name),
    created_at      BIGINT NOT NULL,
    last_seen_at    BIGINT NOT NULL,
    idle_expires_at BIGINT NOT NULL,
    abs_expires_at  BIGINT NOT NULL,
    user_agent      TEXT    NOT NULL,
    ip              TEXT    NOT NULL
);
CREATE INDEX console_sessions_by_operator ON console_sessions (operator);
