//! Vetting one request, trusting nothing in it: the file read without following links and
//! checked strictly, its recording located below a watched folder (through the folder's link, if
//! it is one), and the recording given the watcher's checks minus the settle wait.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::completeness::{
    Decision, NameRules, NameSkip, Pending, Timing, gather_facts, judge, observe,
};
use crate::config::Config;
use crate::queue::NewJob;
use crate::watch::Roots;

use super::{MAX_REQUEST, Request, RequestError};

/// Why a request file is refused before its recording is looked at.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("it is a symbolic link")]
    Symlink,
    #[error("cannot open it: {0}")]
    Open(#[source] std::io::Error),
    #[error("cannot stat it: {0}")]
    Stat(#[source] std::io::Error),
    #[error("it is not a regular file")]
    NotRegular,
    #[error("it has {0} hard links (a request has one)")]
    Links(u64),
    #[error("it is {0} bytes, more than the {MAX_REQUEST} a request may be")]
    TooBig(u64),
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("it grew past {MAX_REQUEST} bytes")]
    Grew,
    /// serde's reason, cut to 200 bytes: a request's content is not echoed at length.
    #[error("it is not a valid request: {0}")]
    NotJson(String),
    #[error("{0}")]
    Rules(#[from] RequestError),
    /// The blocking task that reads it panicked.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A request's recording is not below any watched folder.
#[derive(Debug, thiserror::Error)]
#[error("{} is not inside a watched folder ({folders})", path.display())]
pub(super) struct NotWatched {
    path: PathBuf,
    /// The watched folders, listed for the log (", not recursive" when subfolders are not).
    folders: String,
}

/// Reads one request, trusting nothing: no link followed, a regular file with one link (a hard
/// link to someone else's file is not a request), at most [`MAX_REQUEST`] bytes, strict JSON.
/// Returns its owner's uid (once known) and it.
pub(super) fn read_request(dir: &Path, name: &OsStr) -> (Option<u32>, Result<Request, ReadError>) {
    let mut uid = None;
    let r = read_request_as(dir, name, &mut uid);
    (uid, r)
}

pub(super) fn read_request_as(
    dir: &Path,
    name: &OsStr,
    uid: &mut Option<u32>,
) -> Result<Request, ReadError> {
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ReadError::Symlink,
            _ => ReadError::Open(e),
        })?;
    let m = f.metadata().map_err(ReadError::Stat)?;
    *uid = Some(m.uid());
    if !m.is_file() {
        return Err(ReadError::NotRegular);
    }
    if m.nlink() != 1 {
        return Err(ReadError::Links(m.nlink()));
    }
    if m.len() > MAX_REQUEST {
        return Err(ReadError::TooBig(m.len()));
    }
    let mut body = Vec::with_capacity(m.len() as usize);
    f.take(MAX_REQUEST + 1)
        .read_to_end(&mut body)
        .map_err(ReadError::Read)?;
    if body.len() as u64 > MAX_REQUEST {
        return Err(ReadError::Grew);
    }
    let req: Request = serde_json::from_slice(&body).map_err(|e| {
        let mut why = e.to_string();
        why.truncate(200);
        ReadError::NotJson(why)
    })?;
    req.validate()?;
    Ok(req)
}

/// The watched folder `path` is below, and the path as the watcher names it (below that folder as
/// configured). A path through a watched folder's real location (the folder is a link) is named
/// through the link, so the watcher and the hook find one job.
pub(super) async fn locate(
    cfg: &Config,
    roots: &Roots,
    path: &Path,
) -> Result<(PathBuf, PathBuf), NotWatched> {
    let watched = &cfg.watch.paths;
    let recursive = cfg.watch.recursive;
    if let Some(r) = crate::watcher::root_of(watched, path, recursive) {
        return Ok((r.clone(), path.to_path_buf()));
    }
    for r in watched {
        let rr = r.clone();
        let Ok(Ok(real)) = roots
            .get(r)
            .scan
            .run(move |_| std::fs::canonicalize(&rr))
            .await
        else {
            continue;
        };
        if let Ok(rel) = path.strip_prefix(&real)
            && !rel.as_os_str().is_empty()
        {
            let named = r.join(rel);
            if let Some(root) = crate::watcher::root_of(watched, &named, recursive) {
                return Ok((root.clone(), named));
            }
        }
    }
    let listed: Vec<String> = watched.iter().map(|p| p.display().to_string()).collect();
    Err(NotWatched {
        path: path.to_path_buf(),
        folders: format!(
            "{}{}",
            listed.join(", "),
            if recursive { "" } else { ", not recursive" }
        ),
    })
}

pub(super) enum Verdict {
    Refuse(String),
    /// Still being written; looked at again.
    NotYet(String),
}

/// The watcher's checks, minus the settle wait: the recorder says the call is over.
pub(super) fn check(cfg: &Config, root: &Path, path: &Path, now: i64) -> Result<NewJob, Verdict> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    match NameRules::of(&cfg.watch).check(rel) {
        Ok(()) => {}
        Err(NameSkip::Extension) => {
            return Err(Verdict::Refuse(format!(
                "its extension is not one of watch.extensions ({})",
                cfg.watch.extensions.join(", ")
            )));
        }
        Err(NameSkip::Ignored) => {
            return Err(Verdict::Refuse(format!(
                "it matches a watch.ignore pattern ({})",
                cfg.watch.ignore.join(", ")
            )));
        }
    }
    let (stat, facts) = gather_facts(root, path).map_err(|e| {
        Verdict::Refuse(match crate::safefs::not_regular_reason(&e) {
            Some(why) => why.to_string(),
            None if e.kind() == std::io::ErrorKind::NotFound => "it does not exist".into(),
            None => format!("it cannot be read: {e}"),
        })
    })?;
    let timing = Timing {
        settle: Duration::ZERO,
        orphan_grace: cfg.watch.orphan_grace,
    };
    match judge(&observe(None, stat, now), &facts, now, timing) {
        Decision::Complete | Decision::CompleteAnyway(_) => Ok(NewJob {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            dev: stat.dev,
            ino: stat.ino,
        }),
        Decision::NotYet(_, Pending::WriterOpen) => Err(Verdict::NotYet(
            "a process still has it open for writing".into(),
        )),
        Decision::NotYet(_, why) => Err(Verdict::NotYet(why.to_string())),
        Decision::Reject(why) => Err(Verdict::Refuse(why)),
    }
}
