//! A lane: one OS thread that makes the file-system calls on one watched folder, one after the
//! other, and callers that wait for an answer with a deadline.
//!
//! A folder on a mount that stops answering (a hard-mounted NFS share whose server is gone, a stuck
//! FUSE mount) blocks the calling thread in `stat` or `open` for as long as it stays so. On the
//! runtime's one thread that froze every other folder, `/healthz` and the watchdog.
//! `spawn_blocking` alone would move the freeze but pile up a blocking thread for every call
//! made meanwhile. A lane keeps it to one stuck thread: calls queue behind it (a bounded queue), and
//! once the call at its head has made no progress for [`DEADLINE`], every caller gets
//! [`Hung`] at once instead of queueing more.
//!
//! "Progress" is per call, not per job: a long walk reports each entry ([`Beat::tick`]), so a
//! 200,000-file walk on a slow share is busy, not hung.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// A call that has not come back after this long marks its folder unhealthy. Long enough for a
/// share that is only slow (a busy NAS answers a `stat` in milliseconds, a failing-over one in a
/// few seconds), short enough that the watcher, which waits on it, is back within seconds.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Calls waiting behind the running one. Each caller waits for its own answer, so the daemon has
/// at most a worker's or the watcher's one call here: this is only a bound, never a buffer.
const QUEUE: usize = 64;

/// The folder's lane did not answer within [`DEADLINE`], or was already stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hung;

impl std::fmt::Display for Hung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the watched folder does not answer (a file-system call made no progress for {}s)",
            DEADLINE.as_secs()
        )
    }
}

impl std::error::Error for Hung {}

type Job = Box<dyn FnOnce(&Beat) + Send>;

/// Tells the folders' health task that a lane started a call, so it needs no tick of its own: it
/// sleeps until a call has run long enough to be hung, or, with every lane idle, until a call
/// starts. Only a task that asked for it (`arm`) is woken, once, so a busy lane costs
/// nothing here.
#[derive(Debug, Default)]
pub struct Pulse {
    armed: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Pulse {
    /// The next call that starts wakes [`Pulse::changed`]. Arm before looking at the lanes:
    /// a change in between is then not lost.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn poke(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    pub async fn changed(&self) {
        self.wake.notified().await
    }
}

/// The lane's sign of life, shared between its thread and its callers.
#[derive(Debug, Default)]
pub struct Beat {
    /// 0 when idle; else the time (ms on the lane's own clock) of the last progress of the call in
    /// hand.
    busy_since: AtomicI64,
    /// Calls completed, for tests and figures.
    done: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Beat {
    fn now(&self) -> i64 {
        // +1: 0 means idle.
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as i64 + 1
    }

    /// A long call (a walk) made progress: it is not hung.
    pub fn tick(&self) {
        if self.busy_since.load(Ordering::Relaxed) != 0 {
            self.busy_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// How long the call in hand has made no progress (None when idle).
    pub fn stuck_for(&self) -> Option<Duration> {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis((self.now() - t).max(0) as u64)),
        }
    }
}

pub struct Lane {
    tx: SyncSender<Job>,
    beat: Arc<Beat>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").finish_non_exhaustive()
    }
}

impl Lane {
    /// Starts the lane's thread for calls on `root`. It ends when the lane is dropped and its
    /// call in hand returns (a thread stuck on a dead mount is never joined: the process may exit
    /// under it). If no thread can be started, every call is [`Hung`] (and said so).
    pub fn spawn(root: &std::path::Path, name: &str, pulse: Arc<Pulse>) -> Lane {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let beat = Arc::new(Beat::default());
        let b = beat.clone();
        let root = root.to_path_buf();
        let r = root.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    b.busy_since.store(b.now(), Ordering::Relaxed);
                    pulse.poke();
                    super::fault::hang_point(&r);
                    job(&b);
                    b.busy_since.store(0, Ordering::Relaxed);
                    b.done.fetch_add(1, Ordering::Relaxed);
                }
            })
        {
            tracing::error!(path = %root.display(), error = %e, "cannot start a thread for a watched folder; it is not served");
        }
        Lane { tx, beat }
    }

    /// Whether the call in hand has made no progress for [`DEADLINE`].
    pub fn hung(&self) -> bool {
        self.beat.stuck_for().is_some_and(|d| d >= DEADLINE)
    }

    /// How long the call in hand has made no progress (None when the lane is idle).
    pub fn busy_for(&self) -> Option<Duration> {
        self.beat.stuck_for()
    }

    pub fn calls_done(&self) -> u64 {
        self.beat.done.load(Ordering::Relaxed)
    }

    /// Runs `f` on the lane's thread and waits for its answer, as long as the lane makes
    /// progress. [`Hung`] at once if the lane is stuck, or as soon as it is seen stuck while
    /// waiting; `f` then still runs when the lane frees up, unless its caller has gone by then.
    pub async fn run<T, F>(&self, f: F) -> Result<T, Hung>
    where
        T: Send + 'static,
        F: FnOnce(&Beat) -> T + Send + 'static,
    {
        if self.hung() {
            return Err(Hung);
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |beat: &Beat| {
            // The caller gave up (deadline, shutdown): a call it no longer waits for is not made.
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(f(beat));
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return Err(Hung),
        }
        loop {
            tokio::select! {
                r = &mut rx => return r.map_err(|_| Hung),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if self.hung() {
                        return Err(Hung);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_and_then_gives_up_on_a_stuck_call_without_queueing_more() {
        let lane = Lane::spawn(std::path::Path::new("/"), "t-lane", Arc::default());
        assert_eq!(lane.run(|_| 2 + 2).await, Ok(4));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let t = Instant::now();
        // A call that hangs (a dead mount's stat), then one queued behind it.
        let stuck = lane.run(move |_| {
            let _ = held.recv();
        });
        let behind = lane.run(|_| 1);
        let (a, b) = tokio::join!(stuck, behind);
        assert_eq!((a, b), (Err(Hung), Err(Hung)));
        assert!(t.elapsed() >= DEADLINE);
        assert!(lane.hung());
        // Stuck: refused at once, nothing more is queued.
        let t = Instant::now();
        assert_eq!(lane.run(|_| 1).await, Err(Hung));
        assert!(t.elapsed() < Duration::from_secs(1));
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lane.hung() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(lane.run(|_| 5).await, Ok(5));
    }

    #[tokio::test]
    async fn a_long_call_that_makes_progress_is_not_hung() {
        let lane = Lane::spawn(std::path::Path::new("/"), "t-lane", Arc::default());
        let r = lane
            .run(|beat| {
                let t = Instant::now();
                while t.elapsed() < DEADLINE + Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(50));
                    beat.tick();
                }
                7
            })
            .await;
        assert_eq!(r, Ok(7));
    }
}
