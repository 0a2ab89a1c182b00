//! Owns the two "is the pipeline alive?" decisions, as pure functions of their inputs:
//! - [`assess`]: what `/healthz` answers (200, or 503 with a reason);
//! - [`should_feed_watchdog`]: whether the systemd watchdog is fed this round.
//!
//! They differ on purpose. `/healthz` is for people and monitoring: a rejected token, an unwritable
//! database or work stuck behind an outage are all "unhealthy", though a restart would not fix any
//! of them. The watchdog is for systemd, whose only remedy is a restart: it is starved only when
//! the worker pool is wedged (no sign of life for longer than a request may legally stall), never
//! because the API said no.

use std::time::{Duration, Instant};

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
    /// Why a small write to the queue database failed, if it did.
    pub database_not_writable: Option<String>,
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

/// Why the pipeline is unhealthy: the body of `/healthz`'s 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// Paused for a reason that waiting alone does not fix (a rejected token, a database that
    /// takes no writes).
    #[error("uploads paused: {}", .0.reason())]
    Paused(Pause),
    /// The health probe's own small write failed or did not finish in time.
    #[error("queue database not writable: {0}")]
    DatabaseNotWritable(String),
    /// The counts could not be read.
    #[error("queue database not readable: {0}")]
    DatabaseNotReadable(String),
    /// `[results] output_dir` takes no files.
    #[error("results cannot be written: {0}")]
    Results(String),
    #[error(
        "watched folder(s) not answering (a hung mount?), their recordings wait: {}",
        .0.join(", ")
    )]
    FoldersNotAnswering(Vec<String>),
    /// Work waits and nothing moved for longer than `[metrics] unhealthy_after`.
    #[error(
        "no progress for {} with {waiting} job(s) waiting (metrics.unhealthy_after = {}){}",
        humantime::format_duration(Duration::from_secs(since_progress.as_secs())),
        humantime::format_duration(*unhealthy_after),
        pause.as_ref().map(|p| format!("; {}", p.reason())).unwrap_or_default()
    )]
    NoProgress {
        since_progress: Duration,
        waiting: u64,
        unhealthy_after: Duration,
        /// The pause meanwhile, if any (an outage, a 429 hold): the likely why.
        pause: Option<Pause>,
    },
}

/// `Ok(())` when healthy, else the reason.
pub fn assess(i: &HealthInputs) -> Result<(), Unhealthy> {
    if let Some(p @ Pause::Auth(_)) = &i.pause {
        return Err(Unhealthy::Paused(p.clone()));
    }
    if let Some(e) = &i.database_not_writable {
        return Err(Unhealthy::DatabaseNotWritable(e.clone()));
    }
    if let Some(p @ Pause::Storage(_)) = &i.pause {
        return Err(Unhealthy::Paused(p.clone()));
    }
    if let Some(why) = &i.results {
        return Err(Unhealthy::Results(why.clone()));
    }
    if !i.folders_not_answering.is_empty() {
        return Err(Unhealthy::FoldersNotAnswering(
            i.folders_not_answering.clone(),
        ));
    }
    if i.work_waiting > 0 && i.since_progress > i.unhealthy_after {
        return Err(Unhealthy::NoProgress {
            since_progress: i.since_progress,
            waiting: i.work_waiting,
            unhealthy_after: i.unhealthy_after,
            pause: i.pause.clone(),
        });
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

/// The systemd watchdog's ping period for a `WatchdogSec=` of `timeout`: half of it. The ticker
/// sleeps until each ping is due (tokio's timers never fire early), so it needs no finer tick to
/// catch the moment (it used to tick every `timeout / 4`, at most 5 s, to ping on time).
pub fn watchdog_period(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(500))
}

/// When the ticker wakes next, after a turn that was due at `due` and ran at `now`: one period
/// on, from the schedule; a turn that ran late (a busy runtime) does not make the next ones bunch
/// up, nor push them further: a missed one is not made up for.
pub fn next_turn(due: Instant, now: Instant, every: Duration) -> Instant {
    let next = due + every;
    if next > now { next } else { now + every }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> HealthInputs {
        HealthInputs {
            pause: None,
            database_not_writable: None,
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
        let e = assess(&i).unwrap_err().to_string();
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
        let e = assess(&i).unwrap_err().to_string();
        assert!(e.contains("token rejected"), "{e}");
    }

    #[test]
    fn results_that_cannot_be_written_are_unhealthy_until_they_can() {
        let i = HealthInputs {
            results: Some("cannot create a file in /srv/t: Not a directory".into()),
            ..healthy()
        };
        let e = assess(&i).unwrap_err().to_string();
        assert!(
            e.contains("results cannot be written") && e.contains("/srv/t"),
            "{e}"
        );
        assert!(assess(&healthy()).is_ok());
    }

    #[test]
    fn an_unwritable_database_is_unhealthy() {
        let i = HealthInputs {
            database_not_writable: Some("disk I/O error".into()),
            ..healthy()
        };
        assert!(assess(&i).unwrap_err().to_string().contains("not writable"));
        let i = HealthInputs {
            pause: Some(Pause::Storage("database or disk is full".into())),
            ..healthy()
        };
        assert!(assess(&i).unwrap_err().to_string().contains("not writable"));
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
        let e = assess(&i).unwrap_err().to_string();
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
    fn watchdog_pings_come_every_half_timeout_from_the_schedule() {
        for secs in [1, 2, 10, 180] {
            assert_eq!(
                watchdog_period(Duration::from_secs(secs)),
                Duration::from_secs(secs) / 2
            );
        }
        let every = Duration::from_secs(90);
        let t0 = Instant::now();
        // On time, or a little late: the next turn keeps the schedule.
        assert_eq!(next_turn(t0, t0, every), t0 + every);
        let late = t0 + Duration::from_millis(300);
        assert_eq!(next_turn(t0, late, every), t0 + every);
        // A whole period late (a stalled runtime): one period from now, not at once.
        let very_late = t0 + Duration::from_secs(100);
        assert_eq!(next_turn(t0, very_late, every), very_late + every);
    }
}
