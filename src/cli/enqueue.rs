//! `callferry enqueue FILE...`: backfill by hand, with the watcher's checks, in batches.

use std::path::PathBuf;

use super::{EXIT_FAILURE, EXIT_OK, out, tell};
use crate::app::AppError;
use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{Enqueued, OpenMode, Queue};

/// Files queued per transaction by `enqueue`: few enough that the daemon waits only briefly for the
/// write lock, many enough that 10,000 files are a handful of commits.
const ENQUEUE_BATCH: usize = 500;

pub(super) async fn enqueue(cfg: &Config, files: &[PathBuf]) -> Result<i32, AppError> {
    let q = Queue::open(&cfg.queue.database, OpenMode::Create).await?;
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
