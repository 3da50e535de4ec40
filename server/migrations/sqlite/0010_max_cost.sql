-- A task's own cost cap in cents (`task add --max-cost`), over the server's --max-task-cost;
-- NULL: the server's.

ALTER TABLE tasks ADD COLUMN max_cost_cents REAL;
