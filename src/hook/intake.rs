//! The daemon's side: watching the drop folder, reading each request without trusting it,
//! checking its recording as the watcher would, and queueing it with its call.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::completeness::{
    Decision, NameRules, NameSkip, Pending, Timing, gather_facts, judge, observe,
};
use crate::config::Config;
use crate::queue::{Hooked, NewJob, Queue};
use crate::watch::Roots;

use super::{GROUP, MAX_REQUEST, Request, RequestError, SUFFIX, TEMP_PREFIX};

/// A request whose recording is still being written (a writer holds it open, or its header is not
/// final yet) is looked at again every second for this long, then refused; the watcher still
/// queues the recording once it is complete, without the hook's call.
const PATIENCE: Duration = Duration::from_secs(120);
/// A temporary file a hook left behind (it died between create and rename) is removed after this.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// The drop folder is listed this often even without an event (a lost one). Long: inotify does
/// not lose events on a local folder (a queue overflow is an event too), and each listing wakes
/// an idle daemon (issue 16).
const RESCAN: Duration = Duration::from_secs(600);
/// How often a missing (or unusable) drop folder is looked for when its nearest existing parent
/// cannot be watched; with that watch (the usual case) its creation, or a `chmod`, is an event,
/// and it is looked for every [`RESCAN`] besides (issue 16: a default config without the folder
/// woke every 10 s).
const MISSING_RECHECK: Duration = Duration::from_secs(10);

/// Why a request file is refused before its recording is looked at.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("it is a symbolic link")]
    Symlink,
    #[error("cannot open it: {0}")]
    Open(#[source] std::io::Error),
    #[error("cannot stat it: {0}")]
    Stat(#[source] std::io::Error),
    #[error("it is not a regular file")]
    NotRegular,
    #[error("it has {0} hard links (a request has one)")]
    Links(u64),
    #[error("it is {0} bytes, more than the {MAX_REQUEST} a request may be")]
    TooBig(u64),
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("it grew past {MAX_REQUEST} bytes")]
    Grew,
    /// serde's reason, cut to 200 bytes: a request's content is not echoed at length.
    #[error("it is not a valid request: {0}")]
    NotJson(String),
    #[error("{0}")]
    Rules(#[from] RequestError),
    /// The blocking task that reads it panicked.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A request's recording is not below any watched folder.
#[derive(Debug, thiserror::Error)]
#[error("{} is not inside a watched folder ({folders})", path.display())]
struct NotWatched {
    path: PathBuf,
    /// The watched folders, listed for the log (", not recursive" when subfolders are not).
    folders: String,
}

/// Why the drop folder is not used.
#[derive(Debug, thiserror::Error)]
enum DirError {
    #[error("it does not exist")]
    Missing,
    #[error("{0}")]
    Unreadable(#[source] std::io::Error),
    #[error("it is not a folder")]
    NotFolder,
    // Anyone could queue anything in the watched folders, and read or remove others' requests.
    #[error(
        "it is writable by everyone (mode {0:o}): make it chmod 3730, owned by callferry, group \
         {GROUP}"
    )]
    WorldWritable(u32),
    /// The blocking task that looks at it panicked.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Reads one request, trusting nothing: no link followed, a regular file with one link (a hard
/// link to someone else's file is not a request), at most [`MAX_REQUEST`] bytes, strict JSON.
/// Returns its owner's uid (once known) and it.
pub(super) fn read_request(dir: &Path, name: &OsStr) -> (Option<u32>, Result<Request, ReadError>) {
    let mut uid = None;
    let r = read_request_as(dir, name, &mut uid);
    (uid, r)
}

fn read_request_as(dir: &Path, name: &OsStr, uid: &mut Option<u32>) -> Result<Request, ReadError> {
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ReadError::Symlink,
            _ => ReadError::Open(e),
        })?;
    let m = f.metadata().map_err(ReadError::Stat)?;
    *uid = Some(m.uid());
    if !m.is_file() {
        return Err(ReadError::NotRegular);
    }
    if m.nlink() != 1 {
        return Err(ReadError::Links(m.nlink()));
    }
    if m.len() > MAX_REQUEST {
        return Err(ReadError::TooBig(m.len()));
    }
    let mut body = Vec::with_capacity(m.len() as usize);
    f.take(MAX_REQUEST + 1)
        .read_to_end(&mut body)
        .map_err(ReadError::Read)?;
    if body.len() as u64 > MAX_REQUEST {
        return Err(ReadError::Grew);
    }
    let req: Request = serde_json::from_slice(&body).map_err(|e| {
        let mut why = e.to_string();
        why.truncate(200);
        ReadError::NotJson(why)
    })?;
    req.validate()?;
    Ok(req)
}

