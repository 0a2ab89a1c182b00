//! Owns finding recordings: it keeps the set of files we are waiting on until
//! [`crate::completeness`] says they are complete, and queues complete versions in batches. Its
//! parts: the roots' lifecycle (`roots`: watched, missing, gone, back), the walks that list a
//! folder (`scans`: startup, periodic, overflow and search rescans, polled roots and folders), and
//! the file events (`events`: inotify's, bridged by [`crate::watch::bridge`], and the other names
//! of a hard-linked file that changed). This file holds the loop that drives them and the path of
//! a candidate from first sight to the queue.
//!
//! Every file-system call on a watched path (a walk, a watch, a `stat`, a header read) runs on its
//! root's lane ([`crate::watch::lane`]), never on the runtime's thread, and is given up after a
//! deadline: a root on a mount that stops answering is passed over (and rescanned once it answers)
//! while the others go on. The watcher never uploads or changes files; it only reads metadata.

mod events;
mod roots;
mod scans;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

use crate::clock::{ms, now_ms};
use crate::completeness::{
    Decision, Facts, NameRules, NameSkip, Observed, Pending, Stat, Timing, Writers, assess, decide,
    gather_facts, judge, observe,
};
use crate::config::{Config, WatchConfig};
use crate::queue::{Enqueued, NewJob, Queue};
use crate::watch::bridge::Ev;
use crate::watch::inotify::Inotify;
use crate::watch::known::Known;
use crate::watch::links::Links;
use crate::watch::{DEADLINE, Hung, Roots};

pub use crate::watch::known::Search;

const EVENT_CHANNEL: usize = 8192;
const ENQUEUE_BATCH: usize = 2000;
/// While a root check has not been answered (a hung mount) or a root was passed over, the loop
/// looks again this often (a degraded state, not idle).
const ROOT_CHECK: Duration = Duration::from_secs(5);
/// Missing roots are found through an inotify watch on their nearest existing parent; they are
/// also looked for this often (or every `watch.rescan_interval` when set), for what inotify does not
/// report: a file system mounted over the path, a parent on NFS changed from another host.
const MISSING_POLL: Duration = Duration::from_secs(600);
/// Rescan period for a folder that could not get an inotify watch (limit reached).
const FALLBACK_POLL: Duration = Duration::from_secs(10);
/// Searches for recordings that left their queued path (asked for by workers) run at most this
/// often: several missing files at once share one rescan.
const SEARCH_GAP: Duration = Duration::from_secs(5);

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

/// What the loop may have to wake up for, as the state stands (see [`Schedule::wake_at`]).
#[derive(Debug, Clone, Copy, Default)]
struct Waits {
    /// The first candidate to look at again.
    next_eval: Option<Instant>,
    /// Roots polled as a whole (no inotify).
    polled: bool,
    /// Folders polled for want of a watch.
    polled_dirs: bool,
    /// Roots missing: looked for at [`MISSING_POLL`] besides their parent's events.
    missing: bool,
    /// A root check unanswered, or a root passed over: looked at every [`ROOT_CHECK`].
    degraded: bool,
}

/// When each of the loop's duties is next due. Nothing here ticks: each duty has its own
/// deadline, and with nothing to do (every root watched, no candidate, no search) the loop sleeps
/// until the periodic rescan, or for good with rescans off (issue 16).
struct Schedule {
    rescan_every: Option<Duration>,
    /// Roots without inotify (poll_interval > 0) are walked this often; folders out of watches
    /// every FALLBACK_POLL (as documented).
    poll_every: Duration,
    missing_every: Duration,
    next_rescan: Option<Instant>,
    next_poll: Instant,
    next_dir_poll: Instant,
    next_root_check: Instant,
    /// A worker found a job's file gone from its path: rescan soon, so a recording moved inside
    /// the watched folders is found again (and its job follows it) even if its events were lost.
    next_search: Option<Instant>,
    last_search: Instant,
}

