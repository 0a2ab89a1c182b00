//! What the daemon sets up before its tasks start: the open-file limit, the queue (its lock, the
//! migrations, the recovery of jobs a stopped daemon held, or joining the PostgreSQL cluster), and
//! the after-upload tidy-up a crash interrupted.

use tracing::{info, warn};

use super::AppError;
use crate::clock::now_ms;
use crate::config::{AfterUploadAction, AfterUploadWhen, Config};
use crate::queue::{DaemonLock, OpenMode, PAUSE_KEY, Queue};
use crate::worker::Pipeline;

/// Takes the lock, opens (and migrates) the queue, and puts back the jobs a stopped daemon held.
/// On PostgreSQL: joins the cluster instead (no lock: several daemons share the queue, and a dead
/// one's jobs are taken over by the others' reapers, see `cluster.rs`).
pub(super) async fn open_queue(cfg: &Config) -> Result<(Option<DaemonLock>, Queue), AppError> {
    if let Some(url) = &cfg.queue.postgres {
        let host = host_name();
        let queue = Queue::connect_pg(url.expose(), &host, &host, cfg.queue.lease).await?;
        if let Some(pg) = queue.cluster() {
            same_folders_as_the_cluster(pg, &cfg.watch.paths).await;
        }
        return Ok((None, queue));
    }
    // The lock first: a second daemon (a newer build, say) must not migrate the schema under one
    // that is still working on it.
    crate::queue::create_folder(&cfg.queue.database)?;
    let lock = DaemonLock::acquire(&cfg.queue.database)?;
    let queue = Queue::open(&cfg.queue.database, OpenMode::Create).await?;
    let (declaring, uploading) = queue.recover(now_ms()).await?;
    if declaring + uploading > 0 {
        info!(
            declaring,
            uploading,
            "recovered jobs that were in flight when the daemon last stopped; uploads resume on their existing interaction ids"
        );
    }
    queue.set_daemon_state(PAUSE_KEY, None, now_ms()).await?;
    queue
        .set_daemon_state(crate::status::ACCOUNTS_PAUSED_KEY, None, now_ms())
        .await?;
    // A little over SQLite's auto-checkpoint size (1,000 pages of 4 KiB and their frame headers).
    if let Err(e) = queue.prepare_wal(8 << 20).await {
        warn!(error = %e, "cannot pre-zero the queue's write-ahead log; the first uploads after this start will be slower");
    }
    Ok((Some(lock), queue))
}

/// This host's name, as the cluster's members are shown (`status`).
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Tidy-up that a crash interrupted: uploaded files whose move/delete did not happen yet.
pub(super) async fn tidy_up(
    cfg: &Config,
    queue: &Queue,
    pipeline: &Pipeline,
) -> Result<(), AppError> {
    use crate::queue::State;
    let states: &[State] = match (cfg.after_upload.action, cfg.after_upload.when) {
        (AfterUploadAction::Keep, _) => return Ok(()),
        (_, AfterUploadWhen::Uploaded) => &[State::Uploaded, State::Processed],
        (_, AfterUploadWhen::Processed) => &[State::Processed],
    };
    for job in queue.undisposed(states).await? {
        pipeline.after_upload(&job).await;
    }
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard one. The soft limit is often 1,024 while
/// the hard one is far higher; every upload holds a recording and a socket, the queue its files,
/// and each metrics connection one more. Under the packaged unit `LimitNOFILE=` sets both, and
/// its system call filter forbids setrlimit, so there is nothing to do there.
pub fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        info!(limit = lim.rlim_cur, "open-file limit");
        return;
    }
    let from = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        info!(
            from,
            to = lim.rlim_max,
            "raised the open-file limit to the hard limit"
        );
    } else {
        let e = std::io::Error::last_os_error();
        warn!(limit = from, hard = lim.rlim_max, error = %e, "cannot raise the open-file limit; set LimitNOFILE= in the unit");
    }
}

/// Says so when a live member of the cluster watches other folders than this daemon: a recording
/// is one job across daemons only when every host sees it at the same path.
async fn same_folders_as_the_cluster(pg: &crate::queue::pg::PgQueue, mine: &[std::path::PathBuf]) {
    match pg.announce_roots(mine).await {
        Ok(others) => {
            for (name, host, roots) in others {
                tracing::warn!(
                    member = %name,
                    host = %host,
                    its_folders = ?roots,
                    our_folders = ?mine,
                    "another daemon of the cluster watches other folders: a recording is one job across daemons only if every host sees it at the same path; mount the shared spool at the same path on every host (unless the daemons share the folders out between them on purpose)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot compare this daemon's folders with the cluster's")
        }
    }
}
