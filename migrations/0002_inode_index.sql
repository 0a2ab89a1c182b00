-- A hard link or a move of an already queued recording has the same (dev, ino, size, mtime): it is
-- recognised as the same recording and not uploaded again.
CREATE INDEX jobs_by_inode ON jobs (ino, dev);
