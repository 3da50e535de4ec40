-- Tasks, their dependencies, their runs and their history.
-- Times are milliseconds since the Unix epoch (UTC); money is in cents.

CREATE TABLE tasks (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    title          TEXT    NOT NULL,
    description    TEXT    NOT NULL DEFAULT '',
    namespace      TEXT,
    priority       INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 4),
    parent         TEXT    REFERENCES tasks (id),
    status         TEXT    NOT NULL CHECK (status IN
                       ('open', 'in_progress', 'verified', 'done', 'needs_help', 'cancelled')),
    patchset       INTEGER NOT NULL DEFAULT 0 CHECK (patchset >= 0),
    failures       INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    cost_cents     REAL    NOT NULL DEFAULT 0,
    cost_at_retry  REAL    NOT NULL DEFAULT 0,
    backoff_until  INTEGER,
    feedback       TEXT,
    amend          INTEGER NOT NULL DEFAULT 0 CHECK (amend IN (0, 1)),
    -- The current lease, while the task is in progress. `lease_epoch` only ever grows: it fences
    -- off every earlier lease of the task.
    lease_id         TEXT,
    lease_epoch      INTEGER NOT NULL DEFAULT 0,
    lease_runner     TEXT,
    lease_runner_id  TEXT,
    lease_base       TEXT,
    lease_previous   TEXT,
    -- The last patchset's commit (kept under refs/pipeline/tasks/<id>/<epoch>).
    patch_commit   TEXT,
    -- The runner whose lease lapsed last; the next lease prefers another one.
    avoid_runner   TEXT,
    version        INTEGER NOT NULL DEFAULT 1,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;

CREATE INDEX tasks_by_status ON tasks (status, priority, seq);

CREATE TABLE task_deps (
    task_id     TEXT NOT NULL REFERENCES tasks (id),
    depends_on  TEXT NOT NULL REFERENCES tasks (id),
    PRIMARY KEY (task_id, depends_on),
    CHECK (task_id <> depends_on)
) STRICT, WITHOUT ROWID;

CREATE INDEX task_deps_by_dependency ON task_deps (depends_on);

CREATE TABLE runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id      TEXT    NOT NULL REFERENCES tasks (id),
    phase        TEXT    NOT NULL CHECK (phase IN ('dev', 'verify', 'integrate')),
    patchset     INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    runner       TEXT,
    status       TEXT    NOT NULL CHECK (status IN ('running', 'success', 'failure')),
    cost_cents   REAL    NOT NULL DEFAULT 0,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    error        TEXT
) STRICT;

CREATE INDEX runs_by_task ON runs (task_id, id);
CREATE INDEX runs_running ON runs (status) WHERE status = 'running';

CREATE TABLE task_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id      TEXT    NOT NULL REFERENCES tasks (id),
    at           INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    from_status  TEXT,
    to_status    TEXT    NOT NULL,
    message      TEXT    NOT NULL
) STRICT;

CREATE INDEX task_events_by_task ON task_events (task_id, id);

-- Small key/value facts about this server: the next generated task number, the settings it
-- was started with.
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) STRICT, WITHOUT ROWID;
