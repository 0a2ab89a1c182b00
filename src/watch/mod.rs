//! The watch side's file-system plumbing: a lane per watched folder (every file-system call on a
//! watched path goes through its folder's lane, never the runtime's thread), our own inotify
//! watches and the bridge of their events into tokio, one walk of a folder, what a walk may pass
//! over (`known`), the index of hard-linked names (`links`), the folders' health, and the
//! debug-only fault hooks the tests use. The watcher ([`crate::watcher`]) decides with them.

pub mod bridge;
pub mod fault;
pub mod inotify;
pub mod known;
pub mod lane;
pub mod links;
pub mod walk;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use lane::{DEADLINE, Hung, Lane, Pulse};

/// `daemon_state` key under which the daemon keeps the folders that do not answer, for `status`
/// (another process): a JSON array of paths, absent when every folder answers.
pub const UNHEALTHY_KEY: &str = "watch_unhealthy";

/// One watched folder's lanes. Two, so a long walk (minutes on a big share) never holds up the
/// pre-upload open of a recording; a hung mount stops both, so at most two threads are stuck per
/// folder, however long it hangs.
#[derive(Debug)]
pub struct RootFs {
    pub root: PathBuf,
    /// Walks, watches, folder checks.
    pub scan: Lane,
    /// A file's stat, open, header and writer check; the pre-upload open.
    pub files: Lane,
    unhealthy: AtomicBool,
}

impl RootFs {
    /// A call on this folder has made no progress for [`DEADLINE`].
    pub fn hung(&self) -> bool {
        self.scan.hung() || self.files.hung()
    }

    /// As last reported (logged, shown in `status`, `/healthz` and the metric).
    pub fn unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed)
    }
}

/// Every watched folder's [`RootFs`], by path (the `root` of a job).
#[derive(Debug, Default)]
pub struct Roots {
    map: std::sync::Mutex<HashMap<PathBuf, Arc<RootFs>>>,
    /// Every lane's calls starting and ending, for [`health_task`].
    pulse: Arc<Pulse>,
}

impl Roots {
    /// The folder's lanes, started on first use (a job's root that is no longer configured gets
    /// its own too: its recording is still opened off the runtime).
    pub fn get(&self, root: &Path) -> Arc<RootFs> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let pulse = &self.pulse;
        m.entry(root.to_path_buf())
            .or_insert_with(|| {
                Arc::new(RootFs {
                    root: root.to_path_buf(),
                    scan: Lane::spawn(root, "cf-scan", pulse.clone()),
                    files: Lane::spawn(root, "cf-files", pulse.clone()),
                    unhealthy: AtomicBool::new(false),
                })
            })
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<RootFs>> {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.values().cloned().collect();
        v.sort_by(|a, b| a.root.cmp(&b.root));
        v
    }

    /// Folders reported unhealthy now.
    pub fn unhealthy(&self) -> Vec<PathBuf> {
        self.all()
            .into_iter()
            .filter(|r| r.unhealthy())
            .map(|r| r.root.clone())
            .collect()
    }
}

/// Turns lanes that stopped answering into one warning per folder (and one info line when it
/// answers again), the metric, `/healthz`'s reason and the state `status` reads. Without a tick:
/// it sleeps until a call in hand could have run [`DEADLINE`] without progress, or, with every
/// lane idle, until a lane starts a call ([`Pulse`]); while a folder is hung it looks every second
/// (for its answer, or a walk making progress again). An idle daemon never wakes it; a busy one
/// about twice per [`DEADLINE`], however many calls it makes.
pub async fn health_task(
    roots: Arc<Roots>,
    queue: crate::queue::Queue,
    metrics: Arc<crate::metrics::Metrics>,
    cancel: CancellationToken,
) {
    let _ = queue
        .set_daemon_state(UNHEALTHY_KEY, None, crate::clock::now_ms())
        .await;
    let mut unwritten = false;
    loop {
        roots.pulse.arm();
        let mut changed = false;
        let mut any_hung = false;
        for r in roots.all() {
            let hung = r.hung();
            any_hung |= hung;
            if hung != r.unhealthy.swap(hung, Ordering::Relaxed) {
                changed = true;
                if hung {
                    warn!(path = %r.root.display(), "watched folder does not answer (a file-system call on it made no progress for {}s: a hung NFS or FUSE mount?); its recordings wait, nothing is failed, the other folders go on", DEADLINE.as_secs());
                } else {
                    info!(path = %r.root.display(), "watched folder answers again; rescanning it");
                }
                metrics
                    .watch
                    .set_root_unhealthy(&r.root.display().to_string(), hung);
            }
        }
        if changed || unwritten {
            let list: Vec<String> = roots
                .unhealthy()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            metrics.watch.set_unhealthy_roots(list.clone());
            let value =
                (!list.is_empty()).then(|| serde_json::to_string(&list).unwrap_or_default());
            unwritten = queue
                .set_daemon_state(UNHEALTHY_KEY, value.as_deref(), crate::clock::now_ms())
                .await
                .is_err();
        }
        let wait = if any_hung || unwritten {
            Some(Duration::from_secs(1))
        } else {
            next_look(&roots.all())
        };
        // With a deadline pending, a call starting meanwhile is seen at that deadline anyway.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = roots.pulse.changed(), if wait.is_none() => {}
            _ = sleep_for(wait) => {}
        }
    }
}

/// When a call in hand could first be hung: [`DEADLINE`] after its last progress (None: every
/// lane is idle, nothing can turn hung before a call starts).
pub fn next_look(roots: &[Arc<RootFs>]) -> Option<Duration> {
    roots
        .iter()
        .flat_map(|r| [&r.scan, &r.files])
        .filter_map(|lane| lane.busy_for())
        .map(|busy| DEADLINE.saturating_sub(busy) + Duration::from_millis(10))
        .min()
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
