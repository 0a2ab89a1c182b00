//! Owns following uploaded interactions to `processed` and delivering their results: one scheduler
//! for all followed jobs (the database holds each job's next poll time; no task per job), a global
//! request-rate cap, atomic result files, and the `processed` / `failed` transitions.
//!
//! A job's results are written before its state says `processed`, and each written kind is recorded,
//! so a restart neither loses nor refetches them; a crash between a write and its record only means
//! the same file is written again.
//!
//! A result document goes from the socket to a temporary file beside its destination and is renamed
//! into place once it is whole, fsynced and known to be JSON, so its size (up to
//! `[results] max_bytes`) never reaches memory.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::api::ApiError;
use crate::clock::{ms, now_ms};
use crate::config::{AfterUploadWhen, ResultsFormat};
use crate::policy::{self, Failure, Hold, Limits, Verdict};
use crate::queue::Job;
use crate::ratelimit::RateLimiter;
use crate::shared::Shared;

/// Jobs looked at per round; bounds memory whatever the number of followed jobs.
const BATCH: u32 = 64;
/// Requests in flight at once (the rate cap is what really limits).
const CONCURRENCY: usize = 8;
/// An idle follower looks at the queue at least this often (jobs made due by another process).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Where one result kind of a recording goes: `<output_dir>/<path relative to its watched
/// folder>.<kind>.json` (`.txt` for the text transcript). For the first call recorded at a path;
/// see [`result_path_for`].
pub fn result_path(output_dir: &Path, job: &Job, kind: &str) -> PathBuf {
    result_path_for(output_dir, job, kind, false)
}

/// Where one result kind goes, for a recording that may not be the first call at its path.
/// `later_call`: an earlier job was recorded at the same path (recorders reuse names per line or
/// per day), so this one's results carry its interaction id (`<rel>.<interaction id>.<kind>.json`)
/// and never replace the first call's, which keeps the plain name it always had.
pub fn result_path_for(output_dir: &Path, job: &Job, kind: &str, later_call: bool) -> PathBuf {
    let (path, root) = (job.fs_path(), job.fs_root());
    let rel = path
        .strip_prefix(&root)
        .ok()
        .filter(|r| !r.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new(path.file_name().unwrap_or_default()));
    let mut name = rel.as_os_str().to_owned();
    if later_call {
        // Without an id (cannot happen for a followed job) the job id still keeps them apart.
        match &job.interaction_id {
            Some(iid) => name.push(format!(".{iid}")),
            None => name.push(format!(".job-{}", job.id)),
        }
    }
    if kind == "text" {
        name.push(".txt");
    } else {
        name.push(format!(".{kind}.json"));
    }
    output_dir.join(name)
}

