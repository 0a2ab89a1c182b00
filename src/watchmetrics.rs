//! The watcher's metrics (files refused, folders that do not answer, folders polled for want of
//! an inotify watch), registered into the daemon's registry by [`crate::metrics`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `callferry_files_not_queued_total`
pub const FILES_NOT_QUEUED: &str = "callferry_files_not_queued";
/// `callferry_watch_root_unhealthy{root}`
pub const ROOT_UNHEALTHY: &str = "callferry_watch_root_unhealthy";
/// `callferry_watch_polled_folders`
pub const POLLED_FOLDERS: &str = "callferry_watch_polled_folders";

type RootLabel = [(&'static str, String); 1];

#[derive(Debug, Default)]
pub struct WatchMetrics {
    not_queued: Counter,
    root_unhealthy: Family<RootLabel, Gauge>,
    polled_folders: Gauge,
    /// Full scans finished (not exported; tests wait on it, the startup scan runs after READY).
    scans_done: std::sync::atomic::AtomicU64,
    /// The folders that do not answer now, for `/healthz`.
    unhealthy: std::sync::Mutex<Vec<String>>,
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
            ROOT_UNHEALTHY,
            "1 while a watched folder does not answer (a file-system call on it made no progress \
             for 5 s: a hung NFS or FUSE mount); its recordings wait",
            m.root_unhealthy.clone(),
        );
        registry.register(
            POLLED_FOLDERS,
            "Folders polled every 10 s because no inotify watch could be added \
             (fs.inotify.max_user_watches reached)",
            m.polled_folders.clone(),
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

    pub fn set_root_unhealthy(&self, root: &str, unhealthy: bool) {
        self.root_unhealthy
            .get_or_create(&[("root", root.to_string())])
            .set(i64::from(unhealthy));
    }

    pub fn set_unhealthy_roots(&self, roots: Vec<String>) {
        *self.unhealthy.lock().unwrap_or_else(|e| e.into_inner()) = roots;
    }

    /// The watched folders that do not answer now.
    pub fn unhealthy_roots(&self) -> Vec<String> {
        self.unhealthy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_polled_folders(&self, n: usize) {
        self.polled_folders.set(n as i64);
    }

    pub fn polled_folders(&self) -> i64 {
        self.polled_folders.get()
    }
}
