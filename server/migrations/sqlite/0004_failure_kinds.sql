-- Whose fault a failed run was (the task's, or the infrastructure's: a missing program, a git or
-- disk error, a lost runner), and the leases a task lost in a row (not counted as failures).

ALTER TABLE runs ADD COLUMN failure_kind TEXT CHECK (failure_kind IN ('task', 'infrastructure'));

ALTER TABLE tasks ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0 CHECK (lost_leases >= 0);
