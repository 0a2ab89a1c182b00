//! When the loop's duties fall due, and running the ones that are: the periodic rescan, the polls
//! of roots without inotify and of folders without a watch, the root checks, the searches workers
//! ask for, and the rescan after the event channel overflowed. Nothing here ticks: each duty has
//! its own deadline, and the loop sleeps until the first of them.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::{FALLBACK_POLL, State};
use crate::clock::now_ms;
use crate::config::WatchConfig;
use crate::queue::Role;

/// While a root check has not been answered (a hung mount) or a root was passed over, the loop
/// looks again this often (a degraded state, not idle).
const ROOT_CHECK: Duration = Duration::from_secs(5);
/// Missing roots are found through an inotify watch on their nearest existing parent; they are
/// also looked for this often (or every `watch.rescan_interval` when set), for what inotify does not
/// report: a file system mounted over the path, a parent on NFS changed from another host.
const MISSING_POLL: Duration = Duration::from_secs(600);
/// Searches for recordings that left their queued path (asked for by workers) run at most this
/// often: several missing files at once share one rescan.
const SEARCH_GAP: Duration = Duration::from_secs(5);

/// What the loop may have to wake up for, as the state stands (see [`Schedule::wake_at`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Waits {
    /// The first candidate to look at again.
    next_eval: Option<Instant>,
    /// Roots polled as a whole (no inotify).
    polled: bool,
    /// Folders polled for want of a watch.
    polled_dirs: bool,
    /// Roots missing: looked for at [`MISSING_POLL`] besides their parent's events.
    missing: bool,
    /// A root check unanswered, or a root passed over: looked at every [`ROOT_CHECK`].
    degraded: bool,
}

/// When each of the loop's duties is next due. Nothing here ticks: each duty has its own
/// deadline, and with nothing to do (every root watched, no candidate, no search) the loop sleeps
/// until the periodic rescan, or for good with rescans off.
pub(super) struct Schedule {
    rescan_every: Option<Duration>,
    /// Roots without inotify (poll_interval > 0) are walked this often; folders out of watches
    /// every FALLBACK_POLL (as documented).
    poll_every: Duration,
    missing_every: Duration,
    next_rescan: Option<Instant>,
    next_poll: Instant,
    next_dir_poll: Instant,
    next_root_check: Instant,
    /// A worker found a job's file gone from its path: rescan soon, so a recording moved inside
    /// the watched folders is found again (and its job follows it) even if its events were lost.
    next_search: Option<Instant>,
    last_search: Instant,
}

impl Schedule {
    pub(super) fn new(w: &WatchConfig) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        let now = Instant::now();
        let rescan_every = nonzero(w.rescan_interval);
        let poll_every = nonzero(w.poll_interval).unwrap_or(FALLBACK_POLL);
        Schedule {
            rescan_every,
            poll_every,
            missing_every: rescan_every.unwrap_or(MISSING_POLL),
            next_rescan: rescan_every.map(|d| now + d),
            next_poll: now + poll_every,
            next_dir_poll: now + FALLBACK_POLL,
            next_root_check: now + ROOT_CHECK,
            next_search: None,
            last_search: now - SEARCH_GAP,
        }
    }

    pub(super) fn search_asked(&mut self) {
        self.next_search
            .get_or_insert(self.last_search + SEARCH_GAP);
    }

    /// The first deadline among the duties the state has: the min of them, never a fixed period.
    /// None: nothing is due until an event comes.
    pub(super) fn wake_at(&self, w: &Waits) -> Option<Instant> {
        let due = [
            w.next_eval,
            self.next_rescan,
            self.next_search,
            w.polled.then_some(self.next_poll),
            w.polled_dirs.then_some(self.next_dir_poll),
            (w.missing || w.degraded).then_some(self.next_root_check),
        ];
        due.into_iter().flatten().min()
    }

    /// After a root check: the next one, if the state needs one.
    fn root_checked(&mut self, now: Instant, w: &Waits) {
        self.next_root_check = now
            + if w.degraded {
                ROOT_CHECK
            } else {
                self.missing_every
            };
    }
}

pub(super) async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl State {
    pub(super) fn waits(&self) -> Waits {
        let next_eval = self
            .candidates
            .values()
            .map(|c| c.next_check_ms)
            .min()
            .map(|t| {
                Instant::now() + Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64)
            });
        Waits {
            next_eval,
            polled: !self.polled.is_empty(),
            polled_dirs: !self.polled_dirs.is_empty(),
            missing: !self.missing.is_empty(),
            degraded: !self.probes.is_empty() || !self.skipped.is_empty(),
        }
    }
}

