//! Owns finding recordings: it keeps the set of files we are waiting on until
//! [`crate::completeness`] says they are complete, and queues complete versions in batches. Its
//! parts: the roots' lifecycle (`roots`: watched, missing, gone, back), the walks that list a
//! folder (`scans`: startup, periodic, overflow and search rescans, polled roots and folders), and
//! the file events (`events`: inotify's, bridged by [`crate::watch::bridge`], and the other names
//! of a hard-linked file that changed), when each duty falls due (`schedule`), a candidate's path
//! from first sight to a decision (`evaluate`), the batches queued and the recordings that moved
//! (`enqueue`), and the same checks for a file named by hand (`check`, for `callferry enqueue`).
//! This file holds the watcher's state and the loop that drives them.
//!
//! Every file-system call on a watched path (a walk, a watch, a `stat`, a header read) runs on its
//! root's lane ([`crate::watch::lane`]), never on the runtime's thread, and is given up after a
//! deadline: a root on a mount that stops answering is passed over (and rescanned once it answers)
//! while the others go on. The watcher never uploads or changes files; it only reads metadata.

mod check;
mod enqueue;
mod evaluate;
mod events;
mod roots;
mod scans;
mod schedule;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::completeness::{Observed, Pending, Stat};
use crate::config::Config;
use crate::queue::Queue;
use crate::watch::bridge::Ev;
use crate::watch::inotify::Inotify;
use crate::watch::known::Known;
use crate::watch::links::Links;
use crate::watch::{Hung, Roots};
use schedule::{Schedule, sleep_until};

pub use crate::watch::known::Search;
pub use check::{NotQueued, check_file};

const EVENT_CHANNEL: usize = 8192;
const ENQUEUE_BATCH: usize = 2000;
/// Rescan period for a folder that could not get an inotify watch (limit reached).
const FALLBACK_POLL: Duration = Duration::from_secs(10);

/// A file we are waiting on.
#[derive(Debug, Clone)]
struct Candidate {
    root: PathBuf,
    obs: Observed,
    next_check_ms: i64,
    /// Why it is still waiting, last time we said so (to log each reason once).
    note: Option<Pending>,
}

/// The watched folder a path belongs to, if any (the longest matching one).
pub fn root_of<'a>(roots: &'a [PathBuf], path: &Path, recursive: bool) -> Option<&'a PathBuf> {
    roots
        .iter()
        .filter(|r| {
            if recursive {
                path.starts_with(r) && path != r.as_path()
            } else {
                path.parent() == Some(r.as_path())
            }
        })
        .max_by_key(|r| r.as_os_str().len())
}

struct State {
    cfg: Arc<Config>,
    queue: Queue,
    wake: Arc<Notify>,
    candidates: HashMap<PathBuf, Candidate>,
    /// Roots with a live inotify instance (their folders' watches are added by walks).
    watched: Vec<PathBuf>,
    /// Roots that do not exist (yet), or did not answer when looked for.
    missing: Vec<PathBuf>,
    /// Roots polled as a whole (`watch.poll_interval` > 0, or no inotify instance to be had).
    polled: Vec<PathBuf>,
    /// Folders inside watched roots that got no watch (the kernel's budget is spent): each is
    /// polled on its own every [`FALLBACK_POLL`], and given a watch as soon as one is free.
    polled_dirs: std::collections::BTreeSet<PathBuf>,
    /// Said once: the inotify budget ran out.
    limit_warned: bool,
    cancel: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
    /// The open-writer check could not run; said once.
    writer_check_warned: bool,
    /// Files judged not to be recordings, as they were then. Said once: a poll or rescan that
    /// finds one unchanged passes over it (a polled folder used to repeat the warning for every
    /// such file at every poll). A change makes it a candidate again. Entries go when the file does.
    rejected: HashMap<PathBuf, Stat>,
    known: Arc<Known>,
    search: Arc<Search>,
    /// The names of files that have more than one (hard links), to look at them all when one
    /// changes.
    links: Arc<Links>,
    /// Every root's lanes: all file-system calls on a watched path go through them.
    fs: Arc<Roots>,
    /// Each watched root's inotify instance, and the task that reads it.
    inotify: HashMap<PathBuf, (Arc<Inotify>, AbortOnDropHandle<()>)>,
    /// Roots whose events or scans were passed over while they did not answer: rescanned in
    /// full once they answer again.
    skipped: HashSet<PathBuf>,
    /// Root checks whose answer had not come by the end of their check (see `check_roots`).
    probes: HashMap<PathBuf, AbortOnDropHandle<Result<bool, Hung>>>,
    /// Missing roots already said so (once each, until they are there).
    warned_missing: HashSet<PathBuf>,
    events: mpsc::Sender<Ev>,
    overflow: Arc<AtomicBool>,
    overflow_wake: Arc<Notify>,
    /// The watches on the nearest existing parent of each missing root (and their reader): a root
    /// that appears is noticed by its event, not by polling.
    ancestors: Option<(Arc<Inotify>, AbortOnDropHandle<()>)>,
    /// The missing roots, as the ancestors' reader filters its events by them.
    wanted: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    /// A root went or may have come back: check the roots.
    roots_wake: Arc<Notify>,
    recheck_roots: bool,
}

