//! Owns the look inside a candidate: a fresh `fstat` of the opened descriptor, its header, and
//! whether any process has it open for writing. The only I/O of [`crate::completeness`]; the
//! watcher runs it on the file's lane, `callferry enqueue` in place.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Facts, Stat};

pub fn stat_of(meta: &std::fs::Metadata) -> Stat {
    Stat {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        dev: meta.dev(),
        ino: meta.ino(),
    }
}

/// Opens read-only, without following links below `root` and only a regular file (see
/// [`crate::safefs`]); never modifies anything.
pub fn gather_facts(root: &Path, path: &Path) -> std::io::Result<(Stat, Facts)> {
    let f = crate::safefs::open_beneath(root, path)?;
    let meta = f.metadata()?;
    let stat = stat_of(&meta);
    let writers = super::writers::check(&f);
    let mut head = Vec::with_capacity(super::audio::HEAD_LEN);
    f.take(super::audio::HEAD_LEN as u64)
        .read_to_end(&mut head)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let header = super::audio::inspect(&ext, &head, stat.size);
    Ok((stat, Facts { header, writers }))
}