fn endpoint(kind: &str, id: &str) -> String {
    match kind {
        "transcript" => format!("interactions/{id}/transcript"),
        "punctuated" => format!("interactions/{id}/transcripts/punctuated"),
        _ => format!("interactions/{id}/ai"),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, 0640, rename,
/// fsync of the folder. Readers see the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".callferry-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o640))?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The parts of a punctuated transcript the text rendering uses. Read from the file with only
/// these fields kept, so a large transcript costs its phrases' size, not a whole JSON tree.
#[derive(serde::Deserialize, Default)]
struct Punctuated {
    #[serde(rename = "sentenceSegments", default)]
    segments: Option<Vec<Segment>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Segment {
    participant: Option<serde_json::Value>,
    #[serde(rename = "startTimeOffset")]
    start: Option<serde_json::Value>,
    phrase: Option<serde_json::Value>,
}

/// A plain-text transcript from the punctuated transcript: one line per speaker turn, with its
/// start time.
pub fn render_text(punctuated: &serde_json::Value) -> String {
    let p: Punctuated = serde_json::from_value(punctuated.clone()).unwrap_or_default();
    render_segments(p.segments.as_deref().unwrap_or_default())
}

/// [`render_text`] of a punctuated transcript in a file; a document of another shape gives an
/// empty text, as it always has.
fn render_text_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let p: Punctuated = serde_json::from_reader(std::io::BufReader::new(file)).unwrap_or_default();
    Ok(render_segments(p.segments.as_deref().unwrap_or_default()))
}

fn render_segments(segments: &[Segment]) -> String {
    let mut out = String::new();
    let mut turn: Option<(String, u64, Vec<String>)> = None;
    let flush = |out: &mut String, t: &(String, u64, Vec<String>)| {
        let s = t.1 / 1000;
        out.push_str(&format!(
            "[{:02}:{:02}:{:02}] {}: {}\n",
            s / 3600,
            (s / 60) % 60,
            s % 60,
            speaker(&t.0),
            t.2.join(" ")
        ));
    };
    for seg in segments {
        let who = seg
            .participant
            .as_ref()
            .and_then(|p| p.as_str())
            .unwrap_or("unknown")
            .to_string();
        let start = seg.start.as_ref().and_then(|v| v.as_u64()).unwrap_or(0);
        let phrase = seg
            .phrase
            .as_ref()
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .trim()
            .to_string();
        match &mut turn {
            Some(t) if t.0 == who => t.2.push(phrase),
            _ => {
                if let Some(t) = &turn {
                    flush(&mut out, t);
                }
                turn = Some((who, start, vec![phrase]));
            }
        }
    }
    if let Some(t) = &turn {
        flush(&mut out, t);
    }
    out
}

fn speaker(p: &str) -> String {
    match p {
        "participantOne" => "Speaker 1".into(),
        "participantTwo" => "Speaker 2".into(),
        other => other.into(),
    }
}

/// Why a result could not be delivered this time.
enum Undelivered {
    /// The API's answer: classified like any other API failure.
    Api(ApiError),
    /// Our disk: asked for again later, costing nothing.
    Write(String),
}

/// Streams the answer to `tail` into a new temporary file in `dir` and checks that it is JSON.
/// The file is removed again unless the caller persists it.
async fn fetch_to_temp(
    api: &crate::api::ApiClient,
    tail: &str,
    dir: &Path,
    cap: u64,
) -> Result<(std::fs::File, tempfile::TempPath), Undelivered> {
    use tokio::io::AsyncWriteExt;
    let d = dir.to_path_buf();
    let tmp = tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&d)?;
        tempfile::Builder::new()
            .prefix(".callferry-")
            .suffix(".tmp")
            .tempfile_in(&d)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
    .map_err(|e| Undelivered::Write(format!("cannot create a file in {}: {e}", dir.display())))?;
    let (file, temp_path) = tmp.into_parts();
    let mut out = tokio::fs::File::from_std(file);
    let written = match api.get_to_file(tail, &mut out, cap).await {
        Ok(n) => n,
        Err(ApiError::Local(m)) => return Err(Undelivered::Write(m)),
        Err(e) => return Err(Undelivered::Api(e)),
    };
    out.flush()
        .await
        .map_err(|e| Undelivered::Write(format!("cannot write {}: {e}", temp_path.display())))?;
    let file = out.into_std().await;
    let what = tail.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        let mut f = &file;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| Undelivered::Write(e.to_string()))?;
        // Streamed through, not parsed into a tree: checking costs no memory.
        serde_json::from_reader::<_, serde::de::IgnoredAny>(std::io::BufReader::new(f)).map_err(
            |e| {
                Undelivered::Api(ApiError::Protocol(format!(
                    "{what} answered with a body that is not JSON ({e}; {written} bytes)"
                )))
            },
        )?;
        Ok((file, temp_path))
    })
    .await
    .unwrap_or_else(|e| Err(Undelivered::Write(e.to_string())))
}

/// Makes a fetched temporary file the result at `dest` (see [`write_atomic`]).
fn persist(file: std::fs::File, temp: tempfile::TempPath, dest: &Path) -> std::io::Result<()> {
    file.sync_all()?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o640))?;
    temp.persist(dest).map_err(|e| e.error)?;
    std::fs::File::open(dest.parent().unwrap_or(Path::new(".")))?.sync_all()
}

