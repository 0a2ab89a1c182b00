//! Owns forgetting calls (`callferry forget`, the right to erasure) outside the database: which jobs
//! a request names, the order of the steps, the interaction at ElevateAI, the result files and the
//! index lines. The database's side (tombstones, fingerprints, scrubbing) is `queue::forget`.
//!
//! Steps, each idempotent, so a `kill -9` anywhere is finished by the next run:
//! 1. per job, one transaction: fingerprints kept, tombstone written, job and events deleted.
//!    From here no worker or follower can move the call on (their guarded statements find no
//!    row), and the interaction id lives only in the tombstone;
//! 2. the result files (those the tombstone names and those the job's index lines name) are
//!    removed, then the index is rewritten without its lines; recorded as `local_done`;
//! 3. `DELETE /interactions/{id}` (a 404 is done too); recorded as `remote_done`;
//! 4. finished tombstones are deleted, and the database is scrubbed (`Queue::scrub`).
//!
//! Every later `forget` run, and the daemon at start, first finishes what is pending.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{ApiClient, ErrorClass};
use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{Forgot, Job, Queue, QueueError, Tombstone};
use crate::results::result_files;

/// The clients to delete with: `[api]`'s token, and each `[[source]]` that has its own account.
#[derive(Debug, Default, Clone)]
pub struct Apis {
    /// None: no `[api]` token; the remote deletes of its calls stay pending.
    pub default: Option<ApiClient>,
    /// By source name.
    pub tenants: std::collections::BTreeMap<String, ApiClient>,
}

impl Apis {
    /// The client of the account a call was declared on (its source's, else `[api]`'s).
    fn for_source(&self, cfg: &Config, source: Option<&str>) -> Option<&ApiClient> {
        let account = source
            .and_then(|s| cfg.source_named(s))
            .map(|s| cfg.account_of(s));
        account
            .and_then(|a| self.tenants.get(a))
            .or(self.default.as_ref())
    }
}

/// Which calls to forget.
#[derive(Debug, Clone)]
pub enum Selector {
    /// Job ids, as `callferry list` shows them.
    Ids(Vec<i64>),
    /// Call ids (`externalIdentifier`).
    ExternalIds(Vec<String>),
    /// Recordings last written (file mtime, as queued) before now minus this.
    OlderThan(Duration),
    /// None: only finish forgets left pending.
    Pending,
}

/// What a run did, for the command's output.
#[derive(Debug, Default)]
pub struct Report {
    /// Jobs turned into tombstones by this run.
    pub forgotten: usize,
    /// Ids given that name no job.
    pub unknown_ids: Vec<i64>,
    /// Call ids given that no job carries.
    pub unmatched: Vec<String>,
    /// Jobs left alone: a running daemon is sending their declare (run again in a moment).
    pub in_flight: Vec<i64>,
    /// Forgotten while being declared by a daemon that then died: an interaction may exist at
    /// ElevateAI under this call id whose id callferry never learnt.
    pub maybe_orphaned: Vec<i64>,
    pub files_removed: usize,
    pub index_lines_removed: usize,
    /// Interactions deleted at ElevateAI now, and those it did not know (already gone).
    pub remote_deleted: usize,
    pub remote_gone: usize,
    /// Forgets complete (this run's and earlier ones').
    pub finished: u64,
    /// Forgets still pending, each with why.
    pub pending: Vec<String>,
    /// The database was vacuumed (else a running daemon does it at its next start).
    pub vacuumed: bool,
}

/// The daemon's part, once after start: finishes the forgets a `forget` left pending (a refused
/// remote delete, an interrupted run) and the vacuum a `forget` beside a running daemon left to
/// it. Logged; nothing else waits for it.
pub async fn resume_in_daemon(cfg: std::sync::Arc<Config>, queue: Queue, apis: Apis) {
    let pending = match queue.pending_forgets().await {
        Ok(p) => p.len(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read pending forgets");
            return;
        }
    };
    if pending == 0 && !queue.scrub_pending().await.unwrap_or(false) {
        return;
    }
    let mut report = Report::default();
    match finish_pending(&cfg, &queue, &apis, true, &mut report).await {
        Ok(()) if report.pending.is_empty() => tracing::info!(
            finished = report.finished,
            "pending forgets finished; the database is vacuumed"
        ),
        Ok(()) => tracing::warn!(
            finished = report.finished,
            still_pending = report.pending.len(),
            reason = %report.pending[0],
            "some forgets are still pending at ElevateAI; run `callferry forget --pending` once the cause is fixed"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot finish pending forgets; `callferry forget --pending` tries again")
        }
    }
}

