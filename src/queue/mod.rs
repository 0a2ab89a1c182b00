//! Owns the durable job queue: the SQLite database, its schema (`migrations/`), and every state
//! transition a job can make.
//!
//! Each transition is one SQL statement guarded by the state it leaves (`WHERE id = ? AND state = ?`),
//! so two workers can never take the same job and a crash between any two statements leaves a state
//! that [`Queue::recover`] understands. No transaction is ever held across a network call: callers
//! record intent before a call and the outcome after it. Channels elsewhere are only wake-up hints;
//! this database is the truth.

mod history;
mod paths;
mod state;
mod stats;
mod walsync;

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};

pub use history::{fingerprint, prune_task};
pub use paths::{decode_path, display_path, encode_path};
pub use state::State;

/// Written into the database header so a foreign SQLite file is never mistaken for ours.
pub const APPLICATION_ID: i32 = 0x4346_4552; // "CFER"

/// How long a statement waits for another connection's lock before "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: {message}")]
    Unusable { path: PathBuf, message: String },
    #[error("queue database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("queue database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot flush the queue database to disk ({path}): {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The guarded row was not in the state the transition leaves. Writing again cannot help.
    #[error("job {id} was not in state {from} (lost a race, or the row was changed by hand)")]
    NotInState { id: i64, from: String },
    /// After a failed flush, the queue could not yet prove its commits durable (see `sync_wal`).
    #[error("queue database not yet durable after a failed flush: {0}")]
    NotDurable(String),
}

impl QueueError {
    /// SQLITE_FULL (13): the disk is full. The caller pauses rather than failing jobs.
    pub fn is_disk_full(&self) -> bool {
        match self {
            QueueError::Db(sqlx::Error::Database(e)) => {
                e.code().as_deref() == Some("13") || e.message().contains("full")
            }
            QueueError::Sync { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            _ => false,
        }
    }

    /// Whether writing the same thing again later may succeed: the database was busy, full, or
    /// failed an I/O. False for a write that lost its race ([`QueueError::NotInState`]) and for a
    /// database that cannot be used at all.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            QueueError::NotInState { .. } | QueueError::Unusable { .. } | QueueError::Migrate(_)
        )
    }
}

/// Test hooks: faults the queue injects into its own writes and flushes (see
/// [`Queue::inject_fault`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `mark_declared` fails before reaching SQLite, as with "database is locked".
    Declared,
    /// `mark_uploaded` fails the same way.
    Uploaded,
    /// Any outcome write (declared, uploaded, retry, failed, dropped, after-upload) fails.
    Write,
    /// The next WAL flush fails with EIO after its commit went in.
    Sync,
}

#[derive(Debug, Default)]
struct Faults([std::sync::atomic::AtomicU32; 4]);

impl Faults {
    /// Consumes one armed fault of `kind` (or of the catch-all `Write` for writes).
    fn take(&self, kind: Fault) -> bool {
        use std::sync::atomic::Ordering;
        let dec = |i: usize| {
            self.0[i]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        };
        dec(kind as usize) || (kind != Fault::Sync && dec(Fault::Write as usize))
    }
}

/// One job, as a worker or a listing sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Job {
    pub id: i64,
    /// The path as stored (see [`encode_path`]): exact in SQL, [`Job::fs_path`] for the file
    /// system, [`Job::display_path`] for people. Listed (`--json`) as displayed.
    #[serde(serialize_with = "paths::serialize_display")]
    pub path: String,
    #[serde(serialize_with = "paths::serialize_display")]
    pub root: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub dev: u64,
    pub ino: u64,
    #[serde(serialize_with = "state::serialize_public")]
    pub state: State,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub interaction_id: Option<String>,
    pub upload_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub uploaded_at: Option<i64>,
    /// Next status poll while following (results enabled); None when not followed.
    pub follow_at: Option<i64>,
    pub follow_attempts: u32,
    /// Last status the service reported.
    pub service_status: Option<String>,
    /// Result kinds already written to disk.
    pub results_written: Vec<String>,
    /// Declares of this version whose answer was lost or unusable, since its last `retry`.
    pub orphans: u32,
}

impl Job {
    /// The recording's path, byte for byte (a name need not be UTF-8).
    pub fn fs_path(&self) -> PathBuf {
        decode_path(&self.path)
    }

    /// The watched folder it was found under, byte for byte.
    pub fn fs_root(&self) -> PathBuf {
        decode_path(&self.root)
    }

    /// The path for logs and listings: bytes that are not UTF-8 shown as U+FFFD.
    pub fn display_path(&self) -> String {
        display_path(&self.path)
    }
}

const JOB_COLUMNS: &str = "id, path, root, size, mtime_ns, dev, ino, state, attempts, \
    next_attempt_at, interaction_id, upload_status, last_error, created_at, updated_at, \
    uploaded_at, follow_at, follow_attempts, service_status, results_written, orphans";

