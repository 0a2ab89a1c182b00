-- Declares whose answer was lost or unusable (a reset, a stall, a gateway 5xx, a 201 without a
-- usable id, a crash in between): each may have created an interaction at ElevateAI that never
-- gets audio, an "orphan". The API has no idempotency key, so they cannot be avoided, only counted
-- and capped (`[upload] max_declares` per recording version).
ALTER TABLE jobs ADD COLUMN orphans INTEGER NOT NULL DEFAULT 0;  -- this version's, since its last retry

-- Totals that outlive the jobs they came from (`status`, `/metrics`).
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    n    INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO counters (name, n) VALUES ('orphan_declares', 0);
