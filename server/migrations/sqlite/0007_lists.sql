-- Lists walk the tasks page by page in lease order (a keyset on (priority, seq)), with a status
-- filter (tasks_by_status) or without one (tasks_by_order); the dispatcher's next wake-up is
-- the earliest back-off end of an open task, read from tasks_backoff instead of a scan.

CREATE INDEX tasks_by_order ON tasks (priority, seq);

CREATE INDEX tasks_backoff ON tasks (backoff_until)
    WHERE status = 'open' AND backoff_until IS NOT NULL;
