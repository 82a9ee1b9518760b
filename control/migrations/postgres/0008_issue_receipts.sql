-- Certificates kept for idempotent enrollment and renewal (postgres flavour). Keep in
-- step with ../sqlite/0008_issue_receipts.sql.
--
-- Written in the transaction that records the certificate (and, for an enrollment,
-- redeems its token), so a client whose answer was lost (a replica crash, a dropped
-- connection) and that retries with the same token or the same presented certificate
-- AND the same public key gets the same certificate back instead of token_used or a
-- second certificate. A different key never matches. Kept until expires_at (now +
-- [enroll] nonce_ttl), then pruned by the nonce_prune job.
CREATE TABLE issue_receipts (
    -- 'enroll' (subject: the token's hash) or 'renew' (subject: the fingerprint of the
    -- certificate presented to renew).
    kind           TEXT   NOT NULL CHECK (kind IN ('enroll', 'renew')),
    subject        TEXT COLLATE "C" NOT NULL,
    -- SHA-256 of the CSR's public key (the SubjectPublicKeyInfo's key bits), hex.
    csr_key_sha256 TEXT   NOT NULL,
    serial         TEXT   NOT NULL REFERENCES certificates (serial),
    -- The chain as it was answered (leaf, intermediate).
    chain_pem      TEXT   NOT NULL,
    expires_at     BIGINT NOT NULL,
    PRIMARY KEY (kind, subject, csr_key_sha256)
);
CREATE INDEX issue_receipts_by_expiry ON issue_receipts (expires_at);
