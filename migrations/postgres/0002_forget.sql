-- Forgetting a call on the shared queue (`callferry forget`): SQLite's tombstones
-- (migrations/0010_forget.sql). The job and its events are deleted in the transaction that writes
-- its tombstone here; the tombstone keeps only what is still to erase elsewhere (the interaction at
-- ElevateAI, the result files and index lines) and goes once both are done.
CREATE TABLE forgets (
    id             BIGSERIAL PRIMARY KEY,
    interaction_id TEXT,
    source         TEXT,
    files          TEXT    NOT NULL DEFAULT '[]',
    local_done     BOOLEAN NOT NULL DEFAULT false,
    remote_done    BOOLEAN NOT NULL DEFAULT false,
    attempts       BIGINT  NOT NULL DEFAULT 0,
    last_error     TEXT,
    created_at     BIGINT  NOT NULL
);
