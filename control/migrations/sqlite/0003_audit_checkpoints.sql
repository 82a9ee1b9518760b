-- Signed checkpoints of the audit log (SQLite flavour; see control/src/audit.rs, "Signed
-- checkpoints"). Keep in step with ../postgres/0003_audit_checkpoints.sql.
--
-- One row per checkpoint: the seq and hash of an entry, the time it was signed, the
-- control leaf's ECDSA P-256 signature (lowercase hex of the DER) over the documented
-- checkpoint string, and the signer's certificate chain (leaf then intermediate, PEM),
-- kept per row because the control leaf rotates. At most one checkpoint per seq.
-- Append-only, like audit_log.
CREATE TABLE audit_checkpoints (
    seq              INTEGER NOT NULL PRIMARY KEY,
    head_hash        TEXT    NOT NULL,
    at               INTEGER NOT NULL,
    signature        TEXT    NOT NULL,
    signer_chain_pem TEXT    NOT NULL
);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;
