-- The queue in PostgreSQL, for several daemons on one shared spool (issue 15). The same jobs, states
-- and columns as the SQLite queue (migrations/0001..), in one migration, plus what several daemons
-- need: who holds a job, until when, and a fencing token. Times are unix ms like SQLite's, except
-- leases, which are the database's own clock (`now()`): the one clock every host agrees on.
CREATE TABLE jobs (
    id              BIGSERIAL PRIMARY KEY,
    -- The path as every host sees it (the spool is mounted at the same path on each host), encoded
    -- like SQLite's (`queue::paths::encode_path`: a name need not be UTF-8).
    path            TEXT    NOT NULL,
    root            TEXT    NOT NULL,
    size            BIGINT  NOT NULL,
    mtime_ns        BIGINT  NOT NULL,
    -- st_dev differs between the NFS clients of one export: kept for display, never compared.
    dev             BIGINT  NOT NULL DEFAULT 0,
    -- The server's file id (NFS fileid, CIFS serverino): the same on every host of the spool.
    ino             BIGINT  NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL CHECK (state IN
                        ('pending', 'declaring', 'declared', 'uploading',
                         'uploaded', 'processed', 'failed')),
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    interaction_id  TEXT,
    upload_status   BIGINT,
    last_error      TEXT,
    disposed        BIGINT  NOT NULL DEFAULT 0,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    uploaded_at     BIGINT,
    follow_at       BIGINT,
    follow_attempts BIGINT  NOT NULL DEFAULT 0,
    service_status  TEXT,
    results_written TEXT    NOT NULL DEFAULT '',
    orphans         BIGINT  NOT NULL DEFAULT 0,
    external_id     TEXT,
    source          TEXT,
    -- The daemon instance (`daemons.id`) working on the job while it is `declaring` or
    -- `uploading`; NULL otherwise.
    holder          TEXT,
    -- Until when the holder's claim stands; renewed by the holder, then taken over.
    lease_until     TIMESTAMPTZ,
    -- Raised by every claim. A holder commits only while the fence is the one its claim got: a
    -- daemon that was paused past its lease and woke up late cannot overwrite its successor.
    fence           BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (path, size, mtime_ns)
);

CREATE INDEX jobs_due ON jobs (next_attempt_at, id) WHERE state IN ('pending', 'declared');
CREATE INDEX jobs_held ON jobs (lease_until) WHERE state IN ('declaring', 'uploading');
CREATE INDEX jobs_by_holder ON jobs (holder) WHERE holder IS NOT NULL;
CREATE INDEX jobs_by_inode ON jobs (ino, size, mtime_ns);
CREATE INDEX jobs_by_follow_at ON jobs (follow_at) WHERE follow_at IS NOT NULL;

CREATE TABLE job_events (
    id      BIGSERIAL PRIMARY KEY,
    job_id  BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at      BIGINT NOT NULL,
    event   TEXT   NOT NULL,
    detail  TEXT
);
CREATE INDEX job_events_by_job ON job_events (job_id);

-- Every daemon that ever joined, for `status`: its host, pid, last heartbeat. `id` is new at each
-- start, so a restarted daemon never mistakes its predecessor's claims for its own.
CREATE TABLE daemons (
    id           TEXT PRIMARY KEY,
    name         TEXT        NOT NULL,
    host         TEXT        NOT NULL,
    pid          BIGINT      NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    stopped_at   TIMESTAMPTZ
);

-- The work only one daemon does at a time (the periodic rescan, the results follower, pruning):
-- a lease per role, taken over like a job's.
CREATE TABLE roles (
    name        TEXT PRIMARY KEY,
    holder      TEXT        NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL,
    fence       BIGINT      NOT NULL
);

CREATE TABLE daemon_state (
    key        TEXT PRIMARY KEY,
    value      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    n    BIGINT NOT NULL
);
INSERT INTO counters (name, n) VALUES ('orphan_declares', 0);

CREATE TABLE known_versions (
    h BIGINT PRIMARY KEY
);
