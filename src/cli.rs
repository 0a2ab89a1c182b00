//! Owns the command line: argument parsing (clap), logging setup, and one function per command.
//! Exit codes follow the interface: 0 ok, 1 runtime failure, 2 usage, 78 configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppError};
use crate::clock::now_ms;
use crate::config::{self, Config, LogFormat};
use crate::queue::{Enqueued, OpenMode, Queue, State};
use crate::status;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_CONFIG: i32 = 78;

/// The rest of the manual, shown by `callferry --help` (there is no separate man page).
const MANUAL: &str = "\
FILES:
  /etc/callferry/callferry.toml   the configuration (every key, commented: config/callferry.toml)
  /etc/callferry/token            the ElevateAI API token (mode 600); under systemd it is passed
                                  as a credential ($CREDENTIALS_DIRECTORY/token)
  /var/lib/callferry/queue.db     the queue (SQLite); <database>.lock is held by the daemon
  /usr/lib/systemd/system/callferry.service   the hardened unit (Type=notify, watchdog)
  /usr/lib/sysctl.d/60-callferry.conf     raises fs.inotify.max_user_watches

ENVIRONMENT:
  CALLFERRY_CONFIG                 the config file, instead of /etc/callferry/callferry.toml
  CALLFERRY_<SECTION>__<KEY>       overrides one key, e.g. CALLFERRY_API__TOKEN,
                                   CALLFERRY_WATCH__PATHS=/a,/b (lists are comma-separated)
  RUST_LOG                         log filter, instead of [log] level
  CREDENTIALS_DIRECTORY            set by systemd; its `token` is used when no token is configured
  NOTIFY_SOCKET, WATCHDOG_USEC     set by systemd: READY/STOPPING/STATUS and watchdog messages
  JOURNAL_STREAM                   set by systemd: logs go to the journal with fields JOB_ID,
                                   PATH, INTERACTION_ID, ATTEMPT (journalctl INTERACTION_ID=...)
  NO_COLOR                         no colour in `status`, even on a terminal

SIGNALS:
  SIGTERM, SIGINT   stop taking work, let in-flight uploads finish within
                    [upload] shutdown_grace, exit 0; the rest resumes at the next start

EXIT STATUS:
  0 ok    1 runtime failure (e.g. another daemon holds the database)    2 usage error
  78 bad or unusable configuration (systemd does not restart on it: RestartPreventExitStatus=78)

MONITORING:
  With [metrics] listen = \"127.0.0.1:9184\": GET /metrics (Prometheus text) and GET /healthz
  (200 \"ok\", or 503 and the reason: token rejected, database not writable, no progress for
  [metrics] unhealthy_after while work waits).

