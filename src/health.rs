//! Owns the two "is the pipeline alive?" decisions, as pure functions of their inputs:
//! - [`assess`]: what `/healthz` answers (200, or 503 with a reason);
//! - [`should_feed_watchdog`]: whether the systemd watchdog is fed this round.
//!
//! They differ on purpose. `/healthz` is for people and monitoring: a rejected token, an unwritable
//! database or work stuck behind an outage are all "unhealthy", though a restart would not fix any
//! of them. The watchdog is for systemd, whose only remedy is a restart: it is starved only when
//! the worker pool is wedged (no sign of life for longer than a request may legally stall), never
//! because the API said no.

use std::time::Duration;

use crate::gate::Pause;

/// How much longer than `api.stall_timeout` the pool may be silent before the watchdog is starved.
/// Covers the slow local work between requests (an after-upload move across filesystems, a busy
/// database).
pub const WATCHDOG_GRACE: Duration = Duration::from_secs(120);

/// What `/healthz` looks at.
#[derive(Debug, Clone)]
pub struct HealthInputs {
    /// The gate's pause, if any.
    pub pause: Option<Pause>,
    /// The result of a small write to the queue database.
    pub database: Result<(), String>,
    /// Why results cannot be written (`[results] output_dir`), while they cannot.
    pub results: Option<String>,
    /// Jobs due now or in flight.
    pub work_waiting: u64,
    /// Time since the last upload answered, result fetched or upload byte sent.
    pub since_progress: Duration,
    /// `[metrics] unhealthy_after`.
    pub unhealthy_after: Duration,
    /// Watched folders that do not answer (a hung mount): their recordings wait.
    pub folders_not_answering: Vec<String>,
}

/// `Ok(())` when healthy, else the reason (the body of the 503).
pub fn assess(i: &HealthInputs) -> Result<(), String> {
    if let Some(p @ Pause::Auth(_)) = &i.pause {
        return Err(format!("uploads paused: {}", p.reason()));
    }
    if let Err(e) = &i.database {
        return Err(format!("queue database not writable: {e}"));
    }
    if let Some(p @ Pause::Storage(_)) = &i.pause {
        return Err(format!("uploads paused: {}", p.reason()));
    }
    if let Some(why) = &i.results {
        return Err(format!("results cannot be written: {why}"));
    }
    if !i.folders_not_answering.is_empty() {
        return Err(format!(
            "watched folder(s) not answering (a hung mount?), their recordings wait: {}",
            i.folders_not_answering.join(", ")
        ));
    }
    if i.work_waiting > 0 && i.since_progress > i.unhealthy_after {
        let mut why = format!(
            "no progress for {} with {} job(s) waiting (metrics.unhealthy_after = {})",
            humantime::format_duration(Duration::from_secs(i.since_progress.as_secs())),
            i.work_waiting,
            humantime::format_duration(i.unhealthy_after)
        );
        if let Some(p) = &i.pause {
            why.push_str(&format!("; {}", p.reason()));
        }
        return Err(why);
    }
    Ok(())
}

/// Whether to tell systemd "still alive" now.
///
/// `since_beat` is the time since the last sign of life (an idle worker loop turning over, an
/// outcome recorded, upload bytes moving). `gate_closed` means the workers are waiting at the gate
/// by design (401 pause, outage or 429 hold, full disk): idle-healthy, a restart would not help.
pub fn should_feed_watchdog(
    since_beat: Duration,
    stall_timeout: Duration,
    gate_closed: bool,
) -> bool {
    gate_closed || since_beat <= stall_timeout + WATCHDOG_GRACE
}

/// The systemd watchdog's ping schedule: `(feed_every, tick)` for a `WatchdogSec=` of `timeout`.
/// Pings are due every half of the timeout, checked on a tick of at most `max_tick` (and at
/// most a quarter of the timeout), so a late tick still lands well inside it.
pub fn watchdog_schedule(timeout: Duration, max_tick: Duration) -> (Duration, Duration) {
    let feed_every = (timeout / 2).max(Duration::from_millis(500));
    (
        feed_every,
        (timeout / 4).clamp(Duration::from_millis(250), max_tick),
    )
}

