-- What a dev run's agent used, as its runner reported it: the agent, the model, the tokens, where
-- the run's cost (its cost_cents) came from, whether the figures are complete, and the agent's
-- session (for resuming it on the next attempt). A run has a usage report exactly when `agent`
-- is set. Columns rather than one JSON column: the last-day totals sum the tokens in SQL.
--
-- runs_charged holds only the runs that cost something or report usage, by when they finished:
-- the start-up load of the last day's totals reads them without a scan, and the runs that cost
-- nothing (verify and integrate runs, given-back leases) add nothing to the index.

ALTER TABLE runs ADD COLUMN agent TEXT;
ALTER TABLE runs ADD COLUMN model TEXT;
ALTER TABLE runs ADD COLUMN input_tokens INTEGER CHECK (input_tokens >= 0);
ALTER TABLE runs ADD COLUMN cached_input_tokens INTEGER CHECK (cached_input_tokens >= 0);
ALTER TABLE runs ADD COLUMN cache_write_tokens INTEGER CHECK (cache_write_tokens >= 0);
ALTER TABLE runs ADD COLUMN output_tokens INTEGER CHECK (output_tokens >= 0);
ALTER TABLE runs ADD COLUMN reasoning_tokens INTEGER CHECK (reasoning_tokens >= 0);
ALTER TABLE runs ADD COLUMN cost_source TEXT
    CHECK (cost_source IN ('reported', 'estimated', 'none'));
ALTER TABLE runs ADD COLUMN usage_complete INTEGER CHECK (usage_complete IN (0, 1));
ALTER TABLE runs ADD COLUMN session_id TEXT;

CREATE INDEX runs_charged ON runs (finished_at)
    WHERE cost_cents > 0 OR agent IS NOT NULL;
