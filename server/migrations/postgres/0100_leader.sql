-- The leader lease (issue 28): one row; the server whose lease is live (expires_at on the
-- DATABASE's clock) leads, with a term that rises on every takeover. Never a session advisory
-- lock: those vanish when a pool recycles the connection and carry no term.
CREATE TABLE leader_lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    term       BIGINT NOT NULL,
    -- Who holds it: one server process (its advertise URL, host, PID and start).
    holder     TEXT NOT NULL,
    -- Where clients reach the holder (its --advertise URL), for a standby to name.
    advertise  TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

INSERT INTO leader_lease (id, term, holder, advertise, expires_at)
VALUES (1, 0, '', '', '-infinity');

-- The fence every write of the leader runs first, in the write's own transaction:
-- `SELECT pipeline_leader_fence($term)`. It raises (SQLSTATE PLF01) unless `term` holds a lease
-- that is live now (clock_timestamp(), not the transaction's start), and keeps the lease row
-- share-locked to the transaction's end, so a takeover (an UPDATE of the row) waits for the
-- write to commit or roll back: a write the fence let in is ordered before the next term.
CREATE FUNCTION pipeline_leader_fence(t BIGINT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM leader_lease
    WHERE id = 1 AND term = t AND expires_at > clock_timestamp()
    FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'term % no longer leads', t USING ERRCODE = 'PLF01';
    END IF;
END
$$;
