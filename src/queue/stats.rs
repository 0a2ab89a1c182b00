//! Read-only figures for `status` that are not a job's own state: throughput over a window.

use super::{Queue, QueueError};

impl Queue {
    /// Jobs whose upload was recorded (201 or 409) at or after `since` (unix ms): how many, and
    /// their bytes.
    pub async fn uploaded_since(&self, since: i64) -> Result<(u64, u64), QueueError> {
        let (n, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(j.size), 0) FROM job_events e \
             JOIN jobs j ON j.id = e.job_id WHERE e.event = 'uploaded' AND e.at >= ?",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok((n.max(0) as u64, bytes.max(0) as u64))
    }
}
