-- Signed checkpoints of the audit log (PostgreSQL flavour; see control/src/audit.rs,
-- "Signed checkpoints"). Keep in step with ../sqlite/0003_audit_checkpoints.sql.
--
-- One row per checkpoint: the seq and hash of an entry, the time it was signed, the
-- control leaf's ECDSA P-256 signature (lowercase hex of the DER) over the documented
-- checkpoint string, and the signer's certificate chain (leaf then intermediate, PEM),
-- kept per row because the control leaf rotates. At most one checkpoint per seq.
-- Append-only, like audit_log (the function comes from 0001).
CREATE TABLE audit_checkpoints (
    seq              BIGINT NOT NULL PRIMARY KEY,
    head_hash        TEXT   NOT NULL,
    at               BIGINT NOT NULL,
    signature        TEXT   NOT NULL,
    signer_chain_pem TEXT   NOT NULL
);
CREATE TRIGGER audit_checkpoints_no_change BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