/// Debug builds only: `CALLFERRY_FAULT_FORGET=<step>` aborts the process right after that step
/// (1 tombstones, 2 files, 3 index, 4 remote delete, 5 tombstones finished), as a `kill -9`
/// would, for the crash tests.
fn fault_point(step: u32) {
    #[cfg(debug_assertions)]
    if std::env::var("CALLFERRY_FAULT_FORGET").ok().as_deref() == Some(&step.to_string()) {
        std::process::abort();
    }
    let _ = step;
}

/// The jobs a selector names, with what it named that matched nothing.
async fn select(
    cfg: &Config,
    queue: &Queue,
    sel: &Selector,
    report: &mut Report,
) -> Result<Vec<i64>, QueueError> {
    Ok(match sel {
        Selector::Pending => Vec::new(),
        Selector::Ids(ids) => {
            let found: Vec<i64> = queue.jobs_by_ids(ids).await?.iter().map(|j| j.id).collect();
            report.unknown_ids = ids.iter().filter(|i| !found.contains(i)).copied().collect();
            found
        }
        Selector::ExternalIds(ext) => {
            let mut jobs = queue.jobs_by_external_ids(ext).await?;
            // Not declared yet: their call ids are worked out as the declare will.
            let wanted: HashSet<&str> = ext.iter().map(String::as_str).collect();
            for job in queue.undeclared_jobs().await? {
                let (root, path) = (job.fs_root(), job.fs_path());
                let sidecar = crate::calls::sidecar::read(&root, &path).ok().flatten();
                let src = cfg.source_of_root(&root);
                let mut external_id = crate::calls::identify_with(
                    &src.naming,
                    &src.declare.timezone,
                    &root,
                    &path,
                    sidecar.as_ref(),
                )
                .external_id;
                // What the recorder's hook said (`enqueue --now --external-id`) wins, as in the
                // declare.
                if let Some(hook) = queue.hook_of(job.id).await?
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&hook)
                    && let Some(id) = v.get("external_id").and_then(|i| i.as_str())
                {
                    external_id = id.to_string();
                }
                if wanted.contains(external_id.as_str()) {
                    let mut job = job;
                    job.external_id = Some(external_id);
                    jobs.push(job);
                }
            }
            report.unmatched = ext
                .iter()
                .filter(|e| !jobs.iter().any(|j| j.external_id.as_ref() == Some(*e)))
                .cloned()
                .collect();
            let mut ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        }
        Selector::OlderThan(age) => {
            let cutoff_ns = (now_ms() - crate::clock::ms(*age)).saturating_mul(1_000_000);
            let mut ids = Vec::new();
            let mut after = 0;
            loop {
                let batch = queue.jobs_recorded_before(cutoff_ns, after, 1000).await?;
                let Some(last) = batch.last() else { break };
                after = last.id;
                ids.extend(batch.iter().map(|j| j.id));
            }
            ids
        }
    })
}

/// Forgets the calls `sel` names, then finishes every forget pending. `api`: the client to delete
/// with (None: no token; remote deletes stay pending). `daemon_running`: a job being declared is
/// then waited for (up to `declare_wait`) instead of forgotten mid-declare.
pub async fn forget(
    cfg: &Config,
    queue: &Queue,
    apis: &Apis,
    sel: &Selector,
    daemon_running: bool,
    declare_wait: Duration,
) -> Result<Report, QueueError> {
    let mut report = Report::default();
    queue.secure_delete().await?;
    let ids = select(cfg, queue, sel, &mut report).await?;
    let files = |job: &Job, later: bool| result_files(cfg, job, later);
    let mut waiting: Vec<i64> = Vec::new();
    for id in ids {
        match queue
            .forget_job(id, files, !daemon_running, now_ms())
            .await?
        {
            Forgot::Tombstone(_) => report.forgotten += 1,
            Forgot::MidDeclare(_) => {
                report.forgotten += 1;
                report.maybe_orphaned.push(id);
            }
            Forgot::Declaring => waiting.push(id),
            Forgot::Gone => {}
        }
    }
    // A declare takes seconds at most (the stall guard): its id is then committed and the job
    // can be forgotten whole, interaction included.
    let start = std::time::Instant::now();
    while !waiting.is_empty() && start.elapsed() < declare_wait {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut still = Vec::new();
        for id in waiting {
            match queue.forget_job(id, files, false, now_ms()).await? {
                Forgot::Tombstone(_) | Forgot::MidDeclare(_) => report.forgotten += 1,
                Forgot::Declaring => still.push(id),
                Forgot::Gone => {}
            }
        }
        waiting = still;
    }
    report.in_flight = waiting;
    fault_point(1);
    finish_pending(cfg, queue, apis, false, &mut report).await?;
    Ok(report)
}

