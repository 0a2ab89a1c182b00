//! The job state machine, in one table: every transition with its guard (the states it may leave)
//! and the state each one goes to. The statements in `transitions` and `follow` take their states
//! from here, so a new state or edge is added here and nowhere else; a transition whose guard
//! fails is [`QueueError::NotInState`](super::QueueError::NotInState).
//!
//! What is not a transition keeps the state and only guards on it: counting a lost declare
//! (`declaring`), following (`uploaded`), a recording that moved ([`NOT_UPLOADED`] or `failed`).
//! The schema's triggers (migrations 0004, 0005) count states and write the `declared` and
//! `uploaded` events from the same edges.

use super::State::{self, *};

/// One kind of step in a job's life. See [`Transition::edges`] for what each one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A worker takes a due job (`Queue::claim`).
    Claim,
    /// The interaction id is committed, before the upload starts (`Queue::mark_declared`).
    Declared,
    /// The service has the audio, 201 or 409 (`Queue::mark_uploaded`).
    Uploaded,
    /// A claimed job goes back to wait: a failed call, an abandoned upload at shutdown
    /// (`Queue::reschedule`), or a job found in flight at start (`Queue::recover`).
    PutBack,
    /// A claimed job needs an operator (`Queue::fail`).
    Fail,
    /// Every result is written (`Queue::mark_processed`).
    Processed,
    /// Following ended in a failure the service reported, or `max_wait` (`Queue::fail_following`).
    FailFollowing,
    /// `callferry retry` (`Queue::retry`).
    Retry,
}

impl Transition {
    pub const ALL: [Transition; 8] = [
        Transition::Claim,
        Transition::Declared,
        Transition::Uploaded,
        Transition::PutBack,
        Transition::Fail,
        Transition::Processed,
        Transition::FailFollowing,
        Transition::Retry,
    ];

    /// The state machine: for each transition, each state it may leave and where it goes. Read as
    /// a table, it is the diagram of ARCHITECTURE.md ("Job states and crash recovery").
    pub const fn edges(self) -> &'static [(State, State)] {
        match self {
            Transition::Claim => &[(Pending, Declaring), (Declared, Uploading)],
            Transition::Declared => &[(Declaring, Uploading)],
            Transition::Uploaded => &[(Uploading, Uploaded)],
            Transition::PutBack => &[(Declaring, Pending), (Uploading, Declared)],
            Transition::Fail => &[(Declaring, Failed), (Uploading, Failed)],
            Transition::Processed => &[(Uploaded, Processed)],
            Transition::FailFollowing => &[(Uploaded, Failed)],
            // The row decides which (see `Queue::retry`): no interaction id, declared again; the
            // service has the audio, followed again; otherwise uploaded again on the same id.
            Transition::Retry => &[(Failed, Pending), (Failed, Uploaded), (Failed, Declared)],
        }
    }

    /// The guard: the states this transition may leave.
    pub fn from_states(self) -> Vec<State> {
        let mut v: Vec<State> = Vec::new();
        for (from, _) in self.edges() {
            if !v.contains(from) {
                v.push(*from);
            }
        }
        v
    }

    /// Where a job in `from` goes, if this transition may leave `from` (the first edge's target
    /// for [`Transition::Retry`], whose target the row decides).
    pub fn target(self, from: State) -> Option<State> {
        self.edges().iter().find(|(f, _)| *f == from).map(|e| e.1)
    }

    /// SQL: `state IN (...)` over the guard's states.
    pub(super) fn sql_guard(self) -> String {
        format!("state IN {}", sql_in(&self.from_states()))
    }

    /// SQL: the new state, as a `CASE` over the old one when it depends on it (all of a `SET`'s
    /// expressions see the old row). Not for [`Transition::Retry`], whose target depends on other
    /// columns.
    pub(super) fn sql_target(self) -> String {
        debug_assert!(self != Transition::Retry);
        let edges = self.edges();
        if edges.iter().all(|e| e.1 == edges[0].1) {
            // One target: also right for a replay that finds the job there already.
            return format!("'{}'", edges[0].1);
        }
        let arms: String = self
            .edges()
            .iter()
            .map(|(f, t)| format!(" WHEN '{f}' THEN '{t}'"))
            .collect();
        format!("CASE state{arms} END")
    }
}

/// A job not yet uploaded (waiting, or held by a worker): its age is the queue's age.
pub const NOT_UPLOADED: [State; 4] = [Pending, Declaring, Declared, Uploading];

/// The service has the audio; nothing is left to do but (optionally) results.
pub const DONE: [State; 2] = [Uploaded, Processed];

/// SQL: `('a', 'b')`. States are our own constants, never user input.
pub(super) fn sql_in(states: &[State]) -> String {
    let list: Vec<String> = states.iter().map(|s| format!("'{s}'")).collect();
    format!("({})", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_is_reachable_and_only_processed_is_final() {
        for s in super::super::state::ALL {
            let enters = Transition::ALL
                .iter()
                .any(|t| t.edges().iter().any(|e| e.1 == s));
            assert!(enters || s == Pending, "{s} cannot be reached");
            let leaves = Transition::ALL.iter().any(|t| t.target(s).is_some());
            assert_eq!(leaves, s != Processed, "{s}");
        }
    }

    #[test]
    fn the_sql_is_built_from_the_table() {
        assert_eq!(
            Transition::Claim.sql_target(),
            "CASE state WHEN 'pending' THEN 'declaring' WHEN 'declared' THEN 'uploading' END"
        );
        assert_eq!(
            Transition::Fail.sql_guard(),
            "state IN ('declaring', 'uploading')"
        );
        assert_eq!(Transition::Declared.sql_target(), "'uploading'");
        assert_eq!(Transition::PutBack.target(Uploading), Some(Declared));
        assert_eq!(Transition::PutBack.target(Failed), None);
    }
}
