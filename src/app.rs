//! Owns the daemon's life: startup (database, lock, crash recovery, token), the supervision of every
//! task (watcher, workers, auth re-check, pause bookkeeping), and the graceful stop.
//!
//! [`run`] is a library function so tests start the daemon in-process exactly as production does;
//! one [`CancellationToken`] stops it. Its parts: what is set up before any task starts
//! (`startup`: the open-file limit, the queue and its recovery, the interrupted tidy-up), the
//! running daemon from assembly to the graceful stop (`daemon`), the daemon's own background tasks
//! (`tasks`: the pause's record, the 401 re-check), and the PostgreSQL upkeep (`cluster`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::{ApiClient, ApiError};
use crate::config::{Config, ConfigError};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::queue::{OpenMode, Queue, QueueError};

mod cluster;
mod daemon;
mod startup;
mod tasks;

use daemon::Daemon;
use startup::open_queue;
pub use startup::raise_open_file_limit;

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

/// The queue a command (`status`, `list`, `retry`, `enqueue`) works on: the SQLite file, or the
/// PostgreSQL queue, attached without joining the cluster as a daemon.
pub async fn command_queue(cfg: &Config, mode: OpenMode) -> Result<Queue, AppError> {
    Ok(match &cfg.queue.postgres {
        Some(url) => Queue::attach_pg(url.expose(), cfg.queue.lease).await?,
        None => Queue::open(&cfg.queue.database, mode).await?,
    })
}
