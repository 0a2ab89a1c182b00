//! Owns the daemon's metrics: every name and help text in one place, the per-daemon registry, the
//! counters the pipeline increments at the event, and the Prometheus text rendering for `/metrics`.
//!
//! Facts that live in the database (jobs by state, the oldest waiting job) are not counted here:
//! they are read from the queue at scrape time and handed to [`Metrics::render`], so they cannot
//! drift from the truth. Everything else is a counter bumped where the event happens.
//!
//! Each daemon has its own registry (no process-global recorder), so tests can run several daemons
//! in one process and read each one's numbers. Nothing here ever sees the token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::queue::Counts;

/// The outcomes of a recorder's end-of-call request, each a series from the start.
pub const HOOK_OUTCOMES: &[&str] = &["attached", "too_late", "pruned", "refused"];

/// The `Content-Type` of `/metrics` (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Metric names as registered. The exposed names follow Prometheus conventions: counters get
/// `_total` appended by the encoder, units are part of the name (`_bytes`, `_seconds`).
pub mod names {
    /// `callferry_files_discovered_total`
    pub const FILES_DISCOVERED: &str = "callferry_files_discovered";
    /// `callferry_jobs{state}`
    pub const JOBS: &str = "callferry_jobs";
    /// `callferry_uploads_total{outcome,source}`
    pub const UPLOADS: &str = "callferry_uploads";
    /// `callferry_uploaded_bytes_total{source}`
    pub const UPLOADED_BYTES: &str = "callferry_uploaded_bytes";
    /// `callferry_upload_duration_seconds` (histogram)
    pub const UPLOAD_DURATION: &str = "callferry_upload_duration_seconds";
    /// `callferry_oldest_pending_job_age_seconds`
    pub const OLDEST_PENDING_AGE: &str = "callferry_oldest_pending_job_age_seconds";
    /// `callferry_api_paused`
    pub const API_PAUSED: &str = "callferry_api_paused";
    /// `callferry_last_progress_timestamp_seconds`
    pub const LAST_PROGRESS: &str = "callferry_last_progress_timestamp_seconds";
    /// `callferry_watcher_rescans_total`
    pub const WATCHER_RESCANS: &str = "callferry_watcher_rescans";
    /// `callferry_watcher_overflows_total`
    pub const WATCHER_OVERFLOWS: &str = "callferry_watcher_overflows";
    /// `callferry_results_fetched_total{kind}`
    pub const RESULTS_FETCHED: &str = "callferry_results_fetched";
    /// `callferry_build_info{version}`
    pub const BUILD_INFO: &str = "callferry_build_info";
    /// `callferry_orphan_declares_total`
    pub const ORPHAN_DECLARES: &str = "callferry_orphan_declares";
    /// `callferry_hook_requests_total{outcome}`
    pub const HOOK_REQUESTS: &str = "callferry_hook_requests";
    /// `callferry_role_held{role}` (PostgreSQL queue only)
    pub const ROLE_HELD: &str = "callferry_role_held";
}

