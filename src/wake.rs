//! Owns how an idle task learns that there may be work: in-process wake-ups (the watcher queued a
//! file, a worker started following a job), and changes another process made to the queue
//! (`callferry retry`, `enqueue`).
//!
//! Those processes touch the database's wake file after their commit (`Queue::wake_daemon`, in
//! `queue/open.rs`, which also names the file); [`Wake::watch_file`] watches that one file. Where it
//! cannot be watched, one idle worker at a time looks at the database files' size and mtime every
//! [`IDLE_POLL`] instead (a `stat`, not a query) and wakes the others when a commit changed them.
//!
//! An idle worker has no tick: it registers for wake-ups before it reads when the next
//! job falls due, so a wake-up sent meanwhile is not lost, and sleeps until that job or a wake-up.
//! Only one of them re-reads the queue, every [`IDLE_RECHECK`], as a safety net.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::queue::Queue;

/// Without a watched wake file: how long an idle worker sleeps at most before looking at the queue
/// again, so jobs another process made due (`callferry retry`, `enqueue`) are picked up without a
/// restart.
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// The one idle worker that watches the database re-reads the queue at the latest after this long:
/// a safety net for a wake-up lost outside this process (the wake file's watch gone), or, when
/// polling, a change that left size and coarse mtime alike. The other idle workers wait for a
/// wake-up or a due job only.
const IDLE_RECHECK: Duration = Duration::from_secs(600);

/// The wake-ups the daemon's tasks share.
#[derive(Default)]
pub struct Wake {
    /// Wakes idle upload workers: new work was queued (in-process, or by another process).
    pub workers: Arc<Notify>,
    /// Wakes the results follower: a job started being followed, or another process changed the
    /// queue.
    pub follower: Arc<Notify>,
    /// Held by the one idle worker that watches the database for changes (see [`Wake::idle`]).
    idle_watch: AtomicBool,
    /// Set when the database's wake file is watched: idle workers then need no polling at all to
    /// notice a `callferry retry` or `enqueue`.
    db_events: AtomicBool,
}

impl Wake {
    /// Wakes idle tasks when another process changed the queue: `callferry retry` and `enqueue`
    /// touch the database's wake file after their commit (`Queue::wake_daemon`), and this watches
    /// that one file. The database folder itself is not watched: every page SQLite writes to the
    /// WAL would be an event (measured: 5 % of the daemon's CPU while uploading). None if
    /// the file cannot be created or watched (workers then poll the database files' metadata once
    /// a second). The watch lasts as long as the returned watcher is kept.
    pub fn watch_file(&self, queue: &Queue) -> Option<notify::RecommendedWatcher> {
        use notify::{RecursiveMode, Watcher};
        use std::os::unix::fs::OpenOptionsExt;
        let path = queue.wake_file();
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
        {
            warn!(path = %path.display(), error = %e, "cannot create the wake file; idle workers poll the database once a second instead");
            return None;
        }
        let (workers, follower) = (self.workers.clone(), self.follower.clone());
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                workers.notify_waiters();
                follower.notify_one();
            }
        })
        .ok()?;
        match watcher.watch(&path, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.db_events.store(true, Ordering::Relaxed);
                Some(watcher)
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot watch the wake file; idle workers poll the database once a second instead");
                None
            }
        }
    }

    /// Waits until there may be work for an upload worker: a wake-up, a job falling due, or (for
    /// the one idle worker that watches the database) [`IDLE_RECHECK`]. Without a watched wake
    /// file that worker looks at the database files' size and mtime every [`IDLE_POLL`] (a `stat`,
    /// not a query) and wakes the others when they changed. Jobs under `paused` (folders of sources
    /// whose token was rejected) are not waited for: they are not claimed until their account is
    /// back, which wakes the workers. While parked the worker counts as alive for the watchdog
    /// ([`crate::metrics::Progress::park`]), so it never wakes only to say so.
    pub async fn idle(
        &self,
        queue: &Queue,
        paused: impl FnOnce() -> Vec<String>,
        metrics: &Metrics,
        stop: &CancellationToken,
    ) {
        struct Role<'a>(&'a AtomicBool);
        impl Drop for Role<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        // Registered before the paused folders and the queue are read: a wake-up sent after
        // those reads is not lost. (The paused folders were read by the caller before, once: an
        // account's pause lifted in between was missed, and its jobs waited for the next wake-up.)
        let woken = self.workers.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let due = queue.next_due_except(&paused()).await.ok().flatten();
        let stamp = db_stamp(queue.path());
        let since = Instant::now();
        let watching = !self.idle_watch.swap(true, Ordering::AcqRel);
        let _role = watching.then(|| Role(&self.idle_watch));
        let polling = watching && !self.db_events.load(Ordering::Relaxed);
        let _parked = metrics.progress.park();
        loop {
            let wait = next_wake(due, now_ms(), watching, polling, since.elapsed());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut woken => return,
                _ = sleep_for(wait) => {}
            }
            metrics.idle_turn();
            if due.is_some_and(|d| d <= now_ms()) || (watching && since.elapsed() >= IDLE_RECHECK) {
                return;
            }
            if polling && db_stamp(queue.path()) != stamp {
                // A commit, by this daemon or another process (retry, enqueue): everyone looks.
                self.workers.notify_waiters();
                self.follower.notify_one();
                return;
            }
        }
    }
}

