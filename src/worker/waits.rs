//! A job that waits without an attempt counted: its folder does not answer, its file left its
//! path (looked for in the watched folders until `missing_grace`), or its sidecar is not there
//! yet.

use std::path::Path;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::clock::{ms, now_ms};
use crate::config::Config;
use crate::queue::Job;

use super::Pipeline;

impl Pipeline {
    /// The job's watched folder does not answer (a hung mount): the job waits, without an
    /// attempt counted, and is tried again after a while. The folder's state is said once, by
    /// `watch::health_task`; the job's `last_error` says why it waits.
    pub(super) async fn root_hung(&self, job: &Job, hung: crate::watch::Hung) {
        let msg = format!("waiting: {hung}");
        debug!("{msg}");
        let now = now_ms();
        let next = now + ms(crate::watch::DEADLINE * 2);
        // The reason once, not an event every few seconds for as long as the mount hangs.
        let why = (job.last_error.as_deref() != Some(msg.as_str())).then_some(msg.as_str());
        self.record(
            self.commit(|| self.queue.reschedule(job, why, next, false, now))
                .await,
        );
    }

    /// The job's file is not at its path. It may have been moved inside the watched folders: the
    /// watcher is asked to look, and when it finds the recording (by device, inode, size and
    /// mtime) it points the job at the new path. Meanwhile the job waits, without an attempt
    /// counted; after [`missing_grace`] it fails with the reason. Before, an undeclared job was
    /// dropped at once (its file then waited for the next periodic rescan) and a declared one
    /// failed at once, even when the file had only been filed into another folder.
    pub(super) async fn file_missing(&self, job: &Job, path: &Path) {
        let now = now_ms();
        let grace = missing_grace(&self.cfg);
        let since = *self
            .missing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(job.id)
            .or_insert(now);
        if now - since >= ms(grace) {
            self.missing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&job.id);
            self.search.done(job);
            let waited =
                humantime::format_duration(Duration::from_secs(((now - since) / 1000) as u64));
            let msg = match &job.interaction_id {
                None => format!(
                    "file vanished: not at {} and not found elsewhere in the watched folders for {waited} \
                     (deleted, or moved out of them); nothing was declared. If it comes back: `callferry retry {}`",
                    path.display(),
                    job.id
                ),
                Some(iid) => format!(
                    "file vanished after its interaction {iid} was declared: not at {} and not found \
                     elsewhere in the watched folders for {waited} (deleted, or moved out of them); \
                     the interaction has no audio. If the file comes back: `callferry retry {}`",
                    path.display(),
                    job.id
                ),
            };
            warn!("{msg}");
            self.record(self.commit(|| self.queue.fail(job, &msg, now)).await);
            return;
        }
        if since == now {
            info!(
                "file is not at its path any more (moved?); looking for it in the watched folders"
            );
        }
        self.search.want(job);
        let msg = format!(
            "file not at {} (moved?); looking for it in the watched folders",
            path.display()
        );
        let next = now + ms(self.cfg.watch.settle).max(1000);
        self.record(
            self.commit(|| self.queue.reschedule(job, Some(&msg), next, false, now))
                .await,
        );
    }

    /// With `[watch] sidecar_wait`, a recording whose sidecar has not arrived waits for it, up to
    /// that long after it was queued, without an attempt counted. True if it now waits.
    pub(super) async fn wait_for_sidecar(&self, job: &Job) -> bool {
        let wait = self.cfg.watch.sidecar_wait;
        let until = job.created_at + ms(wait);
        let now = now_ms();
        if wait.is_zero() || now >= until {
            return false;
        }
        debug!(
            until_ms = until,
            "waiting for its sidecar (watch.sidecar_wait)"
        );
        self.record(
            self.commit(|| self.queue.reschedule(job, None, until, false, now))
                .await,
        );
        true
    }
}

/// How long a job waits for its file to turn up again (moved inside the watched folders, found by
/// the watcher, which points the job at the new path) before it fails: long enough for a rescan
/// and the new path's quiet period.
pub fn missing_grace(cfg: &Config) -> Duration {
    (cfg.watch.settle * 4).max(Duration::from_secs(15))
}
