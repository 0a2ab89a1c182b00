//! The walks: the startup scan and the periodic, overflow and search rescans of every root, the
//! polls of roots without inotify and of folders that got no watch, and what a walk's answer
//! changes (candidates, folders polled for want of a watch). Each walk runs on its root's scan
//! lane ([`crate::watch::walk`]); a root that does not answer is passed over and rescanned once
//! it does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

use super::{FALLBACK_POLL, State, root_of};
use crate::clock::now_ms;
use crate::watch::Hung;
use crate::watch::walk::{Walk, Walked};

impl State {
    /// Loads the fingerprints of every version the queue knows, in one pass; retried until the
    /// database answers (a file found meanwhile is simply judged in full, as before).
    pub(super) async fn load_known(&mut self) {
        loop {
            match self.queue.known_fingerprints().await {
                Ok(v) => {
                    let n = v.len();
                    self.known.extend(v);
                    debug!(versions = n, "known versions loaded");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "cannot load the known file versions; retrying in 1s");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// A walk of `dir` on its root's lane, as a future that borrows nothing (several run at once).
    fn walk_job(
        &self,
        root: &Path,
        dir: &Path,
        only_unwatched: bool,
    ) -> impl std::future::Future<Output = Result<Walked, Hung>> + use<> {
        let fs = self.fs.get(root);
        let walk = Walk {
            cfg: self.cfg.clone(),
            root: root.to_path_buf(),
            dir: dir.to_path_buf(),
            ino: self.inotify.get(root).map(|(i, _)| i.clone()),
            only_unwatched,
            known: self.known.clone(),
            search: self.search.clone(),
            links: self.links.clone(),
        };
        async move {
            if fs.hung() {
                return Err(Hung);
            }
            fs.scan.run(move |beat| walk.run(beat)).await
        }
    }

    pub(super) async fn rescan_all(&mut self) {
        self.metrics.watcher_rescan();
        let roots = self.roots();
        let jobs: Vec<_> = roots.iter().map(|r| self.walk_job(r, r, false)).collect();
        let results = futures_util::future::join_all(jobs).await;
        for (root, res) in roots.into_iter().zip(results) {
            match res {
                Ok(w) => self.apply_walk(&root, &root, w),
                Err(Hung) => {
                    self.skipped.insert(root);
                }
            }
        }
        self.metrics.watch.scan_done();
    }

    /// Walks a folder (on its root's lane) and observes every recording in it.
    pub(super) async fn rescan(&mut self, dir: &Path, only_unwatched: bool) {
        let Some(root) = self.root_for(dir) else {
            return;
        };
        match self.walk_job(&root, dir, only_unwatched).await {
            Ok(w) => self.apply_walk(&root, dir, w),
            Err(Hung) => {
                self.skipped.insert(root);
            }
        }
    }

    pub(super) fn root_for(&self, dir: &Path) -> Option<PathBuf> {
        let roots = self.roots();
        root_of(&roots, dir, self.cfg.watch.recursive)
            .cloned()
            .or_else(|| roots.into_iter().find(|r| r == dir))
    }

    fn apply_walk(&mut self, root: &Path, scanned: &Path, w: Walked) {
        if w.full && !self.rejected.is_empty() {
            let present: HashSet<&PathBuf> = w.files.iter().map(|(p, _)| p).collect();
            self.rejected
                .retain(|p, _| !p.starts_with(scanned) || present.contains(p));
        }
        let now = now_ms();
        for (path, stat) in w.files {
            self.observe(path, root.to_path_buf(), stat, now);
        }
        let before = self.polled_dirs.len();
        if w.gone {
            self.polled_dirs.retain(|p| !p.starts_with(scanned));
        }
        for d in &w.watched {
            self.polled_dirs.remove(d);
        }
        let mut new = 0;
        for d in w.no_watch {
            if self.polled_dirs.insert(d) {
                new += 1;
            }
        }
        if new > 0 && !self.limit_warned {
            self.limit_warned = true;
            warn!(
                folders = self.polled_dirs.len(),
                "out of inotify watches: raise the limit, e.g. `sysctl fs.inotify.max_user_watches=524288` (and persist it in /etc/sysctl.d/). Until then each folder without a watch is polled every {}s",
                FALLBACK_POLL.as_secs()
            );
        }
        if self.polled_dirs.len() != before {
            self.metrics
                .watch
                .set_polled_folders(self.polled_dirs.len());
        }
    }

    /// Folders without a watch: each is listed (and given a watch if one is free now), without
    /// the folders around it that have one. A folder below another polled one is covered by it.
    pub(super) async fn poll_dirs(&mut self) {
        let dirs: Vec<PathBuf> = self.polled_dirs.iter().cloned().collect();
        let top: Vec<PathBuf> = dirs
            .iter()
            .filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o)))
            .cloned()
            .collect();
        for d in top {
            let Some(root) = self
                .root_for(&d)
                .or_else(|| self.roots().into_iter().find(|r| d.starts_with(r)))
            else {
                self.polled_dirs.remove(&d);
                continue;
            };
            match self.walk_job(&root, &d, true).await {
                Ok(w) => self.apply_walk(&root, &d, w),
                Err(Hung) => {
                    self.skipped.insert(root);
                }
            }
        }
        self.metrics
            .watch
            .set_polled_folders(self.polled_dirs.len());
    }
}
