-- The watched folders each daemon joined with (JSON array of stored paths): a recording is one job
-- across daemons only when every host sees it at the same path, so a daemon whose folders differ
-- from a live member's is told at start.
ALTER TABLE daemons ADD COLUMN roots TEXT NOT NULL DEFAULT '[]';
