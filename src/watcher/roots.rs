//! The watched roots' lifecycle: a root is watched (its inotify instance and reader) or polled
//! once it answers as a folder, dropped when it goes, and waited for while it is missing; each is
//! asked on its own lane, with patience, so a hung root holds nobody up. A root passed over while
//! it did not answer is rescanned in full once it does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;
use tracing::{error, info, warn};

use super::{FALLBACK_POLL, State};
use crate::watch::bridge::{read_ancestors, read_events};
use crate::watch::inotify::Inotify;
use crate::watch::{DEADLINE, Hung};

/// How long a root check waits for a folder's answer once the folder's lane is on it, before it
/// goes on without it (see `check_roots`).
const PROBE_PATIENCE: Duration = Duration::from_secs(1);

impl State {
    pub(super) fn roots(&self) -> Vec<PathBuf> {
        self.watched.iter().chain(&self.polled).cloned().collect()
    }

    /// Whether `root` answers now; None if it does not (passed over, rescanned once it does).
    pub(super) async fn is_dir(&mut self, root: &Path) -> Option<bool> {
        let fs = self.fs.get(root);
        let r = root.to_path_buf();
        match fs.scan.run(move |_| r.is_dir()).await {
            Ok(b) => Some(b),
            Err(Hung) => {
                self.skipped.insert(root.to_path_buf());
                None
            }
        }
    }

    /// Starts watching a root: its inotify instance and reader. The watches themselves are added
    /// by the walk that follows (`rescan`), on the root's lane.
    pub(super) async fn add_root(&mut self, root: PathBuf) {
        match self.is_dir(&root).await {
            Some(true) => {}
            Some(false) => {
                if self.warned_missing.insert(root.clone()) {
                    warn!(path = %root.display(), "watched folder does not exist (yet) or is not a folder; waiting for it (its parent folder is watched for it)");
                }
                self.missing.push(root);
                return;
            }
            None => {
                // Said by the health task; looked at again once it answers.
                self.missing.push(root);
                return;
            }
        }
        if !self.cfg.watch.poll_interval.is_zero() {
            info!(path = %root.display(), every = ?self.cfg.watch.poll_interval, "polling (watch.poll_interval > 0; no inotify)");
            self.polled.push(root);
            return;
        }
        match Inotify::new() {
            Ok(ino) => {
                let ino = Arc::new(ino);
                let reader = tokio::spawn(read_events(
                    root.clone(),
                    ino.clone(),
                    self.events.clone(),
                    self.overflow.clone(),
                    self.overflow_wake.clone(),
                ));
                self.inotify
                    .insert(root.clone(), (ino, AbortOnDropHandle::new(reader)));
                info!(path = %root.display(), "watching");
                self.watched.push(root);
            }
            Err(e) => {
                error!(path = %root.display(), error = %e, "cannot watch folder (out of inotify instances? raise fs.inotify.max_user_instances); polling it every {}s instead", FALLBACK_POLL.as_secs());
                self.polled.push(root);
            }
        }
    }

    pub(super) fn drop_root(&mut self, r: &Path) {
        self.watched.retain(|x| x != r);
        self.polled.retain(|x| x != r);
        // Closing the instance drops every watch in it.
        self.inotify.remove(r);
        self.candidates.retain(|p, _| !p.starts_with(r));
        self.rejected.retain(|p, _| !p.starts_with(r));
        self.polled_dirs.retain(|p| !p.starts_with(r));
        self.metrics
            .watch
            .set_polled_folders(self.polled_dirs.len());
    }

    /// A watched root's own inotify watch says it went (deleted, moved away, unmounted): it is
    /// dropped and waited for, and looked at once more at once (it may be back already, a new
    /// folder under the old name, whose events the old watch would never see).
    pub(super) fn root_went(&mut self, r: &Path) {
        if self.roots().iter().any(|w| w == r) {
            warn!(path = %r.display(), "watched folder disappeared; waiting for it to come back");
            self.drop_root(r);
            self.warned_missing.insert(r.to_path_buf());
            self.missing.push(r.to_path_buf());
        }
        self.recheck_roots = true;
    }

