//! The checks a watched file gets, for a file named by hand (`callferry enqueue`): the same name
//! rules and completeness decision as the watcher's, run at once, with an answer that says what to
//! do about a file that is not complete yet.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::root_of;
use crate::completeness::{
    Decision, NameRules, NameSkip, Pending, Timing, gather_facts, judge, observe,
};
use crate::config::{Config, WatchConfig};
use crate::queue::NewJob;

/// Why `callferry enqueue` does not queue a file it was given; said after the file's name.
#[derive(Debug, thiserror::Error)]
pub enum NotQueued {
    #[error("does not exist")]
    Missing,
    #[error("cannot access: {0}")]
    Inaccessible(#[source] std::io::Error),
    #[error("is not a regular file")]
    NotRegular,
    /// The allowed extensions, listed.
    #[error("its extension is not one of watch.extensions ({0})")]
    Extension(String),
    /// The ignore patterns, listed.
    #[error("it matches a watch.ignore pattern ({0})")]
    Ignored(String),
    #[error("cannot be read: {0}")]
    Unreadable(#[source] std::io::Error),
    /// Not complete yet: why, and the settings the advice names.
    #[error("{}", not_yet(.why, *.settle, *.orphan_grace))]
    NotYet {
        why: Pending,
        settle: Duration,
        orphan_grace: Duration,
    },
    /// Judged not a recording (its header or magic bytes), in the completeness rule's words.
    #[error("{0}")]
    NotARecording(String),
}

/// The checks a watched file gets, for a file named by hand (`callferry enqueue`).
pub fn check_file(cfg: &Config, path: &Path, now: i64) -> Result<NewJob, NotQueued> {
    let abs = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => NotQueued::Missing,
        _ => NotQueued::Inaccessible(e),
    })?;
    let meta = std::fs::metadata(&abs).map_err(NotQueued::Inaccessible)?;
    if !meta.is_file() {
        return Err(NotQueued::NotRegular);
    }
    let w = &cfg.watch;
    let root = root_of(&w.paths, &abs, w.recursive)
        .cloned()
        .or_else(|| abs.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    let rel = abs.strip_prefix(&root).unwrap_or(&abs);
    match NameRules::of(w).check(rel) {
        Ok(()) => {}
        Err(NameSkip::Extension) => return Err(NotQueued::Extension(w.extensions.join(", "))),
        Err(NameSkip::Ignored) => return Err(NotQueued::Ignored(w.ignore.join(", "))),
    }
    let (stat, facts) = gather_facts(&root, &abs).map_err(NotQueued::Unreadable)?;
    match judge(&observe(None, stat, now), &facts, now, Timing::of(w)) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: abs,
            root,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_, why) => Err(not_complete(w, why)),
        Decision::Reject(why) => Err(NotQueued::NotARecording(why)),
    }
}

fn not_complete(w: &WatchConfig, why: Pending) -> NotQueued {
    NotQueued::NotYet {
        why,
        settle: w.settle,
        orphan_grace: w.orphan_grace,
    }
}

/// What `callferry enqueue` says of a file that is not complete yet, and what to do about it.
fn not_yet(why: &Pending, settle: Duration, orphan_grace: Duration) -> String {
    let grace = humantime::format_duration(orphan_grace);
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
            humantime::format_duration(settle)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal is a variant the caller can tell apart, said in the words `enqueue` has
    /// always printed.
    #[test]
    fn each_refusal_says_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "[api]\nbase_url = \"http://127.0.0.1:9/v1\"\ntoken = \"t\"\nallow_insecure_http = true\n\
             [watch]\npaths = [{:?}]\nextensions = [\"wav\"]\n\
             [queue]\ndatabase = \"/tmp/q.db\"\n",
            d.path()
        );
        let cfg = crate::config::from_toml_str(&text, &Default::default(), "test").unwrap();
        let e = check_file(&cfg, &d.path().join("none.wav"), 0).unwrap_err();
        assert!(matches!(e, NotQueued::Missing), "{e:?}");
        assert_eq!(e.to_string(), "does not exist");
        std::fs::create_dir(d.path().join("dir.wav")).unwrap();
        let e = check_file(&cfg, &d.path().join("dir.wav"), 0).unwrap_err();
        assert!(matches!(e, NotQueued::NotRegular), "{e:?}");
        std::fs::write(d.path().join("notes.txt"), b"x").unwrap();
        let e = check_file(&cfg, &d.path().join("notes.txt"), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "its extension is not one of watch.extensions (wav)"
        );
        // Written just now: not settled yet, and the advice names the setting.
        std::fs::write(d.path().join("call.wav"), b"RIFF").unwrap();
        let now = crate::clock::now_ms();
        let e = check_file(&cfg, &d.path().join("call.wav"), now).unwrap_err();
        assert!(matches!(e, NotQueued::NotYet { .. }), "{e:?}");
        assert!(e.to_string().contains("watch."), "{e}");
    }
}
