//! Opening the queue: create, verify, migrate; and what tells other processes about the daemon
//! that has it open (its lock, its wake file, the state it publishes for `status`).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

use super::{Lite, QueueError, Unusable, walsync};

/// The `daemon_state` key under which a running daemon publishes why it is paused, for `status`.
pub const PAUSE_KEY: &str = "pause";

/// Written into the database header so a foreign SQLite file is never mistaken for ours.
pub const APPLICATION_ID: i32 = 0x4346_4552; // "CFER"

/// How long a statement waits for another connection's lock before "database is locked".
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How to open the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create it (0600, in a 0700 folder) if missing; run migrations. For the daemon and writers.
    Create,
    /// It must exist already. For `status`/`list`, which must not create an empty database by
    /// mistake somewhere else.
    Existing,
}
impl Lite {
    pub async fn open(path: &Path, mode: OpenMode) -> Result<Lite, QueueError> {
        let unusable = |reason: Unusable| QueueError::Unusable {
            path: path.to_path_buf(),
            reason,
        };
        check_file(path, mode).await.map_err(unusable)?;
        // Look before touching: a read-only probe, so a foreign database is not even switched to
        // WAL mode before we refuse it.
        check_ownership(path).await.map_err(unusable)?;
        let pool = connect(path).await.map_err(unusable)?;
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
        } else {
            check_schema_current(&pool).await.map_err(unusable)?;
        }
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Lite {
            pool,
            path: path.to_path_buf(),
            wal_sync: Arc::new(walsync::WalSync::new(PathBuf::from(wal))),
            wal_suspect: Default::default(),
            faults: Default::default(),
        })
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
}

/// The path is a file that looks like a SQLite database, or there is none and `mode` creates it.
async fn check_file(path: &Path, mode: OpenMode) -> Result<(), Unusable> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(Unusable::NotAFile),
        Ok(m) if m.len() > 0 => check_sqlite_magic(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match mode {
            OpenMode::Existing => Err(Unusable::Missing),
            OpenMode::Create => create_private(path).await,
        },
        Err(e) => Err(Unusable::Access(e)),
    }
}

/// The daemon's (or a command's) connection, in WAL mode.
async fn connect(path: &Path) -> Result<SqlitePool, Unusable> {
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
        // Deleted and moved rows are overwritten with zeros, in their pages and on the free
        // list, so a forgotten call (`callferry forget`) or a pruned job leaves no bytes behind
        // even where the database is not vacuumed (under a running daemon). Pruning and forgets
        // pay for it; claims and transitions rewrite rows in place and hardly notice.
        .pragma("secure_delete", "ON")
        .foreign_keys(true);
    // One connection: SQLite has one writer at a time anyway, and with several connections
    // the losers of each race sleep in SQLite's busy handler (1, 2, 5, 10 ... 100 ms steps).
    // Measured with callferry-bench: 8 workers uploaded half as many files per second as 4.
    // In-process callers now queue for the connection instead, in order, without sleeping.
    // Never recycled: a closed last connection checkpoints and deletes the WAL, and a new one
    // loses the prepared statements; the pool's default idle and lifetime limits did both.
    SqlitePoolOptions::new()
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(opts)
        .await
        .map_err(|e| Unusable::NotOpenable(e.into()))
}

/// A reader (`status`, `list`, `retry`) of a database the daemon has not finished migrating (it is
/// starting, or an upgrade has not run yet) would fail on a missing column with SQLite's words;
/// this names the cause instead. Each migration commits with its row in `_sqlx_migrations`, so the
/// latest row means the whole schema is there.
async fn check_schema_current(pool: &SqlitePool) -> Result<(), Unusable> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .unwrap_or(None);
    match applied {
        Some(v) if v >= latest => Ok(()),
        v => Err(Unusable::SchemaBehind {
            at: v.unwrap_or(0),
            needs: latest,
        }),
    }
}

async fn check_ownership(path: &Path) -> Result<(), Unusable> {
    use sqlx::Connection;
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10));
    let mut conn = sqlx::SqliteConnection::connect_with(&opts)
        .await
        .map_err(|e| Unusable::NotOpenable(e.into()))?;
    let app_id: i32 = sqlx::query_scalar("PRAGMA application_id")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| Unusable::Corrupt(e.into()))?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name <> '_sqlx_migrations'",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(|e| Unusable::Corrupt(e.into()))?;
    let _ = conn.close().await;
    if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
        return Err(Unusable::Foreign);
    }
    Ok(())
}

fn check_sqlite_magic(path: &Path) -> Result<(), Unusable> {
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(Unusable::Open)?;
    let n = f.read(&mut head).map_err(Unusable::Read)?;
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(Unusable::NotSqlite);
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
async fn create_private(path: &Path) -> Result<(), Unusable> {
    use sqlx::{ConnectOptions, Connection};
    let dir = folder_of(path);
    make_folder(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.new-"))
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(Unusable::Create)?;
    let mut conn = SqliteConnectOptions::new()
        .filename(tmp.path())
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await
        .map_err(|e| Unusable::CreateDb(e.into()))?;
    sqlx::query(AssertSqlSafe(format!(
        "PRAGMA application_id = {APPLICATION_ID}"
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| Unusable::CreateDb(e.into()))?;
    // The last connection's close checkpoints and removes the -wal and -shm files.
    conn.close()
        .await
        .map_err(|e| Unusable::CreateDb(e.into()))?;
    tmp.as_file().sync_all().map_err(Unusable::Create)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        // Another process (`callferry enqueue`) created it a moment ago: use that one.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Unusable::Create(e.error)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Unusable::Permissions)?;
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

fn make_folder(dir: &Path) -> Result<(), Unusable> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Unusable::Folder {
                dir: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// Creates the database's folder (0700) if it is missing, so the daemon can take its lock file
/// there before it opens the database.
pub fn create_folder(path: &Path) -> Result<(), QueueError> {
    make_folder(folder_of(path)).map_err(|reason| QueueError::Unusable {
        path: path.to_path_buf(),
        reason,
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

/// The exclusive lock that makes this process the database's only worker. Released by the kernel
/// when the process dies, however it dies.
pub struct DaemonLock {
    _file: File,
}

/// `<database>.lock`: what [`DaemonLock`] locks.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

impl DaemonLock {
    pub fn acquire(db: &Path) -> Result<DaemonLock, QueueError> {
        let path = lock_path(db);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| QueueError::LockFile { path, source })?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(QueueError::Locked(db.to_path_buf()));
        }
        Ok(DaemonLock { _file: file })
    }

    /// Whether a daemon holds the lock right now (for `status`). None if we cannot tell.
    pub fn is_held(db: &Path) -> Option<bool> {
        let file = File::open(lock_path(db)).ok()?;
        // SAFETY: as above.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            Some(false)
        } else {
            Some(true)
        }
    }
}