mod help {
    pub const HOOK_REQUESTS: &str = "Recorder's end-of-call requests (callferry enqueue --now) taken, by \
                                     outcome: attached to the job before its declare, too_late (after \
                                     it), pruned (an old or forgotten recording), refused";
    pub const ROLE_HELD: &str = "1 while this daemon does the role's work for the cluster \
                                 (rescan, results, prune), 0 while another daemon does";
    pub const FILES_DISCOVERED: &str =
        "Complete recordings (new file versions) found in the watched folders and queued";
    pub const JOBS: &str = "Jobs in the queue database by state (read at scrape time)";
    pub const UPLOADS: &str = "Upload attempts by outcome: created (201), conflict (409: the audio \
         was already there, counted as uploaded), rejected (400/404/413: the job failed), retry \
         (5xx, reset, stall or malformed answer), unauthorized (401: all uploads paused), \
         rate_limited (429), unreachable (API down), local (the recording could not be read); \
         source: the recording's source (`default`: the [watch] paths; else a [[source]] name)";
    pub const UPLOADED_BYTES: &str = "Audio bytes uploaded in attempts answered 201";
    pub const UPLOAD_DURATION: &str = "Duration of uploads answered 201, in seconds";
    pub const OLDEST_PENDING_AGE: &str =
        "Age of the oldest job not yet uploaded, in seconds (0 when nothing waits)";
    pub const API_PAUSED: &str = "1 while uploads are paused (token rejected, API unreachable or \
         queue database not writable), else 0";
    pub const LAST_PROGRESS: &str = "Unix time of the last progress: an upload answered 201/409, a result fetched, or upload bytes sent";
    pub const WATCHER_RESCANS: &str =
        "Full rescans of the watched folders (startup, periodic, polling, after an overflow)";
    pub const WATCHER_OVERFLOWS: &str =
        "File event bursts that overflowed the event queue or the kernel's; each causes a rescan";
    pub const RESULTS_FETCHED: &str = "Results files written, by kind (transcript, punctuated, ai fetched from the API; text made from punctuated)";
    pub const BUILD_INFO: &str = "Always 1; the version label says which callferry runs";
    pub const ORPHAN_DECLARES: &str = "Declares whose answer was lost or unusable (reset, stall, \
         gateway 5xx, unusable id, a crash in between), each of which may have left an interaction \
         without audio at ElevateAI; read from the queue database at scrape time, so it survives \
         restarts";
}

/// The label values of `callferry_uploads_total{outcome}`.
pub mod outcome {
    pub const CREATED: &str = "created";
    pub const CONFLICT: &str = "conflict";
    pub const REJECTED: &str = "rejected";
    pub const RETRY: &str = "retry";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const UNREACHABLE: &str = "unreachable";
    pub const LOCAL: &str = "local";
    pub const ALL: &[&str] = &[
        CREATED,
        CONFLICT,
        REJECTED,
        RETRY,
        UNAUTHORIZED,
        RATE_LIMITED,
        UNREACHABLE,
        LOCAL,
    ];
}

type Label = [(&'static str, &'static str); 1];
type OwnedLabel = [(&'static str, String); 1];
/// `outcome` and `source`: as many series as outcomes times configured sources.
type UploadLabel = [(&'static str, String); 2];

fn upload_label(outcome: &str, source: &str) -> UploadLabel {
    [
        ("outcome", outcome.to_string()),
        ("source", source.to_string()),
    ]
}

const JOB_STATES: &[&str] = &[
    "pending",
    "declared",
    "uploading",
    "uploaded",
    "processed",
    "failed",
];

/// Database facts read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counts: Counts,
    pub oldest_pending_age_s: Option<f64>,
    pub paused: bool,
    /// Declares whose answer was lost or unusable, in the life of the database.
    pub orphan_declares: u64,
    /// On the PostgreSQL queue: each role and whether this daemon holds it.
    pub roles: Vec<(&'static str, bool)>,
}

/// When the pipeline last did something, on a monotonic clock. Two notions:
/// - a *beat*: any sign of life (an idle worker loop turning over, an outcome, bytes moving); it
///   feeds the systemd watchdog;
/// - *progress*: an upload answered 201/409, a result fetched, or upload bytes sent; `/healthz`
///   watches it when work waits.
#[derive(Debug)]
pub struct Progress {
    base: Instant,
    last_beat_ms: AtomicU64,
    last_progress_ms: AtomicU64,
    /// Workers parked idle now (waiting for a wake-up or a due job, in no call that could hang).
    parked: std::sync::atomic::AtomicUsize,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            base: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            parked: Default::default(),
        }
    }
}

/// A worker parked idle (see [`Progress::park`]); unparked when dropped.
pub struct Parked<'a>(&'a Progress);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::Relaxed);
        self.0.beat();
    }
}

impl Progress {
    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    pub fn beat(&self) {
        self.last_beat_ms.fetch_max(self.now(), Ordering::Relaxed);
    }

