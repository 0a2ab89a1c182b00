//! Validation: the raw, file-shaped values read once into the typed [`Config`], one function per
//! section, each error naming its key. Checks that span sections (a move destination inside a
//! watched folder, the floors of the intervals that pace requests) come after the sections they
//! read.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobSetBuilder};

use super::raw::{
    Raw, RawAfterUpload, RawApi, RawDeclare, RawLog, RawMetrics, RawQueue, RawResults, RawUpload,
    RawWatch,
};
use super::*;
use crate::secret::Secret;

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

fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
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

/// The certificates of `[api] ca_file`, or why it cannot be used: a missing file, or one with no
/// PEM certificate in it, is a configuration error, not a silently smaller trust store.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let err = |m: String| ConfigError::new("api.ca_file", m);
    let pem =
        std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        err(format!(
            "{} is not a PEM certificate bundle: {e}",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(err(format!(
            "{} holds no certificate (expected one or more \"-----BEGIN CERTIFICATE-----\" blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The raw configuration, checked section by section, in the file's order.
pub(super) fn validate(raw: Raw, sources: Vec<SourceConfig>) -> Result<Config, ConfigError> {
    let results_enabled = raw.results.enabled;
    let api = validate_api(raw.api)?;
    let declare = validate_declare(raw.declare)?;
    let mut watch = validate_watch(raw.watch, !sources.is_empty())?;
    let sources = all_sources(&mut watch, &declare, sources)?;
    let queue = validate_queue(raw.queue, results_enabled)?;
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
    super::sources::check_overlaps(&sources)?;
    watch.paths = sources.iter().flat_map(|s| s.paths.clone()).collect();
    Ok(sources)
}

fn validate_api(raw: RawApi) -> Result<ApiConfig, ConfigError> {
    let base = raw.base_url.trim().trim_end_matches('/');
    let base_url = reqwest::Url::parse(base).map_err(|e| {
        ConfigError::new(
            "api.base_url",
            format!(
                "{:?} is not a URL: {e} (expected e.g. \"https://api.elevateai.com/v1\")",
                crate::secret::display_url_text(base)
            ),
        )
    })?;
    match base_url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&base_url) || raw.allow_insecure_http => {}
        "http" => {
            return Err(ConfigError::new(
                "api.base_url",
                "plain http:// to a non-loopback host would send the token in clear; use https:// \
                 (or set api.allow_insecure_http = true if you really mean it)",
            ));
        }
        other => {
            return Err(ConfigError::new(
                "api.base_url",
                format!("unsupported scheme {other:?}; use https://"),
            ));
        }
    }
    let api = ApiConfig {
        base_url,
        token: token_source(&raw)?,
        connect_timeout: parse_duration("api.connect_timeout", &raw.connect_timeout)?,
        stall_timeout: parse_duration("api.stall_timeout", &raw.stall_timeout)?,
        pause_recheck: parse_duration("api.pause_recheck", &raw.pause_recheck)?,
        ca_file: match raw.ca_file.trim() {
            "" => None,
            f => Some(PathBuf::from(f)),
        },
    };
    if let Some(f) = &api.ca_file {
        load_ca_file(f)?;
    }
    if api.stall_timeout.is_zero() {
        return Err(ConfigError::new(
            "api.stall_timeout",
            "must be greater than 0",
        ));
    }
    if api.connect_timeout.is_zero() {
        return Err(ConfigError::new(
            "api.connect_timeout",
            "must be greater than 0",
        ));
    }
    Ok(api)
}

fn token_source(raw: &RawApi) -> Result<TokenSource, ConfigError> {
    match (&raw.token, &raw.token_file) {
        (Some(t), _) if !t.trim().is_empty() => Ok(TokenSource::Inline(Secret::new(t.trim()))),
        (Some(_), None) => Err(ConfigError::new(
            "api.token",
            "is empty; set api.token_file, api.token or CALLFERRY_API__TOKEN",
        )),
        (_, Some(f)) if !f.trim().is_empty() => Ok(TokenSource::File(PathBuf::from(f.trim()))),
        _ => Err(ConfigError::new(
            "api.token",
            "no API token configured; set api.token_file (recommended), api.token or \
             CALLFERRY_API__TOKEN",
        )),
    }
}

pub(super) fn validate_declare(raw: RawDeclare) -> Result<DeclareConfig, ConfigError> {
    if raw.language_tag.trim().is_empty() {
        return Err(ConfigError::new(
            "declare.language_tag",
            "must not be empty",
        ));
    }
    if raw.vertical.trim().is_empty() {
        return Err(ConfigError::new("declare.vertical", "must not be empty"));
    }
    Ok(DeclareConfig {
        language_tag: raw.language_tag,
        vertical: raw.vertical,
        model: raw.model.filter(|m| !m.trim().is_empty()),
        transcription_mode: raw.transcription_mode.filter(|m| !m.trim().is_empty()),
        include_ai_results: raw.include_ai_results,
        send_metadata: raw.send_metadata,
        timezone: time_zone(&raw.timezone)?,
    })
}

/// `"local"` (the system's zone), `"UTC"`, or an IANA name from the system's time zone database.
fn time_zone(name: &str) -> Result<jiff::tz::TimeZone, ConfigError> {
    match name.trim() {
        "" | "local" => Ok(jiff::tz::TimeZone::system()),
        "UTC" | "utc" | "Z" => Ok(jiff::tz::TimeZone::UTC),
        zone => jiff::tz::TimeZone::get(zone).map_err(|e| {
            ConfigError::new(
                "declare.timezone",
                format!(
                    "unknown time zone {zone:?} ({e}): use \"local\", \"UTC\" or an IANA name \
                     such as \"Europe/Paris\" (is the tzdata package installed?)"
                ),
            )
        }),
    }
}

fn validate_watch(raw: RawWatch, has_sources: bool) -> Result<WatchConfig, ConfigError> {
    let paths: Vec<PathBuf> = raw
        .paths
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(PathBuf::from)
        .collect();
    if paths.is_empty() && !has_sources {
        return Err(ConfigError::new(
            "watch.paths",
            "is required: list the folder(s) your recorder writes to, e.g. paths = [\"/var/spool/asterisk/monitor\"]",
        ));
    }
    if let Some(p) = paths.iter().find(|p| !p.is_absolute()) {
        return Err(ConfigError::new(
            "watch.paths",
            format!("{} is not an absolute path", p.display()),
        ));
    }
    let extensions: Vec<String> = raw
        .extensions
        .iter()
        .map(|e| e.trim().trim_start_matches('.').to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .collect();
    if extensions.is_empty() {
        return Err(ConfigError::new(
            "watch.extensions",
            "must list at least one extension",
        ));
    }
    let mut builder = GlobSetBuilder::new();
    for g in &raw.ignore {
        let glob = Glob::new(g)
            .map_err(|e| ConfigError::new("watch.ignore", format!("invalid glob {g:?}: {e}")))?;
        builder.add(glob);
    }
    let ignore_set = builder
        .build()
        .map_err(|e| ConfigError::new("watch.ignore", e.to_string()))?;
    Ok(WatchConfig {
        paths,
        recursive: raw.recursive,
        extensions,
        ignore: raw.ignore,
        ignore_set,
        settle: parse_duration("watch.settle", &raw.settle)?,
        orphan_grace: parse_duration("watch.orphan_grace", &raw.orphan_grace)?,
        poll_interval: parse_duration("watch.poll_interval", &raw.poll_interval)?,
        rescan_interval: parse_duration("watch.rescan_interval", &raw.rescan_interval)?,
        naming: crate::calls::naming::Naming::parse(&raw.naming)
            .map_err(|e| ConfigError::new("watch.naming", e.to_string()))?,
        sidecar_wait: parse_duration("watch.sidecar_wait", &raw.sidecar_wait)?,
        hook_dir: match raw.hook_dir.trim() {
            "" => None,
            d if !Path::new(d).is_absolute() => {
                return Err(ConfigError::new(
                    "watch.hook_dir",
                    format!("{d} is not an absolute path (\"\" turns the hook off)"),
                ));
            }
            d => Some(PathBuf::from(d)),
        },
    })
}

/// The shortest `[queue] lease`: renewed every third of it, a shorter one would be lost to one
/// slow round trip to the database.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

fn validate_queue(raw: RawQueue, results_enabled: bool) -> Result<QueueConfig, ConfigError> {
    let lease = parse_duration("queue.lease", &raw.lease)?;
    if lease < MIN_LEASE {
        return Err(ConfigError::new(
            "queue.lease",
            format!(
                "must be at least {}s (it is renewed every third of it)",
                MIN_LEASE.as_secs()
            ),
        ));
    }
    let keep_history = parse_duration("queue.keep_history", &raw.keep_history)?;
    // A URL would otherwise be taken for a relative file path ("postgres:" folder and all).
    let text = raw.database.trim();
    let scheme = text.to_ascii_lowercase();
    if scheme.starts_with("postgres://") || scheme.starts_with("postgresql://") {
        if let Err(e) = url::Url::parse(text) {
            return Err(ConfigError::new(
                "queue.database",
                format!(
                    "{} is not a valid PostgreSQL URL: {e}",
                    crate::secret::display_url_text(text)
                ),
            ));
        }
        if results_enabled {
            return Err(ConfigError::new(
                "results.enabled",
                "following results is not available on the PostgreSQL queue yet (queue.database \
                 is a postgres:// URL): set results.enabled = false, or use a SQLite queue",
            ));
        }
        return Ok(QueueConfig {
            database: PathBuf::new(),
            postgres: Some(Secret::new(text)),
            lease,
            keep_history,
        });
    }
    Ok(QueueConfig {
        database: non_empty_path("queue.database", &raw.database)?,
        postgres: None,
        lease,
        keep_history,
    })
}

fn validate_upload(raw: RawUpload) -> Result<UploadConfig, ConfigError> {
    if !(1..=256).contains(&raw.workers) {
        return Err(ConfigError::new(
            "upload.workers",
            format!("must be between 1 and 256, not {}", raw.workers),
        ));
    }
    if raw.max_attempts < 1 {
        return Err(ConfigError::new(
            "upload.max_attempts",
            "must be at least 1",
        ));
    }
    if raw.max_declares < 1 {
        return Err(ConfigError::new(
            "upload.max_declares",
            "must be at least 1 (one declare per recording)",
        ));
    }
    if raw.max_bytes_per_sec < 0 {
        return Err(ConfigError::new(
            "upload.max_bytes_per_sec",
            "must be 0 (unlimited) or more",
        ));
    }
    let upload = UploadConfig {
        workers: raw.workers as usize,
        max_attempts: raw.max_attempts.min(u32::MAX as i64) as u32,
        max_declares: raw.max_declares.min(u32::MAX as i64) as u32,
        max_age: parse_duration("upload.max_age", &raw.max_age)?,
        backoff_initial: parse_duration("upload.backoff_initial", &raw.backoff_initial)?,
        backoff_max: parse_duration("upload.backoff_max", &raw.backoff_max)?,
        max_bytes_per_sec: raw.max_bytes_per_sec as u64,
        shutdown_grace: parse_duration("upload.shutdown_grace", &raw.shutdown_grace)?,
    };
    if upload.backoff_initial.is_zero() {
        return Err(ConfigError::new(
            "upload.backoff_initial",
            "must be greater than 0",
        ));
    }
    if upload.backoff_max < upload.backoff_initial {
        return Err(ConfigError::new(
            "upload.backoff_max",
            "must not be shorter than upload.backoff_initial",
        ));
    }
    Ok(upload)
}

fn validate_after_upload(
    raw: RawAfterUpload,
    watch: &WatchConfig,
    results_enabled: bool,
) -> Result<AfterUploadConfig, ConfigError> {
    let action = match raw.action.trim() {
        "keep" => AfterUploadAction::Keep,
        "move" => AfterUploadAction::Move,
        "delete" => AfterUploadAction::Delete,
        other => {
            return Err(ConfigError::new(
                "after_upload.action",
                format!("{other:?} is not one of keep, move, delete"),
            ));
        }
    };
    let move_to = match raw.move_to.trim() {
        "" => None,
        p => Some(PathBuf::from(p)),
    };
    if action == AfterUploadAction::Move {
        check_move_to(move_to.as_deref(), watch)?;
    }
    let when = match raw.when.as_deref().map(str::trim) {
        None | Some("") if results_enabled => AfterUploadWhen::Processed,
        None | Some("") => AfterUploadWhen::Uploaded,
        Some("uploaded") => AfterUploadWhen::Uploaded,
        Some("processed") if results_enabled => AfterUploadWhen::Processed,
        Some("processed") => {
            return Err(ConfigError::new(
                "after_upload.when",
                "\"processed\" needs results.enabled = true (nothing is processed otherwise)",
            ));
        }
        Some(other) => {
            return Err(ConfigError::new(
                "after_upload.when",
                format!("{other:?} is not one of uploaded, processed"),
            ));
        }
    };
    Ok(AfterUploadConfig {
        action,
        move_to,
        when,
    })
}

fn check_move_to(move_to: Option<&Path>, watch: &WatchConfig) -> Result<(), ConfigError> {
    let Some(dest) = move_to else {
        return Err(ConfigError::new(
            "after_upload.move_to",
            "is required when after_upload.action = \"move\"",
        ));
    };
    if !dest.is_absolute() {
        return Err(ConfigError::new(
            "after_upload.move_to",
            format!("{} is not an absolute path", dest.display()),
        ));
    }
    // A destination inside a watched folder would make every moved file a new version, uploaded
    // again.
    if let Some(root) = watch.paths.iter().find(|r| dest.starts_with(r)) {
        return Err(ConfigError::new(
            "after_upload.move_to",
            format!(
                "{} is inside the watched folder {}; moved files would be uploaded again",
                dest.display(),
                root.display()
            ),
        ));
    }
    Ok(())
}

fn validate_results(raw: RawResults) -> Result<ResultsConfig, ConfigError> {
    let known_kinds = ["transcript", "punctuated", "ai"];
    if let Some(k) = raw
        .kinds
        .iter()
        .find(|k| !known_kinds.contains(&k.as_str()))
    {
        return Err(ConfigError::new(
            "results.kinds",
            format!("{k:?} is not one of {}", known_kinds.join(", ")),
        ));
    }
    if !(raw.max_requests_per_sec > 0.0 && raw.max_requests_per_sec.is_finite()) {
        return Err(ConfigError::new(
            "results.max_requests_per_sec",
            "must be a number greater than 0",
        ));
    }
    let format = match raw.format.trim() {
        "json" => ResultsFormat::Json,
        "text" => ResultsFormat::Text,
        other => {
            return Err(ConfigError::new(
                "results.format",
                format!("{other:?} is not one of json, text"),
            ));
        }
    };
    if raw.max_bytes < 1 {
        return Err(ConfigError::new(
            "results.max_bytes",
            "must be a number of bytes greater than 0 (default 268435456, 256 MiB)",
        ));
    }
    let results = ResultsConfig {
        enabled: raw.enabled,
        output_dir: non_empty_path("results.output_dir", &raw.output_dir)?,
        kinds: raw.kinds,
        poll_interval: parse_duration("results.poll_interval", &raw.poll_interval)?,
        max_wait: parse_duration("results.max_wait", &raw.max_wait)?,
        max_requests_per_sec: raw.max_requests_per_sec,
        format,
        max_bytes: raw.max_bytes as u64,
        delete_remote_after_fetch: raw.delete_remote_after_fetch,
    };
    if results.delete_remote_after_fetch && !results.enabled {
        return Err(ConfigError::new(
            "results.delete_remote_after_fetch",
            "needs results.enabled = true (it deletes each interaction once its results are written)",
        ));
    }
    if results.enabled && results.poll_interval.is_zero() {
        return Err(ConfigError::new(
            "results.poll_interval",
            "must be greater than 0",
        ));
    }
    Ok(results)
}

fn validate_metrics(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let listen = match raw.listen.trim() {
        "" => None,
        s => Some(s.parse::<SocketAddr>().map_err(|e| {
            ConfigError::new(
                "metrics.listen",
                format!("{s:?} is not an address like \"127.0.0.1:9184\": {e}"),
            )
        })?),
    };
    Ok(MetricsConfig {
        listen,
        unhealthy_after: parse_duration("metrics.unhealthy_after", &raw.unhealthy_after)?,
    })
}

fn validate_log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let format = match raw.format.trim() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::new(
                "log.format",
                format!("{other:?} is not one of text, json"),
            ));
        }
    };
    check_log_filter("log.level", &raw.level)?;
    Ok(LogConfig {
        format,
        level: raw.level,
    })
}
