-- Commands in flight, per replica (sqlite flavour). Keep in step with
-- ../postgres/0009_commands_in_flight.sql.
--
-- A row is inserted in the transaction that appends a command's `appliance.exec` request
-- entry and deleted in the transaction that appends its outcome entry. A row whose
-- replica stopped heartbeating (control_replicas.heartbeat_at older than
-- [replica] lost_after) belongs to a command nobody will finish: the abandon_commands
-- job appends its outcome (`replica_lost`) and deletes the row, in one transaction, and
-- only when the delete removed the row, so each command has exactly one outcome however
-- many replicas race. Nothing else reads these rows.
CREATE TABLE commands_in_flight (
    -- Unique per command across replicas and restarts (random, hex).
    id          TEXT   NOT NULL PRIMARY KEY,
    -- The replica (control_replicas.id) relaying the command.
    replica     TEXT   NOT NULL,
    appliance   TEXT   NOT NULL,
    -- Unix seconds (the replica's clock, as the audit entry's).
    started_at  INTEGER NOT NULL,
    -- What the outcome entry repeats: who asked, through which broker, under which
    -- replica-local command id.
    actor_kind  TEXT   NOT NULL,
    actor       TEXT   NOT NULL,
    broker      TEXT   NOT NULL,
    command_id  INTEGER NOT NULL
);
CREATE INDEX commands_in_flight_by_replica ON commands_in_flight (replica);
