-- Webhook endpoints (--webhook URL): each one's cursor in the change feed. `position` is the
-- last entry handled (delivered, refused by the receiver for good, given up on, or not one of
-- its events); the entries after it are delivered in order. The rest describe the entry after
-- the cursor while it fails: how many attempts, when the next one is due, since when it has
-- failed (it is given up on a day after that), and the last error. A new endpoint starts at
-- the feed's head: history is not replayed to a new receiver.

CREATE TABLE webhooks (
    url               TEXT PRIMARY KEY,
    position          INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER,
    failing_since     INTEGER,
    last_error        TEXT,
    last_error_at     INTEGER,
    last_delivered_at INTEGER,
    created_at        INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
