//! Owns finding recordings: the inotify watches on every folder of every `[watch] path`
//! ([`crate::watch::inotify`]), the bridge of their events into tokio, the startup / periodic /
//! overflow rescans, the polling of folders that got no watch, and the set of files we are waiting
//! on until [`crate::stability`] says they are complete. Complete versions are queued in batches.
//!
//! Every file-system call on a watched path (a walk, a watch, a `stat`, a header read) runs on its
//! root's lane ([`crate::watch::lane`]), never on the runtime's thread, and is given up after a
//! deadline: a root on a mount that stops answering is passed over (and rescanned once it answers)
//! while the others go on (issue 17.1).
//!
//! The bridge is a bounded channel filled with `try_send`: when an event storm fills it, events are
//! dropped and a full rescan is flagged instead, so memory stays bounded and nothing is missed.
//! The watcher never uploads or changes files; it only reads metadata.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

use crate::clock::{ms, now_ms};
use crate::config::{Config, WatchConfig};
use crate::queue::{Enqueued, NewJob, Queue, fingerprint};
use crate::stability::{
    Decision, Facts, NameRules, Observed, Stat, Timing, decide, judge, observe,
};
use crate::watch::inotify::{AddError, Inotify, Raw};
use crate::watch::links::Links;
use crate::watch::{DEADLINE, Hung, Roots};
use crate::writers::Writers;

const EVENT_CHANNEL: usize = 8192;
const ENQUEUE_BATCH: usize = 2000;
/// How often missing watched folders are looked for, and watched ones checked for removal.
const ROOT_CHECK: Duration = Duration::from_secs(5);
/// How long a root check waits for a folder's answer once the folder's lane is on it, before it
/// goes on without it (see `check_roots`).
const PROBE_PATIENCE: Duration = Duration::from_secs(1);
/// Rescan period for a folder that could not get an inotify watch (limit reached).
const FALLBACK_POLL: Duration = Duration::from_secs(10);
/// Searches for recordings that left their queued path (asked for by workers) run at most this
/// often: several missing files at once share one rescan.
const SEARCH_GAP: Duration = Duration::from_secs(5);

/// The fingerprints are already hashes: used as they are.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_i64(&mut self, n: i64) {
        self.0 = n as u64;
    }
}

/// Every file version the queue knows (queued, uploaded, pruned to a fingerprint) or that was
/// judged not a recording, by its version fingerprint (`fingerprint::version`). A rescan skips a
/// known, unchanged file after its one `stat`: no open, no lease probe, no SQL. Before, every
/// rescan opened and lease-checked every file ever uploaded and asked the queue about each
/// (issue 12: 536 ms of CPU per rescan with 20,000 recordings kept). 8 bytes a version, plus the
/// set's slack; shared with the walk on the blocking pool, which takes the lock per lookup.
#[derive(Default)]
struct Known(std::sync::Mutex<HashSet<i64, BuildHasherDefault<IdHasher>>>);

impl Known {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<i64, BuildHasherDefault<IdHasher>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn contains(&self, path: &Path, stat: &Stat) -> bool {
        self.set().contains(&version_of(path, stat))
    }
    fn insert(&self, path: &Path, stat: &Stat) {
        self.set().insert(version_of(path, stat));
    }
}

fn version_of(path: &Path, stat: &Stat) -> i64 {
    fingerprint::version(path.as_os_str().as_bytes(), stat.size, stat.mtime_ns)
}

/// Recordings that workers are looking for: their job's file left its path (moved inside the
/// watched folders?). The watcher's next walk judges a file with one of these identities in full,
/// even if its version is known (a hard link seen earlier, now the only name left), so that the
/// queue sees it again and the job follows it.
#[derive(Default)]
pub struct Search {
    wake: Notify,
    /// (dev, inode, size, mtime).
    wanted: std::sync::Mutex<HashSet<(u64, u64, u64, i64)>>,
}

