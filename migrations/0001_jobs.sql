-- One row per file version (path, size, mtime). The row is the only truth about a recording's
-- progress; see ARCHITECTURE.md for the states and what each one means after a crash.
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    path            TEXT    NOT NULL,
    root            TEXT    NOT NULL,          -- the watched folder it was found under
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    dev             INTEGER NOT NULL DEFAULT 0,
    ino             INTEGER NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL CHECK (state IN
                        ('pending', 'declaring', 'declared', 'uploading',
                         'uploaded', 'processed', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,           -- unix ms
    interaction_id  TEXT,
    upload_status   INTEGER,                    -- 201, or 409 when an earlier attempt had got through
    last_error      TEXT,
    disposed        INTEGER NOT NULL DEFAULT 0, -- after_upload action (move/delete) done
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (path, size, mtime_ns)
);

CREATE INDEX jobs_by_state_due ON jobs (state, next_attempt_at);

-- Every step's outcome, for `list`/forensics: declared, uploaded (201/409), retry (why), failed (why).
CREATE TABLE job_events (
    id      INTEGER PRIMARY KEY,
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at      INTEGER NOT NULL,
    event   TEXT    NOT NULL,
    detail  TEXT
);

CREATE INDEX job_events_by_job ON job_events (job_id);

-- Daemon-wide facts other processes (status) need: pause state and reason.
CREATE TABLE daemon_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
