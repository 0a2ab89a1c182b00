//! Owns opening a recording below a watched folder without trusting the file system under it.
//!
//! Anyone who can write into a watched folder can swap a pending recording for a FIFO (whose
//! `open()` blocks until a writer appears: the watcher hung for good), a folder, or a symbolic link
//! to a private file elsewhere (whose content would then be uploaded). So a recording is opened
//! one path component at a time from the watched folder, each with `O_NOFOLLOW`, the file itself
//! also with `O_NONBLOCK`, and only a descriptor that `fstat` says is a regular file is accepted.
//! Everything afterwards (header, open-writer check, upload) reads that descriptor, never the path
//! again, so what is read is what was judged.
//!
//! The watched folder itself may be a symbolic link (an operator's choice); links below it are
//! never followed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Why a path below a watched folder is not a recording we may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotRegular(pub String);

impl std::fmt::Display for NotRegular {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotRegular {}

fn not_regular(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NotRegular(why.into()))
}

/// The reason, when `e` says the path is not a regular file reached without links.
pub fn not_regular_reason(e: &io::Error) -> Option<&str> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<NotRegular>())
        .map(|n| n.0.as_str())
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| not_regular("its name contains a NUL byte"))
}

fn openat(dir: Option<&OwnedFd>, name: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `c` is a valid NUL-terminated string and `at` a descriptor we hold (or AT_FDCWD).
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn kind_of(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a folder",
        libc::S_IFIFO => "a FIFO (named pipe)",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link (not followed)",
        _ => "not a regular file",
    }
}

/// The names from `root` down to `path`, which must lie below it (`..` is refused: it could leave
/// `root` whatever the names before it are).
fn names_below<'p>(root: &Path, path: &'p Path) -> io::Result<Vec<&'p [u8]>> {
    let rel = path.strip_prefix(root).map_err(|_| {
        not_regular(format!(
            "{} is not below the watched folder {}",
            path.display(),
            root.display()
        ))
    })?;
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => parts.push(n.as_bytes()),
            Component::CurDir => {}
            _ => return Err(not_regular("its path leaves the watched folder (`..`)")),
        }
    }
    Ok(parts)
}

/// Opens `path`, which must lie below `root`, read-only and without following any symbolic link
/// below `root`; returns the descriptor only if it is a regular file.
///
/// Errors: `NotFound` when something on the way is gone; an error carrying [`NotRegular`] (see
/// [`not_regular_reason`]) when the path is, or goes through, a link, a FIFO, a folder, a device
/// or anything else that is not a regular file; other I/O errors as they come (EACCES...).
pub fn open_beneath(root: &Path, path: &Path) -> io::Result<File> {
    let parts = names_below(root, path)?;
    let Some((name, dirs)) = parts.split_last() else {
        return Err(not_regular("it is the watched folder itself"));
    };
    let dir = open_dirs(root, dirs)?;
    // O_NONBLOCK: a FIFO put in a recording's place opens at once instead of waiting for a
    // writer (and a file under another process's lease fails instead of blocking). Reads of a
    // regular file ignore it.
    let fd = openat(
        Some(&dir),
        name,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY,
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => not_regular("it is a symbolic link (not followed)"),
        Some(libc::ENXIO) => not_regular("it is a socket or a device"),
        _ => e,
    })?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    {
        use std::os::unix::fs::MetadataExt;
        if !meta.file_type().is_file() {
            return Err(not_regular(format!("it is {}", kind_of(meta.mode()))));
        }
    }
    Ok(file)
}

/// Opens folder `dir` (`root` itself or a folder below it) as an `O_PATH` descriptor, without
/// following any symbolic link below `root`: the exact folder a walk from `root` reaches.
pub fn open_dir_beneath(root: &Path, dir: &Path) -> io::Result<OwnedFd> {
    let parts = names_below(root, dir)?;
    open_dirs(root, &parts)
}

/// `root` (followed if a link), then each of `dirs` below it with `O_NOFOLLOW`.
fn open_dirs(root: &Path, dirs: &[&[u8]]) -> io::Result<OwnedFd> {
    // The root is opened by name and may itself be a link.
    let mut dir = openat(
        None,
        root.as_os_str().as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY,
    )?;
    for d in dirs {
        dir = openat(
            Some(&dir),
            d,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => not_regular(format!(
                "its folder {} is a symbolic link or not a folder (links are not followed)",
                String::from_utf8_lossy(d)
            )),
            _ => e,
        })?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    fn mkfifo(p: &Path) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    fn reason(r: io::Result<File>) -> String {
        let e = r.expect_err("must not open");
        not_regular_reason(&e)
            .unwrap_or_else(|| panic!("not a NotRegular error: {e}"))
            .to_string()
    }

    #[test]
    fn opens_a_regular_file_below_the_root_and_reads_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/c.wav"), b"RIFF").unwrap();
        let mut s = String::new();
        open_beneath(d.path(), &d.path().join("a/b/c.wav"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "RIFF");
        let e = open_beneath(d.path(), &d.path().join("a/none.wav")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("call.wav");
        mkfifo(&p);
        // Before the fix this open() waited for a writer forever.
        let r = reason(open_beneath(d.path(), &p));
        assert!(r.contains("FIFO"), "{r}");
    }

    #[test]
    fn folders_and_links_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.wav");
        std::fs::write(&secret, b"private").unwrap();
        std::fs::create_dir(d.path().join("dir.wav")).unwrap();
        assert!(reason(open_beneath(d.path(), &d.path().join("dir.wav"))).contains("folder"));
        symlink(&secret, d.path().join("link.wav")).unwrap();
        assert!(
            reason(open_beneath(d.path(), &d.path().join("link.wav"))).contains("symbolic link")
        );
        symlink(outside.path(), d.path().join("sub")).unwrap();
        assert!(
            reason(open_beneath(d.path(), &d.path().join("sub/secret.wav")))
                .contains("symbolic link")
        );
        assert!(reason(open_beneath(d.path(), &secret)).contains("not below"));
        assert!(
            reason(open_beneath(
                d.path(),
                &d.path()
                    .join("x/../../")
                    .join(outside.path().file_name().unwrap())
            ))
            .contains("..")
        );
    }

    #[test]
    fn the_watched_folder_itself_may_be_a_link() {
        let real = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::write(real.path().join("a.wav"), b"RIFF").unwrap();
        let root = d.path().join("root");
        symlink(real.path(), &root).unwrap();
        assert!(open_beneath(&root, &root.join("a.wav")).is_ok());
    }
}
