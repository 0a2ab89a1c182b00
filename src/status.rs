//! Owns what `status` and `list` tell an operator: gathered from the database (so it works whether
//! or not the daemon runs) and rendered as JSON for scripts or as a short table for people.

use std::path::Path;

use serde::Serialize;

use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{Counts, DaemonLock, Job, PAUSE_KEY, Queue, QueueError};

/// The `daemon_state` key under which a running daemon publishes which accounts a rejected token
/// paused (JSON: account → the API's answer), for `status`'s per-source breakdown.
pub const ACCOUNTS_PAUSED_KEY: &str = "accounts_paused";

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
    /// Declares whose answer was lost or unusable (each may have left an interaction without audio
    /// at ElevateAI), in the life of the database.
    pub orphan_declares: u64,
    /// Calls forgotten whose erasure is not finished yet (the interaction at ElevateAI or the
    /// result files still to delete), and the last error of one whose remote delete failed. An
    /// extension.
    pub pending_forgets: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forget_error: Option<String>,
    /// Watched folders that do not answer now (a hung mount): their recordings wait. Empty when
    /// every folder answers or no daemon runs. An extension.
    pub folders_not_answering: Vec<String>,
    /// Each source's counts, and the answer that paused it while its account's token is
    /// rejected (an extension). The default source (`[watch] paths`) first; empty when `status`
    /// runs without a configuration.
    pub sources: Vec<SourceStatus>,
    /// Uploads recorded in the last hour: (jobs, bytes). For the table only; `--json` keeps its
    /// documented shape.
    #[serde(skip)]
    pub last_hour: (u64, u64),
    /// With the PostgreSQL queue: every daemon seen in the last hour (host, seconds since its
    /// heartbeat, jobs it holds), newest first. Absent for SQLite. An extension.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<crate::queue::pg::Member>,
}

/// One source in `status`.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub counts: Counts,
    /// Why its uploads are paused (its account's token rejected); null when they go on.
    pub paused: Option<String>,
}

pub async fn gather(queue: &Queue, db: &Path) -> Result<StatusReport, QueueError> {
    gather_for(queue, db, None).await
}

/// [`gather`], with the per-source breakdown of `cfg`'s sources.
pub async fn gather_for(
    queue: &Queue,
    db: &Path,
    cfg: Option<&Config>,
) -> Result<StatusReport, QueueError> {
    let mut report = gather_all(queue, db).await?;
    if let Some(cfg) = cfg {
        report.sources = per_source(queue, cfg, &report).await?;
    }
    Ok(report)
}

/// Counts by source (a scan of the jobs, done only when there are `[[source]]` tables; one
/// source's counts are the totals), and which sources a rejected token pauses.
async fn per_source(
    queue: &Queue,
    cfg: &Config,
    report: &StatusReport,
) -> Result<Vec<SourceStatus>, QueueError> {
    let paused: std::collections::BTreeMap<String, String> = match report.daemon_running {
        Some(false) => Default::default(),
        _ => queue
            .daemon_state(ACCOUNTS_PAUSED_KEY)
            .await?
            .and_then(|(v, _)| serde_json::from_str(&v).ok())
            .unwrap_or_default(),
    };
    let mut out: Vec<SourceStatus> = cfg
        .sources
        .iter()
        .map(|s| SourceStatus {
            name: s.name.clone(),
            counts: Counts::default(),
            paused: paused
                .get(cfg.account_of(s))
                .map(|m| format!("API token rejected: {m}")),
        })
        .collect();
    if out.len() == 1 {
        out[0].counts = report.counts.clone();
        return Ok(out);
    }
    for (root, c) in queue.counts_by_root().await? {
        let name = &cfg.source_of_root(&crate::queue::decode_path(&root)).name;
        if let Some(s) = out.iter_mut().find(|s| &s.name == name) {
            let t = &mut s.counts;
            t.pending += c.pending;
            t.declared += c.declared;
            t.uploading += c.uploading;
            t.uploaded += c.uploaded;
            t.processed += c.processed;
            t.failed += c.failed;
        }
    }
    Ok(out)
}