impl State {
    /// The duties that are due: a search, the periodic rescan, polls, the root check.
    pub(super) async fn run_due(&mut self, s: &mut Schedule) {
        let now = Instant::now();
        if s.next_search.is_some_and(|t| t <= now) {
            debug!("rescan: a queued recording left its path; looking for it");
            s.next_search = None;
            s.last_search = now;
            self.rescan_all().await;
        }
        // On a shared spool one daemon of the cluster reads every folder on schedule (the
        // rescan role); the others keep their own events, searches and the first scan.
        let rescans = self.queue.holds(Role::Rescan);
        if s.next_rescan.is_some_and(|t| t <= now) {
            if rescans {
                debug!("periodic rescan (watch.rescan_interval)");
                // The roots too: what inotify cannot report (a mount over a root) is seen here.
                self.check_roots(false).await;
                self.rescan_all().await;
            }
            s.next_rescan = s.rescan_every.map(|d| now + d);
        }
        if !self.polled.is_empty() && s.next_poll <= now {
            if rescans {
                // Polled roots have no inotify to say they went.
                self.check_roots(false).await;
                for root in self.polled.clone() {
                    self.rescan(&root, false).await;
                }
            }
            s.next_poll = now + s.poll_every;
        }
        if !self.polled_dirs.is_empty() && s.next_dir_poll <= now {
            self.poll_dirs().await;
            s.next_dir_poll = now + FALLBACK_POLL;
        }
        let w = self.waits();
        if (w.missing || w.degraded) && s.next_root_check <= now {
            self.check_roots(false).await;
            s.root_checked(now, &self.waits());
        } else if !(w.missing || w.degraded) {
            // A root that goes missing later is looked for a whole period after.
            s.root_checked(now, &w);
        }
    }

    pub(super) async fn on_overflow(&mut self) {
        self.metrics.watcher_overflow();
        warn!(
            "file event queue overflowed (a burst of files); rescanning every watched folder so nothing is missed"
        );
        self.rescan_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_cfg(rescan: &str) -> WatchConfig {
        let text = format!(
            "[api]\nbase_url = \"http://127.0.0.1:9/v1\"\ntoken = \"t\"\nallow_insecure_http = true\n\
             [watch]\npaths = [\"/rec\"]\nrescan_interval = \"{rescan}\"\n\
             [queue]\ndatabase = \"/tmp/q.db\"\n"
        );
        crate::config::from_toml_str(&text, &Default::default(), "test")
            .unwrap()
            .watch
    }

    /// Issue 16: the loop slept at most 5 s (the root check) whatever the state. Now it sleeps
    /// until the first of its duties' own deadlines, and for good when it has none.
    #[test]
    fn the_loop_sleeps_until_the_first_deadline_never_a_fixed_period() {
        let now = Instant::now();
        let s = Schedule::new(&watch_cfg("10m"));
        let idle = Waits::default();
        let first = s.wake_at(&idle).expect("the periodic rescan");
        assert_eq!(Some(first), s.next_rescan);
        assert!(first >= now + Duration::from_secs(600), "{:?}", first - now);
        let soon = Waits {
            next_eval: Some(now + Duration::from_secs(3)),
            ..idle
        };
        assert_eq!(s.wake_at(&soon), soon.next_eval);

        let mut off = Schedule::new(&watch_cfg("0s"));
        assert_eq!(
            off.wake_at(&idle),
            None,
            "rescans off, nothing to do: no wake-up"
        );
        // A missing root is looked for at the long fallback period (its parent's events come
        // first); a root check left unanswered (a hung mount) every ROOT_CHECK.
        let missing = Waits {
            missing: true,
            ..idle
        };
        off.root_checked(now, &missing);
        assert_eq!(off.wake_at(&missing), Some(now + MISSING_POLL));
        let degraded = Waits {
            degraded: true,
            ..idle
        };
        off.root_checked(now, &degraded);
        assert_eq!(off.wake_at(&degraded), Some(now + ROOT_CHECK));
        // Folders out of watches are polled; a search is due soon.
        let polled = Waits {
            polled_dirs: true,
            ..idle
        };
        assert_eq!(off.wake_at(&polled), Some(off.next_dir_poll));
        assert!(off.next_dir_poll >= now + FALLBACK_POLL);
        off.search_asked();
        assert_eq!(off.wake_at(&idle), off.next_search);
    }
}
