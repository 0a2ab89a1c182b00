-- The two transitions every file makes write their event in the same statement, by trigger: each is
-- then one autocommit statement, one round trip to SQLite's thread instead of four (BEGIN, UPDATE,
-- INSERT, COMMIT). Measured with callferry-bench (issue 8): those round trips, not SQLite's own
-- work, were most of the queue's cost per file. The rarer transitions still write their own event.

CREATE TRIGGER job_events_declared AFTER UPDATE OF state ON jobs
WHEN OLD.state = 'declaring' AND NEW.state = 'uploading' BEGIN
    INSERT INTO job_events (job_id, at, event, detail)
        VALUES (NEW.id, NEW.updated_at, 'declared', NEW.interaction_id);
END;

CREATE TRIGGER job_events_uploaded AFTER UPDATE OF state ON jobs
WHEN OLD.state = 'uploading' AND NEW.state = 'uploaded' BEGIN
    INSERT INTO job_events (job_id, at, event, detail)
        VALUES (NEW.id, NEW.updated_at, 'uploaded', CAST(NEW.upload_status AS TEXT));
END;
