//! The typed configuration: what the daemon uses, every value parsed and checked. Built only by
//! [`super::validate`]; nothing here knows the file's shape or its defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use globset::GlobSet;

use super::{ConfigError, DEFAULT_SOURCE};
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, if any (for messages).
    pub source: Option<PathBuf>,
    pub api: ApiConfig,
    pub declare: DeclareConfig,
    pub watch: WatchConfig,
    pub queue: QueueConfig,
    pub upload: UploadConfig,
    pub after_upload: AfterUploadConfig,
    pub results: ResultsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// Every source: `[0]` is the top-level `[watch] paths` ([`DEFAULT_SOURCE`]), then the
    /// `[[source]]` tables in the file's order. `watch.paths` lists all their folders.
    pub sources: Vec<SourceConfig>,
}

/// Folders with settings of their own: a `[[source]]` table, or the top-level `[watch] paths`.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub paths: Vec<PathBuf>,
    /// Its own ElevateAI account; None: `[api]`'s token.
    pub token: Option<TokenSource>,
    pub naming: crate::calls::naming::Naming,
    /// `[declare]` with the source's `[source.declare]` laid over it.
    pub declare: DeclareConfig,
}

impl Config {
    /// The source whose folder `root` is (a job's watched folder); a folder no source lists any
    /// more (the configuration changed since it was queued) is the default source's.
    pub fn source_of_root(&self, root: &std::path::Path) -> &SourceConfig {
        self.sources
            .iter()
            .find(|s| s.paths.iter().any(|p| p == root))
            .unwrap_or(&self.sources[0])
    }

    /// The source called `name`, if the configuration has it.
    pub fn source_named(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The account a source's requests go out on, which a 401 pauses as a whole: its own name if
    /// it has a token of its own, else [`DEFAULT_SOURCE`] (the `[api]` token's).
    pub fn account_of<'a>(&self, source: &'a SourceConfig) -> &'a str {
        if source.token.is_some() {
            &source.name
        } else {
            DEFAULT_SOURCE
        }
    }
}

impl SourceConfig {
    /// Reads its token; errors name the source's key, never the value.
    pub fn load_token(&self, index: usize) -> Option<Result<Secret, ConfigError>> {
        let t = self.token.as_ref()?;
        Some(t.load().map_err(|e| {
            ConfigError {
                key: e
                    .key
                    .replace("api.", &format!("source[{}].", index.wrapping_sub(1))),
                message: e.message,
            }
        }))
    }
}

#[derive(Clone)]
pub struct ApiConfig {
    pub base_url: reqwest::Url,
    pub token: TokenSource,
    pub connect_timeout: Duration,
    pub stall_timeout: Duration,
    /// How often a paused pipeline (401) re-checks the token. Extension.
    pub pause_recheck: Duration,
    /// One more CA (PEM, may hold several certificates) trusted for the API, on top of the
    /// system's store, `SSL_CERT_FILE` and the built-in roots. Read and checked at load. Extension.
    pub ca_file: Option<PathBuf>,
}

