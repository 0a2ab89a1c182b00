-- Forgetting a call (`callferry forget`, the right to erasure). The job and its events are deleted
-- in the transaction that writes its tombstone here, so from that commit on no worker or follower
-- can move the call on (each of their guarded statements finds no row: `NotInState`). The
-- tombstone keeps only what is still to erase elsewhere: the interaction at ElevateAI and the
-- result files and index lines under `[results] output_dir`. It is removed once both are done, and
-- the database is then vacuumed and its write-ahead log truncated, so none of it stays in free
-- pages. A `kill -9` at any point leaves either the job (nothing happened yet) or its tombstone
-- (resumed by the next `forget` and at the daemon's start).
CREATE TABLE forgets (
    id             INTEGER PRIMARY KEY,
    interaction_id TEXT,                        -- NULL: never declared, nothing to delete remotely
    source         TEXT,                        -- the `[[source]]` whose account holds it
    files          TEXT    NOT NULL DEFAULT '[]', -- result files to remove (JSON array of stored paths)
    local_done     INTEGER NOT NULL DEFAULT 0,  -- result files and index lines removed
    remote_done    INTEGER NOT NULL DEFAULT 0,  -- the interaction deleted at ElevateAI (or a 404)
    attempts       INTEGER NOT NULL DEFAULT 0,  -- remote deletes tried and failed
    last_error     TEXT,
    created_at     INTEGER NOT NULL
);
