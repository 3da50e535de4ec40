-- Run logs: one row per line, keyed by the run and the line's sequence number (assigned by the
-- runner, or by the server for its own runs), so a resent line is ignored. A gap in `seq` means
-- lines were cut (the run's log passed its size cap).

CREATE TABLE log_lines (
    run_id  INTEGER NOT NULL REFERENCES runs (id),
    seq     INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    stream  TEXT    NOT NULL,
    phase   TEXT    NOT NULL,
    line    TEXT    NOT NULL,
    PRIMARY KEY (run_id, seq)
) STRICT, WITHOUT ROWID;
