//! What the shared queue answers without changing anything: one job, the next due time, lists,
//! counts and the cluster's members, for the workers' waits, `status` and `list`.

use std::time::Duration;

use sqlx::AssertSqlSafe;

use super::{JOB_COLUMNS, Member, PgQueue, held_from_row};
use crate::queue::machine::{Transition, sql_in};
use crate::queue::{Counts, Job, QueueError, State};

impl PgQueue {
    pub async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(held_from_row).transpose()?.map(|h| h.job))
    }

    /// When the next job falls due, if any job waits at all.
    pub async fn next_due(&self) -> Result<Option<i64>, QueueError> {
        let sql = format!(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE {}",
            Transition::Claim.sql_guard()
        );
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Jobs, newest first, optionally of one user-facing state.
    pub async fn list(&self, state: Option<State>, limit: u32) -> Result<Vec<Job>, QueueError> {
        let filter = match state {
            Some(s) => format!("WHERE state IN {}", sql_in(&s.internal_states())),
            None => String::new(),
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| held_from_row(r).map(|h| h.job))
            .collect()
    }

    /// Jobs, newest first, each handed to `each` as it arrives: `list` on years of history
    /// holds one row at a time, not the whole table.
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
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT $1");
        let q = sqlx::query(AssertSqlSafe(sql));
        let mut rows = q.bind(i64::from(limit)).fetch(&self.pool);
        while let Some(row) = rows.try_next().await.map_err(QueueError::from)? {
            each(held_from_row(&row)?.job)?;
        }
        Ok(())
    }

    /// Jobs per user-facing state. Counted, not kept by triggers as in SQLite: a counter row that
    /// every transition updates would serialise the daemons on that row.
    pub async fn counts(&self) -> Result<Counts, QueueError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let mut c = Counts::default();
        for (state, n) in rows {
            c.add(&state, n);
        }
        Ok(c)
    }

    /// Every daemon that has a heartbeat within `recent` (or holds a job), newest first: the
    /// cluster as `status` shows it.
    pub async fn members(&self, recent: Duration) -> Result<Vec<Member>, QueueError> {
        type Row = (String, String, String, i64, f64, bool, i64, Vec<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT d.id, d.name, d.host, d.pid, \
                    EXTRACT(EPOCH FROM now() - d.heartbeat_at)::float8, d.stopped_at IS NOT NULL, \
                    (SELECT COUNT(*) FROM jobs j WHERE j.holder = d.id \
                       AND j.state IN ('declaring', 'uploading')), \
                    ARRAY(SELECT r.name FROM roles r WHERE r.holder = d.id \
                          AND r.lease_until > now() ORDER BY r.name) \
             FROM daemons d \
             WHERE d.heartbeat_at > now() - make_interval(secs => $1::double precision / 1000) \
                OR EXISTS (SELECT 1 FROM jobs j WHERE j.holder = d.id) \
             ORDER BY d.started_at DESC",
        )
        .bind(recent.as_millis().min(i64::MAX as u128) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, host, pid, age, stopped, held, roles)| Member {
                id,
                name,
                host,
                pid: pid as u32,
                heartbeat_age_s: age.max(0.0),
                stopped,
                held: held.max(0) as u64,
                roles,
            })
            .collect())
    }

    /// The daemon that holds a job, if any (for `status`, and for tests).
    pub async fn holder(&self, id: i64) -> Result<Option<String>, QueueError> {
        Ok(sqlx::query_scalar("SELECT holder FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .flatten())
    }
}
