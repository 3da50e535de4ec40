-- The children of an epic in lease order (`task list --parent`), a page at a time.

CREATE INDEX tasks_by_parent ON tasks (parent, priority, seq) WHERE parent IS NOT NULL;
