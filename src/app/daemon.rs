//! The running daemon's parts, from assembly to the graceful stop: [`Daemon::start`] spawns the
//! monitor, the background tasks and the workers, [`Daemon::announce`] says READY once the first
//! scan is queued, and [`Daemon::drain`] stops them in order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::cluster::{cluster_upkeep, wanted_roles};
use super::startup::tidy_up;
use super::tasks::{auth_recheck, persist_pause};
use super::{AppError, Handle};
use crate::api::ApiClient;
use crate::clock::now_ms;
use crate::config::{AfterUploadAction, Config, ConfigError};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::monitor::{self, Monitor};
use crate::queue::{PAUSE_KEY, Queue};
use crate::shared::Shared;
use crate::systemd;
use crate::wake::Wake;
use crate::worker::Pipeline;

/// The running daemon's parts, from [`Daemon::start`] to [`Daemon::drain`].
pub(super) struct Daemon {
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
    pub(super) async fn start(
        cfg: Arc<Config>,
        queue: Queue,
        api: ApiClient,
        tenants: BTreeMap<String, ApiClient>,
    ) -> Result<Daemon, AppError> {
        let gate = Arc::new(Gate::new(crate::policy::upload_backoff(&cfg)));
        let metrics = Arc::new(match queue.cluster() {
            Some(pg) => Metrics::for_member(pg.name()),
            None => Metrics::new(),
        });
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
        let pipeline = new_pipeline(Shared {
            cfg: cfg.clone(),
            queue: queue.clone(),
            api: api.clone(),
            tenants: tenants.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            wake: Wake::default(),
        });
        let db_watcher = match queue.cluster() {
            Some(_) => None,
            None => pipeline.wake.watch_file(&queue),
        };
        tasks.spawn(cluster_upkeep(
            queue.clone(),
            wanted_roles(&cfg),
            (
                pipeline.wake.workers.clone(),
                pipeline.wake.follower.clone(),
            ),
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
    pub(super) async fn announce(
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
    pub(super) async fn drain(mut self) {
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
        if let Err(e) = self.queue.leave().await {
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

/// What the upload workers share, around what they share with the results follower.
fn new_pipeline(shared: Shared) -> Arc<Pipeline> {
    Arc::new(Pipeline {
        shared: Arc::new(shared),
        stop_claiming: CancellationToken::new(),
        abort: CancellationToken::new(),
        // Workers that find a job's file gone ask the watcher to look for it (it may have moved).
        search: Arc::new(crate::watcher::Search::default()),
        missing: Default::default(),
        // Every file-system call on a watched folder goes through that folder's lanes.
        roots: Arc::new(crate::watch::Roots::default()),
    })
}

/// The watchdog ticker, and `/metrics` and `/healthz` when `[metrics] listen` is set. The port is
/// bound before READY, so a taken one fails the start instead of going unnoticed. Returns the
/// address served.
pub(super) async fn spawn_monitor(
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

/// The tasks beside the workers: the pause's record for `status`, the 401 re-check, the folder
/// watcher, the results follower and pruning. Returns what fires once the first scan is queued.
pub(super) fn spawn_background(
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
    // The recorder's end-of-call requests (`callferry enqueue --now`), those left while stopped
    // first. On the shared queue each host's daemon takes its own recorders' (the drop folder is
    // this host's).
    tasks.spawn(crate::hook::run(
        cfg.clone(),
        p.queue.clone(),
        p.roots.clone(),
        p.wake.workers.clone(),
        p.metrics.clone(),
        cancel.clone(),
    ));
    tasks.spawn(crate::watch::health_task(
        p.roots.clone(),
        p.queue.clone(),
        p.metrics.clone(),
        cancel.clone(),
    ));
    if cfg.results.enabled {
        tasks.spawn(crate::results::Follower::new(p.shared.clone()).run(cancel.clone()));
    }
    // Forgets a `callferry forget` left pending (`forget.rs`): finished once, in the
    // background (on the shared queue by every daemon at its start: each step is idempotent).
    tasks.spawn(crate::forget::resume_in_daemon(
        cfg.clone(),
        p.queue.clone(),
        crate::forget::Apis {
            default: Some(p.api.clone()),
            tenants: p.shared.tenants.clone(),
        },
    ));
    // Old jobs go, fingerprints stay (queue.keep_history); a move/delete still to do keeps its
    // job. On the shared queue, by the `prune` role's holder.
    tasks.spawn(crate::queue::prune_task(
        p.queue.clone(),
        cfg.queue.keep_history,
        cfg.after_upload.action == AfterUploadAction::Keep,
        cancel.clone(),
    ));
    ready_rx
}
