-- `callferry status` at a million jobs (measured with callferry-bench, issue 8): it took ~300 ms,
-- nearly all of it in scans of a whole table. These make its cost independent of the database size.

-- "Recent errors" walked back through every event until it had found five retry/failed ones; when
-- errors are rare that is the whole table.
CREATE INDEX job_events_errors ON job_events (id) WHERE event IN ('retry', 'failed');

-- "Uploaded in the last hour" scanned every event too; now it reads only the last hour's uploads.
CREATE INDEX job_events_uploaded_at ON job_events (at) WHERE event = 'uploaded';

-- Jobs per state, kept by triggers in the same transaction as every change to `jobs`, so counting
-- reads a handful of rows instead of a million index entries.
CREATE TABLE job_counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO job_counts (state, n) SELECT state, COUNT(*) FROM jobs GROUP BY state;

CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
