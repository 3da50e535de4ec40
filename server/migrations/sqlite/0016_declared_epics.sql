-- An epic created as such (`task add --epic`): an epic from its start, before it has any
-- child, so a person adding children one by one never races an agent that starts on it.
-- Like an epic with children, it is never a lease candidate: the candidates' index leaves
-- it out.

ALTER TABLE tasks ADD COLUMN epic INTEGER NOT NULL DEFAULT 0;

DROP INDEX tasks_ready;
CREATE INDEX tasks_ready ON tasks (status, deps_pending, priority, seq)
    WHERE paused IS NULL AND children = 0 AND epic = 0;
