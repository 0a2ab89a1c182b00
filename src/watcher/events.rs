//! File events: a burst of inotify's events (bridged by [`crate::watch::bridge`]) is grouped by
//! root, each root's paths are looked at in one call on its files lane, and each path is taken as
//! it is now: a new folder is watched and listed, a file is observed, a gone path is forgotten.
//! inotify names only the path a change was made through, so the other names of a hard-linked
//! file that changed or went are looked at too ([`crate::watch::links`]).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::State;
use crate::clock::now_ms;
use crate::completeness::{NameRules, Stat, stat_of};
use crate::watch::bridge::Ev;

/// A path as `symlink_metadata` found it, with what the caller attached to it.
type Looked<T> = Vec<(PathBuf, T, std::io::Result<std::fs::Metadata>)>;

/// Each root's paths (and whether an event said they were folders), the roots whose events the
/// kernel dropped, and the roots that went.
type Grouped = (
    Vec<(PathBuf, Vec<(PathBuf, bool)>)>,
    Vec<PathBuf>,
    Vec<PathBuf>,
);

fn group(batch: Vec<Ev>) -> Grouped {
    let mut by_root: Vec<(PathBuf, Vec<(PathBuf, bool)>)> = Vec::new();
    let mut overflowed: Vec<PathBuf> = Vec::new();
    let mut went: Vec<PathBuf> = Vec::new();
    for ev in batch {
        match ev {
            Ev::RootGone(root) => {
                if !went.contains(&root) {
                    went.push(root);
                }
            }
            Ev::Overflow(root) => {
                if !overflowed.contains(&root) {
                    overflowed.push(root);
                }
            }
            Ev::At { root, path, dir } => {
                let i = match by_root.iter().position(|(r, _)| *r == root) {
                    Some(i) => i,
                    None => {
                        by_root.push((root, Vec::new()));
                        by_root.len() - 1
                    }
                };
                let paths = &mut by_root[i].1;
                match paths.iter_mut().find(|(p, _)| *p == path) {
                    Some((_, d)) => *d |= dir,
                    None => paths.push((path, dir)),
                }
            }
        }
    }
    (by_root, overflowed, went)
}

impl State {
    /// A burst of file events: each root's paths are looked at in one call on its lane.
    pub(super) async fn on_events(&mut self, batch: Vec<Ev>) {
        let (by_root, overflowed, went) = group(batch);
        for root in &went {
            self.root_went(root);
        }
        for root in &overflowed {
            self.metrics.watcher_overflow();
            warn!(path = %root.display(), "the kernel dropped file events; rescanning the folder");
            self.rescan(root, false).await;
        }
        let mut relinked: Vec<PathBuf> = Vec::new();
        for (root, paths) in by_root {
            if overflowed.contains(&root) || went.contains(&root) || !self.watched.contains(&root) {
                continue;
            }
            let Some(looked) = self.stat_on_lane(&root, paths).await else {
                continue;
            };
            for (path, was_dir, meta) in looked {
                // The root itself: its going is `Ev::RootGone`; other events on it change nothing.
                if path != root {
                    self.on_path(&root, path, was_dir, meta, &mut relinked)
                        .await;
                }
            }
        }
        if !relinked.is_empty() {
            relinked.sort();
            relinked.dedup();
            self.recheck(relinked).await;
        }
    }

