-- The approval gate: a task created with --approval waits, once verified, for a person's
-- approval (as every task does under the server's --require-approval), and whether a person
-- approved its current patchset (cleared when it leaves Verified for anything but Done).

ALTER TABLE tasks ADD COLUMN approval_required INTEGER NOT NULL DEFAULT 0
    CHECK (approval_required IN (0, 1));
ALTER TABLE tasks ADD COLUMN approved INTEGER NOT NULL DEFAULT 0 CHECK (approved IN (0, 1));