pub struct Follower {
    p: Arc<Shared>,
    limiter: RateLimiter,
    index: Arc<crate::calls::index::Index>,
}

impl Follower {
    pub fn new(p: Arc<Shared>) -> Self {
        let limiter = RateLimiter::new(p.cfg.results.max_requests_per_sec);
        let index = Arc::new(crate::calls::index::Index::open(&p.cfg.results.output_dir));
        Follower { p, limiter, index }
    }

    pub async fn run(self, cancel: CancellationToken) {
        debug!("results follower started");
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // Held for this round's requests; while the API is down, a probe's round is one job.
            let Some(admission) = self.p.gate.admit(&cancel).await else {
                break;
            };
            let probe = admission.is_probe();
            let batch = if probe { 1 } else { BATCH };
            let due = match self.p.queue.due_followups(now_ms(), batch).await {
                Ok(d) => d,
                Err(e) => {
                    error!(error = %e, "cannot read followed jobs; retrying in 1s");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if due.is_empty() {
                drop(admission);
                let wait = match self.p.queue.next_followup().await {
                    Ok(Some(t)) => {
                        Duration::from_millis((t - now_ms()).clamp(0, ms(IDLE_POLL)) as u64)
                    }
                    _ => IDLE_POLL,
                };
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.p.wake.follower.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let work = futures_util::stream::iter(due).for_each_concurrent(CONCURRENCY, |job| {
                let span = info_span!("follow", job_id = job.id, path = %job.path,
                    interaction_id = job.interaction_id.as_deref().unwrap_or(""));
                self.follow_one(job, probe).instrument(span)
            });
            tokio::select! {
                // Abandoned requests leave the job as it was: it is asked about again later.
                _ = cancel.cancelled() => break,
                _ = work => {}
            }
        }
        debug!("results follower stopped");
    }

    /// One followed job's turn: its remote delete once processed, else its status at the service.
    async fn follow_one(&self, job: Job, probe: bool) {
        let Some(iid) = job.interaction_id.clone() else {
            return;
        };
        self.limiter.acquire(1).await;
        if !probe && !self.p.gate.is_open() {
            // Closed since this round began (a 5xx storm, an outage): the job stays due and is
            // asked about once the gate lets requests through again.
            return;
        }
        if job.state == crate::queue::State::Processed {
            // Results on disk and indexed: `[results] delete_remote_after_fetch`.
            return self.delete_remote(job, &iid).await;
        }
        if self
            .p
            .gate
            .state()
            .accounts_paused
            .contains_key(self.p.account_of(&job))
        {
            // Its account's token is rejected: asked about again a poll later, without a request
            // that would only be refused.
            return self.ask_later(&job, None).await;
        }
        match self.p.api_for(&job).status(&iid).await {
            Ok(st) => {
                self.api_ok(&job);
                self.on_status(job, &st.status, st.error_message.as_deref())
                    .await;
            }
            Err(e) => self.on_error(&job, e, "status").await,
        }
    }

    /// What the service's status means for the job: its results are delivered (`processed`), it
    /// fails (a `…Failed` status, or still not processed after `results.max_wait`), or it is
    /// asked about again a poll later.
    async fn on_status(&self, job: Job, status: &str, error_message: Option<&str>) {
        let cfg = &self.p.cfg.results;
        let now = now_ms();
        if status == "processed" {
            return self.deliver(job).await;
        }
        if status.ends_with("Failed") {
            let lost = matches!(status, "fileUploadFailed" | "fileDownloadFailed");
            let msg = format!(
                "ElevateAI reports {status}: {}",
                error_message.unwrap_or("(no message)")
            );
            warn!(error = %msg, "interaction failed at the service");
            self.record(
                self.p
                    .queue
                    .fail_following(job.id, &msg, Some(status), lost, now)
                    .await,
            );
            return;
        }
        let waited = now - job.uploaded_at.unwrap_or(job.updated_at);
        if waited > ms(cfg.max_wait) {
            let msg = format!(
                "still {status} {} after upload (results.max_wait)",
                humantime::format_duration(Duration::from_secs((waited / 1000) as u64))
            );
            warn!(error = %msg, "giving up waiting for results");
            self.record(
                self.p
                    .queue
                    .fail_following(job.id, &msg, Some(status), false, now)
                    .await,
            );
            return;
        }
        if job.service_status.as_deref() != Some(status) {
            debug!(status, "interaction status");
        }
        let next = now + ms(cfg.poll_interval);
        self.record(
            self.p
                .queue
                .follow_later(job.id, next, Some(status), None, now)
                .await,
        );
    }

    /// The job is asked about again a poll later (`results.poll_interval`), with `why` as its
    /// `last_error` when something went wrong.
    async fn ask_later(&self, job: &Job, why: Option<&str>) {
        let now = now_ms();
        let later = now + ms(self.p.cfg.results.poll_interval);
        self.record(
            self.p
                .queue
                .follow_later(job.id, later, None, why, now)
                .await,
        );
    }

    /// Fetches and writes every configured kind not yet on disk, then marks the job processed.
    async fn deliver(&self, mut job: Job) {
        let Some(iid) = job.interaction_id.clone() else {
            return;
        };
        // Asked once per delivery; the answer cannot change for this job (earlier jobs only go
        // away by pruning, which leaves a fingerprint of the path that still answers).
        let later_call = match self.p.queue.earlier_call_at_path(&job).await {
            Ok(later) => later,
            Err(e) => {
                error!(error = %e, "cannot read the queue; will try again");
                return self.ask_later(&job, None).await;
            }
        };
        for kind in self.kinds_for(&job) {
            if job.results_written.iter().any(|k| k == kind) {
                continue;
            }
            if !self.deliver_kind(&job, &iid, kind, later_call).await {
                return;
            }
            job.results_written.push(kind.to_string());
        }
        self.finish_delivery(job, later_call).await;
    }

    /// The kinds a job's delivery writes: the configured ones (`ai` only for a source whose
    /// declares include AI results), and `text` with `format = "text"`.
    fn kinds_for(&self, job: &Job) -> Vec<&str> {
        let cfg = &self.p.cfg.results;
        let mut kinds: Vec<&str> = cfg
            .kinds
            .iter()
            .map(String::as_str)
            .filter(|k| *k != "ai" || self.p.source_of(job).declare.include_ai_results)
            .collect();
        if cfg.format == ResultsFormat::Text {
            kinds.push("text");
        }
        kinds
    }

    /// Fetches (or renders) one kind into its file and records it as written. False when the
    /// delivery stops here: a failed request or an unwritable results folder, each recorded.
    async fn deliver_kind(&self, job: &Job, iid: &str, kind: &str, later_call: bool) -> bool {
        let dir = &self.p.cfg.results.output_dir;
        let source = if kind == "text" { "punctuated" } else { kind };
        let path = result_path_for(dir, job, kind, later_call);
        let written = if kind == "text" {
            // From the punctuated transcript already on disk when there is one.
            let on_disk = job
                .results_written
                .iter()
                .any(|k| k == "punctuated")
                .then(|| result_path_for(dir, job, "punctuated", later_call))
                .filter(|p| p.is_file());
            self.write_text(self.p.api_for(job), iid, on_disk, &path)
                .await
        } else {
            self.fetch_into(self.p.api_for(job), &endpoint(kind, iid), &path)
                .await
        };
        match written {
            Ok(()) => {}
            Err(Undelivered::Api(e)) => {
                self.on_error(job, e, source).await;
                return false;
            }
            Err(Undelivered::Write(e)) => {
                self.cannot_write(job, &path, e).await;
                return false;
            }
        }
        debug!(kind, path = %path.display(), "result written");
        if self.p.metrics.results_blocked(None) {
            info!("results can be written again");
        }
        self.p.metrics.result_fetched(kind);
        self.record(self.p.queue.result_written(job, kind, now_ms()).await);
        true
    }

    /// A full or unwritable results disk must not lose anything: the job is asked about again
    /// later. Held as an error `/healthz` reports until a result is written, and logged once.
    async fn cannot_write(&self, job: &Job, path: &Path, e: String) {
        if self.p.metrics.results_blocked(Some(e.clone())) {
            error!(path = %path.display(), error = %e, "cannot write results: /healthz reports it, and every followed job is asked about again each results.poll_interval until one is written");
        } else {
            debug!(path = %path.display(), error = %e, "cannot write results; will try again");
        }
        let msg = format!("cannot write {}: {e}", path.display());
        self.ask_later(job, Some(&msg)).await;
    }

    /// With every kind written: the job's index line, then the processed state (and the
    /// after-upload action when it waits for the results).
    async fn finish_delivery(&self, job: Job, later_call: bool) {
        let cfg = &self.p.cfg;
        // Before the processed state: a crash in between writes the line again, which the
        // index recognises; the other order could lose it.
        if let Err(e) = self.index_line(&job, later_call).await {
            let e = format!("cannot append to {}: {e}", self.index.path().display());
            if self.p.metrics.results_blocked(Some(e.clone())) {
                error!(error = %e, "cannot write the results index: /healthz reports it; asked again each results.poll_interval");
            }
            return self.ask_later(&job, Some(&e)).await;
        }
        if self.p.metrics.results_blocked(None) {
            info!("results can be written again");
        }
        // The remote delete waits for this commit: the results are on disk and indexed first.
        let delete_at = cfg.results.delete_remote_after_fetch.then(now_ms);
        match self
            .p
            .queue
            .mark_processed_then(job.id, delete_at, now_ms())
            .await
        {
            Ok(()) => {
                info!(kinds = %job.results_written.join(","), "processed: results written");
                if cfg.after_upload.when == AfterUploadWhen::Processed {
                    self.p.after_upload(&job).await;
                }
            }
            // Forgotten meanwhile (`callferry forget` deleted the job after this delivery began):
            // what was just written must not outlive it.
            Err(crate::queue::QueueError::NotInState { found: None, .. }) => {
                self.unwrite(&job, later_call).await;
            }
            Err(e) => {
                error!(error = %e, "results written but the processed state could not be recorded; they will be written again")
            }
        }
    }

    /// Fetches one result document straight into `dest`.
    async fn fetch_into(
        &self,
        api: &crate::api::ApiClient,
        tail: &str,
        dest: &Path,
    ) -> Result<(), Undelivered> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        self.limiter.acquire(1).await;
        let (file, temp) = fetch_to_temp(api, tail, dir, self.p.cfg.results.max_bytes).await?;
        let d = dest.to_path_buf();
        tokio::task::spawn_blocking(move || persist(file, temp, &d))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| Undelivered::Write(e.to_string()))
    }

