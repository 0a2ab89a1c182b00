//! Years of history on the shared queue: pruning done jobs down to their fingerprints (the
//! `prune` role's work, `queue.keep_history`), and the fingerprints every daemon's watcher loads
//! so that a rescan skips a known, unchanged file after one `stat`. The fingerprints are SQLite's
//! ([`fingerprint`]), over the path as every host sees it.
//!
//! A prune and an enqueue never overlap: a version pruned while a rescan queued it again would
//! otherwise be queued anew (the enqueue's check of `known_versions` ran before the prune
//! committed, its insert after the job's row was gone). The enqueue holds [`HISTORY_LOCK`] shared
//! for its transaction, each prune batch holds it exclusively for its own.

use sqlx::AssertSqlSafe;

use super::PgQueue;
use crate::queue::QueueError;
use crate::queue::history::{JOB_VERSIONS, KNOWN_PRINTS, fingerprint, raw, version_prints};
use crate::queue::machine::{DONE, sql_in};

/// The advisory lock between queueing and pruning (an arbitrary constant: "cfhist").
pub(super) const HISTORY_LOCK: i64 = 0x6366_6869_7374;

/// Jobs removed per transaction while pruning.
const PRUNE_BATCH: i64 = 2000;

impl PgQueue {
    /// Fingerprints of every version the queue knows, jobs and pruned jobs alike.
    pub async fn known_fingerprints(&self) -> Result<Vec<i64>, QueueError> {
        let mut out: Vec<i64> = sqlx::query_scalar(KNOWN_PRINTS)
            .fetch_all(&self.pool)
            .await?;
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as(JOB_VERSIONS).fetch_all(&self.pool).await?;
        out.extend(version_prints(&rows));
        Ok(out)
    }

    /// Removes jobs that are done (uploaded or processed, no longer followed) and were last
    /// changed before `cutoff` (unix ms), with their events, keeping the fingerprints of their
    /// version and path: the same file is never queued again, and a later call at the same path
    /// still gets results names of its own. `undisposed_too = false` keeps a job whose
    /// after-upload move/delete is still to do. Failed jobs wait for an operator and stay.
    /// Returns how many jobs went. The inode's fingerprint is not kept: the shared queue does not
    /// follow moved recordings, and `st_dev` differs between the hosts of one spool.
    pub async fn prune(&self, cutoff: i64, undisposed_too: bool) -> Result<u64, QueueError> {
        let pick = format!(
            "SELECT id, path, size, mtime_ns FROM jobs WHERE id > $1 AND state IN {} AND updated_at < $2 \
             AND follow_at IS NULL AND ($3 OR disposed = 1) ORDER BY id LIMIT $4 \
             FOR UPDATE SKIP LOCKED",
            sql_in(&DONE)
        );
        let mut total = 0;
        let mut after = 0i64;
        loop {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(HISTORY_LOCK)
                .execute(&mut *tx)
                .await?;
            let rows: Vec<(i64, String, i64, i64)> = sqlx::query_as(AssertSqlSafe(pick.as_str()))
                .bind(after)
                .bind(cutoff)
                .bind(undisposed_too)
                .bind(PRUNE_BATCH)
                .fetch_all(&mut *tx)
                .await?;
            let Some(last) = rows.last() else {
                tx.rollback().await?;
                return Ok(total);
            };
            after = last.0;
            let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
            let mut prints = Vec::with_capacity(rows.len() * 2);
            for (_, path, size, mtime) in &rows {
                let path = raw(path);
                prints.push(fingerprint::version(&path, *size as u64, *mtime));
                prints.push(fingerprint::path(&path));
            }
            sqlx::query(
                "INSERT INTO known_versions (h) SELECT unnest($1::bigint[]) ON CONFLICT DO NOTHING",
            )
            .bind(&prints)
            .execute(&mut *tx)
            .await?;
            let n = sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            total += n;
            if (rows.len() as i64) < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }
}
