//! The daemon's side: watching the drop folder, taking each request (read and checked by
//! [`super::vet`], trusting nothing), and queueing its recording with its call, or refusing it.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{Hooked, Queue};
use crate::watch::Roots;

use super::vet::{Verdict, check, locate, read_request};
use super::{GROUP, SUFFIX, TEMP_PREFIX};

/// A request whose recording is still being written (a writer holds it open, or its header is not
/// final yet) is looked at again every second for this long, then refused; the watcher still
/// queues the recording once it is complete, without the hook's call.
const PATIENCE: Duration = Duration::from_secs(120);
/// A temporary file a hook left behind (it died between create and rename) is removed after this.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// The drop folder is listed this often even without an event (a lost one). Long: inotify does
/// not lose events on a local folder (a queue overflow is an event too), and each listing wakes
/// an idle daemon.
const RESCAN: Duration = Duration::from_secs(600);
/// How often a missing (or unusable) drop folder is looked for when its nearest existing parent
/// cannot be watched; with that watch (the usual case) its creation, or a `chmod`, is an event,
/// and it is looked for every [`RESCAN`] besides (a default config without the folder
/// woke every 10 s).
const MISSING_RECHECK: Duration = Duration::from_secs(10);

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
    metrics: Arc<crate::metrics::Metrics>,
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
        metrics,
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
/// loop of a whole core while idle. A request arrives by a rename (or a create and a
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
    metrics: Arc<crate::metrics::Metrics>,
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
                self.metrics.hook_request("attached");
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
                self.metrics.hook_request("too_late");
            }
            Hooked::Pruned => {
                info!(path = %path.display(), from_uid = uid, "the recorder's request names a recording uploaded long ago (pruned) or forgotten; nothing to do");
                self.metrics.hook_request("pruned");
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
        self.metrics.hook_request("refused");
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