impl Search {
    fn wanted(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u64, u64, i64)>> {
        self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Asks for a rescan that looks for this job's recording.
    pub fn want(&self, job: &crate::queue::Job) {
        if job.ino != 0 {
            self.wanted()
                .insert((job.dev, job.ino, job.size, job.mtime_ns));
        }
        self.wake.notify_one();
    }
    /// The job found its file, or gave up.
    pub fn done(&self, job: &crate::queue::Job) {
        self.wanted()
            .remove(&(job.dev, job.ino, job.size, job.mtime_ns));
    }
    fn wants(&self, s: &Stat) -> bool {
        let w = self.wanted();
        !w.is_empty() && w.contains(&(s.dev, s.ino, s.size, s.mtime_ns))
    }
}

/// A file we are waiting on.
#[derive(Debug, Clone)]
struct Candidate {
    root: PathBuf,
    obs: Observed,
    observed_at_ms: i64,
    next_check_ms: i64,
    /// Why it is still waiting, last time we said so (to log each reason once).
    note: Option<String>,
}

pub fn stat_of(meta: &std::fs::Metadata) -> Stat {
    Stat {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        dev: meta.dev(),
        ino: meta.ino(),
    }
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

pub fn name_rules(w: &WatchConfig) -> NameRules<'_> {
    NameRules {
        extensions: &w.extensions,
        ignore: &w.ignore_set,
    }
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
}

/// What a root's inotify reader hands the watcher.
#[derive(Debug)]
enum Ev {
    At {
        root: PathBuf,
        path: PathBuf,
        dir: bool,
    },
    /// The kernel dropped this root's events.
    Overflow(PathBuf),
}

/// What one walk (on a root's lane) found.
#[derive(Debug, Default)]
struct Walked {
    /// Candidate recordings: not known, or wanted by a search.
    files: Vec<(PathBuf, Stat)>,
    /// Folders that have a watch now.
    watched: Vec<PathBuf>,
    /// Folders that could not get one: the kernel's watch budget is spent.
    no_watch: Vec<PathBuf>,
    /// Whether the listing is complete (not only the unwatched part of the tree).
    full: bool,
    /// The walked folder is not there (any more).
    gone: bool,
}

/// The inotify descriptor, for tokio's reactor.
struct Fd(Arc<Inotify>);

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Reads a root's inotify descriptor on the runtime (reading it never touches the watched file
/// system) and hands the events over through the bounded channel: when an event storm fills it,
/// events are dropped and a full rescan is flagged instead.
async fn read_events(
    root: PathBuf,
    ino: Arc<Inotify>,
    tx: mpsc::Sender<Ev>,
    overflow: Arc<AtomicBool>,
    overflow_wake: Arc<Notify>,
) {
    // SAFETY: the descriptor stays open as long as the AsyncFd: `Fd` holds the instance that
    // owns it.
    let afd = match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            Fd(ino.clone()),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(std::io::Error::from)
    {
        Ok(a) => a,
        Err(e) => {
            error!(path = %root.display(), error = %e, "cannot read file events; this folder is found by rescans only");
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return;
        };
        loop {
            match ino.read(&mut buf, &mut out) {
                Ok(Some(())) => {
                    if out.len() >= 4096 {
                        break;
                    }
                }
                Ok(None) => {
                    guard.clear_ready();
                    break;
                }
                Err(e) => {
                    error!(path = %root.display(), error = %e, "cannot read file events; this folder is found by rescans only");
                    return;
                }
            }
        }
        for raw in out.drain(..) {
            let ev = match raw {
                Raw::Overflow => Ev::Overflow(root.clone()),
                Raw::At { path, dir } => Ev::At {
                    root: root.clone(),
                    path,
                    dir,
                },
            };
            if tx.try_send(ev).is_err() {
                overflow.store(true, Ordering::Relaxed);
                overflow_wake.notify_one();
            }
        }
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
    let (tx, mut rx) = mpsc::channel::<Ev>(EVENT_CHANNEL);
    let overflow = Arc::new(AtomicBool::new(false));
    let overflow_wake = Arc::new(Notify::new());

    let mut st = State {
        cfg: cfg.clone(),
        queue,
        wake,
        candidates: HashMap::new(),
        watched: Vec::new(),
        missing: Vec::new(),
        polled: Vec::new(),
        polled_dirs: Default::default(),
        limit_warned: false,
        cancel: cancel.clone(),
        metrics,
        writer_check_warned: false,
        rejected: HashMap::new(),
        known: Arc::default(),
        search: search.clone(),
        links: Arc::default(),
        fs,
        inotify: HashMap::new(),
        skipped: HashSet::new(),
        probes: HashMap::new(),
        warned_missing: HashSet::new(),
        events: tx,
        overflow: overflow.clone(),
        overflow_wake: overflow_wake.clone(),
    };
    // READY before anything that grows with history (watching every folder, loading the known
    // versions, the first walk): files that arrive meanwhile are found by that first walk, which
    // adds each folder's watch before it lists the folder.
    let _ = ready.send(());
    tokio::task::yield_now().await;
    // Every root is asked at once, with patience: one that does not answer (a hung mount at
    // start) is added by a later check once it does, and holds nobody up meanwhile.
    st.missing = cfg.watch.paths.clone();
    st.check_roots(true).await;
    st.load_known().await;
    st.rescan_all().await;
    st.evaluate().await;

    let rescan_every = nonzero(cfg.watch.rescan_interval);
    // Roots without inotify (poll_interval > 0) are walked this often; folders out of watches
    // every FALLBACK_POLL (as documented).
    let poll_every = nonzero(cfg.watch.poll_interval).unwrap_or(FALLBACK_POLL);
    let mut next_rescan = rescan_every.map(|d| tokio::time::Instant::now() + d);
    let mut next_poll = tokio::time::Instant::now() + poll_every;
    let mut next_dir_poll = tokio::time::Instant::now() + FALLBACK_POLL;
    let mut next_root_check = tokio::time::Instant::now() + ROOT_CHECK;
    // A worker found a job's file gone from its path: rescan soon, so a recording moved inside the
    // watched folders is found again (and its job follows it) even if its events were lost.
    let mut next_search: Option<tokio::time::Instant> = None;
    let mut last_search = tokio::time::Instant::now() - SEARCH_GAP;

    loop {
        let next_eval = st
            .candidates
            .values()
            .map(|c| c.next_check_ms)
            .min()
            .map(|t| {
                tokio::time::Instant::now()
                    + Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64)
            });
        let mut wake_at = next_root_check;
        for t in [next_eval, next_rescan, next_search].into_iter().flatten() {
            wake_at = wake_at.min(t);
        }
        if !st.polled.is_empty() {
            wake_at = wake_at.min(next_poll);
        }
        if !st.polled_dirs.is_empty() {
            wake_at = wake_at.min(next_dir_poll);
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                // What is already there too: one pass (and one stat call per folder) per burst.
                let mut batch = vec![ev];
                while batch.len() < EVENT_CHANNEL {
                    match rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                st.on_events(batch).await;
            }
            _ = overflow_wake.notified() => {}
            _ = search.wake.notified() => {
                next_search.get_or_insert(last_search + SEARCH_GAP);
            }
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        if overflow.swap(false, Ordering::Relaxed) {
            st.metrics.watcher_overflow();
            warn!(
                "file event queue overflowed (a burst of files); rescanning every watched folder so nothing is missed"
            );
            // Events still queued are stale now; the rescan sees the current truth.
            while rx.try_recv().is_ok() {}
            st.rescan_all().await;
        }
        let now = tokio::time::Instant::now();
        if next_search.is_some_and(|t| t <= now) {
            debug!("rescan: a queued recording left its path; looking for it");
            next_search = None;
            last_search = now;
            st.rescan_all().await;
        }
        if next_rescan.is_some_and(|t| t <= now) {
            debug!("periodic rescan (watch.rescan_interval)");
            st.rescan_all().await;
            next_rescan = rescan_every.map(|d| now + d);
        }
        if !st.polled.is_empty() && next_poll <= now {
            for root in st.polled.clone() {
                st.rescan(&root, false).await;
            }
            next_poll = now + poll_every;
        }
        if !st.polled_dirs.is_empty() && next_dir_poll <= now {
            st.poll_dirs().await;
            next_dir_poll = now + FALLBACK_POLL;
        }
        if next_root_check <= now {
            st.check_roots(false).await;
            next_root_check = now + ROOT_CHECK;
        }
        st.rescan_recovered().await;
        st.evaluate().await;
    }
    Ok(())
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Walks `dir` (below or at `root`) on the root's lane: adds a watch to every folder that has
/// none yet (before its entries are read, so a file created meanwhile has an event or is listed),
/// and lists the recordings that are not known. With `only_unwatched`, folders that have a watch
/// are not listed (their events cover them): how a folder out of watches is polled without a
/// rescan of everything around it.
#[allow(clippy::too_many_arguments)]
fn walk(
    beat: &crate::watch::lane::Beat,
    cfg: &Config,
    root: &Path,
    dir: &Path,
    ino: Option<&Inotify>,
    only_unwatched: bool,
    known: &Known,
    search: &Search,
    links: &Links,
) -> Walked {
    let recursive = cfg.watch.recursive;
    let generation = links.walk_started();
    let rules = name_rules(&cfg.watch);
    let mut out = Walked {
        full: !only_unwatched,
        ..Default::default()
    };
    // A watched folder may itself be a link; a folder below it is not followed, even when it is
    // the one being rescanned (a new folder swapped for a link since).
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .follow_root_links(dir == root)
        .max_depth(if recursive { usize::MAX } else { 1 });
    let watch_dir = |p: &Path, out: &mut Walked| {
        let Some(ino) = ino else { return };
        if ino.is_watched(p) {
            out.watched.push(p.to_path_buf());
            return;
        }
        match ino.add(root, p) {
            Ok(()) => out.watched.push(p.to_path_buf()),
            Err(AddError::Limit) => out.no_watch.push(p.to_path_buf()),
            Err(AddError::NotThere(e)) => {
                debug!(path = %p.display(), error = %e, "no watch: not a folder reached without links (any more)");
            }
        }
    };
    for entry in walker.into_iter().filter_entry(|e| {
        e.depth() == 0
            || !e.file_type().is_dir()
            || (e
                .path()
                .strip_prefix(root)
                // Skip ignored folders (rsync's hidden temp dirs) without descending into them.
                .map(|rel| !rules.ignore.is_match(rel.file_name().unwrap_or_default()))
                .unwrap_or(true)
                && !(only_unwatched && ino.is_some_and(|i| i.is_watched(e.path()))))
    }) {
        beat.tick();
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                if e.depth() == 0 {
                    out.gone = true;
                }
                debug!(error = %e, "scan: skipping an entry");
                continue;
            }
        };
        if entry.depth() == 0 && !entry.file_type().is_dir() {
            out.gone = true;
            continue;
        }
        if entry.file_type().is_dir() {
            if recursive || entry.depth() == 0 {
                watch_dir(entry.path(), &mut out);
            }
            continue;
        }
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        if rules.check(rel).is_err() {
            continue;
        }
        if let Ok(meta) = entry.metadata() {
            let stat = stat_of(&meta);
            links.note(entry.path(), (stat.dev, stat.ino), meta.nlink());
            // Known and unchanged: this stat was its whole cost.
            if !known.contains(entry.path(), &stat) || search.wants(&stat) {
                out.files.push((entry.path().to_path_buf(), stat));
            }
        }
    }
    if out.full {
        links.walked(dir, generation);
    }
    out
}

impl State {
    fn roots(&self) -> Vec<PathBuf> {
        self.watched.iter().chain(&self.polled).cloned().collect()
    }

