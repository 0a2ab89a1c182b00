//! Read-only views of the queue: one job, listings, counts and figures for `status`.

use std::sync::LazyLock;

use sqlx::{AssertSqlSafe, Row};

use super::machine::{NOT_UPLOADED, Transition, sql_in};
use super::{Counts, JOB_COLUMNS, Job, Lite, QueueError, State, display_path, job_from_row};

impl Lite {
    /// When the next job falls due, if any job waits at all.
    pub async fn next_due(&self) -> Result<Option<i64>, QueueError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let due = Transition::Claim.sql_guard();
            format!("SELECT MIN(next_attempt_at) FROM jobs WHERE {due}")
        });
        Ok(sqlx::query_scalar(AssertSqlSafe(SQL.as_str()))
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    /// Jobs, newest first, optionally of one user-facing state.
    pub async fn list(&self, state: Option<State>, limit: u32) -> Result<Vec<Job>, QueueError> {
        let mut jobs = Vec::new();
        self.list_each(state, limit, |job| {
            jobs.push(job);
            Ok::<_, QueueError>(())
        })
        .await?;
        Ok(jobs)
    }

    /// [`Queue::list`] one row at a time, handed to `each` as it is read, so `list --limit
    /// 1000000` holds one job in memory instead of all of them (a million took 3.7 GB). `each`
    /// stops the walk by returning an error (a reader that went away).
    pub async fn list_each<E: From<QueueError>>(
        &self,
        state: Option<State>,
        limit: u32,
        mut each: impl FnMut(Job) -> Result<(), E>,
    ) -> Result<(), E> {
        use futures_util::TryStreamExt;
        let filter = match state {
            Some(s) => format!("WHERE state IN {}", sql_in(&s.internal_states())),
            None => String::new(),
        };
        let q = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT ?"
        )));
        let mut rows = q.bind(limit as i64).fetch(&self.pool);
        while let Some(row) = rows.try_next().await.map_err(QueueError::from)? {
            each(job_from_row(&row).map_err(QueueError::from)?)?;
        }
        Ok(())
    }

    pub async fn counts(&self) -> Result<Counts, QueueError> {
        // Kept by triggers (migration 0004): constant time however many jobs there are.
        let rows = sqlx::query("SELECT state, n FROM job_counts")
            .fetch_all(&self.pool)
            .await?;
        let mut c = Counts::default();
        for r in rows {
            let s: String = r.try_get("state")?;
            c.add(&s, r.try_get::<i64, _>("n")?);
        }
        Ok(c)
    }

    /// Creation time of the oldest job not yet uploaded.
    pub async fn oldest_waiting(&self) -> Result<Option<i64>, QueueError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let waiting = sql_in(&NOT_UPLOADED);
            format!("SELECT MIN(created_at) FROM jobs WHERE state IN {waiting}")
        });
        Ok(sqlx::query_scalar(AssertSqlSafe(SQL.as_str()))
            .fetch_one(&self.pool)
            .await?)
    }

    /// The most recent errors, newest first: (job id, path, error, when).
    pub async fn last_errors(&self, n: u32) -> Result<Vec<(i64, String, String, i64)>, QueueError> {
        let rows = sqlx::query(
            "SELECT e.job_id, j.path, e.detail, e.at FROM job_events e JOIN jobs j ON j.id = e.job_id \
             WHERE e.event IN ('retry', 'failed') ORDER BY e.id DESC LIMIT ?",
        )
        .bind(n as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("job_id")?,
                    display_path(&r.try_get::<String, _>("path")?),
                    r.try_get::<Option<String>, _>("detail")?
                        .unwrap_or_default(),
                    r.try_get("at")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Jobs in `states` whose after-upload action (move/delete) is not yet done.
    pub async fn undisposed(&self, states: &[State]) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN {} AND disposed = 0",
            sql_in(states)
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// Declares whose answer was lost or unusable, in the life of this database (see
    /// [`Queue::count_orphan`]).
    pub async fn orphan_declares(&self) -> Result<u64, QueueError> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT n FROM counters WHERE name = 'orphan_declares'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Every event of one job, oldest first: (at, event, detail).
    pub async fn events(&self, id: i64) -> Result<Vec<(i64, String, Option<String>)>, QueueError> {
        let rows =
            sqlx::query("SELECT at, event, detail FROM job_events WHERE job_id = ? ORDER BY id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("at")?, r.try_get("event")?, r.try_get("detail")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

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
