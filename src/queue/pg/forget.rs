//! Forgetting calls on the shared queue (`callferry forget`): SQLite's tombstones and guards
//! (`queue/forget.rs`), so `crate::forget` runs unchanged on either backend.
//!
//! What differs is what "nothing left in the database" can mean. SQLite zeroes deleted content
//! and truncates its log; PostgreSQL has no such setting: a deleted row's bytes stay in the
//! table's free space until reused, in the write-ahead log until it is recycled, and in whatever
//! base backups and WAL archives the site keeps. A scrub here is a plain `VACUUM` of the tables a
//! call touched (it takes no lock that stops the daemons); the README says what else to do.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Row};

use super::history::HISTORY_LOCK;
use super::{JOB_COLUMNS, PgQueue, held_from_row};
use crate::queue::history::fingerprint;
use crate::queue::{Forgot, Job, QueueError, State, Tombstone, decode_path, encode_path};

/// The `daemon_state` key whose row says a scrub is owed (the whole cluster's, unlike a
/// daemon's own state).
const SCRUB_KEY: &str = "forget-scrub";

impl PgQueue {
    async fn jobs_where(&self, filter: &str, bind: JobsBind<'_>) -> Result<Vec<Job>, QueueError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {filter} ORDER BY id");
        let q = sqlx::query(AssertSqlSafe(sql));
        let q = match bind {
            JobsBind::None => q,
            JobsBind::Ids(ids) => q.bind(ids),
            JobsBind::Texts(t) => q.bind(t),
        };
        q.fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| held_from_row(r).map(|h| h.job))
            .collect()
    }

    /// Jobs with these ids (those that exist).
    pub async fn jobs_by_ids(&self, ids: &[i64]) -> Result<Vec<Job>, QueueError> {
        self.jobs_where("id = ANY($1)", JobsBind::Ids(ids)).await
    }

    /// Jobs whose declare carried one of these call ids (`externalIdentifier`).
    pub async fn jobs_by_external_ids(&self, ids: &[String]) -> Result<Vec<Job>, QueueError> {
        self.jobs_where("external_id = ANY($1)", JobsBind::Texts(ids))
            .await
    }

    /// Jobs not declared yet (no call id recorded).
    pub async fn undeclared_jobs(&self) -> Result<Vec<Job>, QueueError> {
        self.jobs_where(
            "interaction_id IS NULL AND external_id IS NULL",
            JobsBind::None,
        )
        .await
    }

    /// Up to `limit` jobs whose recording was last written before `cutoff_ns`, ids above
    /// `after`, in id order.
    pub async fn jobs_recorded_before(
        &self,
        cutoff_ns: i64,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id > $1 AND mtime_ns < $2 ORDER BY id LIMIT $3"
        )))
        .bind(after)
        .bind(cutoff_ns)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| held_from_row(r).map(|h| h.job))
            .collect()
    }

    /// PostgreSQL cannot zero deleted content (see the module's doc): nothing to switch on.
    pub async fn secure_delete(&self) -> Result<(), QueueError> {
        Ok(())
    }

    /// Forgets one job in one transaction, as SQLite's does: the version's fingerprint stays
    /// (never queued again), the tombstone names what is left to erase, the job and its events
    /// go. A job `declaring` is left alone unless `declaring_too`: on the shared queue its
    /// holder may be sending the declare right now (the caller waits and asks again; a dead
    /// holder's job comes back to `pending` after the lease).
    pub async fn forget_job(
        &self,
        id: i64,
        files: impl Fn(&Job, bool) -> Vec<PathBuf>,
        declaring_too: bool,
        now: i64,
    ) -> Result<Forgot, QueueError> {
        let mut tx = self.pool.begin().await?;
        // A forget deletes a job and keeps its fingerprint, like a prune: never beside an enqueue
        // that could queue the version again in between.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(HISTORY_LOCK)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job) = row.as_ref().map(held_from_row).transpose()?.map(|h| h.job) else {
            return Ok(Forgot::Gone);
        };
        let mid_declare = job.state == State::Declaring;
        if mid_declare && !declaring_too {
            return Ok(Forgot::Declaring);
        }
        let later_call: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE path = $1 AND id < $2)")
                .bind(&job.path)
                .bind(job.id)
                .fetch_one(&mut *tx)
                .await?;
        let raw = crate::queue::history::raw(&job.path);
        // The version's fingerprint only (see SQLite's for why not the path's); no inode's: the
        // shared queue never compares them.
        sqlx::query("INSERT INTO known_versions (h) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(fingerprint::version(&raw, job.size, job.mtime_ns))
            .execute(&mut *tx)
            .await?;
        let files: Vec<String> = files(&job, later_call)
            .iter()
            .map(|p| encode_path(p).into_owned())
            .collect();
        let tomb: i64 = sqlx::query_scalar(
            "INSERT INTO forgets (interaction_id, source, files, remote_done, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(&job.interaction_id)
        .bind(&job.source)
        .bind(serde_json::to_string(&files).unwrap_or_else(|_| "[]".into()))
        // Never declared: nothing exists at the service.
        .bind(job.interaction_id.is_none())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        // Its events go with it (ON DELETE CASCADE).
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
        scrub_due(&mut tx, now).await?;
        tx.commit().await?;
        Ok(if mid_declare {
            Forgot::MidDeclare(tomb)
        } else {
            Forgot::Tombstone(tomb)
        })
    }

    /// Every forget not finished yet, oldest first.
    pub async fn pending_forgets(&self) -> Result<Vec<Tombstone>, QueueError> {
        let rows = sqlx::query(
            "SELECT id, interaction_id, source, files, local_done, remote_done, attempts, \
             last_error FROM forgets ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let files: String = r.try_get("files")?;
                let files: Vec<String> = serde_json::from_str(&files).unwrap_or_default();
                Ok(Tombstone {
                    id: r.try_get("id")?,
                    interaction_id: r.try_get("interaction_id")?,
                    source: r.try_get("source")?,
                    files: files.iter().map(|f| decode_path(f)).collect(),
                    local_done: r.try_get("local_done")?,
                    remote_done: r.try_get("remote_done")?,
                    attempts: r.try_get::<i64, _>("attempts")?.max(0) as u32,
                    last_error: r.try_get("last_error")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The local results of these forgets are gone (files and index lines).
    pub async fn forget_local_done(&self, ids: &[i64]) -> Result<(), QueueError> {
        sqlx::query("UPDATE forgets SET local_done = true WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The remote delete of this forget: done (`error` None), or failed this time.
    pub async fn forget_remote(&self, id: i64, error: Option<&str>) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE forgets SET remote_done = ($1::text IS NULL), last_error = $1, \
             attempts = attempts + (CASE WHEN $1::text IS NULL THEN 0 ELSE 1 END) WHERE id = $2",
        )
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes the tombstones whose erasure is complete. Returns how many went.
    pub async fn forget_finish(&self, now: i64) -> Result<u64, QueueError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM forgets WHERE local_done AND remote_done")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            scrub_due(&mut tx, now).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Whether rows were forgotten since the last scrub.
    pub async fn scrub_pending(&self) -> Result<bool, QueueError> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM daemon_state WHERE key = $1)")
                .bind(SCRUB_KEY)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// A plain `VACUUM` of the tables a forgotten call was in: their dead rows' space is marked
    /// free for reuse (see the module's doc for what that does not erase). It takes no lock that
    /// stops the daemons, so `vacuum` makes no difference here.
    pub async fn scrub(&self, _vacuum: bool, _deadline: Duration) -> Result<(), QueueError> {
        for table in ["job_events", "jobs", "forgets"] {
            sqlx::query(AssertSqlSafe(format!("VACUUM {table}")))
                .execute(&self.pool)
                .await?;
        }
        sqlx::query("DELETE FROM daemon_state WHERE key = $1")
            .bind(SCRUB_KEY)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

enum JobsBind<'a> {
    None,
    Ids(&'a [i64]),
    Texts(&'a [String]),
}

async fn scrub_due(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO daemon_state (key, value, updated_at) VALUES ($1, '1', $2) \
         ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at",
    )
    .bind(SCRUB_KEY)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
