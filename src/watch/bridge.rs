//! Owns the bridge from a root's inotify descriptor into tokio: the events are read on the
//! runtime (reading them never touches the watched file system) and handed to the watcher through
//! a bounded channel filled with `try_send`. When an event storm fills it, events are dropped and
//! a full rescan is flagged instead, so memory stays bounded and nothing is missed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};
use tracing::error;

use super::inotify::{Inotify, Raw};

/// What a root's inotify reader hands the watcher.
#[derive(Debug)]
pub enum Ev {
    At {
        root: PathBuf,
        path: PathBuf,
        dir: bool,
    },
    /// The kernel dropped this root's events.
    Overflow(PathBuf),
    /// The root itself went (deleted, moved away, unmounted).
    RootGone(PathBuf),
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
pub async fn read_events(
    root: PathBuf,
    ino: Arc<Inotify>,
    tx: mpsc::Sender<Ev>,
    overflow: Arc<AtomicBool>,
    overflow_wake: Arc<Notify>,
) {
    let r = root.clone();
    let hand_over = move |raw: Raw| {
        let ev = match raw {
            Raw::Overflow => Ev::Overflow(r.clone()),
            Raw::At { path, dir } => Ev::At {
                root: r.clone(),
                path,
                dir,
            },
            Raw::SelfGone(p) if p == r => Ev::RootGone(p),
            // A folder below the root: its parent's event (deleted, moved from) says so.
            Raw::SelfGone(_) => return,
        };
        if tx.try_send(ev).is_err() {
            overflow.store(true, Ordering::Relaxed);
            overflow_wake.notify_one();
        }
    };
    pump(&root, ino, hand_over).await
}

/// Reads the instance that watches the nearest existing ancestor of each missing root, and wakes
/// the watcher when a name on the way to one of `wanted` appears there (or an ancestor goes).
/// Names on other paths (a busy spool's other folders) wake nobody.
pub async fn read_ancestors(
    ino: Arc<Inotify>,
    wanted: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    wake: Arc<Notify>,
) {
    let on_the_way = move |raw: Raw| {
        let hit = match &raw {
            Raw::Overflow => true,
            Raw::At { path, .. } | Raw::SelfGone(path) => wanted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|w| w.starts_with(path)),
        };
        if hit {
            wake.notify_one();
        }
    };
    pump(Path::new("(the missing folders' parents)"), ino, on_the_way).await
}

async fn pump(what: &Path, ino: Arc<Inotify>, mut on: impl FnMut(Raw)) {
    let lost = |e: std::io::Error| {
        error!(path = %what.display(), error = %e, "cannot read file events; this folder is found by rescans only");
    };
    // SAFETY: the descriptor stays open as long as the AsyncFd: `Fd` holds the instance that
    // owns it.
    let afd = match unsafe {
        AsyncFd::register_with_interest(Fd(ino.clone()), tokio::io::Interest::READABLE)
    } {
        Ok(a) => a,
        Err(e) => return lost(e.into()),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return;
        };
        match read_some(&ino, &mut buf, &mut out) {
            Ok(true) => guard.clear_ready(),
            Ok(false) => {}
            Err(e) => return lost(e),
        }
        for raw in out.drain(..) {
            on(raw);
        }
    }
}

/// Reads what the descriptor has, up to about 4,096 events (handed over before reading on).
/// `true`: it is drained, and its readiness is to be cleared.
fn read_some(ino: &Inotify, buf: &mut [u8], out: &mut Vec<Raw>) -> std::io::Result<bool> {
    while out.len() < 4096 {
        if ino.read(buf, out)?.is_none() {
            return Ok(true);
        }
    }
    Ok(false)
}
