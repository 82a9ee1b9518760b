-- Archived stretches of the audit log (PostgreSQL flavour; see control/src/domain/audit.rs,
-- "Archiving"). Keep in step with ../sqlite/0011_audit_archives.sql.
--
-- One row per `tether-control audit archive`: the entries `first_seq..=seq` were written
-- to a segment file (`file`, its name as given) ending at a signed checkpoint of entry
-- `seq`, then deleted from audit_log in the transaction that wrote this row. The row with
-- the highest `seq` is the anchor of the live log: its first entry is `seq + 1` and its
-- `prev_hash` is `hash`. Append-only, like audit_log (the function comes from 0001).
CREATE TABLE audit_archives (
    seq         BIGINT NOT NULL PRIMARY KEY,
    hash        TEXT   NOT NULL,
    first_seq   BIGINT NOT NULL,
    archived_at BIGINT NOT NULL,
    file        TEXT   NOT NULL
);
CREATE TRIGGER audit_archives_no_change BEFORE UPDATE OR DELETE ON audit_archives
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_archives_no_truncate BEFORE TRUNCATE ON audit_archives
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Entries leave audit_log only once archived (a first guard, as the append-only triggers
-- are), and checkpoints before the anchor with them; the anchor's own checkpoint stays.
-- The triggers of 0001 and 0003 stay as they are (same names); their function learns
-- the one exception. UPDATE and TRUNCATE are refused as before.
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_log'
        AND OLD.seq <= (SELECT COALESCE(MAX(seq), 0) FROM audit_archives) THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_checkpoints'
        AND OLD.seq < (SELECT COALESCE(MAX(seq), 0) FROM audit_archives) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END
$$;
