-- The change feed (issue 26): the task history becomes the feed of every state change a
-- person or program may follow. Each entry has a position (`id`, assigned in commit order by
-- the single writer: where a reader resumes), a topic (task, runner, landing, queue, train), a
-- subject (a task ID, a runner's name, a train's ID, `queue`, `landing`), a kind, a time, a
-- line of text (`message`) and a JSON object (`data`). A task's entries are written as before
-- (`topic` defaults to `task`, their subject is their `task_id`, with `from_status` and
-- `to_status`); the others have a `subject` and no `task_id`.
CREATE TABLE feed (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT    NOT NULL DEFAULT 'task',
    subject      TEXT,
    task_id      TEXT    REFERENCES tasks (id),
    at           INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    from_status  TEXT,
    to_status    TEXT,
    message      TEXT    NOT NULL,
    data         TEXT    NOT NULL DEFAULT '{}',
    CHECK ((topic = 'task') = (task_id IS NOT NULL AND to_status IS NOT NULL)),
    CHECK (task_id IS NOT NULL OR subject IS NOT NULL)
) STRICT;

INSERT INTO feed (id, task_id, at, kind, from_status, to_status, message)
    SELECT id, task_id, at, kind, from_status, to_status, message
    FROM task_events ORDER BY id;

-- No position is ever given twice: the new table goes on from the old one's counter.
UPDATE sqlite_sequence
    SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'task_events'), 0))
    WHERE name = 'feed';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'feed', seq FROM sqlite_sequence
    WHERE name = 'task_events' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'feed');

DROP TABLE task_events;
ALTER TABLE feed RENAME TO task_events;

CREATE INDEX task_events_by_task ON task_events (task_id, id) WHERE task_id IS NOT NULL;
