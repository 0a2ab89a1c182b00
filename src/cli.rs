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
                    (a second one is logged and changes nothing)
  SIGHUP            re-read [log] level from the config file and the token from
                    api.token_file (a 401 pause re-checks at once); other keys need a
                    restart (systemctl reload callferry sends it)

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
            tell(&format!("callferry: cannot start the async runtime: {e}"));
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
            tell(&format!(
                "fake ElevateAI API on http://{listen}/v1 (control: http://{listen}/_fake/)"
            ));
            match crate::fake::serve_forever(listen, opts).await {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    tell(&format!("callferry: fake API: {e}"));
                    EXIT_FAILURE
                }
            }
        }
        command => {
            let cfg = match config::load(&config_path, &env) {
                Ok(c) => c,
                Err(e) => {
                    tell(&format!("callferry: configuration error: {e}"));
                    return EXIT_CONFIG;
                }
            };
            // RUST_LOG replaces [log] level for the daemon; a typo there silenced it just the same.
            if matches!(command, Command::Run | Command::CheckConfig { .. })
                && let Some(filter) = env.get("RUST_LOG")
                && let Err(e) = config::check_log_filter("RUST_LOG", filter)
            {
                tell(&format!("callferry: configuration error: {e}"));
                return EXIT_CONFIG;
            }
            match command {
                Command::Run => {
                    init_logging(cfg.log.format, &cfg.log.level, &env);
                    finish(run_daemon(cfg, config_path, env).await)
                }
                other => {
                    // sqlx's "slow statement" warning would be noise here: a `list` streamed into
                    // a slow reader is one long statement by design.
                    init_logging(LogFormat::Text, "warn,sqlx=error", &env);
                    finish(run_tool(other, cfg).await)
                }
            }
        }
    }
}

fn finish(r: Result<i32, AppError>) -> i32 {
    match r {
        Ok(code) => code,
        // The reader went away (`callferry list | head -1`): done, as `ls | head` is.
        Err(AppError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            tracing::error!(error = %e, "callferry stopped");
            tell(&format!("callferry: {e}"));
            e.exit_code()
        }
    }
}

/// A line on stderr for the person at the terminal. Unlike `eprintln!`, a closed stderr is not a
/// panic: there is nobody left to tell.
fn tell(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Command output on stdout. A closed pipe comes back as [`AppError::Output`], which ends the
/// command quietly with status 0; `println!` panicked (exit 101).
fn out(w: &mut impl std::io::Write, text: &str) -> Result<(), AppError> {
    w.write_all(text.as_bytes()).map_err(AppError::Output)
}

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
static LOG_FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

fn log_filter(level: &str, env: &BTreeMap<String, String>) -> tracing_subscriber::EnvFilter {
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

async fn run_daemon(
    cfg: Config,
    config_path: PathBuf,
    env: BTreeMap<String, String>,
) -> Result<i32, AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let shutdown = CancellationToken::new();
    // Installed before anything else happens: until then SIGHUP's default action kills the
    // process (exit 129, no graceful stop, no log line).
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => return Err(AppError::Other("cannot install signal handlers".into())),
    };
    let (started_tx, mut started_rx) = tokio::sync::oneshot::channel();
    let token = cfg.api.token.clone();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut handle: Option<app::Handle> = None;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    reload(&config_path, &env, &token, handle.as_ref());
                    continue;
                }
                h = &mut started_rx, if handle.is_none() => {
                    handle = h.ok();
                    continue;
                }
            };
            if s.is_cancelled() {
                tracing::info!(
                    "{name} received; already stopping (in-flight uploads get until the end of upload.shutdown_grace)"
                );
            } else {
                tracing::info!("{name} received");
                s.cancel();
            }
        }
    });
    app::run(cfg, shutdown, Some(started_tx)).await?;
    Ok(EXIT_OK)
}

/// SIGHUP: the log level from the config file (unless `RUST_LOG` decides it) and the token from
/// its file are read again; a daemon paused by a 401 then re-checks the token at once. Any other
/// change to the configuration needs a restart.
fn reload(
    path: &Path,
    env: &BTreeMap<String, String>,
    token: &config::TokenSource,
    handle: Option<&app::Handle>,
) {
    use tracing::{error, info, warn};
    match config::load(path, env) {
        Err(e) => {
            error!(error = %e, "SIGHUP: the configuration has an error; the log level is unchanged")
        }
        Ok(_) if env.contains_key("RUST_LOG") => {
            info!("SIGHUP: RUST_LOG is set and keeps deciding the log level")
        }
        Ok(new) => match LOG_FILTER
            .get()
            .map(|h| h.reload(log_filter(&new.log.level, env)))
        {
            Some(Ok(())) => info!(level = %new.log.level, "SIGHUP: log level set"),
            Some(Err(e)) => warn!(error = %e, "SIGHUP: cannot change the log level"),
            None => {}
        },
    }
    let Some(handle) = handle else {
        info!("SIGHUP: still starting; the token is read when uploads begin");
        return;
    };
    match token.load() {
        Ok(t) => {
            handle.api.set_token(t);
            handle.auth_recheck.notify_one();
            match token {
                config::TokenSource::File(p) => {
                    info!(file = %p.display(), "SIGHUP: token re-read")
                }
                config::TokenSource::Inline(_) => {
                    info!("SIGHUP: the token is set in the configuration; restart to change it")
                }
            }
        }
        Err(e) => warn!(error = %e, "SIGHUP: cannot read the token; keeping the current one"),
    }
}

