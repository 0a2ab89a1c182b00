//! Owns a worker's loop: claim a due job, declare it (once), upload it, record the outcome, and
//! carry out the after-upload action. Maps every API failure's class onto a queue transition.
//!
//! Ordering is the whole point here: the interaction id is committed before the upload starts, the
//! uploaded state is committed before the file is moved or deleted, and nothing is held in a
//! transaction while the network is in use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::api::{ApiError, DeclareRequest};
use crate::calls::sidecar::{self, Sidecar};
use crate::calls::{self, Call};
use crate::clock::{ms, now_ms};
use crate::config::{AfterUploadWhen, Config};
use crate::policy::{self, Failure, Hold, Limits, Verdict};
use crate::queue::{Job, QueueError, State};
use crate::shared::Shared;

/// The upload workers' state: what they share with the results follower, and their own.
pub struct Pipeline {
    pub shared: Arc<Shared>,
    /// Fired on SIGTERM: stop claiming new jobs.
    pub stop_claiming: CancellationToken,
    /// Fired when the shutdown grace is over: abandon in-flight requests (jobs go back to waiting).
    pub abort: CancellationToken,
    /// Asks the watcher to look for a job's recording: its file left its path (moved inside the
    /// watched folders?).
    pub search: Arc<crate::watcher::Search>,
    /// Jobs whose file is not at their path, and since when (unix ms). In memory only: a restart
    /// starts the wait again, and its startup scan is a search of its own.
    pub missing: std::sync::Mutex<std::collections::HashMap<i64, i64>>,
    /// Every watched folder's lanes: the pre-upload open runs on the job's root's lane, never on
    /// the runtime's thread, so a folder on a hung mount holds up only its own jobs (issue 17.1).
    pub roots: Arc<crate::watch::Roots>,
}

/// How long a job waits for its file to turn up again (moved inside the watched folders, found by
/// the watcher, which points the job at the new path) before it fails: long enough for a rescan
/// and the new path's quiet period.
pub fn missing_grace(cfg: &Config) -> Duration {
    (cfg.watch.settle * 4).max(Duration::from_secs(15))
}

/// Whether the recording a job queued has left its path: nothing there, or another file (a new
/// inode of another size or age: a recorder that reused the name after the call was moved away).
fn left_its_path(meta: &std::fs::Metadata, job: &Job) -> bool {
    use std::os::unix::fs::MetadataExt;
    job.ino != 0 && (meta.dev(), meta.ino()) != (job.dev, job.ino) && !job.is_version(meta)
}

/// The workers reach the shared parts as their own (`self.cfg`, `self.queue`...): they are theirs
/// as much as the follower's.
impl std::ops::Deref for Pipeline {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Pipeline {
    pub async fn run_worker(self: Arc<Self>, n: usize) {
        debug!(worker = n, "worker started");
        // Set when this worker's claim hit a full disk: it then tries again by itself instead of
        // waiting at the gate, because that retry is what finds out that space is back.
        let mut probe = false;
        loop {
            // Held for this turn's requests: while the API is down, the one probe is one job.
            let admission = if probe {
                None
            } else {
                self.gate.admit(&self.stop_claiming).await
            };
            if self.stop_claiming.is_cancelled() || (!probe && admission.is_none()) {
                break;
            }
            probe = false;
            // Jobs of an account whose token was rejected stay where they are; the others go on.
            let claimed = self
                .queue
                .claim_except(now_ms(), &self.paused_roots())
                .await;
            if !matches!(claimed, Ok(Some(_))) {
                // Nothing to send: an outage's probe passes to a worker that has a job.
                drop(admission);
            }
            match claimed {
                Ok(Some(job)) => {
                    self.storage_recovered().await;
                    let id = job.id;
                    let span = job_span(&job, &self.source_of(&job).name);
                    tokio::select! {
                        _ = self.process(job).instrument(span.clone()) => {}
                        _ = self.abort.cancelled() => {
                            self.put_back(id).instrument(span).await;
                        }
                    }
                }
                Ok(None) => {
                    self.storage_recovered().await;
                    self.idle().await;
                }
                Err(e) => {
                    // Tried again by this worker itself, not after the gate: that retry is what
                    // finds out that the database takes writes again.
                    probe = e.is_transient();
                    self.storage_error(&e).await;
                }
            }
        }
        debug!(worker = n, "worker stopped");
    }

