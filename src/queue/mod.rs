//! Owns the durable job queue: the SQLite database, its schema (`migrations/`), and every state
//! transition a job can make.
//!
//! Each transition is one SQL statement guarded by the state it leaves (`WHERE id = ? AND state = ?`),
//! so two workers can never take the same job and a crash between any two statements leaves a state
//! that [`Queue::recover`] understands. No transaction is ever held across a network call: callers
//! record intent before a call and the outcome after it. Channels elsewhere are only wake-up hints;
//! this database is the truth.

//! The files follow a job's life: `open` (create, verify, migrate; the daemon's lock),
//! `transitions` (enqueue through retry), `follow` (results), `read` (listings, counts, figures),
//! `history` (moves, reused names, pruning) and `durable` (flushes, over `walsync`).

mod cluster;
mod dispatch;
mod durable;
mod error;
mod follow;
mod forget;
mod history;
mod hook;
mod machine;
mod open;
mod paths;
pub mod pg;
mod read;
mod roles;
mod sources;
mod state;
mod transitions;
mod walsync;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

pub use dispatch::Queue;
pub use error::{DbError, QueueError, Unusable};
pub use forget::{Forgot, Tombstone};
pub use history::{fingerprint, prune_task};
pub use hook::Hooked;
pub use machine::Transition;
pub use open::{APPLICATION_ID, DaemonLock, OpenMode, PAUSE_KEY, create_folder, lock_path};
pub use paths::{decode_path, display_path, encode_path};
pub use roles::Role;
pub use state::{State, UnknownState};

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
    /// The call's id as its declare sent it (`externalIdentifier`); None until declared.
    pub external_id: Option<String>,
    /// The source it was declared for (a `[[source]]` name, or `default` for the top-level
    /// `[watch]` folders); None until declared, and for jobs declared before sources existed.
    pub source: Option<String>,
    /// What the recorder's end-of-call hook said about the call (JSON, `crate::hook`), read by the
    /// claim in the same statement, so the declare costs no second trip to the database. Only a
    /// claimed job carries it: a job read any other way has None here (`Queue::hook_of` reads it).
    #[serde(skip)]
    pub hook: Option<String>,
    /// On the PostgreSQL queue, the daemon working on the job now (its name: its host's), while
    /// it is being declared or uploaded. Listed only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
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

    /// Whether `meta` describes the version this job queued: same size and mtime (an inode may
    /// differ: a copy, a move across file systems).
    pub fn is_version(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        meta.len() == self.size && meta.mtime() * 1_000_000_000 + meta.mtime_nsec() == self.mtime_ns
    }
}

const JOB_COLUMNS: &str = "id, path, root, size, mtime_ns, dev, ino, state, attempts, \
    next_attempt_at, interaction_id, upload_status, last_error, created_at, updated_at, \
    uploaded_at, follow_at, follow_attempts, service_status, results_written, orphans, external_id, source";

/// A job from a row of either backend: the PostgreSQL schema keeps every integer column 64-bit so
/// that one decoder serves both.
fn job_from_row<R>(r: &R) -> Result<Job, sqlx::Error>
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    i64: for<'v> sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
    String: for<'v> sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
{
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
        external_id: r.try_get("external_id")?,
        source: r.try_get("source")?,
        hook: None,
        held_by: None,
    })
}

/// A claimed job, from a row of `{JOB_COLUMNS}, hook`.
fn claimed_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Job, sqlx::Error> {
    let mut job = job_from_row(r)?;
    job.hook = r.try_get("hook")?;
    Ok(job)
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
    /// Adds `n` jobs in the internal state named `state` to its user-facing state's count.
    fn add(&mut self, state: &str, n: i64) {
        let n = n.max(0) as u64;
        match State::from_str(state).map(State::public) {
            Ok(State::Pending) => self.pending += n,
            Ok(State::Declared) => self.declared += n,
            Ok(State::Uploading) => self.uploading += n,
            Ok(State::Uploaded) => self.uploaded += n,
            Ok(State::Processed) => self.processed += n,
            Ok(State::Failed) => self.failed += n,
            _ => {}
        }
    }

    pub fn waiting(&self) -> u64 {
        self.pending + self.declared + self.uploading
    }
    pub fn total(&self) -> u64 {
        self.waiting() + self.uploaded + self.processed + self.failed
    }
}

/// The SQLite queue: one host, one daemon (the default backend). Callers see it through [`Queue`].
#[derive(Clone)]
pub(crate) struct Lite {
    pool: SqlitePool,
    path: PathBuf,
    /// Makes the write-ahead log durable for [`Queue::sync_wal`].
    wal_sync: Arc<walsync::WalSync>,
    /// Set when a flush of the WAL failed: until a checkpoint has put everything into the
    /// database file, a later flush that succeeds proves nothing (see `sync_wal`).
    wal_suspect: Arc<std::sync::atomic::AtomicBool>,
    faults: Arc<Faults>,
}

impl std::fmt::Debug for Lite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("path", &self.path).finish()
    }
}

impl Lite {
    /// Test hook: the next `n` operations of `kind` fail (see [`Fault`]). Shared by every clone of
    /// this queue, so a test arms the daemon's own queue through its handle.
    #[doc(hidden)]
    pub fn inject_fault(&self, kind: Fault, n: u32) {
        self.faults.0[kind as usize].store(n, std::sync::atomic::Ordering::Release);
    }

    fn fault(&self, kind: Fault) -> Result<(), QueueError> {
        if self.faults.take(kind) {
            return Err(sqlx::Error::Io(std::io::Error::other(
                "database is locked (injected test fault)",
            ))
            .into());
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn close(&self) {
        self.pool.close().await;
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

/// After a guarded statement: `n` rows changed, or the reason none did.
async fn expect_one<'c>(
    n: u64,
    exec: impl sqlx::SqliteExecutor<'c>,
    job: i64,
    expected: &[State],
) -> Result<(), QueueError> {
    match n {
        1 => Ok(()),
        _ => Err(not_in_state(exec, job, expected).await),
    }
}

/// A failed guard, with the state the job is in now (None: it is gone). If even that cannot be
/// read, the database's error, which may be transient: the caller's next try then tells.
async fn not_in_state<'c>(
    exec: impl sqlx::SqliteExecutor<'c>,
    job: i64,
    expected: &[State],
) -> QueueError {
    let found: Result<Option<String>, _> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_optional(exec)
            .await;
    match found {
        Ok(found) => QueueError::NotInState {
            job,
            expected: expected.to_vec(),
            found: found.and_then(|s| State::from_str(&s).ok()),
        },
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests;