    pub fn progress(&self) {
        let now = self.now();
        self.last_beat_ms.fetch_max(now, Ordering::Relaxed);
        self.last_progress_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// An idle worker parks: while one is parked, the pool is alive by definition (it waits on a
    /// wake-up or a due job's timer, in no call that could hang), so it need not wake up to say
    /// so. Before, every idle worker woke every 30 s only to beat.
    pub fn park(&self) -> Parked<'_> {
        self.parked.fetch_add(1, Ordering::Relaxed);
        Parked(self)
    }

    /// Changes with every sign of life (a worker waking up included): what was derived from the
    /// queue since it last changed is still true, as far as this daemon's own work goes.
    pub fn generation(&self) -> u64 {
        self.last_beat_ms.load(Ordering::Relaxed)
    }

    /// Time since the last sign of life; zero while a worker is parked idle.
    pub fn since_beat(&self) -> Duration {
        if self.parked.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(
            self.now()
                .saturating_sub(self.last_beat_ms.load(Ordering::Relaxed)),
        )
    }

    pub fn since_progress(&self) -> Duration {
        Duration::from_millis(
            self.now()
                .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)),
        )
    }
}

/// One daemon's metrics. Cheap to share behind an `Arc`; every method is lock-free or nearly.
pub struct Metrics {
    registry: Registry,
    pub progress: Progress,
    files_discovered: Counter,
    jobs: Family<Label, Gauge>,
    uploads: Family<UploadLabel, Counter>,
    uploaded_bytes: Family<OwnedLabel, Counter>,
    upload_duration: Histogram,
    oldest_pending_age: Gauge<f64, AtomicU64>,
    api_paused: Gauge,
    last_progress: Gauge<f64, AtomicU64>,
    watcher_rescans: Counter,
    watcher_overflows: Counter,
    results_fetched: Family<OwnedLabel, Counter>,
    /// The watcher's metrics (files refused, unhealthy roots, polled folders).
    pub watch: crate::watchmetrics::WatchMetrics,
    orphan_declares: Counter,
    /// On the PostgreSQL queue only: which roles this daemon holds.
    roles: Option<Family<Label, Gauge>>,
    hook_requests: Family<Label, Counter>,
    /// Why results cannot be written right now (e.g. an unwritable `output_dir`); held until one
    /// is written, for `/healthz`.
    results_blocked: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A daemon's metrics on its own queue (SQLite).
    pub fn new() -> Metrics {
        Metrics::build(Registry::default(), None)
    }

    /// A daemon's metrics as a member of a cluster on the PostgreSQL queue: every series carries
    /// `daemon="<name>"`, so one Prometheus can tell the members' series apart however it
    /// scrapes them, and `callferry_role_held{role}` says which daemon does what. The series
    /// read from the database (`callferry_jobs`, the oldest waiting job, orphan declares) are the
    /// whole cluster's: aggregate them with `max`, not `sum`.
    pub fn for_member(name: &str) -> Metrics {
        let registry =
            Registry::with_labels(std::iter::once(("daemon".into(), name.to_string().into())));
        Metrics::build(registry, Some(Family::<Label, Gauge>::default()))
    }

    fn build(mut registry: Registry, roles: Option<Family<Label, Gauge>>) -> Metrics {
        let files_discovered = Counter::default();
        let jobs = Family::<Label, Gauge>::default();
        let uploads = Family::<UploadLabel, Counter>::default();
        let uploaded_bytes = Family::<OwnedLabel, Counter>::default();
        // 50 ms .. ~30 min: a short call on a LAN to a long call on a slow uplink.
        let upload_duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        let oldest_pending_age = Gauge::<f64, AtomicU64>::default();
        let api_paused = Gauge::default();
        let last_progress = Gauge::<f64, AtomicU64>::default();
        let watcher_rescans = Counter::default();
        let watcher_overflows = Counter::default();
        let results_fetched = Family::<OwnedLabel, Counter>::default();
        let build_info = Family::<Label, Gauge>::default();
        let orphan_declares = Counter::default();

        // Every label value exists from the start, so a rate() over a fresh series works.
        for s in JOB_STATES {
            let _ = jobs.get_or_create(&[("state", *s)]);
        }
        for k in ["transcript", "punctuated", "ai"] {
            let _ = results_fetched.get_or_create(&[("kind", k.to_string())]);
        }
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);

