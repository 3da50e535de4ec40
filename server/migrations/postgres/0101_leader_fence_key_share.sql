-- The fence takes the lease row FOR KEY SHARE, not FOR SHARE (issue 28). A busy leader's writes
-- overlap without a gap, and each held the row share-locked to its end: the holder's renewal
-- (an UPDATE of expires_at, a FOR NO KEY UPDATE lock) waited behind them for ever, the deadline
-- passed and the only server stepped down under load (pipeline-bench's backends figure, 16
-- callers creating tasks at once). FOR KEY SHARE lets the renewal through; a takeover still
-- waits for every write the fence let in, because it first locks the row FOR UPDATE, which
-- conflicts with FOR KEY SHARE (leader::Elector::try_acquire).
CREATE OR REPLACE FUNCTION pipeline_leader_fence(t BIGINT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM leader_lease
    WHERE id = 1 AND term = t AND expires_at > clock_timestamp()
    FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'term % no longer leads', t USING ERRCODE = 'PLF01';
    END IF;
END
$$;
