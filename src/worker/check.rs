//! The pre-upload check: the queued version opened from its watched folder without links, and
//! compared with what was queued (inode, device, size, mtime); a job to declare gets its sidecar
//! read on the same trip.

use tracing::warn;

use crate::calls::sidecar::{self, Sidecar};
use crate::queue::Job;

/// A sidecar as [`sidecar::read`] found it.
pub(super) type SidecarRead = Result<Option<Sidecar>, sidecar::SidecarError>;

pub(super) const NOT_THERE: &str = "it is not there";

/// What the pre-upload check found at a job's path.
pub(super) enum Checked {
    /// The queued version, opened (a regular file, reached without links).
    Ready(std::fs::File),
    /// Nothing usable is there any more (why): deleted, moved away, or replaced by a link, a FIFO,
    /// a folder or another file.
    Gone(String),
    /// The file there is the one queued, but it changed since (the reason, for `last_error`).
    Changed(String),
    /// It could not be opened now (EACCES, EIO...): retried.
    Unreadable(std::io::Error),
}

/// Opens a job's file as [`crate::safefs::open_beneath`] does and checks that the descriptor is
/// the version that was judged complete: same size and mtime, and the same inode on the same
/// device (rows queued before those were recorded have 0 there and skip that part).
/// The recording's sidecar as the lane read it (with the recording, for a job to declare). A
/// malformed one is a warning, and the recording goes without it (`Err(())`: do not wait for
/// another).
pub(super) fn sidecar_of(read: Option<SidecarRead>) -> Result<Option<Sidecar>, ()> {
    match read {
        Some(Ok(found)) => Ok(found),
        Some(Err(why)) => {
            warn!(warning = %why, "the recording goes without its sidecar");
            Err(())
        }
        None => Ok(None),
    }
}

pub(super) fn open_queued(job: &Job) -> Checked {
    use std::os::unix::fs::MetadataExt;
    let file = match crate::safefs::open_beneath(&job.fs_root(), &job.fs_path()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Checked::Gone(NOT_THERE.into());
        }
        Err(e) => {
            return match crate::safefs::not_regular_reason(&e) {
                Some(why) => Checked::Gone(format!("its path is no longer a regular file: {why}")),
                None => Checked::Unreadable(e),
            };
        }
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Checked::Unreadable(e),
    };
    if job.ino != 0 && (meta.ino() != job.ino || meta.dev() != job.dev) {
        return Checked::Gone(
            "another file was put in its place (a different inode); the queued recording is not there"
                .into(),
        );
    }
    if !job.is_version(&meta) {
        return Checked::Changed(format!(
            "file changed after it was queued (size {} -> {}); this version is gone, \
             the new version is queued on its own",
            job.size,
            meta.len()
        ));
    }
    Checked::Ready(file)
}

/// Whether the recording a job queued has left its path: nothing there, or another file (a new
/// inode of another size or age: a recorder that reused the name after the call was moved away).
pub(super) fn left_its_path(meta: &std::fs::Metadata, job: &Job) -> bool {
    use std::os::unix::fs::MetadataExt;
    job.ino != 0 && (meta.dev(), meta.ino()) != (job.dev, job.ino) && !job.is_version(meta)
}