async fn run_tool(command: Command, cfg: Config) -> Result<i32, AppError> {
    let db = cfg.queue.database.clone();
    match command {
        Command::Status { json } => {
            let q = Queue::open(&db, OpenMode::Existing).await?;
            let report = status::gather(&q, &db).await?;
            let text = if json {
                serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
            } else {
                status::render_text(&report, status::Style::for_stdout())
            };
            let mut stdout = std::io::stdout().lock();
            out(&mut stdout, &text)?;
            std::io::Write::flush(&mut stdout).map_err(AppError::Output)?;
            Ok(EXIT_OK)
        }
        Command::List { state, limit, json } => {
            let state = match state {
                Some(s) => match s.parse::<State>() {
                    Ok(st) => Some(st),
                    Err(e) => {
                        tell(&format!("callferry: --state: {e}"));
                        return Ok(2);
                    }
                },
                None => None,
            };
            let q = Queue::open(&db, OpenMode::Existing).await?;
            // Written as the rows come: a million jobs held all of them, then their JSON, in
            // memory (3.7 GB) before the first byte went out.
            let mut w = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
            let now = now_ms();
            if json {
                let mut list = status::JsonList::default();
                q.list_each(state, limit, |job| out(&mut w, &list.row(&job)))
                    .await?;
                out(&mut w, &(list.end() + "\n"))?;
            } else {
                out(&mut w, &status::list_header())?;
                q.list_each(state, limit, |job| {
                    out(&mut w, &status::list_text_row(&job, now))
                })
                .await?;
            }
            std::io::Write::flush(&mut w).map_err(AppError::Output)?;
            Ok(EXIT_OK)
        }
        Command::Retry(args) => {
            let q = Queue::open(&db, OpenMode::Existing).await?;
            let n = if args.failed {
                q.retry(None, now_ms()).await?
            } else {
                q.retry(Some(&args.ids), now_ms()).await?
            };
            out(
                &mut std::io::stdout().lock(),
                &format!("{n} job(s) back in the queue\n"),
            )?;
            if !args.failed && (n as usize) < args.ids.len() {
                tell(&format!(
                    "callferry: {} of the given id(s) were not failed jobs and were left alone",
                    args.ids.len() - n as usize
                ));
                return Ok(EXIT_FAILURE);
            }
            Ok(EXIT_OK)
        }
        Command::Enqueue { files } => enqueue(&cfg, &files).await,
        Command::CheckConfig { online } => check_config(&cfg, online).await,
        Command::Run | Command::Demo | Command::FakeApi { .. } => unreachable!(),
    }
}

/// Files queued per transaction by `enqueue`: few enough that the daemon waits only briefly for the
/// write lock, many enough that 10,000 files are a handful of commits.
const ENQUEUE_BATCH: usize = 500;

async fn enqueue(cfg: &Config, files: &[PathBuf]) -> Result<i32, AppError> {
    let q = Queue::open(&cfg.queue.database, OpenMode::Create).await?;
    let mut code = EXIT_OK;
    let mut result = Ok(());
    for chunk in files.chunks(ENQUEUE_BATCH) {
        let mut jobs = Vec::with_capacity(chunk.len());
        for f in chunk {
            match crate::watcher::check_file(cfg, f, now_ms()) {
                Ok(job) => jobs.push(job),
                Err(why) => {
                    tell(&format!("skipped  {}: {why}", f.display()));
                    code = EXIT_FAILURE;
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        // A batch that fails is reported file by file and the rest go on; what was queued is
        // the daemon's to take at once, whatever happens later.
        let lines = match q.enqueue(&jobs, now_ms()).await {
            Ok(outcomes) => {
                q.wake_daemon();
                jobs.iter()
                    .zip(&outcomes)
                    .map(|(job, o)| match o {
                        Enqueued::New { id, .. } => {
                            format!("queued   #{id} {}\n", job.path.display())
                        }
                        Enqueued::SameFile { existing, path } => format!(
                            "known    {} (same file as job #{existing}, {path})\n",
                            job.path.display()
                        ),
                        Enqueued::Known => format!(
                            "known    {} (this version is already queued)\n",
                            job.path.display()
                        ),
                    })
                    .collect::<String>()
            }
            Err(e) => {
                for job in &jobs {
                    tell(&format!("failed   {}: not queued: {e}", job.path.display()));
                }
                code = EXIT_FAILURE;
                continue;
            }
        };
        // A closed stdout does not stop the backfill half-way: every file is still queued.
        if result.is_ok() {
            result = out(&mut std::io::stdout().lock(), &lines);
        }
    }
    q.wake_daemon();
    result?;
    Ok(code)
}

async fn check_config(cfg: &Config, online: bool) -> Result<i32, AppError> {
    use std::io::Write;
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
        let _ = writeln!(std::io::stdout().lock(), "{tag} {msg}");
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
            Err(e) if crate::queue::DaemonLock::is_held(db) == Some(true) => say(
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
        let shown = crate::secret::display_url(&cfg.api.base_url);
        match crate::api::ApiClient::new(cfg, token) {
            Ok(api) => match api.probe_auth().await {
                Ok(()) => say(Some(true), format!("API {shown} accepts the token")),
                Err(e) => say(Some(false), format!("API {shown}: {e}")),
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
