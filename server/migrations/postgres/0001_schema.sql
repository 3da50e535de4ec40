-- The PostgreSQL schema: the tables and indexes the SQLite migrations reach at their head
-- (migrations/sqlite/0001 … 0019), in PostgreSQL's idiom. Times are milliseconds since the
-- Unix epoch (UTC) in BIGINT, as in SQLite, so both backends map rows the same way; money is
-- in cents (DOUBLE PRECISION); flags are BOOLEAN. IDs that are never reused are identity
-- columns (a sequence never gives a number twice). Keys and names compare byte by byte
-- (COLLATE "C"), as SQLite's do, whatever the database's locale.

CREATE TABLE tasks (
    seq                 BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  TEXT    COLLATE "C" NOT NULL UNIQUE,
    title               TEXT    NOT NULL,
    description         TEXT    NOT NULL DEFAULT '',
    namespace           TEXT,
    priority            BIGINT  NOT NULL CHECK (priority BETWEEN 0 AND 4),
    parent              TEXT    COLLATE "C" REFERENCES tasks (id),
    status              TEXT    NOT NULL CHECK (status IN
                            ('open', 'in_progress', 'verified', 'done', 'needs_help', 'cancelled')),
    patchset            BIGINT  NOT NULL DEFAULT 0 CHECK (patchset >= 0),
    failures            BIGINT  NOT NULL DEFAULT 0 CHECK (failures >= 0),
    lost_leases         BIGINT  NOT NULL DEFAULT 0 CHECK (lost_leases >= 0),
    cost_cents          DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_at_retry       DOUBLE PRECISION NOT NULL DEFAULT 0,
    backoff_until       BIGINT,
    feedback            TEXT,
    amend               BOOLEAN NOT NULL DEFAULT FALSE,
    -- The current lease, while the task is in progress. `lease_epoch` only ever grows: it
    -- fences off every earlier lease of the task.
    lease_id            TEXT,
    lease_epoch         BIGINT  NOT NULL DEFAULT 0,
    lease_runner        TEXT,
    lease_runner_id     TEXT,
    lease_base          TEXT,
    lease_previous      TEXT,
    -- The last patchset's commit (kept under refs/pipeline/tasks/<id>/<epoch>).
    patch_commit        TEXT,
    -- The runner whose lease lapsed last; the next lease prefers another one.
    avoid_runner        TEXT,
    verified_tree       TEXT,
    -- How many of the task's dependencies are not Done, kept by every write that changes it.
    deps_pending        BIGINT  NOT NULL DEFAULT 0 CHECK (deps_pending >= 0),
    -- The labels a runner must have, joined by U+001F; empty when it requires none.
    requires            TEXT    NOT NULL DEFAULT '',
    max_cost_cents      DOUBLE PRECISION,
    paused              TEXT,
    -- An epic's figures, kept by the triggers below in the transaction of the child's write.
    children            BIGINT  NOT NULL DEFAULT 0,
    children_done       BIGINT  NOT NULL DEFAULT 0,
    children_cancelled  BIGINT  NOT NULL DEFAULT 0,
    children_cost_cents DOUBLE PRECISION NOT NULL DEFAULT 0,
    base_check          BOOLEAN NOT NULL DEFAULT FALSE,
    approval_required   BOOLEAN NOT NULL DEFAULT FALSE,
    approved            BOOLEAN NOT NULL DEFAULT FALSE,
    epic                BOOLEAN NOT NULL DEFAULT FALSE,
    version             BIGINT  NOT NULL DEFAULT 1,
    created_at          BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL
);

CREATE INDEX tasks_by_status ON tasks (status, priority, seq);
CREATE INDEX tasks_by_order ON tasks (priority, seq);
CREATE INDEX tasks_by_parent ON tasks (parent, priority, seq) WHERE parent IS NOT NULL;
-- The lease candidates: no paused task, no epic.
CREATE INDEX tasks_ready ON tasks (status, deps_pending, priority, seq)
    WHERE paused IS NULL AND children = 0 AND NOT epic;
CREATE INDEX tasks_backoff ON tasks (backoff_until)
    WHERE status = 'open' AND backoff_until IS NOT NULL;
CREATE INDEX tasks_epics ON tasks (status) WHERE children > 0;