impl Schedule {
    fn new(w: &WatchConfig) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        let now = Instant::now();
        let rescan_every = nonzero(w.rescan_interval);
        let poll_every = nonzero(w.poll_interval).unwrap_or(FALLBACK_POLL);
        Schedule {
            rescan_every,
            poll_every,
            missing_every: rescan_every.unwrap_or(MISSING_POLL),
            next_rescan: rescan_every.map(|d| now + d),
            next_poll: now + poll_every,
            next_dir_poll: now + FALLBACK_POLL,
            next_root_check: now + ROOT_CHECK,
            next_search: None,
            last_search: now - SEARCH_GAP,
        }
    }

    fn search_asked(&mut self) {
        self.next_search
            .get_or_insert(self.last_search + SEARCH_GAP);
    }

    /// The first deadline among the duties the state has: the min of them, never a fixed period.
    /// None: nothing is due until an event comes.
    fn wake_at(&self, w: &Waits) -> Option<Instant> {
        let due = [
            w.next_eval,
            self.next_rescan,
            self.next_search,
            w.polled.then_some(self.next_poll),
            w.polled_dirs.then_some(self.next_dir_poll),
            (w.missing || w.degraded).then_some(self.next_root_check),
        ];
        due.into_iter().flatten().min()
    }

    /// After a root check: the next one, if the state needs one.
    fn root_checked(&mut self, now: Instant, w: &Waits) {
        self.next_root_check = now
            + if w.degraded {
                ROOT_CHECK
            } else {
                self.missing_every
            };
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl State {
    fn waits(&self) -> Waits {
        let next_eval = self
            .candidates
            .values()
            .map(|c| c.next_check_ms)
            .min()
            .map(|t| {
                Instant::now() + Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64)
            });
        Waits {
            next_eval,
            polled: !self.polled.is_empty(),
            polled_dirs: !self.polled_dirs.is_empty(),
            missing: !self.missing.is_empty(),
            degraded: !self.probes.is_empty() || !self.skipped.is_empty(),
        }
    }
}

impl State {
    /// The duties that are due: a search, the periodic rescan, polls, the root check.
    async fn run_due(&mut self, s: &mut Schedule) {
        let now = Instant::now();
        if s.next_search.is_some_and(|t| t <= now) {
            debug!("rescan: a queued recording left its path; looking for it");
            s.next_search = None;
            s.last_search = now;
            self.rescan_all().await;
        }
        if s.next_rescan.is_some_and(|t| t <= now) {
            debug!("periodic rescan (watch.rescan_interval)");
            // The roots too: what inotify cannot report (a mount over a root) is seen here.
            self.check_roots(false).await;
            self.rescan_all().await;
            s.next_rescan = s.rescan_every.map(|d| now + d);
        }
        if !self.polled.is_empty() && s.next_poll <= now {
            // Polled roots have no inotify to say they went.
            self.check_roots(false).await;
            for root in self.polled.clone() {
                self.rescan(&root, false).await;
            }
            s.next_poll = now + s.poll_every;
        }
        if !self.polled_dirs.is_empty() && s.next_dir_poll <= now {
            self.poll_dirs().await;
            s.next_dir_poll = now + FALLBACK_POLL;
        }
        let w = self.waits();
        if (w.missing || w.degraded) && s.next_root_check <= now {
            self.check_roots(false).await;
            s.root_checked(now, &self.waits());
        } else if !(w.missing || w.degraded) {
            // A root that goes missing later is looked for a whole period after.
            s.root_checked(now, &w);
        }
    }

    async fn on_overflow(&mut self) {
        self.metrics.watcher_overflow();
        warn!(
            "file event queue overflowed (a burst of files); rescanning every watched folder so nothing is missed"
        );
        self.rescan_all().await;
    }

