//! Owns the daemon's life: startup (database, lock, crash recovery, token), the supervision of every
//! task (watcher, workers, auth re-check, pause bookkeeping), and the graceful stop.
//!
//! [`run`] is a library function so tests start the daemon in-process exactly as production does;
//! one [`CancellationToken`] stops it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{ApiClient, ApiError};
use crate::clock::now_ms;
use crate::config::{AfterUploadAction, AfterUploadWhen, Config, ConfigError};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::monitor::{self, Monitor};
use crate::queue::{DaemonLock, OpenMode, PAUSE_KEY, Queue, QueueError};
use crate::shared::Shared;
use crate::systemd;
use crate::wake::Wake;
use crate::worker::Pipeline;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Queue(#[from] QueueError),
    /// The HTTP client could not be built (an unreadable `api.ca_file`, say).
    #[error("{0}")]
    Api(#[from] ApiError),
    /// A file or folder a command needs for itself (the demo's temporary tree, its recordings).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// SIGTERM, SIGINT or SIGHUP could not be caught: the daemon could not stop gracefully.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The daemon's task panicked or was cancelled (`demo`, which runs it in a task of its own).
    #[error("the daemon task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The daemon's task ended, without an error, before it said it had started.
    #[error("the daemon stopped before it started")]
    NotStarted,
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
    /// The clients of sources with a token of their own, by source name.
    pub tenants: BTreeMap<String, ApiClient>,
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
    crate::completeness::writers::ignore_lease_breaks();
    raise_open_file_limit();
    let (_lock, queue) = open_queue(&cfg).await?;
    let api = ApiClient::new(&cfg, token)?;
    let tenants = tenant_clients(&cfg, &api)?;
    let mut daemon = Daemon::start(cfg, queue, api, tenants).await?;
    daemon.announce(&shutdown, started).await;
    shutdown.cancelled().await;
    daemon.drain().await;
    Ok(())
}

/// A client for each source with a token of its own. A token that cannot be read is the
/// operator's to fix: exit 78, naming the source's key.
pub fn tenant_clients(
    cfg: &Config,
    api: &ApiClient,
) -> Result<BTreeMap<String, ApiClient>, AppError> {
    let mut out = BTreeMap::new();
    for (i, s) in cfg.sources.iter().enumerate() {
        if let Some(token) = s.load_token(i) {
            out.insert(s.name.clone(), api.for_account(token?));
        }
    }
    Ok(out)
}

/// Takes the lock, opens (and migrates) the queue, and puts back the jobs a stopped daemon held.
/// On PostgreSQL: joins the cluster instead (no lock: several daemons share the queue, and a dead
/// one's jobs are taken over by the others' reapers, see [`cluster_upkeep`]).
async fn open_queue(cfg: &Config) -> Result<(Option<DaemonLock>, Queue), AppError> {
    if let Some(url) = &cfg.queue.postgres {
        let host = host_name();
        let queue = Queue::connect_pg(url.expose(), &host, &host, cfg.queue.lease).await?;
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

/// The queue a command (`status`, `list`, `retry`, `enqueue`) works on: the SQLite file, or the
/// PostgreSQL queue, attached without joining the cluster as a daemon.
pub async fn command_queue(cfg: &Config, mode: OpenMode) -> Result<Queue, AppError> {
    Ok(match &cfg.queue.postgres {
        Some(url) => Queue::attach_pg(url.expose(), cfg.queue.lease).await?,
        None => Queue::open(&cfg.queue.database, mode).await?,
    })
}

/// This host's name, as the cluster's members are shown (`status`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// PostgreSQL only: keeps this daemon's claims alive and takes over dead daemons' jobs. The
/// heartbeat renews every claim this daemon holds every third of the lease, so one late round
/// trip does not lose them; the reaper, run by every daemon every half lease (one indexed
/// `UPDATE`), puts back jobs whose lease ran out and wakes the workers for them. It also wakes
/// them when a job is due: another daemon may have queued or put it back, and no wake file
/// reaches across hosts.
async fn cluster_upkeep(queue: Queue, workers: Arc<Notify>, cancel: CancellationToken) {
    let Some(pg) = queue.cluster() else { return };
    let lease = queue_lease(pg);
    let mut beat = tokio::time::interval(lease / 3);
    let mut reap = tokio::time::interval(lease / 2);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = beat.tick() => pg.heartbeat().await.map(|_| ()),
            _ = reap.tick() => reap_and_wake(&queue, pg, &workers).await,
        };
        match r {
            Ok(()) if failing => {
                failing = false;
                info!("the shared queue answers again; claims renewed");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "cannot renew this daemon's claims in the shared queue; other daemons take its jobs over if this lasts longer than queue.lease");
            }
            Err(_) => {}
        }
    }
}

