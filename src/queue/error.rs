//! What can go wrong in the queue, in the queue's own terms: callers (workers, the watcher,
//! `status`, the CLI) match on these and never see the database engine's types, so a second
//! backend can produce the same errors.

use std::path::PathBuf;

use super::State;
use super::state::one_of;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database cannot be used at all: the operator must act (exit 78).
    #[error("{}: {reason}", path.display())]
    Unusable { path: PathBuf, reason: Unusable },
    /// A statement failed: busy, full, an I/O error. Writing again later may succeed.
    #[error("queue database error: {0}")]
    Db(DbError),
    #[error("queue database migration failed: {0}")]
    Migrate(DbError),
    #[error("cannot flush the queue database to disk ({}): {source}", path.display())]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The guarded row was not in a state the transition leaves (see
    /// [`Transition`](super::Transition)). Writing again cannot help. `found`: None when the job
    /// is gone.
    #[error(
        "job {job} is {}, not {} (lost a race, or the row was changed by hand)",
        found.map_or("gone", State::as_str),
        one_of(expected)
    )]
    NotInState {
        job: i64,
        expected: Vec<State>,
        found: Option<State>,
    },
    /// A daemon's claim on a job was taken over by another daemon (its lease ran out: it was
    /// paused, cut off, or too slow to renew), so its outcome is not committed: the job is the
    /// other daemon's now (PostgreSQL queue only).
    #[error(
        "job {job} was taken over by another daemon after this one's claim expired; not committing"
    )]
    LostClaim { job: i64 },
    /// What the PostgreSQL queue does not do yet: said plainly instead
    /// of half-done.
    #[error(
        "{0} is not available on the PostgreSQL queue yet (queue.database = \"postgres://…\"); \
         it works with a SQLite queue (queue.database = a file path)"
    )]
    Unsupported(&'static str),
    /// After a failed flush, the queue could not yet prove its commits durable (see `sync_wal`):
    /// a reader held the database, so only `copied` of the write-ahead log's `frames` went in.
    #[error(
        "queue database not yet durable after a failed flush: a reader holds the database, so \
         the write-ahead log could not be checkpointed ({copied} of {frames} frames copied)"
    )]
    NotDurable { copied: i64, frames: i64 },
    /// Another daemon holds the database's lock ([`DaemonLock`](super::DaemonLock)).
    #[error("another callferry daemon is already running on {} (its lock is held); stop it first", .0.display())]
    Locked(PathBuf),
    #[error("cannot open lock file {}: {source}", path.display())]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a database cannot be used. The words are the operator's: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("is not a regular file")]
    NotAFile,
    #[error(
        "no queue database here yet; has `callferry run` been started with this config \
         (queue.database)?"
    )]
    Missing,
    #[error("cannot access: {0}")]
    Access(std::io::Error),
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    #[error(
        "is not a SQLite database (corrupt, or some other file); refusing to overwrite it. \
         Move it aside or point queue.database at another path"
    )]
    NotSqlite,
    #[error("cannot open as a SQLite database: {0}")]
    NotOpenable(DbError),
    #[error("cannot read the database (corrupt?): {0}")]
    Corrupt(DbError),
    #[error(
        "is a SQLite database that callferry did not create; refusing to touch it \
         (point queue.database at a new path)"
    )]
    Foreign,
    #[error(
        "its schema is at version {at} and this callferry needs {needs}: the daemon upgrades it \
         when it starts (`callferry run`); if it is starting now, try again in a moment"
    )]
    SchemaBehind { at: i64, needs: i64 },
    #[error("cannot create: {0}")]
    Create(std::io::Error),
    #[error("cannot create: {0}")]
    CreateDb(DbError),
    #[error("cannot set permissions: {0}")]
    Permissions(std::io::Error),
    #[error("cannot create folder {}: {source}", dir.display())]
    Folder {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// An error of the database engine, opaque: its text is for people, [`QueueError::is_transient`]
/// and [`QueueError::is_disk_full`] are for code.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DbError(Engine);

#[derive(Debug, thiserror::Error)]
enum Engine {
    #[error(transparent)]
    Sql(sqlx::Error),
    #[error(transparent)]
    Migrate(sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> DbError {
        DbError(Engine::Sql(e))
    }
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> QueueError {
        QueueError::Db(e.into())
    }
}

impl From<sqlx::migrate::MigrateError> for QueueError {
    fn from(e: sqlx::migrate::MigrateError) -> QueueError {
        QueueError::Migrate(DbError(Engine::Migrate(e)))
    }
}

impl QueueError {
    /// SQLITE_FULL (13): the disk is full. The caller pauses rather than failing jobs.
    pub fn is_disk_full(&self) -> bool {
        match self {
            QueueError::Db(DbError(Engine::Sql(sqlx::Error::Database(e)))) => {
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
            QueueError::NotInState { .. }
                | QueueError::LostClaim { .. }
                | QueueError::Unsupported(_)
                | QueueError::Unusable { .. }
                | QueueError::Migrate(_)
                | QueueError::Locked(_)
                | QueueError::LockFile { .. }
        )
    }
}