    /// A file seen (by an event or a walk) as it is now: a candidate, unless it is known and
    /// unchanged, or was judged not a recording as it is.
    fn observe(&mut self, path: PathBuf, root: PathBuf, stat: Stat, now: i64) {
        if let Some(seen) = self.rejected.get(&path) {
            if *seen == stat {
                return;
            }
            self.rejected.remove(&path);
        }
        let prev = self.candidates.get(&path).map(|c| c.obs);
        // An event about a known, unchanged file (a close after reading, a move back, attributes).
        if prev.is_none() && self.known.contains(&path, &stat) && !self.search.wants(&stat) {
            return;
        }
        let note = self.candidates.get(&path).and_then(|c| c.note.clone());
        let obs = observe(prev.as_ref(), stat, now);
        if prev.is_some_and(|p| p.stat != stat) {
            debug!(path = %path.display(), size = stat.size, "still being written");
        }
        let c = Candidate {
            root,
            obs,
            next_check_ms: now,
            note,
        };
        self.candidates.insert(path, c);
    }

    /// Decides every candidate that is due, and queues the complete ones.
    async fn evaluate(&mut self) {
        let now = now_ms();
        let timing = Timing::of(&self.cfg.watch);
        let due: Vec<PathBuf> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.next_check_ms <= now)
            .map(|(p, _)| p.clone())
            .collect();
        let mut looked = self.look_inside(&due, now, timing).await;
        let mut complete: Vec<NewJob> = Vec::new();
        for path in due {
            let Some(mut c) = self.candidates.remove(&path) else {
                continue;
            };
            let looked = looked.remove(&path);
            if let Some(d) = self.decide_due(&mut c, looked, now, timing) {
                self.act(path, c, d, now, &mut complete);
            }
        }
        for chunk in complete.chunks(ENQUEUE_BATCH) {
            self.enqueue(chunk).await;
        }
    }

    /// Due candidates that have been quiet long enough get a look inside, on a fresh descriptor.
    /// That is file I/O (a header read, the open-writer check), 20 µs a file and 2 s for a
    /// backlog of 100,000: done on each root's lane, all roots at once, so a root that does not
    /// answer holds up only its own files (they are not in the answer).
    async fn look_inside(
        &mut self,
        due: &[PathBuf],
        now: i64,
        timing: Timing,
    ) -> HashMap<PathBuf, std::io::Result<(Stat, Facts)>> {
        let mut to_look: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
        for p in due {
            if let Some(c) = self.candidates.get(p)
                && decide(&c.obs, now, timing.settle) == Decision::Complete
            {
                to_look.entry(c.root.clone()).or_default().push(p.clone());
            }
        }
        let jobs = to_look.into_iter().map(|(root, paths)| {
            let fs = self.fs.get(&root);
            async move {
                if fs.hung() {
                    return (root, Err(Hung));
                }
                let r = root.clone();
                let looked = move |beat: &crate::watch::lane::Beat| {
                    let look = |p: PathBuf| {
                        beat.tick();
                        let facts = gather_facts(&r, &p);
                        (p, facts)
                    };
                    paths.into_iter().map(look).collect::<Vec<_>>()
                };
                (root, fs.files.run(looked).await)
            }
        });
        let mut out = HashMap::new();
        for (root, res) in futures_util::future::join_all(jobs).await {
            match res {
                Ok(v) => out.extend(v),
                Err(Hung) => {
                    self.skipped.insert(root);
                }
            }
        }
        out
    }

    /// The decision on a due candidate: its quiet period, then what the look inside it found.
    /// `None`: it is gone (its event forgets it).
    fn decide_due(
        &mut self,
        c: &mut Candidate,
        looked: Option<std::io::Result<(Stat, Facts)>>,
        now: i64,
        timing: Timing,
    ) -> Option<Decision> {
        let quiet = decide(&c.obs, now, timing.settle);
        if quiet != Decision::Complete {
            return Some(quiet);
        }
        let Some(looked) = looked else {
            // Its folder does not answer: looked at again later (and rescanned in full once it
            // answers).
            return Some(Decision::NotYet(DEADLINE, Pending::NoAnswer));
        };
        if let Ok((_, facts)) = &looked
            && let Writers::Unknown(why) = &facts.writers
            && !self.writer_check_warned
        {
            self.writer_check_warned = true;
            warn!(reason = %why, "cannot tell whether a recorder still has files open for writing; relying on the quiet period (watch.settle) and WAV headers");
        }
        let (obs, d) = assess(&c.obs, looked, now, timing)?;
        c.obs = obs;
        Some(d)
    }

    /// Carries a decision out: queue (in the batch `complete`), wait, or pass over until the
    /// file changes.
    fn act(
        &mut self,
        path: PathBuf,
        mut c: Candidate,
        d: Decision,
        now: i64,
        complete: &mut Vec<NewJob>,
    ) {
        match d {
            Decision::Complete | Decision::CompleteAnyway(_) => {
                if let Decision::CompleteAnyway(why) = &d {
                    warn!(path = %path.display(), "uploading a recording that may be truncated: {why} (a recorder that died mid-call?)");
                }
                let s = c.obs.stat;
                complete.push(NewJob {
                    path,
                    root: c.root,
                    size: s.size,
                    mtime_ns: s.mtime_ns,
                    dev: s.dev,
                    ino: s.ino,
                });
            }
            Decision::NotYet(after, why) => {
                say_pending(&path, &mut c, why);
                c.next_check_ms = now + ms(after).max(1);
                self.candidates.insert(path, c);
            }
            Decision::Reject(why) => {
                self.metrics.watch.file_not_queued();
                // Not judged again until it changes (in memory only: a restart looks again).
                self.known.insert(&path, &c.obs.stat);
                if c.obs.stat.size == 0 {
                    debug!(path = %path.display(), reason = %why, "not queued");
                } else {
                    warn!(path = %path.display(), reason = %why, "not queued: not a recording");
                }
                self.rejected.insert(path, c.obs.stat);
            }
        }
    }
}