        use names as n;
        registry.register(
            n::FILES_DISCOVERED,
            help::FILES_DISCOVERED,
            files_discovered.clone(),
        );
        registry.register(n::JOBS, help::JOBS, jobs.clone());
        registry.register(n::UPLOADS, help::UPLOADS, uploads.clone());
        registry.register(
            n::UPLOADED_BYTES,
            help::UPLOADED_BYTES,
            uploaded_bytes.clone(),
        );
        registry.register(
            n::UPLOAD_DURATION,
            help::UPLOAD_DURATION,
            upload_duration.clone(),
        );
        registry.register(
            n::OLDEST_PENDING_AGE,
            help::OLDEST_PENDING_AGE,
            oldest_pending_age.clone(),
        );
        registry.register(n::API_PAUSED, help::API_PAUSED, api_paused.clone());
        registry.register(n::LAST_PROGRESS, help::LAST_PROGRESS, last_progress.clone());
        registry.register(
            n::WATCHER_RESCANS,
            help::WATCHER_RESCANS,
            watcher_rescans.clone(),
        );
        registry.register(
            n::WATCHER_OVERFLOWS,
            help::WATCHER_OVERFLOWS,
            watcher_overflows.clone(),
        );
        registry.register(
            n::RESULTS_FETCHED,
            help::RESULTS_FETCHED,
            results_fetched.clone(),
        );
        registry.register(n::BUILD_INFO, help::BUILD_INFO, build_info);
        let watch = crate::watchmetrics::WatchMetrics::register(&mut registry);
        registry.register(
            n::ORPHAN_DECLARES,
            help::ORPHAN_DECLARES,
            orphan_declares.clone(),
        );
        let hook_requests = Family::<Label, Counter>::default();
        for o in HOOK_OUTCOMES {
            let _ = hook_requests.get_or_create(&[("outcome", *o)]);
        }
        registry.register(
            names::HOOK_REQUESTS,
            help::HOOK_REQUESTS,
            hook_requests.clone(),
        );
        if let Some(roles) = &roles {
            for r in crate::queue::Role::ALL {
                let _ = roles.get_or_create(&[("role", r.name())]);
            }
            registry.register(names::ROLE_HELD, help::ROLE_HELD, roles.clone());
        }