/// The watched folder `path` is below, and the path as the watcher names it (below that folder as
/// configured). A path through a watched folder's real location (the folder is a link) is named
/// through the link, so the watcher and the hook find one job.
async fn locate(
    cfg: &Config,
    roots: &Roots,
    path: &Path,
) -> Result<(PathBuf, PathBuf), NotWatched> {
    let watched = &cfg.watch.paths;
    let recursive = cfg.watch.recursive;
    if let Some(r) = crate::watcher::root_of(watched, path, recursive) {
        return Ok((r.clone(), path.to_path_buf()));
    }
    for r in watched {
        let rr = r.clone();
        let Ok(Ok(real)) = roots
            .get(r)
            .scan
            .run(move |_| std::fs::canonicalize(&rr))
            .await
        else {
            continue;
        };
        if let Ok(rel) = path.strip_prefix(&real)
            && !rel.as_os_str().is_empty()
        {
            let named = r.join(rel);
            if let Some(root) = crate::watcher::root_of(watched, &named, recursive) {
                return Ok((root.clone(), named));
            }
        }
    }
    let listed: Vec<String> = watched.iter().map(|p| p.display().to_string()).collect();
    Err(NotWatched {
        path: path.to_path_buf(),
        folders: format!(
            "{}{}",
            listed.join(", "),
            if recursive { "" } else { ", not recursive" }
        ),
    })
}

enum Verdict {
    Refuse(String),
    /// Still being written; looked at again.
    NotYet(String),
}

/// The watcher's checks, minus the settle wait: the recorder says the call is over.
fn check(cfg: &Config, root: &Path, path: &Path, now: i64) -> Result<NewJob, Verdict> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    match NameRules::of(&cfg.watch).check(rel) {
        Ok(()) => {}
        Err(NameSkip::Extension) => {
            return Err(Verdict::Refuse(format!(
                "its extension is not one of watch.extensions ({})",
                cfg.watch.extensions.join(", ")
            )));
        }
        Err(NameSkip::Ignored) => {
            return Err(Verdict::Refuse(format!(
                "it matches a watch.ignore pattern ({})",
                cfg.watch.ignore.join(", ")
            )));
        }
    }
    let (stat, facts) = gather_facts(root, path).map_err(|e| {
        Verdict::Refuse(match crate::safefs::not_regular_reason(&e) {
            Some(why) => why.to_string(),
            None if e.kind() == std::io::ErrorKind::NotFound => "it does not exist".into(),
            None => format!("it cannot be read: {e}"),
        })
    })?;
    let timing = Timing {
        settle: Duration::ZERO,
        orphan_grace: cfg.watch.orphan_grace,
    };
    match judge(&observe(None, stat, now), &facts, now, timing) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_, Pending::WriterOpen) => Err(Verdict::NotYet(
            "a process still has it open for writing".into(),
        )),
        Decision::NotYet(_, why) => Err(Verdict::NotYet(why.to_string())),
        Decision::Reject(why) => Err(Verdict::Refuse(why)),
    }
}