fn queue_lease(pg: &crate::queue::pg::PgQueue) -> Duration {
    pg.lease().max(crate::config::MIN_LEASE)
}

async fn reap_and_wake(
    queue: &Queue,
    pg: &crate::queue::pg::PgQueue,
    workers: &Notify,
) -> Result<(), QueueError> {
    let n = pg.reap_expired(now_ms()).await?;
    if n > 0 {
        info!(
            jobs = n,
            "took over jobs whose daemon stopped renewing its claims; they resume on their interaction ids"
        );
    }
    if n > 0 || queue.next_due().await?.is_some_and(|d| d <= now_ms()) {
        workers.notify_waiters();
    }
    Ok(())
}

/// The running daemon's parts, from [`Daemon::start`] to [`Daemon::drain`].
struct Daemon {
    cfg: Arc<Config>,
    queue: Queue,
    pipeline: Arc<Pipeline>,
    /// Everything but the upload workers: stopped after them.
    tasks: JoinSet<()>,
    background: CancellationToken,
    workers: JoinSet<()>,
    /// Fired by the watcher once the first scan is queued.
    ready_rx: oneshot::Receiver<()>,
    /// Tells the watchdog ticker that start-up is over.
    ready_flag: Arc<AtomicBool>,
    handle: Handle,
    /// Kept alive for the daemon's life: dropping it stops the events.
    _db_watcher: Option<notify::RecommendedWatcher>,
}

impl Daemon {
    /// Spawns every task: the monitor first (it feeds the watchdog through a long start-up), the
    /// start-up tidy-up, the background tasks, then the workers.
    async fn start(
        cfg: Arc<Config>,
        queue: Queue,
        api: ApiClient,
        tenants: BTreeMap<String, ApiClient>,
    ) -> Result<Daemon, AppError> {
        let gate = Arc::new(Gate::new(crate::policy::upload_backoff(&cfg)));
        let metrics = Arc::new(Metrics::new());
        let names: Vec<&str> = cfg.sources.iter().map(|s| s.name.as_str()).collect();
        metrics.add_sources(&names);
        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let ready_flag = Arc::new(AtomicBool::new(false));
        let monitor = Monitor {
            queue: queue.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            bytes_sent: api.bytes_sent.clone(),
            stall_timeout: cfg.api.stall_timeout,
            unhealthy_after: cfg.metrics.unhealthy_after,
            bytes_seen: Arc::default(),
        };
        let metrics_addr =
            spawn_monitor(&cfg, monitor, &ready_flag, &mut tasks, &background).await?;
        let pipeline = Arc::new(Pipeline {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                queue: queue.clone(),
                api: api.clone(),
                tenants: tenants.clone(),
                gate: gate.clone(),
                metrics: metrics.clone(),
                wake: Wake::default(),
            }),
            stop_claiming: CancellationToken::new(),
            abort: CancellationToken::new(),
            // Workers that find a job's file gone ask the watcher to look for it (it may have
            // moved).
            search: Arc::new(crate::watcher::Search::default()),
            missing: Default::default(),
            // Every file-system call on a watched folder goes through that folder's lanes.
            roots: Arc::new(crate::watch::Roots::default()),
        });
        let db_watcher = match queue.cluster() {
            Some(_) => None,
            None => pipeline.wake.watch_file(&queue),
        };
        tasks.spawn(cluster_upkeep(
            queue.clone(),
            pipeline.wake.workers.clone(),
            background.clone(),
        ));
        tidy_up(&cfg, &queue, &pipeline).await?;
        let recheck_now = Arc::new(Notify::new());
        let ready_rx = spawn_background(&pipeline, &recheck_now, &mut tasks, &background);
        let mut workers = JoinSet::new();
        for n in 0..cfg.upload.workers {
            workers.spawn(pipeline.clone().run_worker(n));
        }
        let handle = Handle {
            queue: queue.clone(),
            gate,
            api,
            tenants,
            metrics,
            metrics_addr,
            auth_recheck: recheck_now,
        };
        Ok(Daemon {
            cfg,
            queue,
            pipeline,
            tasks,
            background,
            workers,
            ready_rx,
            ready_flag,
            handle,
            _db_watcher: db_watcher,
        })
    }

    /// Once the first scan is queued (or a stop came first): READY to systemd, the handle to
    /// whoever started us.
    async fn announce(
        &mut self,
        shutdown: &CancellationToken,
        started: Option<oneshot::Sender<Handle>>,
    ) {
        tokio::select! {
            _ = &mut self.ready_rx => {}
            _ = shutdown.cancelled() => {}
        }
        let cfg = &self.cfg;
        let database = match &cfg.queue.postgres {
            Some(url) => crate::secret::display_url_text(url.expose()),
            None => cfg.queue.database.display().to_string(),
        };
        info!(
            workers = cfg.upload.workers,
            database = %database,
            api = %crate::secret::display_url(&cfg.api.base_url),
            "callferry running"
        );
        systemd::ready();
        self.ready_flag.store(true, Ordering::Relaxed);
        if let Some(tx) = started {
            let _ = tx.send(self.handle.clone());
        }
    }

    /// The graceful stop: no new claims, in-flight uploads finish within `upload.shutdown_grace`,
    /// then the rest are abandoned (they stay queued) and the background tasks stop.
    async fn drain(mut self) {
        systemd::stopping();
        let grace = self.cfg.upload.shutdown_grace;
        info!(grace = ?grace, "stopping: no new uploads; in-flight uploads may finish within the grace period");
        self.pipeline.stop_claiming.cancel();
        let workers = &mut self.workers;
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !drained {
            warn!(
                "shutdown grace over; abandoning in-flight uploads (they resume at the next start)"
            );
            self.pipeline.abort.cancel();
            while self.workers.join_next().await.is_some() {}
        }
        self.background.cancel();
        let tasks = &mut self.tasks;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if let Some(pg) = self.queue.cluster()
            && let Err(e) = pg.stop().await
        {
            warn!(error = %e, "cannot hand this daemon's roles back in the shared queue; others take them over after queue.lease");
        }
        let _ = self.queue.set_daemon_state(PAUSE_KEY, None, now_ms()).await;
        let _ = (self.queue)
            .set_daemon_state(crate::status::ACCOUNTS_PAUSED_KEY, None, now_ms())
            .await;
        self.queue.close().await;
        info!("stopped");
    }
}

