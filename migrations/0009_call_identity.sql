-- Which call a recording is: the externalIdentifier its declare carried (from the recorder's naming
-- convention, else its path below the watched folder), and the `[[source]]` it came from. NULL for
-- jobs declared before this migration (their declares carried callferry's own identifier) and
-- until a job's declare is committed.
ALTER TABLE jobs ADD COLUMN external_id TEXT;
ALTER TABLE jobs ADD COLUMN source TEXT;
