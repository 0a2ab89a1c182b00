//! The sections about the recordings: `[watch]` (where they are found and when they are complete)
//! and `[after_upload]` (what becomes of them), with the check that spans the two: a move
//! destination must not be inside a watched folder.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSetBuilder};

use super::*;
use crate::config::raw::{RawAfterUpload, RawWatch};

pub(super) fn validate_watch(raw: RawWatch, has_sources: bool) -> Result<WatchConfig, ConfigError> {
    let paths: Vec<PathBuf> = raw
        .paths
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(PathBuf::from)
        .collect();
    if paths.is_empty() && !has_sources {
        return Err(ConfigError::new(
            "watch.paths",
            "is required: list the folder(s) your recorder writes to, e.g. paths = [\"/var/spool/asterisk/monitor\"]",
        ));
    }
    if let Some(p) = paths.iter().find(|p| !p.is_absolute()) {
        return Err(ConfigError::new(
            "watch.paths",
            format!("{} is not an absolute path", p.display()),
        ));
    }
    let extensions: Vec<String> = raw
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
    for g in &raw.ignore {
        let glob = Glob::new(g)
            .map_err(|e| ConfigError::new("watch.ignore", format!("invalid glob {g:?}: {e}")))?;
        builder.add(glob);
    }
    let ignore_set = builder
        .build()
        .map_err(|e| ConfigError::new("watch.ignore", e.to_string()))?;
    Ok(WatchConfig {
        paths,
        recursive: raw.recursive,
        extensions,
        ignore: raw.ignore,
        ignore_set,
        settle: parse_duration("watch.settle", &raw.settle)?,
        orphan_grace: parse_duration("watch.orphan_grace", &raw.orphan_grace)?,
        poll_interval: parse_duration("watch.poll_interval", &raw.poll_interval)?,
        rescan_interval: parse_duration("watch.rescan_interval", &raw.rescan_interval)?,
        naming: crate::calls::naming::Naming::parse(&raw.naming)
            .map_err(|e| ConfigError::new("watch.naming", e.to_string()))?,
        sidecar_wait: parse_duration("watch.sidecar_wait", &raw.sidecar_wait)?,
        hook_dir: match raw.hook_dir.trim() {
            "" => None,
            d if !Path::new(d).is_absolute() => {
                return Err(ConfigError::new(
                    "watch.hook_dir",
                    format!("{d} is not an absolute path (\"\" turns the hook off)"),
                ));
            }
            d => Some(PathBuf::from(d)),
        },
    })
}

pub(super) fn validate_after_upload(
    raw: RawAfterUpload,
    watch: &WatchConfig,
    results_enabled: bool,
) -> Result<AfterUploadConfig, ConfigError> {
    let action = match raw.action.trim() {
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
    let move_to = match raw.move_to.trim() {
        "" => None,
        p => Some(PathBuf::from(p)),
    };
    if action == AfterUploadAction::Move {
        check_move_to(move_to.as_deref(), watch)?;
    }
    let when = match raw.when.as_deref().map(str::trim) {
        None | Some("") if results_enabled => AfterUploadWhen::Processed,
        None | Some("") => AfterUploadWhen::Uploaded,
        Some("uploaded") => AfterUploadWhen::Uploaded,
        Some("processed") if results_enabled => AfterUploadWhen::Processed,
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
    Ok(AfterUploadConfig {
        action,
        move_to,
        when,
    })
}

pub(super) fn check_move_to(
    move_to: Option<&Path>,
    watch: &WatchConfig,
) -> Result<(), ConfigError> {
    let Some(dest) = move_to else {
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
    // A destination inside a watched folder would make every moved file a new version, uploaded
    // again.
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
    Ok(())
}
