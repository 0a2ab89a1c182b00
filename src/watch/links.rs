//! Owns which paths in the watched folders are names of one file (hard links). inotify reports a
//! change only under the name it was made through, so a recording changed through one link (a
//! truncation, an append, a rewrite) looks unchanged at its other links until a rescan, 10 min
//! later by default (the hostile file-system adversary found it). The watcher asks this
//! index for the other names of a file it sees change, and looks at them too.
//!
//! Only files with more than one link are kept (plus the old name of a recording seen again as a
//! hard link), so a tree of ordinary recordings costs nothing here, and a walk of known files
//! costs one lookup each (no allocation) once their names are in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// (device, inode).
pub type Inode = (u64, u64);

#[derive(Default)]
struct Inner {
    by_inode: HashMap<Inode, Vec<Arc<Path>>>,
    /// Each name's file, and the walk generation it was last seen in.
    by_path: HashMap<Arc<Path>, (Inode, u64)>,
    generation: u64,
}

impl Inner {
    fn unlink(&mut self, path: &Path) -> Option<Inode> {
        let (inode, _) = self.by_path.remove(path)?;
        if let Some(names) = self.by_inode.get_mut(&inode) {
            names.retain(|p| &**p != path);
            if names.is_empty() {
                self.by_inode.remove(&inode);
            }
        }
        Some(inode)
    }
}

/// Shared by the watcher and its walks (on the roots' lanes), which take the lock per lookup.
#[derive(Default)]
pub struct Links(std::sync::Mutex<Inner>);

impl Links {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `path` is now: a file with `nlink` links. With one link it has no other name to
    /// look at, and is dropped.
    pub fn note(&self, path: &Path, inode: Inode, nlink: u64) {
        let mut g = self.inner();
        let generation = g.generation;
        if nlink > 1
            && let Some((known, seen)) = g.by_path.get_mut(path)
            && *known == inode
        {
            *seen = generation;
            return;
        }
        g.unlink(path);
        if nlink > 1 {
            let p: Arc<Path> = Arc::from(path);
            g.by_inode.entry(inode).or_default().push(p.clone());
            g.by_path.insert(p, (inode, generation));
        }
    }

    /// Two names of one file, found by the queue (a version queued under `old` seen again at
    /// `new`): both are kept even if the link count was not read, so a change through either is
    /// seen at the other.
    pub fn pair(&self, old: &Path, new: &Path, inode: Inode) {
        self.note(old, inode, 2);
        self.note(new, inode, 2);
    }

    /// The file `path` was, as last noted.
    pub fn inode_of(&self, path: &Path) -> Option<Inode> {
        self.inner().by_path.get(path).map(|(i, _)| *i)
    }

    /// `path` is gone, or no longer a file.
    pub fn forget(&self, path: &Path) {
        self.inner().unlink(path);
    }

    /// A folder is gone: every name below it.
    pub fn forget_under(&self, dir: &Path) {
        let mut g = self.inner();
        let gone: Vec<Arc<Path>> = g
            .by_path
            .keys()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        for p in gone {
            g.unlink(&p);
        }
    }

    /// The other names of these files, `path` left out.
    pub fn others(&self, path: &Path, inodes: &[Inode]) -> Vec<PathBuf> {
        let g = self.inner();
        let mut out: Vec<PathBuf> = Vec::new();
        for i in inodes {
            for p in g.by_inode.get(i).into_iter().flatten() {
                if &**p != path && !out.iter().any(|o| o == &**p) {
                    out.push(p.to_path_buf());
                }
            }
        }
        out
    }

    /// Starts a walk; what it does not see again below the folder it lists is forgotten by
    /// [`Links::walked`] (a name removed while its event was lost).
    pub fn walk_started(&self) -> u64 {
        let mut g = self.inner();
        g.generation += 1;
        g.generation
    }

    /// A complete listing of `dir`, started at `generation`, is done.
    pub fn walked(&self, dir: &Path, generation: u64) {
        let mut g = self.inner();
        let stale: Vec<Arc<Path>> = g
            .by_path
            .iter()
            .filter(|(p, (_, seen))| *seen < generation && p.starts_with(dir))
            .map(|(p, _)| p.clone())
            .collect();
        for p in stale {
            g.unlink(&p);
        }
    }

    /// Names kept.
    pub fn len(&self) -> usize {
        self.inner().by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn only_files_with_other_names_are_kept() {
        let l = Links::default();
        l.note(&p("/r/a"), (1, 10), 1);
        assert!(l.is_empty());
        l.note(&p("/r/a"), (1, 10), 2);
        l.note(&p("/r/d/b"), (1, 10), 2);
        assert_eq!(l.others(&p("/r/a"), &[(1, 10)]), vec![p("/r/d/b")]);
        // The other link went: a is an ordinary file again.
        l.note(&p("/r/a"), (1, 10), 1);
        assert_eq!(l.inode_of(&p("/r/a")), None);
        assert_eq!(l.others(&p("/r/x"), &[(1, 10)]), vec![p("/r/d/b")]);
    }

    #[test]
    fn a_name_given_to_another_file_moves_in_the_index() {
        let l = Links::default();
        l.pair(&p("/r/a"), &p("/r/b"), (1, 10));
        // A new call delivered over a (rename): a now names another file.
        l.note(&p("/r/a"), (1, 11), 2);
        assert_eq!(l.inode_of(&p("/r/a")), Some((1, 11)));
        assert_eq!(
            l.others(&p("/r/a"), &[(1, 10), (1, 11)]),
            vec![p("/r/b")],
            "the old file's other name is still found through the old inode"
        );
        // Same inode number on another device: another file.
        assert!(l.others(&p("/r/z"), &[(2, 10)]).is_empty());
    }

    #[test]
    fn a_complete_walk_forgets_names_it_did_not_see() {
        let l = Links::default();
        l.pair(&p("/r/d/a"), &p("/s/b"), (1, 10));
        l.note(&p("/r/d/c"), (1, 12), 2);
        let g = l.walk_started();
        l.note(&p("/r/d/c"), (1, 12), 2);
        l.walked(&p("/r"), g);
        assert_eq!(l.inode_of(&p("/r/d/a")), None);
        assert_eq!(l.inode_of(&p("/r/d/c")), Some((1, 12)));
        assert_eq!(
            l.inode_of(&p("/s/b")),
            Some((1, 10)),
            "not below the walked folder"
        );
        l.forget_under(&p("/s"));
        assert_eq!(l.len(), 1);
        l.forget(&p("/r/d/c"));
        assert!(l.is_empty());
    }
}
