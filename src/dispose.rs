//! Owns what happens to a recording once its upload is committed (`[after_upload]`): kept, moved
//! under `move_to` (keeping its folders, never replacing another call's file), or deleted. Each
//! step is idempotent, so a crash between the queue's commit and the file operation is finished by
//! running it again at the next start.

use std::path::{Path, PathBuf};

use crate::config::{AfterUploadAction, Config};
use crate::queue::{Job, Queue, QueueError};

#[derive(Debug, thiserror::Error)]
pub enum DisposeError {
    /// Without a durable `uploaded` record the file must stay: tried again at the next start.
    #[error("cannot make the upload record durable first: {0}")]
    NotDurable(#[from] QueueError),
    #[error("{0}")]
    Failed(#[from] FileError),
}

/// Why a move or delete did not happen. The file is left where it is (a move never leaves half a
/// copy), and the step is tried again at the next start.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A call on one path failed: `what` is the call in words (stat, delete, create, ...).
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Neither the recording nor a moved copy of it is there.
    #[error("{} is gone and {} does not exist", src.display(), dest.display())]
    Gone { src: PathBuf, dest: PathBuf },
    #[error("cannot move {} to {}: {source}", src.display(), at.display())]
    Move {
        src: PathBuf,
        at: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot move {}: {} and {MOVE_NAME_TRIES} suffixed names are taken",
        src.display(),
        dest.display()
    )]
    NamesTaken { src: PathBuf, dest: PathBuf },
    /// A step of a copy across file systems (the copy, its flush, its rename into place).
    #[error("{what}: {source}")]
    Copy {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("copied, but cannot remove {}: {source}", src.display())]
    CopiedNotRemoved {
        src: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking task that does it panicked.
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A failed call on `path`, for `map_err`.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError::Io { what, path, source }
}

/// Carries out `[after_upload] action` for an uploaded job. `Ok(None)`: nothing to do (`keep`);
/// `Ok(Some(what))`: done, in words for the job's events.
pub async fn after_upload(
    cfg: &Config,
    queue: &Queue,
    job: &Job,
) -> Result<Option<String>, DisposeError> {
    let action = cfg.after_upload.action;
    if action == AfterUploadAction::Keep {
        return Ok(None);
    }
    queue.make_durable().await?;
    let path = job.fs_path();
    let done = match action {
        // Off the runtime's thread, as the move: the watched folder may be on a mount that
        // stops answering (the worker checks its lanes first, see `watch::Roots`).
        AfterUploadAction::Delete => {
            let job = job.clone();
            tokio::task::spawn_blocking(move || delete(&path, &job))
                .await
                .unwrap_or_else(|source| {
                    Err(FileError::Task {
                        what: "delete",
                        source,
                    })
                })
        }
        AfterUploadAction::Move => {
            let dest_root = cfg.after_upload.move_to.clone().unwrap_or_default();
            let rel = path
                .strip_prefix(job.fs_root())
                .unwrap_or(Path::new(path.file_name().unwrap_or_default()));
            let dest = dest_root.join(rel);
            let job = job.clone();
            tokio::task::spawn_blocking(move || move_to(&path, &dest, &job))
                .await
                .unwrap_or_else(|source| {
                    Err(FileError::Task {
                        what: "move",
                        source,
                    })
                })
        }
        AfterUploadAction::Keep => unreachable!(),
    };
    Ok(Some(done?))
}

fn delete(path: &Path, job: &Job) -> Result<String, FileError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok("deleted (already gone)".into()),
        Err(e) => Err(io("stat", path)(e)),
        Ok(m) if !job.is_version(&m) => {
            Ok("kept: the file changed after upload (a new version)".into())
        }
        Ok(_) => std::fs::remove_file(path)
            .map(|_| "deleted".to_string())
            .map_err(io("delete", path)),
    }
}

/// The names a moved recording may take at `dest`, in order: the plain name first, then (if another
/// call already holds it, recorders reuse names) the name with this call's interaction id before
/// the extension, then that with a counter. Deterministic, so a re-run after a crash finds them.
fn move_names(dest: &Path, job: &Job) -> impl Iterator<Item = PathBuf> {
    let tag = job
        .interaction_id
        .clone()
        .unwrap_or_else(|| format!("job-{}", job.id));
    let stem = dest
        .file_stem()
        .map(|s| s.to_os_string())
        .unwrap_or_default();
    let ext = dest.extension().map(|e| e.to_os_string());
    let first = dest.to_path_buf();
    let dest = dest.to_path_buf();
    std::iter::once(first).chain((1..=MOVE_NAME_TRIES).map(move |n| {
        let mut name = stem.clone();
        name.push(format!(".{tag}"));
        if n > 1 {
            name.push(format!(".{n}"));
        }
        if let Some(ext) = &ext {
            name.push(".");
            name.push(ext);
        }
        dest.with_file_name(name)
    }))
}

