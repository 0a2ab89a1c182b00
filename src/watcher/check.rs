//! The checks a watched file gets, for a file named by hand (`callferry enqueue`): the same name
//! rules and completeness decision as the watcher's, run at once, with an answer that says what to
//! do about a file that is not complete yet.

use std::path::{Path, PathBuf};

use super::root_of;
use crate::completeness::{
    Decision, NameRules, NameSkip, Pending, Timing, gather_facts, judge, observe,
};
use crate::config::{Config, WatchConfig};
use crate::queue::NewJob;

/// The checks a watched file gets, for a file named by hand (`callferry enqueue`).
pub fn check_file(cfg: &Config, path: &Path, now: i64) -> Result<NewJob, String> {
    let abs = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        _ => format!("cannot access: {e}"),
    })?;
    let meta = std::fs::metadata(&abs).map_err(|e| format!("cannot access: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let w = &cfg.watch;
    let root = root_of(&w.paths, &abs, w.recursive)
        .cloned()
        .or_else(|| abs.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    let rel = abs.strip_prefix(&root).unwrap_or(&abs);
    match NameRules::of(w).check(rel) {
        Ok(()) => {}
        Err(NameSkip::Extension) => {
            let all = w.extensions.join(", ");
            return Err(format!(
                "its extension is not one of watch.extensions ({all})"
            ));
        }
        Err(NameSkip::Ignored) => {
            let all = w.ignore.join(", ");
            return Err(format!("it matches a watch.ignore pattern ({all})"));
        }
    }
    let (stat, facts) = gather_facts(&root, &abs).map_err(|e| format!("cannot be read: {e}"))?;
    match judge(&observe(None, stat, now), &facts, now, Timing::of(w)) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: abs,
            root,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_, why) => Err(not_yet_for_enqueue(w, why)),
        Decision::Reject(why) => Err(why),
    }
}

/// What `callferry enqueue` says of a file that is not complete yet, and what to do about it.
fn not_yet_for_enqueue(w: &WatchConfig, why: Pending) -> String {
    let grace = humantime::format_duration(w.orphan_grace);
    match why {
        Pending::WriterOpen => {
            "it is still open for writing by another process; try again later".into()
        }
        Pending::HeaderNotFinal(h) => format!(
            "its header is not final yet ({h}); it is still being recorded, or wait \
             watch.orphan_grace = {grace} to queue it anyway"
        ),
        Pending::HeaderNotWritten => format!(
            "it is too short to hold its header yet; it is still being recorded (after \
             watch.orphan_grace = {grace} with no change it is refused)"
        ),
        Pending::Settling | Pending::Unreadable(_) | Pending::NoAnswer => format!(
            "it is still being written (modified less than watch.settle = {} ago); try again later",
            humantime::format_duration(w.settle)
        ),
    }
}