    /// `symlink_metadata` of each path, in one call on the root's files lane; `None` if the root
    /// does not answer (it is rescanned in full once it does).
    async fn stat_on_lane<T: Send + 'static>(
        &mut self,
        root: &Path,
        paths: Vec<(PathBuf, T)>,
    ) -> Option<Looked<T>> {
        let fs = self.fs.get(root);
        if !fs.hung() {
            let stat_all = move |beat: &crate::watch::lane::Beat| {
                let stat = |(p, t): (PathBuf, T)| {
                    beat.tick();
                    let m = std::fs::symlink_metadata(&p);
                    (p, t, m)
                };
                paths.into_iter().map(stat).collect::<Vec<_>>()
            };
            if let Ok(looked) = fs.files.run(stat_all).await {
                return Some(looked);
            }
        }
        self.skipped.insert(root.to_path_buf());
        None
    }

    /// One path an event named, as it is now. Other names of a file it was or is go to
    /// `relinked`.
    async fn on_path(
        &mut self,
        root: &Path,
        path: PathBuf,
        was_dir: bool,
        meta: std::io::Result<std::fs::Metadata>,
        relinked: &mut Vec<PathBuf>,
    ) {
        match meta {
            Ok(m) if m.is_dir() => self.on_folder(root, path).await,
            Ok(m) if m.is_file() => {
                let Ok(rel) = path.strip_prefix(root) else {
                    return;
                };
                if NameRules::of(&self.cfg.watch).check(rel).is_err() {
                    return;
                }
                let stat = stat_of(&m);
                relinked.extend(self.relinked(&path, Some((stat, m.nlink()))));
                self.observe(path, root.to_path_buf(), stat, now_ms());
            }
            other => {
                if !was_dir {
                    relinked.extend(self.relinked(&path, None));
                }
                self.on_gone(root, &path, was_dir, other.is_err());
            }
        }
    }

    /// A new folder (e.g. today's date folder), or one moved in: watched and listed by one walk;
    /// the watch comes first, so nothing that lands in it meanwhile is missed.
    async fn on_folder(&mut self, root: &Path, path: PathBuf) {
        let unwatched = self
            .inotify
            .get(root)
            .is_some_and(|(i, _)| !i.is_watched(&path));
        if self.cfg.watch.recursive && unwatched && !self.polled_dirs.contains(&path) {
            self.rescan(&path, false).await;
        }
    }

    /// A path that is no longer a file or a folder here: `gone` (renamed away, deleted), or
    /// swapped for a link, a FIFO or the like.
    fn on_gone(&mut self, root: &Path, path: &Path, was_dir: bool, gone: bool) {
        if was_dir {
            self.links.forget_under(path);
            if let Some((i, _)) = self.inotify.get(root) {
                // Its watches (and those below it) no longer describe this path.
                i.forget_under(path);
                self.polled_dirs.retain(|p| !p.starts_with(path));
            }
        }
        if gone {
            // Forget it and anything below it.
            if self.candidates.remove(path).is_none() {
                self.candidates.retain(|p, _| !p.starts_with(path));
            }
            if self.rejected.remove(path).is_none() {
                self.rejected.retain(|p, _| !p.starts_with(path));
            }
        }
    }

    /// The other names of the file `path` was and of the one it is `now`, to look at too: a
    /// change made through one hard link raises an event under that name only. Notes what `path`
    /// is now.
    fn relinked(&self, path: &Path, now: Option<(Stat, u64)>) -> Vec<PathBuf> {
        let mut inodes = Vec::with_capacity(2);
        inodes.extend(self.links.inode_of(path));
        match now {
            Some((s, nlink)) => {
                if nlink > 1 {
                    inodes.push((s.dev, s.ino));
                }
                self.links.note(path, (s.dev, s.ino), nlink);
            }
            None => self.links.forget(path),
        }
        if inodes.is_empty() {
            return Vec::new();
        }
        self.links.others(path, &inodes)
    }

    /// Looks again at names of files that changed under another name: one `stat` each, on its
    /// root's lane. A changed one becomes a candidate, as if its own event had come.
    async fn recheck(&mut self, paths: Vec<PathBuf>) {
        let mut by_root: HashMap<PathBuf, Vec<(PathBuf, ())>> = HashMap::new();
        for p in paths {
            match self.root_for(&p) {
                Some(r) => by_root.entry(r).or_default().push((p, ())),
                None => self.links.forget(&p),
            }
        }
        for (root, paths) in by_root {
            let Some(looked) = self.stat_on_lane(&root, paths).await else {
                continue;
            };
            let now = now_ms();
            for (path, (), meta) in looked {
                match meta {
                    Ok(m) if m.is_file() => {
                        let stat = stat_of(&m);
                        self.links.note(&path, (stat.dev, stat.ino), m.nlink());
                        debug!(path = %path.display(), "looked at again: another name of a file that changed");
                        self.observe(path, root.clone(), stat, now);
                    }
                    _ => self.links.forget(&path),
                }
            }
        }
    }
}
