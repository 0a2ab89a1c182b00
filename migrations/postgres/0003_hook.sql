-- What the recorder's end-of-call hook (`callferry enqueue --now`) said about a job's call, as on
-- SQLite (migrations/0011_hook.sql): JSON, written only while the job is pending.
ALTER TABLE jobs ADD COLUMN hook TEXT;
