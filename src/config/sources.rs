//! `[[source]]` tables: folders with settings of their own (declare overrides, naming, another
//! ElevateAI account). Read straight from the TOML file, not through the environment layer: an
//! array of tables has no sensible `CALLFERRY_<SECTION>__<KEY>` spelling, so a `CALLFERRY_SOURCE__…`
//! variable is refused rather than half-applied.
//!
//! The top-level `[watch] paths` are the source named [`DEFAULT_SOURCE`]. Every error names its
//! key as `source[N].key` (N counts from 0, in the file's order).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::raw::{KNOWN_KEYS, RawDeclare};
use super::{ConfigError, DeclareConfig, SourceConfig, TokenSource};
use crate::secret::Secret;

/// The name of the source made of the top-level `[watch] paths`, and the `[api]` token's account.
pub const DEFAULT_SOURCE: &str = "default";

/// Longest source name: it is a metric label and a column in `status`.
const MAX_NAME: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    name: String,
    #[serde(default)]
    paths: Vec<String>,
    token: Option<String>,
    token_file: Option<String>,
    naming: Option<String>,
    /// Checked against `[declare]`'s keys, then laid over the top-level `[declare]`.
    declare: Option<serde_json::Map<String, serde_json::Value>>,
}

const SOURCE_KEYS: &[&str] = &["name", "paths", "token", "token_file", "naming", "declare"];

/// Refuses source settings from the environment (see the module's doc).
pub(super) fn check_env(env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    if let Some(k) = env.keys().find(|k| k.starts_with("CALLFERRY_SOURCE__")) {
        return Err(ConfigError::new(
            k.clone(),
            "[[source]] tables cannot be set from the environment; write them in the config file",
        ));
    }
    Ok(())
}

/// The `[[source]]` tables of `file` (the parsed TOML), each with its `[declare]` overrides laid
/// over `declare` (the top-level `[declare]` after the environment, as JSON).
pub(super) fn read(
    file: &toml::Table,
    declare: &serde_json::Value,
    naming: &crate::calls::naming::Naming,
) -> Result<Vec<SourceConfig>, ConfigError> {
    let Some(list) = file.get("source") else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(ConfigError::new(
            "source",
            "must be an array of tables: write each source as [[source]] (two brackets)",
        ));
    };
    let mut out: Vec<SourceConfig> = Vec::new();
    for (n, item) in list.iter().enumerate() {
        let s = one(n, item, declare, naming)?;
        if let Some(prev) = out.iter().position(|o| o.name == s.name) {
            return Err(ConfigError::new(
                format!("source[{n}].name"),
                format!(
                    "{:?} is already the name of source[{prev}]; each source needs its own name",
                    s.name
                ),
            ));
        }
        out.push(s);
    }
    Ok(out)
}

fn one(
    n: usize,
    item: &toml::Value,
    declare: &serde_json::Value,
    default_naming: &crate::calls::naming::Naming,
) -> Result<SourceConfig, ConfigError> {
    let at = |key: &str| format!("source[{n}].{key}");
    let Some(table) = item.as_table() else {
        return Err(ConfigError::new(format!("source[{n}]"), "must be a table"));
    };
    for key in table.keys() {
        if !SOURCE_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::new(
                at(key),
                format!(
                    "unknown key{}; [[source]] knows: {}",
                    super::suggest::suggest(key, SOURCE_KEYS),
                    SOURCE_KEYS.join(", ")
                ),
            ));
        }
    }
    let value = serde_json::to_value(table).map_err(|e| ConfigError::new(at(""), e.to_string()))?;
    let raw: RawSource = serde_path_to_error::deserialize(&value)
        .map_err(|e| ConfigError::new(at(&e.path().to_string()), e.into_inner().to_string()))?;
    let name = check_name(&raw.name, &at("name"))?;
    let paths: Vec<PathBuf> = raw
        .paths
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(PathBuf::from)
        .collect();
    if paths.is_empty() {
        return Err(ConfigError::new(
            at("paths"),
            "is required: the folder(s) this source's recordings are written to",
        ));
    }
    if let Some(p) = paths.iter().find(|p| !p.is_absolute()) {
        return Err(ConfigError::new(
            at("paths"),
            format!("{} is not an absolute path", p.display()),
        ));
    }
    let token = match (&raw.token, &raw.token_file) {
        (Some(t), _) if !t.trim().is_empty() => Some(TokenSource::Inline(Secret::new(t.trim()))),
        (Some(_), None) => return Err(ConfigError::new(at("token"), "is empty")),
        (_, Some(f)) if !f.trim().is_empty() => Some(TokenSource::File(PathBuf::from(f.trim()))),
        (_, Some(_)) => return Err(ConfigError::new(at("token_file"), "is empty")),
        (None, None) => None,
    };
    let naming = match &raw.naming {
        Some(s) => crate::calls::naming::Naming::parse(s)
            .map_err(|e| ConfigError::new(at("naming"), e.to_string()))?,
        None => default_naming.clone(),
    };
    Ok(SourceConfig {
        name,
        paths,
        token,
        naming,
        declare: merged_declare(n, declare, raw.declare.as_ref())?,
    })
}

/// `[source.declare]` over the top-level `[declare]`, checked as `[declare]` is.
fn merged_declare(
    n: usize,
    base: &serde_json::Value,
    over: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<DeclareConfig, ConfigError> {
    let keys: &[&str] = KNOWN_KEYS
        .iter()
        .find(|(s, _)| *s == "declare")
        .map(|(_, k)| *k)
        .unwrap_or(&[]);
    let mut merged = base.as_object().cloned().unwrap_or_default();
    for (k, v) in over.into_iter().flatten() {
        if !keys.contains(&k.as_str()) {
            return Err(ConfigError::new(
                format!("source[{n}].declare.{k}"),
                format!(
                    "unknown key{}; [source.declare] takes any [declare] key: {}",
                    super::suggest::suggest(k, keys),
                    keys.join(", ")
                ),
            ));
        }
        merged.insert(k.clone(), v.clone());
    }
    let rename = |key: String| match key.strip_prefix("declare.") {
        Some(rest) => format!("source[{n}].declare.{rest}"),
        None => format!("source[{n}].declare.{key}"),
    };
    let raw: RawDeclare = serde_path_to_error::deserialize(serde_json::Value::Object(merged))
        .map_err(|e| ConfigError::new(rename(e.path().to_string()), e.into_inner().to_string()))?;
    super::validate::validate_declare(raw).map_err(|e| ConfigError::new(rename(e.key), e.message))
}

/// A name that is safe as a metric label value and a column: letters, digits, `-`, `_`, `.`.
/// `key` is where the name was given (`source[N].name`).
fn check_name(name: &str, key: &str) -> Result<String, ConfigError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() {
        return Err(ConfigError::new(
            key,
            "is required: a short name shown in logs, `status`, `list` and metrics",
        ));
    }
    if name.len() > MAX_NAME || !name.chars().all(ok) {
        return Err(ConfigError::new(
            key,
            format!(
                "{name:?} is not a usable name: use up to {MAX_NAME} letters, digits, '-', '_' \
                 or '.'"
            ),
        ));
    }
    if name == DEFAULT_SOURCE {
        return Err(ConfigError::new(
            key,
            format!(
                "{DEFAULT_SOURCE:?} is the name of the [watch] paths' own source; choose another"
            ),
        ));
    }
    Ok(name.to_string())
}