fn job_from_row(r: &SqliteRow) -> Result<Job, sqlx::Error> {
    let state: String = r.try_get("state")?;
    Ok(Job {
        id: r.try_get("id")?,
        path: r.try_get("path")?,
        root: r.try_get("root")?,
        size: r.try_get::<i64, _>("size")? as u64,
        mtime_ns: r.try_get("mtime_ns")?,
        dev: r.try_get::<i64, _>("dev")? as u64,
        ino: r.try_get::<i64, _>("ino")? as u64,
        state: State::from_str(&state).map_err(|e| sqlx::Error::Decode(e.into()))?,
        attempts: r.try_get::<i64, _>("attempts")? as u32,
        next_attempt_at: r.try_get("next_attempt_at")?,
        interaction_id: r.try_get("interaction_id")?,
        upload_status: r
            .try_get::<Option<i64>, _>("upload_status")?
            .map(|s| s as u16),
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        uploaded_at: r.try_get("uploaded_at")?,
        follow_at: r.try_get("follow_at")?,
        follow_attempts: r.try_get::<i64, _>("follow_attempts")? as u32,
        service_status: r.try_get("service_status")?,
        results_written: r
            .try_get::<String, _>("results_written")?
            .split(',')
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect(),
        orphans: r.try_get::<i64, _>("orphans")? as u32,
    })
}

/// A file version to queue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub path: PathBuf,
    pub root: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job; `supersedes` names an earlier job for the same path (the file changed).
    New { id: i64, supersedes: Option<i64> },
    /// This exact version is already queued or done.
    Known,
    /// The same file (same device, inode, size and mtime) is already queued under another path:
    /// a hard link, or a move within the watched folders. Not uploaded again.
    SameFile { existing: i64, path: String },
}

/// Queue counts by user-facing state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub pending: u64,
    pub declared: u64,
    pub uploading: u64,
    pub uploaded: u64,
    pub processed: u64,
    pub failed: u64,
}

impl Counts {
    pub fn waiting(&self) -> u64 {
        self.pending + self.declared + self.uploading
    }
    pub fn total(&self) -> u64 {
        self.waiting() + self.uploaded + self.processed + self.failed
    }
}

#[derive(Clone)]
pub struct Queue {
    pool: SqlitePool,
    path: PathBuf,
    /// Makes the write-ahead log durable for [`Queue::sync_wal`].
    wal_sync: Arc<walsync::WalSync>,
    /// Set when a flush of the WAL failed: until a checkpoint has put everything into the
    /// database file, a later flush that succeeds proves nothing (see `sync_wal`).
    wal_suspect: Arc<std::sync::atomic::AtomicBool>,
    faults: Arc<Faults>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("path", &self.path).finish()
    }
}

/// How to open the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create it (0600, in a 0700 folder) if missing; run migrations. For the daemon and writers.
    Create,
    /// It must exist already. For `status`/`list`, which must not create an empty database by
    /// mistake somewhere else.
    Existing,
}

impl Queue {
    pub async fn open(path: &Path, mode: OpenMode) -> Result<Queue, QueueError> {
        let unusable = |message: String| QueueError::Unusable {
            path: path.to_path_buf(),
            message,
        };
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => return Err(unusable("is not a regular file".into())),
            Ok(m) if m.len() > 0 => check_sqlite_magic(path).map_err(unusable)?,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match mode {
                OpenMode::Existing => {
                    return Err(unusable(
                        "no queue database here yet; has `callferry run` been started with this \
                         config (queue.database)?"
                            .into(),
                    ));
                }
                OpenMode::Create => create_private(path).await.map_err(unusable)?,
            },
            Err(e) => return Err(unusable(format!("cannot access: {e}"))),
        }

