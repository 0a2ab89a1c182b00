-- What the recorder's end-of-call hook (`callferry enqueue --now`) said about a job's call: JSON
-- {"external_id": …, "metadata": {…}}, applied to its declare over the name's and the sidecar's.
-- Written only while the job is pending (before its declare); NULL for every other job.
ALTER TABLE jobs ADD COLUMN hook TEXT;