    /// Whether `root` answers now; None if it does not (passed over, rescanned once it does).
    async fn is_dir(&mut self, root: &Path) -> Option<bool> {
        let fs = self.fs.get(root);
        let r = root.to_path_buf();
        match fs.scan.run(move |_| r.is_dir()).await {
            Ok(b) => Some(b),
            Err(Hung) => {
                self.skipped.insert(root.to_path_buf());
                None
            }
        }
    }

    /// Starts watching a root: its inotify instance and reader. The watches themselves are added
    /// by the walk that follows (`rescan`), on the root's lane.
    async fn add_root(&mut self, root: PathBuf) {
        match self.is_dir(&root).await {
            Some(true) => {}
            Some(false) => {
                if self.warned_missing.insert(root.clone()) {
                    warn!(path = %root.display(), "watched folder does not exist (yet) or is not a folder; waiting for it (checked every {}s)", ROOT_CHECK.as_secs());
                }
                self.missing.push(root);
                return;
            }
            None => {
                // Said by the health task; looked at again every ROOT_CHECK.
                self.missing.push(root);
                return;
            }
        }
        if !self.cfg.watch.poll_interval.is_zero() {
            info!(path = %root.display(), every = ?self.cfg.watch.poll_interval, "polling (watch.poll_interval > 0; no inotify)");
            self.polled.push(root);
            return;
        }
        match Inotify::new() {
            Ok(ino) => {
                let ino = Arc::new(ino);
                let reader = tokio::spawn(read_events(
                    root.clone(),
                    ino.clone(),
                    self.events.clone(),
                    self.overflow.clone(),
                    self.overflow_wake.clone(),
                ));
                self.inotify
                    .insert(root.clone(), (ino, AbortOnDropHandle::new(reader)));
                info!(path = %root.display(), "watching");
                self.watched.push(root);
            }
            Err(e) => {
                error!(path = %root.display(), error = %e, "cannot watch folder (out of inotify instances? raise fs.inotify.max_user_instances); polling it every {}s instead", FALLBACK_POLL.as_secs());
                self.polled.push(root);
            }
        }
    }

