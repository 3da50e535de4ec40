-- Epics: a task with children is never leased itself and is Done once its children are.
-- Each task keeps how many children it has, how many of them are done and cancelled, and
-- what they have cost together, kept by triggers in the transaction of the child's own write
-- (so they can never disagree with the children), so that an epic's progress and its cap
-- (`--max-cost` on the epic) are read from one row, never by summing its children. A change
-- to them is a change to the epic (its version moves), so a decision made on the epic as it
-- was (a lease, "its children are done") loses its compare-and-swap.

ALTER TABLE tasks ADD COLUMN children INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN children_done INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN children_cancelled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN children_cost_cents REAL NOT NULL DEFAULT 0;

UPDATE tasks SET
    children = (SELECT COUNT(*) FROM tasks c WHERE c.parent = tasks.id),
    children_done = (SELECT COUNT(*) FROM tasks c WHERE c.parent = tasks.id AND c.status = 'done'),
    children_cancelled = (SELECT COUNT(*) FROM tasks c
                          WHERE c.parent = tasks.id AND c.status = 'cancelled'),
    children_cost_cents = (SELECT COALESCE(SUM(c.cost_cents), 0) FROM tasks c
                           WHERE c.parent = tasks.id)
WHERE id IN (SELECT parent FROM tasks WHERE parent IS NOT NULL);

CREATE TRIGGER child_created AFTER INSERT ON tasks WHEN NEW.parent IS NOT NULL
BEGIN
    UPDATE tasks SET children = children + 1,
        children_done = children_done + (NEW.status = 'done'),
        children_cancelled = children_cancelled + (NEW.status = 'cancelled'),
        children_cost_cents = children_cost_cents + NEW.cost_cents,
        version = version + 1
    WHERE id = NEW.parent;
END;

CREATE TRIGGER child_changed AFTER UPDATE OF status, cost_cents ON tasks
WHEN NEW.parent IS NOT NULL AND (NEW.status <> OLD.status OR NEW.cost_cents <> OLD.cost_cents)
BEGIN
    UPDATE tasks SET
        children_done = children_done + (NEW.status = 'done') - (OLD.status = 'done'),
        children_cancelled = children_cancelled + (NEW.status = 'cancelled')
            - (OLD.status = 'cancelled'),
        children_cost_cents = children_cost_cents + NEW.cost_cents - OLD.cost_cents,
        version = version + 1
    WHERE id = NEW.parent;
END;

-- An epic is never a lease candidate: the candidates' index leaves it out.
DROP INDEX tasks_ready;
CREATE INDEX tasks_ready ON tasks (status, deps_pending, priority, seq)
    WHERE paused IS NULL AND children = 0;

-- The epics, for start-up's look for those whose children finished just before a crash.
CREATE INDEX tasks_epics ON tasks (status) WHERE children > 0;
