//! Owns one walk of a watched folder, run on its root's scan lane: it adds a watch to every
//! folder that has none yet (before the folder's entries are read, so a file created meanwhile
//! has an event or is listed), notes the names of hard-linked files, and lists the recordings
//! that are not known. A known, unchanged file costs its one `stat`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug;

use super::inotify::{AddError, Inotify};
use super::known::{Known, Search};
use super::lane::Beat;
use super::links::Links;
use crate::completeness::{NameRules, Stat, stat_of};
use crate::config::Config;

/// What one walk found.
#[derive(Debug, Default)]
pub struct Walked {
    /// Candidate recordings: not known, or wanted by a search.
    pub files: Vec<(PathBuf, Stat)>,
    /// Folders that have a watch now.
    pub watched: Vec<PathBuf>,
    /// Folders that could not get one: the kernel's watch budget is spent.
    pub no_watch: Vec<PathBuf>,
    /// Whether the listing is complete (not only the unwatched part of the tree).
    pub full: bool,
    /// The walked folder is not there (any more).
    pub gone: bool,
}

/// A walk of `dir` (below or at `root`), with all it needs owned, to be sent to a lane.
pub struct Walk {
    pub cfg: Arc<Config>,
    pub root: PathBuf,
    pub dir: PathBuf,
    /// The root's inotify instance; none for a polled root.
    pub ino: Option<Arc<Inotify>>,
    /// Folders that have a watch are not listed (their events cover them): how a folder out of
    /// watches is polled without a rescan of everything around it.
    pub only_unwatched: bool,
    pub known: Arc<Known>,
    pub search: Arc<Search>,
    pub links: Arc<Links>,
}

impl Walk {
    pub fn run(self, beat: &Beat) -> Walked {
        let generation = self.links.walk_started();
        let mut out = Walked {
            full: !self.only_unwatched,
            ..Default::default()
        };
        let rules = NameRules::of(&self.cfg.watch);
        let recursive = self.cfg.watch.recursive;
        // A watched folder may itself be a link; a folder below it is not followed, even when it
        // is the one being rescanned (a new folder swapped for a link since).
        let walker = walkdir::WalkDir::new(&self.dir)
            .follow_links(false)
            .follow_root_links(self.dir == self.root)
            .max_depth(if recursive { usize::MAX } else { 1 });
        for entry in walker
            .into_iter()
            .filter_entry(|e| self.descends(e, &rules))
        {
            beat.tick();
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.gone |= e.depth() == 0;
                    debug!(error = %e, "scan: skipping an entry");
                    continue;
                }
            };
            let kind = entry.file_type();
            if entry.depth() == 0 && !kind.is_dir() {
                out.gone = true;
            } else if kind.is_dir() {
                if recursive || entry.depth() == 0 {
                    self.watch_dir(entry.path(), &mut out);
                }
            } else if kind.is_file() {
                self.file(&entry, &rules, &mut out);
            }
        }
        if out.full {
            self.links.walked(&self.dir, generation);
        }
        out
    }

    /// Whether the walk enters this entry: not an ignored folder (rsync's hidden temporary
    /// folders), nor, when only unwatched folders are listed, a watched one.
    fn descends(&self, e: &walkdir::DirEntry, rules: &NameRules) -> bool {
        if e.depth() == 0 || !e.file_type().is_dir() {
            return true;
        }
        let ignored = e
            .path()
            .strip_prefix(&self.root)
            .is_ok_and(|rel| rules.ignore.is_match(rel.file_name().unwrap_or_default()));
        let covered =
            self.only_unwatched && self.ino.as_ref().is_some_and(|i| i.is_watched(e.path()));
        !ignored && !covered
    }

    fn watch_dir(&self, p: &Path, out: &mut Walked) {
        let Some(ino) = &self.ino else { return };
        if ino.is_watched(p) {
            out.watched.push(p.to_path_buf());
            return;
        }
        match ino.add(&self.root, p) {
            Ok(()) => out.watched.push(p.to_path_buf()),
            Err(AddError::Limit) => out.no_watch.push(p.to_path_buf()),
            Err(AddError::NotThere(e)) => {
                debug!(path = %p.display(), error = %e, "no watch: not a folder reached without links (any more)");
            }
        }
    }

    fn file(&self, entry: &walkdir::DirEntry, rules: &NameRules, out: &mut Walked) {
        let Ok(rel) = entry.path().strip_prefix(&self.root) else {
            return;
        };
        if rules.check(rel).is_err() {
            return;
        }
        let Ok(meta) = entry.metadata() else { return };
        let stat = stat_of(&meta);
        self.links
            .note(entry.path(), (stat.dev, stat.ino), meta.nlink());
        // Known and unchanged: this stat was its whole cost.
        if !self.known.contains(entry.path(), &stat) || self.search.wants(&stat) {
            out.files.push((entry.path().to_path_buf(), stat));
        }
    }
}
