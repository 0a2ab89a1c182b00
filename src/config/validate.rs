//! Validation: the raw, file-shaped values read once into the typed [`Config`], one function per
//! section, each error naming its key. Checks that span sections (a folder in two sources, a move
//! destination inside a watched folder, the floors of the intervals that pace requests) come after
//! the sections they read. The sections, by what they are about: the service (`service`: api, declare, upload,
//! results), the recordings (`recordings`: watch, after_upload) and the daemon itself (`daemon`:
//! queue, metrics, log). This file holds the order they are read in and the checks across them.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::Raw;
use super::*;

mod daemon;
mod recordings;
mod service;

pub use daemon::MIN_LEASE;
use daemon::{validate_log, validate_metrics, validate_queue};
use recordings::{validate_after_upload, validate_watch};
pub use service::load_ca_file;
pub(super) use service::validate_declare;
use service::{validate_api, validate_results, validate_upload};

/// Parses `"500ms"`, `"30s"`, `"10m"`, `"7d"` (humantime syntax).
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "invalid duration {s:?} ({e}); write it like \"500ms\", \"30s\", \"10m\", \"7d\""
            ),
        )
    })
}

fn non_empty_path(key: &str, s: &str) -> Result<PathBuf, ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    Ok(PathBuf::from(s))
}

/// The lowest value each interval that paces requests to the API may take, so no typo can turn a
/// wait into a flood (`pause_recheck = "0s"` made about 830 requests/s while the token was
/// rejected). Each floor still bounds a pacer to about 10 requests/s (100 per second for the
/// first retry of one job); the defaults are far above.
pub const FLOORS: &[(&str, Duration)] = &[
    ("api.pause_recheck", Duration::from_millis(100)),
    ("api.stall_timeout", Duration::from_secs(1)),
    ("upload.backoff_initial", Duration::from_millis(10)),
    ("upload.backoff_max", Duration::from_millis(100)),
    ("results.poll_interval", Duration::from_millis(100)),
    // "0s" turns these two off; any other value paces scans of the watched folders.
    ("watch.poll_interval", Duration::from_millis(100)),
    ("watch.rescan_interval", Duration::from_secs(1)),
];

/// The most status polls and result fetches per second `results.max_requests_per_sec` may allow.
pub const MAX_RESULTS_REQUESTS_PER_SEC: f64 = 1000.0;

fn check_floors(
    api: &ApiConfig,
    watch: &WatchConfig,
    upload: &UploadConfig,
    results: &ResultsConfig,
) -> Result<(), ConfigError> {
    let values = [
        ("api.pause_recheck", api.pause_recheck, false),
        ("api.stall_timeout", api.stall_timeout, false),
        ("upload.backoff_initial", upload.backoff_initial, false),
        ("upload.backoff_max", upload.backoff_max, false),
        ("results.poll_interval", results.poll_interval, false),
        ("watch.poll_interval", watch.poll_interval, true),
        ("watch.rescan_interval", watch.rescan_interval, true),
    ];
    for (key, value, zero_is_off) in values {
        let floor = FLOORS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| *f)
            .unwrap_or_default();
        if value < floor && !(zero_is_off && value.is_zero()) {
            let off = if zero_is_off { " (or \"0s\": off)" } else { "" };
            return Err(ConfigError::new(
                key,
                format!(
                    "{} is below the floor of {}{off}: this interval paces requests, and a \
                     shorter one floods the API and the log; use at least {}",
                    humantime::format_duration(value),
                    humantime::format_duration(floor),
                    humantime::format_duration(floor),
                ),
            ));
        }
    }
    if results.max_requests_per_sec > MAX_RESULTS_REQUESTS_PER_SEC {
        return Err(ConfigError::new(
            "results.max_requests_per_sec",
            format!(
                "{} is above the ceiling of {MAX_RESULTS_REQUESTS_PER_SEC}",
                results.max_requests_per_sec
            ),
        ));
    }
    Ok(())
}

/// The raw configuration, checked section by section, in the file's order.
pub(super) fn validate(raw: Raw, sources: Vec<SourceConfig>) -> Result<Config, ConfigError> {
    let results_enabled = raw.results.enabled;
    let api = validate_api(raw.api)?;
    let declare = validate_declare(raw.declare)?;
    let mut watch = validate_watch(raw.watch, !sources.is_empty())?;
    let sources = all_sources(&mut watch, &declare, sources)?;
    let queue = validate_queue(raw.queue)?;
    let upload = validate_upload(raw.upload)?;
    let after_upload = validate_after_upload(raw.after_upload, &watch, results_enabled)?;
    let results = validate_results(raw.results)?;
    let metrics = validate_metrics(raw.metrics)?;
    let log = validate_log(raw.log)?;
    check_floors(&api, &watch, &upload, &results)?;
    Ok(Config {
        source: None,
        api,
        declare,
        watch,
        queue,
        upload,
        after_upload,
        results,
        metrics,
        log,
        sources,
    })
}

/// The default source (the top-level `[watch] paths`) first, then the `[[source]]` tables; the
/// watcher watches every source's folders, so `watch.paths` becomes all of them.
fn all_sources(
    watch: &mut WatchConfig,
    declare: &DeclareConfig,
    tables: Vec<SourceConfig>,
) -> Result<Vec<SourceConfig>, ConfigError> {
    let mut sources = vec![SourceConfig {
        name: DEFAULT_SOURCE.to_string(),
        paths: watch.paths.clone(),
        token: None,
        naming: watch.naming.clone(),
        declare: declare.clone(),
    }];
    sources.extend(tables);
    check_overlaps(&sources)?;
    watch.paths = sources.iter().flat_map(|s| s.paths.clone()).collect();
    Ok(sources)
}

/// No folder belongs to two sources: a path of one may not equal, contain or lie inside a path of
/// another (the top-level `[watch] paths` being the default source). `sources[0]` is the default.
fn check_overlaps(sources: &[SourceConfig]) -> Result<(), ConfigError> {
    let key = |i: usize| match i {
        0 => "watch.paths".to_string(),
        i => format!("source[{}].paths", i - 1),
    };
    for (i, a) in sources.iter().enumerate() {
        for (j, b) in sources.iter().enumerate().skip(i + 1) {
            for pa in &a.paths {
                for pb in &b.paths {
                    if pa.starts_with(pb) || pb.starts_with(pa) {
                        return Err(ConfigError::new(
                            key(j),
                            format!(
                                "{} (source {:?}) overlaps {} (source {:?}, {}): a folder belongs \
                                 to one source; list each folder under one source only",
                                pb.display(),
                                b.name,
                                pa.display(),
                                a.name,
                                key(i)
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}
