//! Our own inotify watches: one inotify instance per watched folder, and one non-recursive watch
//! on each folder in it, added by the folder's lane.
//!
//! Instead of notify's recursive watch, which walked and stat'ed the whole tree inside `watch()`
//! (on the runtime's thread: ~2 s at 200,000 files, forever on a dead mount) and, when the kernel's
//! watch budget ran out, reported one error for the whole tree (each one a full rescan: 43 rescans
//! for 50 folders):
//! - every watch is added on the folder's own lane, so a hung mount blocks only its lane;
//! - one instance per watched folder: a lookup stuck on one never holds anything another needs;
//! - we know exactly which folder has no watch (ENOSPC), and poll just that one;
//! - a folder is watched by the descriptor a walk without links reached (`/proc/self/fd/N`), so a
//!   folder swapped for a symbolic link between the walk and the watch is never watched through
//!   the link (the last race the file-system adversary found): the watch is on the folder that was walked, or on nothing.
//!
//! Reading events touches only the inotify descriptor, never the watched file system, so it runs
//! on the runtime.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_EXCL_UNLINK
    | libc::IN_ONLYDIR;

/// Why a folder got no watch.
#[derive(Debug)]
pub enum AddError {
    /// The kernel's watch budget is spent (`fs.inotify.max_user_watches`): poll the folder.
    Limit,
    /// Not a folder reached without links (gone, swapped for a link or a file): nothing to watch.
    NotThere(io::Error),
}

/// One event, resolved to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    /// Something happened at `path` (created, written, moved in or out, deleted); `dir` if it is
    /// (or was) a folder.
    At { path: PathBuf, dir: bool },
    /// The kernel dropped events (its queue overflowed): rescan.
    Overflow,
    /// The watched folder `path` itself went: deleted, moved away, its file system unmounted, or
    /// its watch removed by the kernel. For a watched root, this is how its disappearance is
    /// noticed (no polling of the roots).
    SelfGone(PathBuf),
}

#[derive(Default)]
struct Map {
    by_wd: HashMap<i32, PathBuf>,
    by_path: HashMap<PathBuf, i32>,
}

pub struct Inotify {
    fd: OwnedFd,
    map: Mutex<Map>,
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: plain system call; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Inotify {
            // SAFETY: just returned, owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            map: Mutex::default(),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_watched(&self, dir: &Path) -> bool {
        self.map().by_path.contains_key(dir)
    }

    pub fn watches(&self) -> usize {
        self.map().by_wd.len()
    }