// By hand: `base_url` may carry credentials (`https://user:pass@host`), which `Url`'s own Debug
// would print.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base_url", &crate::secret::display_url(&self.base_url))
            .field("token", &self.token)
            .field("connect_timeout", &self.connect_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("pause_recheck", &self.pause_recheck)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// Where the token comes from. A file is re-read when the API rejects the token, so an operator can
/// fix it without a restart.
#[derive(Debug, Clone)]
pub enum TokenSource {
    Inline(Secret),
    File(PathBuf),
}

impl TokenSource {
    /// Reads the current token. Errors name the key or file, never the value.
    pub fn load(&self) -> Result<Secret, ConfigError> {
        match self {
            TokenSource::Inline(s) => Ok(s.clone()),
            TokenSource::File(path) => {
                let raw = super::read_regular_file(path).map_err(|e| {
                    ConfigError::new(
                        "api.token_file",
                        format!("cannot read token file {}: {e}", path.display()),
                    )
                })?;
                let token = Secret::new(raw.trim().to_string());
                if token.is_empty() {
                    return Err(ConfigError::new(
                        "api.token_file",
                        format!("token file {} is empty", path.display()),
                    ));
                }
                Ok(token)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeclareConfig {
    pub language_tag: String,
    pub vertical: String,
    pub model: Option<String>,
    pub transcription_mode: Option<String>,
    pub include_ai_results: bool,
    /// Send what a recording's name says about its call as ElevateAI `metadata` (accounts with
    /// Explore only; others answer 400).
    pub send_metadata: bool,
    /// The zone of the date-times in recorders' file names.
    pub timezone: jiff::tz::TimeZone,
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub paths: Vec<PathBuf>,
    pub recursive: bool,
    /// Lower-case, without the dot.
    pub extensions: Vec<String>,
    pub ignore: Vec<String>,
    pub ignore_set: GlobSet,
    pub settle: Duration,
    /// A file whose header never becomes consistent, with no writer, is uploaded anyway after
    /// this long (a recorder that died). Extension.
    pub orphan_grace: Duration,
    pub poll_interval: Duration,
    pub rescan_interval: Duration,
    /// How a file's name carries its call (see [`crate::calls::naming`]).
    pub naming: crate::calls::naming::Naming,
    /// > 0: a recording without its sidecar waits up to this long after it was queued.
    pub sidecar_wait: Duration,
    /// The recorder's hook's drop folder (`callferry enqueue --now`); None: not taken. Extension.
    pub hook_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The SQLite database's path; empty when `postgres` is set.
    pub database: PathBuf,
    /// `queue.database` given as a `postgres://` URL: the queue several daemons share (issue
    /// 15). A secret: the URL may carry a password.
    pub postgres: Option<Secret>,
    /// How long a PostgreSQL claim (and a role) stands unless its daemon renews it; a dead
    /// daemon's jobs are taken over after it. Extension.
    pub lease: Duration,
    /// Jobs done longer ago than this are pruned, keeping a fingerprint that still prevents a
    /// re-upload; zero keeps everything. Extension.
    pub keep_history: Duration,
}

#[derive(Debug, Clone)]
pub struct UploadConfig {
    pub workers: usize,
    pub max_attempts: u32,
    /// Declares per recording version whose answer may have been lost (each may have created an
    /// interaction at the service) before the job fails. Extension.
    pub max_declares: u32,
    pub max_age: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_bytes_per_sec: u64,
    /// How long in-flight uploads may run on after SIGTERM. Extension.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterUploadAction {
    Keep,
    Move,
    Delete,
}

/// When the after-upload action happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterUploadWhen {
    /// As soon as the service has the audio.
    Uploaded,
    /// Only once the results are written (needs `[results] enabled`).
    Processed,
}

#[derive(Debug, Clone)]
pub struct AfterUploadConfig {
    pub action: AfterUploadAction,
    pub move_to: Option<PathBuf>,
    pub when: AfterUploadWhen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsFormat {
    /// The JSON documents only.
    Json,
    /// Also a plain-text transcript (`.txt`), one line per speaker turn.
    Text,
}

#[derive(Debug, Clone)]
pub struct ResultsConfig {
    pub enabled: bool,
    pub output_dir: PathBuf,
    pub kinds: Vec<String>,
    pub poll_interval: Duration,
    pub max_wait: Duration,
    /// Cap on status polls and result fetches, all jobs together. Extension.
    pub max_requests_per_sec: f64,
    pub format: ResultsFormat,
    /// Largest result document accepted; it is streamed to disk, never held whole. Extension.
    pub max_bytes: u64,
    /// Delete each interaction at ElevateAI once its results are on disk and indexed.
    pub delete_remote_after_fetch: bool,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
    /// `/healthz` turns 503 when work waits and nothing progressed for this long. Extension.
    pub unhealthy_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}
