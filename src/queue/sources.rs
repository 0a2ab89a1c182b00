//! The queue as sources see it: a claim and a due time that leave out the folders of sources whose
//! account is paused (a rejected token), and counts by watched folder for `status`. Kept apart
//! from the transitions: the claim is [`Transition::Claim`] with one more condition.

use std::str::FromStr;

use sqlx::{AssertSqlSafe, Row};

use super::machine::Transition;
use super::{Counts, JOB_COLUMNS, Job, Lite, QueueError, State, claimed_from_row};

impl Lite {
    /// [`Queue::claim`], skipping jobs found under the watched folders `roots` (as stored, see
    /// [`super::encode_path`]).
    pub async fn claim_except(
        &self,
        now: i64,
        roots: &[String],
    ) -> Result<Option<Job>, QueueError> {
        if roots.is_empty() {
            return self.claim(now).await;
        }
        let (to, due) = (
            Transition::Claim.sql_target(),
            Transition::Claim.sql_guard(),
        );
        let sql = format!(
            "UPDATE jobs SET state = {to}, updated_at = ?1 \
             WHERE id = (SELECT id FROM jobs WHERE {due} AND next_attempt_at <= ?1 \
                         AND root NOT IN (SELECT value FROM json_each(?2)) \
                         ORDER BY next_attempt_at, id LIMIT 1) \
             RETURNING {JOB_COLUMNS}, hook"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(serde_json::to_string(roots).unwrap_or_else(|_| "[]".into()))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(claimed_from_row).transpose()?)
    }

    /// [`Queue::next_due`], leaving out jobs under `roots`.
    pub async fn next_due_except(&self, roots: &[String]) -> Result<Option<i64>, QueueError> {
        if roots.is_empty() {
            return self.next_due().await;
        }
        let due = Transition::Claim.sql_guard();
        let sql = format!(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE {due} \
             AND root NOT IN (SELECT value FROM json_each(?1))"
        );
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(serde_json::to_string(roots).unwrap_or_else(|_| "[]".into()))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Job counts by watched folder (as stored), for a per-source `status`. A scan of the table,
    /// unlike [`Queue::counts`]: asked for only when the configuration has sources.
    pub async fn counts_by_root(&self) -> Result<Vec<(String, Counts)>, QueueError> {
        let rows = sqlx::query("SELECT root, state, COUNT(*) AS n FROM jobs GROUP BY root, state")
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<(String, Counts)> = Vec::new();
        for r in rows {
            let root: String = r.try_get("root")?;
            let s: String = r.try_get("state")?;
            let n = r.try_get::<i64, _>("n")? as u64;
            let at = match out.iter().position(|(x, _)| *x == root) {
                Some(i) => i,
                None => {
                    out.push((root, Counts::default()));
                    out.len() - 1
                }
            };
            let c = &mut out[at].1;
            match State::from_str(&s).map(State::public) {
                Ok(State::Pending) => c.pending += n,
                Ok(State::Declared) => c.declared += n,
                Ok(State::Uploading) => c.uploading += n,
                Ok(State::Uploaded) => c.uploaded += n,
                Ok(State::Processed) => c.processed += n,
                Ok(State::Failed) => c.failed += n,
                _ => {}
            }
        }
        Ok(out)
    }
}
