//! Owns finding recordings: the `notify` watches on every `[watch] path`, the bridge of their events
//! into tokio, the startup / periodic / overflow rescans, and the set of files we are waiting on
//! until [`crate::stability`] says they are complete. Complete versions are queued in batches.
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

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::{ms, now_ms};
use crate::config::{Config, WatchConfig};
use crate::queue::{Enqueued, NewJob, Queue, fingerprint};
use crate::stability::{
    Decision, Facts, NameRules, Observed, Stat, Timing, decide, judge, observe,
};
use crate::writers::Writers;

const EVENT_CHANNEL: usize = 8192;
const ENQUEUE_BATCH: usize = 2000;
/// How often missing watched folders are looked for, and watched ones checked for removal.
const ROOT_CHECK: Duration = Duration::from_secs(5);
/// Rescan period for a folder that could not get an inotify watch (limit reached).
const FALLBACK_POLL: Duration = Duration::from_secs(10);
/// Follow-up scans of a new folder, in ms after its creation event (see `on_event`).
const NEW_FOLDER_RESCANS: [i64; 2] = [250, 2000];
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
    /// Roots with a live watch.
    watched: Vec<PathBuf>,
    /// Roots that do not exist (yet).
    missing: Vec<PathBuf>,
    /// Roots that exist but could not be watched (inotify limit): polled.
    polled: Vec<PathBuf>,
    cancel: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
    /// The open-writer check could not run; said once.
    writer_check_warned: bool,
    /// New folders to look into again: (when, unix ms; folder).
    dir_rescans: Vec<(i64, PathBuf)>,
    /// Files judged not to be recordings, as they were then. Said once: a poll or rescan that
    /// finds one unchanged passes over it (a polled folder used to repeat the warning for every
    /// such file at every poll). A change makes it a candidate again. Entries go when the file does.
    rejected: HashMap<PathBuf, Stat>,
    known: Arc<Known>,
    search: Arc<Search>,
}