impl State {
    fn new(
        cfg: Arc<Config>,
        queue: Queue,
        wake: Arc<Notify>,
        cancel: CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
        search: Arc<Search>,
        fs: Arc<Roots>,
    ) -> (State, mpsc::Receiver<Ev>) {
        let (events, rx) = mpsc::channel::<Ev>(EVENT_CHANNEL);
        let st = State {
            cfg,
            queue,
            wake,
            candidates: HashMap::new(),
            watched: Vec::new(),
            missing: Vec::new(),
            polled: Vec::new(),
            polled_dirs: Default::default(),
            limit_warned: false,
            cancel,
            metrics,
            writer_check_warned: false,
            rejected: HashMap::new(),
            known: Arc::default(),
            search,
            links: Arc::default(),
            fs,
            inotify: HashMap::new(),
            skipped: HashSet::new(),
            probes: HashMap::new(),
            warned_missing: HashSet::new(),
            events,
            overflow: Arc::new(AtomicBool::new(false)),
            overflow_wake: Arc::new(Notify::new()),
            ancestors: None,
            wanted: Arc::default(),
            roots_wake: Arc::new(Notify::new()),
            recheck_roots: false,
        };
        (st, rx)
    }

    /// READY before anything that grows with history (watching every folder, loading the known
    /// versions, the first walk): files that arrive meanwhile are found by that first walk, which
    /// adds each folder's watch before it lists the folder.
    async fn start(&mut self, ready: oneshot::Sender<()>) {
        let _ = ready.send(());
        tokio::task::yield_now().await;
        // Every root is asked at once, with patience: one that does not answer (a hung mount at
        // start) is added by a later check once it does, and holds nobody up meanwhile.
        self.missing = self.cfg.watch.paths.clone();
        self.check_roots(true).await;
        self.load_known().await;
        self.rescan_all().await;
        self.evaluate().await;
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: Arc<Config>,
    queue: Queue,
    wake: Arc<Notify>,
    cancel: CancellationToken,
    ready: oneshot::Sender<()>,
    metrics: Arc<crate::metrics::Metrics>,
    search: Arc<Search>,
    fs: Arc<Roots>,
) -> anyhow::Result<()> {
    let (mut st, mut rx) = State::new(
        cfg,
        queue,
        wake,
        cancel.clone(),
        metrics,
        search.clone(),
        fs,
    );
    st.start(ready).await;
    let mut due = Schedule::new(&st.cfg.watch);
    let overflow_wake = st.overflow_wake.clone();
    let roots_wake = st.roots_wake.clone();
    loop {
        let wake_at = due.wake_at(&st.waits());
        tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                // What is already there too: one pass (and one stat call per folder) per burst.
                let mut batch = vec![ev];
                while batch.len() < EVENT_CHANNEL && let Ok(ev) = rx.try_recv() {
                    batch.push(ev);
                }
                st.on_events(batch).await;
            }
            _ = overflow_wake.notified() => {}
            _ = roots_wake.notified() => st.recheck_roots = true,
            _ = search.wake.notified() => due.search_asked(),
            _ = sleep_until(wake_at) => {}
        }
        if st.overflow.swap(false, Ordering::Relaxed) {
            // Events still queued are stale now; the rescan sees the current truth.
            while rx.try_recv().is_ok() {}
            st.on_overflow().await;
        }
        st.run_due(&mut due).await;
        // Each pass may watch a nearer parent of a missing root, after which the root is looked
        // at once more (it may have appeared before that watch); the path is finite.
        for _ in 0..16 {
            if !std::mem::take(&mut st.recheck_roots) {
                break;
            }
            st.check_roots(false).await;
        }
        st.rescan_recovered().await;
        st.evaluate().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_of_picks_the_longest_match() {
        let roots = vec![PathBuf::from("/a"), PathBuf::from("/a/b")];
        assert_eq!(
            root_of(&roots, Path::new("/a/b/c.wav"), true),
            Some(&roots[1])
        );
        assert_eq!(
            root_of(&roots, Path::new("/a/x/c.wav"), true),
            Some(&roots[0])
        );
        assert_eq!(root_of(&roots, Path::new("/z/c.wav"), true), None);
        assert_eq!(root_of(&roots, Path::new("/a"), true), None);
        assert_eq!(root_of(&roots, Path::new("/a/x/c.wav"), false), None);
        assert_eq!(
            root_of(&roots, Path::new("/a/c.wav"), false),
            Some(&roots[0])
        );
    }
}
