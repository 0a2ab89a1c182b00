//! Logging for every command: tracing to the journal (with its fields) under systemd, or text/JSON
//! lines on stderr; a closed stderr is never fatal; SIGHUP may change the level.

use std::collections::BTreeMap;

use crate::config::LogFormat;

/// The log's writer: stderr, ignoring write errors. A closed pipe (`callferry run 2>&1 | head -1`)
/// made the logging layer panic and took the daemon down with jobs pending; a log nobody can read
/// must not stop the uploads, and there is nowhere left to report it.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().lock().flush();
        Ok(())
    }
}

type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Lets SIGHUP change the log level of the running daemon.
pub(super) static LOG_FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

pub(super) fn log_filter(
    level: &str,
    env: &BTreeMap<String, String>,
) -> tracing_subscriber::EnvFilter {
    env.get("RUST_LOG")
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_new(level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        })
}

pub fn init_logging(format: LogFormat, level: &str, env: &BTreeMap<String, String>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, Registry, reload};
    type Below = tracing_subscriber::layer::Layered<
        reload::Layer<tracing_subscriber::EnvFilter, Registry>,
        Registry,
    >;
    let (filter, handle) = reload::Layer::new(log_filter(level, env));
    let mut output: Option<Box<dyn Layer<Below> + Send + Sync>> = None;
    if format == LogFormat::Text && journal_is_stderr(env) {
        // Under systemd: structured entries, so `journalctl -u callferry INTERACTION_ID=...` and
        // `JOB_ID=...` find a job's lines. Fields keep their names (no `F_` prefix).
        if let Ok(layer) = tracing_journald::layer() {
            output = Some(
                layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("callferry".into())
                    .boxed(),
            );
        }
    }
    let output = output.unwrap_or_else(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(|| QuietStderr)
            .log_internal_errors(false)
            // Colour only on a terminal: under systemd (journald) or in a log file, escape codes
            // are noise that breaks grep.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false);
        match format {
            LogFormat::Json => layer.json().flatten_event(true).boxed(),
            LogFormat::Text => layer.boxed(),
        }
    });
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Whether stderr is the journal: systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it
/// connected; it is only ours if stderr is still that stream (not redirected by a wrapper).
fn journal_is_stderr(env: &BTreeMap<String, String>) -> bool {
    let Some((dev, ino)) = env
        .get("JOURNAL_STREAM")
        .and_then(|v| v.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    // SAFETY: fstat on fd 2 into a zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_is_used_only_when_stderr_is_the_stream_systemd_connected() {
        let env = |v: &str| BTreeMap::from([("JOURNAL_STREAM".to_string(), v.to_string())]);
        assert!(!journal_is_stderr(&BTreeMap::new()));
        assert!(!journal_is_stderr(&env("garbage")));
        // SAFETY: fstat on fd 2 into a zeroed struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(2, &mut st) }, 0);
        let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
        assert!(journal_is_stderr(&env(&format!("{dev}:{ino}"))));
        assert!(!journal_is_stderr(&env(&format!("{dev}:{}", ino + 1))));
    }
}
