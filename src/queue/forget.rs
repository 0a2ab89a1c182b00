//! Forgetting calls (`callferry forget`, the right to erasure): the database's side. A job is
//! replaced by a tombstone (migration 0010) in one transaction that also keeps its fingerprints
//! (so the file, if it is still on disk, is never uploaded again); the tombstone holds what is
//! still to erase outside the database and goes once that is done; [`Queue::scrub`] then leaves
//! nothing of it in free pages or the write-ahead log. The steps outside the database are in
//! `crate::forget`.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Row};

use super::history::fingerprint;
use super::{JOB_COLUMNS, Job, Lite, QueueError, State, decode_path, encode_path, job_from_row};

/// What is left to erase of one forgotten call.
#[derive(Debug, Clone)]
pub struct Tombstone {
    pub id: i64,
    pub interaction_id: Option<String>,
    pub source: Option<String>,
    /// Result files to remove (those that exist; the rest are already gone).
    pub files: Vec<PathBuf>,
    pub local_done: bool,
    pub remote_done: bool,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// What [`Queue::forget_job`] did with one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgot {
    /// The job is gone; this tombstone holds what is left to erase.
    Tombstone(i64),
    /// A worker is sending its declare right now: the interaction's id is not known yet, so the
    /// job is left alone for now (forgotten once the declare's outcome is committed).
    Declaring,
    /// No such job (never was, or forgotten already).
    Gone,
    /// Forgotten while `declaring` with no daemon running: the dead daemon's declare may have
    /// created an interaction whose id was never committed (an orphan; see ARCHITECTURE.md).
    MidDeclare(i64),
}

