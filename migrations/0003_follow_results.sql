-- Following an uploaded interaction to `processed` and writing its results.
ALTER TABLE jobs ADD COLUMN uploaded_at INTEGER;              -- unix ms of the 201/409
ALTER TABLE jobs ADD COLUMN follow_at INTEGER;                -- next status poll; NULL = not followed
ALTER TABLE jobs ADD COLUMN follow_attempts INTEGER NOT NULL DEFAULT 0;  -- transient poll failures in a row
ALTER TABLE jobs ADD COLUMN service_status TEXT;              -- last status ElevateAI reported
ALTER TABLE jobs ADD COLUMN results_written TEXT NOT NULL DEFAULT '';   -- kinds already on disk, comma-separated

CREATE INDEX jobs_by_follow_at ON jobs (follow_at) WHERE follow_at IS NOT NULL;
