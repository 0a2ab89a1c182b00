//! Fault hooks at the file-system seam, for tests: a folder that stops answering (tests cannot
//! mount a dead NFS share) and an inotify watch budget that runs out. Compiled into debug builds
//! only; in a release build every hook is a no-op the compiler removes.
//!
//! - `CALLFERRY_FAULT_HANG=<path prefix>`: every lane call on a path under the prefix blocks
//!   while the file `<path prefix>.hang` exists (remove it to let the "mount" answer again).
//! - `CALLFERRY_FAULT_WATCHES=<path prefix>:<n>`: after `n` watches under the prefix, adding one
//!   more fails with ENOSPC, as when `fs.inotify.max_user_watches` is reached.
//!
//! In-process tests register the same faults with [`hang`] and [`limit_watches`]; faults are keyed
//! by path prefix, so tests running side by side do not see each other's.

use std::path::Path;
#[cfg(debug_assertions)]
use std::path::PathBuf;

#[cfg(debug_assertions)]
#[derive(Default)]
struct Faults {
    hangs: Vec<PathBuf>,
    /// (prefix, watches left).
    watches: Vec<(PathBuf, u64)>,
}

#[cfg(debug_assertions)]
fn faults() -> std::sync::MutexGuard<'static, Faults> {
    static F: std::sync::OnceLock<std::sync::Mutex<Faults>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let mut f = Faults::default();
        if let Some(p) = std::env::var_os("CALLFERRY_FAULT_HANG") {
            f.hangs.push(PathBuf::from(p));
        }
        if let Some(v) = std::env::var("CALLFERRY_FAULT_WATCHES").ok()
            && let Some((p, n)) = v.rsplit_once(':')
            && let Ok(n) = n.parse()
        {
            f.watches.push((PathBuf::from(p), n));
        }
        std::sync::Mutex::new(f)
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

#[cfg(debug_assertions)]
fn hold_file(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".hang");
    PathBuf::from(s)
}

/// Makes calls on paths under `prefix` hang while `<prefix>.hang` exists (created here).
#[cfg(debug_assertions)]
pub fn hang(prefix: &Path) -> PathBuf {
    let hold = hold_file(prefix);
    std::fs::write(&hold, b"").expect("create the hang's hold file");
    faults().hangs.push(prefix.to_path_buf());
    hold
}

/// After `n` more watches under `prefix`, adding one fails with ENOSPC.
#[cfg(debug_assertions)]
pub fn limit_watches(prefix: &Path, n: u64) {
    faults().watches.push((prefix.to_path_buf(), n));
}

/// Called by a lane before each file-system call on `path`.
#[inline]
pub fn hang_point(path: &Path) {
    #[cfg(debug_assertions)]
    {
        let prefixes: Vec<PathBuf> = faults()
            .hangs
            .iter()
            .filter(|p| path.starts_with(p))
            .cloned()
            .collect();
        for p in prefixes {
            let hold = hold_file(&p);
            while hold.exists() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = path;
}

/// Whether a new inotify watch on `path` may be added (false: fail it with ENOSPC).
#[inline]
pub fn watch_allowed(path: &Path) -> bool {
    #[cfg(debug_assertions)]
    {
        let mut f = faults();
        for (p, left) in f.watches.iter_mut() {
            if path.starts_with(p) {
                if *left == 0 {
                    return false;
                }
                *left -= 1;
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = path;
    true
}