/// Whether a ping is due, `since_feed` after the last one. Half a tick of slack: with the tick a
/// divisor of `feed_every`, the tick that should ping does, even if it fires a hair early. With
/// `WatchdogSec` of 10 s or less the tick used to equal `feed_every`, a tick arrived a hair before
/// `feed_every` had elapsed, and pings came a whole `WatchdogSec` apart.
pub fn watchdog_due(since_feed: Duration, feed_every: Duration, tick: Duration) -> bool {
    since_feed + tick / 2 >= feed_every
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> HealthInputs {
        HealthInputs {
            pause: None,
            database: Ok(()),
            results: None,
            work_waiting: 0,
            since_progress: Duration::from_secs(3600),
            unhealthy_after: Duration::from_secs(600),
            folders_not_answering: Vec::new(),
        }
    }

    #[test]
    fn a_watched_folder_that_does_not_answer_is_unhealthy_and_named() {
        let i = HealthInputs {
            folders_not_answering: vec!["/mnt/nas/calls".into()],
            ..healthy()
        };
        let e = assess(&i).unwrap_err();
        assert!(
            e.contains("not answering") && e.contains("/mnt/nas/calls"),
            "{e}"
        );
    }

    #[test]
    fn idle_with_nothing_waiting_is_healthy_however_long() {
        assert!(assess(&healthy()).is_ok());
    }

    #[test]
    fn a_rejected_token_is_unhealthy_at_once() {
        let i = HealthInputs {
            pause: Some(Pause::Auth("HTTP 401: bad token".into())),
            ..healthy()
        };
        let e = assess(&i).unwrap_err();
        assert!(e.contains("token rejected"), "{e}");
    }

    #[test]
    fn results_that_cannot_be_written_are_unhealthy_until_they_can() {
        let i = HealthInputs {
            results: Some("cannot create a file in /srv/t: Not a directory".into()),
            ..healthy()
        };
        let e = assess(&i).unwrap_err();
        assert!(
            e.contains("results cannot be written") && e.contains("/srv/t"),
            "{e}"
        );
        assert!(assess(&healthy()).is_ok());
    }

    #[test]
    fn an_unwritable_database_is_unhealthy() {
        let i = HealthInputs {
            database: Err("disk I/O error".into()),
            ..healthy()
        };
        assert!(assess(&i).unwrap_err().contains("not writable"));
        let i = HealthInputs {
            pause: Some(Pause::Storage("database or disk is full".into())),
            ..healthy()
        };
        assert!(assess(&i).unwrap_err().contains("not writable"));
    }

    #[test]
    fn waiting_work_without_progress_is_unhealthy_only_after_the_threshold() {
        let mut i = HealthInputs {
            work_waiting: 3,
            since_progress: Duration::from_secs(599),
            ..healthy()
        };
        assert!(assess(&i).is_ok());
        i.since_progress = Duration::from_secs(601);
        i.pause = Some(Pause::Outage("connection refused".into()));
        let e = assess(&i).unwrap_err();
        assert!(e.contains("3 job(s) waiting"), "{e}");
        assert!(e.contains("API unreachable"), "{e}");
    }

    #[test]
    fn an_outage_alone_is_not_unhealthy_before_the_threshold() {
        let i = HealthInputs {
            pause: Some(Pause::Outage("refused".into())),
            work_waiting: 1,
            since_progress: Duration::from_secs(10),
            ..healthy()
        };
        assert!(assess(&i).is_ok());
    }

    #[test]
    fn the_watchdog_starves_only_when_the_pool_is_silent_past_the_stall_limit() {
        let stall = Duration::from_secs(60);
        assert!(should_feed_watchdog(Duration::from_secs(1), stall, false));
        assert!(should_feed_watchdog(stall + WATCHDOG_GRACE, stall, false));
        assert!(!should_feed_watchdog(
            stall + WATCHDOG_GRACE + Duration::from_secs(1),
            stall,
            false
        ));
        // Paused or held at the gate: waiting is what the workers are meant to do.
        assert!(should_feed_watchdog(
            Duration::from_secs(86400),
            stall,
            true
        ));
    }

    #[test]
    fn watchdog_pings_come_at_about_half_the_timeout_however_short() {
        let max_tick = Duration::from_secs(5);
        for secs in [1, 2, 4, 6, 10, 20, 180] {
            let timeout = Duration::from_secs(secs);
            let (every, tick) = watchdog_schedule(timeout, max_tick);
            assert!(tick <= every / 2, "{secs}s: tick {tick:?}, every {every:?}");
            // Ticks that fire a little early or late: the next ping comes on the first tick at or
            // after half the timeout, give or take one tick.
            for jitter_ms in [-3i64, 0, 3] {
                let mut since = Duration::ZERO;
                let mut gap = Duration::ZERO;
                for _ in 0..1000 {
                    let step = (tick.as_millis() as i64 + jitter_ms) as u64;
                    since += Duration::from_millis(step);
                    if watchdog_due(since, every, tick) {
                        gap = since;
                        break;
                    }
                }
                assert!(
                    gap + tick / 2 >= every && gap <= every + tick / 2,
                    "{secs}s, jitter {jitter_ms} ms: a ping {gap:?} after the last"
                );
            }
        }
    }
}
