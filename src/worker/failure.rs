//! What a failed request means for its job and for every worker: the policy's verdict
//! (`policy.rs` decides) carried out on the gate and the queue, and the declare cap.

use std::time::Duration;

use tracing::{error, warn};

use crate::api::ApiError;
use crate::clock::{ms, now_ms};
use crate::policy::{self, Failure, Hold, Limits, Verdict};
use crate::queue::{Job, State};

use super::Pipeline;

impl Pipeline {
    /// Carries out the policy's verdict on a failure: the gate for every worker, the queue for
    /// the job.
    pub(super) async fn on_error(&self, job: &Job, err: ApiError) {
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
    pub(super) fn hold_all(&self, job: &Job, hold: Hold, msg: &str, unit: f64) {
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

    /// A declare refused over its metadata is the account's licence, not the recording: says which
    /// key to change. Nothing was created, so the job's `retry` declares it once more.
    pub(super) fn explain_refusal(&self, job: &Job, msg: String) -> String {
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
    pub(super) fn api_failing(&self, msg: &str, unit: f64) -> bool {
        self.gate.server_error(msg.to_string(), unit).report(msg)
    }

    /// Why a job fails at `[upload] max_declares`: an operator's reason, with what to look for at
    /// the service.
    pub(super) fn too_many_declares(&self, job: &Job, n: u32, last: &str) -> String {
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
}

/// Whether a failed declare may have created its interaction: the request went out and the answer
/// was lost (a reset, a stall, a gateway's 500/502/504) or unusable (a 201 without a usable id, a
/// body that is not the expected JSON). Not a refusal (4xx, 429, 503) nor a connection that never
/// opened.
pub(super) fn declare_may_have_created(err: &ApiError) -> bool {
    match err {
        ApiError::Transport(_) | ApiError::Stalled(_) | ApiError::Protocol(_) => true,
        ApiError::Status { status, .. } => matches!(status, 500 | 502 | 504),
        _ => false,
    }
}
