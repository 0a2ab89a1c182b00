//! What the upload workers and the results follower both hold: the configuration, the queue, the
//! API client, the gate, the metrics, the wake-ups, and the after-upload step they both carry out.
//! It sits below both, so neither borrows the other's state (the follower used to hold the
//! workers' `Pipeline`).

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{debug, error, info, warn};

use crate::api::ApiClient;
use crate::clock::now_ms;
use crate::config::{Config, SourceConfig};
use crate::dispose;
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::queue::{Job, Queue, QueueError};
use crate::wake::Wake;

pub struct Shared {
    pub cfg: Arc<Config>,
    pub queue: Queue,
    /// The `[api]` token's client (the default account).
    pub api: ApiClient,
    /// The clients of sources with a token of their own, by source name: other accounts.
    pub tenants: BTreeMap<String, ApiClient>,
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    pub wake: Wake,
}

impl Shared {
    /// The source a job belongs to, by its watched folder.
    pub fn source_of(&self, job: &Job) -> &SourceConfig {
        self.cfg.source_of_root(&job.fs_root())
    }

    /// The account a job's requests go out on (what a 401 pauses).
    pub fn account_of(&self, job: &Job) -> &str {
        self.cfg.account_of(self.source_of(job))
    }

    /// The client for a job's account.
    pub fn api_for(&self, job: &Job) -> &ApiClient {
        self.tenants.get(self.account_of(job)).unwrap_or(&self.api)
    }

    /// The watched folders (as stored in the queue) of every source whose account is paused by
    /// a rejected token: claims and due times leave their jobs out until it is accepted again.
    pub fn paused_roots(&self) -> Vec<String> {
        let st = self.gate.state();
        if st.accounts_paused.is_empty() {
            return Vec::new();
        }
        self.cfg
            .sources
            .iter()
            .filter(|s| st.accounts_paused.contains_key(self.cfg.account_of(s)))
            .flat_map(|s| {
                s.paths
                    .iter()
                    .map(|p| crate::queue::encode_path(p).into_owned())
            })
            .collect()
    }

    /// A request on this job's account went through: lifts that account's pause (and says so),
    /// waking the workers and the follower for its jobs.
    pub fn account_ok(&self, job: &Job) {
        let account = self.account_of(job);
        if let Some(was) = self.gate.account_ok(account) {
            info!(account, was = %was, "the API accepts this account's token again; its uploads resume");
            self.wake.workers.notify_waiters();
            self.wake.follower.notify_one();
        }
    }

    /// Counts a job's recorded outcome; one that could not be written is logged, and the job stays
    /// in its in-flight state, recovered at the next start.
    pub fn record(&self, r: Result<(), QueueError>) {
        self.metrics.outcome_recorded();
        if let Err(e @ crate::queue::QueueError::LostClaim { .. }) = &r {
            // PostgreSQL: another daemon took the job over after this one's claim expired; it
            // is that daemon's to finish, and nothing here is committed.
            tracing::warn!(error = %e, "job dropped here");
        } else if let Err(e) = r {
            error!(error = %e, "could not record the job's outcome in the queue");
        }
    }

    /// Moves or deletes the recording once its upload is committed (see [`dispose`]), and
    /// records what was done. Idempotent: safe to run again after a crash between the commit and
    /// the file operation; a failure leaves the recording where it is, for the next start.
    pub async fn after_upload(&self, job: &Job) {
        match dispose::after_upload(&self.cfg, &self.queue, job).await {
            Ok(None) => {}
            Ok(Some(what)) => {
                // The upload's line said it all at info; the job's events keep the action.
                debug!(action = %what, "after-upload action done");
                self.record(self.queue.mark_disposed(job.id, &what, now_ms()).await);
            }
            Err(e) => {
                warn!(error = %e, "after-upload action failed; the recording stays where it is for now")
            }
        }
    }
}
