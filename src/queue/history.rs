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