impl Lite {
    /// Jobs with these ids (those that exist).
    pub async fn jobs_by_ids(&self, ids: &[i64]) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
        )))
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// Jobs whose declare carried one of these call ids (`externalIdentifier`).
    pub async fn jobs_by_external_ids(&self, ids: &[String]) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE external_id IN (SELECT value FROM json_each(?)) ORDER BY id"
        )))
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// Jobs not declared yet (no call id recorded): the caller works out their call ids itself.
    pub async fn undeclared_jobs(&self) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE interaction_id IS NULL AND external_id IS NULL \
             ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// Up to `limit` jobs whose recording was last written (its mtime, as queued) before
    /// `cutoff_ns` (unix ns), with ids above `after`, in id order: `--older-than` walks the queue
    /// in batches. The recording's time, not the job's: `retry` renews the latter.
    pub async fn jobs_recorded_before(
        &self,
        cutoff_ns: i64,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id > ? AND mtime_ns < ? ORDER BY id LIMIT ?"
        )))
        .bind(after)
        .bind(cutoff_ns)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// Deleted content is overwritten with zeros on this connection from now on (SQLite's
    /// `secure_delete`), so a forgotten row's bytes do not linger in a page's free space.
    pub async fn secure_delete(&self) -> Result<(), QueueError> {
        sqlx::query("PRAGMA secure_delete = ON")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets one job, in one transaction (`declaring_too`: even one found `declaring`, which
    /// only a daemon that died mid-declare leaves when none runs): keeps the fingerprints of its version and of its file
    /// (`known_versions`, so it is never queued again), writes its tombstone with the result files
    /// `files(job, later_call)` names, and deletes the job with its events. `later_call`: an
    /// earlier job was recorded at the same path (see `results::result_path_for`).
    ///
    /// The job is read again under the write lock, so the tombstone has the interaction id as it
    /// is at the commit, whatever a worker did since the caller looked.
    pub async fn forget_job(
        &self,
        id: i64,
        files: impl Fn(&Job, bool) -> Vec<PathBuf>,
        declaring_too: bool,
        now: i64,
    ) -> Result<Forgot, QueueError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job) = row.as_ref().map(job_from_row).transpose()? else {
            return Ok(Forgot::Gone);
        };
        let mid_declare = job.state == State::Declaring;
        if mid_declare && !declaring_too {
            return Ok(Forgot::Declaring);
        }
        let later_call: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE path = ? AND id < ?)")
                .bind(&job.path)
                .bind(job.id)
                .fetch_one(&mut *tx)
                .await?;
        let raw = {
            use std::os::unix::ffi::OsStringExt;
            job.fs_path().into_os_string().into_vec()
        };
        // Not the path's own fingerprint (which pruning keeps for results names): of a guessable
        // name it would answer "was this call here?"; the version's needs the file's size and
        // mtime to the nanosecond, which only someone who has the file knows.
        let mut prints = vec![fingerprint::version(&raw, job.size, job.mtime_ns)];
        if job.ino != 0 {
            prints.push(fingerprint::inode(job.dev, job.ino, job.size, job.mtime_ns));
        }
        sqlx::query("INSERT OR IGNORE INTO known_versions (h) SELECT value FROM json_each(?)")
            .bind(serde_json::to_string(&prints).unwrap_or_else(|_| "[]".into()))
            .execute(&mut *tx)
            .await?;
        let files: Vec<String> = files(&job, later_call)
            .iter()
            .map(|p| encode_path(p).into_owned())
            .collect();
        let tomb: i64 = sqlx::query_scalar(
            "INSERT INTO forgets (interaction_id, source, files, local_done, remote_done, created_at) \
             VALUES (?, ?, ?, 0, ?, ?) RETURNING id",
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
        sqlx::query("DELETE FROM jobs WHERE id = ?")
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
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    last_error: r.try_get("last_error")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The local results of these forgets are gone (files and index lines).
    pub async fn forget_local_done(&self, ids: &[i64]) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE forgets SET local_done = 1 WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The remote delete of this forget: done (`error` None), or failed this time.
    pub async fn forget_remote(&self, id: i64, error: Option<&str>) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE forgets SET remote_done = (?1 IS NULL), last_error = ?1, \
             attempts = attempts + (?1 IS NOT NULL) WHERE id = ?2",
        )
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes the tombstones whose erasure is complete. Returns how many went.
    pub async fn forget_finish(&self, now: i64) -> Result<u64, QueueError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let n = sqlx::query("DELETE FROM forgets WHERE local_done = 1 AND remote_done = 1")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            scrub_due(&mut tx, now).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Whether rows were forgotten since the last [`Queue::scrub`] (a crash may have come in
    /// between: the next run scrubs then).
    pub async fn scrub_pending(&self) -> Result<bool, QueueError> {
        Ok(self.daemon_state(SCRUB_KEY).await?.is_some())
    }

    /// Leaves nothing of deleted rows in the database's files. Every connection deletes with
    /// `secure_delete` (zeros in place); a `TRUNCATE` checkpoint copies the write-ahead log into
    /// the database and cuts the log to nothing, old frames included. The `-shm` file holds page
    /// numbers only. With `vacuum`, `VACUUM` first rebuilds the database from its live rows, for
    /// what older versions freed without zeroing; only that clears the "scrub owed" mark.
    ///
    /// `vacuum` only with no daemon running, or on the daemon's own connection: a vacuum rewrites
    /// the whole database under the write lock, which on a large queue outlasts a running
    /// daemon's busy timeout (its writes would fail and pause it). A checkpoint waits for
    /// readers; one that could not finish within `deadline` is an error (run again).
    pub async fn scrub(&self, vacuum: bool, deadline: Duration) -> Result<(), QueueError> {
        if vacuum {
            sqlx::query("VACUUM").execute(&self.pool).await?;
        }
        let start = std::time::Instant::now();
        loop {
            let (busy, log, done): (i64, i64, i64) =
                sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                    .fetch_one(&self.pool)
                    .await?;
            if busy == 0 {
                if vacuum {
                    // Written after the scrub: a crash before it only means scrubbing again.
                    self.set_daemon_state(SCRUB_KEY, None, 0).await?;
                    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                        .execute(&self.pool)
                        .await?;
                }
                return Ok(());
            }
            if start.elapsed() > deadline {
                return Err(QueueError::NotDurable {
                    copied: done,
                    frames: log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The `daemon_state` key whose row says a scrub is owed.
const SCRUB_KEY: &str = "forget-scrub";

async fn scrub_due(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO daemon_state (key, value, updated_at) VALUES (?, '1', ?) \
         ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at",
    )
    .bind(SCRUB_KEY)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Enqueued, NewJob, OpenMode, Queue};

    async fn queue_with(paths: &[&str]) -> (tempfile::TempDir, Queue, Vec<i64>) {
        let d = tempfile::tempdir().unwrap();
        let q = Queue::open(&d.path().join("q.db"), OpenMode::Create)
            .await
            .unwrap();
        let batch: Vec<NewJob> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| NewJob {
                path: PathBuf::from(p),
                root: PathBuf::from("/rec"),
                size: 100,
                mtime_ns: 1_000,
                dev: 1,
                ino: 10 + i as u64,
            })
            .collect();
        let ids = q
            .enqueue(&batch, 1)
            .await
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Enqueued::New { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect();
        (d, q, ids)
    }

    /// A forgotten job leaves its tombstone and its fingerprints only: the same file is not
    /// queued again (at its path or moved), a declare in flight is left for later, and a job in
    /// flight elsewhere loses its race as `NotInState`.
    #[tokio::test]
    async fn a_forgotten_job_is_a_tombstone_and_a_fingerprint() {
        let (_d, q, ids) = queue_with(&["/rec/a.wav", "/rec/b.wav"]).await;
        let a = q.claim(2).await.unwrap().unwrap();
        assert_eq!(a.id, ids[0]);
        assert_eq!(
            q.forget_job(ids[0], |_, _| vec![], false, 3).await.unwrap(),
            Forgot::Declaring
        );
        q.mark_declared_as(ids[0], "iid-a", Some("ext-a"), 4)
            .await
            .unwrap();
        let Forgot::Tombstone(t) = q
            .forget_job(
                ids[0],
                |job, later| {
                    assert!(!later);
                    vec![PathBuf::from(format!(
                        "/out/{}",
                        job.external_id.clone().unwrap()
                    ))]
                },
                false,
                5,
            )
            .await
            .unwrap()
        else {
            panic!("not forgotten")
        };
        // The worker holding it loses its race.
        let err = q.mark_uploaded(ids[0], 201, None, 6).await.unwrap_err();
        assert!(
            matches!(err, QueueError::NotInState { found: None, .. }),
            "{err:?}"
        );
        assert!(q.get(ids[0]).await.unwrap().is_none());
        assert!(q.events(ids[0]).await.unwrap().is_empty());
        let pending = q.pending_forgets().await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, t);
        assert_eq!(pending[0].interaction_id.as_deref(), Some("iid-a"));
        assert_eq!(pending[0].files, vec![PathBuf::from("/out/ext-a")]);
        assert!(!pending[0].remote_done && !pending[0].local_done);
        assert_eq!(
            q.forget_job(ids[0], |_, _| vec![], false, 7).await.unwrap(),
            Forgot::Gone
        );

        // Never declared: nothing to delete at the service.
        let Forgot::Tombstone(_) = q.forget_job(ids[1], |_, _| vec![], false, 8).await.unwrap()
        else {
            panic!()
        };
        let pending = q.pending_forgets().await.unwrap();
        assert!(pending[1].remote_done);

        let again = q
            .enqueue(
                &[
                    NewJob {
                        path: "/rec/a.wav".into(),
                        root: "/rec".into(),
                        size: 100,
                        mtime_ns: 1_000,
                        dev: 1,
                        ino: 10,
                    },
                    NewJob {
                        path: "/rec/moved/b.wav".into(),
                        root: "/rec".into(),
                        size: 100,
                        mtime_ns: 1_000,
                        dev: 1,
                        ino: 11,
                    },
                ],
                9,
            )
            .await
            .unwrap();
        assert_eq!(again, vec![Enqueued::Known, Enqueued::Known]);

        q.forget_local_done(&[pending[0].id, pending[1].id])
            .await
            .unwrap();
        q.forget_remote(t, Some("HTTP 503")).await.unwrap();
        assert_eq!(
            q.forget_finish(10).await.unwrap(),
            1,
            "only the finished one"
        );
        let left = q.pending_forgets().await.unwrap();
        assert_eq!(left[0].attempts, 1);
        assert_eq!(left[0].last_error.as_deref(), Some("HTTP 503"));
        q.forget_remote(t, None).await.unwrap();
        assert_eq!(q.forget_finish(10).await.unwrap(), 1);
        assert!(q.scrub_pending().await.unwrap());
        q.scrub(true, Duration::from_secs(10)).await.unwrap();
        assert!(!q.scrub_pending().await.unwrap());
        assert!(q.pending_forgets().await.unwrap().is_empty());
    }
}