/// How long an idle worker sleeps: until the next due job (`due`, ms), or the watching worker's
/// poll or recheck, whichever is first; None (until a wake-up) for a worker with neither. The
/// min of deadlines, never a fixed period.
fn next_wake(
    due: Option<i64>,
    now: i64,
    watching: bool,
    polling: bool,
    idle_for: Duration,
) -> Option<Duration> {
    let until_due = due.map(|d| Duration::from_millis((d - now).max(0) as u64));
    let recheck = watching.then(|| IDLE_RECHECK.saturating_sub(idle_for));
    let poll = polling.then_some(IDLE_POLL);
    [until_due, recheck, poll].into_iter().flatten().min()
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Size and mtime of the database file and its WAL: a commit changes them.
type DbStamp = [Option<(u64, Option<std::time::SystemTime>)>; 2];

fn db_stamp(db: &Path) -> DbStamp {
    let look = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [look(db), look(Path::new(&wal))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::OpenMode;

    #[test]
    fn an_idle_worker_sleeps_until_its_first_deadline_never_a_fixed_period() {
        let s = Duration::from_secs;
        // Nothing due, not the watching worker: until a wake-up, however long.
        assert_eq!(next_wake(None, 0, false, false, s(0)), None);
        // A job due in 5 min: then, not on a 30 s recheck as before.
        assert_eq!(
            next_wake(Some(300_000), 0, false, false, s(0)),
            Some(s(300))
        );
        // The watching worker: the due job or its recheck, whichever is first.
        assert_eq!(next_wake(Some(300_000), 0, true, false, s(0)), Some(s(300)));
        assert_eq!(next_wake(None, 0, true, false, s(0)), Some(IDLE_RECHECK));
        assert_eq!(
            next_wake(None, 0, true, false, s(100)),
            Some(IDLE_RECHECK - s(100))
        );
        // Overdue: at once.
        assert_eq!(next_wake(Some(-5), 0, false, false, s(0)), Some(s(0)));
        // Polling (no watched wake file): the watching worker looks every IDLE_POLL.
        assert_eq!(next_wake(None, 0, true, true, s(0)), Some(IDLE_POLL));
    }

    #[tokio::test]
    async fn another_process_touching_the_wake_file_wakes_idle_workers() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q.db"), OpenMode::Create)
            .await
            .unwrap();
        let wake = Wake::default();
        let _w = wake.watch_file(&q).expect("inotify watch");
        assert!(wake.db_events.load(Ordering::Relaxed));
        let mode = std::fs::metadata(q.wake_file()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Commits of the daemon's own wake nobody: nothing watches the database folder.
        let quiet = wake.workers.notified();
        tokio::pin!(quiet);
        quiet.as_mut().enable();
        q.enqueue(
            &[crate::queue::NewJob {
                path: "/rec/a.wav".into(),
                root: "/rec".into(),
                size: 1,
                mtime_ns: 1,
                dev: 0,
                ino: 0,
            }],
            1,
        )
        .await
        .unwrap();
        let job = q.claim(1).await.unwrap().unwrap();
        q.fail(&job, "400", 1).await.unwrap();
        q.make_durable().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut quiet)
                .await
                .is_err(),
            "a commit of the daemon's own woke the workers"
        );
        // `callferry retry`, through a second handle on the database: its commit wakes the daemon.
        let cli = Queue::open(&dir.path().join("q.db"), OpenMode::Existing)
            .await
            .unwrap();
        assert_eq!(cli.retry(None, 2).await.unwrap(), 1);
        tokio::time::timeout(Duration::from_secs(20), quiet)
            .await
            .expect("the watcher woke the workers");
    }

    /// An account's pause lifted just after the idle worker read which folders are paused wakes
    /// it: it registered for wake-ups before that read. (Read before the registration, as it was,
    /// the lift's wake-up could be lost, and the source's jobs waited for the next wake-up.)
    #[tokio::test]
    async fn a_pause_lifted_just_after_it_was_read_wakes_the_idle_worker() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q.db"), OpenMode::Create)
            .await
            .unwrap();
        // Due now, but under the paused folder: not waited for.
        q.enqueue(
            &[crate::queue::NewJob {
                path: "/b/x.wav".into(),
                root: "/b".into(),
                size: 1,
                mtime_ns: 1,
                dev: 0,
                ino: 0,
            }],
            1,
        )
        .await
        .unwrap();
        let wake = Arc::new(Wake::default());
        let (metrics, stop) = (Metrics::new(), CancellationToken::new());
        let lifter = wake.clone();
        let paused = move || {
            let read = vec!["/b".to_string()];
            // The lift, right after the read: `gate_lift` wakes the workers.
            lifter.workers.notify_waiters();
            read
        };
        tokio::time::timeout(
            Duration::from_secs(20),
            wake.idle(&q, paused, &metrics, &stop),
        )
        .await
        .expect("the lift's wake-up was lost");
    }

    /// Without a watched wake file, the idle worker that watches the database notices another
    /// process's commit by the files' stamp, and wakes the other idle workers.
    #[tokio::test]
    async fn without_the_wake_file_a_commit_elsewhere_wakes_idle_workers() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let q = Queue::open(&db, OpenMode::Create).await.unwrap();
        let wake = Arc::new(Wake::default());
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let other = wake.workers.notified();
        tokio::pin!(other);
        other.as_mut().enable();
        let watcher = {
            let (wake, q, metrics, stop) = (wake.clone(), q.clone(), metrics.clone(), stop.clone());
            tokio::spawn(async move { wake.idle(&q, Vec::new, &metrics, &stop).await })
        };
        // The watching role is taken before the first stat, so the commit below is a change.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !wake.idle_watch.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "no idle worker took the watch");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cli = Queue::open(&db, OpenMode::Existing).await.unwrap();
        cli.enqueue(
            &[crate::queue::NewJob {
                path: "/rec/b.wav".into(),
                root: "/rec".into(),
                size: 1,
                mtime_ns: 1,
                dev: 0,
                ino: 0,
            }],
            1,
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(20), other)
            .await
            .expect("the watching idle worker woke the others");
        tokio::time::timeout(Duration::from_secs(20), watcher)
            .await
            .expect("the watching idle worker returned")
            .unwrap();
        assert!(
            !wake.idle_watch.load(Ordering::Acquire),
            "the watch role is given back when the worker stops idling"
        );
    }
}