    /// Watches folder `dir` (`root` or below it), reached without following links below `root`.
    /// Blocking (a path lookup): call it on the folder's lane.
    pub fn add(&self, root: &Path, dir: &Path) -> Result<(), AddError> {
        let opened = crate::safefs::open_dir_beneath(root, dir).map_err(AddError::NotThere)?;
        if !super::fault::watch_allowed(dir) {
            return Err(AddError::Limit);
        }
        // The descriptor's magic link names exactly the folder opened, whatever happens to the
        // path meanwhile.
        let proc = CString::new(format!("/proc/self/fd/{}", opened.as_raw_fd()))
            .map_err(|e| AddError::NotThere(io::Error::other(e)))?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let mut wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), proc.as_ptr(), MASK) };
        if wd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
            // No /proc: by name, without following a final link, then checked to be the folder
            // that was opened (a swap in between is dropped).
            wd = self.add_by_name(dir, &opened)?;
        }
        if wd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOSPC) => AddError::Limit,
                _ => AddError::NotThere(e),
            });
        }
        let mut m = self.map();
        if let Some(old) = m.by_wd.insert(wd, dir.to_path_buf())
            && old != dir
        {
            // The same folder under a new name (moved within the tree).
            m.by_path.remove(&old);
        }
        if let Some(old_wd) = m.by_path.insert(dir.to_path_buf(), wd)
            && old_wd != wd
        {
            m.by_wd.remove(&old_wd);
        }
        Ok(())
    }

    fn add_by_name(&self, dir: &Path, opened: &OwnedFd) -> Result<i32, AddError> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| AddError::NotThere(io::Error::other(e)))?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK | libc::IN_DONT_FOLLOW)
        };
        if wd < 0 {
            return Ok(wd);
        }
        let same = match (fstat(opened.as_raw_fd()), lstat(&c)) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            _ => false,
        };
        if !same {
            self.rm_wd(wd);
            return Err(AddError::NotThere(io::Error::other(
                "the folder was replaced while its watch was added",
            )));
        }
        Ok(wd)
    }

    /// Watches `dir` by name (following links: it is a configured folder's ancestor, not a path
    /// inside a watched tree) for names appearing in it (`IN_CREATE`, `IN_MOVED_TO`) and for its
    /// own removal. Blocking (a path lookup): call it on a lane.
    pub fn watch_ancestor(&self, dir: &Path) -> io::Result<()> {
        const ANCESTOR: u32 = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR;
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), ANCESTOR) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut m = self.map();
        if let Some(old) = m.by_wd.insert(wd, dir.to_path_buf())
            && old != dir
        {
            m.by_path.remove(&old);
        }
        m.by_path.insert(dir.to_path_buf(), wd);
        Ok(())
    }

    /// The folders watched now.
    pub fn watched(&self) -> Vec<PathBuf> {
        self.map().by_path.keys().cloned().collect()
    }

    /// Drops the watch on exactly `dir` (not those below it). Takes no path lookup.
    pub fn unwatch(&self, dir: &Path) {
        let wd = {
            let mut m = self.map();
            let wd = m.by_path.remove(dir);
            if let Some(wd) = wd {
                m.by_wd.remove(&wd);
            }
            wd
        };
        if let Some(wd) = wd {
            self.rm_wd(wd);
        }
    }

    fn rm_wd(&self, wd: i32) {
        // SAFETY: plain system call on our descriptor; a stale wd is EINVAL, harmless.
        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
    }

    /// Drops the watches on `dir` and every folder below it (moved away or deleted). Takes no
    /// path lookup: safe anywhere.
    pub fn forget_under(&self, dir: &Path) {
        let gone: Vec<i32> = {
            let mut m = self.map();
            let gone: Vec<(PathBuf, i32)> = m
                .by_path
                .iter()
                .filter(|(p, _)| p.starts_with(dir))
                .map(|(p, w)| (p.clone(), *w))
                .collect();
            for (p, w) in &gone {
                m.by_path.remove(p);
                m.by_wd.remove(w);
            }
            gone.into_iter().map(|(_, w)| w).collect()
        };
        for wd in gone {
            self.rm_wd(wd);
        }
    }

    /// Reads what the kernel has (non-blocking): `Ok(None)` when there is nothing now.
    pub fn read(&self, buf: &mut [u8], out: &mut Vec<Raw>) -> io::Result<Option<()>> {
        // SAFETY: reads into a buffer we own, of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(Some(())),
                _ => Err(e),
            };
        }
        let n = n as usize;
        let head = std::mem::size_of::<libc::inotify_event>();
        let mut off = 0;
        let mut m = self.map();
        while off + head <= n {
            // SAFETY: the kernel wrote a whole inotify_event header at `off` (it never splits
            // one); read unaligned, the buffer is bytes.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
            let name_len = ev.len as usize;
            let name_bytes = &buf[off + head..(off + head + name_len).min(n)];
            off += head + name_len;
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                out.push(Raw::Overflow);
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                // The kernel removed the watch (folder deleted, file system unmounted); one we
                // removed ourselves is already out of the map.
                if let Some(p) = m.by_wd.remove(&ev.wd) {
                    if m.by_path.get(&p) == Some(&ev.wd) {
                        m.by_path.remove(&p);
                    }
                    out.push(Raw::SelfGone(p));
                }
                continue;
            }
            if ev.mask & libc::IN_UNMOUNT != 0 {
                if let Some(p) = m.by_wd.get(&ev.wd) {
                    out.push(Raw::SelfGone(p.clone()));
                }
                continue;
            }
            // An event of a watch we dropped or have not recorded yet: the walk that adds a
            // watch lists the folder after adding it, so nothing is lost.
            let Some(dir) = m.by_wd.get(&ev.wd) else {
                continue;
            };
            let name: Vec<u8> = name_bytes.iter().copied().take_while(|b| *b != 0).collect();
            let is_dir = ev.mask & libc::IN_ISDIR != 0;
            let path = if name.is_empty() {
                // About the watched folder itself (deleted, moved).
                dir.clone()
            } else {
                dir.join(std::ffi::OsString::from_vec(name))
            };
            let gone = ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0;
            if gone {
                out.push(Raw::SelfGone(path.clone()));
            }
            out.push(Raw::At {
                path,
                dir: is_dir || gone,
            });
        }
        Ok(Some(()))
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: fstat fills the struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn lstat(path: &CString) -> io::Result<libc::stat> {
    // SAFETY: lstat fills the struct we own; the path is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::lstat(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(ino: &Inotify) -> Vec<Raw> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        while let Some(()) = ino.read(&mut buf, &mut out).unwrap() {}
        out
    }

    #[test]
    fn events_come_with_their_paths_and_a_link_is_never_watched() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        let ino = Inotify::new().unwrap();
        ino.add(&root, &root).unwrap();
        ino.add(&root, &root.join("sub")).unwrap();
        assert!(matches!(
            ino.add(&root, &root.join("link")),
            Err(AddError::NotThere(_))
        ));
        assert_eq!(ino.watches(), 2);
        std::fs::write(root.join("sub/a.wav"), b"x").unwrap();
        std::fs::write(outside.path().join("b.wav"), b"x").unwrap();
        let evs = drain(&ino);
        assert!(evs.contains(&Raw::At {
            path: root.join("sub/a.wav"),
            dir: false
        }));
        assert!(
            evs.iter()
                .all(|e| matches!(e, Raw::At { path, .. } if path.starts_with(&root))),
            "{evs:?}"
        );
        std::fs::remove_dir_all(root.join("sub")).unwrap();
        let _ = drain(&ino);
        assert_eq!(ino.watches(), 1, "a deleted folder's watch is forgotten");
    }

    /// Issue 12.8's last race: the folder a walk found is swapped for a link before its watch is
    /// added. The watch must not land on the link's target.
    #[test]
    fn a_folder_swapped_for_a_link_before_its_watch_is_not_watched_through_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("day")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        // The swap: the walk saw `day` as a folder; it is a link by the time the watch is added.
        std::fs::rename(root.join("day"), d.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("day")).unwrap();
        let ino = Inotify::new().unwrap();
        ino.add(&root, &root).unwrap();
        assert!(matches!(
            ino.add(&root, &root.join("day")),
            Err(AddError::NotThere(_))
        ));
        std::fs::write(outside.path().join("secret.wav"), b"x").unwrap();
        let evs = drain(&ino);
        assert!(
            !evs.iter()
                .any(|e| matches!(e, Raw::At { path, .. } if path.ends_with("secret.wav"))),
            "an event from outside the tree: {evs:?}"
        );
    }
}