/// The watchdog ticker, and `/metrics` and `/healthz` when `[metrics] listen` is set. The port is
/// bound before READY, so a taken one fails the start instead of going unnoticed. Returns the
/// address served.
async fn spawn_monitor(
    cfg: &Config,
    monitor: Monitor,
    ready_flag: &Arc<AtomicBool>,
    tasks: &mut JoinSet<()>,
    cancel: &CancellationToken,
) -> Result<Option<SocketAddr>, AppError> {
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
    let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    tasks.spawn(monitor::ticker(
        monitor.clone(),
        ready_flag.clone(),
        cancel.clone(),
    ));
    if let Some(listener) = listener {
        info!(address = %addr.map(|a| a.to_string()).unwrap_or_default(), "serving /metrics and /healthz");
        tasks.spawn(monitor::serve(listener, monitor, cancel.clone()));
    }
    Ok(addr)
}

/// Tidy-up that a crash interrupted: uploaded files whose move/delete did not happen yet.
async fn tidy_up(cfg: &Config, queue: &Queue, pipeline: &Pipeline) -> Result<(), AppError> {
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

/// The tasks beside the workers: the pause's record for `status`, the 401 re-check, the folder
/// watcher, the results follower and pruning. Returns what fires once the first scan is queued.
fn spawn_background(
    pipeline: &Arc<Pipeline>,
    recheck_now: &Arc<Notify>,
    tasks: &mut JoinSet<()>,
    cancel: &CancellationToken,
) -> oneshot::Receiver<()> {
    let p = pipeline;
    let cfg = &p.cfg;
    tasks.spawn(persist_pause(
        p.gate.clone(),
        p.queue.clone(),
        cancel.clone(),
    ));
    tasks.spawn(auth_recheck(
        p.shared.clone(),
        recheck_now.clone(),
        cancel.clone(),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    let watcher = crate::watcher::run(
        cfg.clone(),
        p.queue.clone(),
        p.wake.workers.clone(),
        cancel.clone(),
        ready_tx,
        p.metrics.clone(),
        p.search.clone(),
        p.roots.clone(),
    );
    tasks.spawn(async move {
        if let Err(e) = watcher.await {
            error!(error = %e, "the folder watcher stopped; files are no longer discovered until restart");
        }
    });
    let shared_queue = p.queue.cluster().is_some();
    if shared_queue {
        info!("on the PostgreSQL queue, the recorder's hook, `forget` and pruning are not run yet");
    } else {
        // The recorder's end-of-call requests (`callferry enqueue --now`), those left while
        // stopped first.
        tasks.spawn(crate::hook::run(
            cfg.clone(),
            p.queue.clone(),
            p.roots.clone(),
            p.wake.workers.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(crate::watch::health_task(
        p.roots.clone(),
        p.queue.clone(),
        p.metrics.clone(),
        cancel.clone(),
    ));
    if cfg.results.enabled {
        tasks.spawn(crate::results::Follower::new(p.shared.clone()).run(cancel.clone()));
    }
    if !shared_queue {
        // Forgets a `callferry forget` left pending (`forget.rs`): finished once, in the
        // background.
        tasks.spawn(crate::forget::resume_in_daemon(
            cfg.clone(),
            p.queue.clone(),
            crate::forget::Apis {
                default: Some(p.api.clone()),
                tenants: p.shared.tenants.clone(),
            },
        ));
        // Old jobs go, fingerprints stay (queue.keep_history); a move/delete still to do keeps
        // its job.
        tasks.spawn(crate::queue::prune_task(
            p.queue.clone(),
            cfg.queue.keep_history,
            cfg.after_upload.action == AfterUploadAction::Keep,
            cancel.clone(),
        ));
    }
    ready_rx
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

/// Keeps the pause state in the database, where `status` (another process) reads it: the pause
/// shown, and which accounts a rejected token paused (JSON: account → answer).
async fn persist_pause(gate: Arc<Gate>, queue: Queue, cancel: CancellationToken) {
    let mut rx = gate.subscribe();
    let mut last: (Option<String>, Option<String>) = (None, None);
    loop {
        let now = {
            let st = rx.borrow_and_update();
            let accounts = (!st.accounts_paused.is_empty())
                .then(|| serde_json::to_string(&st.accounts_paused).unwrap_or_default());
            (st.shown().map(|p| p.reason()), accounts)
        };
        if now != last {
            let written = async {
                queue
                    .set_daemon_state(PAUSE_KEY, now.0.as_deref(), now_ms())
                    .await?;
                queue
                    .set_daemon_state(
                        crate::status::ACCOUNTS_PAUSED_KEY,
                        now.1.as_deref(),
                        now_ms(),
                    )
                    .await
            };
            if let Err(e) = written.await {
                warn!(error = %e, "cannot record the pause state for `status`");
            }
            last = now;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// While an account is paused by a 401: re-read its token (the operator may have fixed the file)
/// and try one cheap authenticated call every `api.pause_recheck`; resume that account on success.
async fn auth_recheck(shared: Arc<Shared>, now: Arc<Notify>, cancel: CancellationToken) {
    let gate = &shared.gate;
    let mut rx = gate.subscribe();
    loop {
        let paused: Vec<String> = rx
            .borrow_and_update()
            .accounts_paused
            .keys()
            .cloned()
            .collect();
        if paused.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(shared.cfg.api.pause_recheck) => {}
            _ = now.notified() => {}
        }
        for account in paused {
            recheck_account(&shared, &account).await;
        }
    }
}

/// One paused account's re-check: its token read again, then one authenticated call.
async fn recheck_account(shared: &Shared, account: &str) {
    let cfg = &shared.cfg;
    let (api, token) = match shared.tenants.get(account) {
        Some(api) => {
            let i = cfg.sources.iter().position(|s| s.name == account);
            let token = i.and_then(|i| cfg.sources[i].load_token(i));
            (api, token.unwrap_or_else(|| cfg.api.token.load()))
        }
        None => (&shared.api, cfg.api.token.load()),
    };
    match token {
        Ok(t) => api.set_token(t),
        Err(e) => {
            warn!(account, error = %e, "still paused: cannot read the token");
            return;
        }
    }
    match api.probe_auth().await {
        Ok(()) => {
            if gate_lift(shared, account) {
                info!(account, "the API accepts the token again; uploads resume");
            }
        }
        Err(e) => info!(account, error = %e, "still paused: the API rejects the token"),
    }
}

/// Lifts an account's pause and wakes whoever waits for its jobs. True if it was paused.
fn gate_lift(shared: &Shared, account: &str) -> bool {
    shared.gate.success();
    if shared.gate.account_ok(account).is_none() {
        return false;
    }
    shared.wake.workers.notify_waiters();
    shared.wake.follower.notify_one();
    true
}
