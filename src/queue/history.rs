//! The queue's memory of recordings over time: later calls recorded at a reused path, recordings
//! that moved while their job waited, and (with pruning) what is kept of old jobs.

use std::sync::LazyLock;

use sqlx::AssertSqlSafe;

use super::machine::{DONE, NOT_UPLOADED, sql_in};
use super::{Job, Lite, NewJob, Queue, QueueError, State};

impl Lite {
    /// Whether an earlier job was recorded at this job's path: then this is a later call under a
    /// reused name, and its results must not take the first call's file names.
    pub async fn earlier_call_at_path(&self, job: &Job) -> Result<bool, QueueError> {
        // A pruned earlier job left the fingerprint of its path.
        let earlier: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE path = ? AND id < ?) \
             OR EXISTS (SELECT 1 FROM known_versions WHERE h = ?)",
        )
        .bind(&job.path)
        .bind(job.id)
        .bind(fingerprint::path(&raw(&job.path)))
        .fetch_one(&self.pool)
        .await?;
        Ok(earlier)
    }
}

impl Lite {
    /// A recording moved inside the watched folders while its job waited (or failed): the job
    /// follows it to `new_path`, keeping its interaction id if it has one, and is due at once. One
    /// guarded statement: only a job still at `old_path`, not yet uploaded, and only if no job
    /// already names this version at the new path. Returns whether the job moved.
    pub async fn follow_move(
        &self,
        id: i64,
        old_path: &str,
        new_path: &str,
        new_root: &str,
        now: i64,
    ) -> Result<bool, QueueError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let mut movable = NOT_UPLOADED.to_vec();
            movable.push(State::Failed);
            format!(
                "UPDATE jobs SET path = ?1, root = ?2, next_attempt_at = MIN(next_attempt_at, ?3), \
                 updated_at = ?3 WHERE id = ?4 AND path = ?5 AND state IN {} \
                 AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.path = ?1 AND o.size = jobs.size \
                                 AND o.mtime_ns = jobs.mtime_ns)",
                sql_in(&movable)
            )
        });
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(AssertSqlSafe(SQL.as_str()))
            .bind(new_path)
            .bind(new_root)
            .bind(now)
            .bind(id)
            .bind(old_path)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            let detail = format!("{old_path} -> {new_path}");
            super::event(&mut tx, id, now, "moved", Some(&detail)).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }
}

/// The fingerprints of pruned and forgotten versions (either backend: the same SQL).
pub(super) const KNOWN_PRINTS: &str = "SELECT h FROM known_versions";
/// Every job's version, for [`version_prints`] (either backend: the same SQL).
pub(super) const JOB_VERSIONS: &str = "SELECT path, size, mtime_ns FROM jobs";

/// The version fingerprints of [`JOB_VERSIONS`]'s rows: with [`KNOWN_PRINTS`], what a queue's
/// `known_fingerprints` hands the watcher.
pub(super) fn version_prints(rows: &[(String, i64, i64)]) -> impl Iterator<Item = i64> + '_ {
    rows.iter()
        .map(|(p, size, mtime)| fingerprint::version(&raw(p), *size as u64, *mtime))
}

/// A stored path's bytes, as the watcher fingerprints them (see [`super::paths`]).
pub(super) fn raw(stored: &str) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    super::decode_path(stored).into_os_string().into_vec()
}

/// Fingerprints: 64 bits of SHA-256 over a domain tag and fields. They let a pruned job keep
/// preventing a re-upload without keeping its path, name or ids in clear, and the watcher's
/// in-memory index of known versions uses the same ones, so one set serves both. Stable across
/// builds and processes (unlike std's hasher). A collision needs 2^32 fingerprints to become
/// likely; at ten million it is about one in 10^5, and it would only make a file be taken for
/// one already uploaded.
pub mod fingerprint {
    use sha2::{Digest, Sha256};

    fn h(parts: &[&[u8]]) -> i64 {
        let mut d = Sha256::new();
        for p in parts {
            d.update((p.len() as u32).to_le_bytes());
            d.update(p);
        }
        let out = d.finalize();
        i64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
    }

