//! Owns the configuration: where it is read from (defaults ← TOML file ← `CALLFERRY_<SECTION>__<KEY>`
//! environment), and its validation, once, into the typed [`Config`] the rest of the program uses.
//!
//! Every problem is reported as a [`ConfigError`] that names the offending key; the CLI turns it into
//! exit code 78 so systemd does not restart-loop on a typo. Nothing outside this module sees raw
//! configuration strings.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::secret::Secret;

/// Default location of the config file (the interface contract).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/callferry/callferry.toml";
/// Environment variable that overrides the config file's location.
pub const CONFIG_ENV: &str = "CALLFERRY_CONFIG";
const ENV_PREFIX: &str = "CALLFERRY_";
/// Set by systemd for a unit with `LoadCredential=`: the folder holding the credentials.
pub const CREDENTIALS_ENV: &str = "CREDENTIALS_DIRECTORY";
/// The credential's name: `LoadCredential=token:/etc/callferry/token`.
pub const TOKEN_CREDENTIAL: &str = "token";

/// A configuration problem, always tied to the key (or file) it is about.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

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
                let raw = read_regular_file(path).map_err(|e| {
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
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub database: PathBuf,
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

// ---------------------------------------------------------------------------------------------
// Raw (file-shaped) configuration. Defaults live here, next to the key names.

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Raw {
    api: RawApi,
    declare: RawDeclare,
    watch: RawWatch,
    queue: RawQueue,
    upload: RawUpload,
    after_upload: RawAfterUpload,
    results: RawResults,
    metrics: RawMetrics,
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawApi {
    base_url: String,
    token: Option<String>,
    token_file: Option<String>,
    connect_timeout: String,
    stall_timeout: String,
    pause_recheck: String,
    #[serde(deserialize_with = "lenient")]
    allow_insecure_http: bool,
    ca_file: String,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            base_url: "https://api.elevateai.com/v1".into(),
            token: None,
            token_file: None,
            connect_timeout: "10s".into(),
            stall_timeout: "60s".into(),
            pause_recheck: "60s".into(),
            allow_insecure_http: false,
            ca_file: String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawDeclare {
    language_tag: String,
    vertical: String,
    model: Option<String>,
    transcription_mode: Option<String>,
    #[serde(deserialize_with = "lenient")]
    include_ai_results: bool,
}

impl Default for RawDeclare {
    fn default() -> Self {
        RawDeclare {
            language_tag: "en-us".into(),
            vertical: "default".into(),
            model: Some("echo".into()),
            transcription_mode: None,
            include_ai_results: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawWatch {
    paths: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    recursive: bool,
    extensions: Vec<String>,
    ignore: Vec<String>,
    settle: String,
    orphan_grace: String,
    poll_interval: String,
    rescan_interval: String,
}

impl Default for RawWatch {
    fn default() -> Self {
        RawWatch {
            paths: Vec::new(),
            recursive: true,
            extensions: [
                "wav", "mp3", "ogg", "opus", "flac", "m4a", "gsm", "wma", "aac",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ignore: [".*", "*.part", "*.tmp", "*.filepart", "*~"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            settle: "5s".into(),
            orphan_grace: "10m".into(),
            poll_interval: "0s".into(),
            rescan_interval: "10m".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawQueue {
    database: String,
    keep_history: String,
}

impl Default for RawQueue {
    fn default() -> Self {
        RawQueue {
            database: "/var/lib/callferry/queue.db".into(),
            keep_history: "90d".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUpload {
    #[serde(deserialize_with = "lenient")]
    workers: i64,
    #[serde(deserialize_with = "lenient")]
    max_attempts: i64,
    #[serde(deserialize_with = "lenient")]
    max_declares: i64,
    max_age: String,
    backoff_initial: String,
    backoff_max: String,
    #[serde(deserialize_with = "lenient")]
    max_bytes_per_sec: i64,
    shutdown_grace: String,
}

impl Default for RawUpload {
    fn default() -> Self {
        RawUpload {
            workers: 4,
            max_attempts: 12,
            max_declares: 3,
            max_age: "7d".into(),
            backoff_initial: "2s".into(),
            backoff_max: "10m".into(),
            max_bytes_per_sec: 0,
            shutdown_grace: "30s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAfterUpload {
    action: String,
    move_to: String,
    when: Option<String>,
}

impl Default for RawAfterUpload {
    fn default() -> Self {
        RawAfterUpload {
            action: "keep".into(),
            move_to: String::new(),
            when: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawResults {
    #[serde(deserialize_with = "lenient")]
    enabled: bool,
    output_dir: String,
    kinds: Vec<String>,
    poll_interval: String,
    max_wait: String,
    #[serde(deserialize_with = "lenient")]
    max_requests_per_sec: f64,
    format: String,
    #[serde(deserialize_with = "lenient")]
    max_bytes: i64,
}

impl Default for RawResults {
    fn default() -> Self {
        RawResults {
            enabled: false,
            output_dir: "/var/lib/callferry/results".into(),
            kinds: vec!["transcript".into(), "punctuated".into(), "ai".into()],
            poll_interval: "30s".into(),
            max_wait: "24h".into(),
            max_requests_per_sec: 10.0,
            format: "json".into(),
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMetrics {
    listen: String,
    unhealthy_after: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: String::new(),
            unhealthy_after: "10m".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Environment values always arrive as strings; accept `"8"` where a number is wanted and `"true"`
/// where a bool is, while a TOML file may use the native types.
fn lenient<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr + DeserializeOwned,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Native(T),
        Text(String),
    }
    match Either::<T>::deserialize(de)? {
        Either::Native(v) => Ok(v),
        Either::Text(s) => s.trim().parse::<T>().map_err(|e| {
            serde::de::Error::custom(format!("cannot read {s:?} as the expected type: {e}"))
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Where to find the config file: `--config`, then `CALLFERRY_CONFIG`, then the default path.
pub fn resolve_path(cli: Option<&Path>, env: &BTreeMap<String, String>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    if let Some(p) = env.get(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    PathBuf::from(DEFAULT_CONFIG_PATH)
}

/// Reads and validates the configuration. `env` is passed in (rather than read from the process)
/// so tests can run in parallel without touching the process environment.
pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let file_key = path.display().to_string();
    let text = read_regular_file(path).map_err(|e| {
        ConfigError::new(
            file_key.clone(),
            format!("cannot read the config file: {e} (use --config PATH or CALLFERRY_CONFIG)"),
        )
    })?;
    let mut cfg = from_toml_str(&text, env, &file_key)?;
    cfg.source = Some(path.to_path_buf());
    Ok(cfg)
}

/// Reads a configuration or token file, refusing anything but a regular file. Opening is
/// non-blocking: a FIFO without a writer would otherwise block the open (and the daemon's start,
/// or a SIGHUP reload) forever; a character device would never end.
pub fn read_regular_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}; a regular file is needed"),
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// A TOML syntax error as "line L, column C: what", without the excerpt of the file that the
/// parser's own message quotes: that line may be the one holding `api.token`.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim();
    match e.span().and_then(|s| text.get(..s.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what.to_string(),
    }
}

/// Same as [`load`], from TOML text. `origin` names the source in messages.
pub fn from_toml_str(
    text: &str,
    env: &BTreeMap<String, String>,
    origin: &str,
) -> Result<Config, ConfigError> {
    // Checked first and on its own, so a broken file is reported with its line and column rather
    // than as a confusing type error further on.
    toml::from_str::<toml::Table>(text).map_err(|e| {
        ConfigError::new(
            origin,
            format!("not valid TOML: {}", describe_toml_error(text, &e)),
        )
    })?;

    // Environment overrides: CALLFERRY_<SECTION>__<KEY>. Only names with the double underscore are
    // keys, so CALLFERRY_CONFIG (the file's location) is not mistaken for one.
    let mut env_map = config::Map::new();
    for (k, v) in env {
        if let Some(rest) = k.strip_prefix(ENV_PREFIX)
            && rest.contains("__")
        {
            env_map.insert(k.clone(), v.clone());
        }
    }
    let env_source = config::Environment::with_prefix("CALLFERRY")
        .prefix_separator("_")
        .separator("__")
        .source(Some(env_map));
    let merged = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(env_source)
        .build()
        .map_err(|e| ConfigError::new(origin, e.to_string()))?;
    let mut value: serde_json::Value = merged
        .try_deserialize()
        .map_err(|e| ConfigError::new(origin, e.to_string()))?;
    // A list set from the environment arrives as one string: "a,b,c".
    for (section, key) in [
        ("watch", "paths"),
        ("watch", "extensions"),
        ("watch", "ignore"),
        ("results", "kinds"),
    ] {
        if let Some(v) = value.get_mut(section).and_then(|s| s.get_mut(key))
            && let Some(s) = v.as_str()
        {
            *v = s
                .split(',')
                .map(|x| serde_json::Value::String(x.trim().to_string()))
                .filter(|x| x.as_str() != Some(""))
                .collect();
        }
    }

    check_known_keys(&value)?;
    let mut raw: Raw = serde_path_to_error::deserialize(&value).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::new(key, e.into_inner().to_string())
    })?;
    // Under systemd the token may come as a credential (`LoadCredential=token:...`): used when the
    // configuration names no token of its own.
    let unset = |o: &Option<String>| o.as_deref().is_none_or(|s| s.trim().is_empty());
    if unset(&raw.api.token)
        && unset(&raw.api.token_file)
        && let Some(dir) = env.get(CREDENTIALS_ENV).filter(|d| !d.is_empty())
    {
        let cred = Path::new(dir).join(TOKEN_CREDENTIAL);
        if cred.is_file() {
            raw.api.token = None;
            raw.api.token_file = Some(cred.to_string_lossy().into_owned());
        }
    }
    validate(raw)
}

const KNOWN_KEYS: &[(&str, &[&str])] = &[
    (
        "api",
        &[
            "base_url",
            "token",
            "token_file",
            "connect_timeout",
            "stall_timeout",
            "pause_recheck",
            "allow_insecure_http",
            "ca_file",
        ],
    ),
    (
        "declare",
        &[
            "language_tag",
            "vertical",
            "model",
            "transcription_mode",
            "include_ai_results",
        ],
    ),
    (
        "watch",
        &[
            "paths",
            "recursive",
            "extensions",
            "ignore",
            "settle",
            "orphan_grace",
            "poll_interval",
            "rescan_interval",
        ],
    ),
    ("queue", &["database", "keep_history"]),
    (
        "upload",
        &[
            "workers",
            "max_attempts",
            "max_declares",
            "max_age",
            "backoff_initial",
            "backoff_max",
            "max_bytes_per_sec",
            "shutdown_grace",
        ],
    ),
    ("after_upload", &["action", "move_to", "when"]),
    (
        "results",
        &[
            "enabled",
            "output_dir",
            "kinds",
            "poll_interval",
            "max_wait",
            "max_requests_per_sec",
            "format",
            "max_bytes",
        ],
    ),
    ("metrics", &["listen", "unhealthy_after"]),
    ("log", &["format", "level"]),
];

/// Names an unknown key exactly (`watch.setle`), with a suggestion, instead of serde's generic
/// "unknown field" that does not say in which section.
fn check_known_keys(value: &serde_json::Value) -> Result<(), ConfigError> {
    let Some(top) = value.as_object() else {
        return Err(ConfigError::new("config", "the top level must be a table"));
    };
    for (section, body) in top {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(s, _)| s == section) else {
            let all: Vec<&str> = KNOWN_KEYS.iter().map(|(s, _)| *s).collect();
            return Err(ConfigError::new(
                section.clone(),
                format!(
                    "unknown section [{section}]{}; known sections: {}",
                    suggest(section, &all),
                    all.join(", ")
                ),
            ));
        };
        let Some(body) = body.as_object() else {
            return Err(ConfigError::new(
                section.clone(),
                format!("[{section}] must be a table"),
            ));
        };
        for key in body.keys() {
            if !keys.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    format!("{section}.{key}"),
                    format!(
                        "unknown key{}; [{section}] knows: {}",
                        suggest(key, keys),
                        keys.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn suggest(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

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

/// The certificates of `[api] ca_file`, or why it cannot be used: a missing file, or one with no
/// PEM certificate in it, is a configuration error, not a silently smaller trust store.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected one or more \"-----BEGIN CERTIFICATE-----\" blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

fn validate(raw: Raw) -> Result<Config, ConfigError> {
    // [api]
    let base = raw.api.base_url.trim().trim_end_matches('/');
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
        "http" if is_loopback_host(&base_url) || raw.api.allow_insecure_http => {}
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
    let token = match (&raw.api.token, &raw.api.token_file) {
        (Some(t), _) if !t.trim().is_empty() => TokenSource::Inline(Secret::new(t.trim())),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "api.token",
                "is empty; set api.token_file, api.token or CALLFERRY_API__TOKEN",
            ));
        }
        (_, Some(f)) if !f.trim().is_empty() => TokenSource::File(PathBuf::from(f.trim())),
        _ => {
            return Err(ConfigError::new(
                "api.token",
                "no API token configured; set api.token_file (recommended), api.token or \
                 CALLFERRY_API__TOKEN",
            ));
        }
    };
    let api = ApiConfig {
        base_url,
        token,
        connect_timeout: parse_duration("api.connect_timeout", &raw.api.connect_timeout)?,
        stall_timeout: parse_duration("api.stall_timeout", &raw.api.stall_timeout)?,
        pause_recheck: parse_duration("api.pause_recheck", &raw.api.pause_recheck)?,
        ca_file: match raw.api.ca_file.trim() {
            "" => None,
            f => Some(PathBuf::from(f)),
        },
    };
    if let Some(f) = &api.ca_file {
        load_ca_file(f).map_err(|m| ConfigError::new("api.ca_file", m))?;
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

    // [declare]
    if raw.declare.language_tag.trim().is_empty() {
        return Err(ConfigError::new(
            "declare.language_tag",
            "must not be empty",
        ));
    }
    if raw.declare.vertical.trim().is_empty() {
        return Err(ConfigError::new("declare.vertical", "must not be empty"));
    }
    let declare = DeclareConfig {
        language_tag: raw.declare.language_tag,
        vertical: raw.declare.vertical,
        model: raw.declare.model.filter(|m| !m.trim().is_empty()),
        transcription_mode: raw
            .declare
            .transcription_mode
            .filter(|m| !m.trim().is_empty()),
        include_ai_results: raw.declare.include_ai_results,
    };

    // [watch]
    let paths: Vec<String> = raw
        .watch
        .paths
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .collect();
    if paths.is_empty() {
        return Err(ConfigError::new(
            "watch.paths",
            "is required: list the folder(s) your recorder writes to, e.g. paths = [\"/var/spool/asterisk/monitor\"]",
        ));
    }
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    for p in &paths {
        if !p.is_absolute() {
            return Err(ConfigError::new(
                "watch.paths",
                format!("{} is not an absolute path", p.display()),
            ));
        }
    }
    let extensions: Vec<String> = raw
        .watch
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
    for g in &raw.watch.ignore {
        let glob = Glob::new(g)
            .map_err(|e| ConfigError::new("watch.ignore", format!("invalid glob {g:?}: {e}")))?;
        builder.add(glob);
    }
    let ignore_set = builder
        .build()
        .map_err(|e| ConfigError::new("watch.ignore", e.to_string()))?;
    let watch = WatchConfig {
        paths,
        recursive: raw.watch.recursive,
        extensions,
        ignore: raw.watch.ignore,
        ignore_set,
        settle: parse_duration("watch.settle", &raw.watch.settle)?,
        orphan_grace: parse_duration("watch.orphan_grace", &raw.watch.orphan_grace)?,
        poll_interval: parse_duration("watch.poll_interval", &raw.watch.poll_interval)?,
        rescan_interval: parse_duration("watch.rescan_interval", &raw.watch.rescan_interval)?,
    };

    // [queue]
    let queue = QueueConfig {
        database: non_empty_path("queue.database", &raw.queue.database)?,
        keep_history: parse_duration("queue.keep_history", &raw.queue.keep_history)?,
    };

    // [upload]
    if !(1..=256).contains(&raw.upload.workers) {
        return Err(ConfigError::new(
            "upload.workers",
            format!("must be between 1 and 256, not {}", raw.upload.workers),
        ));
    }
    if raw.upload.max_attempts < 1 {
        return Err(ConfigError::new(
            "upload.max_attempts",
            "must be at least 1",
        ));
    }
    if raw.upload.max_declares < 1 {
        return Err(ConfigError::new(
            "upload.max_declares",
            "must be at least 1 (one declare per recording)",
        ));
    }
    if raw.upload.max_bytes_per_sec < 0 {
        return Err(ConfigError::new(
            "upload.max_bytes_per_sec",
            "must be 0 (unlimited) or more",
        ));
    }
    let upload = UploadConfig {
        workers: raw.upload.workers as usize,
        max_attempts: raw.upload.max_attempts.min(u32::MAX as i64) as u32,
        max_declares: raw.upload.max_declares.min(u32::MAX as i64) as u32,
        max_age: parse_duration("upload.max_age", &raw.upload.max_age)?,
        backoff_initial: parse_duration("upload.backoff_initial", &raw.upload.backoff_initial)?,
        backoff_max: parse_duration("upload.backoff_max", &raw.upload.backoff_max)?,
        max_bytes_per_sec: raw.upload.max_bytes_per_sec as u64,
        shutdown_grace: parse_duration("upload.shutdown_grace", &raw.upload.shutdown_grace)?,
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

    // [after_upload]
    let action = match raw.after_upload.action.trim() {
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
    let move_to = match raw.after_upload.move_to.trim() {
        "" => None,
        p => Some(PathBuf::from(p)),
    };
    if action == AfterUploadAction::Move {
        let Some(dest) = &move_to else {
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
        // A destination inside a watched folder would make every moved file a new version,
        // uploaded again.
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
    }
    let when = match raw.after_upload.when.as_deref().map(str::trim) {
        None | Some("") => {
            if raw.results.enabled {
                AfterUploadWhen::Processed
            } else {
                AfterUploadWhen::Uploaded
            }
        }
        Some("uploaded") => AfterUploadWhen::Uploaded,
        Some("processed") if raw.results.enabled => AfterUploadWhen::Processed,
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
    let after_upload = AfterUploadConfig {
        action,
        move_to,
        when,
    };

    // [results]
    let known_kinds = ["transcript", "punctuated", "ai"];
    for k in &raw.results.kinds {
        if !known_kinds.contains(&k.as_str()) {
            return Err(ConfigError::new(
                "results.kinds",
                format!("{k:?} is not one of {}", known_kinds.join(", ")),
            ));
        }
    }
    if !(raw.results.max_requests_per_sec > 0.0 && raw.results.max_requests_per_sec.is_finite()) {
        return Err(ConfigError::new(
            "results.max_requests_per_sec",
            "must be a number greater than 0",
        ));
    }
    let format = match raw.results.format.trim() {
        "json" => ResultsFormat::Json,
        "text" => ResultsFormat::Text,
        other => {
            return Err(ConfigError::new(
                "results.format",
                format!("{other:?} is not one of json, text"),
            ));
        }
    };
    if raw.results.max_bytes < 1 {
        return Err(ConfigError::new(
            "results.max_bytes",
            "must be a number of bytes greater than 0 (default 268435456, 256 MiB)",
        ));
    }
    let results = ResultsConfig {
        enabled: raw.results.enabled,
        output_dir: non_empty_path("results.output_dir", &raw.results.output_dir)?,
        kinds: raw.results.kinds,
        poll_interval: parse_duration("results.poll_interval", &raw.results.poll_interval)?,
        max_wait: parse_duration("results.max_wait", &raw.results.max_wait)?,
        max_requests_per_sec: raw.results.max_requests_per_sec,
        format,
        max_bytes: raw.results.max_bytes as u64,
    };
    if results.enabled && results.poll_interval.is_zero() {
        return Err(ConfigError::new(
            "results.poll_interval",
            "must be greater than 0",
        ));
    }

    // [metrics]
    let listen = match raw.metrics.listen.trim() {
        "" => None,
        s => Some(s.parse::<SocketAddr>().map_err(|e| {
            ConfigError::new(
                "metrics.listen",
                format!("{s:?} is not an address like \"127.0.0.1:9184\": {e}"),
            )
        })?),
    };

    // [log]
    let format = match raw.log.format.trim() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::new(
                "log.format",
                format!("{other:?} is not one of text, json"),
            ));
        }
    };
    check_log_filter("log.level", &raw.log.level)?;

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
        metrics: MetricsConfig {
            listen,
            unhealthy_after: parse_duration(
                "metrics.unhealthy_after",
                &raw.metrics.unhealthy_after,
            )?,
        },
        log: LogConfig {
            format,
            level: raw.log.level,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MINIMAL: &str = r#"
        [api]
        token = "t0k3n"
        [watch]
        paths = ["/tmp/rec"]
    "#;

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = from_toml_str(MINIMAL, &env(&[]), "test").unwrap();
        assert_eq!(c.api.base_url.as_str(), "https://api.elevateai.com/v1");
        assert_eq!(c.watch.settle, Duration::from_secs(5));
        assert_eq!(c.upload.workers, 4);
        assert_eq!(c.upload.max_attempts, 12);
        assert_eq!(c.upload.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(
            c.queue.database,
            PathBuf::from("/var/lib/callferry/queue.db")
        );
        assert_eq!(c.after_upload.action, AfterUploadAction::Keep);
        assert!(c.watch.extensions.contains(&"wav".to_string()));
    }

    #[test]
    fn unknown_key_is_named_with_its_section_and_a_suggestion() {
        let text = format!("{MINIMAL}\nsetle = \"3s\"\n");
        let err = from_toml_str(&text, &env(&[]), "test").unwrap_err();
        assert_eq!(err.key, "watch.setle");
        assert!(err.message.contains("did you mean `settle`"), "{err}");
    }

    #[test]
    fn unknown_section_is_named() {
        let text = format!("{MINIMAL}\n[uplod]\nworkers = 2\n");
        let err = from_toml_str(&text, &env(&[]), "test").unwrap_err();
        assert_eq!(err.key, "uplod");
        assert!(err.message.contains("did you mean `upload`"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = format!("{MINIMAL}\nsettle = \"5 parsecs\"\n");
        let err = from_toml_str(&text, &env(&[]), "test").unwrap_err();
        assert_eq!(err.key, "watch.settle");
    }

    #[test]
    fn missing_token_and_paths_are_reported() {
        let err = from_toml_str("[watch]\npaths=[\"/x\"]\n", &env(&[]), "t").unwrap_err();
        assert_eq!(err.key, "api.token");
        let err = from_toml_str("[api]\ntoken=\"x\"\n", &env(&[]), "t").unwrap_err();
        assert_eq!(err.key, "watch.paths");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = from_toml_str(
            MINIMAL,
            &env(&[
                ("CALLFERRY_UPLOAD__WORKERS", "9"),
                ("CALLFERRY_API__TOKEN", "12345"),
                ("CALLFERRY_WATCH__PATHS", "/a,/b"),
                ("CALLFERRY_RESULTS__ENABLED", "true"),
                ("CALLFERRY_CONFIG", "/etc/other.toml"),
            ]),
            "t",
        )
        .unwrap();
        assert_eq!(c.upload.workers, 9);
        assert_eq!(
            c.watch.paths,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert!(c.results.enabled);
        match c.api.token {
            TokenSource::Inline(s) => assert_eq!(s.expose(), "12345"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_env_key_is_an_error_too() {
        let err =
            from_toml_str(MINIMAL, &env(&[("CALLFERRY_UPLOAD__WORKRES", "2")]), "t").unwrap_err();
        assert_eq!(err.key, "upload.workres");
    }

    #[test]
    fn plain_http_is_refused_unless_loopback_or_allowed() {
        let t = |url: &str, allow: bool| {
            from_toml_str(
                &format!(
                    "[api]\ntoken=\"x\"\nbase_url=\"{url}\"\nallow_insecure_http={allow}\n[watch]\npaths=[\"/x\"]\n"
                ),
                &env(&[]),
                "t",
            )
        };
        assert!(t("http://127.0.0.1:8080/v1", false).is_ok());
        assert!(t("http://localhost:8080/v1", false).is_ok());
        assert!(t("http://[::1]:8080/v1", false).is_ok());
        assert_eq!(
            t("http://example.com/v1", false).unwrap_err().key,
            "api.base_url"
        );
        assert!(t("http://example.com/v1", true).is_ok());
        assert_eq!(
            t("ftp://example.com/v1", true).unwrap_err().key,
            "api.base_url"
        );
    }

    #[test]
    fn debug_output_never_contains_the_token() {
        let c = from_toml_str(MINIMAL, &env(&[]), "t").unwrap();
        assert!(!format!("{c:?}").contains("t0k3n"));
    }

    #[test]
    fn broken_toml_is_reported_as_such() {
        let err = from_toml_str("[api\ntoken=", &env(&[]), "my.toml").unwrap_err();
        assert_eq!(err.key, "my.toml");
        assert!(err.message.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn broken_toml_is_located_without_quoting_the_token() {
        let err = from_toml_str("[api]\ntoken = \"s3cr3t\" x\n", &env(&[]), "my.toml").unwrap_err();
        assert!(err.message.contains("line 2, column 18"), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn move_into_a_watched_folder_is_refused() {
        let text =
            format!("{MINIMAL}\n[after_upload]\naction=\"move\"\nmove_to=\"/tmp/rec/done\"\n");
        let err = from_toml_str(&text, &env(&[]), "t").unwrap_err();
        assert_eq!(err.key, "after_upload.move_to");
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_spells_out_the_defaults() {
        let text = include_str!("../config/callferry.toml");
        let c = from_toml_str(text, &env(&[]), "config/callferry.toml").unwrap();
        let d = from_toml_str(MINIMAL, &env(&[]), "t").unwrap();
        assert_eq!(c.watch.settle, d.watch.settle);
        assert_eq!(c.upload.workers, d.upload.workers);
        assert_eq!(c.watch.extensions, d.watch.extensions);
        assert_eq!(c.watch.ignore, d.watch.ignore);
        assert_eq!(c.results.kinds, d.results.kinds);
        assert_eq!(c.queue.database, d.queue.database);
        assert!(matches!(c.api.token, TokenSource::File(_)));
        // Every known key appears in the example.
        for (section, keys) in KNOWN_KEYS {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing from the example"
            );
            for k in *keys {
                assert!(
                    text.contains(&format!("{k} =")),
                    "{section}.{k} missing from the example"
                );
            }
        }
    }

    #[test]
    fn a_systemd_credential_is_the_token_when_none_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-credential\n").unwrap();
        let creds = dir.path().to_string_lossy().into_owned();
        let only_paths = "[watch]\npaths=[\"/x\"]\n";
        let c = from_toml_str(only_paths, &env(&[("CREDENTIALS_DIRECTORY", &creds)]), "t").unwrap();
        match &c.api.token {
            TokenSource::File(p) => assert_eq!(p, &dir.path().join("token")),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(c.api.token.load().unwrap().expose(), "from-credential");
        // A token the configuration names wins.
        let c = from_toml_str(MINIMAL, &env(&[("CREDENTIALS_DIRECTORY", &creds)]), "t").unwrap();
        assert!(matches!(c.api.token, TokenSource::Inline(_)));
        // No credential file there: still the usual error naming api.token.
        let empty = tempfile::tempdir().unwrap();
        let e = from_toml_str(
            only_paths,
            &env(&[("CREDENTIALS_DIRECTORY", &empty.path().to_string_lossy())]),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "api.token");
    }

    #[test]
    fn empty_token_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  \n").unwrap();
        let err = TokenSource::File(f.clone()).load().unwrap_err();
        assert_eq!(err.key, "api.token_file");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(TokenSource::File(f).load().unwrap().expose(), "abc");
    }

    #[test]
    fn a_mistyped_log_level_is_refused_with_a_suggestion() {
        for (typo, meant) in [("warning", "warn"), ("inof", "info"), ("debugg", "debug")] {
            let text = format!("{MINIMAL}\n[log]\nlevel = \"{typo}\"\n");
            let e = from_toml_str(&text, &env(&[]), "t").unwrap_err();
            assert_eq!(e.key, "log.level");
            assert!(
                e.message.contains(&format!("did you mean `{meant}`")),
                "{typo}: {e}"
            );
        }
        for bad in ["", " , ", "callferry=loud", "nonsense"] {
            assert!(check_log_filter("RUST_LOG", bad).is_err(), "{bad:?}");
        }
        for good in [
            "info",
            "WARN",
            "off",
            "callferry=debug,warn",
            "callferry::worker=trace",
            "h2[stream{id=1}]=debug,info",
        ] {
            check_log_filter("RUST_LOG", good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }

    #[test]
    fn intervals_that_pace_requests_have_floors() {
        for (section, key, value) in [
            ("api", "pause_recheck", "0s"),
            ("api", "pause_recheck", "99ms"),
            ("api", "stall_timeout", "1ms"),
            ("upload", "backoff_initial", "1ns"),
            ("upload", "backoff_max", "50ms"),
            ("results", "poll_interval", "1ms"),
            ("watch", "poll_interval", "1ms"),
            ("watch", "rescan_interval", "10ms"),
        ] {
            let var = format!(
                "CALLFERRY_{}__{}",
                section.to_uppercase(),
                key.to_uppercase()
            );
            let vars = [("CALLFERRY_UPLOAD__BACKOFF_INITIAL", "10ms"), (&var, value)];
            let e = from_toml_str(MINIMAL, &env(&vars), "t").unwrap_err();
            assert_eq!(e.key, format!("{section}.{key}"), "{e}");
            assert!(e.message.contains("below the floor"), "{e}");
        }
        // Off is off, and the floors themselves are accepted.
        let ok = env(&[
            ("CALLFERRY_WATCH__POLL_INTERVAL", "0s"),
            ("CALLFERRY_WATCH__RESCAN_INTERVAL", "0"),
            ("CALLFERRY_API__PAUSE_RECHECK", "100ms"),
            ("CALLFERRY_UPLOAD__BACKOFF_INITIAL", "10ms"),
            ("CALLFERRY_UPLOAD__BACKOFF_MAX", "100ms"),
        ]);
        from_toml_str(MINIMAL, &ok, "t").unwrap();
        let e = from_toml_str(
            MINIMAL,
            &env(&[("CALLFERRY_RESULTS__MAX_REQUESTS_PER_SEC", "100000")]),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "results.max_requests_per_sec");
    }
}
