//! Where each result goes and how it gets there: its path below `output_dir`, a fetch streamed
//! into a temporary file beside it, and the atomic rename into place.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::api::ApiError;
use crate::config::Config;
use crate::queue::Job;

/// Where one result kind of a recording goes: `<output_dir>/<path relative to its watched
/// folder>.<kind>.json` (`.txt` for the text transcript). For the first call recorded at a path;
/// see [`result_path_for`].
pub fn result_path(output_dir: &Path, job: &Job, kind: &str) -> PathBuf {
    result_path_for(output_dir, job, kind, false)
}

/// Every file the follower may have written for this job: each kind (and the text rendering)
/// under the name carrying its interaction id, and, unless an earlier call was recorded at the
/// same path (whose files those are), under the plain name.
pub fn result_files(cfg: &Config, job: &Job, later_call: bool) -> Vec<PathBuf> {
    let dir = &cfg.results.output_dir;
    let mut kinds: Vec<&str> = cfg.results.kinds.iter().map(String::as_str).collect();
    for k in ["transcript", "punctuated", "ai", "text"] {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let mut out = Vec::new();
    for k in kinds {
        if job.interaction_id.is_some() {
            out.push(result_path_for(dir, job, k, true));
        }
        if !later_call {
            out.push(result_path_for(dir, job, k, false));
        }
    }
    out
}

/// Where one result kind goes, for a recording that may not be the first call at its path.
/// `later_call`: an earlier job was recorded at the same path (recorders reuse names per line or
/// per day), so this one's results carry its interaction id (`<rel>.<interaction id>.<kind>.json`)
/// and never replace the first call's, which keeps the plain name it always had.
pub fn result_path_for(output_dir: &Path, job: &Job, kind: &str, later_call: bool) -> PathBuf {
    let (path, root) = (job.fs_path(), job.fs_root());
    let rel = path
        .strip_prefix(&root)
        .ok()
        .filter(|r| !r.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new(path.file_name().unwrap_or_default()));
    let mut name = rel.as_os_str().to_owned();
    if later_call {
        // Without an id (cannot happen for a followed job) the job id still keeps them apart.
        match &job.interaction_id {
            Some(iid) => name.push(format!(".{iid}")),
            None => name.push(format!(".job-{}", job.id)),
        }
    }
    if kind == "text" {
        name.push(".txt");
    } else {
        name.push(format!(".{kind}.json"));
    }
    output_dir.join(name)
}

pub(super) fn endpoint(kind: &str, id: &str) -> String {
    match kind {
        "transcript" => format!("interactions/{id}/transcript"),
        "punctuated" => format!("interactions/{id}/transcripts/punctuated"),
        _ => format!("interactions/{id}/ai"),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, 0640, rename,
/// fsync of the folder. Readers see the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".callferry-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o640))?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Why a result could not be delivered this time.
pub(super) enum Undelivered {
    /// The API's answer: classified like any other API failure.
    Api(ApiError),
    /// Our disk: asked for again later, costing nothing.
    Write(String),
}

/// Streams the answer to `tail` into a new temporary file in `dir` and checks that it is JSON.
/// The file is removed again unless the caller persists it.
pub(super) async fn fetch_to_temp(
    api: &crate::api::ApiClient,
    tail: &str,
    dir: &Path,
    cap: u64,
) -> Result<(std::fs::File, tempfile::TempPath), Undelivered> {
    use tokio::io::AsyncWriteExt;
    let d = dir.to_path_buf();
    let tmp = tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&d)?;
        tempfile::Builder::new()
            .prefix(".callferry-")
            .suffix(".tmp")
            .tempfile_in(&d)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
    .map_err(|e| Undelivered::Write(format!("cannot create a file in {}: {e}", dir.display())))?;
    let (file, temp_path) = tmp.into_parts();
    let mut out = tokio::fs::File::from_std(file);
    let written = match api.get_to_file(tail, &mut out, cap).await {
        Ok(n) => n,
        Err(ApiError::Local(m)) => return Err(Undelivered::Write(m)),
        Err(e) => return Err(Undelivered::Api(e)),
    };
    out.flush()
        .await
        .map_err(|e| Undelivered::Write(format!("cannot write {}: {e}", temp_path.display())))?;
    let file = out.into_std().await;
    let what = tail.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        let mut f = &file;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| Undelivered::Write(e.to_string()))?;
        // Streamed through, not parsed into a tree: checking costs no memory.
        serde_json::from_reader::<_, serde::de::IgnoredAny>(std::io::BufReader::new(f)).map_err(
            |e| {
                Undelivered::Api(ApiError::Protocol(format!(
                    "{what} answered with a body that is not JSON ({e}; {written} bytes)"
                )))
            },
        )?;
        Ok((file, temp_path))
    })
    .await
    .unwrap_or_else(|e| Err(Undelivered::Write(e.to_string())))
}

/// Makes a fetched temporary file the result at `dest` (see [`write_atomic`]).
pub(super) fn persist(
    file: std::fs::File,
    temp: tempfile::TempPath,
    dest: &Path,
) -> std::io::Result<()> {
    file.sync_all()?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o640))?;
    temp.persist(dest).map_err(|e| e.error)?;
    std::fs::File::open(dest.parent().unwrap_or(Path::new(".")))?.sync_all()
}
