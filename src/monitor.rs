//! Owns the daemon's outward signs of health: the `[metrics] listen` HTTP endpoint (`/metrics` in
//! Prometheus text format, `/healthz`), and the ticker (every few seconds) that notices upload bytes
//! moving, feeds the systemd watchdog and sends `STATUS=` lines with the queue summary.
//!
//! It reads the queue and the gate; it never changes a job. The decisions themselves are the pure
//! functions of [`crate::health`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::now_ms;
use crate::gate::{Gate, Pause};
use crate::health::{self, HealthInputs, Unhealthy};
use crate::metrics::{Metrics, Snapshot};
use crate::queue::{Counts, Queue, QueueError};
use crate::systemd;

/// Key of the row `/healthz` writes to prove the database takes writes.
const HEALTH_KEY: &str = "healthz";
const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Under systemd without a watchdog: how often the STATUS line is refreshed. With a watchdog it is
/// refreshed at each ping (every `WatchdogSec / 2`); without systemd the ticker does not run at
/// all. Every wake-up costs CPU on an idle host.
const STATUS_EVERY: Duration = Duration::from_secs(60);

/// What the endpoint and the ticker look at.
#[derive(Clone)]
pub struct Monitor {
    pub queue: Queue,
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    /// Audio bytes sent so far (the API client's counter): moving bytes are progress.
    pub bytes_sent: Arc<AtomicU64>,
    pub stall_timeout: Duration,
    pub unhealthy_after: Duration,
    /// `bytes_sent` when last looked at (see [`Monitor::sample_bytes`]).
    pub bytes_seen: Arc<AtomicU64>,
}

impl Monitor {
    /// Upload bytes that moved since the last look are progress (and a sign of life). Looked at
    /// when someone needs the answer: the watchdog's ping, `/healthz`, a scrape; no tick samples
    /// them.
    pub fn sample_bytes(&self) {
        let bytes = self.bytes_sent.load(Ordering::Relaxed);
        if self.bytes_seen.swap(bytes, Ordering::Relaxed) != bytes {
            self.metrics.progress.progress();
        }
    }

    async fn snapshot(&self) -> Result<Snapshot, QueueError> {
        let counts = self.queue.counts().await?;
        let now = now_ms();
        let oldest = self
            .queue
            .oldest_waiting()
            .await?
            .map(|t| ((now - t).max(0) as f64) / 1000.0);
        Ok(Snapshot {
            counts,
            oldest_pending_age_s: oldest,
            paused: self.gate.state().shown().is_some(),
            orphan_declares: self.queue.orphan_declares().await?,
            roles: match self.queue.cluster() {
                Some(_) => crate::queue::Role::ALL
                    .into_iter()
                    .map(|r| (r.name(), self.queue.holds(r)))
                    .collect(),
                None => Vec::new(),
            },
        })
    }

    /// Jobs due now or in flight (0 when everything waiting is backing off).
    async fn work_waiting(&self, counts: &Counts) -> Result<u64, QueueError> {
        let due = match self.queue.next_due().await? {
            Some(t) => t <= now_ms(),
            None => false,
        };
        Ok(if due || counts.uploading > 0 {
            counts.waiting()
        } else {
            0
        })
    }

    /// `Ok(())` or the reason the pipeline is unhealthy.
    pub async fn health(&self) -> Result<(), Unhealthy> {
        self.sample_bytes();
        let database_not_writable = match tokio::time::timeout(
            DB_PROBE_TIMEOUT,
            self.queue
                .set_daemon_state(HEALTH_KEY, Some("ok"), now_ms()),
        )
        .await
        {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "a write did not complete within {DB_PROBE_TIMEOUT:?}"
            )),
        };
        let unreadable = |e: QueueError| Unhealthy::DatabaseNotReadable(e.to_string());
        let counts = self.queue.counts().await.map_err(unreadable)?;
        let work_waiting = self.work_waiting(&counts).await.map_err(unreadable)?;
        health::assess(&HealthInputs {
            pause: self.gate.state().shown(),
            database_not_writable,
            results: self.metrics.results_blocked_reason(),
            work_waiting,
            since_progress: self.metrics.progress.since_progress(),
            unhealthy_after: self.unhealthy_after,
            folders_not_answering: self.metrics.watch.unhealthy_roots(),
        })
    }
}

