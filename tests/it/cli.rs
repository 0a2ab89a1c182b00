//! The user-facing contract, checked through the binary: exit codes, messages, JSON shapes.

use std::process::Command;

use crate::helpers::*;

fn callferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_callferry"));
    c.env_remove("CALLFERRY_CONFIG").env_remove("RUST_LOG");
    c
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("callferry.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn unknown_config_key_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        "http://127.0.0.1:9/v1",
        dir.path(),
        "[upload]\nworkerz = 3\n",
    );
    let cfg = write_config(dir.path(), &text);
    let out = callferry()
        .args(["--config"])
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upload.workerz"), "{err}");
    assert!(err.contains("did you mean `workers`"), "{err}");
}

#[test]
fn broken_missing_and_tokenless_configs_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let out = callferry()
        .args(["--config", "/nonexistent/callferry.toml", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));

    let cfg = write_config(dir.path(), "[api\nbase_url = ");
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML"));

    let text = config_text("http://127.0.0.1:9/v1", dir.path(), "")
        .replace(&format!("token = \"{TOKEN}\""), "");
    let cfg = write_config(dir.path(), &text);
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.token"));

    // An empty token file is caught when the daemon starts.
    let tf = dir.path().join("token");
    std::fs::write(&tf, "\n").unwrap();
    let text = config_text("http://127.0.0.1:9/v1", dir.path(), "").replace(
        &format!("token = \"{TOKEN}\""),
        &format!("token_file = \"{}\"", tf.display()),
    );
    let cfg = write_config(dir.path(), &text);
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
}

#[test]
fn usage_errors_exit_2() {
    let out = callferry().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = callferry().arg("retry").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "retry needs ids or --failed");
}

#[test]
fn a_foreign_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("http://127.0.0.1:9/v1", dir.path(), "");
    let cfg = write_config(dir.path(), &text);
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let db = dir.path().join("state/queue.db");
    std::fs::write(&db, b"definitely not sqlite").unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SQLite database"));
    assert_eq!(std::fs::read(&db).unwrap(), b"definitely not sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_list_and_enqueue_work_on_the_database() {
    let mut app = TestApp::start("").await;
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    app.wait_state(&pa, "uploaded").await;
    let cfg_path = write_config(
        app.dir.path(),
        &config_text(&app.fake.base_url(), app.dir.path(), ""),
    );

    // status --json while the daemon runs
    let out = callferry()
        .arg("--config")
        .arg(&cfg_path)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "pending",
        "declared",
        "uploading",
        "uploaded",
        "processed",
        "failed",
    ] {
        assert!(v["counts"][k].is_u64(), "counts.{k} in {v}");
    }
    assert_eq!(v["counts"]["uploaded"], 1);
    assert_eq!(v["paused"], false);
    assert!(v["pause_reason"].is_null());
    assert!(v["oldest_pending_age_s"].is_null());
    assert_eq!(v["daemon_running"], true);

    // enqueue by hand: a backfill file outside the watched folder, and one that is not audio
    let backfill = app.dir.path().join("backfill");
    std::fs::create_dir_all(&backfill).unwrap();
    let b = wav(1.2);
    let pb = backfill.join("old-call.wav");
    std::fs::write(&pb, &b).unwrap();
    filetime_past(&pb);
    std::fs::write(backfill.join("readme.txt"), "x").unwrap();
    let out = callferry()
        .arg("--config")
        .arg(&cfg_path)
        .arg("enqueue")
        .arg(&pb)
        .arg(backfill.join("readme.txt"))
        .arg(backfill.join("missing.wav"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("queued"), "{stdout}");
    assert!(stderr.contains("extension is not one of"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "some files could not be queued");
    let job = app.wait_state(&pb, "uploaded").await;
    app.assert_uploaded_once(&job, &b);

    // list --json
    let out = callferry()
        .arg("--config")
        .arg(&cfg_path)
        .args(["list", "--json", "--limit", "10"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for k in [
        "id",
        "path",
        "state",
        "attempts",
        "interaction_id",
        "last_error",
    ] {
        assert!(rows[0].get(k).is_some(), "{k} in {}", rows[0]);
    }
    assert_eq!(rows[0]["state"], "uploaded");
    let out = callferry()
        .arg("--config")
        .arg(&cfg_path)
        .args(["list", "--state", "bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    app.stop().await;
    let out = callferry()
        .arg("--config")
        .arg(&cfg_path)
        .args(["status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not running"), "{text}");
    assert!(text.contains("last hour   2 uploaded"), "{text}");
}

/// Backdates a file's mtime so it counts as long finished.
fn filetime_past(p: &std::path::Path) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    f.set_modified(t).unwrap();
}