    /// Writes the text transcript, rendered from `punctuated` on disk, or from a fresh fetch of it
    /// into a temporary file that is removed afterwards.
    async fn write_text(
        &self,
        api: &crate::api::ApiClient,
        iid: &str,
        punctuated: Option<PathBuf>,
        dest: &Path,
    ) -> Result<(), Undelivered> {
        let temp = match punctuated {
            Some(_) => None,
            None => {
                let dir = dest.parent().unwrap_or(Path::new("."));
                self.limiter.acquire(1).await;
                let (_, temp) = fetch_to_temp(
                    api,
                    &endpoint("punctuated", iid),
                    dir,
                    self.p.cfg.results.max_bytes,
                )
                .await?;
                Some(temp)
            }
        };
        let source = punctuated
            .unwrap_or_else(|| temp.as_ref().map(|t| t.to_path_buf()).unwrap_or_default());
        let d = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let text = render_text_file(&source)?;
            // The temporary punctuated file goes when `temp` is dropped, here.
            drop(temp);
            write_atomic(&d, text.as_bytes())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        .map_err(|e| Undelivered::Write(e.to_string()))
    }

    async fn on_error(&self, job: &Job, e: ApiError, what: &str) {
        let now = now_ms();
        let msg = format!("{what}: {e}");
        let poll = ms(self.p.cfg.results.poll_interval);
        let unit: f64 = rand::random();
        let failure = Failure::of(&e);
        let breaker_open = failure == Failure::ServerError
            && self.p.gate.server_error(msg.clone(), unit).report(&msg);
        let limits = Limits::following(&self.p.cfg);
        let attempts = job.follow_attempts + 1;
        let next = match policy::decide(
            failure,
            attempts,
            Duration::ZERO,
            breaker_open,
            &limits,
            unit,
        ) {
            Verdict::Hold(Hold::Auth) => {
                let account = self.p.account_of(job);
                if self.p.gate.pause_account(account, msg.clone()) {
                    error!(error = %msg, account, "the API rejected the token: all work on this account is paused (other accounts go on) and every job is kept. Fix its token file (it is re-read) — work resumes by itself");
                }
                now + poll
            }
            Verdict::Hold(Hold::Outage) => {
                if let Some(d) = self.p.gate.outage(msg.clone(), unit) {
                    warn!(error = %msg, retry_in = ?d, "API unreachable; holding back");
                }
                now + poll
            }
            Verdict::Hold(Hold::Descriptors) => {
                if let Some(d) = self.p.gate.out_of_descriptors(msg.clone(), unit) {
                    warn!(error = %msg, retry_in = ?d, "out of file descriptors: holding back. Raise LimitNOFILE (systemd) or ulimit -n");
                }
                now + poll
            }
            Verdict::Hold(Hold::Failing) => now + poll,
            Verdict::SlowDown(d) => {
                self.p.gate.hold(d);
                now + ms(d).max(poll)
            }
            Verdict::Fail(_) if job.state == crate::queue::State::Processed => {
                // A delete refused for good: the results stay, the interaction too (it goes by
                // the service's own retention); the reason is kept on the job.
                warn!(error = %msg, "interaction cannot be deleted at the service; its results stay here");
                self.record(
                    self.p
                        .queue
                        .remote_delete_done(job.id, Err(&msg), now)
                        .await,
                );
                return;
            }
            Verdict::Fail(_) => {
                // The service does not know the interaction (deleted, or past its 45-day
                // retention) or refuses this request: an operator must look. (Following never
                // gives up by attempts or age.)
                warn!(error = %msg, "results cannot be fetched");
                self.record(
                    self.p
                        .queue
                        .fail_following(job.id, &msg, None, false, now)
                        .await,
                );
                return;
            }
            Verdict::Retry(d) => {
                warn!(error = %msg, retry_in = ?d, "will ask again");
                now + ms(d)
            }
        };
        self.record(
            self.p
                .queue
                .follow_later(job.id, next, None, Some(&msg), now)
                .await,
        );
    }

