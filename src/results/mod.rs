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

mod deliver;
mod files;
#[cfg(test)]
mod tests;
mod text;

pub use files::{result_files, result_path, result_path_for, write_atomic};
pub use text::render_text;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::api::ApiError;
use crate::clock::{ms, now_ms};
use crate::policy::{self, Failure, Hold, Limits, Verdict};
use crate::queue::{Job, Role};
use crate::ratelimit::RateLimiter;
use crate::shared::Shared;

/// Jobs looked at per round; bounds memory whatever the number of followed jobs.
const BATCH: u32 = 64;
/// Requests in flight at once (the rate cap is what really limits).
const CONCURRENCY: usize = 8;
/// An idle follower sleeps until the next followed job is due or a wake-up (a job uploaded here, a
/// change by another process through the wake file, `wake.rs`); this is only a safety net. It
/// was 2 s: an idle daemon with results on woke every 2 s for nothing.
const IDLE_POLL: Duration = Duration::from_secs(600);

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
            if !self.p.queue.holds(Role::Results) {
                // On the shared queue another daemon follows for the cluster; this one waits to
                // be given the role (its holder stopped or died).
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.p.queue.role_changed() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
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
        if !self.p.queue.holds(Role::Results) {
            // The role went to another daemon during this round (this one was paused past its
            // lease): that daemon asks about the job now.
            return;
        }
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
