//! The recorder's end-of-call hook on the shared queue: SQLite's `queue/hook.rs`. Each host's
//! daemon takes its own recorders' requests (the drop folder is local to the host) and queues
//! the version with its call in one transaction, so the watcher of any daemon finding the same
//! file is the same job and one declare.

use std::str::FromStr;

use super::{PgQueue, insert_version, share_history};
use crate::queue::{Hooked, NewJob, QueueError, State, encode_path};

impl PgQueue {
    /// Queues `job` (as [`PgQueue::enqueue`]) and, while it is still `pending`, records `hook`
    /// (JSON) on it and makes it due now unless it is backing off after a failure of its own.
    /// A job another daemon is declaring is [`Hooked::Busy`]; one declared already is
    /// [`Hooked::TooLate`].
    pub async fn enqueue_hooked(
        &self,
        job: &NewJob,
        hook: &str,
        now: i64,
    ) -> Result<Hooked, QueueError> {
        let mut tx = self.pool.begin().await?;
        share_history(&mut tx).await?;
        let (id, new) = match insert_version(&mut tx, job, now).await? {
            Some(id) => (id, true),
            None => {
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE path = $1 AND size = $2 AND mtime_ns = $3",
                )
                .bind(encode_path(&job.path).as_ref())
                .bind(job.size as i64)
                .bind(job.mtime_ns)
                .fetch_optional(&mut *tx)
                .await?;
                match found {
                    Some(id) => (id, false),
                    None => {
                        tx.commit().await?;
                        return Ok(Hooked::Pruned);
                    }
                }
            }
        };
        let n = sqlx::query(
            "UPDATE jobs SET hook = $1, updated_at = $2, \
             next_attempt_at = CASE WHEN attempts = 0 THEN LEAST(next_attempt_at, $2) \
                               ELSE next_attempt_at END \
             WHERE id = $3 AND state = 'pending'",
        )
        .bind(hook)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let result = if n == 1 {
            sqlx::query("INSERT INTO job_events (job_id, at, event) VALUES ($1, $2, 'hook')")
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            Hooked::Attached { id, new }
        } else {
            let (state, interaction_id): (String, Option<String>) =
                sqlx::query_as("SELECT state, interaction_id FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            let state = State::from_str(&state).map_err(|e| sqlx::Error::Decode(e.into()))?;
            if state == State::Declaring {
                Hooked::Busy { id }
            } else {
                Hooked::TooLate {
                    id,
                    state,
                    interaction_id,
                }
            }
        };
        tx.commit().await?;
        Ok(result)
    }

    /// What the recorder's hook said about job `id`'s call (JSON), if it said anything.
    pub async fn hook_of(&self, id: i64) -> Result<Option<String>, QueueError> {
        let v: Option<Option<String>> = sqlx::query_scalar("SELECT hook FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.flatten())
    }
}
