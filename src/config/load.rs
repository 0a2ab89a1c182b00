//! Loading: where the configuration comes from (defaults ← TOML file ← `CALLFERRY_<SECTION>__<KEY>`
//! environment ← systemd's token credential) and the errors of that stage: a file that cannot be
//! read, broken TOML, an unknown key with a "did you mean". Checking the values is
//! [`super::validate`]'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::raw::{KNOWN_KEYS, Raw};
use super::suggest::suggest;
use super::{
    CONFIG_ENV, CREDENTIALS_ENV, Config, ConfigError, DEFAULT_CONFIG_PATH, TOKEN_CREDENTIAL,
};

const ENV_PREFIX: &str = "CALLFERRY_";

/// Keys whose value is a list: set from the environment they arrive as one string, `"a,b,c"`.
const LIST_KEYS: &[(&str, &str)] = &[
    ("watch", "paths"),
    ("watch", "extensions"),
    ("watch", "ignore"),
    ("results", "kinds"),
];

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
    let file = toml::from_str::<toml::Table>(text).map_err(|e| {
        ConfigError::new(
            origin,
            format!("not valid TOML: {}", describe_toml_error(text, &e)),
        )
    })?;
    super::sources::check_env(env)?;
    let mut value = merge_layers(text, env, origin)?;
    split_env_lists(&mut value);
    // `[[source]]` tables are read from the file itself (see `sources`).
    if let Some(top) = value.as_object_mut() {
        top.remove("source");
    }
    check_known_keys(&value)?;
    let mut raw: Raw = serde_path_to_error::deserialize(&value).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::new(key, e.into_inner().to_string())
    })?;
    use_token_credential(&mut raw, env);
    let naming = crate::calls::naming::Naming::parse(&raw.watch.naming)
        .map_err(|e| ConfigError::new("watch.naming", e.to_string()))?;
    let declare = value.get("declare").cloned().unwrap_or_default();
    let sources = super::sources::read(&file, &declare, &naming)?;
    super::validate(raw, sources)
}

/// The file with the environment laid over it, as one JSON value.
fn merge_layers(
    text: &str,
    env: &BTreeMap<String, String>,
    origin: &str,
) -> Result<serde_json::Value, ConfigError> {
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
    merged
        .try_deserialize()
        .map_err(|e| ConfigError::new(origin, e.to_string()))
}

/// A list set from the environment arrives as one string: "a,b,c".
fn split_env_lists(value: &mut serde_json::Value) {
    for (section, key) in LIST_KEYS {
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
}

/// Under systemd the token may come as a credential (`LoadCredential=token:...`): used when the
/// configuration names no token of its own.
fn use_token_credential(raw: &mut Raw, env: &BTreeMap<String, String>) {
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
}

/// Names an unknown key exactly (`watch.setle`), with a suggestion, instead of serde's generic
/// "unknown field" that does not say in which section.
fn check_known_keys(value: &serde_json::Value) -> Result<(), ConfigError> {
    let Some(top) = value.as_object() else {
        return Err(ConfigError::new("config", "the top level must be a table"));
    };
    for (section, body) in top {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(s, _)| s == section) else {
            let mut all: Vec<&str> = KNOWN_KEYS.iter().map(|(s, _)| *s).collect();
            all.push("source");
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