    /// One version of one path: `(path, size, mtime)`, what a job's UNIQUE key is.
    pub fn version(path: &[u8], size: u64, mtime_ns: i64) -> i64 {
        h(&[b"v", path, &size.to_le_bytes(), &mtime_ns.to_le_bytes()])
    }

    /// One file whatever its name: `(dev, inode, size, mtime)`, how a move or a hard link of a
    /// queued recording is recognised.
    pub fn inode(dev: u64, ino: u64, size: u64, mtime_ns: i64) -> i64 {
        h(&[
            b"i",
            &dev.to_le_bytes(),
            &ino.to_le_bytes(),
            &size.to_le_bytes(),
            &mtime_ns.to_le_bytes(),
        ])
    }

    /// A path that has held a call (for results naming: a later call at a reused name).
    pub fn path(path: &[u8]) -> i64 {
        h(&[b"p", path])
    }
}

/// Jobs removed per transaction while pruning: the daemon's one connection is free in between.
const PRUNE_BATCH: i64 = 2000;

impl Lite {
    /// Of these file versions, those a pruned job already uploaded (by path and version, or by
    /// inode under another path): the indexes into `jobs`. One statement for the whole batch.
    pub(super) async fn pruned_versions(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        jobs: &[NewJob],
        idx: &[usize],
    ) -> Result<std::collections::HashSet<usize>, QueueError> {
        use std::os::unix::ffi::OsStrExt;
        let batch: Vec<serde_json::Value> = idx
            .iter()
            .map(|&i| {
                let j = &jobs[i];
                serde_json::json!({
                    "i": i,
                    "v": fingerprint::version(j.path.as_os_str().as_bytes(), j.size, j.mtime_ns),
                    "n": if j.ino == 0 { 0 } else { fingerprint::inode(j.dev, j.ino, j.size, j.mtime_ns) },
                })
            })
            .collect();
        let rows: Vec<i64> = sqlx::query_scalar(
            "SELECT b.value ->> 'i' FROM json_each(?) b \
             WHERE EXISTS (SELECT 1 FROM known_versions WHERE h = b.value ->> 'v') \
             OR (b.value ->> 'n' <> 0 AND EXISTS (SELECT 1 FROM known_versions WHERE h = b.value ->> 'n'))",
        )
        .bind(serde_json::Value::Array(batch).to_string())
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows.into_iter().map(|i| i as usize).collect())
    }

    /// Fingerprints of every version the queue knows, jobs and pruned jobs alike: what the watcher
    /// loads (after READY) so that a rescan skips a known, unchanged file after one `stat`.
    pub async fn known_fingerprints(&self) -> Result<Vec<i64>, QueueError> {
        let mut out: Vec<i64> = sqlx::query_scalar(KNOWN_PRINTS)
            .fetch_all(&self.pool)
            .await?;
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as(JOB_VERSIONS).fetch_all(&self.pool).await?;
        out.extend(version_prints(&rows));
        Ok(out)
    }

    /// Removes jobs that are done (uploaded or processed, no longer followed) and were last
    /// changed before `cutoff` (unix ms), with their events, keeping only their fingerprints
    /// ([`fingerprint`]): enough that the same file is never uploaded again, by path or by inode,
    /// and that a later call at the same path still gets results names of its own. With
    /// `undisposed_too = false`, a job whose after-upload move/delete is still to do is kept (the
    /// start-up tidy-up needs it). Failed jobs are kept: they wait for an operator. Returns how
    /// many jobs went. In batches, one transaction each.
    pub async fn prune(&self, cutoff: i64, undisposed_too: bool) -> Result<u64, QueueError> {
        static PRUNABLE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT id, path, size, mtime_ns, dev, ino FROM jobs NOT INDEXED \
                 WHERE id > ? AND state IN {} AND updated_at < ? \
                 AND follow_at IS NULL AND (? OR disposed = 1) ORDER BY id LIMIT ?",
                sql_in(&DONE)
            )
        });
        static PRUNE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?1)) \
                 AND state IN {} AND updated_at < ?2 AND follow_at IS NULL",
                sql_in(&DONE)
            )
        });
        let mut total = 0;
        let mut after = 0i64;
        loop {
            // One pass in id order, from where the last batch ended (`NOT INDEXED`: through the
            // state index, every batch sorted all the matching jobs again: 200,000 took 74 s).
            let rows: Vec<(i64, String, i64, i64, i64, i64)> =
                sqlx::query_as(AssertSqlSafe(PRUNABLE.as_str()))
                    .bind(after)
                    .bind(cutoff)
                    .bind(undisposed_too)
                    .bind(PRUNE_BATCH)
                    .fetch_all(&self.pool)
                    .await?;
            let Some(last) = rows.last() else {
                return Ok(total);
            };
            after = last.0;
            let mut prints = Vec::with_capacity(rows.len() * 3);
            let mut ids = Vec::with_capacity(rows.len());
            for (id, path, size, mtime, dev, ino) in &rows {
                ids.push(*id);
                let path = raw(path);
                prints.push(fingerprint::version(&path, *size as u64, *mtime));
                prints.push(fingerprint::path(&path));
                if *ino != 0 {
                    prints.push(fingerprint::inode(
                        *dev as u64,
                        *ino as u64,
                        *size as u64,
                        *mtime,
                    ));
                }
            }
            let mut tx = self.pool.begin().await?;
            sqlx::query("INSERT OR IGNORE INTO known_versions (h) SELECT value FROM json_each(?)")
                .bind(serde_json::to_string(&prints).unwrap_or_else(|_| "[]".into()))
                .execute(&mut *tx)
                .await?;
            // Guarded again: a job changed since the read above (a `retry`) stays.
            let n = sqlx::query(AssertSqlSafe(PRUNE.as_str()))
                .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            total += n;
            if (rows.len() as i64) < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }
}