/// Says why a candidate still waits, once per reason. Settling is the normal course ("still being
/// written" is said on each change) and a folder that does not answer is said by the health task.
fn say_pending(path: &Path, c: &mut Candidate, why: Pending) {
    if matches!(why, Pending::Settling | Pending::NoAnswer) || c.note.as_ref() == Some(&why) {
        return;
    }
    if let Pending::Unreadable(_) = why {
        warn!(path = %path.display(), "{why}");
    } else {
        debug!(path = %path.display(), reason = %why, "not complete yet");
    }
    c.note = Some(why);
}

impl State {
    /// Queues complete versions; retried every second until the database takes them (a full disk
    /// must not lose the discovery).
    async fn enqueue(&mut self, jobs: &[NewJob]) {
        loop {
            match self.queue.enqueue(jobs, now_ms()).await {
                Ok(results) => {
                    let same = self.enqueued(jobs, results);
                    if !same.is_empty() {
                        self.follow_moves(same).await;
                    }
                    return;
                }
                Err(e) => {
                    error!(error = %e, files = jobs.len(), "cannot queue complete files; retrying in 1s");
                    tokio::select! {
                        // Not lost on shutdown: the startup scan finds them again.
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// What the queue made of a batch; returns the files that are a recording already queued
    /// under another path (with that job and path).
    fn enqueued(&mut self, jobs: &[NewJob], results: Vec<Enqueued>) -> Vec<(NewJob, i64, String)> {
        let mut new = 0;
        let mut same = Vec::new();
        for j in jobs {
            let stat = Stat {
                size: j.size,
                mtime_ns: j.mtime_ns,
                dev: j.dev,
                ino: j.ino,
            };
            self.known.insert(&j.path, &stat);
        }
        for (j, r) in jobs.iter().zip(results) {
            match r {
                Enqueued::New {
                    id,
                    supersedes: Some(old),
                } => {
                    new += 1;
                    info!(job_id = id, path = %j.path.display(), size = j.size, previous_job = old,
                        "file changed since it was last queued (appended to?): queued as a new version, to be uploaded as a new interaction");
                }
                Enqueued::New {
                    id,
                    supersedes: None,
                } => {
                    new += 1;
                    // The upload's line is the one at info (one per file).
                    debug!(job_id = id, path = %j.path.display(), size = j.size, "queued");
                }
                Enqueued::SameFile { existing, path } => same.push((j.clone(), existing, path)),
                Enqueued::Known => {}
            }
        }
        if new > 0 {
            self.metrics.files_discovered(new);
            self.wake.notify_waiters();
        }
        same
    }

    /// Files that are a recording already queued under another path (same device, inode, size and
    /// mtime). A hard link leaves the recording at its old path too: nothing to do. A move leaves
    /// nothing there (or another call, a recorder reusing the name): the job, if it still waits,
    /// follows the recording, so it is uploaded from where it is now, on the interaction it may
    /// already have.
    async fn follow_moves(&mut self, same: Vec<(NewJob, i64, String)>) {
        let mut followed = false;
        for (j, existing, old) in same {
            let shown = j.path.display();
            let was = crate::queue::display_path(&old);
            if self.left_its_path(&j, &old).await {
                let new_path = crate::queue::encode_path(&j.path);
                let root = crate::queue::encode_path(&j.root);
                match self
                    .queue
                    .follow_move(existing, &old, &new_path, &root, now_ms())
                    .await
                {
                    Ok(true) => {
                        followed = true;
                        info!(job_id = existing, path = %shown, was = %was,
                            "recording moved while its job waited: the job follows it and uploads it from here");
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // Found again at the next rescan; the worker meanwhile waits for it.
                        warn!(job_id = existing, path = %shown, error = %e, "cannot record that a recording moved");
                        continue;
                    }
                }
            }
            info!(path = %shown, same_as = %was, job_id = existing,
                "same recording as an already queued file (hard link or move): not uploaded again");
        }
        if followed {
            self.wake.notify_waiters();
        }
    }

    /// Whether the recording `j` is no longer at its queued path `old` (stored form), asked on
    /// the old path's root's lane. A folder that does not answer: taken as still there; the
    /// worker finds out once it answers.
    async fn left_its_path(&mut self, j: &NewJob, old: &str) -> bool {
        let old = crate::queue::decode_path(old);
        let root = self.root_for(&old).unwrap_or_else(|| j.root.clone());
        let (dev, ino) = (j.dev, j.ino);
        let fs = self.fs.get(&root);
        let at = old.clone();
        let r = if fs.hung() {
            Err(Hung)
        } else {
            fs.files
                .run(move |_| match std::fs::symlink_metadata(&at) {
                    Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                    Ok(m) => m.dev() != dev || m.ino() != ino,
                })
                .await
        };
        if r == Ok(false) {
            // Two names of one file (a hard link): a change through either must be seen at the
            // other, though the old name's link count was not read when it was queued.
            self.links.pair(&old, &j.path, (dev, ino));
        }
        r.unwrap_or(false)
    }
}

/// The checks a watched file gets, for a file named by hand (`callferry enqueue`).
pub fn check_file(cfg: &Config, path: &Path, now: i64) -> Result<NewJob, String> {
    let abs = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        _ => format!("cannot access: {e}"),
    })?;
    let meta = std::fs::metadata(&abs).map_err(|e| format!("cannot access: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let w = &cfg.watch;
    let root = root_of(&w.paths, &abs, w.recursive)
        .cloned()
        .or_else(|| abs.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    let rel = abs.strip_prefix(&root).unwrap_or(&abs);
    match NameRules::of(w).check(rel) {
        Ok(()) => {}
        Err(NameSkip::Extension) => {
            let all = w.extensions.join(", ");
            return Err(format!(
                "its extension is not one of watch.extensions ({all})"
            ));
        }
        Err(NameSkip::Ignored) => {
            let all = w.ignore.join(", ");
            return Err(format!("it matches a watch.ignore pattern ({all})"));
        }
    }
    let (stat, facts) = gather_facts(&root, &abs).map_err(|e| format!("cannot be read: {e}"))?;
    match judge(&observe(None, stat, now), &facts, now, Timing::of(w)) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: abs,
            root,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_, why) => Err(not_yet_for_enqueue(w, why)),
        Decision::Reject(why) => Err(why),
    }
}

/// What `callferry enqueue` says of a file that is not complete yet, and what to do about it.
fn not_yet_for_enqueue(w: &WatchConfig, why: Pending) -> String {
    let grace = humantime::format_duration(w.orphan_grace);
    match why {
        Pending::WriterOpen => {
            "it is still open for writing by another process; try again later".into()
        }
        Pending::HeaderNotFinal(h) => format!(
            "its header is not final yet ({h}); it is still being recorded, or wait \
             watch.orphan_grace = {grace} to queue it anyway"
        ),
        Pending::HeaderNotWritten => format!(
            "it is too short to hold its header yet; it is still being recorded (after \
             watch.orphan_grace = {grace} with no change it is refused)"
        ),
        Pending::Settling | Pending::Unreadable(_) | Pending::NoAnswer => format!(
            "it is still being written (modified less than watch.settle = {} ago); try again later",
            humantime::format_duration(w.settle)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_cfg(rescan: &str) -> WatchConfig {
        let text = format!(
            "[api]\nbase_url = \"http://127.0.0.1:9/v1\"\ntoken = \"t\"\nallow_insecure_http = true\n\
             [watch]\npaths = [\"/rec\"]\nrescan_interval = \"{rescan}\"\n\
             [queue]\ndatabase = \"/tmp/q.db\"\n"
        );
        crate::config::from_toml_str(&text, &Default::default(), "test")
            .unwrap()
            .watch
    }

    /// Issue 16: the loop slept at most 5 s (the root check) whatever the state. Now it sleeps
    /// until the first of its duties' own deadlines, and for good when it has none.
    #[test]
    fn the_loop_sleeps_until_the_first_deadline_never_a_fixed_period() {
        let now = Instant::now();
        let s = Schedule::new(&watch_cfg("10m"));
        let idle = Waits::default();
        let first = s.wake_at(&idle).expect("the periodic rescan");
        assert_eq!(Some(first), s.next_rescan);
        assert!(first >= now + Duration::from_secs(600), "{:?}", first - now);
        let soon = Waits {
            next_eval: Some(now + Duration::from_secs(3)),
            ..idle
        };
        assert_eq!(s.wake_at(&soon), soon.next_eval);

        let mut off = Schedule::new(&watch_cfg("0s"));
        assert_eq!(
            off.wake_at(&idle),
            None,
            "rescans off, nothing to do: no wake-up"
        );
        // A missing root is looked for at the long fallback period (its parent's events come
        // first); a root check left unanswered (a hung mount) every ROOT_CHECK.
        let missing = Waits {
            missing: true,
            ..idle
        };
        off.root_checked(now, &missing);
        assert_eq!(off.wake_at(&missing), Some(now + MISSING_POLL));
        let degraded = Waits {
            degraded: true,
            ..idle
        };
        off.root_checked(now, &degraded);
        assert_eq!(off.wake_at(&degraded), Some(now + ROOT_CHECK));
        // Folders out of watches are polled; a search is due soon.
        let polled = Waits {
            polled_dirs: true,
            ..idle
        };
        assert_eq!(off.wake_at(&polled), Some(off.next_dir_poll));
        assert!(off.next_dir_poll >= now + FALLBACK_POLL);
        off.search_asked();
        assert_eq!(off.wake_at(&idle), off.next_search);
    }

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
