use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;

fn job(path: &str, root: &str) -> Job {
    Job {
        id: 1,
        path: path.into(),
        root: root.into(),
        size: 1,
        mtime_ns: 1,
        dev: 1,
        ino: 1,
        state: crate::queue::State::Uploaded,
        attempts: 0,
        next_attempt_at: 0,
        interaction_id: Some("x".into()),
        upload_status: Some(201),
        last_error: None,
        created_at: 0,
        updated_at: 0,
        uploaded_at: Some(0),
        follow_at: Some(0),
        follow_attempts: 0,
        service_status: None,
        results_written: vec![],
        orphans: 0,
        external_id: None,
        source: None,
        hook: None,
        held_by: None,
    }
}

#[test]
fn result_paths_mirror_the_recording_tree() {
    let j = job("/rec/2026/11/25/call.wav", "/rec");
    assert_eq!(
        result_path(Path::new("/out"), &j, "transcript"),
        PathBuf::from("/out/2026/11/25/call.wav.transcript.json")
    );
    assert_eq!(
        result_path(Path::new("/out"), &j, "text"),
        PathBuf::from("/out/2026/11/25/call.wav.txt")
    );
    // A later call at the same path: its interaction id keeps it apart from the first.
    assert_eq!(
        result_path_for(Path::new("/out"), &j, "transcript", true),
        PathBuf::from("/out/2026/11/25/call.wav.x.transcript.json")
    );
    assert_eq!(
        result_path_for(Path::new("/out"), &j, "text", true),
        PathBuf::from("/out/2026/11/25/call.wav.x.txt")
    );
    // Enqueued by hand outside any watched folder: by its name.
    let j = job("/elsewhere/x.wav", "/elsewhere/x.wav");
    assert_eq!(
        result_path(Path::new("/out"), &j, "ai"),
        PathBuf::from("/out/x.wav.ai.json")
    );
}

#[test]
fn text_transcript_has_one_line_per_turn() {
    let v = serde_json::json!({"sentenceSegments": [
        {"participant": "participantOne", "startTimeOffset": 0, "phrase": "Hello."},
        {"participant": "participantOne", "startTimeOffset": 900, "phrase": "How can I help?"},
        {"participant": "participantTwo", "startTimeOffset": 65_000, "phrase": "My bill."},
    ]});
    assert_eq!(
        render_text(&v),
        "[00:00:00] Speaker 1: Hello. How can I help?\n[00:01:05] Speaker 2: My bill.\n"
    );
}

#[test]
fn atomic_write_replaces_and_sets_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a/b/c.json");
    write_atomic(&p, b"one").unwrap();
    write_atomic(&p, b"two").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"two");
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left");
}
