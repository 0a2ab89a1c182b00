//! Owns what a failed request means: for its job (wait, try again, fail) and for every worker (hold
//! back). One pure function of what failed, the job's attempts and age, the limits and a random
//! number; the upload workers and the results follower both ask it, and carry the verdict out
//! through the gate and the queue. Tested as a table.

use std::time::Duration;

use crate::api::{ApiError, ErrorClass};
use crate::config::Config;
use crate::retry::{Backoff, GiveUp, give_up};

/// What went wrong, as far as the decision cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// EMFILE/ENFILE: the process has no descriptor left for a socket or the recording.
    Descriptors,
    /// 401/403: the token is wrong for every request.
    Auth,
    /// Connection refused, DNS, a redirect: every request would fail the same way.
    Unreachable,
    /// 429, with the server's `Retry-After` if it sent one.
    RateLimited(Option<Duration>),
    /// A 4xx refusing this request: trying again cannot help.
    Rejected,
    /// A 5xx: the job's failure, unless the circuit breaker says the service is failing.
    ServerError,
    /// A reset, a stall, an unusable answer, a local read error.
    Transient,
}

impl Failure {
    pub fn of(err: &ApiError) -> Failure {
        if out_of_descriptors(err) {
            return Failure::Descriptors;
        }
        match err.class() {
            ErrorClass::Auth => Failure::Auth,
            ErrorClass::Unreachable => Failure::Unreachable,
            ErrorClass::RateLimited(ra) => Failure::RateLimited(ra),
            ErrorClass::Rejected => Failure::Rejected,
            ErrorClass::Transient if matches!(err.status(), Some(500..=599)) => {
                Failure::ServerError
            }
            ErrorClass::Transient => Failure::Transient,
        }
    }
}

/// EMFILE or ENFILE anywhere in the failure. The API client flattens its errors to text, which
/// carries the OS error's number, as std's `io::Error` prints it.
fn out_of_descriptors(err: &ApiError) -> bool {
    let text = err.to_string();
    [libc::EMFILE, libc::ENFILE]
        .iter()
        .any(|n| text.contains(&format!("(os error {n})")))
}

/// Why every worker holds back; the gate shows it as its pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Descriptors,
    Auth,
    Outage,
    /// The circuit breaker is open: a 5xx storm is the service's outage.
    Failing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every worker holds back (the gate's backoff); the job waits without an attempt counted.
    Hold(Hold),
    /// The service asked everyone to slow down: hold for this long; no attempt counted.
    SlowDown(Duration),
    /// The job's own failure: counted, and tried again after this long.
    Retry(Duration),
    /// Failed for good: refused (`None`), or out of attempts or age.
    Fail(Option<GiveUp>),
}

/// The limits one kind of work runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub max_age: Duration,
}

impl Limits {
    /// Declares and uploads: `[upload]`'s backoff and give-up rule.
    pub fn upload(cfg: &Config) -> Limits {
        Limits {
            backoff: upload_backoff(cfg),
            max_attempts: cfg.upload.max_attempts,
            max_age: cfg.upload.max_age,
        }
    }

    /// Result polls: never given up by attempts or age (`[results] max_wait` bounds the wait
    /// elsewhere), and no faster than the poll interval.
    pub fn following(cfg: &Config) -> Limits {
        Limits {
            backoff: Backoff {
                initial: cfg.upload.backoff_initial,
                max: cfg.upload.backoff_max.max(cfg.results.poll_interval),
            },
            max_attempts: u32::MAX,
            max_age: Duration::MAX,
        }
    }
}

/// The backoff every retry and hold starts from (`[upload] backoff_initial`, `backoff_max`).
pub fn upload_backoff(cfg: &Config) -> Backoff {
    Backoff {
        initial: cfg.upload.backoff_initial,
        max: cfg.upload.backoff_max,
    }
}

