//! Owns the daemon's life: startup (database, lock, crash recovery, token), the supervision of every
//! task (watcher, workers, auth re-check, pause bookkeeping), and the graceful stop.
//!
//! [`run`] is a library function so tests start the daemon in-process exactly as production does;
//! one [`CancellationToken`] stops it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::ApiClient;
use crate::clock::now_ms;
use crate::config::{AfterUploadAction, AfterUploadWhen, Config, ConfigError};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::monitor::{self, Monitor};
use crate::queue::{DaemonLock, OpenMode, PAUSE_KEY, Queue, QueueError};
use crate::systemd;
use crate::worker::Pipeline;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Other(String),
    /// Writing a command's output failed; a closed pipe ends the command quietly (exit 0).
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl AppError {
    /// The process exit code: 78 for anything the operator must fix in the configuration.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Config(_) => 78,
            AppError::Queue(QueueError::Unusable { .. }) => 78,
            AppError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            _ => 1,
        }
    }
}

/// Observers for tests and `demo`: a handle on the running daemon's parts.
#[derive(Clone)]
pub struct Handle {
    pub queue: Queue,
    pub gate: Arc<Gate>,
    pub api: ApiClient,
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` and `/healthz` are served (`[metrics] listen`, resolved if port 0).
    pub metrics_addr: Option<SocketAddr>,
    /// Wakes the 401 re-check at once (SIGHUP after the token file was fixed).
    pub auth_recheck: Arc<Notify>,
}

/// Runs the daemon until `shutdown` fires, then stops gracefully. `started` (if given) receives a
/// handle once the first scan is queued and the workers run.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    started: Option<oneshot::Sender<Handle>>,
) -> Result<(), AppError> {
    let cfg = Arc::new(cfg);
    let token = cfg.api.token.load()?;
    crate::writers::ignore_lease_breaks();
    raise_open_file_limit();

    // The lock first: a second daemon (a newer build, say) must not migrate the schema under one
    // that is still working on it.
    crate::queue::create_folder(&cfg.queue.database)?;
    let _lock = DaemonLock::acquire(&cfg.queue.database)?;
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
    // A little over SQLite's auto-checkpoint size (1,000 pages of 4 KiB and their frame headers).
    if let Err(e) = queue.prepare_wal(8 << 20).await {
        warn!(error = %e, "cannot pre-zero the queue's write-ahead log; the first uploads after this start will be slower");
    }

    let api = ApiClient::new(&cfg, token).map_err(|e| AppError::Other(e.to_string()))?;
    let gate = Arc::new(Gate::new(crate::policy::upload_backoff(&cfg)));
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let monitor = Monitor {
        queue: queue.clone(),
        gate: gate.clone(),
        metrics: metrics.clone(),
        bytes_sent: api.bytes_sent.clone(),
        stall_timeout: cfg.api.stall_timeout,
        unhealthy_after: cfg.metrics.unhealthy_after,
    };
    // Bound before READY, so a taken port fails the start instead of going unnoticed.
    let listener = match cfg.metrics.listen {
        // A taken or foreign address is the operator's to fix in the configuration: exit 78,
        // which systemd does not restart-loop on.
        Some(addr) => Some(monitor::bind(addr).await.map_err(|e| {
            AppError::Config(ConfigError {
                key: "metrics.listen".into(),
                message: format!("cannot serve metrics on {addr}: {e}"),
            })
        })?),
        None => None,
    };
    let metrics_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    let background = CancellationToken::new();
    let mut tasks = JoinSet::new();
    // Started first: it feeds the watchdog through a long start-up (recovery, first scan).
    let ready_flag = Arc::new(AtomicBool::new(false));
    tasks.spawn(monitor::ticker(
        monitor.clone(),
        ready_flag.clone(),
        background.clone(),
    ));
    if let Some(listener) = listener {
        info!(address = %metrics_addr.map(|a| a.to_string()).unwrap_or_default(), "serving /metrics and /healthz");
        tasks.spawn(monitor::serve(listener, monitor, background.clone()));
    }
    let follow_wake = Arc::new(Notify::new());
    // Workers that find a job's file gone ask the watcher to look for it (it may have moved).
    let search = Arc::new(crate::watcher::Search::default());
    let pipeline = Arc::new(Pipeline {
        cfg: cfg.clone(),
        queue: queue.clone(),
        api: api.clone(),
        gate: gate.clone(),
        wake: wake.clone(),
        follow_wake: follow_wake.clone(),
        stop_claiming: CancellationToken::new(),
        abort: CancellationToken::new(),
        idle_watch: Default::default(),
        db_events: Default::default(),
        metrics: metrics.clone(),
        search: search.clone(),
        missing: Default::default(),
    });
    // Kept alive for the daemon's life: dropping it stops the events.
    let _db_watcher = watch_wake_file(&queue, wake.clone(), follow_wake.clone());
    if _db_watcher.is_some() {
        pipeline
            .db_events
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    // Tidy-up that a crash interrupted: uploaded files whose move/delete did not happen yet.
    if cfg.after_upload.action != AfterUploadAction::Keep {
        let states: &[crate::queue::State] = match cfg.after_upload.when {
            AfterUploadWhen::Uploaded => &[
                crate::queue::State::Uploaded,
                crate::queue::State::Processed,
            ],
            AfterUploadWhen::Processed => &[crate::queue::State::Processed],
        };
        for job in queue.undisposed(states).await? {
            pipeline.after_upload(&job).await;
        }
    }

    tasks.spawn(persist_pause(
        gate.clone(),
        queue.clone(),
        background.clone(),
    ));
    let recheck_now = Arc::new(Notify::new());
    tasks.spawn(auth_recheck(
        cfg.clone(),
        api.clone(),
        gate.clone(),
        recheck_now.clone(),
        background.clone(),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    {
        let (cfg, queue, wake, cancel, metrics, search) = (
            cfg.clone(),
            queue.clone(),
            wake.clone(),
            background.clone(),
            metrics.clone(),
            search.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) =
                crate::watcher::run(cfg, queue, wake, cancel, ready_tx, metrics, search).await
            {
                error!(error = %e, "the folder watcher stopped; files are no longer discovered until restart");
            }
        });
    }
    if cfg.results.enabled {
        tasks.spawn(crate::results::Follower::new(pipeline.clone()).run(background.clone()));
    }
    // Old jobs go, fingerprints stay (queue.keep_history); a move/delete still to do keeps its job.
    tasks.spawn(crate::queue::prune_task(
        queue.clone(),
        cfg.queue.keep_history,
        cfg.after_upload.action == AfterUploadAction::Keep,
        background.clone(),
    ));
    let mut workers = JoinSet::new();
    for n in 0..cfg.upload.workers {
        workers.spawn(pipeline.clone().run_worker(n));
    }

    tokio::select! {
        _ = ready_rx => {}
        _ = shutdown.cancelled() => {}
    }
    info!(
        workers = cfg.upload.workers,
        database = %cfg.queue.database.display(),
        api = %crate::secret::display_url(&cfg.api.base_url),
        "callferry running"
    );
    systemd::ready();
    ready_flag.store(true, Ordering::Relaxed);
    if let Some(tx) = started {
        let _ = tx.send(Handle {
            queue: queue.clone(),
            gate: gate.clone(),
            api: api.clone(),
            metrics: metrics.clone(),
            metrics_addr,
            auth_recheck: recheck_now.clone(),
        });
    }

    shutdown.cancelled().await;
    systemd::stopping();
    let grace = cfg.upload.shutdown_grace;
    info!(grace = ?grace, "stopping: no new uploads; in-flight uploads may finish within the grace period");
    pipeline.stop_claiming.cancel();
    let drained = tokio::time::timeout(grace, async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        warn!("shutdown grace over; abandoning in-flight uploads (they resume at the next start)");
        pipeline.abort.cancel();
        while workers.join_next().await.is_some() {}
    }
    background.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = queue.set_daemon_state(PAUSE_KEY, None, now_ms()).await;
    queue.close().await;
    info!("stopped");
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

/// Wakes idle workers when another process changed the queue: `callferry retry` and `enqueue` touch
/// the database's wake file after their commit (`Queue::wake_daemon`), and this watches that one
/// file. The database folder itself is not watched: every page SQLite writes to the WAL would be an
/// event (measured: 5 % of the daemon's CPU while uploading, issue 8). None if the file cannot be
/// created or watched (workers then poll the database files' metadata once a second).
fn watch_wake_file(
    queue: &Queue,
    wake: Arc<Notify>,
    follow_wake: Arc<Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    use std::os::unix::fs::OpenOptionsExt;
    let path = queue.wake_file();
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
    {
        warn!(path = %path.display(), error = %e, "cannot create the wake file; idle workers poll the database once a second instead");
        return None;
    }
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            wake.notify_waiters();
            follow_wake.notify_one();
        }
    })
    .ok()?;
    match watcher.watch(&path, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot watch the wake file; idle workers poll the database once a second instead");
            None
        }
    }
}

/// Keeps the pause state in the database, where `status` (another process) reads it.
async fn persist_pause(gate: Arc<Gate>, queue: Queue, cancel: CancellationToken) {
    let mut rx = gate.subscribe();
    let mut last: Option<String> = None;
    loop {
        let reason = rx.borrow_and_update().pause.as_ref().map(|p| p.reason());
        if reason != last {
            if let Err(e) = queue
                .set_daemon_state(PAUSE_KEY, reason.as_deref(), now_ms())
                .await
            {
                warn!(error = %e, "cannot record the pause state for `status`");
            }
            last = reason;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// While paused by a 401: re-read the token (the operator may have fixed the file) and try one cheap
/// authenticated call every `api.pause_recheck`; resume on success.
async fn auth_recheck(
    cfg: Arc<Config>,
    api: ApiClient,
    gate: Arc<Gate>,
    now: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut rx = gate.subscribe();
    loop {
        let paused = matches!(
            rx.borrow_and_update().pause,
            Some(crate::gate::Pause::Auth(_))
        );
        if paused {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(cfg.api.pause_recheck) => {}
                _ = now.notified() => {}
            }
            match cfg.api.token.load() {
                Ok(t) => api.set_token(t),
                Err(e) => {
                    warn!(error = %e, "still paused: cannot read the token");
                    continue;
                }
            }
            match api.probe_auth().await {
                Ok(()) => {
                    if gate.success().is_some() {
                        info!("the API accepts the token again; uploads resume");
                    }
                }
                Err(e) => info!(error = %e, "still paused: the API rejects the token"),
            }
        } else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::OpenMode;

    #[tokio::test]
    async fn another_process_touching_the_wake_file_wakes_idle_workers() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q.db"), OpenMode::Create)
            .await
            .unwrap();
        let wake = Arc::new(Notify::new());
        let _w = watch_wake_file(&q, wake.clone(), Arc::new(Notify::new())).expect("inotify watch");
        let mode = std::fs::metadata(q.wake_file()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Commits of the daemon's own wake nobody: nothing watches the database folder.
        let quiet = wake.notified();
        tokio::pin!(quiet);
        quiet.as_mut().enable();
        q.enqueue(
            &[crate::queue::NewJob {
                path: "/rec/a.wav".into(),
                root: "/rec".into(),
                size: 1,
                mtime_ns: 1,
                dev: 0,
                ino: 0,
            }],
            1,
        )
        .await
        .unwrap();
        let job = q.claim(1).await.unwrap().unwrap();
        q.fail(&job, "400", 1).await.unwrap();
        q.make_durable().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut quiet)
                .await
                .is_err(),
            "a commit of the daemon's own woke the workers"
        );
        // `callferry retry`, through a second handle on the database: its commit wakes the daemon.
        let cli = Queue::open(&dir.path().join("q.db"), OpenMode::Existing)
            .await
            .unwrap();
        assert_eq!(cli.retry(None, 2).await.unwrap(), 1);
        tokio::time::timeout(Duration::from_secs(20), quiet)
            .await
            .expect("the watcher woke the workers");
    }
}