async fn gather_all(queue: &Queue, db: &Path) -> Result<StatusReport, QueueError> {
    let counts = queue.counts().await?;
    let (cluster, daemon_running, database) = match queue.cluster() {
        Some(pg) => {
            let members = pg.members(std::time::Duration::from_secs(3600)).await?;
            // Alive: not stopped, and heard from within its lease (after that, its jobs are
            // taken over anyway).
            let lease = pg.lease().as_secs_f64();
            let alive = members
                .iter()
                .any(|m| !m.stopped && m.heartbeat_age_s <= lease);
            (members, Some(alive), "PostgreSQL (shared)".to_string())
        }
        None => (
            Vec::new(),
            DaemonLock::is_held(db),
            db.display().to_string(),
        ),
    };
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
    let last_hour = queue.uploaded_since(now - 3_600_000).await?;
    let orphan_declares = queue.orphan_declares().await?;
    let forgets = queue.pending_forgets().await?;
    let forget_error = forgets.iter().rev().find_map(|t| t.last_error.clone());
    // Kept by the running daemon (`watch::health_task`); one that died says nothing about now.
    let folders_not_answering = match daemon_running {
        Some(false) => Vec::new(),
        _ => queue
            .daemon_state(crate::watch::UNHEALTHY_KEY)
            .await?
            .and_then(|(v, _)| serde_json::from_str::<Vec<String>>(&v).ok())
            .unwrap_or_default(),
    };
    Ok(StatusReport {
        last_hour,
        counts,
        paused: pause_reason.is_some(),
        pause_reason,
        oldest_pending_age_s: oldest,
        daemon_running,
        last_error: recent.first().map(|e| e.error.clone()),
        recent_errors: recent,
        database,
        orphan_declares,
        pending_forgets: forgets.len() as u64,
        forget_error,
        folders_not_answering,
        sources: Vec::new(),
        cluster,
    })
}

