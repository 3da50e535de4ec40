-- The labels a runner must have to lease a task (`task add --requires`), joined by U+001F (a
-- separator no label holds); empty when it requires none.

ALTER TABLE tasks ADD COLUMN requires TEXT NOT NULL DEFAULT '';
