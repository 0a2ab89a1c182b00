//! Owns the command line: the clap definitions, the exit codes, and the dispatch to one file per
//! command. Exit codes follow the interface: 0 ok, 1 runtime failure, 2 usage, 78 configuration.
//!
//! - `run`: the daemon under signals (SIGTERM/SIGINT stop, SIGHUP reloads);
//! - `status`, `list`, `retry`, `enqueue`, `check_config`: the operator's tools;
//! - `try_it`: `demo` and `fake-api`, which need no configuration;
//! - `logging`: the tracing setup shared by all of them.

mod check_config;
mod enqueue;
mod forget;
mod list;
mod logging;
mod retry;
mod run;
mod status;
mod try_it;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::app::AppError;
use crate::config::{self, LogFormat};

pub use logging::init_logging;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
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
  CALLFERRY_HOOK_DIR               `enqueue --now`'s folder, instead of /var/spool/callferry/hook
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
  callferry forget --external-id 1764584100.42   erase one call everywhere (GDPR)
  callferry forget --older-than 90d        erase every call recorded more than 90 days ago
  callferry enqueue --now --external-id 1764584100.42 --meta caller=5551234 /var/spool/asterisk/monitor/x.wav
                                           the recorder's end-of-call hook (README: The recorder's hook)
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
    /// Queue files by hand (backfill), with the same checks as watched files. With --now: the
    /// recorder's end-of-call hook (README: "The recorder's hook").
    Enqueue {
        /// One FILE whose call just ended, from the recorder's hook, as the recorder's user: the
        /// request goes through the hook folder (no configuration or database is read), and the
        /// daemon queues it without the settle wait. Exit 0 once the request is on disk, 78 when
        /// the hook folder is missing or not writable, 2 for a usage error.
        #[arg(long)]
        now: bool,
        /// The call's id (ElevateAI's externalIdentifier); wins over the name's and the sidecar's.
        #[arg(long, requires = "now", value_name = "ID", allow_hyphen_values = true)]
        external_id: Option<String>,
        /// A fact about the call, sent as declare metadata (with [declare] send_metadata = true);
        /// a dotted KEY is a section: agent.extension=1001. Repeatable.
        #[arg(
            long = "meta",
            requires = "now",
            value_name = "KEY=VALUE",
            allow_hyphen_values = true
        )]
        meta: Vec<String>,
        /// The hook folder (else $CALLFERRY_HOOK_DIR, else /var/spool/callferry/hook): the
        /// daemon's [watch] hook_dir.
        #[arg(long, requires = "now", value_name = "DIR")]
        hook_dir: Option<PathBuf>,
        /// The ID and VALUEs are %-encoded (FreeSWITCH's url_encode, Asterisk's URIENCODE): for
        /// hooks that split arguments on spaces. Not a shell's quoting: quote them all the same.
        #[arg(long, requires = "now")]
        urlencoded: bool,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Forget calls (the right to erasure): delete each one's interaction at ElevateAI, its result
    /// files and index lines, and every trace of it in the database, keeping only a fingerprint
    /// that stops the recording, if it is still on disk, from being uploaded again. Works with the
    /// daemon running or stopped; an interrupted or failed forget is finished by the next one.
    Forget(ForgetArgs),
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
        /// Serve HTTPS with a certificate made at start, and write the CA that signed it (PEM)
        /// to this file, for `[api] ca_file` or `curl --cacert`.
        #[arg(long, value_name = "FILE")]
        tls_ca_out: Option<PathBuf>,
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

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ForgetArgs {
    /// Job ids, as `callferry list` shows them.
    #[arg(value_name = "ID")]
    ids: Vec<i64>,
    /// Call ids: the externalIdentifier each declare carried (`external_id` in `list --json`,
    /// e.g. FreePBX's uniqueid). Not-yet-declared recordings match by the id they will carry.
    #[arg(long = "external-id", value_name = "ID", num_args = 1..)]
    external_id: Vec<String>,
    /// Every call recorded more than AGE ago ("90d", "12h"), by the recording's modification
    /// time as it was queued (not by when callferry found or retried it).
    #[arg(long, value_name = "AGE", value_parser = parse_duration_arg)]
    older_than: Option<Duration>,
    /// Only finish forgets left pending (a remote delete that failed, an interrupted run).
    #[arg(long)]
    pending: bool,
}

fn parse_duration_arg(s: &str) -> Result<Duration, config::ConfigError> {
    config::parse_duration("duration", s)
}

/// Entry point: parses arguments, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    // The recorder's hook: no runtime, no configuration, no database (it runs as the recorder's
    // user, who may read none of them).
    if let Command::Enqueue {
        now: true,
        external_id,
        meta,
        hook_dir,
        urlencoded,
        files,
    } = &cli.command
    {
        return enqueue::enqueue_now(
            files,
            external_id.as_deref(),
            meta,
            hook_dir.as_deref(),
            *urlencoded,
            &env,
        );
    }
    // The daemon runs its tasks on one thread. Its work is waiting (on the network, on SQLite's own
    // thread, on the blocking pool that fsyncs and reads uncached files); with a second runtime
    // thread, tasks bounced between the two and every hand-over was a context switch. Measured
    // with callferry-bench: 15 % fewer context switches and 5-8 % more files per
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
    match cli.command {
        Command::Demo => try_it::demo(&env).await,
        Command::FakeApi {
            listen,
            token,
            processing_time,
            tls_ca_out,
        } => try_it::fake_api(listen, token, processing_time, tls_ca_out, &env).await,
        command => {
            let config_path = config::resolve_path(cli.config.as_deref(), &env);
            with_config(command, config_path, env).await
        }
    }
}

/// The commands that read the configuration: a bad one is exit 78 before anything else happens.
async fn with_config(command: Command, config_path: PathBuf, env: BTreeMap<String, String>) -> i32 {
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
    if let Command::Run = command {
        init_logging(cfg.log.format, &cfg.log.level, &env);
        return finish(run::run_daemon(cfg, config_path, env).await);
    }
    // sqlx's "slow statement" warning would be noise here: a `list` streamed into a slow reader is
    // one long statement by design.
    init_logging(LogFormat::Text, "warn,sqlx=error", &env);
    let db = &cfg.queue.database;
    finish(match command {
        Command::Status { json } => status::status(&cfg, db, json).await,
        Command::List { state, limit, json } => {
            list::list(&cfg, state.as_deref(), limit, json).await
        }
        Command::Retry(args) => retry::retry(&cfg, &args).await,
        Command::Enqueue { files, .. } => enqueue::enqueue(&cfg, &files).await,
        Command::CheckConfig { online } => check_config::check_config(&cfg, online).await,
        Command::Forget(args) => forget::forget(&cfg, &args).await,
        Command::Run | Command::Demo | Command::FakeApi { .. } => unreachable!("dispatched above"),
    })
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
