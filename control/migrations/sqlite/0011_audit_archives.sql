-- Archived stretches of the audit log (SQLite flavour; see control/src/domain/audit.rs,
-- "Archiving"). Keep in step with ../postgres/0011_audit_archives.sql.
--
-- One row per `tether-control audit archive`: the entries `first_seq..=seq` were written
-- to a segment file (`file`, its name as given) ending at a signed checkpoint of entry
-- `seq`, then deleted from audit_log in the transaction that wrote this row. The row with
-- the highest `seq` is the anchor of the live log: its first entry is `seq + 1` and its
-- `prev_hash` is `hash`. Append-only, like audit_log.
CREATE TABLE audit_archives (
    seq         INTEGER NOT NULL PRIMARY KEY,
    hash        TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    archived_at INTEGER NOT NULL,
    file        TEXT    NOT NULL
);
CREATE TRIGGER audit_archives_no_update BEFORE UPDATE ON audit_archives
BEGIN
    SELECT RAISE(ABORT, 'audit_archives is append-only');
END;
CREATE TRIGGER audit_archives_no_delete BEFORE DELETE ON audit_archives
BEGIN
    SELECT RAISE(ABORT, 'audit_archives is append-only');
END;

-- Entries leave audit_log only once archived (a first guard, as the append-only triggers
-- are), and checkpoints before the anchor with them; the anchor's own checkpoint stays.
DROP TRIGGER audit_log_no_delete;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
WHEN OLD.seq > (SELECT COALESCE(MAX(seq), 0) FROM audit_archives)
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
DROP TRIGGER audit_checkpoints_no_delete;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
WHEN OLD.seq >= (SELECT COALESCE(MAX(seq), 0) FROM audit_archives)
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;