/// The decision. `attempts` counts this failure; `breaker_open` is the gate's answer to this 5xx
/// (only asked for a [`Failure::ServerError`]); `unit` is a random number in [0, 1).
pub fn decide(
    failure: Failure,
    attempts: u32,
    age: Duration,
    breaker_open: bool,
    limits: &Limits,
    unit: f64,
) -> Verdict {
    match failure {
        Failure::Descriptors => Verdict::Hold(Hold::Descriptors),
        Failure::Auth => Verdict::Hold(Hold::Auth),
        Failure::Unreachable => Verdict::Hold(Hold::Outage),
        Failure::RateLimited(ra) => Verdict::SlowDown(limits.backoff.next_delay(1, unit, ra)),
        Failure::Rejected => Verdict::Fail(None),
        Failure::ServerError if breaker_open => Verdict::Hold(Hold::Failing),
        Failure::ServerError | Failure::Transient => {
            match give_up(attempts, limits.max_attempts, age, limits.max_age) {
                Some(why) => Verdict::Fail(Some(why)),
                None => Verdict::Retry(limits.backoff.delay(attempts, unit)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            backoff: Backoff {
                initial: S,
                max: 60 * S,
            },
            max_attempts: 5,
            max_age: 3600 * S,
        }
    }

    #[test]
    fn the_decision_table() {
        use Failure::*;
        let l = limits();
        let young = 10 * S;
        let old = 7200 * S;
        // (what failed, attempts incl. this one, age, breaker open, unit) -> verdict
        let rows: &[(Failure, u32, Duration, bool, f64, Verdict)] = &[
            (
                Descriptors,
                99,
                old,
                false,
                0.5,
                Verdict::Hold(Hold::Descriptors),
            ),
            (Auth, 99, old, false, 0.5, Verdict::Hold(Hold::Auth)),
            (
                Unreachable,
                99,
                old,
                false,
                0.5,
                Verdict::Hold(Hold::Outage),
            ),
            (
                ServerError,
                99,
                old,
                true,
                0.5,
                Verdict::Hold(Hold::Failing),
            ),
            (ServerError, 1, young, false, 0.0, Verdict::Retry(S / 2)),
            (
                ServerError,
                5,
                young,
                false,
                0.0,
                Verdict::Fail(Some(GiveUp::Attempts(5))),
            ),
            (Transient, 1, young, false, 0.0, Verdict::Retry(S / 2)),
            (Transient, 1, young, false, 1.0, Verdict::Retry(S)),
            (Transient, 3, young, false, 0.0, Verdict::Retry(2 * S)),
            (
                Transient,
                20,
                young,
                true,
                0.0,
                Verdict::Fail(Some(GiveUp::Attempts(20))),
            ),
            (
                Transient,
                2,
                old,
                false,
                0.0,
                Verdict::Fail(Some(GiveUp::Age(3600 * S))),
            ),
            (Rejected, 1, young, false, 0.5, Verdict::Fail(None)),
            (
                RateLimited(None),
                4,
                young,
                false,
                0.0,
                Verdict::SlowDown(S / 2),
            ),
            (
                RateLimited(Some(30 * S)),
                1,
                old,
                false,
                0.0,
                Verdict::SlowDown(30 * S),
            ),
            // A Retry-After beyond the cap is cut to it (an hour).
            (
                RateLimited(Some(86_400 * S)),
                1,
                young,
                false,
                0.0,
                Verdict::SlowDown(3600 * S),
            ),
        ];
        for (i, (f, attempts, age, open, unit, want)) in rows.iter().enumerate() {
            let got = decide(*f, *attempts, *age, *open, &l, *unit);
            assert_eq!(&got, want, "row {i}: {f:?} attempts {attempts} age {age:?}");
        }
    }

    #[test]
    fn following_never_gives_up_and_waits_at_least_the_poll_interval() {
        let l = Limits {
            backoff: Backoff {
                initial: S,
                max: 60 * S,
            },
            max_attempts: u32::MAX,
            max_age: Duration::MAX,
        };
        let v = decide(Failure::Transient, 10_000, 86_400 * 365 * S, false, &l, 0.0);
        assert_eq!(v, Verdict::Retry(30 * S));
    }

    #[test]
    fn failures_are_told_apart() {
        let status = |status: u16| ApiError::Status {
            status,
            message: "x".into(),
            retry_after: None,
        };
        assert_eq!(Failure::of(&status(401)), Failure::Auth);
        assert_eq!(Failure::of(&status(503)), Failure::ServerError);
        assert_eq!(Failure::of(&status(400)), Failure::Rejected);
        assert_eq!(Failure::of(&status(429)), Failure::RateLimited(None));
        assert_eq!(
            Failure::of(&ApiError::Transport("reset".into())),
            Failure::Transient
        );
        assert_eq!(
            Failure::of(&ApiError::Unreachable("refused".into())),
            Failure::Unreachable
        );
        let emfile = ApiError::Local(std::io::Error::from_raw_os_error(libc::EMFILE).to_string());
        assert_eq!(Failure::of(&emfile), Failure::Descriptors);
    }
}