/// Suffixed names tried before a move gives up (each taken by another file).
const MOVE_NAME_TRIES: u32 = 100;

fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// How a file is put at a name that must not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoReplace {
    /// `renameat2(RENAME_NOREPLACE)`: atomic, the kernel refuses an existing name.
    Rename,
    /// `link` then `unlink`, for file systems without RENAME_NOREPLACE: `link` refuses an existing
    /// name just as atomically; a crash between the two leaves both names, which a re-run sees.
    /// In the daemon it is reached through `Rename`'s fallback; only the tests ask for it first.
    #[cfg_attr(not(test), allow(dead_code))]
    LinkUnlink,
}

/// Moves `src` to `dst` unless `dst` exists (`AlreadyExists`). Never replaces a file.
fn rename_noreplace(src: &Path, dst: &Path, how: NoReplace) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if how == NoReplace::Rename {
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
        };
        let (s, d) = (c(src)?, c(dst)?);
        // SAFETY: two valid NUL-terminated paths, relative to the working directory.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                s.as_ptr(),
                libc::AT_FDCWD,
                d.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // EINVAL/ENOSYS/EOPNOTSUPP: this file system (or kernel) has no RENAME_NOREPLACE.
        if !matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
        ) {
            return Err(e);
        }
    }
    std::fs::hard_link(src, dst)?;
    std::fs::remove_file(src)
}

fn move_to(src: &Path, dest: &Path, job: &Job) -> Result<String, FileError> {
    move_with(src, dest, job, NoReplace::Rename)
}

fn move_with(src: &Path, dest: &Path, job: &Job, how: NoReplace) -> Result<String, FileError> {
    let done = |at: &Path| format!("moved to {}", at.display());
    let src_meta = match std::fs::symlink_metadata(src) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Moved by an earlier run whose record a crash prevented, or removed by someone. The
            // moved file keeps its inode on one file system; a copy across file systems does not.
            let names: Vec<PathBuf> = move_names(dest, job).collect();
            let same = names.iter().find(|n| {
                use std::os::unix::fs::MetadataExt;
                std::fs::symlink_metadata(n).is_ok_and(|m| m.ino() == job.ino && m.dev() == job.dev)
            });
            return match same.or_else(|| names.iter().find(|n| n.exists())) {
                Some(at) => Ok(done(at)),
                None => Err(FileError::Gone {
                    src: src.to_path_buf(),
                    dest: dest.to_path_buf(),
                }),
            };
        }
        Err(e) => return Err(io("stat", src)(e)),
        Ok(m) if !job.is_version(&m) => {
            return Ok("kept: the file changed after upload (a new version)".into());
        }
        Ok(m) => m,
    };
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    for at in move_names(dest, job) {
        match rename_noreplace(src, &at, how) {
            Ok(()) => return Ok(done(&at)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Our own link from a run that a crash stopped before the unlink: finish it.
                if std::fs::symlink_metadata(&at).is_ok_and(|m| same_inode(&m, &src_meta)) {
                    std::fs::remove_file(src).map_err(io("remove", src))?;
                    return Ok(done(&at));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                return move_across(src, dest, job);
            }
            Err(source) => {
                return Err(FileError::Move {
                    src: src.to_path_buf(),
                    at,
                    source,
                });
            }
        }
    }
    Err(FileError::NamesTaken {
        src: src.to_path_buf(),
        dest: dest.to_path_buf(),
    })
}