EXAMPLES:
  callferry check-config --online          validate the config and the token
  callferry status                         how the queue is doing
  callferry list --state failed            what needs an operator, with the reason
  callferry retry --failed                 put failed jobs back in the queue
  callferry enqueue /old/recordings/*.wav  backfill
  journalctl -u callferry INTERACTION_ID=<id>   one job's story
  callferry demo                           the whole flow on this machine, nothing to set up
";

#[derive(Debug, Parser)]
#[command(
    name = "callferry",
    version,
    about = "Ferries call recordings from a recorder's folders into ElevateAI speech analytics.",
    long_about = "callferry watches the folders your call recorder writes to, waits until each \
                  recording is complete, and uploads it to ElevateAI exactly once, surviving \
                  restarts, crashes and outages. Its queue lives in SQLite.\n\n\
                  Configuration: /etc/callferry/callferry.toml, or --config PATH, or \
                  CALLFERRY_CONFIG; every key can be overridden as CALLFERRY_<SECTION>__<KEY>.\n\n\
                  Exit codes: 0 ok, 1 runtime failure, 2 usage error, 78 bad configuration.",
    after_long_help = MANUAL
)]
pub struct Cli {
    /// Config file (default /etc/callferry/callferry.toml, or $CALLFERRY_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd Type=notify). SIGTERM/SIGINT stop it gracefully.
    Run,
    /// Queue counts, oldest waiting job, pause state and recent errors.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Jobs, newest first.
    List {
        /// Only jobs in this state: pending, declared, uploading, uploaded, processed, failed.
        #[arg(long, value_name = "S")]
        state: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: u32,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put failed jobs back in the queue; a running daemon picks them up without a restart.
    Retry(RetryArgs),
    /// Queue files by hand (backfill), with the same checks as watched files.
    Enqueue {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Validate the configuration: paths, permissions, database, token.
    CheckConfig {
        /// Also make one authenticated call to the API.
        #[arg(long)]
        online: bool,
    },
    /// The whole flow on this machine with nothing set up: a built-in fake ElevateAI, a temporary
    /// folder, sample recordings.
    Demo,
    /// Serve the built-in fake ElevateAI API (for trying callferry out and for benchmarks).
    FakeApi {
        /// Address to listen on (loopback recommended).
        #[arg(long, default_value = "127.0.0.1:8765")]
        listen: std::net::SocketAddr,
        /// The token the fake accepts.
        #[arg(long, default_value = "fake-token")]
        token: String,
        /// Time from upload to "processed".
        #[arg(long, default_value = "2s", value_parser = parse_duration_arg)]
        processing_time: Duration,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RetryArgs {
    /// Job ids to retry.
    #[arg(value_name = "ID")]
    ids: Vec<i64>,
    /// Retry every failed job.
    #[arg(long)]
    failed: bool,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    config::parse_duration("duration", s).map_err(|e| e.message)
}

/// Entry point: parses arguments, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    // The daemon runs its tasks on one thread. Its work is waiting (on the network, on SQLite's own
    // thread, on the blocking pool that fsyncs and reads uncached files); with a second runtime
    // thread, tasks bounced between the two and every hand-over was a context switch. Measured
    // with callferry-bench (issue 8): 15 % fewer context switches and 5-8 % more files per
    // second. The fake and the demo (a server and a daemon in one process) keep a thread per core.
    let mut builder = match cli.command {
        Command::Run => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().thread_name("callferry").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callferry: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(dispatch(cli, env))
}

async fn dispatch(cli: Cli, env: BTreeMap<String, String>) -> i32 {
    let config_path = config::resolve_path(cli.config.as_deref(), &env);
    match cli.command {
        Command::Demo => {
            init_logging(LogFormat::Text, "warn", &env);
            finish(crate::demo::run().await)
        }
        Command::FakeApi {
            listen,
            token,
            processing_time,
        } => {
            init_logging(LogFormat::Text, "info", &env);
            let opts = crate::fake::FakeOptions {
                token,
                processing_time,
                ..Default::default()
            };
            eprintln!("fake ElevateAI API on http://{listen}/v1 (control: http://{listen}/_fake/)");
            match crate::fake::serve_forever(listen, opts).await {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("callferry: fake API: {e}");
                    EXIT_FAILURE
                }
            }
        }
        command => {
            let cfg = match config::load(&config_path, &env) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("callferry: configuration error: {e}");
                    return EXIT_CONFIG;
                }
            };
            // RUST_LOG replaces [log] level for the daemon; a typo there silenced it just the same.
            if matches!(command, Command::Run | Command::CheckConfig { .. })
                && let Some(filter) = env.get("RUST_LOG")
                && let Err(e) = config::check_log_filter("RUST_LOG", filter)
            {
                eprintln!("callferry: configuration error: {e}");
                return EXIT_CONFIG;
            }
            match command {
                Command::Run => {
                    init_logging(cfg.log.format, &cfg.log.level, &env);
                    finish(run_daemon(cfg).await)
                }
                other => {
                    init_logging(LogFormat::Text, "warn", &env);
                    finish(run_tool(other, cfg).await)
                }
            }
        }
    }
}

fn finish(r: Result<i32, AppError>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "callferry stopped");
            eprintln!("callferry: {e}");
            e.exit_code()
        }
    }
}

pub fn init_logging(format: LogFormat, level: &str, env: &BTreeMap<String, String>) {
    let filter = env
        .get("RUST_LOG")
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_new(level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    if format == LogFormat::Text && journal_is_stderr(env) {
        // Under systemd: structured entries, so `journalctl -u callferry INTERACTION_ID=...` and
        // `JOB_ID=...` find a job's lines. Fields keep their names (no `F_` prefix).
        if let Ok(layer) = tracing_journald::layer() {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::util::SubscriberInitExt;
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier("callferry".into());
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init();
            return;
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: under systemd (journald) or in a log file, escape codes are
        // noise that breaks grep.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
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

async fn run_daemon(cfg: Config) -> Result<i32, AppError> {
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        s.cancel();
    });
    app::run(cfg, shutdown, None).await?;
    Ok(EXIT_OK)
}

async fn run_tool(command: Command, cfg: Config) -> Result<i32, AppError> {
    let db = cfg.queue.database.clone();
    match command {
        Command::Status { json } => {
            let q = Queue::open(&db, OpenMode::Existing).await?;
            let report = status::gather(&q, &db).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!(
                    "{}",
                    status::render_text(&report, status::Style::for_stdout())
                );
            }
            Ok(EXIT_OK)
        }
        Command::List { state, limit, json } => {
            let state = match state {
                Some(s) => match s.parse::<State>() {
                    Ok(st) => Some(st),
                    Err(e) => {
                        eprintln!("callferry: --state: {e}");
                        return Ok(2);
                    }
                },
                None => None,
            };
            let q = Queue::open(&db, OpenMode::Existing).await?;
            let jobs = q.list(state, limit).await?;
            if json {
                println!("{}", status::list_json(&jobs));
            } else {
                print!("{}", status::list_text(&jobs));
            }
            Ok(EXIT_OK)
        }
        Command::Retry(args) => {
            let q = Queue::open(&db, OpenMode::Existing).await?;
            let n = if args.failed {
                q.retry(None, now_ms()).await?
            } else {
                q.retry(Some(&args.ids), now_ms()).await?
            };
            println!("{n} job(s) back in the queue");
            if !args.failed && (n as usize) < args.ids.len() {
                eprintln!(
                    "callferry: {} of the given id(s) were not failed jobs and were left alone",
                    args.ids.len() - n as usize
                );
                return Ok(EXIT_FAILURE);
            }
            Ok(EXIT_OK)
        }
        Command::Enqueue { files } => enqueue(&cfg, &files).await,
        Command::CheckConfig { online } => check_config(&cfg, online).await,
        Command::Run | Command::Demo | Command::FakeApi { .. } => unreachable!(),
    }
}

async fn enqueue(cfg: &Config, files: &[PathBuf]) -> Result<i32, AppError> {
    let q = Queue::open(&cfg.queue.database, OpenMode::Create).await?;
    let mut code = EXIT_OK;
    for f in files {
        match crate::watcher::check_file(cfg, f, now_ms()) {
            Ok(job) => match &q.enqueue(std::slice::from_ref(&job), now_ms()).await?[0] {
                Enqueued::New { id, .. } => println!("queued   #{id} {}", job.path.display()),
                Enqueued::SameFile { existing, path } => println!(
                    "known    {} (same file as job #{existing}, {path})",
                    job.path.display()
                ),
                Enqueued::Known => println!(
                    "known    {} (this version is already queued)",
                    job.path.display()
                ),
            },
            Err(why) => {
                eprintln!("skipped  {}: {why}", f.display());
                code = EXIT_FAILURE;
            }
        }
    }
    q.wake_daemon();
    Ok(code)
}

async fn check_config(cfg: &Config, online: bool) -> Result<i32, AppError> {
    let mut errors = 0;
    let mut say = |ok: Option<bool>, msg: String| {
        let tag = match ok {
            Some(true) => "ok     ",
            Some(false) => {
                errors += 1;
                "error  "
            }
            None => "warning",
        };
        println!("{tag} {msg}");
    };
    say(
        Some(true),
        format!(
            "config {} parsed",
            cfg.source.as_deref().unwrap_or(Path::new("-")).display()
        ),
    );
    match cfg.api.token.load() {
        Ok(_) => say(Some(true), "API token present".into()),
        Err(e) => say(Some(false), e.to_string()),
    }
    for p in &cfg.watch.paths {
        match std::fs::read_dir(p) {
            Ok(_) => say(Some(true), format!("watch path {} readable", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => say(
                None,
                format!(
                    "watch path {} does not exist (yet); the daemon waits for it",
                    p.display()
                ),
            ),
            Err(e) => say(Some(false), format!("watch path {}: {e}", p.display())),
        }
    }
    let db = &cfg.queue.database;
    if db.exists() {
        match Queue::open(db, OpenMode::Existing).await {
            Ok(q) => {
                say(
                    Some(true),
                    format!("queue database {} usable", db.display()),
                );
                q.close().await;
            }
            Err(e) => say(Some(false), e.to_string()),
        }
    } else {
        let dir = existing_ancestor(db);
        if is_writable_dir(&dir) {
            say(
                Some(true),
                format!("queue database {} will be created", db.display()),
            );
        } else {
            say(
                Some(false),
                format!(
                    "queue database {}: cannot create it ({} is not writable)",
                    db.display(),
                    dir.display()
                ),
            );
        }
    }
    if let Some(dest) = &cfg.after_upload.move_to {
        let dir = existing_ancestor(dest);
        if is_writable_dir(&dir) {
            say(
                Some(true),
                format!("after_upload.move_to {} writable", dest.display()),
            );
        } else {
            say(
                Some(false),
                format!(
                    "after_upload.move_to {}: {} is not writable",
                    dest.display(),
                    dir.display()
                ),
            );
        }
    }
    if let Some(addr) = cfg.metrics.listen {
        // The daemon binds before READY and refuses to start on a taken port: try it here too.
        match std::net::TcpListener::bind(addr) {
            Ok(_) => say(Some(true), format!("metrics.listen {addr} free")),
            Err(e) if crate::app::DaemonLock::is_held(db) == Some(true) => say(
                None,
                format!("metrics.listen {addr}: {e} (probably the running daemon's own)"),
            ),
            Err(e) => say(
                Some(false),
                format!("metrics.listen {addr}: cannot bind: {e}"),
            ),
        }
    }
    if online && let Ok(token) = cfg.api.token.load() {
        match crate::api::ApiClient::new(cfg, token) {
            Ok(api) => match api.probe_auth().await {
                Ok(()) => say(
                    Some(true),
                    format!("API {} accepts the token", cfg.api.base_url),
                ),
                Err(e) => say(Some(false), format!("API {}: {e}", cfg.api.base_url)),
            },
            Err(e) => say(Some(false), e.to_string()),
        }
    }
    Ok(if errors > 0 { EXIT_CONFIG } else { EXIT_OK })
}

fn existing_ancestor(p: &Path) -> PathBuf {
    let mut cur = p
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    while !cur.exists() {
        match cur.parent() {
            Some(parent) => cur = parent.to_path_buf(),
            None => break,
        }
    }
    cur
}

fn is_writable_dir(p: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
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
