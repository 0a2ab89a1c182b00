//! The watcher's own metrics (files refused, watched folders that do not answer, folders polled
//! for want of an inotify watch), registered into the daemon's registry by [`crate::metrics`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `callferry_files_not_queued_total`
pub const FILES_NOT_QUEUED: &str = "callferry_files_not_queued";
/// `callferry_watch_roots_unhealthy`
pub const ROOTS_UNHEALTHY: &str = "callferry_watch_roots_unhealthy";
/// `callferry_watch_folders_polled`
pub const FOLDERS_POLLED: &str = "callferry_watch_folders_polled";

#[derive(Debug, Default)]
pub struct WatchMetrics {
    not_queued: Counter,
    roots_unhealthy: Gauge,
    folders_polled: Gauge,
    /// Full scans finished (not exported; tests wait on it, the startup scan runs after READY).
    scans_done: std::sync::atomic::AtomicU64,
}

impl WatchMetrics {
    pub fn register(registry: &mut Registry) -> WatchMetrics {
        let m = WatchMetrics::default();
        registry.register(
            FILES_NOT_QUEUED,
            "Files found in the watched folders and refused: not a recording, or not a regular \
             file reached without links (a FIFO, a folder, a symbolic link)",
            m.not_queued.clone(),
        );
        registry.register(
            ROOTS_UNHEALTHY,
            "Watched folders whose file system does not answer (a hung mount); the others go on",
            m.roots_unhealthy.clone(),
        );
        registry.register(
            FOLDERS_POLLED,
            "Folders polled because no inotify watch could be added (fs.inotify.max_user_watches)",
            m.folders_polled.clone(),
        );
        m
    }

    pub fn scan_done(&self) {
        self.scans_done
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Full scans of every watched folder finished so far (the first is the startup scan).
    pub fn scans_done(&self) -> u64 {
        self.scans_done.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn file_not_queued(&self) {
        self.not_queued.inc();
    }

    pub fn files_not_queued(&self) -> u64 {
        self.not_queued.get()
    }

    pub fn set_roots_unhealthy(&self, n: usize) {
        self.roots_unhealthy.set(n as i64);
    }

    pub fn roots_unhealthy(&self) -> i64 {
        self.roots_unhealthy.get()
    }

    pub fn set_folders_polled(&self, n: usize) {
        self.folders_polled.set(n as i64);
    }

    pub fn folders_polled(&self) -> i64 {
        self.folders_polled.get()
    }
}
