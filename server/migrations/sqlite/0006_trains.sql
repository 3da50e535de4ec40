-- Merge trains: each train the integrator forms (its ID is what a task's integrate run names),
-- how many builds it ran and how many tasks it landed (for builds per landed task); each
-- integrate run names its train and how many builds covered its task; a journal entry names
-- the train whose base move it belongs to.

CREATE TABLE trains (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    base_tip    TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    outcome     TEXT,
    builds      INTEGER NOT NULL DEFAULT 0 CHECK (builds >= 0),
    landed      INTEGER NOT NULL DEFAULT 0 CHECK (landed >= 0),
    red_commit  TEXT
) STRICT;

CREATE INDEX trains_by_end ON trains (ended_at) WHERE ended_at IS NOT NULL;

ALTER TABLE runs ADD COLUMN train INTEGER REFERENCES trains (id);
ALTER TABLE runs ADD COLUMN builds INTEGER CHECK (builds >= 0);
ALTER TABLE integrations ADD COLUMN train INTEGER REFERENCES trains (id);