    /// Waits until there may be work (see [`Wake::idle`](crate::wake::Wake::idle)).
    async fn idle(&self) {
        let paused = self.paused_roots();
        (self
            .wake
            .idle(&self.queue, &paused, &self.metrics, &self.stop_claiming))
        .await
    }

    /// A write the queue refused. Any error that may pass (full, busy, an I/O error) pauses every
    /// worker until a write goes through again: taking more work would only pile up outcomes that
    /// cannot be recorded, each a declare the service has made and we might forget.
    async fn storage_error(&self, e: &QueueError) {
        if let QueueError::LostClaim { .. } = e {
            // PostgreSQL: another daemon has the job now and finishes it; nothing to wait for.
            warn!(error = %e, "job dropped here");
            return;
        }
        if !e.is_transient() {
            error!(error = %e, "queue database error");
        } else if self.gate.pause_storage(e.to_string()) {
            if e.is_disk_full() {
                error!(error = %e, "queue database cannot be written: disk full? Uploads pause; every job is kept and work resumes by itself when space is freed");
            } else {
                error!(error = %e, "queue database cannot be written: uploads pause; every job is kept and work resumes by itself once a write goes through");
            }
        }
        tokio::select! {
            _ = self.stop_claiming.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }

    async fn storage_recovered(&self) {
        if self.gate.storage_ok() {
            info!("queue database writable again; uploads resume");
        }
    }

    /// Writes one outcome to the queue, waiting out any error that may pass (a full disk, "database
    /// is locked", an I/O error, a failed flush): the outcome (an interaction id, an upload's
    /// status, a retry) stays in memory and is written again every second until the database takes
    /// it, while every worker pauses. So a running daemon never forgets an interaction id nor
    /// leaves a job in flight until the next start. Only a write that lost its race is returned.
    /// At shutdown the grace's abort ends the wait.
    async fn commit<T, F, Fut>(&self, mut write: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, QueueError>>,
    {
        loop {
            match write().await {
                Ok(v) => {
                    self.storage_recovered().await;
                    return Ok(v);
                }
                Err(e) if e.is_transient() => {
                    if self.gate.pause_storage(e.to_string()) {
                        error!(error = %e, "queue database cannot be written: uploads pause; this job's outcome is kept in memory and written again every second until the database takes it");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After an abort mid-request: the job goes back to waiting, without counting an attempt.
    async fn put_back(&self, id: i64) {
        match self.queue.get(id).await {
            Ok(Some(job)) if matches!(job.state, State::Declaring | State::Uploading) => {
                if let Err(e) = self
                    .queue
                    .reschedule(&job, None, now_ms(), false, now_ms())
                    .await
                {
                    warn!(error = %e, "could not put the job back; it will be recovered at the next start");
                } else {
                    info!(
                        "shutdown grace over: in-flight upload abandoned, job kept for the next start"
                    );
                }
            }
            _ => {}
        }
    }

    /// One job's turn, in the order the invariants ask: the queued version checked and opened,
    /// the interaction declared and its id committed (once per job), the audio uploaded, the
    /// outcome recorded. Each step records its own way out on the job and ends the turn there.
    async fn process(&self, mut job: Job) {
        let Some(Prepared {
            file,
            sidecar,
            lane,
        }) = self.prepare(&job).await
        else {
            return;
        };
        if job.state == State::Declaring {
            let Some(iid) = self.declare(&job, sidecar).await else {
                return;
            };
            job.interaction_id = Some(iid);
            job.state = State::Uploading;
        }
        self.upload(job, file, &lane).await;
    }

    /// The version we queued must still be the one on disk, reached without links; the
    /// descriptor opened here is the one uploaded. None when the turn ends here (the folder hangs,
    /// the file left or changed, or cannot be read: each recorded on the job).
    async fn prepare(&self, job: &Job) -> Option<Prepared> {
        let lane = self.roots.get(&job.fs_root());
        let checked = if lane.hung() {
            Err(crate::watch::Hung)
        } else {
            // A job to declare has its sidecar read in the same trip to the lane: one thread
            // hand-off per file fewer than reading it on the blocking pool afterwards (issue 16).
            let j = job.clone();
            lane.files
                .run(move |_| {
                    let c = open_queued(&j);
                    let sc = (j.state == State::Declaring && matches!(c, Checked::Ready(_)))
                        .then(|| sidecar::read(&j.fs_root(), &j.fs_path()));
                    (c, sc)
                })
                .await
        };
        let (checked, sidecar) = match checked {
            Ok(c) => c,
            Err(hung) => {
                self.root_hung(job, hung).await;
                return None;
            }
        };
        let file = match checked {
            Checked::Ready(f) => f,
            Checked::Gone(why) => {
                if why != NOT_THERE {
                    warn!(reason = %why, "the queued recording is not at its path any more");
                }
                self.file_missing(job, &job.fs_path()).await;
                return None;
            }
            Checked::Changed(msg) => {
                warn!("{msg}");
                self.record(self.commit(|| self.queue.fail(job, &msg, now_ms())).await);
                return None;
            }
            Checked::Unreadable(e) => {
                let err = ApiError::Local(format!("cannot read {}: {e}", job.fs_path().display()));
                self.on_error(job, err).await;
                return None;
            }
        };
        if self
            .missing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id)
            .is_some()
        {
            self.search.done(job);
        }
        Some(Prepared {
            file,
            sidecar,
            lane,
        })
    }

    /// Declares the job's interaction and commits its id before the upload starts: a crash from
    /// there on never declares it again. The id, or None when the turn ends here (the declare cap
    /// reached, the hook data or the sidecar waited for, a failed declare: each recorded).
    async fn declare(&self, job: &Job, sidecar: Option<SidecarRead>) -> Option<String> {
        if job.orphans >= self.cfg.upload.max_declares {
            // Declares lost in a crash are counted at recovery; the cap holds across restarts.
            let msg = self.too_many_declares(job, job.orphans, "the last one was interrupted");
            error!(error = %msg, "job failed");
            self.record(self.commit(|| self.queue.fail(job, &msg, now_ms())).await);
            return None;
        }
        let hook = self.hook_of(job).await?;
        let sidecar = sidecar_of(sidecar);
        // A recorder's end-of-call request carries the call: no sidecar is waited for.
        if hook.is_none() && matches!(sidecar, Ok(None)) && self.wait_for_sidecar(job).await {
            return None;
        }
        let mut req = self.declare_request(job, &job.fs_path(), sidecar.ok().flatten().as_ref());
        if let Some(h) = &hook {
            crate::hook::apply_to_declare(h, &mut req, self.cfg.declare.send_metadata);
        }
        let iid = match self.api_for(job).declare(&req).await {
            Ok(iid) => iid,
            Err(e) => {
                self.on_error(job, e).await;
                return None;
            }
        };
        self.api_ok(job);
        let ext = req.external_identifier.as_deref();
        let source = Some(self.source_of(job).name.as_str());
        // Committed before the upload starts: a crash from here on never declares again.
        if let Err(e) = self
            .commit(|| {
                self.queue
                    .mark_declared_from(job.id, &iid, ext, source, now_ms())
            })
            .await
        {
            if let QueueError::LostClaim { .. } = e {
                // Another daemon took the job over meanwhile and declares it itself: this
                // interaction stays an orphan, the floor a late answer costs.
                warn!(interaction_id = %iid, error = %e, "declared, but the job is another daemon's now; dropped here");
                return None;
            }
            // Only a lost race gets here (the row was changed under us, by hand): there is no
            // job left to record the id on. Say so loudly, with the id.
            error!(interaction_id = %iid, error = %e, "declared but could not record the interaction id");
            return None;
        }
        tracing::Span::current().record("interaction_id", iid.as_str());
        debug!(interaction_id = %iid, "declared");
        Some(iid)
    }

    /// Uploads the opened version on the job's interaction, then records the outcome.
    async fn upload(&self, job: Job, file: std::fs::File, lane: &crate::watch::RootFs) {
        let Some(iid) = job.interaction_id.clone() else {
            // Cannot happen with the queue's CHECKs and transitions; fail loudly rather than guess.
            self.record(
                self.queue
                    .fail(
                        &job,
                        "internal: uploading job without an interaction id",
                        now_ms(),
                    )
                    .await,
            );
            return;
        };
        let path = job.fs_path();
        let started = std::time::Instant::now();
        let name = wire_name(&path);
        match self
            .api_for(&job)
            .upload_file(&iid, file, &name, &path, job.size)
            .await
        {
            Ok(outcome) => {
                self.api_ok(&job);
                self.uploaded(job, &iid, outcome.status(), started).await;
            }
            Err(ApiError::Local(e)) => self.unreadable_at_upload(&job, e, lane).await,
            Err(e) => self.on_error(&job, e).await,
        }
    }

    /// Records an upload the service took (201, or 409: an earlier attempt got through), then
    /// wakes the results follower or carries out the after-upload action.
    async fn uploaded(&self, mut job: Job, iid: &str, status: u16, started: std::time::Instant) {
        self.metrics.uploaded(
            &self.source_of(&job).name,
            status,
            job.size,
            started.elapsed(),
        );
        if status == 409 {
            info!(interaction_id = %iid, "upload answered 409: the service already has this audio (an earlier attempt got through); counted as uploaded");
        } else {
            let secs = started.elapsed().as_secs_f64();
            info!(interaction_id = %iid, bytes = job.size, seconds = secs, "uploaded");
        }
        let now = now_ms();
        let follow_at = self
            .cfg
            .results
            .enabled
            .then(|| now + ms(self.cfg.results.poll_interval));
        match self
            .commit(|| self.queue.mark_uploaded(job.id, status, follow_at, now))
            .await
        {
            Ok(()) => {
                job.state = State::Uploaded;
                if follow_at.is_some() {
                    self.wake.follower.notify_one();
                }
                if self.cfg.after_upload.when == AfterUploadWhen::Uploaded {
                    self.after_upload(&job).await;
                }
            }
            Err(e) => self.storage_error(&e).await,
        }
    }

    /// The upload could not read the file. If it left its path between the check and the
    /// upload's open, it is waited for as [`Self::prepare`] does, instead of counting an attempt.
    async fn unreadable_at_upload(&self, job: &Job, e: String, lane: &crate::watch::RootFs) {
        let path = job.fs_path();
        let (p, j) = (path.clone(), job.clone());
        let left = lane
            .files
            .run(move |_| {
                std::fs::metadata(&p).map_or_else(
                    |e| e.kind() == std::io::ErrorKind::NotFound,
                    |m| left_its_path(&m, &j),
                )
            })
            .await;
        match left {
            Ok(true) => self.file_missing(job, &path).await,
            Ok(false) => self.on_error(job, ApiError::Local(e)).await,
            Err(hung) => self.root_hung(job, hung).await,
        }
    }

    /// The job's watched folder does not answer (a hung mount): the job waits, without an
    /// attempt counted, and is tried again after a while. The folder's state is said once, by
    /// `watch::health_task`; the job's `last_error` says why it waits.
    async fn root_hung(&self, job: &Job, hung: crate::watch::Hung) {
        let msg = format!("waiting: {hung}");
        debug!("{msg}");
        let now = now_ms();
        let next = now + ms(crate::watch::DEADLINE * 2);
        // The reason once, not an event every few seconds for as long as the mount hangs.
        let why = (job.last_error.as_deref() != Some(msg.as_str())).then_some(msg.as_str());
        self.record(
            self.commit(|| self.queue.reschedule(job, why, next, false, now))
                .await,
        );
    }

    /// The job's file is not at its path. It may have been moved inside the watched folders: the
    /// watcher is asked to look, and when it finds the recording (by device, inode, size and
    /// mtime) it points the job at the new path. Meanwhile the job waits, without an attempt
    /// counted; after [`missing_grace`] it fails with the reason. Before, an undeclared job was
    /// dropped at once (its file then waited for the next periodic rescan) and a declared one
    /// failed at once, even when the file had only been filed into another folder.
    async fn file_missing(&self, job: &Job, path: &Path) {
        let now = now_ms();
        let grace = missing_grace(&self.cfg);
        let since = *self
            .missing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(job.id)
            .or_insert(now);
        if now - since >= ms(grace) {
            self.missing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&job.id);
            self.search.done(job);
            let waited =
                humantime::format_duration(Duration::from_secs(((now - since) / 1000) as u64));
            let msg = match &job.interaction_id {
                None => format!(
                    "file vanished: not at {} and not found elsewhere in the watched folders for {waited} \
                     (deleted, or moved out of them); nothing was declared. If it comes back: `callferry retry {}`",
                    path.display(),
                    job.id
                ),
                Some(iid) => format!(
                    "file vanished after its interaction {iid} was declared: not at {} and not found \
                     elsewhere in the watched folders for {waited} (deleted, or moved out of them); \
                     the interaction has no audio. If the file comes back: `callferry retry {}`",
                    path.display(),
                    job.id
                ),
            };
            warn!("{msg}");
            self.record(self.commit(|| self.queue.fail(job, &msg, now)).await);
            return;
        }
        if since == now {
            info!(
                "file is not at its path any more (moved?); looking for it in the watched folders"
            );
        }
        self.search.want(job);
        let msg = format!(
            "file not at {} (moved?); looking for it in the watched folders",
            path.display()
        );
        let next = now + ms(self.cfg.watch.settle).max(1000);
        self.record(
            self.commit(|| self.queue.reschedule(job, Some(&msg), next, false, now))
                .await,
        );
    }

    /// The call recorded at `path` (the job's file, wherever it is now).
    fn call_of(&self, job: &Job, path: &Path, sidecar: Option<&Sidecar>) -> Call {
        let source = self.source_of(job);
        calls::identify_with(
            &source.naming,
            &source.declare.timezone,
            &job.fs_root(),
            path,
            sidecar,
        )
    }

    /// What the recorder's end-of-call hook said about the job's call (`crate::hook`); None (the
    /// job was put back) when it cannot be read now: declaring without it would lose it.
    async fn hook_of(&self, job: &Job) -> Option<Option<crate::hook::HookCall>> {
        match self.queue.hook_of(job.id).await {
            Ok(h) => Some(h.and_then(|text| {
                serde_json::from_str(&text)
                    .inspect_err(|e| warn!(error = %e, "the recorder's hook data is unreadable; declared without it"))
                    .ok()
            })),
            Err(e) => {
                let now = now_ms();
                warn!(error = %e, "cannot read the recorder's hook data; the declare waits");
                self.record(
                    self.commit(|| self.queue.reschedule(job, None, now + 1000, false, now))
                        .await,
                );
                None
            }
        }
    }

    /// With `[watch] sidecar_wait`, a recording whose sidecar has not arrived waits for it, up to
    /// that long after it was queued, without an attempt counted. True if it now waits.
    async fn wait_for_sidecar(&self, job: &Job) -> bool {
        let wait = self.cfg.watch.sidecar_wait;
        let until = job.created_at + ms(wait);
        let now = now_ms();
        if wait.is_zero() || now >= until {
            return false;
        }
        debug!(
            until_ms = until,
            "waiting for its sidecar (watch.sidecar_wait)"
        );
        self.record(
            self.commit(|| self.queue.reschedule(job, None, until, false, now))
                .await,
        );
        true
    }

    fn declare_request(&self, job: &Job, path: &Path, sidecar: Option<&Sidecar>) -> DeclareRequest {
        let d = &self.source_of(job).declare;
        let call = self.call_of(job, path, sidecar);
        DeclareRequest {
            kind: "audio".into(),
            language_tag: d.language_tag.clone(),
            vertical: d.vertical.clone(),
            audio_transcription_mode: d.transcription_mode.clone(),
            model: d.model.clone(),
            include_ai_results: d.include_ai_results,
            original_filename: path.file_name().map(|n| n.to_string_lossy().into_owned()),
            external_identifier: Some(call.external_id),
            metadata: (d.send_metadata && !call.metadata.is_empty()).then_some(call.metadata),
        }
    }

    /// A declare refused over its metadata is the account's licence, not the recording: says which
    /// key to change. Nothing was created, so the job's `retry` declares it once more.
    fn explain_refusal(&self, job: &Job, msg: String) -> String {
        if job.state == State::Declaring
            && self.source_of(job).declare.send_metadata
            && msg.to_ascii_lowercase().contains("metadata")
        {
            format!(
                "{msg}; declares carry metadata because declare.send_metadata = true, which needs \
                 the Explore feature on the ElevateAI account: set send_metadata = false (or have \
                 Explore enabled), then `callferry retry {}`",
                job.id
            )
        } else {
            msg
        }
    }

    /// Reports a 5xx to the circuit breaker; true if it is open.
    fn api_failing(&self, msg: &str, unit: f64) -> bool {
        self.gate.server_error(msg.to_string(), unit).report(msg)
    }

    /// Why a job fails at `[upload] max_declares`: an operator's reason, with what to look for at
    /// the service.
    fn too_many_declares(&self, job: &Job, n: u32, last: &str) -> String {
        format!(
            "declared {n} time(s) without a usable answer (upload.max_declares = {}; last: {last}); \
             each may have left an interaction without audio at ElevateAI, with externalIdentifier \
             {}. `callferry retry {}` declares it again",
            self.cfg.upload.max_declares,
            job.external_id
                .clone()
                .unwrap_or_else(|| self.call_of(job, &job.fs_path(), None).external_id),
            job.id
        )
    }

    fn api_ok(&self, job: &Job) {
        if let Some(p) = self.gate.success() {
            info!(was = %p.reason(), "API reachable and token accepted again; uploads resume");
        }
        self.account_ok(job);
    }

    /// Carries out the policy's verdict on a failure: the gate for every worker, the queue for
    /// the job.
    async fn on_error(&self, job: &Job, err: ApiError) {
        let now = now_ms();
        let unit: f64 = rand::random();
        let msg = err.to_string();
        self.metrics
            .attempt_failed(&self.source_of(job).name, err.outcome());
        let failure = Failure::of(&err);
        // Out of descriptors, nothing was sent that could have created an interaction (a socket
        // or file that could not be opened).
        if failure != Failure::Descriptors
            && job.state == State::Declaring
            && declare_may_have_created(&err)
        {
            match self
                .commit(|| self.queue.count_orphan(job.id, &msg, now))
                .await
            {
                Ok(n) if n >= self.cfg.upload.max_declares => {
                    let full = self.too_many_declares(job, n, &msg);
                    error!(error = %full, "job failed");
                    self.record(self.commit(|| self.queue.fail(job, &full, now)).await);
                    return;
                }
                Ok(_) => {}
                Err(e) => error!(error = %e, "could not count a declare whose answer was lost"),
            }
        }
        let attempts = job.attempts + 1;
        let age = Duration::from_millis((now - job.created_at).max(0) as u64);
        let breaker_open = failure == Failure::ServerError && self.api_failing(&msg, unit);
        let limits = Limits::upload(&self.cfg);
        let (at, counted) = match policy::decide(
            failure,
            attempts,
            age,
            breaker_open,
            &limits,
            unit,
        ) {
            Verdict::Hold(hold) => {
                self.hold_all(job, hold, &msg, unit);
                (now, false)
            }
            Verdict::SlowDown(d) => {
                warn!(error = %msg, wait = ?d, "API asks us to slow down; all workers hold back");
                self.gate.hold(d);
                (now + ms(d), false)
            }
            Verdict::Retry(d) => {
                warn!(error = %msg, attempt = attempts, retry_in = ?d, "will retry");
                (now + ms(d), true)
            }
            Verdict::Fail(None) => {
                let msg = self.explain_refusal(job, msg);
                warn!(error = %msg, "the API refused this file; job failed (`callferry retry {}` after fixing it)", job.id);
                self.record(self.commit(|| self.queue.fail(job, &msg, now)).await);
                return;
            }
            Verdict::Fail(Some(why)) => {
                let full = format!("{msg}; {why}");
                error!(error = %full, "job failed");
                self.record(self.commit(|| self.queue.fail(job, &full, now)).await);
                return;
            }
        };
        self.record(
            self.commit(|| self.queue.reschedule(job, Some(&msg), at, counted, now))
                .await,
        );
    }

    /// Holds every worker back (a 5xx storm was already reported to the gate by `api_failing`).
    fn hold_all(&self, job: &Job, hold: Hold, msg: &str, unit: f64) {
        match hold {
            Hold::Descriptors => {
                if let Some(d) = self.gate.out_of_descriptors(msg.to_string(), unit) {
                    warn!(error = %msg, retry_in = ?d, "out of file descriptors: all workers hold back (attempts are not counted). Raise LimitNOFILE (systemd) or ulimit -n, or lower upload.workers");
                }
            }
            Hold::Auth => {
                let account = self.account_of(job);
                if self.gate.pause_account(account, msg.to_string()) {
                    let key = match self.source_of(job) {
                        s if s.token.is_some() => format!("source {:?}'s token_file", s.name),
                        _ => "api.token_file".to_string(),
                    };
                    error!(error = %msg, account, "the API rejected the token: every upload on this account is paused (other accounts' sources go on) and every job is kept. Fix {key} (it is re-read) — work resumes by itself, no restart needed");
                }
            }
            Hold::Outage => {
                if let Some(d) = self.gate.outage(msg.to_string(), unit) {
                    warn!(error = %msg, retry_in = ?d, "API unreachable; all workers hold back (attempts are not counted during an outage)");
                }
            }
            Hold::Failing => {}
        }
    }
}

/// The file's name as the service is told it (form field name and filename): bytes that are not
/// UTF-8 as U+FFFD, and the characters that would break out of a quoted multipart header value
/// (quotes, backslashes, control characters) as `_`.
pub fn wire_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// What [`Pipeline::prepare`] hands on: the queued version, opened; for a job to declare, its
/// sidecar as the lane read it; and the job's folder's lane, for the upload's own look.
struct Prepared {
    file: std::fs::File,
    sidecar: Option<SidecarRead>,
    lane: Arc<crate::watch::RootFs>,
}

/// A sidecar as [`sidecar::read`] found it.
type SidecarRead = Result<Option<Sidecar>, sidecar::SidecarError>;

const NOT_THERE: &str = "it is not there";

/// What the pre-upload check found at a job's path.
enum Checked {
    /// The queued version, opened (a regular file, reached without links).
    Ready(std::fs::File),
    /// Nothing usable is there any more (why): deleted, moved away, or replaced by a link, a FIFO,
    /// a folder or another file.
    Gone(String),
    /// The file there is the one queued, but it changed since (the reason, for `last_error`).
    Changed(String),
    /// It could not be opened now (EACCES, EIO...): retried.
    Unreadable(std::io::Error),
}

/// Opens a job's file as [`crate::safefs::open_beneath`] does and checks that the descriptor is
/// the version that was judged complete: same size and mtime, and the same inode on the same
/// device (rows queued before those were recorded have 0 there and skip that part).
/// The recording's sidecar as the lane read it (with the recording, for a job to declare). A
/// malformed one is a warning, and the recording goes without it (`Err(())`: do not wait for
/// another).
fn sidecar_of(read: Option<SidecarRead>) -> Result<Option<Sidecar>, ()> {
    match read {
        Some(Ok(found)) => Ok(found),
        Some(Err(why)) => {
            warn!(warning = %why, "the recording goes without its sidecar");
            Err(())
        }
        None => Ok(None),
    }
}

fn open_queued(job: &Job) -> Checked {
    use std::os::unix::fs::MetadataExt;
    let file = match crate::safefs::open_beneath(&job.fs_root(), &job.fs_path()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Checked::Gone(NOT_THERE.into());
        }
        Err(e) => {
            return match crate::safefs::not_regular_reason(&e) {
                Some(why) => Checked::Gone(format!("its path is no longer a regular file: {why}")),
                None => Checked::Unreadable(e),
            };
        }
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Checked::Unreadable(e),
    };
    if job.ino != 0 && (meta.ino() != job.ino || meta.dev() != job.dev) {
        return Checked::Gone(
            "another file was put in its place (a different inode); the queued recording is not there"
                .into(),
        );
    }
    if !job.is_version(&meta) {
        return Checked::Changed(format!(
            "file changed after it was queued (size {} -> {}); this version is gone, \
             the new version is queued on its own",
            job.size,
            meta.len()
        ));
    }
    Checked::Ready(file)
}

/// The span of one job's turn. Its `interaction_id` is empty until known: set to "" at the claim
/// of a new recording and recorded after the declare, the text log printed both
/// (`interaction_id="" ... interaction_id="…"`).
fn job_span(job: &Job, source: &str) -> tracing::Span {
    let span = info_span!("job", job_id = job.id, source, path = %job.display_path(),
        interaction_id = tracing::field::Empty,
        attempt = job.attempts + 1);
    if let Some(iid) = job.interaction_id.as_deref() {
        span.record("interaction_id", iid);
    }
    span
}

/// Whether a failed declare may have created its interaction: the request went out and the answer
/// was lost (a reset, a stall, a gateway's 500/502/504) or unusable (a 201 without a usable id, a
/// body that is not the expected JSON). Not a refusal (4xx, 429, 503) nor a connection that never
/// opened.
fn declare_may_have_created(err: &ApiError) -> bool {
    match err {
        ApiError::Transport(_) | ApiError::Stalled(_) | ApiError::Protocol(_) => true,
        ApiError::Status { status, .. } => matches!(status, 500 | 502 | 504),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispose::tests::job_for;

    #[test]
    fn the_wire_name_cannot_break_out_of_its_header() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"/r/O\"Bri\xe9n\r\n\\x.wav"));
        assert_eq!(wire_name(p), "O_Bri\u{FFFD}n___x.wav");
        assert_eq!(wire_name(Path::new("/r/José.wav")), "José.wav");
    }

    #[test]
    fn the_text_log_names_the_interaction_once() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // A new recording: no id at the claim, recorded after the declare.
            let mut j = job_for(&std::env::current_exe().unwrap(), "x");
            j.interaction_id = None;
            let span = job_span(&j, "default");
            span.record("interaction_id", "iid-new");
            span.in_scope(|| info!("uploaded"));
            // A recording declared earlier: the id from the start.
            j.interaction_id = Some("iid-old".into());
            job_span(&j, "default").in_scope(|| info!("uploaded"));
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for (l, iid) in lines.iter().zip(["iid-new", "iid-old"]) {
            assert_eq!(l.matches("interaction_id=").count(), 1, "{l}");
            assert!(l.contains(&format!("interaction_id=\"{iid}\"")), "{l}");
        }
    }

    #[test]
    fn running_out_of_descriptors_is_its_own_class() {
        let os = |n| std::io::Error::from_raw_os_error(n).to_string();
        let is_emfile = |e: &ApiError| Failure::of(e) == Failure::Descriptors;
        // As the API client reports a socket that could not be opened, and a recording.
        assert!(is_emfile(&ApiError::Unreachable(format!(
            "error sending request: client error (Connect): tcp open error: {}",
            os(libc::EMFILE)
        ))));
        assert!(is_emfile(&ApiError::Local(format!(
            "/rec/a.wav: {}",
            os(libc::ENFILE)
        ))));
        assert!(!is_emfile(&ApiError::Unreachable(format!(
            "tcp connect error: {}",
            os(libc::ECONNREFUSED)
        ))));
        assert!(!is_emfile(&ApiError::Local(format!(
            "/rec/a.wav: {}",
            os(libc::ENOENT)
        ))));
        // Nothing was sent: not a lost declare answer either.
        assert!(!declare_may_have_created(&ApiError::Unreachable(os(
            libc::EMFILE
        ))));
    }
}