-- An epic's figures follow its children in the transaction of the child's own write (as the
-- SQLite schema's triggers child_created and child_changed do), and a change to them is a
-- change to the epic: its version moves.
CREATE FUNCTION child_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET children = children + 1,
        children_done = children_done + (NEW.status = 'done')::int,
        children_cancelled = children_cancelled + (NEW.status = 'cancelled')::int,
        children_cost_cents = children_cost_cents + NEW.cost_cents,
        version = version + 1
    WHERE id = NEW.parent;
    RETURN NULL;
END $$;

CREATE TRIGGER child_created AFTER INSERT ON tasks
    FOR EACH ROW WHEN (NEW.parent IS NOT NULL) EXECUTE FUNCTION child_created();

CREATE FUNCTION child_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET
        children_done = children_done + (NEW.status = 'done')::int - (OLD.status = 'done')::int,
        children_cancelled = children_cancelled + (NEW.status = 'cancelled')::int
            - (OLD.status = 'cancelled')::int,
        children_cost_cents = children_cost_cents + NEW.cost_cents - OLD.cost_cents,
        version = version + 1
    WHERE id = NEW.parent;
    RETURN NULL;
END $$;

CREATE TRIGGER child_changed AFTER UPDATE OF status, cost_cents ON tasks
    FOR EACH ROW
    WHEN (NEW.parent IS NOT NULL
          AND (NEW.status <> OLD.status OR NEW.cost_cents <> OLD.cost_cents))
    EXECUTE FUNCTION child_changed();

CREATE TABLE task_deps (
    task_id     TEXT COLLATE "C" NOT NULL REFERENCES tasks (id),
    depends_on  TEXT COLLATE "C" NOT NULL REFERENCES tasks (id),
    PRIMARY KEY (task_id, depends_on),
    CHECK (task_id <> depends_on)
);

CREATE INDEX task_deps_by_dependency ON task_deps (depends_on);

-- Merge trains.
CREATE TABLE trains (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    base_tip    TEXT    NOT NULL,
    started_at  BIGINT  NOT NULL,
    ended_at    BIGINT,
    outcome     TEXT,
    builds      BIGINT  NOT NULL DEFAULT 0 CHECK (builds >= 0),
    landed      BIGINT  NOT NULL DEFAULT 0 CHECK (landed >= 0),
    red_commit  TEXT
);

CREATE INDEX trains_by_end ON trains (ended_at) WHERE ended_at IS NOT NULL;

CREATE TABLE runs (
    id                  BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id             TEXT    COLLATE "C" NOT NULL REFERENCES tasks (id),
    phase               TEXT    NOT NULL CHECK (phase IN ('dev', 'verify', 'integrate')),
    patchset            BIGINT  NOT NULL,
    attempt             BIGINT  NOT NULL,
    runner              TEXT,
    status              TEXT    NOT NULL CHECK (status IN ('running', 'success', 'failure')),
    cost_cents          DOUBLE PRECISION NOT NULL DEFAULT 0,
    started_at          BIGINT  NOT NULL,
    finished_at         BIGINT,
    error               TEXT,
    failure_kind        TEXT    CHECK (failure_kind IN ('task', 'infrastructure')),
    train               BIGINT  REFERENCES trains (id),
    builds              BIGINT  CHECK (builds >= 0),
    -- What a dev run's agent used, as its runner reported it (a report exactly when `agent`
    -- is set).
    agent               TEXT,
    model               TEXT,
    input_tokens        BIGINT  CHECK (input_tokens >= 0),
    cached_input_tokens BIGINT  CHECK (cached_input_tokens >= 0),
    cache_write_tokens  BIGINT  CHECK (cache_write_tokens >= 0),
    output_tokens       BIGINT  CHECK (output_tokens >= 0),
    reasoning_tokens    BIGINT  CHECK (reasoning_tokens >= 0),
    cost_source         TEXT    CHECK (cost_source IN ('reported', 'estimated', 'none')),
    usage_complete      BOOLEAN,
    session_id          TEXT
);

CREATE INDEX runs_by_task ON runs (task_id, id);
CREATE INDEX runs_running ON runs (status) WHERE status = 'running';
CREATE INDEX runs_charged ON runs (finished_at) WHERE cost_cents > 0 OR agent IS NOT NULL;

-- The change feed (a task's history entries are its `task` entries). `id` is the entry's
-- position, taken from the one-row counter `feed_head` in the writing transaction
-- (`UPDATE feed_head SET pos = pos + 1 RETURNING pos`): the row's lock, held to COMMIT,
-- orders the writers, so positions become visible in the order they were given and a reader
-- resuming after a position never skips one (a sequence would let a later position commit
-- first).
CREATE TABLE feed_head (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    pos  BIGINT  NOT NULL
);

INSERT INTO feed_head (one, pos) VALUES (TRUE, 0);

CREATE TABLE task_events (
    id           BIGINT  PRIMARY KEY,
    topic        TEXT    NOT NULL DEFAULT 'task',
    subject      TEXT,
    task_id      TEXT    COLLATE "C" REFERENCES tasks (id),
    at           BIGINT  NOT NULL,
    kind         TEXT    NOT NULL,
    from_status  TEXT,
    to_status    TEXT,
    message      TEXT    NOT NULL,
    data         TEXT    NOT NULL DEFAULT '{}',
    CHECK ((topic = 'task') = (task_id IS NOT NULL AND to_status IS NOT NULL)),
    CHECK (task_id IS NOT NULL OR subject IS NOT NULL)
);

CREATE INDEX task_events_by_task ON task_events (task_id, id) WHERE task_id IS NOT NULL;

-- Small key/value facts about this server.
CREATE TABLE meta (
    key    TEXT COLLATE "C" PRIMARY KEY,
    value  TEXT NOT NULL
);

-- Integration: a journal of base moves in flight.
CREATE TABLE integrations (
    task_id     TEXT    COLLATE "C" PRIMARY KEY REFERENCES tasks (id),
    old_tip     TEXT    NOT NULL,
    new_commit  TEXT    NOT NULL,
    started_at  BIGINT  NOT NULL,
    train       BIGINT  REFERENCES trains (id)
);

-- Run logs: one row per line, keyed by the run and the line's sequence number.
CREATE TABLE log_lines (
    run_id  BIGINT  NOT NULL REFERENCES runs (id),
    seq     BIGINT  NOT NULL,
    at      BIGINT  NOT NULL,
    stream  TEXT    NOT NULL,
    phase   TEXT    NOT NULL,
    line    TEXT    NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Sessions of the web page: only SHA-256s of IDs and tokens.
CREATE TABLE sessions (
    id_sha256    TEXT   COLLATE "C" PRIMARY KEY,
    role         TEXT   NOT NULL CHECK (role IN ('admin', 'viewer')),
    token_sha256 TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);

-- Webhook endpoints: each one's cursor in the change feed.
CREATE TABLE webhooks (
    url               TEXT   COLLATE "C" PRIMARY KEY,
    position          BIGINT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    next_attempt_at   BIGINT,
    failing_since     BIGINT,
    last_error        TEXT,
    last_error_at     BIGINT,
    last_delivered_at BIGINT,
    created_at        BIGINT NOT NULL
);