/// Across file systems: copy to a temporary name beside the destination, flush, link it into place
/// under the first free name (never replacing one), then remove the source. A crash at any point
/// leaves the source intact.
fn move_across(src: &Path, dest: &Path, job: &Job) -> Result<String, FileError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".callferry-move-")
        .tempfile_in(dir)
        .map_err(io("create a temporary file in", dir))?;
    let mut input = std::fs::File::open(src).map_err(io("open", src))?;
    let step = |what| move |source| FileError::Copy { what, source };
    std::io::copy(&mut input, tmp.as_file_mut()).map_err(step("copy failed"))?;
    tmp.as_file().sync_all().map_err(step("fsync failed"))?;
    for at in move_names(dest, job) {
        match tmp.persist_noclobber(&at) {
            Ok(_) => {
                std::fs::remove_file(src).map_err(|source| FileError::CopiedNotRemoved {
                    src: src.to_path_buf(),
                    source,
                })?;
                return Ok(format!("moved to {}", at.display()));
            }
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => tmp = e.file,
            Err(e) => return Err(step("cannot rename into place")(e.error)),
        }
    }
    Err(FileError::NamesTaken {
        src: src.to_path_buf(),
        dest: dest.to_path_buf(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::queue::State;

    /// A job for the file at `path` as it is now, uploaded as `iid`.
    pub(crate) fn job_for(path: &Path, iid: &str) -> Job {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        Job {
            id: 7,
            path: path.to_string_lossy().into_owned(),
            root: path.parent().unwrap().to_string_lossy().into_owned(),
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            dev: m.dev(),
            ino: m.ino(),
            state: State::Uploaded,
            attempts: 0,
            next_attempt_at: 0,
            interaction_id: Some(iid.into()),
            upload_status: Some(201),
            last_error: None,
            created_at: 0,
            updated_at: 0,
            uploaded_at: Some(0),
            follow_at: None,
            follow_attempts: 0,
            service_status: None,
            results_written: vec![],
            orphans: 0,
            external_id: None,
            source: None,
            hook: None,
            held_by: None,
        }
    }

    /// Both ways of moving without replacing: a second call with the same name lands beside the
    /// first under its interaction id, a third under the id and a counter; a re-run is a no-op.
    #[test]
    fn moves_never_replace_and_rerun_cleanly() {
        for how in [NoReplace::Rename, NoReplace::LinkUnlink] {
            let d = tempfile::tempdir().unwrap();
            let (rec, done) = (d.path().join("rec"), d.path().join("done"));
            std::fs::create_dir_all(&rec).unwrap();
            let src = rec.join("call.wav");
            let dest = done.join("call.wav");
            let mut placed = Vec::new();
            for (n, iid) in ["first", "second", "second"].iter().enumerate() {
                std::fs::write(&src, format!("call {n}")).unwrap();
                let job = job_for(&src, iid);
                let what = move_with(&src, &dest, &job, how).unwrap();
                assert!(!src.exists());
                // Run again (a crash before the record): nothing moves, the same place is named.
                assert_eq!(move_with(&src, &dest, &job, how).unwrap(), what);
                placed.push(what);
            }
            assert_eq!(std::fs::read(&dest).unwrap(), b"call 0", "{how:?}");
            assert_eq!(
                std::fs::read(done.join("call.second.wav")).unwrap(),
                b"call 1"
            );
            assert_eq!(
                std::fs::read(done.join("call.second.2.wav")).unwrap(),
                b"call 2"
            );
            assert!(placed[2].ends_with("call.second.2.wav"), "{placed:?}");
        }
    }

    /// A failed move or delete says what failed, as a type the caller can tell apart, with the
    /// words the job's record has always had.
    #[test]
    fn a_failed_move_or_delete_says_what_failed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("call.wav");
        std::fs::write(&src, b"audio").unwrap();
        let job = job_for(&src, "iid");
        std::fs::remove_file(&src).unwrap();
        let dest = d.path().join("done/call.wav");
        let e = move_with(&src, &dest, &job, NoReplace::Rename).unwrap_err();
        assert!(matches!(&e, FileError::Gone { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{} is gone and {} does not exist",
                src.display(),
                dest.display()
            )
        );
        // A destination folder that cannot be made: a file stands where it would be.
        std::fs::write(&src, b"audio").unwrap();
        let job = job_for(&src, "iid");
        std::fs::write(d.path().join("done"), b"not a folder").unwrap();
        let e = move_with(&src, &dest, &job, NoReplace::Rename).unwrap_err();
        assert!(matches!(&e, FileError::Io { what: "create", .. }), "{e:?}");
        assert!(e.to_string().starts_with("cannot create "), "{e}");
        assert!(
            src.exists(),
            "a failed move leaves the recording where it is"
        );
    }

    /// A crash between the link and the unlink of the fallback leaves both names: the re-run
    /// removes the source instead of making a third name.
    #[test]
    fn an_interrupted_link_then_unlink_is_finished() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("call.wav");
        std::fs::write(&src, b"audio").unwrap();
        let job = job_for(&src, "iid");
        let dest = d.path().join("done/call.wav");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::hard_link(&src, &dest).unwrap();
        let what = move_with(&src, &dest, &job, NoReplace::LinkUnlink).unwrap();
        assert_eq!(what, format!("moved to {}", dest.display()));
        assert!(!src.exists());
        assert_eq!(
            std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
