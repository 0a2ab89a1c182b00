//! Every state transition a job makes, from queueing to `retry`.

use std::sync::LazyLock;

use sqlx::{AssertSqlSafe, Sqlite, Transaction};

use super::machine::Transition;
use super::{
    Enqueued, Fault, JOB_COLUMNS, Job, Lite, NewJob, QueueError, State, claimed_from_row,
    encode_path, event, expect_one, not_in_state,
};

impl Lite {
    /// Queues file versions in one transaction. A version already known (any state) is not queued
    /// again.
    ///
    /// Set-based: a batch is one statement to find the versions already queued under another path
    /// (hard links, moves), one insert, and one for the events, whatever its size. Statements, not
    /// rows, are what costs here (each is a round trip to SQLite's thread): row by row, 100,000
    /// files found at start took 8 s to queue.
    pub async fn enqueue(&self, jobs: &[NewJob], now: i64) -> Result<Vec<Enqueued>, QueueError> {
        // IMMEDIATE: the write lock first, waiting the busy timeout for it. A deferred transaction
        // reads first, and its upgrade to a writer fails at once ("database is locked", no
        // waiting) when another process wrote meanwhile: `callferry enqueue` beside a busy daemon
        // queued 0 to 11 of 10,000 files.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let out = Self::enqueue_in(&mut tx, jobs, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// [`Queue::enqueue`] inside the caller's transaction (the recorder's hook attaches its call
    /// to the job in the same one, so no worker can claim it in between).
    pub(super) async fn enqueue_in(
        tx: &mut Transaction<'_, Sqlite>,
        jobs: &[NewJob],
        now: i64,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let mut out: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        // The same recording twice in one batch (two hard links found together) is resolved row
        // by row after the rest, when the first one is in the table to be found.
        let mut seen = std::collections::HashSet::new();
        let (first, again): (Vec<usize>, Vec<usize>) = (0..jobs.len()).partition(|&i| {
            let j = &jobs[i];
            j.ino == 0 || seen.insert((j.dev, j.ino, j.size, j.mtime_ns))
        });
        // Uploaded long ago and pruned since (`queue.keep_history`): their fingerprints know them.
        let all: Vec<usize> = (0..jobs.len()).collect();
        let pruned = Self::pruned_versions(tx, jobs, &all).await?;
        let first: Vec<usize> = first.into_iter().filter(|i| !pruned.contains(i)).collect();
        let again: Vec<usize> = again.into_iter().filter(|i| !pruned.contains(i)).collect();
        let mut queued: Vec<i64> = Vec::new();
        if !first.is_empty() {
            let rest = same_files_elsewhere(tx, jobs, first, &mut out).await?;
            if !rest.is_empty() {
                queued = insert_new(tx, jobs, &rest, now, &mut out).await?;
            }
        }
        for i in again {
            out[i] = same_file_elsewhere(tx, &jobs[i]).await?;
        }
        if !queued.is_empty() {
            let ids = serde_json::to_string(&queued).unwrap_or_else(|_| "[]".into());
            sqlx::query(
                "INSERT INTO job_events (job_id, at, event) SELECT value, ?, 'queued' FROM json_each(?)",
            )
            .bind(now)
            .bind(ids)
            .execute(&mut **tx)
            .await?;
        }
        // Not inserted and not the same file elsewhere: this exact version was there already.
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or(Enqueued::Known))
            .collect())
    }

    /// Takes the next due job for a worker, atomically ([`Transition::Claim`]: `pending` becomes
    /// `declaring`, `declared` becomes `uploading`). The daemon holds the database's lock file, so
    /// no other process claims.
    pub async fn claim(&self, now: i64) -> Result<Option<Job>, QueueError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let (to, due) = (
                Transition::Claim.sql_target(),
                Transition::Claim.sql_guard(),
            );
            format!(
                "UPDATE jobs SET state = {to}, updated_at = ?1 \
                 WHERE id = (SELECT id FROM jobs WHERE {due} \
                             AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT 1) \
                 RETURNING {JOB_COLUMNS}, hook"
            )
        });
        let row = sqlx::query(AssertSqlSafe(SQL.as_str()))
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(claimed_from_row).transpose()?)
    }

    /// [`Transition::Declared`], recording the call's id the declare carried (`externalIdentifier`)
    /// and the source it was declared for in the same statement.
    pub async fn mark_declared_from(
        &self,
        id: i64,
        interaction_id: &str,
        external_id: Option<&str>,
        source: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        const T: Transition = Transition::Declared;
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let (to, from) = (T.sql_target(), T.sql_guard());
            format!(
                "UPDATE jobs SET state = {to}, interaction_id = ?1, updated_at = ?2, \
                 last_error = NULL, external_id = COALESCE(?4, external_id), \
                 source = COALESCE(?5, source) WHERE id = ?3 \
                 AND ({from} OR (state = '{}' AND interaction_id = ?1))",
                State::Uploading
            )
        });
        self.fault(Fault::Declared)?;
        // One statement; the `declared` event is written by a trigger in the same transaction.
        let n = sqlx::query(AssertSqlSafe(SQL.as_str()))
            .bind(interaction_id)
            .bind(now)
            .bind(id)
            .bind(external_id)
            .bind(source)
            .execute(&self.pool)
            .await?
            .rows_affected();
        expect_one(n, &self.pool, id, &T.from_states()).await?;
        // This one commit must survive power loss (see `open`).
        self.sync_wal().await
    }

    /// [`Transition::Uploaded`], with the status that proved it (201, or 409). `follow_at`: when to
    /// first ask for its processing status (results enabled), or None.
    ///
    /// Idempotent for the same arguments: a commit whose answer was an I/O error may have gone in,
    /// and the caller's second try must not then fail as a lost race.
    pub async fn mark_uploaded(
        &self,
        id: i64,
        status: u16,
        follow_at: Option<i64>,
        now: i64,
    ) -> Result<(), QueueError> {
        const T: Transition = Transition::Uploaded;
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let (to, from) = (T.sql_target(), T.sql_guard());
            format!(
                "UPDATE jobs SET state = {to}, upload_status = ?1, updated_at = ?2, \
                 last_error = NULL, uploaded_at = ?2, follow_at = ?3, follow_attempts = 0 \
                 WHERE id = ?4 AND ({from} \
                 OR (state = '{}' AND upload_status = ?1 AND uploaded_at = ?2))",
                State::Uploaded
            )
        });
        self.fault(Fault::Uploaded)?;
        // One statement; the `uploaded` event is written by a trigger in the same transaction.
        let n = sqlx::query(AssertSqlSafe(SQL.as_str()))
            .bind(status as i64)
            .bind(now)
            .bind(follow_at)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        expect_one(n, &self.pool, id, &T.from_states()).await
    }

    /// Puts a claimed job back to wait until `next_at` ([`Transition::PutBack`]). `count_attempt`
    /// is false when the failure was not the job's (auth pause, outage, shutdown).
    pub async fn reschedule(
        &self,
        job: &Job,
        error: Option<&str>,
        next_at: i64,
        count_attempt: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        const T: Transition = Transition::PutBack;
        let to = T.target(job.state).ok_or_else(|| QueueError::NotInState {
            job: job.id,
            expected: T.from_states(),
            found: Some(job.state),
        })?;
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = ?, attempts = attempts + ?, next_attempt_at = ?, \
             last_error = COALESCE(?, last_error), updated_at = ? WHERE id = ? AND state = ?",
        )
        .bind(to.as_str())
        .bind(i64::from(count_attempt))
        .bind(next_at)
        .bind(error)
        .bind(now)
        .bind(job.id)
        .bind(job.state.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, &mut *tx, job.id, &[job.state]).await?;
        if let Some(e) = error {
            event(&mut tx, job.id, now, "retry", Some(e)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A declare of this `declaring` job went out and its answer was lost or unusable, so the
    /// service may have created an interaction that will never get audio. Counted on the job (for
    /// `[upload] max_declares`) and in the database's total. Returns the job's count. Not a
    /// transition: guarded by the state only.
    pub async fn count_orphan(&self, id: i64, detail: &str, now: i64) -> Result<u32, QueueError> {
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET orphans = orphans + 1, updated_at = ? \
             WHERE id = ? AND state = ? RETURNING orphans",
        )
        .bind(now)
        .bind(id)
        .bind(State::Declaring.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(n) = n else {
            return Err(not_in_state(&mut *tx, id, &[State::Declaring]).await);
        };
        sqlx::query("UPDATE counters SET n = n + 1 WHERE name = 'orphan_declares'")
            .execute(&mut *tx)
            .await?;
        event(&mut tx, id, now, "declare-lost", Some(detail)).await?;
        tx.commit().await?;
        Ok(n as u32)
    }

    /// A claimed job needs an operator ([`Transition::Fail`]), keeping the reason.
    pub async fn fail(&self, job: &Job, error: &str, now: i64) -> Result<(), QueueError> {
        const T: Transition = Transition::Fail;
        let to = T.target(job.state).ok_or_else(|| QueueError::NotInState {
            job: job.id,
            expected: T.from_states(),
            found: Some(job.state),
        })?;
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = ?, last_error = ?, updated_at = ?, \
             attempts = attempts + 1 WHERE id = ? AND state = ?",
        )
        .bind(to.as_str())
        .bind(error)
        .bind(now)
        .bind(job.id)
        .bind(job.state.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, &mut *tx, job.id, &[job.state]).await?;
        event(&mut tx, job.id, now, "failed", Some(error)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// After a crash or a restart: jobs a worker held are put back ([`Transition::PutBack`], one
    /// statement). With the daemon's exclusive lock no other process can be working on them. An
    /// `uploading` job keeps its interaction id and is uploaded again on it (a 409 then proves the
    /// earlier attempt got through). Returns how many were `declaring` and `uploading`.
    pub async fn recover(&self, now: i64) -> Result<(u64, u64), QueueError> {
        const T: Transition = Transition::PutBack;
        // A declare in flight at the crash may have created its interaction: counted as an orphan
        // (an upper bound: it may also never have left).
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let (to, from) = (T.sql_target(), T.sql_guard());
            format!(
                "UPDATE jobs SET state = {to}, orphans = orphans + (state = '{}'), \
                 updated_at = ? WHERE {from} RETURNING state",
                State::Declaring
            )
        });
        let mut tx = self.pool.begin().await?;
        let put_back: Vec<String> = sqlx::query_scalar(AssertSqlSafe(SQL.as_str()))
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let declaring = T.target(State::Declaring).map(State::as_str);
        let a = put_back
            .iter()
            .filter(|s| Some(s.as_str()) == declaring)
            .count() as u64;
        let b = put_back.len() as u64 - a;
        if a > 0 {
            sqlx::query("UPDATE counters SET n = n + ? WHERE name = 'orphan_declares'")
                .bind(a as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((a, b))
    }

    /// `retry` ([`Transition::Retry`]): failed jobs go back to the queue, due now, with fresh
    /// attempts. A job that already has an interaction id is uploaded again on it, never declared
    /// again. A running daemon is woken to take them at once.
    pub async fn retry(&self, ids: Option<&[i64]>, now: i64) -> Result<u64, QueueError> {
        // No id: declare again. Uploaded (the service has the file): follow it again. Otherwise
        // (never uploaded, or the service lost the file): upload again on the same id.
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let [(_, no_id), (_, has_audio), (_, on_same_id)] = *Transition::Retry.edges() else {
                unreachable!("Retry has three edges")
            };
            format!(
                "UPDATE jobs SET state = CASE WHEN interaction_id IS NULL THEN '{no_id}' \
                 WHEN upload_status IS NOT NULL THEN '{has_audio}' ELSE '{on_same_id}' END, \
                 follow_at = CASE WHEN interaction_id IS NOT NULL AND upload_status IS NOT NULL \
                 THEN ?1 ELSE NULL END, follow_attempts = 0, orphans = 0, attempts = 0, \
                 next_attempt_at = ?1, created_at = ?1, updated_at = ?1 WHERE {}",
                Transition::Retry.sql_guard()
            )
        });
        // IMMEDIATE, as `enqueue`: run beside a busy daemon, it waits for the write lock.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut n = 0;
        match ids {
            None => {
                n += sqlx::query(AssertSqlSafe(SQL.as_str()))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            Some(ids) => {
                for id in ids {
                    let k = sqlx::query(AssertSqlSafe(format!("{} AND id = ?2", *SQL)))
                        .bind(now)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if k > 0 {
                        event(&mut tx, *id, now, "retry-requested", None).await?;
                    }
                    n += k;
                }
            }
        }
        tx.commit().await?;
        if n > 0 {
            self.wake_daemon();
        }
        Ok(n)
    }

    pub async fn mark_disposed(&self, id: i64, what: &str, now: i64) -> Result<(), QueueError> {
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("UPDATE jobs SET disposed = 1, updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // A job forgotten meanwhile (`callferry forget`) is not written to again.
        expect_one(n, &mut *tx, id, &crate::queue::machine::DONE).await?;
        event(&mut tx, id, now, "after-upload", Some(what)).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The batch's versions `idx` as one JSON array for `json_each`, each with its index `i`.
fn batch_json(jobs: &[NewJob], idx: &[usize]) -> String {
    serde_json::Value::Array(
        idx.iter()
            .map(|&i| {
                let j = &jobs[i];
                serde_json::json!({
                    "i": i,
                    "path": encode_path(&j.path),
                    "root": encode_path(&j.root),
                    "size": j.size as i64,
                    "mtime": j.mtime_ns,
                    "dev": j.dev as i64,
                    "ino": j.ino as i64,
                })
            })
            .collect(),
    )
    .to_string()
}

/// Marks in `out` the versions of `idx` already queued under another path (the same device,
/// inode, size and mtime: a hard link, or a move), in one statement. Returns the others.
async fn same_files_elsewhere(
    tx: &mut Transaction<'_, Sqlite>,
    jobs: &[NewJob],
    idx: Vec<usize>,
    out: &mut [Option<Enqueued>],
) -> Result<Vec<usize>, QueueError> {
    let same: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT b.value ->> 'i', MIN(j.id), j.path FROM json_each(?) b \
         JOIN jobs j ON j.ino = b.value ->> 'ino' AND j.dev = b.value ->> 'dev' \
         AND j.size = b.value ->> 'size' AND j.mtime_ns = b.value ->> 'mtime' \
         AND j.path <> b.value ->> 'path' \
         WHERE b.value ->> 'ino' <> 0 GROUP BY b.value ->> 'i'",
    )
    .bind(batch_json(jobs, &idx))
    .fetch_all(&mut **tx)
    .await?;
    let mut skip = std::collections::HashSet::new();
    for (i, existing, path) in same {
        skip.insert(i as usize);
        out[i as usize] = Some(Enqueued::SameFile { existing, path });
    }
    Ok(idx.into_iter().filter(|i| !skip.contains(i)).collect())
}

/// [`same_files_elsewhere`] for one version, against rows this transaction may have just written.
async fn same_file_elsewhere(
    tx: &mut Transaction<'_, Sqlite>,
    j: &NewJob,
) -> Result<Option<Enqueued>, QueueError> {
    let same: Option<(i64, String)> = sqlx::query_as(
        "SELECT id, path FROM jobs WHERE ino = ? AND dev = ? AND size = ? AND mtime_ns = ? \
         AND path <> ? ORDER BY id LIMIT 1",
    )
    .bind(j.ino as i64)
    .bind(j.dev as i64)
    .bind(j.size as i64)
    .bind(j.mtime_ns)
    .bind(encode_path(&j.path).as_ref())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(same.map(|(existing, path)| Enqueued::SameFile { existing, path }))
}

/// Inserts the versions `idx` as `pending` jobs, in one statement; a version already there (any
/// state) is skipped. Marks in `out` the new ones and the job each supersedes at its path.
/// Returns the new jobs' ids.
async fn insert_new(
    tx: &mut Transaction<'_, Sqlite>,
    jobs: &[NewJob],
    idx: &[usize],
    now: i64,
    out: &mut [Option<Enqueued>],
) -> Result<Vec<i64>, QueueError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        // `WHERE true`: SQLite's parser needs it between a SELECT and ON CONFLICT.
        format!(
            "INSERT INTO jobs (path, root, size, mtime_ns, dev, ino, state, next_attempt_at, \
             created_at, updated_at) \
             SELECT b.value ->> 'path', b.value ->> 'root', b.value ->> 'size', \
             b.value ->> 'mtime', b.value ->> 'dev', b.value ->> 'ino', '{}', ?2, ?2, ?2 \
             FROM json_each(?1) b WHERE true ORDER BY b.key \
             ON CONFLICT (path, size, mtime_ns) DO NOTHING \
             RETURNING id, path, size, mtime_ns, \
             (SELECT MAX(o.id) FROM jobs o WHERE o.path = jobs.path AND o.id <> jobs.id)",
            State::Pending
        )
    });
    let rows: Vec<(i64, String, i64, i64, Option<i64>)> =
        sqlx::query_as(AssertSqlSafe(SQL.as_str()))
            .bind(batch_json(jobs, idx))
            .bind(now)
            .fetch_all(&mut **tx)
            .await?;
    let mut index: std::collections::HashMap<(String, i64, i64), usize> = idx
        .iter()
        .map(|&i| {
            let j = &jobs[i];
            let path = encode_path(&j.path).into_owned();
            ((path, j.size as i64, j.mtime_ns), i)
        })
        .collect();
    let mut queued = Vec::new();
    for (id, path, size, mtime_ns, supersedes) in rows {
        if let Some(i) = index.remove(&(path, size, mtime_ns)) {
            queued.push(id);
            out[i] = Some(Enqueued::New { id, supersedes });
        }
    }
    Ok(queued)
}