/// Finishes every pending forget: local results, remote deletes, tombstones, scrub.
/// `in_daemon`: run by the daemon on its own connection, which may vacuum; elsewhere the database
/// is vacuumed only while no daemon runs (its lock is held meanwhile, so none starts), and
/// otherwise left to the daemon's next start.
pub async fn finish_pending(
    cfg: &Config,
    queue: &Queue,
    apis: &Apis,
    in_daemon: bool,
    report: &mut Report,
) -> Result<(), QueueError> {
    queue.secure_delete().await?;
    let pending = queue.pending_forgets().await?;
    remove_local_results(cfg, queue, &pending, report).await?;
    delete_remote(cfg, queue, apis, &pending, report).await?;
    report.finished += queue.forget_finish(now_ms()).await?;
    fault_point(5);
    if queue.scrub_pending().await? {
        let lock = match in_daemon || queue.cluster().is_some() {
            // The shared queue has no lock file (and its scrub stops no daemon).
            true => None,
            false => crate::queue::DaemonLock::acquire(queue.path()).ok(),
        };
        let vacuum = in_daemon || lock.is_some();
        queue.scrub(vacuum, Duration::from_secs(60)).await?;
        report.vacuumed = vacuum;
    }
    Ok(())
}

/// The local step of the tombstones that still need it: their result files and index lines go,
/// then the step is recorded. A failure is reported and the step is tried again next time.
async fn remove_local_results(
    cfg: &Config,
    queue: &Queue,
    pending: &[Tombstone],
    report: &mut Report,
) -> Result<(), QueueError> {
    let local: Vec<_> = pending.iter().filter(|t| !t.local_done).collect();
    if local.is_empty() {
        return Ok(());
    }
    let dir = cfg.results.output_dir.clone();
    let ids: HashSet<String> = local
        .iter()
        .filter_map(|t| t.interaction_id.clone())
        .collect();
    let mut files: Vec<PathBuf> = local.iter().flat_map(|t| t.files.clone()).collect();
    let outcome = tokio::task::spawn_blocking(move || remove_local(&dir, &ids, &mut files))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match outcome {
        Ok((f, l)) => {
            report.files_removed += f;
            report.index_lines_removed += l;
            let ids: Vec<i64> = local.iter().map(|t| t.id).collect();
            queue.forget_local_done(&ids).await?;
        }
        Err(e) => report.pending.push(format!(
            "cannot remove results under {}: {e}",
            cfg.results.output_dir.display()
        )),
    }
    Ok(())
}

/// The remote step: each interaction deleted at ElevateAI (a 404 is done too), the outcome
/// recorded on its tombstone, and what failed reported.
async fn delete_remote(
    cfg: &Config,
    queue: &Queue,
    apis: &Apis,
    pending: &[Tombstone],
    report: &mut Report,
) -> Result<(), QueueError> {
    // By account: one rejected token is rejected for every call of its account, so it is not
    // asked again for each; other accounts go on.
    let mut auth_failed: std::collections::HashMap<String, String> = Default::default();
    for t in pending.iter().filter(|t| !t.remote_done) {
        let Some(iid) = &t.interaction_id else {
            continue;
        };
        let api = apis.for_source(cfg, t.source.as_deref());
        let account = t
            .source
            .as_deref()
            .and_then(|s| cfg.source_named(s))
            .map(|s| cfg.account_of(s).to_string())
            .unwrap_or_default();
        let why = match (api, auth_failed.get(&account)) {
            (None, _) => Some("no API token configured".to_string()),
            (Some(_), Some(e)) => Some(e.clone()),
            (Some(api), None) => match api.delete_interaction(iid).await {
                Ok(true) => {
                    report.remote_deleted += 1;
                    None
                }
                Ok(false) => {
                    report.remote_gone += 1;
                    None
                }
                Err(e) => {
                    let msg = format!("deleting interaction {iid} at ElevateAI: {e}");
                    if e.class() == ErrorClass::Auth {
                        auth_failed.insert(account.clone(), msg.clone());
                    }
                    Some(msg)
                }
            },
        };
        queue.forget_remote(t.id, why.as_deref()).await?;
        fault_point(4);
        if let Some(why) = why {
            report.pending.push(why);
        }
    }
    Ok(())
}

/// Removes result files and the index's lines for these interaction ids. Returns how many files
/// and lines went. Files first: a crash before the index is rewritten finds the lines (and so
/// the files) again next time.
fn remove_local(
    dir: &Path,
    ids: &HashSet<String>,
    files: &mut Vec<PathBuf>,
) -> std::io::Result<(usize, usize)> {
    use crate::calls::index;
    for e in index::lines_for(dir, ids)? {
        files.extend(e.results.iter().map(PathBuf::from));
    }
    // Only ever under the output folder, whatever a line of the index says.
    files.retain(|f| f.starts_with(dir));
    files.sort();
    files.dedup();
    let mut removed = 0;
    for f in files.iter() {
        match std::fs::remove_file(f) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", f.display()),
                ));
            }
        }
    }
    fault_point(2);
    let lines = index::remove(dir, ids)?;
    fault_point(3);
    Ok((removed, lines))
}
