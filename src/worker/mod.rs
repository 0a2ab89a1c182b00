//! Owns a worker's loop: claim a due job, declare it (once), upload it, record the outcome, and
//! carry out the after-upload action. Maps every API failure's class onto a queue transition.
//!
//! Ordering is the whole point here: the interaction id is committed before the upload starts, the
//! uploaded state is committed before the file is moved or deleted, and nothing is held in a
//! transaction while the network is in use.

mod check;
mod failure;
#[cfg(test)]
mod tests;
mod waits;

pub use waits::missing_grace;

use check::{Checked, NOT_THERE, SidecarRead, left_its_path, open_queued, sidecar_of};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::api::{ApiError, DeclareRequest};
use crate::calls::sidecar::{self, Sidecar};
use crate::calls::{self, Call};
use crate::clock::{ms, now_ms};
use crate::config::AfterUploadWhen;
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
    /// the runtime's thread, so a folder on a hung mount holds up only its own jobs.
    pub roots: Arc<crate::watch::Roots>,
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
        (self.wake.idle(
            &self.queue,
            || self.paused_roots(),
            &self.metrics,
            &self.stop_claiming,
        ))
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
                Err(e) => {
                    if matches!(
                        e,
                        QueueError::LostClaim { .. } | QueueError::NotInState { .. }
                    ) {
                        // The database answered, so it takes writes again, whatever became of
                        // this job (on PostgreSQL: taken over while the database was away). The
                        // pause this wait set must end here: no other write may come to lift it
                        // while every worker waits behind it.
                        self.storage_recovered().await;
                    }
                    return Err(e);
                }
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
            // hand-off per file fewer than reading it on the blocking pool afterwards.
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
    /// reached, the sidecar waited for, a failed declare: each recorded).
    async fn declare(&self, job: &Job, sidecar: Option<SidecarRead>) -> Option<String> {
        if job.orphans >= self.cfg.upload.max_declares {
            // Declares lost in a crash are counted at recovery; the cap holds across restarts.
            let msg = self.too_many_declares(job, job.orphans, "the last one was interrupted");
            error!(error = %msg, "job failed");
            self.record(self.commit(|| self.queue.fail(job, &msg, now_ms())).await);
            return None;
        }
        let hook = hook_of(job);
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
        let name = crate::api::wire_name(&path);
        match self
            .api_for(&job)
            .upload_file(&iid, file, &name, &path, job.size, Some(job.mtime_ns))
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

    fn api_ok(&self, job: &Job) {
        if let Some(p) = self.gate.success() {
            info!(was = %p.reason(), "API reachable and token accepted again; uploads resume");
        }
        self.account_ok(job);
    }
}

/// What [`Pipeline::prepare`] hands on: the queued version, opened; for a job to declare, its
/// sidecar as the lane read it; and the job's folder's lane, for the upload's own look.
struct Prepared {
    file: std::fs::File,
    sidecar: Option<SidecarRead>,
    lane: Arc<crate::watch::RootFs>,
}

/// What the recorder's end-of-call hook said about the job's call (`crate::hook`), as its claim
/// read it. Unreadable data (a hand-edited row) is said, and the declare goes without it.
fn hook_of(job: &Job) -> Option<crate::hook::HookCall> {
    let text = job.hook.as_deref()?;
    serde_json::from_str(text)
        .inspect_err(
            |e| warn!(error = %e, "the recorder's hook data is unreadable; declared without it"),
        )
        .ok()
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
