//! The watcher's own metrics (files refused), registered into the daemon's registry by
//! [`crate::metrics`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// `callferry_files_not_queued_total`
pub const FILES_NOT_QUEUED: &str = "callferry_files_not_queued";

#[derive(Debug, Default)]
pub struct WatchMetrics {
    not_queued: Counter,
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
}