    /// Deletes a processed job's interaction at the service. A 404 is done too (gone already);
    /// any other failure is asked again with the following policy, and the results never move.
    async fn delete_remote(&self, job: Job, iid: &str) {
        match self.p.api_for(&job).delete_interaction(iid).await {
            Ok(deleted) => {
                self.api_ok(&job);
                debug!(
                    deleted,
                    "interaction deleted at the service (results.delete_remote_after_fetch)"
                );
                self.record(
                    self.p
                        .queue
                        .remote_delete_done(job.id, Ok(deleted), now_ms())
                        .await,
                );
            }
            Err(e) => self.on_error(&job, e, "delete").await,
        }
    }

    /// Removes the results and the index line just written for a job that was forgotten while
    /// they were being written.
    async fn unwrite(&self, job: &Job, later_call: bool) {
        let dir = self.p.cfg.results.output_dir.clone();
        let files = crate::forget::result_files(&self.p.cfg, job, later_call);
        let ids: std::collections::HashSet<String> = job.interaction_id.iter().cloned().collect();
        let r = tokio::task::spawn_blocking(move || {
            for f in files {
                match std::fs::remove_file(&f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            crate::calls::index::remove(&dir, &ids)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match r {
            Ok(_) => info!("forgotten while its results were written: they are removed again"),
            Err(e) => {
                error!(error = %e, "forgotten while its results were written, and they could not be removed; remove its result files and index line by hand")
            }
        }
    }

    /// The job's line in `<output_dir>/index.jsonl`.
    async fn index_line(&self, job: &Job, later_call: bool) -> std::io::Result<()> {
        let dir = &self.p.cfg.results.output_dir;
        let results: Vec<String> = job
            .results_written
            .iter()
            .map(|k| {
                result_path_for(dir, job, k, later_call)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let entry = crate::calls::index::Entry {
            path: job.display_path(),
            source: job.source.clone(),
            external_id: job.external_id.clone(),
            interaction_id: job.interaction_id.clone().unwrap_or_default(),
            results,
        };
        // A write and an fsync: off the runtime thread.
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || index.append(&entry))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    fn api_ok(&self, job: &Job) {
        if let Some(p) = self.p.gate.success() {
            info!(was = %p.reason(), "API reachable and token accepted again");
        }
        self.p.account_ok(job);
    }

    fn record(&self, r: Result<(), crate::queue::QueueError>) {
        if let Err(e) = r {
            error!(error = %e, "could not record a follow-up outcome");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(path: &str, root: &str) -> Job {
        Job {
            id: 1,
            path: path.into(),
            root: root.into(),
            size: 1,
            mtime_ns: 1,
            dev: 1,
            ino: 1,
            state: crate::queue::State::Uploaded,
            attempts: 0,
            next_attempt_at: 0,
            interaction_id: Some("x".into()),
            upload_status: Some(201),
            last_error: None,
            created_at: 0,
            updated_at: 0,
            uploaded_at: Some(0),
            follow_at: Some(0),
            follow_attempts: 0,
            service_status: None,
            results_written: vec![],
            orphans: 0,
            external_id: None,
            source: None,
        }
    }

    #[test]
    fn result_paths_mirror_the_recording_tree() {
        let j = job("/rec/2026/11/25/call.wav", "/rec");
        assert_eq!(
            result_path(Path::new("/out"), &j, "transcript"),
            PathBuf::from("/out/2026/11/25/call.wav.transcript.json")
        );
        assert_eq!(
            result_path(Path::new("/out"), &j, "text"),
            PathBuf::from("/out/2026/11/25/call.wav.txt")
        );
        // A later call at the same path: its interaction id keeps it apart from the first.
        assert_eq!(
            result_path_for(Path::new("/out"), &j, "transcript", true),
            PathBuf::from("/out/2026/11/25/call.wav.x.transcript.json")
        );
        assert_eq!(
            result_path_for(Path::new("/out"), &j, "text", true),
            PathBuf::from("/out/2026/11/25/call.wav.x.txt")
        );
        // Enqueued by hand outside any watched folder: by its name.
        let j = job("/elsewhere/x.wav", "/elsewhere/x.wav");
        assert_eq!(
            result_path(Path::new("/out"), &j, "ai"),
            PathBuf::from("/out/x.wav.ai.json")
        );
    }

    #[test]
    fn text_transcript_has_one_line_per_turn() {
        let v = serde_json::json!({"sentenceSegments": [
            {"participant": "participantOne", "startTimeOffset": 0, "phrase": "Hello."},
            {"participant": "participantOne", "startTimeOffset": 900, "phrase": "How can I help?"},
            {"participant": "participantTwo", "startTimeOffset": 65_000, "phrase": "My bill."},
        ]});
        assert_eq!(
            render_text(&v),
            "[00:00:00] Speaker 1: Hello. How can I help?\n[00:01:05] Speaker 2: My bill.\n"
        );
    }

    #[test]
    fn atomic_write_replaces_and_sets_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left");
    }
}
