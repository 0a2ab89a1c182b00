//! Owns "when is the next attempt?": capped exponential backoff with jitter, `Retry-After`, and the
//! give-up rule (attempts and age). Pure functions of their inputs; the caller supplies the clock and
//! the random number, so every bound is testable without waiting.

use std::time::Duration;

/// Longest `Retry-After` we honour; a server asking for more is capped, so a misconfigured proxy
/// cannot park the queue for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before attempt number `failures + 1`, after `failures` failures (1-based).
    ///
    /// "Equal jitter": half of the exponential step is fixed and half random, so retries from many
    /// jobs spread out yet never collapse to zero. `unit` is a random number in [0, 1).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(40);
        let base = self
            .initial
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let half = base / 2;
        let unit = unit.clamp(0.0, 1.0);
        half + half.mul_f64(unit)
    }

    /// The delay to use after a failure, honouring the server's `Retry-After` when it asks for more.
    pub fn next_delay(&self, failures: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        let own = self.delay(failures, unit);
        match retry_after {
            Some(ra) => own.max(ra.min(MAX_RETRY_AFTER)),
            None => own,
        }
    }
}

/// Why a job must stop being retried, if it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    Attempts(u32),
    Age(Duration),
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::Attempts(n) => write!(f, "gave up after {n} attempts (upload.max_attempts)"),
            GiveUp::Age(d) => write!(
                f,
                "gave up: job older than {} (upload.max_age)",
                humantime::format_duration(*d)
            ),
        }
    }
}

/// Decides whether a job that has now failed `attempts` times, created `age` ago, gets another try.
pub fn give_up(
    attempts: u32,
    max_attempts: u32,
    age: Duration,
    max_age: Duration,
) -> Option<GiveUp> {
    if attempts >= max_attempts {
        Some(GiveUp::Attempts(attempts))
    } else if age >= max_age {
        Some(GiveUp::Age(max_age))
    } else {
        None
    }
}

/// Parses a `Retry-After` header: delta-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_parse(v)?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

fn httpdate_parse(v: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(v).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        let parts: Vec<&str> = v.split_whitespace().collect();
        if parts.len() != 6 || parts[5] != "GMT" {
            return None;
        }
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| *m == parts[2])?
            + 1;
        let s = format!("{}-{:02}-{:0>2}T{}Z", parts[3], month, parts[1], parts[4]);
        humantime::parse_rfc3339(&s).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff {
        initial: Duration::from_secs(2),
        max: Duration::from_secs(600),
    };

    #[test]
    fn grows_exponentially_then_caps() {
        assert_eq!(B.delay(1, 1.0), Duration::from_secs(2));
        assert_eq!(B.delay(2, 1.0), Duration::from_secs(4));
        assert_eq!(B.delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(B.delay(30, 1.0), Duration::from_secs(600));
        assert_eq!(B.delay(1000, 1.0), Duration::from_secs(600));
        assert_eq!(B.delay(3, 0.0), Duration::from_secs(4));
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        assert_eq!(
            B.next_delay(1, 0.0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            B.next_delay(1, 0.0, Some(Duration::from_secs(999_999))),
            MAX_RETRY_AFTER
        );
        assert_eq!(
            B.next_delay(1, 0.0, Some(Duration::ZERO)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn gives_up_on_attempts_or_age() {
        let day = Duration::from_secs(86400);
        assert_eq!(give_up(3, 12, day, 7 * day), None);
        assert_eq!(give_up(12, 12, day, 7 * day), Some(GiveUp::Attempts(12)));
        assert_eq!(give_up(1, 12, 8 * day, 7 * day), Some(GiveUp::Age(7 * day)));
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = humantime::parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 10:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_cap_nor_falls_below_half_step(
            failures in 0u32..10_000, unit in 0.0f64..1.0,
            initial_ms in 1u64..60_000, max_ms in 1u64..3_600_000,
        ) {
            let b = Backoff { initial: Duration::from_millis(initial_ms), max: Duration::from_millis(max_ms.max(initial_ms)) };
            let d = b.delay(failures, unit);
            prop_assert!(d <= b.max);
            prop_assert!(d >= b.initial.min(b.max) / 2);
        }

        #[test]
        fn delay_is_monotonic_in_failures_at_fixed_jitter(failures in 1u32..60, unit in 0.0f64..1.0) {
            prop_assert!(B.delay(failures, unit) <= B.delay(failures + 1, unit));
        }
    }
}