    /// Folders that vanished: stop watching, wait for them to return; missing ones: watch them
    /// once they are there. Each root is asked on its lane; an answer that does not come within
    /// [`PROBE_PATIENCE`] is collected at a later check, so a folder that starts hanging while
    /// idle never holds the watcher up (its lane is then reported by the health task). Called
    /// on events (a root's own watch, a missing root's parent), at the periodic rescan, and on a
    /// long fallback period while a root is missing: never on a tick.
    pub(super) async fn check_roots(&mut self, startup: bool) {
        self.start_probes();
        self.wait_for_probes().await;
        let done: Vec<PathBuf> = self
            .probes
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(r, _)| r.clone())
            .collect();
        for r in done {
            if let Some(h) = self.probes.remove(&r) {
                let answer = h.await.unwrap_or(Err(Hung));
                self.on_answer(r, answer, startup).await;
            }
        }
        if self.watch_ancestors().await {
            // A root may have appeared between its probe and the new watch.
            self.recheck_roots = true;
        }
    }

    /// Watches the nearest existing parent of each missing root for the names on the way to it
    /// (`watch/bridge.rs`, `read_ancestors`), and nothing else. Returns whether a watch was added
    /// (the caller then looks at the roots once more). Each lookup runs on the root's scan lane.
    async fn watch_ancestors(&mut self) -> bool {
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = self.missing.clone();
        if self.missing.is_empty() {
            self.ancestors = None;
            return false;
        }
        if self.ancestors.is_none() {
            match Inotify::new() {
                Ok(ino) => {
                    let ino = Arc::new(ino);
                    let reader = tokio::spawn(read_ancestors(
                        ino.clone(),
                        self.wanted.clone(),
                        self.roots_wake.clone(),
                    ));
                    self.ancestors = Some((ino, AbortOnDropHandle::new(reader)));
                }
                // Looked for at the fallback period only.
                Err(_) => return false,
            }
        }
        let Some((ino, _)) = &self.ancestors else {
            return false;
        };
        let ino = ino.clone();
        let before = ino.watched();
        let mut want = Vec::new();
        for root in self.missing.clone() {
            let fs = self.fs.get(&root);
            if fs.hung() {
                continue;
            }
            let (i, r) = (ino.clone(), root.clone());
            let nearest = fs.scan.run(move |_| {
                r.ancestors()
                    .skip(1)
                    .find(|d| d.is_dir() && i.watch_ancestor(d).is_ok())
                    .map(Path::to_path_buf)
            });
            if let Ok(Some(d)) = nearest.await {
                want.push(d);
            }
        }
        for d in &before {
            if !want.contains(d) {
                ino.unwatch(d);
            }
        }
        want.iter().any(|d| !before.contains(d))
    }

    /// Asks every root, watched or missing, whether it is a folder, on its scan lane; one whose
    /// last answer has not come is not asked again.
    fn start_probes(&mut self) {
        let all: Vec<PathBuf> = self
            .roots()
            .into_iter()
            .chain(self.missing.iter().cloned())
            .collect();
        for r in all {
            if !self.probes.contains_key(&r) {
                let fs = self.fs.get(&r);
                let p = r.clone();
                let h = tokio::spawn(async move { fs.scan.run(move |_| p.is_dir()).await });
                self.probes.insert(r, AbortOnDropHandle::new(h));
            }
        }
    }

    /// A probe not started yet (its lane's thread not scheduled, on a loaded machine) is waited
    /// for; one that started and has blocked for [`PROBE_PATIENCE`] is left pending.
    async fn wait_for_probes(&self) {
        let until = tokio::time::Instant::now() + DEADLINE;
        let waiting = |r: &PathBuf, h: &AbortOnDropHandle<Result<bool, Hung>>| {
            !h.is_finished()
                && self
                    .fs
                    .get(r)
                    .scan
                    .busy_for()
                    .is_none_or(|d| d < PROBE_PATIENCE)
        };
        while tokio::time::Instant::now() < until && self.probes.iter().any(|(r, h)| waiting(r, h))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What one root's answer changes: a missing root that is there is watched (and walked); a
    /// watched one that went is dropped and waited for.
    async fn on_answer(&mut self, r: PathBuf, answer: Result<bool, Hung>, startup: bool) {
        let missing = self.missing.contains(&r);
        match answer {
            Err(Hung) => {
                self.skipped.insert(r);
            }
            Ok(true) if missing => self.root_is_back(r, startup).await,
            Ok(false) if missing => {
                if self.warned_missing.insert(r.clone()) {
                    warn!(path = %r.display(), "watched folder does not exist (yet) or is not a folder; waiting for it (its parent folder is watched for it)");
                }
            }
            Ok(false) if self.roots().contains(&r) => {
                warn!(path = %r.display(), "watched folder disappeared; waiting for it to come back");
                self.drop_root(&r);
                self.warned_missing.insert(r.clone());
                self.missing.push(r);
            }
            Ok(_) => {}
        }
    }

    async fn root_is_back(&mut self, r: PathBuf, startup: bool) {
        self.missing.retain(|m| *m != r);
        // At start, the first full scan (after the known versions are loaded) walks it.
        if !startup && !self.warned_missing.contains(&r) {
            info!(path = %r.display(), "watched folder answers; watching it");
        } else if !startup {
            info!(path = %r.display(), "watched folder is there now");
        }
        self.warned_missing.remove(&r);
        self.add_root(r.clone()).await;
        if !startup && !self.missing.contains(&r) {
            self.rescan(&r, false).await;
        }
    }

    /// Roots passed over while they did not answer, rescanned in full now that they do.
    pub(super) async fn rescan_recovered(&mut self) {
        if self.skipped.is_empty() {
            return;
        }
        let back: Vec<PathBuf> = self
            .skipped
            .iter()
            .filter(|r| !self.fs.get(r).hung())
            .cloned()
            .collect();
        for r in back {
            self.skipped.remove(&r);
            if self.roots().contains(&r) {
                self.rescan(&r, false).await;
            }
        }
    }
}