        // Look before touching: a read-only probe, so a foreign database is not even switched to
        // WAL mode before we refuse it.
        check_ownership(path).await.map_err(unusable)?;

        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL (in WAL mode): every commit survives a process crash; a power cut may roll
            // back the last few, which is safe for every transition but one — the commit that
            // records an interaction id — which `mark_declared` makes durable by syncing the WAL
            // (`sync_wal`). An fsync per state change would cap throughput near 100 jobs per
            // second on the disk measured.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // One connection: SQLite has one writer at a time anyway, and with several connections
        // the losers of each race sleep in SQLite's busy handler (1, 2, 5, 10 ... 100 ms steps).
        // Measured with callferry-bench: 8 workers uploaded half as many files per second as 4.
        // In-process callers now queue for the connection instead, in order, without sleeping.
        // Never recycled: a closed last connection checkpoints and deletes the WAL, and a new one
        // loses the prepared statements; the pool's default idle and lifetime limits did both.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await
            .map_err(|e| unusable(format!("cannot open as a SQLite database: {e}")))?;
        if mode == OpenMode::Create {
            remove_stale_creations(path);
            // Marked ours before the schema goes in: a first start killed in between leaves a
            // marked database without tables (or one with neither), which the next start accepts
            // and completes. The other order left tables without the mark, refused as foreign.
            sqlx::query(AssertSqlSafe(format!(
                "PRAGMA application_id = {APPLICATION_ID}"
            )))
            .execute(&pool)
            .await?;
            MIGRATOR.run(&pool).await?;
        }
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Queue {
            pool,
            path: path.to_path_buf(),
            wal_sync: Arc::new(walsync::WalSync::new(PathBuf::from(wal))),
            wal_suspect: Default::default(),
            faults: Default::default(),
        })
    }

    /// Test hook: the next `n` operations of `kind` fail (see [`Fault`]). Shared by every clone of
    /// this queue, so a test arms the daemon's own queue through its handle.
    #[doc(hidden)]
    pub fn inject_fault(&self, kind: Fault, n: u32) {
        self.faults.0[kind as usize].store(n, std::sync::atomic::Ordering::Release);
    }

    fn fault(&self, kind: Fault) -> Result<(), QueueError> {
        if self.faults.take(kind) {
            return Err(QueueError::Db(sqlx::Error::Io(std::io::Error::other(
                "database is locked (injected test fault)",
            ))));
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The file a running daemon watches for changes made to its queue by other processes
    /// (`callferry retry`, `enqueue`): `<database>.wake`.
    pub fn wake_file(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".wake");
        PathBuf::from(p)
    }

    /// Tells a running daemon that jobs were changed from outside, by touching its wake file, so
    /// its idle workers look at once. Does nothing when no daemon ever created the file (it would
    /// then be ours, possibly unreadable to the daemon's user).
    pub fn wake_daemon(&self) {
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(self.wake_file())
        {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Queues file versions in one transaction. A version already known (any state) is not queued
    /// again.
    ///
    /// Set-based: a batch is one statement to find the versions already queued under another path
    /// (hard links, moves), one insert, and one for the events, whatever its size. Statements, not
    /// rows, are what costs here (each is a round trip to SQLite's thread): row by row, 100,000
    /// files found at start took 8 s to queue (issue 8).
    pub async fn enqueue(&self, jobs: &[NewJob], now: i64) -> Result<Vec<Enqueued>, QueueError> {
        let mut out: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        // The same recording twice in one batch (two hard links found together) is resolved row
        // by row after the rest, when the first one is in the table to be found.
        let mut seen = std::collections::HashSet::new();
        let (first, again): (Vec<usize>, Vec<usize>) = (0..jobs.len()).partition(|&i| {
            let j = &jobs[i];
            j.ino == 0 || seen.insert((j.dev, j.ino, j.size, j.mtime_ns))
        });
        let batch = |idx: &[usize]| {
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
        };
        // IMMEDIATE: the write lock first, waiting the busy timeout for it. A deferred transaction
        // reads first, and its upgrade to a writer fails at once ("database is locked", no
        // waiting) when another process wrote meanwhile: `callferry enqueue` beside a busy daemon
        // queued 0 to 11 of 10,000 files (issue 17).
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // Uploaded long ago and pruned since (`queue.keep_history`): their fingerprints know them.
        let all: Vec<usize> = (0..jobs.len()).collect();
        let pruned = Self::pruned_versions(&mut tx, jobs, &all).await?;
        let first: Vec<usize> = first.into_iter().filter(|i| !pruned.contains(i)).collect();
        let again: Vec<usize> = again.into_iter().filter(|i| !pruned.contains(i)).collect();
        let mut queued: Vec<i64> = Vec::new();
        if !first.is_empty() {
            let json = batch(&first);
            let same: Vec<(i64, i64, String)> = sqlx::query_as(
                "SELECT b.value ->> 'i', MIN(j.id), j.path FROM json_each(?) b \
                 JOIN jobs j ON j.ino = b.value ->> 'ino' AND j.dev = b.value ->> 'dev' \
                 AND j.size = b.value ->> 'size' AND j.mtime_ns = b.value ->> 'mtime' \
                 AND j.path <> b.value ->> 'path' \
                 WHERE b.value ->> 'ino' <> 0 GROUP BY b.value ->> 'i'",
            )
            .bind(&json)
            .fetch_all(&mut *tx)
            .await?;
            let mut skip = std::collections::HashSet::new();
            for (i, existing, path) in same {
                skip.insert(i as usize);
                out[i as usize] = Some(Enqueued::SameFile { existing, path });
            }
            let rest: Vec<usize> = first.into_iter().filter(|i| !skip.contains(i)).collect();
            if !rest.is_empty() {
                // `WHERE true`: SQLite's parser needs it between a SELECT and ON CONFLICT.
                let rows: Vec<(i64, String, i64, i64, Option<i64>)> = sqlx::query_as(
                    "INSERT INTO jobs (path, root, size, mtime_ns, dev, ino, state, next_attempt_at, \
                     created_at, updated_at) \
                     SELECT b.value ->> 'path', b.value ->> 'root', b.value ->> 'size', \
                     b.value ->> 'mtime', b.value ->> 'dev', b.value ->> 'ino', 'pending', ?2, ?2, ?2 \
                     FROM json_each(?1) b WHERE true ORDER BY b.key \
                     ON CONFLICT (path, size, mtime_ns) DO NOTHING \
                     RETURNING id, path, size, mtime_ns, \
                     (SELECT MAX(o.id) FROM jobs o WHERE o.path = jobs.path AND o.id <> jobs.id)",
                )
                .bind(batch(&rest))
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                let mut index: std::collections::HashMap<(String, i64, i64), usize> = rest
                    .iter()
                    .map(|&i| {
                        let j = &jobs[i];
                        let path = encode_path(&j.path).into_owned();
                        ((path, j.size as i64, j.mtime_ns), i)
                    })
                    .collect();
                for (id, path, size, mtime_ns, supersedes) in rows {
                    if let Some(i) = index.remove(&(path, size, mtime_ns)) {
                        queued.push(id);
                        out[i] = Some(Enqueued::New { id, supersedes });
                    }
                }
            }
        }
        for i in again {
            let j = &jobs[i];
            let same: Option<(i64, String)> = sqlx::query_as(
                "SELECT id, path FROM jobs WHERE ino = ? AND dev = ? AND size = ? AND mtime_ns = ? \
                 AND path <> ? ORDER BY id LIMIT 1",
            )
            .bind(j.ino as i64)
            .bind(j.dev as i64)
            .bind(j.size as i64)
            .bind(j.mtime_ns)
            .bind(encode_path(&j.path).as_ref())
            .fetch_optional(&mut *tx)
            .await?;
            out[i] = same.map(|(existing, path)| Enqueued::SameFile { existing, path });
        }
        if !queued.is_empty() {
            let ids = serde_json::to_string(&queued).unwrap_or_else(|_| "[]".into());
            sqlx::query(
                "INSERT INTO job_events (job_id, at, event) SELECT value, ?, 'queued' FROM json_each(?)",
            )
            .bind(now)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        // Not inserted and not the same file elsewhere: this exact version was there already.
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or(Enqueued::Known))
            .collect())
    }

    /// Takes the next due job for a worker, atomically: `pending` becomes `declaring`, `declared`
    /// becomes `uploading`. The daemon holds the database's lock file, so no other process claims.
    pub async fn claim(&self, now: i64) -> Result<Option<Job>, QueueError> {
        let sql = format!(
            "UPDATE jobs SET state = CASE state WHEN 'pending' THEN 'declaring' ELSE 'uploading' END, \
             updated_at = ?1 \
             WHERE id = (SELECT id FROM jobs WHERE state IN ('pending', 'declared') \
                         AND next_attempt_at <= ?1 ORDER BY next_attempt_at, id LIMIT 1) \
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    /// When the next job falls due, if any job waits at all.
    pub async fn next_due(&self) -> Result<Option<i64>, QueueError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE state IN ('pending', 'declared')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(v)
    }

    /// Makes every commit so far durable against power loss (they are NORMAL commits, safe against
    /// a crash but not a power cut). Called before a recording is moved or deleted, so the
    /// `uploaded` record that allowed it cannot be rolled back while the file is already gone.
    ///
    /// A flush of the WAL, as for the interaction id, not a checkpoint: a FULL checkpoint waits for
    /// every reader (`callferry list` on a big queue holds one for seconds) on the daemon's only
    /// connection, so one reader stalled every worker for the 10 s busy timeout, and its "busy"
    /// answer (nothing made durable) was ignored anyway (issue 17).
    pub async fn make_durable(&self) -> Result<(), QueueError> {
        self.sync_wal().await
    }

    /// Records the interaction id *before* the upload starts: from here on the job is never
    /// declared again. `declaring` → `uploading`. Returns once the record survives power loss.
    ///
    /// Idempotent for the same id and interaction id, so a caller may repeat it after a failed
    /// sync (a full disk) without tripping over its own earlier commit.
    pub async fn mark_declared(
        &self,
        id: i64,
        interaction_id: &str,
        now: i64,
    ) -> Result<(), QueueError> {
        self.fault(Fault::Declared)?;
        // One statement; the `declared` event is written by a trigger in the same transaction.
        let n = sqlx::query(
            "UPDATE jobs SET state = 'uploading', interaction_id = ?1, updated_at = ?2, last_error = NULL \
             WHERE id = ?3 AND (state = 'declaring' OR (state = 'uploading' AND interaction_id = ?1))",
        )
        .bind(interaction_id)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        expect_one(n, id, "declaring")?;
        // This one commit must survive power loss (see `open`).
        self.sync_wal().await
    }

    /// Makes every commit so far survive power loss (see `walsync`).
    ///
    /// After a failed flush this is not enough. A failed writeback leaves the kernel's pages
    /// marked clean, so the next fdatasync may succeed without writing them (PostgreSQL's
    /// "fsyncgate"), and a WAL frame missing on disk ends SQLite's recovery there, dropping every
    /// later commit too. So once a flush failed, durability is proven only by a checkpoint that
    /// copies the whole WAL into the database file, syncs it, and restarts the WAL (new salts, so
    /// no later frame follows a bad one). Until one succeeds, this returns an error and the caller
    /// keeps its outcome in memory and tries again.
    pub async fn sync_wal(&self) -> Result<(), QueueError> {
        use std::sync::atomic::Ordering;
        if self.wal_suspect.load(Ordering::Acquire) {
            return self.checkpoint_after_failed_flush().await;
        }
        let r = if self.faults.take(Fault::Sync) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.wal_sync.sync().await
        };
        r.map_err(|e| {
            self.wal_suspect.store(true, Ordering::Release);
            self.wal_error(e)
        })
    }

    async fn checkpoint_after_failed_flush(&self) -> Result<(), QueueError> {
        if self.faults.take(Fault::Sync) {
            return Err(self.wal_error(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        // An answer of "busy" means the WAL was not wholly copied, or not restarted, and nothing is
        // proven yet. RESTART would wait the busy timeout for readers of the old WAL, holding the
        // daemon's only connection for 10 s; the caller tries again every second instead.
        let mut conn = self.pool.acquire().await?;
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(&mut *conn)
            .await?;
        let r: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
                .fetch_one(&mut *conn)
                .await;
        sqlx::query(AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}",
            BUSY_TIMEOUT.as_millis()
        )))
        .execute(&mut *conn)
        .await?;
        let (busy, log, done) = r?;
        if busy != 0 || done < log {
            return Err(QueueError::NotDurable(format!(
                "a reader holds the database, so the write-ahead log could not be checkpointed \
                 ({done} of {log} frames copied)"
            )));
        }
        self.wal_suspect
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn wal_error(&self, source: std::io::Error) -> QueueError {
        QueueError::Sync {
            path: self.wal_sync.wal().to_path_buf(),
            source,
        }
    }

    /// Writes zeros into the WAL up to `bytes`, once, at the daemon's start, as PostgreSQL does
    /// with its WAL segments (`wal_init_zero`). SQLite appends to a new WAL until the first
    /// checkpoint, and then every `fdatasync` of [`Queue::sync_wal`] also had to commit the file's
    /// new size to the file system's journal; over a pre-zeroed file it flushes data alone
    /// (issue 8: the first 200 uploads after a start ran at 600–700 files/s against 1,000 once
    /// warm). Zeros past the last frame are nothing to SQLite: a frame is valid only with the
    /// header's salts and a running checksum. The write lock is held meanwhile, so no other
    /// process (`callferry retry`) appends a frame that the zeros could land on.
    pub async fn prepare_wal(&self, bytes: u64) -> Result<(), QueueError> {
        // Whatever the WAL holds goes into the database file first, so SQLite's next frames start
        // at the WAL's beginning, inside the zeros. Busy (a reader) is fine: nothing is lost, and
        // the zeros go after the frames.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let wal = self.wal_sync.wal().to_path_buf();
        let r = tokio::task::spawn_blocking(move || walsync::zero_extend(&wal, bytes))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("task failed: {e}"))));
        tx.rollback().await?;
        r.map_err(|e| self.wal_error(e))
    }

    /// `uploading` → `uploaded`, with the status that proved it (201, or 409). `follow_at`: when
    /// to first ask for its processing status (results enabled), or None.
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
        self.fault(Fault::Uploaded)?;
        // One statement; the `uploaded` event is written by a trigger in the same transaction.
        let n = sqlx::query(
            "UPDATE jobs SET state = 'uploaded', upload_status = ?1, updated_at = ?2, last_error = NULL, \
             uploaded_at = ?2, follow_at = ?3, follow_attempts = 0 \
             WHERE id = ?4 AND (state = 'uploading' \
             OR (state = 'uploaded' AND upload_status = ?1 AND uploaded_at = ?2))",
        )
        .bind(status as i64)
        .bind(now)
        .bind(follow_at)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        expect_one(n, id, "uploading")
    }

    /// Puts a claimed job back to wait until `next_at`: `declaring` → `pending`, `uploading` →
    /// `declared`. `count_attempt` is false when the failure was not the job's (auth pause, outage,
    /// shutdown).
    pub async fn reschedule(
        &self,
        job: &Job,
        error: Option<&str>,
        next_at: i64,
        count_attempt: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        let (from, to) = match job.state {
            State::Declaring => ("declaring", "pending"),
            State::Uploading => ("uploading", "declared"),
            other => {
                return Err(QueueError::Db(sqlx::Error::Protocol(format!(
                    "job {} cannot be rescheduled from state {other}",
                    job.id
                ))));
            }
        };
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = ?, attempts = attempts + ?, next_attempt_at = ?, \
             last_error = COALESCE(?, last_error), updated_at = ? WHERE id = ? AND state = ?",
        )
        .bind(to)
        .bind(i64::from(count_attempt))
        .bind(next_at)
        .bind(error)
        .bind(now)
        .bind(job.id)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, job.id, from)?;
        if let Some(e) = error {
            event(&mut tx, job.id, now, "retry", Some(e)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A claimed job that was never declared, whose file vanished: removed from the queue (there is
    /// nothing to upload and nothing at the service to account for).
    pub async fn drop_undeclared(&self, job: &Job) -> Result<(), QueueError> {
        self.fault(Fault::Write)?;
        let n =
            sqlx::query("DELETE FROM jobs WHERE id = ? AND state = ? AND interaction_id IS NULL")
                .bind(job.id)
                .bind(job.state.as_str())
                .execute(&self.pool)
                .await?
                .rows_affected();
        expect_one(n, job.id, job.state.as_str())
    }

    /// A declare of this `declaring` job went out and its answer was lost or unusable, so the
    /// service may have created an interaction that will never get audio. Counted on the job (for
    /// `[upload] max_declares`) and in the database's total. Returns the job's count.
    pub async fn count_orphan(&self, id: i64, detail: &str, now: i64) -> Result<u32, QueueError> {
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET orphans = orphans + 1, updated_at = ? \
             WHERE id = ? AND state = 'declaring' RETURNING orphans",
        )
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(n) = n else {
            return Err(QueueError::NotInState {
                id,
                from: "declaring".into(),
            });
        };
        sqlx::query("UPDATE counters SET n = n + 1 WHERE name = 'orphan_declares'")
            .execute(&mut *tx)
            .await?;
        event(&mut tx, id, now, "declare-lost", Some(detail)).await?;
        tx.commit().await?;
        Ok(n as u32)
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

    /// A claimed job needs an operator: → `failed`, keeping the reason.
    pub async fn fail(&self, job: &Job, error: &str, now: i64) -> Result<(), QueueError> {
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = 'failed', last_error = ?, updated_at = ?, \
             attempts = attempts + 1 WHERE id = ? AND state = ?",
        )
        .bind(error)
        .bind(now)
        .bind(job.id)
        .bind(job.state.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, job.id, job.state.as_str())?;
        event(&mut tx, job.id, now, "failed", Some(error)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// After a crash or a restart: jobs a worker held are put back. With the daemon's exclusive lock
    /// no other process can be working on them. An `uploading` job keeps its interaction id and is
    /// uploaded again on it (a 409 then proves the earlier attempt got through).
    pub async fn recover(&self, now: i64) -> Result<(u64, u64), QueueError> {
        let mut tx = self.pool.begin().await?;
        // A declare in flight at the crash may have created its interaction: counted as an orphan
        // (an upper bound: it may also never have left).
        let a = sqlx::query(
            "UPDATE jobs SET state = 'pending', orphans = orphans + 1, updated_at = ? \
             WHERE state = 'declaring'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if a > 0 {
            sqlx::query("UPDATE counters SET n = n + ? WHERE name = 'orphan_declares'")
                .bind(a as i64)
                .execute(&mut *tx)
                .await?;
        }
        let b = sqlx::query(
            "UPDATE jobs SET state = 'declared', updated_at = ? WHERE state = 'uploading'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((a, b))
    }

    /// `retry`: failed jobs go back to the queue, due now, with fresh attempts. A job that already
    /// has an interaction id is uploaded again on it, never declared again. A running daemon is
    /// woken to take them at once.
    pub async fn retry(&self, ids: Option<&[i64]>, now: i64) -> Result<u64, QueueError> {
        // IMMEDIATE, as `enqueue`: run beside a busy daemon, it waits for the write lock.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // No id: declare again. Uploaded (the service has the file): follow it again. Otherwise
        // (never uploaded, or the service lost the file): upload again on the same id.
        let base = "UPDATE jobs SET state = CASE WHEN interaction_id IS NULL THEN 'pending' \
                    WHEN upload_status IS NOT NULL THEN 'uploaded' ELSE 'declared' END, \
                    follow_at = CASE WHEN interaction_id IS NOT NULL AND upload_status IS NOT NULL \
                    THEN ?1 ELSE NULL END, follow_attempts = 0, orphans = 0, \
                    attempts = 0, next_attempt_at = ?1, created_at = ?1, updated_at = ?1 WHERE state = 'failed'";
        let mut n = 0;
        match ids {
            None => {
                n += sqlx::query(base)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            Some(ids) => {
                for id in ids {
                    let k = sqlx::query(AssertSqlSafe(format!("{base} AND id = ?2")))
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

    /// Uploaded jobs whose next status poll is due, soonest first.
    pub async fn due_followups(&self, now: i64, limit: u32) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE follow_at IS NOT NULL AND follow_at <= ? \
             AND state = 'uploaded' ORDER BY follow_at LIMIT ?"
        )))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    /// When the next status poll falls due, if any job is followed.
    pub async fn next_followup(&self) -> Result<Option<i64>, QueueError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(follow_at) FROM jobs WHERE follow_at IS NOT NULL AND state = 'uploaded'",
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
            "UPDATE jobs SET follow_at = ?, service_status = COALESCE(?, service_status), \
             follow_attempts = CASE WHEN ? IS NULL THEN 0 ELSE follow_attempts + 1 END, \
             last_error = COALESCE(?, last_error), updated_at = ? WHERE id = ? AND state = 'uploaded'",
        )
        .bind(next_at)
        .bind(service_status)
        .bind(error)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One result kind is on disk (so a restart does not fetch it again).
    pub async fn result_written(&self, job: &Job, kind: &str, now: i64) -> Result<(), QueueError> {
        let mut kinds = job.results_written.clone();
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_string());
        }
        sqlx::query("UPDATE jobs SET results_written = ?, updated_at = ? WHERE id = ?")
            .bind(kinds.join(","))
            .bind(now)
            .bind(job.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every result is written: `uploaded` → `processed`.
    pub async fn mark_processed(&self, id: i64, now: i64) -> Result<(), QueueError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = 'processed', follow_at = NULL, service_status = 'processed', \
             last_error = NULL, updated_at = ? WHERE id = ? AND state = 'uploaded'",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, id, "uploaded")?;
        event(&mut tx, id, now, "processed", None).await?;
        tx.commit().await?;
        Ok(())
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
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = 'failed', follow_at = NULL, last_error = ?, \
             service_status = COALESCE(?, service_status), \
             upload_status = CASE WHEN ? THEN NULL ELSE upload_status END, updated_at = ? \
             WHERE id = ? AND state = 'uploaded'",
        )
        .bind(error)
        .bind(service_status)
        .bind(lost_file)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        expect_one(n, id, "uploaded")?;
        event(&mut tx, id, now, "failed", Some(error)).await?;
        tx.commit().await?;
        Ok(())
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
        let rows = match state {
            Some(s) => {
                let internal: Vec<&str> = s.internal_states().to_vec();
                let placeholders = vec!["?"; internal.len()].join(", ");
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({placeholders}) ORDER BY id DESC LIMIT ?"
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for st in internal {
                    q = q.bind(st);
                }
                q.bind(limit as i64).fetch_all(&self.pool).await?
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?"
                )))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
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
        let internal: Vec<&'static str> =
            state.map_or(Vec::new(), |s| s.internal_states().to_vec());
        let filter = if internal.is_empty() {
            String::new()
        } else {
            format!("WHERE state IN ({})", vec!["?"; internal.len()].join(", "))
        };
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT ?"
        )));
        for st in internal {
            q = q.bind(st);
        }
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
            let n = r.try_get::<i64, _>("n")? as u64;
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
        Ok(c)
    }

    /// Creation time of the oldest job not yet uploaded.
    pub async fn oldest_waiting(&self) -> Result<Option<i64>, QueueError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(created_at) FROM jobs WHERE state IN ('pending', 'declaring', 'declared', 'uploading')",
        )
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
        let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({}) AND disposed = 0",
            list.join(", ")
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    pub async fn mark_disposed(&self, id: i64, what: &str, now: i64) -> Result<(), QueueError> {
        self.fault(Fault::Write)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE jobs SET disposed = 1, updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        event(&mut tx, id, now, "after-upload", Some(what)).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_daemon_state(
        &self,
        key: &str,
        value: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        match value {
            Some(v) => {
                sqlx::query(
                    "INSERT INTO daemon_state (key, value, updated_at) VALUES (?, ?, ?) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                )
                .bind(key)
                .bind(v)
                .bind(now)
                .execute(&self.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM daemon_state WHERE key = ?")
                    .bind(key)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn daemon_state(&self, key: &str) -> Result<Option<(String, i64)>, QueueError> {
        let row = sqlx::query("SELECT value, updated_at FROM daemon_state WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("value")?, r.try_get("updated_at")?)),
            None => None,
        })
    }

    /// Test hook (the disk-full tests): with `full`, caps the database at its current size on
    /// every pooled connection (SQLite's `max_page_count`), so a write that needs a new page fails
    /// with SQLITE_FULL exactly as on a full disk; `false` lifts the cap. Connections the pool
    /// opens later are not capped.
    #[doc(hidden)]
    pub async fn simulate_disk_full(&self, full: bool) -> Result<(), QueueError> {
        // Hold every connection at once so each one gets the setting.
        let mut conns = Vec::new();
        for _ in 0..self.pool.options().get_max_connections() {
            conns.push(self.pool.acquire().await?);
        }
        for c in &mut conns {
            let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                .fetch_one(&mut **c)
                .await?;
            let cap = if full { pages } else { 0xFFFF_FFFE };
            sqlx::query(AssertSqlSafe(format!("PRAGMA max_page_count = {cap}")))
                .execute(&mut **c)
                .await?;
        }
        // The cap alone leaves the free pages and slack of a database that has seen deletes, so
        // a test could see dozens of writes succeed. Use that room up, so the next write that
        // needs space fails as on a full disk; lifting the cap drops the filler.
        if let Some(c) = conns.first_mut() {
            if full {
                sqlx::query("CREATE TABLE IF NOT EXISTS _disk_full_filler (x BLOB)")
                    .execute(&mut **c)
                    .await
                    .ok();
                for _ in 0..100_000 {
                    if sqlx::query("INSERT INTO _disk_full_filler (x) VALUES (zeroblob(512))")
                        .execute(&mut **c)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            } else {
                sqlx::query("DROP TABLE IF EXISTS _disk_full_filler")
                    .execute(&mut **c)
                    .await?;
            }
        }
        Ok(())
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
}

async fn event(
    tx: &mut Transaction<'_, Sqlite>,
    job_id: i64,
    at: i64,
    event: &str,
    detail: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO job_events (job_id, at, event, detail) VALUES (?, ?, ?, ?)")
        .bind(job_id)
        .bind(at)
        .bind(event)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn expect_one(n: u64, id: i64, from: &str) -> Result<(), QueueError> {
    if n == 1 {
        Ok(())
    } else {
        Err(QueueError::NotInState {
            id,
            from: from.to_string(),
        })
    }
}

async fn check_ownership(path: &Path) -> Result<(), String> {
    use sqlx::Connection;
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10));
    let mut conn = sqlx::SqliteConnection::connect_with(&opts)
        .await
        .map_err(|e| format!("cannot open as a SQLite database: {e}"))?;
    let app_id: i32 = sqlx::query_scalar("PRAGMA application_id")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| format!("cannot read the database (corrupt?): {e}"))?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name <> '_sqlx_migrations'",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(|e| format!("cannot read the database (corrupt?): {e}"))?;
    let _ = conn.close().await;
    if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
        return Err(
            "is a SQLite database that callferry did not create; refusing to touch it \
                    (point queue.database at a new path)"
                .into(),
        );
    }
    Ok(())
}

fn check_sqlite_magic(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let n = f.read(&mut head).map_err(|e| format!("cannot read: {e}"))?;
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(
            "is not a SQLite database (corrupt, or some other file); refusing to overwrite it. \
             Move it aside or point queue.database at another path"
                .into(),
        );
    }
    Ok(())
}

/// Creates the database file 0600 in a 0700 folder before SQLite does, so recordings' paths and
/// interaction ids are never world-readable, whatever the umask.
///
/// It is made whole under a temporary name (WAL mode, stamped with [`APPLICATION_ID`]) and then
/// linked into place, so a crash during creation leaves either no database or a usable one. Made
/// in place, a new file's first write (the switch to WAL) went through a rollback journal, and a
/// `kill -9` at that moment left a hot journal that the read-only ownership probe cannot roll back:
/// every later start refused the database (exit 78). A killed creation leaves only a hidden
/// `.<name>.new-*` file behind, removed by a later start once it is a minute old.
async fn create_private(path: &Path) -> Result<(), String> {
    use sqlx::{ConnectOptions, Connection};
    let dir = folder_of(path);
    make_folder(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.new-"))
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| format!("cannot create: {e}"))?;
    let mut conn = SqliteConnectOptions::new()
        .filename(tmp.path())
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await
        .map_err(|e| format!("cannot create: {e}"))?;
    sqlx::query(AssertSqlSafe(format!(
        "PRAGMA application_id = {APPLICATION_ID}"
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| format!("cannot create: {e}"))?;
    // The last connection's close checkpoints and removes the -wal and -shm files.
    conn.close()
        .await
        .map_err(|e| format!("cannot create: {e}"))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| format!("cannot create: {e}"))?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        // Another process (`callferry enqueue`) created it a moment ago: use that one.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(format!("cannot create: {}", e.error)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set permissions: {e}"))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn make_folder(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Creates the database's folder (0700) if it is missing, so the daemon can take its lock file
/// there before it opens the database.
pub fn create_folder(path: &Path) -> Result<(), QueueError> {
    make_folder(folder_of(path)).map_err(|message| QueueError::Unusable {
        path: path.to_path_buf(),
        message,
    })
}

/// Removes what killed creations left (see [`create_private`]), once it is a minute old: never the
/// temporary file of a creation running right now in another process.
fn remove_stale_creations(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.new-", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
        if stale && e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests;
