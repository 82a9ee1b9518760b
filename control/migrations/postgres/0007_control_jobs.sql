-- Periodic jobs claimed through a lease row (postgres flavour). Keep in step with
-- ../sqlite/0007_control_jobs.sql.
--
-- One row per periodic job (audit checkpoints, overlap sweeps, pruning). A replica runs
-- a job only after it claimed the row with one statement on the database's clock:
--   UPDATE control_jobs SET next_run_at = now + period, epoch = epoch + 1, ...
--    WHERE name = $1 AND next_run_at <= now RETURNING epoch
-- so however many replicas share the database, one claim succeeds per period, and a
-- claimant that dies loses at most that period's run. No lock outlives the statement,
-- so it works through any pooler. Times are Unix milliseconds on the database's clock;
-- rows are created (due at once) by the first replica that runs the job.
CREATE TABLE control_jobs (
    name        TEXT   NOT NULL PRIMARY KEY,
    -- When the job is next due.
    next_run_at BIGINT NOT NULL,
    -- Bumped by each claim: a fencing token for writes that must not come from a
    -- claimant whose period has passed.
    epoch       BIGINT NOT NULL DEFAULT 0,
    -- The replica (control_replicas.id) that made the last claim, and when.
    last_run_by TEXT,
    last_run_at BIGINT
);
