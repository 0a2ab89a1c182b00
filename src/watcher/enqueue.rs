//! Queueing complete versions in batches, retried until the database takes them, and what the
//! queue made of them: a new job, a new version of a changed file, or a recording already queued
//! under another path, whose waiting job follows it when it moved.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use super::State;
use crate::clock::now_ms;
use crate::completeness::Stat;
use crate::queue::{Enqueued, NewJob};
use crate::watch::Hung;

impl State {
    /// Queues complete versions; retried every second until the database takes them (a full disk
    /// must not lose the discovery).
    pub(super) async fn enqueue(&mut self, jobs: &[NewJob]) {
        loop {
            match self.queue.enqueue(jobs, now_ms()).await {
                Ok(results) => {
                    let same = self.enqueued(jobs, results);
                    if !same.is_empty() {
                        self.follow_moves(same).await;
                    }
                    return;
                }
                Err(e) => {
                    error!(error = %e, files = jobs.len(), "cannot queue complete files; retrying in 1s");
                    tokio::select! {
                        // Not lost on shutdown: the startup scan finds them again.
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// What the queue made of a batch; returns the files that are a recording already queued
    /// under another path (with that job and path).
    pub(super) fn enqueued(
        &mut self,
        jobs: &[NewJob],
        results: Vec<Enqueued>,
    ) -> Vec<(NewJob, i64, String)> {
        let mut new = 0;
        let mut same = Vec::new();
        for j in jobs {
            let stat = Stat {
                size: j.size,
                mtime_ns: j.mtime_ns,
                dev: j.dev,
                ino: j.ino,
            };
            self.known.insert(&j.path, &stat);
        }
        for (j, r) in jobs.iter().zip(results) {
            match r {
                Enqueued::New {
                    id,
                    supersedes: Some(old),
                } => {
                    new += 1;
                    info!(job_id = id, path = %j.path.display(), size = j.size, previous_job = old,
                        "file changed since it was last queued (appended to?): queued as a new version, to be uploaded as a new interaction");
                }
                Enqueued::New {
                    id,
                    supersedes: None,
                } => {
                    new += 1;
                    // The upload's line is the one at info (one per file).
                    debug!(job_id = id, path = %j.path.display(), size = j.size, "queued");
                }
                Enqueued::SameFile { existing, path } => same.push((j.clone(), existing, path)),
                Enqueued::Known => {}
            }
        }
        if new > 0 {
            self.metrics.files_discovered(new);
            self.wake.notify_waiters();
        }
        same
    }

    /// Files that are a recording already queued under another path (same device, inode, size and
    /// mtime). A hard link leaves the recording at its old path too: nothing to do. A move leaves
    /// nothing there (or another call, a recorder reusing the name): the job, if it still waits,
    /// follows the recording, so it is uploaded from where it is now, on the interaction it may
    /// already have.
    pub(super) async fn follow_moves(&mut self, same: Vec<(NewJob, i64, String)>) {
        let mut followed = false;
        for (j, existing, old) in same {
            let shown = j.path.display();
            let was = crate::queue::display_path(&old);
            if self.left_its_path(&j, &old).await {
                let new_path = crate::queue::encode_path(&j.path);
                let root = crate::queue::encode_path(&j.root);
                match self
                    .queue
                    .follow_move(existing, &old, &new_path, &root, now_ms())
                    .await
                {
                    Ok(true) => {
                        followed = true;
                        info!(job_id = existing, path = %shown, was = %was,
                            "recording moved while its job waited: the job follows it and uploads it from here");
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // Found again at the next rescan; the worker meanwhile waits for it.
                        warn!(job_id = existing, path = %shown, error = %e, "cannot record that a recording moved");
                        continue;
                    }
                }
            }
            info!(path = %shown, same_as = %was, job_id = existing,
                "same recording as an already queued file (hard link or move): not uploaded again");
        }
        if followed {
            self.wake.notify_waiters();
        }
    }

    /// Whether the recording `j` is no longer at its queued path `old` (stored form), asked on
    /// the old path's root's lane. A folder that does not answer: taken as still there; the
    /// worker finds out once it answers.
    pub(super) async fn left_its_path(&mut self, j: &NewJob, old: &str) -> bool {
        let old = crate::queue::decode_path(old);
        let root = self.root_for(&old).unwrap_or_else(|| j.root.clone());
        let (dev, ino) = (j.dev, j.ino);
        let fs = self.fs.get(&root);
        let at = old.clone();
        let r = if fs.hung() {
            Err(Hung)
        } else {
            fs.files
                .run(move |_| match std::fs::symlink_metadata(&at) {
                    Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                    Ok(m) => m.dev() != dev || m.ino() != ino,
                })
                .await
        };
        if r == Ok(false) {
            // Two names of one file (a hard link): a change through either must be seen at the
            // other, though the old name's link count was not read when it was queued.
            self.links.pair(&old, &j.path, (dev, ino));
        }
        r.unwrap_or(false)
    }
}