/// Whether the drop folder can be used.
fn check_dir(dir: &Path) -> Result<(), DirError> {
    let m = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DirError::Missing,
        _ => DirError::Unreadable(e),
    })?;
    if !m.is_dir() {
        return Err(DirError::NotFolder);
    }
    if m.mode() & 0o002 != 0 {
        return Err(DirError::WorldWritable(m.mode() & 0o7777));
    }
    Ok(())
}

/// The daemon's side: takes requests from `[watch] hook_dir` until `cancel`, including those
/// written while it was stopped.
pub async fn run(
    cfg: Arc<Config>,
    queue: Queue,
    roots: Arc<Roots>,
    wake_workers: Arc<Notify>,
    cancel: CancellationToken,
) {
    let Some(dir) = cfg.watch.hook_dir.clone() else {
        return;
    };
    let mut t = Taker {
        cfg,
        queue,
        roots,
        wake_workers,
        dir,
        waiting: HashMap::new(),
        stuck: HashSet::new(),
    };
    let events = Arc::new(Notify::new());
    let mut watch: Option<notify::RecommendedWatcher> = None;
    let mut parent: Option<notify::RecommendedWatcher> = None;
    let mut usable = false;
    let mut said: Option<String> = None;
    loop {
        if !usable {
            // Before the look, so the folder made just after it is an event.
            parent = watch_parent(&t.dir, &events);
        }
        let d = t.dir.clone();
        let state = tokio::task::spawn_blocking(move || check_dir(&d))
            .await
            .unwrap_or_else(|e| Err(e.into()));
        match state {
            Ok(()) => {
                if !usable {
                    info!(folder = %t.dir.display(), "taking the recorder's end-of-call requests (callferry enqueue --now)");
                    usable = true;
                    said = None;
                    parent = None;
                    watch = watch_dir(&t.dir, &events);
                }
                if let Err(e) = t.round().await {
                    warn!(folder = %t.dir.display(), error = %e, "cannot list the hook folder");
                    usable = false;
                    watch = None;
                }
            }
            Err(e) => {
                usable = false;
                watch = None;
                let why = e.to_string();
                if said.as_deref() != Some(why.as_str()) {
                    if matches!(e, DirError::Missing) {
                        info!(folder = %t.dir.display(), "no hook folder ({why}): `callferry enqueue --now` requests are not taken until it exists (README: The recorder's hook)");
                    } else {
                        warn!(folder = %t.dir.display(), reason = %why, "the hook folder is not used: `callferry enqueue --now` requests are not taken");
                    }
                    said = Some(why);
                }
            }
        }
        let wait = if !t.waiting.is_empty() {
            Duration::from_secs(1)
        } else if !usable && parent.is_none() {
            MISSING_RECHECK
        } else if !usable || watch.is_some() {
            RESCAN
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = events.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn watch_dir(dir: &Path, events: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let ev = events.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.as_ref().is_ok_and(|e| !is_own_read(&e.kind)) {
            ev.notify_one();
        }
    })
    .ok()?;
    match w.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(w),
        Err(e) => {
            warn!(folder = %dir.display(), error = %e, "cannot watch the hook folder; it is listed every 2 s instead");
            None
        }
    }
}

/// An event that reading the folder raises itself: notify 8 watches `IN_OPEN` and
/// `IN_CLOSE_NOWRITE` too, so each listing of the folder was an event that listed it again, a busy
/// loop of a whole core while idle (issue 16). A request arrives by a rename (or a create and a
/// close after writing), never by a read.
fn is_own_read(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// Watches the nearest existing parent of a drop folder that is missing or unusable, for what
/// happens to the names on the way to it (made, moved in, its mode or owner changed). None if
/// no parent can be watched.
fn watch_parent(dir: &Path, events: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let ev = events.clone();
    let target = dir.to_path_buf();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(e) = res
            && !is_own_read(&e.kind)
            && (e.need_rescan() || e.paths.iter().any(|p| target.starts_with(p)))
        {
            ev.notify_one();
        }
    })
    .ok()?;
    let nearest = dir
        .ancestors()
        .skip(1)
        .find(|a| a.is_dir() && w.watch(a, RecursiveMode::NonRecursive).is_ok());
    nearest.map(|_| w)
}

