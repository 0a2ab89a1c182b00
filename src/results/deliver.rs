//! Delivering a processed interaction's results: each configured kind fetched (or rendered) and
//! written atomically, recorded one by one, then the index line, then the `processed` state.

use std::path::{Path, PathBuf};

use tracing::{debug, error, info};

use crate::clock::now_ms;
use crate::config::{AfterUploadWhen, ResultsFormat};
use crate::queue::Job;

use super::files::{Undelivered, endpoint, fetch_to_temp, persist, result_path_for, write_atomic};
use super::text::render_text_file;

use super::Follower;

impl Follower {
    /// Fetches and writes every configured kind not yet on disk, then marks the job processed.
    pub(super) async fn deliver(&self, mut job: Job) {
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

    /// Removes the results and the index line just written for a job that was forgotten while
    /// they were being written.
    async fn unwrite(&self, job: &Job, later_call: bool) {
        let dir = self.p.cfg.results.output_dir.clone();
        let files = super::result_files(&self.p.cfg, job, later_call);
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
}
