-- A task held back by a person (`pipelinectl task pause ID`, for an epic and its children):
-- why, or NULL when it is not paused. The lease candidates' index leaves paused tasks out, so a
-- paused epic of any size costs the dispatch loop nothing.

ALTER TABLE tasks ADD COLUMN paused TEXT;

DROP INDEX tasks_ready;
CREATE INDEX tasks_ready ON tasks (status, deps_pending, priority, seq) WHERE paused IS NULL;