    fn drop_root(&mut self, r: &Path) {
        self.watched.retain(|x| x != r);
        self.polled.retain(|x| x != r);
        // Closing the instance drops every watch in it.
        self.inotify.remove(r);
        self.candidates.retain(|p, _| !p.starts_with(r));
        self.rejected.retain(|p, _| !p.starts_with(r));
        self.polled_dirs.retain(|p| !p.starts_with(r));
        self.metrics
            .watch
            .set_polled_folders(self.polled_dirs.len());
    }

    /// Folders that vanished: stop watching, wait for them to return; missing ones: watch them
    /// once they are there. Each root is asked on its lane; an answer that does not come within
    /// [`PROBE_PATIENCE`] is collected at a later check, so a folder that starts hanging while
    /// idle never holds the watcher up (its lane is then reported by the health task).
    async fn check_roots(&mut self, startup: bool) {
        let all: Vec<PathBuf> = self
            .roots()
            .into_iter()
            .chain(self.missing.iter().cloned())
            .collect();
        for r in &all {
            if !self.probes.contains_key(r) {
                let fs = self.fs.get(r);
                let p = r.clone();
                let h = tokio::spawn(async move { fs.scan.run(move |_| p.is_dir()).await });
                self.probes.insert(r.clone(), AbortOnDropHandle::new(h));
            }
        }
        // A probe not started yet (its lane's thread not scheduled, on a loaded machine) is
        // waited for; one that started and has blocked for PROBE_PATIENCE is left pending.
        let until = tokio::time::Instant::now() + DEADLINE;
        while tokio::time::Instant::now() < until
            && self.probes.iter().any(|(r, h)| {
                !h.is_finished()
                    && self
                        .fs
                        .get(r)
                        .scan
                        .busy_for()
                        .is_none_or(|d| d < PROBE_PATIENCE)
            })
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let done: Vec<PathBuf> = self
            .probes
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(r, _)| r.clone())
            .collect();
        for r in done {
            let Some(h) = self.probes.remove(&r) else {
                continue;
            };
            let answer = h.await.unwrap_or(Err(Hung));
            let missing = self.missing.contains(&r);
            match answer {
                Err(Hung) => {
                    self.skipped.insert(r);
                }
                Ok(true) if missing => {
                    self.missing.retain(|m| *m != r);
                    // At start, the first full scan (after the known versions are loaded)
                    // walks it.
                    if !startup && !self.warned_missing.contains(&r) {
                        info!(path = %r.display(), "watched folder answers; watching it");
                    } else if !startup {
                        info!(path = %r.display(), "watched folder is there now");
                    }
                    self.warned_missing.remove(&r);
                    self.add_root(r.clone()).await;
                    if !startup && !self.missing.contains(&r) {
                        self.rescan(&r, false).await;
                    }
                }
                Ok(false) if missing => {
                    if self.warned_missing.insert(r.clone()) {
                        warn!(path = %r.display(), "watched folder does not exist (yet) or is not a folder; waiting for it (checked every {}s)", ROOT_CHECK.as_secs());
                    }
                }
                Ok(false) if self.roots().contains(&r) => {
                    warn!(path = %r.display(), "watched folder disappeared; waiting for it to come back");
                    self.drop_root(&r);
                    self.warned_missing.insert(r.clone());
                    self.missing.push(r);
                }
                Ok(_) => {}
            }
        }
    }

