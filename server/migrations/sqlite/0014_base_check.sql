-- A runner's verification that failed on a base the server did not know green: the task waits
-- Verified, not charged, until the integrator has built that base alone and so learned whose
-- failure it was (1 while it waits).

ALTER TABLE tasks ADD COLUMN base_check INTEGER NOT NULL DEFAULT 0 CHECK (base_check IN (0, 1));
