//! `callferry enqueue FILE...`: backfill by hand, with the watcher's checks, in batches.

use std::path::PathBuf;

use super::{EXIT_FAILURE, EXIT_OK, out, tell};
use crate::app::AppError;
use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{Enqueued, OpenMode};

/// Files queued per transaction by `enqueue`: few enough that the daemon waits only briefly for the
/// write lock, many enough that 10,000 files are a handful of commits.
const ENQUEUE_BATCH: usize = 500;

pub(super) async fn enqueue(cfg: &Config, files: &[PathBuf]) -> Result<i32, AppError> {
    let q = crate::app::command_queue(cfg, OpenMode::Create).await?;
    let mut code = EXIT_OK;
    let mut result = Ok(());
    for chunk in files.chunks(ENQUEUE_BATCH) {
        let mut jobs = Vec::with_capacity(chunk.len());
        for f in chunk {
            match crate::watcher::check_file(cfg, f, now_ms()) {
                Ok(job) => jobs.push(job),
                Err(why) => {
                    tell(&format!("skipped  {}: {why}", f.display()));
                    code = EXIT_FAILURE;
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        // A batch that fails is reported file by file and the rest go on; what was queued is
        // the daemon's to take at once, whatever happens later.
        let lines = match q.enqueue(&jobs, now_ms()).await {
            Ok(outcomes) => {
                q.wake_daemon();
                jobs.iter()
                    .zip(&outcomes)
                    .map(|(job, o)| match o {
                        Enqueued::New { id, .. } => {
                            format!("queued   #{id} {}\n", job.path.display())
                        }
                        Enqueued::SameFile { existing, path } => format!(
                            "known    {} (same file as job #{existing}, {path})\n",
                            job.path.display()
                        ),
                        Enqueued::Known => format!(
                            "known    {} (this version is already queued)\n",
                            job.path.display()
                        ),
                    })
                    .collect::<String>()
            }
            Err(e) => {
                for job in &jobs {
                    tell(&format!("failed   {}: not queued: {e}", job.path.display()));
                }
                code = EXIT_FAILURE;
                continue;
            }
        };
        // A closed stdout does not stop the backfill half-way: every file is still queued.
        if result.is_ok() {
            result = out(&mut std::io::stdout().lock(), &lines);
        }
    }
    q.wake_daemon();
    result?;
    Ok(code)
}

/// `callferry enqueue --now … FILE`: the recorder's end-of-call hook. Writes one request into the
/// hook folder and returns the exit code: 0 once it is on disk, 78 when the folder is missing or
/// not writable by this user (the admin's to fix), 2 for a usage error, 1 otherwise.
pub(super) fn enqueue_now(
    files: &[PathBuf],
    external_id: Option<&str>,
    meta: &[String],
    hook_dir: Option<&std::path::Path>,
    urlencoded: bool,
    env: &std::collections::BTreeMap<String, String>,
) -> i32 {
    use crate::hook;
    let req = match hook_request(files, external_id, meta, urlencoded) {
        Ok(req) => req,
        Err(Usage(m)) => {
            tell(&format!("callferry enqueue --now: {m}"));
            return super::EXIT_USAGE;
        }
    };
    let dir = hook::hook_dir(hook_dir, env);
    match hook::submit(&dir, &req) {
        Ok(written) => {
            let _ = out(
                &mut std::io::stdout().lock(),
                &format!(
                    "requested {} ({})\n",
                    req.path().display(),
                    written.file_name().unwrap_or_default().to_string_lossy()
                ),
            );
            EXIT_OK
        }
        Err(hook::SubmitError::Setup(m)) => {
            tell(&format!("callferry enqueue --now: {m}"));
            super::EXIT_CONFIG
        }
        Err(hook::SubmitError::Failed(m)) => {
            tell(&format!("callferry enqueue --now: {m}"));
            EXIT_FAILURE
        }
    }
}

/// A mistake in the hook's arguments (exit 64), as the recorder's log will show it.
struct Usage(String);

/// The request the hook's arguments describe, checked by the rules the daemon applies too.
fn hook_request(
    files: &[PathBuf],
    external_id: Option<&str>,
    meta: &[String],
    urlencoded: bool,
) -> Result<crate::hook::Request, Usage> {
    let [file] = files else {
        return Err(Usage(
            "takes exactly one FILE (the recording whose call just ended)".into(),
        ));
    };
    let external_id = external_id
        .map(|s| decoded(s, urlencoded))
        .transpose()
        .map_err(|e| Usage(format!("--external-id {e}")))?;
    let pairs = meta_pairs(meta, urlencoded)?;
    let path = recording_path(file)?;
    let req = crate::hook::Request::new(&path, external_id, pairs);
    req.validate().map_err(|e| Usage(e.to_string()))?;
    Ok(req)
}

/// A value as given, or `%XX`-decoded with `--urlencoded`.
fn decoded(s: &str, urlencoded: bool) -> Result<String, crate::hook::DecodeError> {
    if urlencoded {
        crate::hook::percent_decode(s)
    } else {
        Ok(s.to_string())
    }
}

/// The `--meta KEY=VALUE` pairs: each key once, each key a valid one.
fn meta_pairs(
    meta: &[String],
    urlencoded: bool,
) -> Result<std::collections::BTreeMap<String, String>, Usage> {
    let mut pairs = std::collections::BTreeMap::new();
    for m in meta {
        let Some((k, v)) = m.split_once('=') else {
            return Err(Usage(format!("--meta {m:?} is not KEY=VALUE")));
        };
        crate::hook::check_key(k).map_err(|e| Usage(e.to_string()))?;
        let v = decoded(v, urlencoded).map_err(|e| Usage(format!("--meta {k}: {e}")))?;
        if pairs.insert(k.to_string(), v).is_some() {
            return Err(Usage(format!("--meta {k} is given twice")));
        }
    }
    Ok(pairs)
}

/// The recording's absolute path. Only a missing file or a folder is refused here; anything else
/// is the daemon's to judge: it reads the file as its own user.
fn recording_path(file: &std::path::Path) -> Result<PathBuf, Usage> {
    let path = std::path::absolute(file).map_err(|e| Usage(format!("{}: {e}", file.display())))?;
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Usage(format!("{} does not exist", path.display())))
        }
        Ok(m) if m.is_dir() => Err(Usage(format!("{} is a folder", path.display()))),
        _ => Ok(path),
    }
}
