//! Owns what `status` and `list` tell an operator: gathered from the database (so it works whether
//! or not the daemon runs) and rendered as JSON for scripts or as a short table for people.

use std::path::Path;

use serde::Serialize;

use crate::app::{DaemonLock, PAUSE_KEY};
use crate::clock::now_ms;
use crate::queue::{Counts, Job, Queue, QueueError};

#[derive(Debug, Serialize)]
pub struct RecentError {
    pub job_id: i64,
    pub path: String,
    pub error: String,
    pub at: i64,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub counts: Counts,
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub oldest_pending_age_s: Option<f64>,
    /// Whether a daemon holds the database's lock (null: cannot tell).
    pub daemon_running: Option<bool>,
    pub last_error: Option<String>,
    pub recent_errors: Vec<RecentError>,
    pub database: String,
}

pub async fn gather(queue: &Queue, db: &Path) -> Result<StatusReport, QueueError> {
    let counts = queue.counts().await?;
    let daemon_running = DaemonLock::is_held(db);
    // A pause recorded by a daemon that has since died says nothing about now.
    let pause_reason = match daemon_running {
        Some(false) => None,
        _ => queue.daemon_state(PAUSE_KEY).await?.map(|(v, _)| v),
    };
    let now = now_ms();
    let oldest = queue
        .oldest_waiting()
        .await?
        .map(|t| ((now - t).max(0) as f64) / 1000.0);
    let recent: Vec<RecentError> = queue
        .last_errors(5)
        .await?
        .into_iter()
        .map(|(job_id, path, error, at)| RecentError {
            job_id,
            path,
            error,
            at,
        })
        .collect();
    Ok(StatusReport {
        counts,
        paused: pause_reason.is_some(),
        pause_reason,
        oldest_pending_age_s: oldest,
        daemon_running,
        last_error: recent.first().map(|e| e.error.clone()),
        recent_errors: recent,
        database: db.display().to_string(),
    })
}

pub fn render_text(r: &StatusReport) -> String {
    let c = &r.counts;
    let mut out = String::new();
    let daemon = match r.daemon_running {
        Some(true) => "running",
        Some(false) => "not running",
        None => "unknown",
    };
    out.push_str(&format!("daemon     {daemon}  ({})\n", r.database));
    match &r.pause_reason {
        Some(reason) => out.push_str(&format!("uploads    PAUSED: {reason}\n")),
        None => out.push_str("uploads    active\n"),
    }
    out.push_str(&format!(
        "queue      pending {}  declared {}  uploading {}  uploaded {}  processed {}  failed {}\n",
        c.pending, c.declared, c.uploading, c.uploaded, c.processed, c.failed
    ));
    match r.oldest_pending_age_s {
        Some(age) => out.push_str(&format!("oldest     waiting for {}\n", human_age(age))),
        None => out.push_str("oldest     nothing waiting\n"),
    }
    if !r.recent_errors.is_empty() {
        out.push_str("recent errors\n");
        for e in &r.recent_errors {
            out.push_str(&format!(
                "  #{:<6} {} ago  {}\n          {}\n",
                e.job_id,
                human_age(((now_ms() - e.at).max(0) as f64) / 1000.0),
                e.path,
                e.error
            ));
        }
    }
    out
}

pub fn human_age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn ms_to_rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One row of `list --json`.
#[derive(Debug, Serialize)]
pub struct ListRow<'a> {
    #[serde(flatten)]
    pub job: &'a Job,
    pub next_attempt: Option<String>,
    pub created: String,
}

pub fn list_json(jobs: &[Job]) -> String {
    let rows: Vec<ListRow> = jobs
        .iter()
        .map(|j| ListRow {
            job: j,
            next_attempt: matches!(j.state.public().as_str(), "pending" | "declared")
                .then(|| ms_to_rfc3339(j.next_attempt_at)),
            created: ms_to_rfc3339(j.created_at),
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
}

pub fn list_text(jobs: &[Job]) -> String {
    let mut out = format!(
        "{:>7}  {:<9}  {:>3}  {:<20}  {:<36}  {}\n",
        "ID", "STATE", "TRY", "NEXT ATTEMPT", "INTERACTION", "PATH / LAST ERROR"
    );
    let now = now_ms();
    for j in jobs {
        let next = if matches!(j.state.public().as_str(), "pending" | "declared") {
            if j.next_attempt_at <= now {
                "now".to_string()
            } else {
                format!(
                    "in {}",
                    human_age((j.next_attempt_at - now) as f64 / 1000.0)
                )
            }
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:>7}  {:<9}  {:>3}  {:<20}  {:<36}  {}\n",
            j.id,
            j.state.public().as_str(),
            j.attempts,
            next,
            j.interaction_id.as_deref().unwrap_or("-"),
            j.path
        ));
        if let Some(e) = &j.last_error
            && j.state.public().as_str() != "uploaded"
        {
            out.push_str(&format!("{:>84}{e}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(human_age(5.2), "5s");
        assert_eq!(human_age(125.0), "2m05s");
        assert_eq!(human_age(7300.0), "2h01m");
        assert_eq!(human_age(90000.0), "1d01h");
    }
}