/// The daemon's pruning: once after start (or once given the role, on the shared queue), then
/// every hour, jobs done more than `keep` ago go (see [`Queue::prune`]). `keep` zero: never.
pub async fn prune_task(
    queue: Queue,
    keep: std::time::Duration,
    undisposed_too: bool,
    cancel: tokio_util::sync::CancellationToken,
) {
    if keep.is_zero() {
        return;
    }
    loop {
        // On the shared queue one daemon prunes for the cluster (the `prune` role); the others
        // wait to be given it.
        if !queue.holds(super::Role::Prune) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = queue.role_changed() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
            continue;
        }
        let cutoff = crate::clock::now_ms() - keep.as_millis() as i64;
        match queue.prune(cutoff, undisposed_too).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                jobs = n,
                keep = %humantime::format_duration(keep),
                "pruned old jobs and their events (queue.keep_history); their fingerprints still prevent a re-upload"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot prune old jobs; trying again in an hour"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Enqueued, OpenMode, State};
    use std::path::PathBuf;

    fn nj(path: &str, ino: u64, size: u64) -> NewJob {
        NewJob {
            path: PathBuf::from(path),
            root: PathBuf::from("/rec"),
            size,
            mtime_ns: 1_000,
            dev: 1,
            ino,
        }
    }

    async fn set(q: &Queue, id: i64, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET {sql} WHERE id = {id}"
        )))
        .execute(&q.lite().pool)
        .await
        .unwrap();
    }

    /// Pruning removes done jobs and their events, keeps what still needs the row (failed, still
    /// followed, a move/delete to do), and the fingerprints it leaves keep the same file from
    /// being queued again, at its path or moved, while a later call at the path stays apart.
    #[tokio::test]
    async fn pruned_jobs_leave_fingerprints_that_prevent_a_reupload() {
        let d = tempfile::tempdir().unwrap();
        let q = Queue::open(&d.path().join("q.db"), OpenMode::Create)
            .await
            .unwrap();
        let batch = [
            nj("/rec/a.wav", 11, 100),
            nj("/rec/b.wav", 12, 100),
            nj("/rec/c.wav", 13, 100),
            nj("/rec/d.wav", 14, 100),
            nj("/rec/e.wav", 15, 100),
        ];
        let ids: Vec<i64> = q
            .enqueue(&batch, 1)
            .await
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Enqueued::New { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect();
        let done = "state = 'uploaded', interaction_id = 'i', upload_status = 201, updated_at = 5";
        set(&q, ids[0], &format!("{done}, disposed = 1")).await;
        set(
            &q,
            ids[1],
            &format!("{done}, disposed = 1, state = 'processed'"),
        )
        .await;
        set(&q, ids[2], &format!("{done}, disposed = 0")).await; // move/delete still to do
        set(&q, ids[3], "state = 'failed', updated_at = 5").await;
        set(&q, ids[4], &format!("{done}, disposed = 1, follow_at = 9")).await; // followed
        sqlx::query("INSERT INTO job_events (job_id, at, event) VALUES (?, 5, 'declared')")
            .bind(ids[0])
            .execute(&q.lite().pool)
            .await
            .unwrap();
        assert_eq!(q.prune(10, false).await.unwrap(), 2);
        let left: Vec<i64> = q
            .list(None, 10)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(left, vec![ids[4], ids[3], ids[2]]);
        assert!(q.events(ids[0]).await.unwrap().is_empty());
        let c = q.counts().await.unwrap();
        assert_eq!((c.uploaded, c.processed, c.failed), (2, 0, 1));
        // Recent jobs stay; with undisposed_too the tidy-up's job goes as well.
        assert_eq!(q.prune(4, true).await.unwrap(), 0);
        assert_eq!(q.prune(10, true).await.unwrap(), 1);

        let again = q
            .enqueue(
                &[
                    nj("/rec/a.wav", 11, 100),       // the same version at its path
                    nj("/rec/filed/b.wav", 12, 100), // moved since
                    nj("/rec/a.wav", 21, 200),       // a later call under the same name
                ],
                20,
            )
            .await
            .unwrap();
        assert_eq!(again[0], Enqueued::Known);
        assert_eq!(again[1], Enqueued::Known);
        let Enqueued::New { id, .. } = again[2] else {
            panic!("{:?}", again[2]);
        };
        let later = q.get(id).await.unwrap().unwrap();
        assert_eq!(later.state, State::Pending);
        assert!(q.earlier_call_at_path(&later).await.unwrap());
        // The watcher's index: every job's version and every fingerprint.
        let known = q.known_fingerprints().await.unwrap();
        assert!(known.contains(&fingerprint::version(b"/rec/a.wav", 100, 1_000)));
        assert!(known.contains(&fingerprint::version(b"/rec/a.wav", 200, 1_000)));
        assert!(known.contains(&fingerprint::version(b"/rec/e.wav", 100, 1_000)));
    }

    /// A job follows its recording when it moved, not when the recording is still at its path
    /// under another version of the same name, and never once uploaded.
    #[tokio::test]
    async fn follow_move_is_guarded_by_path_and_state() {
        let d = tempfile::tempdir().unwrap();
        let q = Queue::open(&d.path().join("q.db"), OpenMode::Create)
            .await
            .unwrap();
        let r = q
            .enqueue(&[nj("/rec/a.wav", 11, 100), nj("/rec/b.wav", 12, 100)], 1)
            .await
            .unwrap();
        let (Enqueued::New { id: a, .. }, Enqueued::New { id: b, .. }) = (&r[0], &r[1]) else {
            panic!("{r:?}");
        };
        assert!(
            !q.follow_move(*a, "/rec/x.wav", "/rec/y.wav", "/rec", 2)
                .await
                .unwrap()
        );
        assert!(
            q.follow_move(*a, "/rec/a.wav", "/rec/2026/a.wav", "/rec", 2)
                .await
                .unwrap()
        );
        let j = q.get(*a).await.unwrap().unwrap();
        assert_eq!(j.path, "/rec/2026/a.wav");
        assert!(
            q.events(*a)
                .await
                .unwrap()
                .iter()
                .any(|(_, e, _)| e == "moved")
        );
        set(
            &q,
            *b,
            "state = 'uploaded', interaction_id = 'i', upload_status = 201",
        )
        .await;
        assert!(
            !q.follow_move(*b, "/rec/b.wav", "/rec/2026/b.wav", "/rec", 3)
                .await
                .unwrap()
        );
    }
}