pub async fn run(
    cfg: Arc<Config>,
    queue: Queue,
    wake: Arc<Notify>,
    cancel: CancellationToken,
    ready: oneshot::Sender<()>,
    metrics: Arc<crate::metrics::Metrics>,
    search: Arc<Search>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<notify::Result<notify::Event>>(EVENT_CHANNEL);
    let overflow = Arc::new(AtomicBool::new(false));
    let overflow_wake = Arc::new(Notify::new());
    let mut watcher = {
        let overflow = overflow.clone();
        let overflow_wake = overflow_wake.clone();
        // Links below a watched folder are never followed: a symbolic link to a folder outside
        // the tree must not bring that folder's files in (the root itself may be a link).
        let handler = move |res: notify::Result<notify::Event>| {
            // Opens say nothing about a file's content, and most are our own (header checks,
            // lease probes, uploads). Dropped here, before the bounded channel: otherwise reading
            // ~10k files fills it, the overflow triggers a rescan, the rescan reads every file
            // again, and the daemon loops at 100 % CPU (found by callferry-bench's idle run).
            if res.as_ref().is_ok_and(|ev| {
                matches!(
                    ev.kind,
                    EventKind::Access(notify::event::AccessKind::Open(_))
                )
            }) {
                return;
            }
            if tx.try_send(res).is_err() {
                overflow.store(true, Ordering::Relaxed);
                overflow_wake.notify_one();
            }
        };
        notify::RecommendedWatcher::new(
            handler,
            notify::Config::default().with_follow_symlinks(false),
        )?
    };

    let mut st = State {
        cfg: cfg.clone(),
        queue,
        wake,
        candidates: HashMap::new(),
        watched: Vec::new(),
        missing: Vec::new(),
        polled: Vec::new(),
        cancel: cancel.clone(),
        metrics,
        writer_check_warned: false,
        dir_rescans: Vec::new(),
        rejected: HashMap::new(),
        known: Arc::default(),
        search: search.clone(),
    };
    // READY before anything that grows with history (watching every folder, loading the known
    // versions, the first walk): files that arrive meanwhile are found by that first walk, which
    // starts after the watches exist.
    let _ = ready.send(());
    // Lets the daemon announce READY before the watches are added (notify walks every folder).
    tokio::task::yield_now().await;
    for root in &cfg.watch.paths {
        st.add_root(&mut watcher, root.clone());
    }
    st.load_known().await;
    st.rescan_all().await;
    st.evaluate().await;

    let rescan_every = nonzero(cfg.watch.rescan_interval);
    // Folders without inotify (poll_interval > 0, or out of watches) are walked this often.
    let poll_every = nonzero(cfg.watch.poll_interval).unwrap_or(FALLBACK_POLL);
    let mut next_rescan = rescan_every.map(|d| tokio::time::Instant::now() + d);
    let mut next_poll = tokio::time::Instant::now() + poll_every;
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
        let next_dir_rescan = st.dir_rescans.iter().map(|(t, _)| *t).min().map(|t| {
            tokio::time::Instant::now()
                + Duration::from_millis((t - now_ms()).clamp(0, 60_000) as u64)
        });
        let mut wake_at = next_root_check;
        for t in [next_eval, next_rescan, next_dir_rescan, next_search]
            .into_iter()
            .flatten()
        {
            wake_at = wake_at.min(t);
        }
        if !st.polled.is_empty() {
            wake_at = wake_at.min(next_poll);
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                st.on_event(ev).await;
                // Drain what is already there before evaluating: one batch per burst.
                while let Ok(ev) = rx.try_recv() {
                    st.on_event(ev).await;
                }
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
                st.rescan(&root).await;
            }
            next_poll = now + poll_every;
        }
        if next_root_check <= now {
            st.check_roots(&mut watcher).await;
            next_root_check = now + ROOT_CHECK;
        }
        let wall = now_ms();
        if st.dir_rescans.iter().any(|(t, _)| *t <= wall) {
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut st.dir_rescans)
                .into_iter()
                .partition(|(t, _)| *t <= wall);
            st.dir_rescans = later;
            let mut dirs: Vec<PathBuf> = due.into_iter().map(|(_, d)| d).collect();
            dirs.sort();
            dirs.dedup();
            for d in dirs {
                if d.is_dir() {
                    st.rescan(&d).await;
                }
            }
        }
        st.evaluate().await;
    }
    Ok(())
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl State {
    fn roots(&self) -> Vec<PathBuf> {
        self.watched.iter().chain(&self.polled).cloned().collect()
    }

    fn add_root(&mut self, watcher: &mut notify::RecommendedWatcher, root: PathBuf) {
        if !root.is_dir() {
            warn!(path = %root.display(), "watched folder does not exist (yet) or is not a folder; waiting for it (checked every {}s)", ROOT_CHECK.as_secs());
            self.missing.push(root);
            return;
        }
        if !self.cfg.watch.poll_interval.is_zero() {
            info!(path = %root.display(), every = ?self.cfg.watch.poll_interval, "polling (watch.poll_interval > 0; no inotify)");
            self.polled.push(root);
            return;
        }
        let mode = if self.cfg.watch.recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        match watcher.watch(&root, mode) {
            Ok(()) => {
                info!(path = %root.display(), "watching");
                self.watched.push(root);
            }
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
                    || e.to_string().contains("No space left")
                {
                    error!(path = %root.display(), "out of inotify watches: raise the limit, e.g. `sysctl fs.inotify.max_user_watches=524288` (and persist it in /etc/sysctl.d/). Until then this folder is polled every {}s", FALLBACK_POLL.as_secs());
                } else {
                    error!(path = %root.display(), error = %e, "cannot watch folder; polling it every {}s instead", FALLBACK_POLL.as_secs());
                }
                let _ = watcher.unwatch(&root);
                self.polled.push(root);
            }
        }
    }

    async fn check_roots(&mut self, watcher: &mut notify::RecommendedWatcher) {
        // Folders that vanished: stop watching, wait for them to return.
        let mut gone = Vec::new();
        self.watched.retain(|r| {
            let ok = r.is_dir();
            if !ok {
                gone.push(r.clone());
            }
            ok
        });
        self.polled.retain(|r| {
            let ok = r.is_dir();
            if !ok {
                gone.push(r.clone());
            }
            ok
        });
        for r in gone {
            warn!(path = %r.display(), "watched folder disappeared; waiting for it to come back");
            let _ = watcher.unwatch(&r);
            self.candidates.retain(|p, _| !p.starts_with(&r));
            self.rejected.retain(|p, _| !p.starts_with(&r));
            self.missing.push(r);
        }
        let missing = std::mem::take(&mut self.missing);
        for r in missing {
            if r.is_dir() {
                info!(path = %r.display(), "watched folder is there now");
                self.add_root(watcher, r.clone());
                if !self.missing.contains(&r) {
                    self.rescan(&r).await;
                }
            } else {
                self.missing.push(r);
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

    async fn rescan_all(&mut self) {
        self.metrics.watcher_rescan();
        for root in self.roots() {
            self.rescan(&root).await;
        }
        self.metrics.watch.scan_done();
    }

    /// Walks a folder (off the async threads) and observes every recording in it.
    async fn rescan(&mut self, dir: &Path) {
        let Some(root) = root_of(&self.roots(), dir, self.cfg.watch.recursive)
            .cloned()
            .or_else(|| self.roots().into_iter().find(|r| r == dir))
        else {
            return;
        };
        let recursive = self.cfg.watch.recursive;
        let cfg = self.cfg.clone();
        let scanned = dir.to_path_buf();
        let dir = dir.to_path_buf();
        let root2 = root.clone();
        let known = self.known.clone();
        let search = self.search.clone();
        let found = tokio::task::spawn_blocking(move || {
            let rules = name_rules(&cfg.watch);
            let mut out = Vec::new();
            // A watched folder may itself be a link; a folder below it is not followed, even
            // when it is the one being rescanned (a new folder swapped for a link since).
            let walk = walkdir::WalkDir::new(&dir)
                .follow_links(false)
                .follow_root_links(dir == root2)
                .max_depth(if recursive { usize::MAX } else { 1 });
            for entry in walk.into_iter().filter_entry(|e| {
                // Skip ignored folders (rsync's hidden temp dirs) without descending into them.
                e.depth() == 0
                    || !e.file_type().is_dir()
                    || e.path()
                        .strip_prefix(&root2)
                        .map(|rel| !rules.ignore.is_match(rel.file_name().unwrap_or_default()))
                        .unwrap_or(true)
            }) {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        debug!(error = %e, "scan: skipping an entry");
                        continue;
                    }
                };
                if !entry.file_type().is_file() {
                    continue;
                }
                let Ok(rel) = entry.path().strip_prefix(&root2) else {
                    continue;
                };
                if rules.check(rel).is_err() {
                    continue;
                }
                if let Ok(meta) = entry.metadata() {
                    let stat = stat_of(&meta);
                    // Known and unchanged: this stat was its whole cost.
                    if !known.contains(entry.path(), &stat) || search.wants(&stat) {
                        out.push((entry.path().to_path_buf(), stat));
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default();
        if !self.rejected.is_empty() {
            let present: std::collections::HashSet<&PathBuf> =
                found.iter().map(|(p, _)| p).collect();
            self.rejected
                .retain(|p, _| !p.starts_with(&scanned) || present.contains(p));
        }
        let now = now_ms();
        for (path, stat) in found {
            self.observe(path, root.clone(), stat, now);
        }
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

    async fn on_event(&mut self, ev: notify::Result<notify::Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                warn!(error = %e, "file watch error; rescanning");
                self.rescan_all().await;
                return;
            }
        };
        if ev.need_rescan() {
            self.metrics.watcher_overflow();
            warn!("the kernel dropped file events; rescanning every watched folder");
            self.rescan_all().await;
            return;
        }
        if matches!(
            ev.kind,
            EventKind::Access(notify::event::AccessKind::Open(_))
        ) {
            return;
        }
        let roots = self.roots();
        let recursive = self.cfg.watch.recursive;
        for path in ev.paths {
            let Some(root) = root_of(&roots, &path, recursive).cloned() else {
                continue;
            };
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    if recursive {
                        // A new folder (e.g. today's date folder): files may have landed in it
                        // before its watch existed, so look inside now. notify adds the watches
                        // for the folder and its subfolders only after handing us this event, so
                        // a file created in between has no event at all: look again once the
                        // watches are surely in place.
                        self.rescan(&path).await;
                        let now = now_ms();
                        for delay in NEW_FOLDER_RESCANS {
                            self.dir_rescans.push((now + delay, path.clone()));
                        }
                    }
                }
                Ok(meta) if meta.is_file() => {
                    let Ok(rel) = path.strip_prefix(&root) else {
                        continue;
                    };
                    if name_rules(&self.cfg.watch).check(rel).is_err() {
                        continue;
                    }
                    self.observe(path, root, stat_of(&meta), now_ms());
                }
                Ok(_) => {}
                Err(_) => {
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
        // done on the blocking pool, so the runtime's one thread goes on serving uploads.
        let to_look: Vec<(PathBuf, PathBuf)> = due
            .iter()
            .filter_map(|p| {
                self.candidates
                    .get(p)
                    .filter(|c| matches!(decide(&c.obs, now, timing.settle), Decision::Complete))
                    .map(|c| (p.clone(), c.root.clone()))
            })
            .collect();
        let mut looked: HashMap<PathBuf, std::io::Result<(Stat, Facts)>> = if to_look.is_empty() {
            HashMap::new()
        } else {
            tokio::task::spawn_blocking(move || {
                to_look
                    .into_iter()
                    .map(|(p, root)| {
                        let facts = gather_facts(&root, &p);
                        (p, facts)
                    })
                    .collect()
            })
            .await
            .unwrap_or_default()
        };
        for path in due {
            let Some(mut c) = self.candidates.remove(&path) else {
                continue;
            };
            let decision = match decide(&c.obs, now, timing.settle) {
                Decision::Complete => {
                    match looked
                        .remove(&path)
                        .unwrap_or_else(|| gather_facts(&c.root, &path))
                    {
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
        let olds: Vec<(PathBuf, u64, u64)> = same
            .iter()
            .map(|(j, _, old)| (crate::queue::decode_path(old), j.dev, j.ino))
            .collect();
        let left: Vec<bool> = tokio::task::spawn_blocking(move || {
            olds.iter()
                .map(|(old, dev, ino)| match std::fs::symlink_metadata(old) {
                    Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                    Ok(m) => m.dev() != *dev || m.ino() != *ino,
                })
                .collect()
        })
        .await
        .unwrap_or_default();
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
