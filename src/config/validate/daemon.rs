//! The sections about the daemon itself: `[queue]` (its database, the PostgreSQL lease, history
//! kept), `[metrics]` and `[log]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::raw::{RawLog, RawMetrics, RawQueue};
use crate::secret::Secret;

/// The shortest `[queue] lease`: renewed every third of it, a shorter one would be lost to one
/// slow round trip to the database.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

pub(super) fn validate_queue(raw: RawQueue) -> Result<QueueConfig, ConfigError> {
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

pub(super) fn validate_metrics(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
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

pub(super) fn validate_log(raw: RawLog) -> Result<LogConfig, ConfigError> {
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
