-- Integration: the tree the runner verified (to skip a build that cannot change the outcome),
-- and a journal of base moves in flight, so that a crash between moving the base and recording
-- it is finished (or undone) on restart.

ALTER TABLE tasks ADD COLUMN verified_tree TEXT;

CREATE TABLE integrations (
    task_id     TEXT    PRIMARY KEY REFERENCES tasks (id),
    old_tip     TEXT    NOT NULL,
    new_commit  TEXT    NOT NULL,
    started_at  INTEGER NOT NULL
) STRICT;