/// Binds the `[metrics] listen` address. Done before READY so a taken port fails the start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// At most this many connections to `/metrics` and `/healthz` at once; more are closed at once.
/// A scraper and a health check need one or two. 1,100 idle connections used to exhaust the
/// daemon's descriptors (recordings could not be opened, interaction ids not committed).
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this; idle connections are closed after it too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, whatever it does (a scrape takes milliseconds).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// hyper's smallest read buffer: a request's head must fit in it (ours are GETs of a few hundred
/// bytes); 900 slow-header connections once grew the daemon from 12.5 MB to 361 MB.
const MAX_HEAD_BYTES: usize = 8192;
/// How often refused connections are reported (one line, with the count).
const REFUSED_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Serves `/metrics` and `/healthz` until `cancel` fires, within the limits above.
pub async fn serve(listener: tokio::net::TcpListener, monitor: Monitor, cancel: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(monitor);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let mut refused: u64 = 0;
    let mut last_report: Option<Instant> = None;
    let mut accept_failing = false;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                accept_failing = false;
                stream
            }
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: the pending connection stays in the
                // kernel's backlog; try again shortly rather than spin.
                if !accept_failing {
                    warn!(error = %e, "the metrics endpoint cannot accept connections; retrying");
                    accept_failing = true;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            refused += 1;
            if last_report.is_none_or(|t| t.elapsed() >= REFUSED_REPORT_EVERY) {
                warn!(
                    refused,
                    limit = MAX_CONNECTIONS,
                    "the metrics endpoint has too many connections open; closing new ones at once"
                );
                last_report = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
    connections.shutdown().await;
}

async fn metrics_handler(State(m): State<Monitor>) -> Response {
    m.sample_bytes();
    match m.snapshot().await {
        Ok(snap) => (
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            m.metrics.render(&snap),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the queue database: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz_handler(State(m): State<Monitor>) -> Response {
    match m.health().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// One line for `systemctl status`: the queue summary and the pause, if any.
pub fn status_line(c: &Counts, pause: Option<&Pause>) -> String {
    let mut s = format!(
        "{} pending, {} uploading, {} uploaded, {} processed, {} failed",
        c.pending + c.declared,
        c.uploading,
        c.uploaded,
        c.processed,
        c.failed
    );
    if let Some(p) = pause {
        s.push_str(&format!("; PAUSED: {}", p.reason()));
    }
    s
}

/// Feeds the systemd watchdog every `WatchdogSec / 2` while [`health::should_feed_watchdog`] says
/// so (always before `ready`, during start-up), looking at upload bytes first (moving bytes are
/// progress), and refreshes the STATUS line when it changes. Sleeps from one turn to the next;
/// without systemd there is nothing to do and it returns at once.
pub async fn ticker(monitor: Monitor, ready: Arc<AtomicBool>, cancel: CancellationToken) {
    let watchdog = systemd::watchdog_timeout();
    if let Some(d) = watchdog {
        info!(timeout = ?d, "systemd watchdog enabled");
    }
    let feed_every = watchdog.map(health::watchdog_period);
    let Some(every) = feed_every.or(systemd::enabled().then_some(STATUS_EVERY)) else {
        return;
    };
    let mut starving = false;
    let mut last_status: Option<String> = None;
    // What the line was made from: the workers' last sign of life and the pause. Counts change
    // only through a worker, the watcher or the follower (each a beat: they wake the workers), so
    // an idle daemon's ping does not read the queue for a line that cannot have changed.
    let mut status_of: Option<(u64, Option<String>)> = None;
    let mut due = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        due = health::next_turn(due, Instant::now(), every);
        monitor.sample_bytes();

        if feed_every.is_some() {
            let gate = monitor.gate.state();
            let gate_closed =
                gate.shown().is_some() || gate.hold_until.is_some_and(|h| h > Instant::now());
            let since = monitor.metrics.progress.since_beat();
            let feed = !ready.load(Ordering::Relaxed)
                || health::should_feed_watchdog(since, monitor.stall_timeout, gate_closed);
            if feed {
                systemd::watchdog();
                if starving {
                    info!("the workers show signs of life again; feeding the systemd watchdog");
                    starving = false;
                }
            } else if !starving {
                error!(
                    silent_for = ?since,
                    "the upload workers have shown no sign of life for longer than api.stall_timeout allows; \
                     no longer feeding the systemd watchdog, so systemd will restart the service"
                );
                starving = true;
            }
        }

        let now_of = (
            monitor.metrics.progress.generation(),
            monitor.gate.state().shown().map(|p| p.reason()),
        );
        if systemd::enabled() && status_of.as_ref() != Some(&now_of) {
            match monitor.queue.counts().await {
                Ok(c) => {
                    let line = status_line(&c, monitor.gate.state().shown().as_ref());
                    if last_status.as_ref() != Some(&line) {
                        systemd::status(&line);
                        last_status = Some(line);
                    }
                    status_of = Some(now_of);
                }
                Err(e) => warn!(error = %e, "cannot read the queue for the STATUS line"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_reads_well() {
        let c = Counts {
            pending: 3,
            declared: 1,
            uploading: 2,
            uploaded: 40,
            processed: 0,
            failed: 1,
        };
        assert_eq!(
            status_line(&c, None),
            "4 pending, 2 uploading, 40 uploaded, 0 processed, 1 failed"
        );
        let p = Pause::Auth("HTTP 401: no".into());
        assert!(status_line(&c, Some(&p)).ends_with("; PAUSED: API token rejected: HTTP 401: no"));
    }
}
