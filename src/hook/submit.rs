//! The hook's side (`callferry enqueue --now`): where the drop folder is, and writing a request
//! into it durably, with advice when the folder is not set up.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{DEFAULT_DIR, DIR_ENV, GROUP, MAX_REQUEST, Request, SUFFIX, TEMP_PREFIX};

/// Where the hook drops its request: `--hook-dir`, else [`DIR_ENV`], else [`DEFAULT_DIR`].
pub fn hook_dir(arg: Option<&Path>, env: &BTreeMap<String, String>) -> PathBuf {
    arg.map(Path::to_path_buf)
        .or_else(|| {
            env.get(DIR_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Why a request could not be written.
#[derive(Debug)]
pub enum SubmitError {
    /// The drop folder is missing or not writable by this user: an admin's to fix (exit 78).
    Setup(String),
    /// Anything else (a full disk, an I/O error): exit 1.
    Failed(String),
}

fn who() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory we own, sized as passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res) };
    if rc == 0 && !res.is_null() {
        // SAFETY: getpwuid_r filled pw_name with a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
        return name.to_string_lossy().into_owned();
    }
    format!("uid {uid}")
}

fn setup_advice(dir: &Path) -> String {
    format!(
        "as root: install -d -o callferry -g {GROUP} -m 3730 {d} (the package does this), and \
         usermod -aG {GROUP} {user}, then restart the recorder so it runs with the new group",
        d = dir.display(),
        user = who(),
    )
}

/// Writes `req` into `dir` durably: a temporary name, flushed, renamed to `<uuid>.req`, and the
/// rename flushed. Returns the request's path.
///
/// The folder cannot be opened by the group (it is not listable), so its entry is made durable by
/// flushing the renamed file once more: the rename changes the file's ctime, which puts the new
/// entry in the journal commit that this fsync waits for (ext4, XFS, btrfs). Where the folder can
/// be opened (root, another layout) it is flushed too.
pub fn submit(dir: &Path, req: &Request) -> Result<PathBuf, SubmitError> {
    let body = serde_json::to_vec(req).map_err(|e| SubmitError::Failed(e.to_string()))?;
    if body.len() as u64 > MAX_REQUEST {
        return Err(SubmitError::Failed(format!(
            "the request would be {} bytes, more than {MAX_REQUEST}",
            body.len()
        )));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SubmitError::Setup(format!(
                "the hook folder {} is not a folder; {}",
                dir.display(),
                setup_advice(dir)
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SubmitError::Setup(format!(
                "the hook folder {} does not exist; {} (a daemon with another [watch] hook_dir \
                 needs the same --hook-dir or {DIR_ENV} here)",
                dir.display(),
                setup_advice(dir)
            )));
        }
        Err(e) => {
            return Err(SubmitError::Setup(format!(
                "{} cannot reach the hook folder {}: {e}; {}",
                who(),
                dir.display(),
                setup_advice(dir)
            )));
        }
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = dir.join(format!("{TEMP_PREFIX}{id}"));
    let fin = dir.join(format!("{id}{SUFFIX}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                SubmitError::Setup(format!(
                    "{} cannot write into the hook folder {}: {e}; {}",
                    who(),
                    dir.display(),
                    setup_advice(dir)
                ))
            }
            _ => SubmitError::Failed(format!("cannot create {}: {e}", tmp.display())),
        })?;
    let written = (|| {
        // The daemon reads it as another user; a recorder's umask (027) must not hide it. Only
        // the folder's owner and group can reach it anyway.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &fin)?;
        f.sync_all()?;
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&fin);
        return Err(SubmitError::Failed(format!(
            "cannot write the request into {}: {e}",
            dir.display()
        )));
    }
    Ok(fin)
}
