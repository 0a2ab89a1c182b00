//! Owns what the watcher already knows, so a walk can pass over it after one `stat`: every file
//! version the queue knows ([`Known`]), and the recordings workers are looking for ([`Search`]),
//! which a walk reports even when known. Both are shared with the walks on the roots' lanes,
//! which take the lock per lookup.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::sync::Notify;

use crate::completeness::Stat;
use crate::queue::fingerprint;

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
/// (536 ms of CPU per rescan with 20,000 recordings kept). 8 bytes a version, plus the
/// set's slack; shared with the walk on the blocking pool, which takes the lock per lookup.
#[derive(Default)]
pub struct Known(std::sync::Mutex<HashSet<i64, BuildHasherDefault<IdHasher>>>);

impl Known {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<i64, BuildHasherDefault<IdHasher>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn contains(&self, path: &Path, stat: &Stat) -> bool {
        self.set().contains(&version_of(path, stat))
    }
    /// Versions loaded from the queue.
    pub fn extend(&self, versions: impl IntoIterator<Item = i64>) {
        self.set().extend(versions);
    }
    pub fn insert(&self, path: &Path, stat: &Stat) {
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
    pub(crate) wake: Notify,
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
    pub fn wants(&self, s: &Stat) -> bool {
        let w = self.wanted();
        !w.is_empty() && w.contains(&(s.dev, s.ino, s.size, s.mtime_ns))
    }
}
