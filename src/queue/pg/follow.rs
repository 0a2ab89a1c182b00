//! Following uploaded jobs until their results are written, on the shared queue: the same calls
//! and guards as SQLite's (`queue/follow.rs`). No claim is taken: one daemon of the cluster
//! follows at a time (the `results` role), and each transition is still guarded by the state it
//! leaves, so a late second follower (one paused past the role's lease) changes nothing twice.

use sqlx::AssertSqlSafe;

use super::{JOB_COLUMNS, PgQueue, held_from_row};
use crate::queue::history::raw;
use crate::queue::machine::Transition;
use crate::queue::{Job, QueueError, State, fingerprint};

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

impl PgQueue {
    /// Uploaded jobs whose next status poll is due, and processed ones whose interaction is due
    /// to be deleted at the service, soonest first.
    pub async fn due_followups(&self, now: i64, limit: u32) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE follow_at IS NOT NULL AND follow_at <= $1 \
             AND state IN ('uploaded', 'processed') ORDER BY follow_at LIMIT $2"
        )))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| held_from_row(r).map(|h| h.job))
            .collect()
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
            "UPDATE jobs SET follow_at = $1, service_status = COALESCE($2, service_status), \
             follow_attempts = CASE WHEN $3::text IS NULL THEN 0 ELSE follow_attempts + 1 END, \
             last_error = COALESCE($3, last_error), updated_at = $4 WHERE id = $5 \
             AND state IN ('uploaded', 'processed')",
        )
        .bind(next_at)
        .bind(service_status)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One result kind is on disk (so the next follower does not fetch it again).
    pub async fn result_written(&self, job: &Job, kind: &str, now: i64) -> Result<(), QueueError> {
        // Appended in the statement, not from the caller's copy: two kinds written by two
        // followers (a role handed over mid-job) both stay.
        sqlx::query(
            "UPDATE jobs SET results_written = CASE \
                WHEN $1 = ANY(string_to_array(results_written, ',')) THEN results_written \
                WHEN results_written = '' THEN $1 ELSE results_written || ',' || $1 END, \
             updated_at = $2 WHERE id = $3",
        )
        .bind(kind)
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

    /// [`Transition::Processed`]; `delete_at`: when to delete the interaction at the service,
    /// kept in `follow_at` until it is done.
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
            "UPDATE jobs SET state = $1, follow_at = $2, follow_attempts = 0, \
             service_status = 'processed', last_error = NULL, updated_at = $3 \
             WHERE id = $4 AND state = $5",
        )
        .bind(to.as_str())
        .bind(delete_at)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        guarded(tx, n, id, from, ("processed", None), now).await
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
            "UPDATE jobs SET state = $1, follow_at = NULL, last_error = $2, \
             service_status = COALESCE($3, service_status), \
             upload_status = CASE WHEN $4 THEN NULL ELSE upload_status END, updated_at = $5 \
             WHERE id = $6 AND state = $7",
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
        guarded(tx, n, id, from, ("failed", Some(error)), now).await
    }

    /// The interaction of this processed job is deleted at the service (`Ok(false)`: it was
    /// already), or will not be (`Err`): either way it is not asked again. The results stay.
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
            "UPDATE jobs SET follow_at = NULL, service_status = COALESCE($1, service_status), \
             last_error = $2, updated_at = $3 WHERE id = $4 AND state = 'processed'",
        )
        .bind(status)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        guarded(tx, n, id, State::Processed, (ev, detail), now).await
    }

    /// Whether an earlier call was recorded at this job's path (its results then get the
    /// interaction id in their names, so they never replace the earlier call's).
    pub async fn earlier_call_at_path(&self, job: &Job) -> Result<bool, QueueError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE path = $1 AND id < $2) \
             OR EXISTS (SELECT 1 FROM known_versions WHERE h = $3)",
        )
        .bind(&job.path)
        .bind(job.id)
        .bind(fingerprint::path(&raw(&job.path)))
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Commits a guarded transition's statement (`n` rows changed) with its event, or says which
/// state the job was in instead.
async fn guarded(
    mut tx: Tx<'_>,
    n: u64,
    id: i64,
    from: State,
    (event, detail): (&str, Option<&str>),
    now: i64,
) -> Result<(), QueueError> {
    if n != 1 {
        let found: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.rollback().await?;
        return Err(QueueError::NotInState {
            job: id,
            expected: vec![from],
            found: found.and_then(|s| s.parse().ok()),
        });
    }
    sqlx::query("INSERT INTO job_events (job_id, at, event, detail) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(now)
        .bind(event)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
