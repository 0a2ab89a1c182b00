//! A request's format and the rules it must keep: the same in the hook (usage errors) and the
//! daemon (a refused request).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::queue::{decode_path, encode_path};

use super::{MAX_ID, MAX_KEY, MAX_PAIRS, MAX_VALUE};

/// Sections of a dotted key (`agent.extension` has two).
const MAX_DEPTH: usize = 4;

/// A rule a request breaks: the hook says it as a usage error (exit 2), the daemon as the reason
/// it refused the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request version {0} is not known to this daemon (1 is); update callferry")]
    Version(u32),
    #[error("the path {} is not absolute", .0.display())]
    NotAbsolute(PathBuf),
    #[error("the path is longer than PATH_MAX")]
    PathTooLong,
    #[error("the path {} contains `..`", .0.display())]
    ParentDir(PathBuf),
    #[error("{what} is {len} bytes, more than {max}")]
    TooLong {
        what: String,
        len: usize,
        max: usize,
    },
    #[error("{what} contains a control character (U+{code:04X})")]
    ControlCharacter { what: String, code: u32 },
    #[error("the external id is empty")]
    EmptyExternalId,
    #[error("{0} meta pairs, more than {MAX_PAIRS}")]
    TooManyPairs(usize),
    #[error("meta key {key:?} is {len} bytes, more than {MAX_KEY}")]
    KeyTooLong { key: String, len: usize },
    #[error(
        "meta key {0:?} must be letters, digits, '_' and '-', in at most {MAX_DEPTH} sections \
         joined by dots (e.g. caller, agent.extension)"
    )]
    BadKey(String),
    #[error("meta key {key}: {section} is given a value of its own")]
    SectionHasValue { key: String, section: String },
    #[error("meta key {0} is also a section of other keys")]
    KeyIsSection(String),
}

/// Why a `--urlencoded` value does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0:?}: '%' must be followed by two hex digits")]
    BadEscape(String),
    #[error("{0:?} does not decode to UTF-8")]
    NotUtf8(String),
}

/// One request, as the hook writes it and the daemon reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Always 1 for now; a daemon refuses a version it does not know.
    pub version: u32,
    /// The recording, absolute, stored as the queue stores paths (lossless text, `queue::paths`).
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// `--meta` pairs; a dotted key is a section (`agent.extension` → `{"agent":{"extension":…}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

/// What the hook says about a call, as kept on its job (the `hook` column) until its declare.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HookCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

/// Applies the hook's call to a declare built from the name and sidecar: its id always, its
/// metadata only with `[declare] send_metadata` (like the rest). The hook wins over the name and
/// the sidecar: it is the recorder's own word about this call, given as the call ends. Metadata
/// is merged section by section, so `--meta agent.name=…` keeps the name's `agent.extension`.
pub fn apply_to_declare(h: &HookCall, req: &mut crate::api::DeclareRequest, send_metadata: bool) {
    if let Some(id) = &h.external_id {
        req.external_identifier = Some(id.clone());
    }
    if send_metadata && !h.metadata.is_empty() {
        merge(req.metadata.get_or_insert_with(Map::new), &h.metadata);
    }
}

fn merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), RequestError> {
    if s.len() > max {
        return Err(RequestError::TooLong {
            what: what.to_string(),
            len: s.len(),
            max,
        });
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(RequestError::ControlCharacter {
            what: what.to_string(),
            code: c as u32,
        });
    }
    Ok(())
}

/// A `--meta` key: sections of ASCII letters, digits, `_` and `-`, joined by dots.
pub fn check_key(k: &str) -> Result<(), RequestError> {
    let ok_section = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if k.len() > MAX_KEY {
        return Err(RequestError::KeyTooLong {
            key: k.to_string(),
            len: k.len(),
        });
    }
    let sections: Vec<&str> = k.split('.').collect();
    if !sections.iter().all(|s| ok_section(s)) || sections.len() > MAX_DEPTH {
        return Err(RequestError::BadKey(k.to_string()));
    }
    Ok(())
}

impl Request {
    pub fn new(path: &Path, external_id: Option<String>, meta: BTreeMap<String, String>) -> Self {
        Request {
            version: 1,
            path: encode_path(path).into_owned(),
            external_id,
            meta,
        }
    }

    /// The recording's path, byte for byte.
    pub fn path(&self) -> PathBuf {
        decode_path(&self.path)
    }

    /// Every rule a request must keep, the same in the hook (usage errors) and the daemon.
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.version != 1 {
            return Err(RequestError::Version(self.version));
        }
        let path = self.path();
        if !path.is_absolute() {
            return Err(RequestError::NotAbsolute(path));
        }
        if path.as_os_str().len() > libc::PATH_MAX as usize {
            return Err(RequestError::PathTooLong);
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(RequestError::ParentDir(path));
        }
        if let Some(id) = &self.external_id {
            check_text("the external id", id, MAX_ID)?;
            if id.trim().is_empty() {
                return Err(RequestError::EmptyExternalId);
            }
        }
        if self.meta.len() > MAX_PAIRS {
            return Err(RequestError::TooManyPairs(self.meta.len()));
        }
        for (k, v) in &self.meta {
            check_key(k)?;
            check_text(&format!("the value of meta key {k}"), v, MAX_VALUE)?;
        }
        self.metadata().map(|_| ())
    }

    /// The `--meta` pairs in ElevateAI's shape: dotted keys become sections.
    pub fn metadata(&self) -> Result<Map<String, Value>, RequestError> {
        let mut m = Map::new();
        // Sorted: a key comes before its own sections ("agent" < "agent.id").
        for (key, value) in &self.meta {
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            let mut at = &mut m;
            for p in parts {
                let slot = at
                    .entry(p.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                at = slot
                    .as_object_mut()
                    .ok_or_else(|| RequestError::SectionHasValue {
                        key: key.clone(),
                        section: p.to_string(),
                    })?;
            }
            if at.get(last).is_some_and(Value::is_object) {
                return Err(RequestError::KeyIsSection(key.clone()));
            }
            at.insert(last.to_string(), Value::String(value.clone()));
        }
        Ok(m)
    }

    pub fn call(&self) -> HookCall {
        HookCall {
            external_id: self.external_id.clone(),
            metadata: self.metadata().unwrap_or_default(),
        }
    }
}

/// Decodes `%XX` escapes (`--urlencoded`): what FreeSWITCH's `url_encode` and Asterisk's
/// `URIENCODE` give, so a value with spaces (or nothing) stays one argument where a hook splits
/// its arguments on spaces (FreeSWITCH's `luarun`). Both leave `$`, `(` and `'` as they are: not a
/// shell's quoting. `+` stays `+` (phone numbers).
pub fn percent_decode(s: &str) -> Result<String, DecodeError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DecodeError::BadEscape(s.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8(s.to_string()))
}