struct Taker {
    cfg: Arc<Config>,
    queue: Queue,
    roots: Arc<Roots>,
    wake_workers: Arc<Notify>,
    dir: PathBuf,
    /// Requests whose recording is still being written: since when, and why.
    waiting: HashMap<OsString, Instant>,
    /// Refused requests that could not be removed: said once.
    stuck: HashSet<OsString>,
}

impl Taker {
    /// Takes every request in the folder once.
    async fn round(&mut self) -> std::io::Result<()> {
        let d = self.dir.clone();
        let names = tokio::task::spawn_blocking(move || list(&d))
            .await
            .map_err(std::io::Error::other)??;
        self.waiting.retain(|n, _| names.contains(n));
        self.stuck.retain(|n| names.contains(n));
        for name in names {
            if !self.stuck.contains(&name) {
                self.take(name).await;
            }
        }
        Ok(())
    }

    async fn take(&mut self, name: OsString) {
        let (d, n) = (self.dir.clone(), name.clone());
        let (uid, read) = tokio::task::spawn_blocking(move || read_request(&d, &n))
            .await
            .unwrap_or_else(|e| (None, Err(e.into())));
        let req = match read {
            Ok(r) => r,
            Err(why) => return self.refuse(&name, uid, None, &why.to_string()).await,
        };
        let uid = uid.unwrap_or_default();
        let asked = req.path();
        let (root, path) = match locate(&self.cfg, &self.roots, &asked).await {
            Ok(found) => found,
            Err(why) => {
                return self
                    .refuse(&name, Some(uid), Some(&asked), &why.to_string())
                    .await;
            }
        };
        let (cfg, r, p) = (self.cfg.clone(), root.clone(), path.clone());
        let checked = self
            .roots
            .get(&root)
            .files
            .run(move |_| check(&cfg, &r, &p, now_ms()))
            .await;
        let job = match checked {
            Ok(Ok(job)) => job,
            Ok(Err(Verdict::Refuse(why))) => {
                return self.refuse(&name, Some(uid), Some(&path), &why).await;
            }
            Ok(Err(Verdict::NotYet(why))) => return self.not_yet(&name, uid, &path, &why).await,
            Err(hung) => return self.not_yet(&name, uid, &path, &hung.to_string()).await,
        };
        let call = req.call();
        let json = serde_json::to_string(&call).unwrap_or_default();
        let outcome = match self.queue.enqueue_hooked(&job, &json, now_ms()).await {
            Ok(o) => o,
            Err(e) => {
                // The database's trouble, not the request's: it stays, and is taken again.
                warn!(request = ?name, path = %path.display(), error = %e, "cannot queue the recorder's request yet; it is taken again shortly");
                self.waiting.entry(name).or_insert_with(Instant::now);
                return;
            }
        };
        // The request goes only once what it said cannot be rolled back by a power cut.
        if let Err(e) = self.queue.sync_wal().await {
            warn!(request = ?name, error = %e, "cannot make the recorder's request durable yet; it is taken again shortly");
            self.waiting.entry(name).or_insert_with(Instant::now);
            return;
        }
        let ext = call.external_id.as_deref().unwrap_or("");
        match outcome {
            Hooked::Attached { id, new } => {
                info!(job_id = id, path = %path.display(), external_id = %ext, from_uid = uid, new, "queued at the recorder's request (end of call): its declare carries the hook's id and metadata");
                self.wake_workers.notify_waiters();
            }
            Hooked::Busy { id } => {
                let why = format!("its job #{id} is in a worker's hands (before its declare)");
                return self.not_yet(&name, uid, &path, &why).await;
            }
            Hooked::TooLate {
                id,
                state,
                interaction_id,
            } => {
                warn!(job_id = id, path = %path.display(), state = %state, interaction_id = ?interaction_id, external_id = %ext, from_uid = uid,
                    "the recorder's request came after this recording's declare: its id and metadata are not sent (the interaction keeps what the name or sidecar gave)");
            }
            Hooked::Pruned => {
                info!(path = %path.display(), from_uid = uid, "the recorder's request names a recording uploaded long ago (pruned) or forgotten; nothing to do");
            }
        }
        self.remove(&name).await;
    }

