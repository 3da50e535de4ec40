-- How many of a task's dependencies are not Done, kept by every write that changes it, so that
-- the lease candidates are found by an index range (status, deps_pending = 0, priority, seq)
-- instead of a scan of the blocked tasks.

ALTER TABLE tasks ADD COLUMN deps_pending INTEGER NOT NULL DEFAULT 0 CHECK (deps_pending >= 0);

UPDATE tasks SET deps_pending = (
    SELECT COUNT(*) FROM task_deps d JOIN tasks u ON u.id = d.depends_on
    WHERE d.task_id = tasks.id AND u.status <> 'done');

CREATE INDEX tasks_ready ON tasks (status, deps_pending, priority, seq);
