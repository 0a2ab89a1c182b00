//! `[log] level` and `RUST_LOG`: a filter that would silence the log by a typo is refused.

use super::ConfigError;
use super::suggest::suggest;

const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Validates a `[log] level` or `RUST_LOG` value. `EnvFilter` reads a bare word that is not a level
/// as a target name ("warning" enables every level of a target called `warning`), so a mistyped
/// level was accepted and silenced every line, errors included. Here a bare word must be a level,
/// and a `target=level` directive must end in one.
pub fn check_log_filter(key: &str, filter: &str) -> Result<(), ConfigError> {
    let directives = split_directives(filter);
    if directives.iter().all(|d| d.trim().is_empty()) {
        return Err(ConfigError::new(
            key,
            format!("is empty; use one of {}", LOG_LEVELS.join(", ")),
        ));
    }
    for d in directives
        .iter()
        .map(|d| d.trim())
        .filter(|d| !d.is_empty())
    {
        let (target, level) = match split_level(d) {
            Some((t, l)) => (Some(t), l.trim()),
            None => (None, d),
        };
        if level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_ok()
        {
            continue;
        }
        let lower = level.to_ascii_lowercase();
        let hint = LOG_LEVELS
            .iter()
            .find(|l| lower.starts_with(*l) || (lower.len() >= 3 && l.starts_with(lower.as_str())))
            .map(|l| format!(" (did you mean `{l}`?)"))
            .unwrap_or_else(|| suggest(&lower, LOG_LEVELS));
        let module = match target {
            Some(_) => String::new(),
            None => format!("; to filter by module, write `{d}=info`"),
        };
        return Err(ConfigError::new(
            key,
            format!(
                "{level:?} is not a log level{hint}; use one of {}{module}",
                LOG_LEVELS.join(", ")
            ),
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| ConfigError::new(key, format!("{filter:?} is not a log filter: {e}")))?;
    Ok(())
}

/// Splits a filter at the commas between directives, not those inside `[span{field=a,b}]`.
fn split_directives(filter: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in filter.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth <= 0 => {
                out.push(&filter[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&filter[start..]);
    out
}

/// `target[span]=level` split at its last `=` outside brackets.
fn split_level(directive: &str) -> Option<(&str, &str)> {
    let mut depth = 0i32;
    let mut at = None;
    for (i, c) in directive.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            '=' if depth <= 0 => at = Some(i),
            _ => {}
        }
    }
    at.map(|i| (&directive[..i], &directive[i + 1..]))
}