    /// Roots passed over while they did not answer, rescanned in full now that they do.
    async fn rescan_recovered(&mut self) {
        if self.skipped.is_empty() {
            return;
        }
        let back: Vec<PathBuf> = self
            .skipped
            .iter()
            .filter(|r| !self.fs.get(r).hung())
            .cloned()
            .collect();
        for r in back {
            self.skipped.remove(&r);
            if self.roots().contains(&r) {
                self.rescan(&r, false).await;
            }
        }
    }

    /// Loads the fingerprints of every version the queue knows, in one pass; retried until the
    /// database answers (a file found meanwhile is simply judged in full, as before).
    async fn load_known(&mut self) {
        loop {
            match self.queue.known_fingerprints().await {
                Ok(v) => {
                    let n = v.len();
                    self.known.set().extend(v);
                    debug!(versions = n, "known versions loaded");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "cannot load the known file versions; retrying in 1s");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// A walk of `dir` on its root's lane, as a future that borrows nothing (several run at once).
    fn walk_job(
        &self,
        root: &Path,
        dir: &Path,
        only_unwatched: bool,
    ) -> impl std::future::Future<Output = Result<Walked, Hung>> + use<> {
        let fs = self.fs.get(root);
        let cfg = self.cfg.clone();
        let root = root.to_path_buf();
        let dir = dir.to_path_buf();
        let ino = self.inotify.get(&root).map(|(i, _)| i.clone());
        let known = self.known.clone();
        let search = self.search.clone();
        let links = self.links.clone();
        async move {
            if fs.hung() {
                return Err(Hung);
            }
            fs.scan
                .run(move |beat| {
                    walk(
                        beat,
                        &cfg,
                        &root,
                        &dir,
                        ino.as_deref(),
                        only_unwatched,
                        &known,
                        &search,
                        &links,
                    )
                })
                .await
        }
    }

    async fn rescan_all(&mut self) {
        self.metrics.watcher_rescan();
        let roots = self.roots();
        let jobs: Vec<_> = roots.iter().map(|r| self.walk_job(r, r, false)).collect();
        let results = futures_util::future::join_all(jobs).await;
        for (root, res) in roots.into_iter().zip(results) {
            match res {
                Ok(w) => self.apply_walk(&root, &root, w),
                Err(Hung) => {
                    self.skipped.insert(root);
                }
            }
        }
        self.metrics.watch.scan_done();
    }

    /// Walks a folder (on its root's lane) and observes every recording in it.
    async fn rescan(&mut self, dir: &Path, only_unwatched: bool) {
        let Some(root) = self.root_for(dir) else {
            return;
        };
        match self.walk_job(&root, dir, only_unwatched).await {
            Ok(w) => self.apply_walk(&root, dir, w),
            Err(Hung) => {
                self.skipped.insert(root);
            }
        }
    }

    fn root_for(&self, dir: &Path) -> Option<PathBuf> {
        let roots = self.roots();
        root_of(&roots, dir, self.cfg.watch.recursive)
            .cloned()
            .or_else(|| roots.into_iter().find(|r| r == dir))
    }

    fn apply_walk(&mut self, root: &Path, scanned: &Path, w: Walked) {
        if w.full && !self.rejected.is_empty() {
            let present: HashSet<&PathBuf> = w.files.iter().map(|(p, _)| p).collect();
            self.rejected
                .retain(|p, _| !p.starts_with(scanned) || present.contains(p));
        }
        let now = now_ms();
        for (path, stat) in w.files {
            self.observe(path, root.to_path_buf(), stat, now);
        }
        let before = self.polled_dirs.len();
        if w.gone {
            self.polled_dirs.retain(|p| !p.starts_with(scanned));
        }
        for d in &w.watched {
            self.polled_dirs.remove(d);
        }
        let mut new = 0;
        for d in w.no_watch {
            if self.polled_dirs.insert(d) {
                new += 1;
            }
        }
        if new > 0 && !self.limit_warned {
            self.limit_warned = true;
            warn!(
                folders = self.polled_dirs.len(),
                "out of inotify watches: raise the limit, e.g. `sysctl fs.inotify.max_user_watches=524288` (and persist it in /etc/sysctl.d/). Until then each folder without a watch is polled every {}s",
                FALLBACK_POLL.as_secs()
            );
        }
        if self.polled_dirs.len() != before {
            self.metrics
                .watch
                .set_polled_folders(self.polled_dirs.len());
        }
    }

    /// Folders without a watch: each is listed (and given a watch if one is free now), without
    /// the folders around it that have one. A folder below another polled one is covered by it.
    async fn poll_dirs(&mut self) {
        let dirs: Vec<PathBuf> = self.polled_dirs.iter().cloned().collect();
        let top: Vec<PathBuf> = dirs
            .iter()
            .filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o)))
            .cloned()
            .collect();
        for d in top {
            let Some(root) = self
                .root_for(&d)
                .or_else(|| self.roots().into_iter().find(|r| d.starts_with(r)))
            else {
                self.polled_dirs.remove(&d);
                continue;
            };
            match self.walk_job(&root, &d, true).await {
                Ok(w) => self.apply_walk(&root, &d, w),
                Err(Hung) => {
                    self.skipped.insert(root);
                }
            }
        }
        self.metrics
            .watch
            .set_polled_folders(self.polled_dirs.len());
    }

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
        self.candidates.insert(
            path,
            Candidate {
                root,
                obs,
                observed_at_ms: now,
                next_check_ms: now,
                note,
            },
        );
    }

    /// A burst of file events: each root's paths are looked at in one call on its lane.
    async fn on_events(&mut self, batch: Vec<Ev>) {
        let mut by_root: Vec<(PathBuf, Vec<(PathBuf, bool)>)> = Vec::new();
        let mut overflowed: Vec<PathBuf> = Vec::new();
        for ev in batch {
            match ev {
                Ev::Overflow(root) => {
                    if !overflowed.contains(&root) {
                        overflowed.push(root);
                    }
                }
                Ev::At { root, path, dir } => {
                    let i = match by_root.iter().position(|(r, _)| *r == root) {
                        Some(i) => i,
                        None => {
                            by_root.push((root, Vec::new()));
                            by_root.len() - 1
                        }
                    };
                    let paths = &mut by_root[i].1;
                    match paths.iter_mut().find(|(p, _)| *p == path) {
                        Some((_, d)) => *d |= dir,
                        None => paths.push((path, dir)),
                    }
                }
            }
        }
        for root in &overflowed {
            self.metrics.watcher_overflow();
            warn!(path = %root.display(), "the kernel dropped file events; rescanning the folder");
            self.rescan(root, false).await;
        }
        let recursive = self.cfg.watch.recursive;
        let mut relinked: Vec<PathBuf> = Vec::new();
        for (root, paths) in by_root {
            if overflowed.contains(&root) || !self.watched.contains(&root) {
                continue;
            }
            let fs = self.fs.get(&root);
            if fs.hung() {
                self.skipped.insert(root);
                continue;
            }
            let looked = fs
                .files
                .run(move |beat| {
                    paths
                        .into_iter()
                        .map(|(p, dir)| {
                            beat.tick();
                            let m = std::fs::symlink_metadata(&p);
                            (p, dir, m)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
            let Ok(looked) = looked else {
                self.skipped.insert(root);
                continue;
            };
            let ino = self.inotify.get(&root).map(|(i, _)| i.clone());
            for (path, was_dir, meta) in looked {
                if path == root {
                    // The root itself (moved, deleted): check_roots decides.
                    continue;
                }
                match meta {
                    Ok(meta) if meta.is_dir() => {
                        // A new folder (e.g. today's date folder), or one moved in: watched
                        // and listed by one walk; the watch comes first, so nothing that lands
                        // in it meanwhile is missed.
                        if recursive
                            && ino.as_ref().is_some_and(|i| !i.is_watched(&path))
                            && !self.polled_dirs.contains(&path)
                        {
                            self.rescan(&path, false).await;
                        }
                    }
                    Ok(meta) if meta.is_file() => {
                        let Ok(rel) = path.strip_prefix(&root) else {
                            continue;
                        };
                        if name_rules(&self.cfg.watch).check(rel).is_err() {
                            continue;
                        }
                        let stat = stat_of(&meta);
                        relinked.extend(self.relinked(&path, Some((stat, meta.nlink()))));
                        self.observe(path, root.clone(), stat, now_ms());
                    }
                    other => {
                        if was_dir {
                            self.links.forget_under(&path);
                        } else {
                            relinked.extend(self.relinked(&path, None));
                        }
                        if was_dir && let Some(i) = &ino {
                            // Moved away, deleted, or swapped for a link: its watches (and
                            // those below it) no longer describe this path.
                            i.forget_under(&path);
                            self.polled_dirs.retain(|p| !p.starts_with(&path));
                        }
                        if other.is_err() {
                            // Gone (renamed away, deleted): forget it and anything below it.
                            if self.candidates.remove(&path).is_none() {
                                self.candidates.retain(|p, _| !p.starts_with(&path));
                            }
                            if self.rejected.remove(&path).is_none() {
                                self.rejected.retain(|p, _| !p.starts_with(&path));
                            }
                        }
                    }
                }
            }
        }
        if !relinked.is_empty() {
            relinked.sort();
            relinked.dedup();
            self.recheck(relinked).await;
        }
    }

    /// The other names of the file `path` was and of the one it is `now`, to look at too: a
    /// change made through one hard link raises an event under that name only. Notes what `path`
    /// is now.
    fn relinked(&self, path: &Path, now: Option<(Stat, u64)>) -> Vec<PathBuf> {
        let mut inodes = Vec::with_capacity(2);
        inodes.extend(self.links.inode_of(path));
        match now {
            Some((s, nlink)) => {
                if nlink > 1 {
                    inodes.push((s.dev, s.ino));
                }
                self.links.note(path, (s.dev, s.ino), nlink);
            }
            None => self.links.forget(path),
        }
        if inodes.is_empty() {
            return Vec::new();
        }
        self.links.others(path, &inodes)
    }

    /// Looks again at names of files that changed under another name: one `stat` each, on its
    /// root's lane. A changed one becomes a candidate, as if its own event had come.
    async fn recheck(&mut self, paths: Vec<PathBuf>) {
        let mut by_root: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
        for p in paths {
            match self.root_for(&p) {
                Some(r) => by_root.entry(r).or_default().push(p),
                None => self.links.forget(&p),
            }
        }
        for (root, paths) in by_root {
            let fs = self.fs.get(&root);
            if fs.hung() {
                self.skipped.insert(root);
                continue;
            }
            let looked = fs
                .files
                .run(move |beat| {
                    paths
                        .into_iter()
                        .map(|p| {
                            beat.tick();
                            let m = std::fs::symlink_metadata(&p);
                            (p, m)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
            let Ok(looked) = looked else {
                self.skipped.insert(root);
                continue;
            };
            let now = now_ms();
            for (path, meta) in looked {
                match meta {
                    Ok(m) if m.is_file() => {
                        let stat = stat_of(&m);
                        self.links.note(&path, (stat.dev, stat.ino), m.nlink());
                        debug!(path = %path.display(), "looked at again: another name of a file that changed");
                        self.observe(path, root.clone(), stat, now);
                    }
                    _ => self.links.forget(&path),
                }
            }
        }
    }

    /// Decides every candidate that is due, and queues the complete ones.
    async fn evaluate(&mut self) {
        let now = now_ms();
        let timing = Timing {
            settle: self.cfg.watch.settle,
            orphan_grace: self.cfg.watch.orphan_grace,
        };
        let mut complete: Vec<NewJob> = Vec::new();
        let due: Vec<PathBuf> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.next_check_ms <= now)
            .map(|(p, _)| p.clone())
            .collect();
        // Quiet long enough: now look inside each, on a fresh descriptor. That is file I/O (a
        // header read, the open-writer check), 20 µs a file and 2 s for a backlog of 100,000:
        // done on each root's lane, all roots at once, so a root that does not answer holds up
        // only its own files.
        let mut to_look: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
        for p in &due {
            if let Some(c) = self.candidates.get(p)
                && matches!(decide(&c.obs, now, timing.settle), Decision::Complete)
            {
                to_look.entry(c.root.clone()).or_default().push(p.clone());
            }
        }
        let mut looked: HashMap<PathBuf, std::io::Result<(Stat, Facts)>> = HashMap::new();
        let mut hung: HashSet<PathBuf> = HashSet::new();
        if !to_look.is_empty() {
            let jobs = to_look.into_iter().map(|(root, paths)| {
                let fs = self.fs.get(&root);
                async move {
                    if fs.hung() {
                        return (root, Err(Hung));
                    }
                    let r = root.clone();
                    let res = fs
                        .files
                        .run(move |beat| {
                            paths
                                .into_iter()
                                .map(|p| {
                                    beat.tick();
                                    let facts = gather_facts(&r, &p);
                                    (p, facts)
                                })
                                .collect::<Vec<_>>()
                        })
                        .await;
                    (root, res)
                }
            });
            for (root, res) in futures_util::future::join_all(jobs).await {
                match res {
                    Ok(v) => looked.extend(v),
                    Err(Hung) => {
                        hung.insert(root);
                    }
                }
            }
        }
        for root in &hung {
            self.skipped.insert(root.clone());
        }
        for path in due {
            let Some(mut c) = self.candidates.remove(&path) else {
                continue;
            };
            let decision = match decide(&c.obs, now, timing.settle) {
                Decision::Complete => {
                    let Some(gathered) = looked.remove(&path) else {
                        // Its folder does not answer: looked at again later (and rescanned in
                        // full once it answers).
                        c.next_check_ms = now + ms(DEADLINE);
                        self.candidates.insert(path, c);
                        continue;
                    };
                    match gathered {
                        Ok((stat, facts)) => {
                            c.obs = observe(Some(&c.obs), stat, now);
                            c.observed_at_ms = now;
                            if let Writers::Unknown(why) = &facts.writers
                                && !self.writer_check_warned
                            {
                                self.writer_check_warned = true;
                                warn!(reason = %why, "cannot tell whether a recorder still has files open for writing; relying on the quiet period (watch.settle) and WAV headers");
                            }
                            let d = judge(&c.obs, &facts, now, timing);
                            if let Decision::NotYet(_) = d {
                                let why = match (&facts.writers, &facts.header) {
                                    (Writers::Present, _) => {
                                        "still open for writing by another process".to_string()
                                    }
                                    (_, crate::audio::Header::Inconsistent(w)) => {
                                        format!("header not final yet: {w}")
                                    }
                                    (_, crate::audio::Header::TooShort) => {
                                        "header not written yet".to_string()
                                    }
                                    _ => "waiting".to_string(),
                                };
                                if c.note.as_deref() != Some(why.as_str()) {
                                    debug!(path = %path.display(), reason = %why, "not complete yet");
                                    c.note = Some(why);
                                }
                            }
                            d
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        // Replaced by a FIFO, a folder or a link: no longer a recording here.
                        Err(e) if crate::safefs::not_regular_reason(&e).is_some() => {
                            Decision::Reject(
                                crate::safefs::not_regular_reason(&e)
                                    .unwrap_or_default()
                                    .to_string(),
                            )
                        }
                        Err(e) => {
                            let why = format!("cannot read it: {e}; will try again");
                            if c.note.as_deref() != Some(why.as_str()) {
                                warn!(path = %path.display(), "{why}");
                                c.note = Some(why);
                            }
                            Decision::NotYet(timing.settle.max(Duration::from_secs(1)))
                        }
                    }
                }
                d => d,
            };
            match decision {
                Decision::Complete | Decision::CompleteAnyway(_) => {
                    if let Decision::CompleteAnyway(why) = &decision {
                        warn!(path = %path.display(), "uploading a recording that may be truncated: {why} (a recorder that died mid-call?)");
                    }
                    complete.push(NewJob {
                        path,
                        root: c.root,
                        size: c.obs.stat.size,
                        mtime_ns: c.obs.stat.mtime_ns,
                        dev: c.obs.stat.dev,
                        ino: c.obs.stat.ino,
                    });
                }
                Decision::NotYet(d) => {
                    c.next_check_ms = now + ms(d).max(1);
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
        for chunk in complete.chunks(ENQUEUE_BATCH) {
            self.enqueue(chunk).await;
        }
    }

    async fn enqueue(&mut self, jobs: &[NewJob]) {
        loop {
            match self.queue.enqueue(jobs, now_ms()).await {
                Ok(results) => {
                    let mut new = 0;
                    let mut same: Vec<(NewJob, i64, String)> = Vec::new();
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
                            Enqueued::SameFile { existing, path } => {
                                same.push((j.clone(), existing, path));
                            }
                            Enqueued::Known => {}
                        }
                    }
                    if new > 0 {
                        self.metrics.files_discovered(new);
                        self.wake.notify_waiters();
                    }
                    if !same.is_empty() {
                        self.follow_moves(same).await;
                    }
                    return;
                }
                Err(e) => {
                    // Keep the batch: a full disk must not lose the discovery. Retry until it works.
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
}

impl State {
    /// Files that are a recording already queued under another path (same device, inode, size and
    /// mtime). A hard link leaves the recording at its old path too: nothing to do. A move leaves
    /// nothing there (or another call, a recorder reusing the name): the job, if it still waits,
    /// follows the recording, so it is uploaded from where it is now, on the interaction it may
    /// already have.
    async fn follow_moves(&mut self, same: Vec<(NewJob, i64, String)>) {
        // Whether each old path still holds the recording, asked on the old path's root's lane.
        let mut left = Vec::with_capacity(same.len());
        for (j, _, old) in &same {
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
                // Two names of one file (a hard link): a change through either must be seen at
                // the other, though the old name's link count was not read when it was queued.
                self.links.pair(&old, &j.path, (dev, ino));
            }
            // Not answering: taken as still there; the worker finds out once it answers.
            left.push(r.unwrap_or(false));
        }
        let mut followed = false;
        for ((j, existing, old), left) in same.into_iter().zip(left) {
            let new_path = crate::queue::encode_path(&j.path);
            let shown = j.path.display();
            let was = crate::queue::display_path(&old);
            if left {
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
}

/// Looks inside a quiet file: a fresh stat of the opened descriptor, its header, and whether any
/// process has it open for writing. Opens read-only, without following links below `root` and
/// only a regular file (see [`crate::safefs`]); never modifies anything.
pub fn gather_facts(root: &Path, path: &Path) -> std::io::Result<(Stat, Facts)> {
    use std::io::Read;
    let f = crate::safefs::open_beneath(root, path)?;
    let meta = f.metadata()?;
    let stat = stat_of(&meta);
    let writers = crate::writers::check(&f);
    let mut head = Vec::with_capacity(crate::audio::HEAD_LEN);
    f.take(crate::audio::HEAD_LEN as u64)
        .read_to_end(&mut head)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let header = crate::audio::inspect(&ext, &head, stat.size);
    Ok((stat, Facts { header, writers }))
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
    let root = root_of(&cfg.watch.paths, &abs, cfg.watch.recursive)
        .cloned()
        .or_else(|| abs.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    let rel = abs.strip_prefix(&root).unwrap_or(&abs);
    match name_rules(&cfg.watch).check(rel) {
        Ok(()) => {}
        Err(crate::stability::NameSkip::Extension) => {
            return Err(format!(
                "its extension is not one of watch.extensions ({})",
                cfg.watch.extensions.join(", ")
            ));
        }
        Err(crate::stability::NameSkip::Ignored) => {
            return Err(format!(
                "it matches a watch.ignore pattern ({})",
                cfg.watch.ignore.join(", ")
            ));
        }
    }
    let (stat, facts) = gather_facts(&root, &abs).map_err(|e| format!("cannot be read: {e}"))?;
    let _ = meta;
    let obs = observe(None, stat, now);
    let timing = Timing {
        settle: cfg.watch.settle,
        orphan_grace: cfg.watch.orphan_grace,
    };
    match judge(&obs, &facts, now, timing) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: abs,
            root,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_) if facts.writers == Writers::Present => {
            Err("it is still open for writing by another process; try again later".into())
        }
        Decision::NotYet(_) if matches!(facts.header, crate::audio::Header::Inconsistent(_)) => {
            Err(format!(
                "its header is not final yet ({:?}); it is still being recorded, or wait \
                 watch.orphan_grace = {} to queue it anyway",
                facts.header,
                humantime::format_duration(cfg.watch.orphan_grace)
            ))
        }
        Decision::NotYet(_) => Err(format!(
            "it is still being written (modified less than watch.settle = {} ago); try again later",
            humantime::format_duration(cfg.watch.settle)
        )),
        Decision::Reject(why) => Err(why),
    }
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
