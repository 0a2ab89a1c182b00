//! Owns the configuration: where it is read from (defaults ← TOML file ← `CALLFERRY_<SECTION>__<KEY>`
//! environment), and its validation, once, into the typed [`Config`] the rest of the program uses.
//!
//! Every problem is reported as a [`ConfigError`] that names the offending key; the CLI turns it into
//! exit code 78 so systemd does not restart-loop on a typo. Nothing outside this module sees raw
//! configuration strings.
//!
//! - `typed`: the [`Config`] the daemon uses;
//! - `raw`: the file's shape, the defaults, and the known keys derived from it;
//! - `load`: files, environment, credential, unknown keys;
//! - `sources`: the `[[source]]` tables;
//! - `suggest`: the "did you mean" of every message about an unknown word;
//! - `validate`: one function per section (grouped by what the sections are about: the service,
//!   the recordings, the daemon), and the floors of the intervals that pace requests;
//! - `logfilter`: `[log] level` and `RUST_LOG`.

mod load;
mod logfilter;
mod raw;
mod sources;
mod suggest;
mod typed;
mod validate;

pub use load::{from_toml_str, load, read_regular_file, resolve_path};
pub use logfilter::check_log_filter;
pub use sources::DEFAULT_SOURCE;
pub use typed::*;

/// Where `callferry enqueue --now` drops its requests and the daemon looks for them, unless
/// `[watch] hook_dir`, `--hook-dir` or `CALLFERRY_HOOK_DIR` say otherwise.
pub const DEFAULT_HOOK_DIR: &str = "/var/spool/callferry/hook";
pub use validate::{FLOORS, MAX_RESULTS_REQUESTS_PER_SEC, MIN_LEASE, load_ca_file, parse_duration};

use validate::validate;

/// Default location of the config file (the interface contract).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/callferry/callferry.toml";
/// Environment variable that overrides the config file's location.
pub const CONFIG_ENV: &str = "CALLFERRY_CONFIG";
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

#[cfg(test)]
mod tests;
