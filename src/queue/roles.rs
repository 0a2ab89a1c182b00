//! The work one daemon of a cluster does at a time (the periodic rescan, the results follower,
//! pruning), and this daemon's view of which of it is its own. The leases themselves are rows of
//! the shared queue ([`PgQueue::take_role`](super::pg::PgQueue::take_role)); this keeps when
//! each was last taken or renewed, on this process's monotonic clock.
//!
//! A role counts as held only within the lease from the moment its renewal was *sent*. So a
//! daemon that was paused past its lease (while another daemon took the role over) stops doing
//! the work as soon as it wakes, before it even tries to renew: two daemons never knowingly do a
//! role's work at once. On SQLite there is one daemon per queue and every role is its own.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A piece of work only one daemon of a cluster does at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The periodic rescan and the polling of polled roots (`watch.rescan_interval`,
    /// `watch.poll_interval`): on a shared spool one daemon reading every folder is enough, and
    /// the only way to see files written by other hosts' recorders (inotify sees this host's).
    Rescan,
    /// The results follower (`[results] enabled`).
    Results,
    /// Pruning old jobs (`queue.keep_history`).
    Prune,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Rescan, Role::Results, Role::Prune];

    /// The role's row in the shared queue's `roles` table, and its name in `status` and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Rescan => "rescan",
            Role::Results => "results",
            Role::Prune => "prune",
        }
    }

    /// What the role is, for the log.
    pub fn work(self) -> &'static str {
        match self {
            Role::Rescan => "the periodic rescan of the watched folders",
            Role::Results => "following results",
            Role::Prune => "pruning old jobs",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// When this daemon last took or renewed each role, if it holds it.
pub(crate) struct Roles {
    taken: Mutex<[Option<Instant>; 3]>,
    lease: Duration,
    /// Told when a role is gained or released, so work waiting for one starts at once.
    pub(crate) changed: Notify,
}

impl Roles {
    pub(crate) fn new(lease: Duration) -> Roles {
        Roles {
            taken: Mutex::default(),
            lease,
            changed: Notify::new(),
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, [Option<Instant>; 3]> {
        self.taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held now: renewed within the lease, counted from when the renewal was sent.
    pub(crate) fn holds(&self, role: Role, now: Instant) -> bool {
        self.taken()[role.index()].is_some_and(|t| now.saturating_duration_since(t) < self.lease)
    }

    /// Records the answer to a renewal sent at `sent`: the role is held from then (`true`), or
    /// another daemon holds it. Returns whether that changes what this daemon does.
    pub(crate) fn renewed(&self, role: Role, sent: Instant, held: bool) -> bool {
        let was = self.holds(role, sent);
        self.taken()[role.index()] = held.then_some(sent);
        was != held
    }

    /// Every role let go (a graceful stop).
    pub(crate) fn release_all(&self) {
        *self.taken() = [None; 3];
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_is_held_only_within_the_lease_from_when_its_renewal_was_sent() {
        let lease = Duration::from_secs(30);
        let roles = Roles::new(lease);
        let t0 = Instant::now();
        assert!(
            !roles.holds(Role::Rescan, t0),
            "nothing is held before it is taken"
        );
        assert!(
            roles.renewed(Role::Rescan, t0, true),
            "gaining a role is a change"
        );
        assert!(roles.holds(Role::Rescan, t0 + lease - Duration::from_millis(1)));
        // A daemon paused past its lease wakes up not holding it, before any renewal.
        assert!(!roles.holds(Role::Rescan, t0 + lease));
        assert!(!roles.holds(Role::Results, t0), "roles are held one by one");
        let t1 = t0 + Duration::from_secs(10);
        assert!(
            !roles.renewed(Role::Rescan, t1, true),
            "a renewal is no change"
        );
        assert!(roles.holds(Role::Rescan, t1 + lease - Duration::from_millis(1)));
        assert!(
            roles.renewed(Role::Rescan, t1, false),
            "another daemon took it"
        );
        assert!(!roles.holds(Role::Rescan, t1));
        roles.renewed(Role::Prune, t1, true);
        roles.release_all();
        assert!(!roles.holds(Role::Prune, t1));
    }
}
