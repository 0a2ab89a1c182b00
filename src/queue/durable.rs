//! Durability: making commits survive power loss (see `walsync`), and the disk-full test hook.

use sqlx::AssertSqlSafe;

use super::open::BUSY_TIMEOUT;
use super::{Fault, Lite, QueueError, walsync};

impl Lite {
    /// Makes every commit so far durable against power loss (they are NORMAL commits, safe against
    /// a crash but not a power cut). Called before a recording is moved or deleted, so the
    /// `uploaded` record that allowed it cannot be rolled back while the file is already gone.
    ///
    /// A flush of the WAL, as for the interaction id, not a checkpoint: a FULL checkpoint waits for
    /// every reader (`callferry list` on a big queue holds one for seconds) on the daemon's only
    /// connection, so one reader stalled every worker for the 10 s busy timeout, and its "busy"
    /// answer (nothing made durable) was ignored anyway.
    pub async fn make_durable(&self) -> Result<(), QueueError> {
        self.sync_wal().await
    }

    /// Makes every commit so far survive power loss (see `walsync`).
    ///
    /// After a failed flush this is not enough. A failed writeback leaves the kernel's pages
    /// marked clean, so the next fdatasync may succeed without writing them (PostgreSQL's
    /// "fsyncgate"), and a WAL frame missing on disk ends SQLite's recovery there, dropping every
    /// later commit too. So once a flush failed, durability is proven only by a checkpoint that
    /// copies the whole WAL into the database file, syncs it, and restarts the WAL (new salts, so
    /// no later frame follows a bad one). Until one succeeds, this returns an error and the caller
    /// keeps its outcome in memory and tries again.
    pub async fn sync_wal(&self) -> Result<(), QueueError> {
        use std::sync::atomic::Ordering;
        if self.wal_suspect.load(Ordering::Acquire) {
            return self.checkpoint_after_failed_flush().await;
        }
        let r = if self.faults.take(Fault::Sync) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.wal_sync.sync().await
        };
        r.map_err(|e| {
            self.wal_suspect.store(true, Ordering::Release);
            self.wal_error(e)
        })
    }

    async fn checkpoint_after_failed_flush(&self) -> Result<(), QueueError> {
        if self.faults.take(Fault::Sync) {
            return Err(self.wal_error(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        // An answer of "busy" means the WAL was not wholly copied, or not restarted, and nothing is
        // proven yet. RESTART would wait the busy timeout for readers of the old WAL, holding the
        // daemon's only connection for 10 s; the caller tries again every second instead.
        let mut conn = self.pool.acquire().await?;
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(&mut *conn)
            .await?;
        let r: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
                .fetch_one(&mut *conn)
                .await;
        sqlx::query(AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}",
            BUSY_TIMEOUT.as_millis()
        )))
        .execute(&mut *conn)
        .await?;
        let (busy, log, done) = r?;
        if busy != 0 || done < log {
            return Err(QueueError::NotDurable {
                copied: done,
                frames: log,
            });
        }
        self.wal_suspect
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn wal_error(&self, source: std::io::Error) -> QueueError {
        QueueError::Sync {
            path: self.wal_sync.wal().to_path_buf(),
            source,
        }
    }

    /// Writes zeros into the WAL up to `bytes`, once, at the daemon's start, as PostgreSQL does
    /// with its WAL segments (`wal_init_zero`). SQLite appends to a new WAL until the first
    /// checkpoint, and then every `fdatasync` of [`Queue::sync_wal`] also had to commit the file's
    /// new size to the file system's journal; over a pre-zeroed file it flushes data alone
    /// (the first 200 uploads after a start ran at 600–700 files/s against 1,000 once
    /// warm). Zeros past the last frame are nothing to SQLite: a frame is valid only with the
    /// header's salts and a running checksum. The write lock is held meanwhile, so no other
    /// process (`callferry retry`) appends a frame that the zeros could land on.
    pub async fn prepare_wal(&self, bytes: u64) -> Result<(), QueueError> {
        // Whatever the WAL holds goes into the database file first, so SQLite's next frames start
        // at the WAL's beginning, inside the zeros. Busy (a reader) is fine: nothing is lost, and
        // the zeros go after the frames.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let wal = self.wal_sync.wal().to_path_buf();
        let r = tokio::task::spawn_blocking(move || walsync::zero_extend(&wal, bytes))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("task failed: {e}"))));
        tx.rollback().await?;
        r.map_err(|e| self.wal_error(e))
    }

    /// Test hook (the disk-full tests): with `full`, caps the database at its current size on
    /// every pooled connection (SQLite's `max_page_count`), so a write that needs a new page fails
    /// with SQLITE_FULL exactly as on a full disk; `false` lifts the cap. Connections the pool
    /// opens later are not capped.
    #[doc(hidden)]
    pub async fn simulate_disk_full(&self, full: bool) -> Result<(), QueueError> {
        // Hold every connection at once so each one gets the setting.
        let mut conns = Vec::new();
        for _ in 0..self.pool.options().get_max_connections() {
            conns.push(self.pool.acquire().await?);
        }
        for c in &mut conns {
            let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                .fetch_one(&mut **c)
                .await?;
            let cap = if full { pages } else { 0xFFFF_FFFE };
            sqlx::query(AssertSqlSafe(format!("PRAGMA max_page_count = {cap}")))
                .execute(&mut **c)
                .await?;
        }
        // The cap alone leaves the free pages and slack of a database that has seen deletes, so
        // a test could see dozens of writes succeed. Use that room up, so the next write that
        // needs space fails as on a full disk; lifting the cap drops the filler.
        if let Some(c) = conns.first_mut() {
            if full {
                sqlx::query("CREATE TABLE IF NOT EXISTS _disk_full_filler (x BLOB)")
                    .execute(&mut **c)
                    .await
                    .ok();
                for _ in 0..100_000 {
                    if sqlx::query("INSERT INTO _disk_full_filler (x) VALUES (zeroblob(512))")
                        .execute(&mut **c)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            } else {
                sqlx::query("DROP TABLE IF EXISTS _disk_full_filler")
                    .execute(&mut **c)
                    .await?;
            }
        }
        Ok(())
    }
}
