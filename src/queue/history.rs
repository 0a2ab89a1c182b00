//! The queue's memory of recordings over time: later calls recorded at a reused path, recordings
//! that moved while their job waited, and (with pruning) what is kept of old jobs.

use super::{Job, Queue, QueueError};

impl Queue {
    /// Whether an earlier job was recorded at this job's path: then this is a later call under a
    /// reused name, and its results must not take the first call's file names.
    pub async fn earlier_call_at_path(&self, job: &Job) -> Result<bool, QueueError> {
        let earlier: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE path = ? AND id < ?)")
                .bind(&job.path)
                .bind(job.id)
                .fetch_one(&self.pool)
                .await?;
        Ok(earlier)
    }
}

impl Queue {
    /// A recording moved inside the watched folders while its job waited (or failed): the job
    /// follows it to `new_path`, keeping its interaction id if it has one, and is due at once. One
    /// guarded statement: only a job still at `old_path`, not yet uploaded, and only if no job
    /// already names this version at the new path. Returns whether the job moved.
    pub async fn follow_move(
        &self,
        id: i64,
        old_path: &str,
        new_path: &str,
        new_root: &str,
        now: i64,
    ) -> Result<bool, QueueError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET path = ?1, root = ?2, next_attempt_at = MIN(next_attempt_at, ?3), \
             updated_at = ?3 \
             WHERE id = ?4 AND path = ?5 \
             AND state IN ('pending', 'declaring', 'declared', 'uploading', 'failed') \
             AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.path = ?1 AND o.size = jobs.size \
                             AND o.mtime_ns = jobs.mtime_ns)",
        )
        .bind(new_path)
        .bind(new_root)
        .bind(now)
        .bind(id)
        .bind(old_path)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            let detail = format!("{old_path} -> {new_path}");
            super::event(&mut tx, id, now, "moved", Some(&detail)).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }
}
