//! Job states. The queue keeps two finer internal states (`declaring`, held by a worker that is
//! declaring; shown as `pending`) on top of the ones users see.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Found, waiting to be declared (or to retry the declare).
    Pending,
    /// A worker is declaring it right now. Internal; shown as `pending`.
    Declaring,
    /// Has an interaction id; waiting to upload (or to retry). Never declared again.
    Declared,
    /// A worker is uploading it right now.
    Uploading,
    /// The service has the audio (201, or 409 for an earlier attempt that got through).
    Uploaded,
    /// Results written (only with `[results] enabled`).
    Processed,
    /// Needs an operator; `retry` moves it back.
    Failed,
}

pub const ALL: [State; 7] = [
    State::Pending,
    State::Declaring,
    State::Declared,
    State::Uploading,
    State::Uploaded,
    State::Processed,
    State::Failed,
];

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Declaring => "declaring",
            State::Declared => "declared",
            State::Uploading => "uploading",
            State::Uploaded => "uploaded",
            State::Processed => "processed",
            State::Failed => "failed",
        }
    }

    /// The state as users see it.
    pub fn public(self) -> State {
        match self {
            State::Declaring => State::Pending,
            s => s,
        }
    }

    /// Internal states that a user-facing state stands for.
    pub fn internal_states(self) -> Vec<State> {
        ALL.into_iter()
            .filter(|s| s.public() == self.public())
            .collect()
    }
}

/// `a, b or c`, for messages.
pub fn one_of(states: &[State]) -> String {
    match states {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => {
            let rest: Vec<&str> = rest.iter().map(|s| s.as_str()).collect();
            format!("{} or {last}", rest.join(", "))
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is none of ours (`list --state`, or a row changed by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {:?}; one of {}", .0, public_names())]
pub struct UnknownState(pub String);

/// The names users see, in order.
fn public_names() -> String {
    let names: Vec<&str> = ALL
        .into_iter()
        .filter(|s| s.public() == *s)
        .map(State::as_str)
        .collect();
    names.join(", ")
}

impl FromStr for State {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

pub fn serialize_public<S: serde::Serializer>(s: &State, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.public().as_str())
}