        let m = Metrics {
            registry,
            progress: Progress::default(),
            files_discovered,
            jobs,
            uploads,
            uploaded_bytes,
            upload_duration,
            oldest_pending_age,
            api_paused,
            last_progress,
            watcher_rescans,
            watcher_overflows,
            results_fetched,
            watch,
            orphan_declares,
            roles,
            hook_requests,
            results_blocked: Default::default(),
        };
        m.add_sources(&[crate::config::DEFAULT_SOURCE]);
        m
    }

    /// Makes the per-source series exist from the start (a rate() over a fresh series works).
    /// Called with the configuration's sources: their names are the only `source` labels, so the
    /// series are bounded by the configuration.
    pub fn add_sources(&self, names: &[&str]) {
        for s in names {
            for o in outcome::ALL {
                let _ = self.uploads.get_or_create(&upload_label(o, s));
            }
            let _ = self
                .uploaded_bytes
                .get_or_create(&[("source", s.to_string())]);
        }
    }

    /// Results could not be written (`Some(why)`), or one was written (`None`). Returns true when
    /// this changed whether they are blocked, so the caller logs the change once.
    pub fn results_blocked(&self, why: Option<String>) -> bool {
        let mut b = self
            .results_blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let changed = b.is_some() != why.is_some();
        *b = why;
        changed
    }

    /// Why results cannot be written, while they cannot.
    pub fn results_blocked_reason(&self) -> Option<String> {
        self.results_blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    // --- events -------------------------------------------------------------------------------

    /// New file versions queued by the watcher.
    pub fn files_discovered(&self, n: u64) {
        self.files_discovered.inc_by(n);
    }

    /// An upload answered 201 (stored) or 409 (already there).
    pub fn uploaded(&self, source: &str, status: u16, bytes: u64, took: Duration) {
        self.progress.progress();
        if status == 409 {
            self.count(outcome::CONFLICT, source);
        } else {
            self.count(outcome::CREATED, source);
            self.uploaded_bytes
                .get_or_create(&[("source", source.to_string())])
                .inc_by(bytes);
            self.upload_duration.observe(took.as_secs_f64());
        }
    }

    /// A declare or upload attempt failed; `outcome` says how (one of [`outcome::ALL`], as
    /// `ApiError::outcome` picks it).
    pub fn attempt_failed(&self, source: &str, outcome: &'static str) {
        self.count(outcome, source);
    }

    fn count(&self, o: &'static str, source: &str) {
        self.uploads.get_or_create(&upload_label(o, source)).inc();
    }

    /// A job outcome was recorded in the queue (a retry scheduled, a failure). A sign of life for
    /// the watchdog, not progress: an outage that reschedules every job is not getting anywhere.
    /// Progress is an upload answered ([`Metrics::uploaded`]) or upload bytes moving.
    pub fn outcome_recorded(&self) {
        self.progress.beat();
    }

    /// An idle worker looked at the queue and found nothing due.
    pub fn idle_turn(&self) {
        self.progress.beat();
    }

    pub fn watcher_rescan(&self) {
        self.watcher_rescans.inc();
    }

    /// The value of `callferry_watcher_rescans_total` (for tests).
    pub fn watcher_rescans(&self) -> u64 {
        self.watcher_rescans.get()
    }

    pub fn watcher_overflow(&self) {
        self.watcher_overflows.inc();
    }

    /// A results file (`transcript`, `punctuated`, `ai`) was fetched and written.
    pub fn result_fetched(&self, kind: &str) {
        self.progress.progress();
        self.results_fetched
            .get_or_create(&[("kind", kind.to_string())])
            .inc();
    }

    /// A recorder's end-of-call request was taken, with this outcome (one of [`HOOK_OUTCOMES`]).
    pub fn hook_request(&self, outcome: &'static str) {
        self.hook_requests
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Requests of this outcome taken so far (for tests).
    pub fn hook_requests(&self, outcome: &'static str) -> u64 {
        self.hook_requests
            .get_or_create(&[("outcome", outcome)])
            .get()
    }

    /// Results files of `kind` fetched and written by this daemon (for tests).
    pub fn results_fetched(&self, kind: &str) -> u64 {
        self.results_fetched
            .get_or_create(&[("kind", kind.to_string())])
            .get()
    }

    /// The value of `callferry_uploads_total{outcome,source}` (for tests).
    pub fn uploads_with_outcome(&self, o: &'static str, source: &str) -> u64 {
        self.uploads.get_or_create(&upload_label(o, source)).get()
    }

    // --- exposition ---------------------------------------------------------------------------

    /// The Prometheus text exposition, with the database facts of `snap`.
    pub fn render(&self, snap: &Snapshot) -> String {
        let c = &snap.counts;
        for (state, n) in [
            ("pending", c.pending),
            ("declared", c.declared),
            ("uploading", c.uploading),
            ("uploaded", c.uploaded),
            ("processed", c.processed),
            ("failed", c.failed),
        ] {
            self.jobs
                .get_or_create(&[("state", state)])
                .set(n.min(i64::MAX as u64) as i64);
        }
        self.oldest_pending_age
            .set(snap.oldest_pending_age_s.unwrap_or(0.0));
        self.api_paused.set(i64::from(snap.paused));
        // A fact of the database exposed as a counter: it only grows there, so the series only
        // grows here.
        let seen = self.orphan_declares.get();
        if snap.orphan_declares > seen {
            self.orphan_declares.inc_by(snap.orphan_declares - seen);
        }
        if let Some(roles) = &self.roles {
            for (role, held) in &snap.roles {
                roles
                    .get_or_create(&[("role", *role)])
                    .set(i64::from(*held));
            }
        }
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let last = unix_now.saturating_sub(self.progress.since_progress());
        self.last_progress.set(last.as_secs_f64());

        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests;