/// ANSI styles, or nothing when the output is not a terminal (or `NO_COLOR` is set).
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    /// Colour only for a person at a terminal.
    pub fn for_stdout() -> Style {
        use std::io::IsTerminal;
        Style {
            colour: std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn red(&self, t: &str) -> String {
        self.paint("1;31", t)
    }
    fn green(&self, t: &str) -> String {
        self.paint("32", t)
    }
    fn yellow(&self, t: &str) -> String {
        self.paint("33", t)
    }
    fn dim(&self, t: &str) -> String {
        self.paint("2", t)
    }
    fn bold(&self, t: &str) -> String {
        self.paint("1", t)
    }
}

/// The table `callferry status` prints for people.
pub fn render_text(r: &StatusReport, style: Style) -> String {
    let mut out = String::new();
    let daemon = match r.daemon_running {
        Some(true) => style.green("running"),
        Some(false) => style.yellow("not running"),
        None => "unknown".to_string(),
    };
    out.push_str(&format!(
        "daemon      {daemon}  {}\n",
        style.dim(&format!("(database {})", r.database))
    ));
    for m in &r.cluster {
        let state = if m.stopped {
            "stopped".to_string()
        } else {
            format!("{} job(s) held", m.held)
        };
        let roles = if m.roles.is_empty() {
            String::new()
        } else {
            format!(", does {}", m.roles.join(", "))
        };
        out.push_str(&format!(
            "member      {} on {} (pid {}): heartbeat {:.0}s ago, {state}{roles}\n",
            m.name, m.host, m.pid, m.heartbeat_age_s
        ));
    }
    match &r.pause_reason {
        Some(reason) => out.push_str(&format!("uploads     {} {reason}\n", style.red("PAUSED:"))),
        None => out.push_str(&format!("uploads     {}\n", style.green("active"))),
    }
    for f in &r.folders_not_answering {
        out.push_str(&format!(
            "folder      {} {f} (a hung mount?); its recordings wait\n",
            style.red("NOT ANSWERING:")
        ));
    }
    let (n, bytes) = r.last_hour;
    out.push_str(&format!(
        "last hour   {n} uploaded, {}\n",
        human_bytes(bytes)
    ));
    match r.oldest_pending_age_s {
        Some(age) => out.push_str(&format!("oldest      waiting for {}\n", human_age(age))),
        None => out.push_str("oldest      nothing waiting\n"),
    }
    if r.orphan_declares > 0 {
        // Only when there are some: a line for a rare event that needs no action by itself.
        out.push_str(&format!(
            "orphans     {} declare(s) whose answer was lost; each may be an interaction \
             without audio at ElevateAI\n",
            r.orphan_declares
        ));
    }
    if r.pending_forgets > 0 {
        // Erasure promised and not done: the operator may have to act (a token, the network).
        let why = match &r.forget_error {
            Some(e) => format!(" (last failure: {e})"),
            None => String::new(),
        };
        out.push_str(&format!(
            "forgets     {} {} not finished{why}; `callferry forget --pending` tries again\n",
            r.pending_forgets,
            if r.pending_forgets == 1 {
                "call"
            } else {
                "calls"
            },
        ));
    }
    render_states(&mut out, &r.counts, style);
    render_sources(&mut out, r, style);
    render_recent_errors(&mut out, r, style);
    out
}

/// The jobs by state.
fn render_states(out: &mut String, c: &Counts, style: Style) {
    out.push('\n');
    out.push_str(&style.bold(&format!("{:<12}{:>8}", "STATE", "JOBS")));
    out.push('\n');
    for (state, n) in [
        ("pending", c.pending),
        ("declared", c.declared),
        ("uploading", c.uploading),
        ("uploaded", c.uploaded),
        ("processed", c.processed),
        ("failed", c.failed),
    ] {
        let row = format!("{state:<12}{n:>8}");
        if state == "failed" && n > 0 {
            out.push_str(&style.red(&row));
        } else if n == 0 {
            out.push_str(&style.dim(&row));
        } else {
            out.push_str(&row);
        }
        out.push('\n');
    }
}

/// The last failures, newest first.
fn render_recent_errors(out: &mut String, r: &StatusReport, style: Style) {
    if r.recent_errors.is_empty() {
        return;
    }
    out.push('\n');
    out.push_str(&style.bold("RECENT ERRORS (newest first)"));
    out.push('\n');
    for e in &r.recent_errors {
        let ago = human_age(((now_ms() - e.at).max(0) as f64) / 1000.0);
        out.push_str(&format!(
            "{:<8}{:<11}{}\n{:19}{}\n",
            format!("#{}", e.job_id),
            format!("{ago} ago"),
            e.path,
            "",
            style.yellow(&e.error)
        ));
    }
}

/// The per-source table, when there is more than one source or one is paused.
fn render_sources(out: &mut String, r: &StatusReport, style: Style) {
    if r.sources.len() < 2 && r.sources.iter().all(|s| s.paused.is_none()) {
        return;
    }
    out.push('\n');
    out.push_str(&style.bold(&format!(
        "{:<16}{:>8}{:>10}{:>10}{:>8}  UPLOADS",
        "SOURCE", "WAITING", "UPLOADED", "PROCESSED", "FAILED"
    )));
    out.push('\n');
    for s in &r.sources {
        let c = &s.counts;
        let state = match &s.paused {
            Some(why) => format!("{} {why}", style.red("PAUSED:")),
            None => style.green("active"),
        };
        out.push_str(&format!(
            "{:<16}{:>8}{:>10}{:>10}{:>8}  {state}\n",
            s.name,
            c.waiting(),
            c.uploaded,
            c.processed,
            c.failed
        ));
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
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

fn list_row(j: &Job) -> ListRow<'_> {
    ListRow {
        job: j,
        next_attempt: matches!(j.state.public().as_str(), "pending" | "declared")
            .then(|| ms_to_rfc3339(j.next_attempt_at)),
        created: ms_to_rfc3339(j.created_at),
    }
}

pub fn list_json(jobs: &[Job]) -> String {
    let mut out = JsonList::default();
    let mut text: String = jobs.iter().map(|j| out.row(j)).collect();
    text.push_str(&out.end());
    text
}

/// `list --json` written as the rows come: the same pretty-printed array as serialising them all
/// at once, one element at a time.
#[derive(Default)]
pub struct JsonList {
    rows: u64,
}

impl JsonList {
    /// The text for one more element (with the `[` before the first).
    pub fn row(&mut self, j: &Job) -> String {
        let one = serde_json::to_string_pretty(&list_row(j)).unwrap_or_else(|_| "null".into());
        let mut out = String::with_capacity(one.len() + 64);
        out.push_str(if self.rows == 0 { "[\n" } else { ",\n" });
        for (i, line) in one.lines().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str("  ");
            out.push_str(line);
        }
        self.rows += 1;
        out
    }

    /// What closes the array (all of it when there were no rows).
    pub fn end(&self) -> String {
        if self.rows == 0 { "[]" } else { "\n]" }.to_string()
    }
}

pub fn list_header() -> String {
    format!(
        "{:>7}  {:<9}  {:>3}  {:<20}  {:<36}  {:<12}  {}\n",
        "ID", "STATE", "TRY", "NEXT ATTEMPT", "INTERACTION", "SOURCE", "PATH / LAST ERROR"
    )
}

pub fn list_text(jobs: &[Job]) -> String {
    let now = now_ms();
    let mut out = list_header();
    for j in jobs {
        out.push_str(&list_text_row(j, now));
    }
    out
}

/// One job's lines in the `list` table.
pub fn list_text_row(j: &Job, now: i64) -> String {
    let mut out = String::new();
    {
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
            "{:>7}  {:<9}  {:>3}  {:<20}  {:<36}  {:<12}  {}\n",
            j.id,
            j.state.public().as_str(),
            j.attempts,
            next,
            j.interaction_id.as_deref().unwrap_or("-"),
            j.source.as_deref().unwrap_or("-"),
            j.display_path()
        ));
        if let Some(e) = &j.last_error
            && j.state.public().as_str() != "uploaded"
        {
            out.push_str(&format!("{:>98}{e}\n", ""));
        }
        if let Some(d) = &j.held_by {
            out.push_str(&format!("{:>98}held by {d}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests;
