//! A candidate's path from first sight to a decision: observed (by an event or a walk), looked
//! inside once quiet long enough (on its root's files lane), judged by [`crate::completeness`],
//! then queued (in a batch), waited for again, or passed over until it changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::{Candidate, ENQUEUE_BATCH, State};
use crate::clock::{ms, now_ms};
use crate::completeness::{
    Decision, Facts, Pending, Stat, Timing, Writers, assess, decide, gather_facts, observe,
};
use crate::queue::NewJob;
use crate::watch::{DEADLINE, Hung};

impl State {
    /// A file seen (by an event or a walk) as it is now: a candidate, unless it is known and
    /// unchanged, or was judged not a recording as it is.
    pub(super) fn observe(&mut self, path: PathBuf, root: PathBuf, stat: Stat, now: i64) {
        if let Some(seen) = self.rejected.get(&path) {
            if *seen == stat {
                return;
            }
            self.rejected.remove(&path);
        }
        let prev = self.candidates.get(&path).map(|c| c.obs);
        // An event about a known, unchanged file (a close after reading, a move back, attributes).
        if prev.is_none() && self.known.contains(&path, &stat) && !self.search.wants(&stat) {
            return;
        }
        let note = self.candidates.get(&path).and_then(|c| c.note.clone());
        let obs = observe(prev.as_ref(), stat, now);
        if prev.is_some_and(|p| p.stat != stat) {
            debug!(path = %path.display(), size = stat.size, "still being written");
        }
        let c = Candidate {
            root,
            obs,
            next_check_ms: now,
            note,
        };
        self.candidates.insert(path, c);
    }

    /// Decides every candidate that is due, and queues the complete ones.
    pub(super) async fn evaluate(&mut self) {
        let now = now_ms();
        let timing = Timing::of(&self.cfg.watch);
        let due: Vec<PathBuf> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.next_check_ms <= now)
            .map(|(p, _)| p.clone())
            .collect();
        let mut looked = self.look_inside(&due, now, timing).await;
        let mut complete: Vec<NewJob> = Vec::new();
        for path in due {
            let Some(mut c) = self.candidates.remove(&path) else {
                continue;
            };
            let looked = looked.remove(&path);
            if let Some(d) = self.decide_due(&mut c, looked, now, timing) {
                self.act(path, c, d, now, &mut complete);
            }
        }
        for chunk in complete.chunks(ENQUEUE_BATCH) {
            self.enqueue(chunk).await;
        }
    }

    /// Due candidates that have been quiet long enough get a look inside, on a fresh descriptor.
    /// That is file I/O (a header read, the open-writer check), 20 µs a file and 2 s for a
    /// backlog of 100,000: done on each root's lane, all roots at once, so a root that does not
    /// answer holds up only its own files (they are not in the answer).
    pub(super) async fn look_inside(
        &mut self,
        due: &[PathBuf],
        now: i64,
        timing: Timing,
    ) -> HashMap<PathBuf, std::io::Result<(Stat, Facts)>> {
        let mut to_look: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
        for p in due {
            if let Some(c) = self.candidates.get(p)
                && decide(&c.obs, now, timing.settle) == Decision::Complete
            {
                to_look.entry(c.root.clone()).or_default().push(p.clone());
            }
        }
        let jobs = to_look.into_iter().map(|(root, paths)| {
            let fs = self.fs.get(&root);
            async move {
                if fs.hung() {
                    return (root, Err(Hung));
                }
                let r = root.clone();
                let looked = move |beat: &crate::watch::lane::Beat| {
                    let look = |p: PathBuf| {
                        beat.tick();
                        let facts = gather_facts(&r, &p);
                        (p, facts)
                    };
                    paths.into_iter().map(look).collect::<Vec<_>>()
                };
                (root, fs.files.run(looked).await)
            }
        });
        let mut out = HashMap::new();
        for (root, res) in futures_util::future::join_all(jobs).await {
            match res {
                Ok(v) => out.extend(v),
                Err(Hung) => {
                    self.skipped.insert(root);
                }
            }
        }
        out
    }

    /// The decision on a due candidate: its quiet period, then what the look inside it found.
    /// `None`: it is gone (its event forgets it).
    pub(super) fn decide_due(
        &mut self,
        c: &mut Candidate,
        looked: Option<std::io::Result<(Stat, Facts)>>,
        now: i64,
        timing: Timing,
    ) -> Option<Decision> {
        let quiet = decide(&c.obs, now, timing.settle);
        if quiet != Decision::Complete {
            return Some(quiet);
        }
        let Some(looked) = looked else {
            // Its folder does not answer: looked at again later (and rescanned in full once it
            // answers).
            return Some(Decision::NotYet(DEADLINE, Pending::NoAnswer));
        };
        if let Ok((_, facts)) = &looked
            && let Writers::Unknown(why) = &facts.writers
            && !self.writer_check_warned
        {
            self.writer_check_warned = true;
            warn!(reason = %why, "cannot tell whether a recorder still has files open for writing; relying on the quiet period (watch.settle) and WAV headers");
        }
        let (obs, d) = assess(&c.obs, looked, now, timing)?;
        c.obs = obs;
        Some(d)
    }

    /// Carries a decision out: queue (in the batch `complete`), wait, or pass over until the
    /// file changes.
    pub(super) fn act(
        &mut self,
        path: PathBuf,
        mut c: Candidate,
        d: Decision,
        now: i64,
        complete: &mut Vec<NewJob>,
    ) {
        match d {
            Decision::Complete | Decision::CompleteAnyway(_) => {
                if let Decision::CompleteAnyway(why) = &d {
                    warn!(path = %path.display(), "uploading a recording that may be truncated: {why} (a recorder that died mid-call?)");
                }
                let s = c.obs.stat;
                complete.push(NewJob {
                    path,
                    root: c.root,
                    size: s.size,
                    mtime_ns: s.mtime_ns,
                    dev: s.dev,
                    ino: s.ino,
                });
            }
            Decision::NotYet(after, why) => {
                say_pending(&path, &mut c, why);
                c.next_check_ms = now + ms(after).max(1);
                self.candidates.insert(path, c);
            }
            Decision::Reject(why) => {
                self.metrics.watch.file_not_queued();
                // Not judged again until it changes (in memory only: a restart looks again).
                self.known.insert(&path, &c.obs.stat);
                if c.obs.stat.size == 0 {
                    debug!(path = %path.display(), reason = %why, "not queued");
                } else {
                    warn!(path = %path.display(), reason = %why, "not queued: not a recording");
                }
                self.rejected.insert(path, c.obs.stat);
            }
        }
    }
}

/// Says why a candidate still waits, once per reason. Settling is the normal course ("still being
/// written" is said on each change) and a folder that does not answer is said by the health task.
fn say_pending(path: &Path, c: &mut Candidate, why: Pending) {
    if matches!(why, Pending::Settling | Pending::NoAnswer) || c.note.as_ref() == Some(&why) {
        return;
    }
    if let Pending::Unreadable(_) = why {
        warn!(path = %path.display(), "{why}");
    } else {
        debug!(path = %path.display(), reason = %why, "not complete yet");
    }
    c.note = Some(why);
}
