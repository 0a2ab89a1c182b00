//! The recorder's end-of-call hook (`crate::hook`): a file version queued together with what the
//! recorder said about its call, in one transaction, so no worker can claim and declare the job
//! between the two.

use std::str::FromStr;

use super::{Enqueued, Lite, NewJob, QueueError, State, encode_path, event};

/// Where a hook's call ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hooked {
    /// The job waits for its declare, which will carry the hook's call. `new`: queued just now
    /// (else the watcher had queued it already).
    Attached { id: i64, new: bool },
    /// A worker holds the job before its declare (`declaring`: it may be about to send it, or
    /// put it back to wait for a sidecar). Asked again shortly, the answer is one of the others.
    Busy { id: i64 },
    /// The job was declared already, without the hook's call.
    TooLate {
        id: i64,
        state: State,
        interaction_id: Option<String>,
    },
    /// This version was uploaded long ago and pruned (`queue.keep_history`), or forgotten: known
    /// only by its fingerprint, nothing to do.
    Pruned,
}

impl Lite {
    /// Queues `job` (as [`Queue::enqueue`], so a version the watcher queued is the same job) and,
    /// while it is still `pending`, records `hook` (JSON) on it and makes it due now unless it is
    /// backing off after a failure of its own. Only `pending`: a worker reads the hook after its
    /// claim, so what is attached before the claim is in the declare, and nothing after it is
    /// taken for sent.
    pub async fn enqueue_hooked(
        &self,
        job: &NewJob,
        hook: &str,
        now: i64,
    ) -> Result<Hooked, QueueError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = Self::enqueue_in(&mut tx, std::slice::from_ref(job), now).await?;
        let (id, new) = match outcome.first() {
            Some(Enqueued::New { id, .. }) => (*id, true),
            Some(Enqueued::SameFile { existing, .. }) => (*existing, false),
            _ => {
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE path = ? AND size = ? AND mtime_ns = ?",
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
            "UPDATE jobs SET hook = ?1, updated_at = ?2, \
             next_attempt_at = CASE WHEN attempts = 0 THEN MIN(next_attempt_at, ?2) \
                               ELSE next_attempt_at END \
             WHERE id = ?3 AND state = 'pending'",
        )
        .bind(hook)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let result = if n == 1 {
            event(&mut tx, id, now, "hook", None).await?;
            Hooked::Attached { id, new }
        } else {
            let (state, interaction_id): (String, Option<String>) =
                sqlx::query_as("SELECT state, interaction_id FROM jobs WHERE id = ?")
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
        let v: Option<Option<String>> = sqlx::query_scalar("SELECT hook FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.flatten())
    }
}
