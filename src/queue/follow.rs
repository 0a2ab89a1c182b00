//! Following uploaded jobs until their results are written (`[results] enabled`).

use sqlx::AssertSqlSafe;

use super::machine::Transition;
use super::{JOB_COLUMNS, Job, Lite, QueueError, event, expect_one, job_from_row};

impl Lite {
    /// Uploaded jobs whose next status poll is due, and processed ones whose interaction is due
    /// to be deleted at the service (`[results] delete_remote_after_fetch`), soonest first.
    pub async fn due_followups(&self, now: i64, limit: u32) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE follow_at IS NOT NULL AND follow_at <= ? \
             AND state IN ('uploaded', 'processed') ORDER BY follow_at LIMIT ?"
        )))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// When the next status poll falls due, if any job is followed.
    pub async fn next_followup(&self) -> Result<Option<i64>, QueueError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(follow_at) FROM jobs WHERE follow_at IS NOT NULL \
             AND state IN ('uploaded', 'processed')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Still processing (or a transient failure): ask again at `next_at`.
    pub async fn follow_later(
        &self,
        id: i64,
        next_at: i64,
        service_status: Option<&str>,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE jobs SET follow_at = ?, service_status = COALESCE(?, service_status), \
             follow_attempts = CASE WHEN ? IS NULL THEN 0 ELSE follow_attempts + 1 END, \
             last_error = COALESCE(?, last_error), updated_at = ? WHERE id = ? \
             AND state IN ('uploaded', 'processed')",
        )
        .bind(next_at)
        .bind(service_status)
        .bind(error)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One result kind is on disk (so a restart does not fetch it again).
    pub async fn result_written(&self, job: &Job, kind: &str, now: i64) -> Result<(), QueueError> {
        let mut kinds = job.results_written.clone();
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_string());
        }
        sqlx::query("UPDATE jobs SET results_written = ?, updated_at = ? WHERE id = ?")
            .bind(kinds.join(","))
            .bind(now)
            .bind(job.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every result is written ([`Transition::Processed`]).
    pub async fn mark_processed(&self, id: i64, now: i64) -> Result<(), QueueError> {
        self.mark_processed_then(id, None, now).await
    }

    /// [`Transition::Processed`]; `delete_at`: when to delete the interaction at the service
    /// (`[results] delete_remote_after_fetch`), kept in `follow_at` until it is done.
    pub async fn mark_processed_then(
        &self,
        id: i64,
        delete_at: Option<i64>,
        now: i64,
    ) -> Result<(), QueueError> {
        let [(from, to)] = *Transition::Processed.edges() else {
            unreachable!("one edge")
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = ?, follow_at = ?, follow_attempts = 0, \
             service_status = 'processed', last_error = NULL, updated_at = ? \
             WHERE id = ? AND state = ?",
        )
        .bind(to.as_str())
        .bind(delete_at)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, &mut *tx, id, &[from]).await?;
        event(&mut tx, id, now, "processed", None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Following ended in a failure the service reported (or `max_wait`). `lost_file`: the service
    /// no longer has the audio, so `retry` uploads it again (on the same id).
    pub async fn fail_following(
        &self,
        id: i64,
        error: &str,
        service_status: Option<&str>,
        lost_file: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        let [(from, to)] = *Transition::FailFollowing.edges() else {
            unreachable!("one edge")
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = ?, follow_at = NULL, last_error = ?, \
             service_status = COALESCE(?, service_status), \
             upload_status = CASE WHEN ? THEN NULL ELSE upload_status END, updated_at = ? \
             WHERE id = ? AND state = ?",
        )
        .bind(to.as_str())
        .bind(error)
        .bind(service_status)
        .bind(lost_file)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, &mut *tx, id, &[from]).await?;
        event(&mut tx, id, now, "failed", Some(error)).await?;
        tx.commit().await?;
        Ok(())
    }
    /// The interaction of this processed job is deleted at the service (`gone`: it was already),
    /// or will not be (`error`: a refusal retrying cannot fix); either way it is not asked again.
    /// The results stay.
    pub async fn remote_delete_done(
        &self,
        id: i64,
        outcome: Result<bool, &str>,
        now: i64,
    ) -> Result<(), QueueError> {
        let (status, error, ev, detail) = match outcome {
            Ok(true) => (Some("deleted"), None, "remote-deleted", None),
            Ok(false) => (
                Some("deleted"),
                None,
                "remote-deleted",
                Some("already gone (404)"),
            ),
            Err(e) => (None, Some(e), "remote-delete-failed", Some(e)),
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET follow_at = NULL, service_status = COALESCE(?, service_status), \
             last_error = ?, updated_at = ? WHERE id = ? AND state = 'processed'",
        )
        .bind(status)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, &mut *tx, id, &[super::State::Processed]).await?;
        event(&mut tx, id, now, ev, detail).await?;
        tx.commit().await?;
        Ok(())
    }
}
