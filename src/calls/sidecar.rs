//! Sidecars: `<stem>.json` or `<stem>_metadata.json` beside a recording (a Genesys-style export, a
//! CRM hook, an SBC's SIPREC metadata turned into JSON), with a top-level `externalIdentifier`
//! (string) and/or `metadata` (object, ElevateAI's shape). What a sidecar says wins over the name.
//!
//! Read like a recording: below its watched folder, no link followed, regular files only, and at
//! most [`MAX_BYTES`], so a sidecar can neither leak a file from elsewhere nor exhaust memory.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub const MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sidecar {
    pub file: PathBuf,
    pub external_id: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

/// The names a recording's sidecar may have, in the order they are looked for.
pub fn candidates(recording: &Path) -> Vec<PathBuf> {
    let Some(stem) = recording.file_stem() else {
        return Vec::new();
    };
    ["", "_metadata"]
        .iter()
        .map(|suffix| {
            let mut name = stem.to_os_string();
            name.push(suffix);
            name.push(".json");
            recording.with_file_name(name)
        })
        .collect()
}

/// A sidecar that is there but cannot be used; the recording goes without it. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("sidecar {}: cannot open it: {source}", file.display())]
    Open {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("sidecar {}: cannot read it: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("sidecar {}: larger than {MAX_BYTES} bytes; ignored", file.display())]
    TooLarge { file: PathBuf },
    #[error("sidecar {}: {why}; ignored", file.display())]
    Invalid { file: PathBuf, why: Invalid },
}

/// Why a sidecar's bytes are not a sidecar.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("not valid JSON ({0})")]
    Json(#[from] serde_json::Error),
    /// Valid JSON of another shape.
    #[error("{0}")]
    Shape(&'static str),
}

/// The recording's sidecar: `Ok(None)` when there is none; `Err` when one is there but unusable.
/// Blocking: call it off the runtime thread.
pub fn read(root: &Path, recording: &Path) -> Result<Option<Sidecar>, SidecarError> {
    for file in candidates(recording) {
        let f = match crate::safefs::open_beneath(root, &file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SidecarError::Open { file, source }),
        };
        let mut bytes = Vec::new();
        f.take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| SidecarError::Read {
                file: file.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(SidecarError::TooLarge { file });
        }
        return match parse(&bytes) {
            Ok((external_id, metadata)) => Ok(Some(Sidecar {
                file,
                external_id,
                metadata,
            })),
            Err(why) => Err(SidecarError::Invalid { file, why }),
        };
    }
    Ok(None)
}

type Parsed = (Option<String>, Option<Map<String, Value>>);

/// The sidecar's two fields, or why it is not one.
fn parse(bytes: &[u8]) -> Result<Parsed, Invalid> {
    let v: Value = serde_json::from_slice(bytes)?;
    let shape = |why| Err(Invalid::Shape(why));
    let Value::Object(mut o) = v else {
        return shape("not a JSON object");
    };
    let external_id = match o.remove("externalIdentifier") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(_) => return shape("externalIdentifier must be a non-empty string"),
    };
    let metadata = match o.remove("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return shape("metadata must be an object"),
    };
    if external_id.is_none() && metadata.is_none() {
        return shape("has neither externalIdentifier nor metadata");
    }
    Ok((external_id, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_by_either_name_and_read_safely() {
        let d = tempfile::tempdir().unwrap();
        let rec = d.path().join("a.wav");
        std::fs::write(&rec, b"RIFF").unwrap();
        assert_eq!(read(d.path(), &rec).unwrap(), None);

        std::fs::write(
            d.path().join("a_metadata.json"),
            br#"{"externalIdentifier":"crm-42","metadata":{"agent":{"id":"7"}},"other":1}"#,
        )
        .unwrap();
        let s = read(d.path(), &rec).unwrap().unwrap();
        assert_eq!(s.external_id.as_deref(), Some("crm-42"));
        assert_eq!(s.metadata.unwrap()["agent"]["id"], "7");

        // `<stem>.json` first; a malformed one is an error naming it, not a silent fallback.
        std::fs::write(d.path().join("a.json"), b"{not json").unwrap();
        let err = read(d.path(), &rec).unwrap_err().to_string();
        assert!(
            err.contains("a.json") && err.contains("not valid JSON"),
            "{err}"
        );

        // A link to a file outside the tree is never read.
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.json");
        std::fs::write(&secret, br#"{"externalIdentifier":"SECRET"}"#).unwrap();
        std::fs::remove_file(d.path().join("a.json")).unwrap();
        std::os::unix::fs::symlink(&secret, d.path().join("a.json")).unwrap();
        let err = read(d.path(), &rec).unwrap_err().to_string();
        assert!(!err.contains("SECRET") && err.contains("a.json"), "{err}");

        for bad in [&b"[]"[..], br#"{"externalIdentifier":5}"#, br#"{"x":1}"#] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
