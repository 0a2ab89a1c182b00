//! What the upload workers and the results follower both hold: the configuration, the queue, the
//! API client, the gate, the metrics, the wake-ups, and the after-upload step they both carry out.
//! It sits below both, so neither borrows the other's state (the follower used to hold the
//! workers' `Pipeline`).

use std::sync::Arc;

use tracing::{debug, error, warn};

use crate::api::ApiClient;
use crate::clock::now_ms;
use crate::config::Config;
use crate::dispose;
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::queue::{Job, Queue, QueueError};
use crate::wake::Wake;

pub struct Shared {
    pub cfg: Arc<Config>,
    pub queue: Queue,
    pub api: ApiClient,
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    pub wake: Wake,
}

impl Shared {
    /// Counts a job's recorded outcome; one that could not be written is logged, and the job stays
    /// in its in-flight state, recovered at the next start.
    pub fn record(&self, r: Result<(), QueueError>) {
        self.metrics.outcome_recorded();
        if let Err(e) = r {
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
