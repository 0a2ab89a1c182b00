//! The sections about the service: `[api]` (address, token, TLS trust), `[declare]` (what each
//! interaction is declared with), `[upload]` and `[results]`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::raw::{RawApi, RawDeclare, RawResults, RawUpload};
use crate::secret::Secret;

pub(super) fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
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

pub(super) fn validate_api(raw: RawApi) -> Result<ApiConfig, ConfigError> {
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

pub(super) fn token_source(raw: &RawApi) -> Result<TokenSource, ConfigError> {
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

pub fn validate_declare(raw: RawDeclare) -> Result<DeclareConfig, ConfigError> {
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
pub(super) fn time_zone(name: &str) -> Result<jiff::tz::TimeZone, ConfigError> {
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

pub(super) fn validate_upload(raw: RawUpload) -> Result<UploadConfig, ConfigError> {
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

pub(super) fn validate_results(raw: RawResults) -> Result<ResultsConfig, ConfigError> {
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