    async fn not_yet(&mut self, name: &OsStr, uid: u32, path: &Path, why: &str) {
        let since = *self
            .waiting
            .entry(name.to_os_string())
            .or_insert_with(Instant::now);
        if since.elapsed() >= PATIENCE {
            let why = format!(
                "{why} for {}s after the request; the watcher queues it once it is complete, \
                 without the request's id and metadata",
                PATIENCE.as_secs()
            );
            self.refuse(name, Some(uid), Some(path), &why).await;
        } else {
            debug!(request = ?name, path = %path.display(), reason = %why, "the recorder's request waits: its recording is not complete yet");
        }
    }

    async fn refuse(&mut self, name: &OsStr, uid: Option<u32>, path: Option<&Path>, why: &str) {
        warn!(request = %self.dir.join(name).display(), from_uid = ?uid, path = ?path.map(|p| p.display().to_string()), reason = %why,
            "refused the recorder's request (callferry enqueue --now); it is removed");
        self.remove(name).await;
    }

    async fn remove(&mut self, name: &OsStr) {
        self.waiting.remove(name);
        let p = self.dir.join(name);
        let r = tokio::task::spawn_blocking(move || {
            std::fs::remove_file(&p).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => std::fs::remove_dir(&p).map_err(|_| e),
            })
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = r {
            warn!(request = %self.dir.join(name).display(), error = %e, "cannot remove the recorder's request; it is left alone (remove it by hand)");
            self.stuck.insert(name.to_os_string());
        }
    }
}

/// The requests in the folder (`*.req`, not hidden); temporary files left by a hook that died are
/// removed once stale.
pub(super) fn list(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let b = name.as_bytes();
        if b.starts_with(TEMP_PREFIX.as_bytes()) {
            let stale = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_TEMP);
            if stale {
                debug!(file = ?name, "removing a hook's stale temporary file");
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        if !b.starts_with(b".") && b.ends_with(SUFFIX.as_bytes()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: listing the drop folder raised events (notify 8 watches opens and closes) that
    /// listed it again, forever. Events come in order: by the time the request's rename is seen,
    /// the listing's own events have been seen too, and none may pass the filter.
    #[test]
    fn reading_the_drop_folder_raises_no_event_that_wakes_the_taker() {
        use notify::event::{AccessKind, AccessMode, ModifyKind};
        use notify::{EventKind, RecursiveMode, Watcher};
        let d = tempfile::tempdir().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(e) = res {
                s.lock().unwrap().push((e.kind, is_own_read(&e.kind)));
            }
        })
        .unwrap();
        w.watch(d.path(), RecursiveMode::NonRecursive).unwrap();
        list(d.path()).unwrap();
        std::fs::write(d.path().join(".tmp-x"), b"{}").unwrap();
        std::fs::rename(d.path().join(".tmp-x"), d.path().join("x.req")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let renamed = |v: &[(EventKind, bool)]| {
            v.iter()
                .any(|(k, _)| matches!(k, EventKind::Modify(ModifyKind::Name(_))))
        };
        while !renamed(&seen.lock().unwrap()) {
            assert!(std::time::Instant::now() < deadline, "no rename event");
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter()
                .any(|(k, own)| *own && matches!(k, EventKind::Access(_))),
            "the listing raised no event at all: the test proves nothing ({seen:?})"
        );
        for (k, own) in seen.iter() {
            let read = matches!(
                k,
                EventKind::Access(AccessKind::Open(_) | AccessKind::Close(AccessMode::Read))
            );
            assert_eq!(*own, read, "{k:?}");
        }
    }
}
