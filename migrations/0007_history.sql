-- What is kept of pruned jobs (`[queue] keep_history`, issue 12): fingerprints, 64 bits of SHA-256
-- each (see `queue::fingerprint`), of a version `(path, size, mtime)`, of a file `(dev, inode,
-- size, mtime)` and of a path. Enough that a recording uploaded long ago is never uploaded again,
-- whether it is still at its path or was moved or linked since, and that a later call at a reused
-- path still gets results names of its own; never a path, name or id in clear. About 30 bytes per
-- pruned job instead of ~500 for the job and its events.
CREATE TABLE known_versions (
    h INTEGER PRIMARY KEY
);
