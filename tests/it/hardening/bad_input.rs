//! Bad input and the after-upload paths: each case asserts the message the
//! operator sees and that nothing was lost.

use std::path::{Path, PathBuf};

use callferry::clock::now_ms;
use callferry::gate::Pause;
use callferry::queue::NewJob;

use super::proc::{Daemon, callferry, queue_when_ready, write_config};
use crate::helpers::*;

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_missing_at_start_or_removed_later_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let fake = callferry_fake::FakeApi::start(callferry_fake::FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = write_config(dir.path(), &fake.base_url(), "");
    let rec = dir.path().join("rec"); // not created yet
    let mut d = Daemon::spawn(&cfg, &dir.path().join("daemon.log"), &[]);
    d.wait_log("watched folder does not exist (yet) or is not a folder; waiting for it")
        .await;
    d.wait_log("callferry running").await;
    std::fs::create_dir_all(&rec).unwrap();
    let a = wav(0.5);
    std::fs::write(rec.join("a.wav"), &a).unwrap();
    let q = queue_when_ready(&dir.path().join("state/queue.db")).await;
    eventually("a.wav uploaded once the folder appeared", || async {
        q.counts().await.unwrap().uploaded == 1
    })
    .await;

    // Removed while running: a warning, no crash; back again: watched again.
    std::fs::remove_dir_all(&rec).unwrap();
    d.wait_log("watched folder disappeared; waiting for it to come back")
        .await;
    std::fs::create_dir_all(&rec).unwrap();
    let b = wav(0.7);
    std::fs::write(rec.join("b.wav"), &b).unwrap();
    eventually("b.wav uploaded after the folder came back", || async {
        q.counts().await.unwrap().uploaded == 2
    })
    .await;
    for (name, bytes) in [("a.wav", &a), ("b.wav", &b)] {
        let stored: Vec<_> = fake
            .interactions()
            .into_iter()
            .flat_map(|i| i.uploads)
            .filter(|u| u.stored && u.field_name == name)
            .collect();
        assert_eq!(stored.len(), 1, "{name}");
        assert_eq!(stored[0].sha256, sha256(bytes));
    }
    assert!(d.exited().is_none(), "still running");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    q.close().await;
}

#[tokio::test]
async fn a_foreign_or_corrupt_sqlite_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9/v1", "");
    let db = dir.path().join("state/queue.db");

    // Another program's SQLite database.
    {
        use sqlx::ConnectOptions;
        let mut c = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
            .execute(&mut c)
            .await
            .unwrap();
        use sqlx::Connection;
        c.close().await.unwrap();
    }
    // A callferry-looking file whose pages are garbage (a torn disk, a bad copy).
    let corrupt: Vec<u8> = b"SQLite format 3\0"
        .iter()
        .copied()
        .chain((0..8192u32).map(|i| (i * 7 % 251) as u8))
        .collect();

    for (what, bytes, expect) in [
        (
            "foreign",
            std::fs::read(&db).unwrap(),
            "callferry did not create; refusing to touch it",
        ),
        ("corrupt", corrupt, "refusing"),
    ] {
        std::fs::write(&db, &bytes).unwrap();
        for args in [&["run"][..], &["status"], &["retry", "--failed"]] {
            let out = callferry()
                .arg("--config")
                .arg(&cfg)
                .args(args)
                .output()
                .await
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{what} {args:?}: {err}");
            assert!(
                err.contains(&*db.to_string_lossy()),
                "names the file: {err}"
            );
            assert!(
                err.contains(expect) || (what == "corrupt" && err.contains("corrupt")),
                "{what} {args:?}: {err}"
            );
            assert_eq!(
                std::fs::read(&db).unwrap(),
                bytes,
                "{what}: never overwritten"
            );
            for side in ["-wal", "-shm", "-journal"] {
                let p = PathBuf::from(format!("{}{side}", db.display()));
                assert!(!p.exists(), "{what}: {} created", p.display());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_that_resolves_to_nothing_is_an_outage_that_loses_nothing() {
    let mut app = TestApp::start(
        "[api]\nbase_url = \"https://callferry-test.invalid/v1\"\nconnect_timeout = \"1s\"\n",
    )
    .await;
    let a = wav(0.5);
    let pa = app.drop_file("a.wav", &a);
    let reason = poll_for("the outage to be noticed", || async {
        match app.handle.gate.state().pause {
            Some(p @ Pause::Outage(_)) => Some(p.reason()),
            _ => None,
        }
    })
    .await;
    assert!(
        reason.contains("API unreachable") && reason.contains("callferry-test.invalid"),
        "{reason}"
    );
    eventually("a few outage rounds", || async {
        app.handle.gate.state().outage_failures >= 3
    })
    .await;
    let job = app.job_for(&pa).await.unwrap();
    assert_eq!(job.state.public().as_str(), "pending", "{job:?}");
    assert_eq!(job.attempts, 0, "an outage costs no attempts");
    assert!(job.last_error.unwrap().contains("cannot reach the API"));
    app.stop().await;

    // Fixed: the job was kept and goes up.
    app.extra_toml = String::new();
    app.restart().await;
    let job = app.wait_state(&pa, "uploaded").await;
    app.assert_uploaded_once(&job, &a);
    app.stop().await;
}

#[tokio::test]
async fn unreadable_config_and_token_files_exit_78_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    // A path that exists but cannot be read as a file. chmod 000 would not stop root (CI runs as
    // root), a directory stops everyone.
    let as_dir = dir.path().join("callferry.toml.d");
    std::fs::create_dir_all(&as_dir).unwrap();
    let out = callferry()
        .arg("--config")
        .arg(&as_dir)
        .arg("run")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("cannot read the config file"), "{err}");

    let token_dir = dir.path().join("token.d");
    std::fs::create_dir_all(&token_dir).unwrap();
    let text = config_text("http://127.0.0.1:9/v1", dir.path(), "").replace(
        &format!("token = \"{TOKEN}\""),
        &format!("token_file = \"{}\"", token_dir.display()),
    );
    let cfg = dir.path().join("callferry.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("cannot read token file"), "{err}");

    if is_root() {
        eprintln!("running as root: chmod 000 does not stop reads; the permission case is skipped");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_recording_fails_with_the_reason_and_is_not_lost() {
    if is_root() {
        eprintln!(
            "running as root: chmod 000 does not stop root from reading, so there is no unreadable \
             file to test with; skipped (it runs as any other user)"
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut app = TestApp::start("[upload]\nmax_attempts = 2\n").await;
    let a = wav(0.5);
    let pa = app.rec.join("locked.wav");
    std::fs::write(&pa, &a).unwrap();
    std::fs::set_permissions(&pa, std::fs::Permissions::from_mode(0o000)).unwrap();
    let job = app.wait_state(&pa, "failed").await;
    let err = job.last_error.unwrap();
    assert!(err.contains("Permission denied"), "{err}");
    // Fixed by the operator, then `callferry retry`: uploaded.
    std::fs::set_permissions(&pa, std::fs::Permissions::from_mode(0o644)).unwrap();
    open_queue(&app.db_path())
        .await
        .retry(None, now_ms())
        .await
        .unwrap();
    let job = app.wait_state(&pa, "uploaded").await;
    app.assert_uploaded_once(&job, &a);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_byte_file_waits_and_is_uploaded_once_it_has_content() {
    let mut app = TestApp::start("").await;
    // Asterisk creates the file empty and writes the call later.
    let p = app.rec.join("late.wav");
    std::fs::write(&p, b"").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
        .unwrap();
    let cfg = write_config(app.dir.path(), &app.fake.base_url(), "");
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("enqueue")
        .arg(&p)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("empty file (0 bytes)"), "{err}");
    let a = wav(0.6);
    std::fs::write(&p, &a).unwrap();
    let job = app.wait_state(&p, "uploaded").await;
    app.assert_uploaded_once(&job, &a);
    assert_eq!(
        app.jobs().await.len(),
        1,
        "the empty version was never queued"
    );
    app.stop().await;
}

/// Puts a file's job in the queue as `uploaded` but not tidied up: the state a crash between the
/// commit and the move/delete leaves.
async fn uploaded_not_disposed(app: &TestApp, path: &Path) -> i64 {
    let q = open_queue(&app.db_path()).await;
    let s = callferry::completeness::stat_of(&std::fs::metadata(path).unwrap());
    let id = match q
        .enqueue(
            &[NewJob {
                path: path.to_path_buf(),
                root: app.rec.clone(),
                size: s.size,
                mtime_ns: s.mtime_ns,
                dev: s.dev,
                ino: s.ino,
            }],
            now_ms(),
        )
        .await
        .unwrap()[0]
    {
        callferry::queue::Enqueued::New { id, .. } => id,
        ref other => panic!("{other:?}"),
    };
    let j = q.claim(now_ms()).await.unwrap().unwrap();
    assert_eq!(j.id, id);
    q.mark_declared(id, "0f0e0d0c-0000-4000-8000-000000000001", now_ms())
        .await
        .unwrap();
    q.mark_uploaded(id, 201, None, now_ms()).await.unwrap();
    q.close().await;
    id
}

/// The detail of a job's after-upload event, once there is one.
async fn after_upload_event(app: &TestApp, id: i64) -> Option<String> {
    app.handle
        .queue
        .events(id)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.1 == "after-upload")
        .and_then(|e| e.2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_upload_move_and_delete_are_redone_after_a_crash_and_are_idempotent() {
    let done = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&format!(
        "[after_upload]\naction = \"move\"\nmove_to = \"{}\"\n",
        done.path().display()
    ))
    .await;
    app.stop().await;
    // a.wav: the crash came before the move. b.wav: after the move, before it was recorded.
    let a = wav(0.5);
    let pa = app.rec.join("x/a.wav");
    std::fs::create_dir_all(pa.parent().unwrap()).unwrap();
    std::fs::write(&pa, &a).unwrap();
    let b = wav(0.6);
    let pb = app.rec.join("b.wav");
    std::fs::write(&pb, &b).unwrap();
    let ja = uploaded_not_disposed(&app, &pa).await;
    let jb = uploaded_not_disposed(&app, &pb).await;
    std::fs::rename(&pb, done.path().join("b.wav")).unwrap();

    app.restart().await;
    for (id, dest, bytes) in [
        (ja, done.path().join("x/a.wav"), &a),
        (jb, done.path().join("b.wav"), &b),
    ] {
        let ev = poll_for("the after-upload action recorded", || async {
            after_upload_event(&app, id).await
        })
        .await;
        assert_eq!(ev, format!("moved to {}", dest.display()));
        assert_eq!(std::fs::read(&dest).unwrap(), *bytes);
    }
    assert!(!pa.exists() && !pb.exists());
    assert_eq!(app.fake.counters().declares, 0, "nothing sent again");
    app.stop().await;

    // Delete, with the file already gone (deleted before the crash): done, not an error.
    app.extra_toml = "[after_upload]\naction = \"delete\"\n".into();
    let c = wav(0.4);
    let pc = app.rec.join("c.wav");
    std::fs::write(&pc, &c).unwrap();
    let pd = app.rec.join("d.wav");
    std::fs::write(&pd, wav(0.45)).unwrap();
    let jc = uploaded_not_disposed(&app, &pc).await;
    let jd = uploaded_not_disposed(&app, &pd).await;
    std::fs::remove_file(&pd).unwrap();
    app.restart().await;
    for (id, what) in [(jc, "deleted"), (jd, "deleted (already gone)")] {
        let ev = poll_for("the delete recorded", || async {
            after_upload_event(&app, id).await
        })
        .await;
        assert_eq!(ev, what);
    }
    assert!(!pc.exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_upload_move_works_across_filesystems() {
    use std::os::unix::fs::MetadataExt;
    let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm here: the cross-filesystem move is skipped");
        return;
    };
    let mut app = TestApp::start(&format!(
        "[after_upload]\naction = \"move\"\nmove_to = \"{}\"\n",
        other.path().display()
    ))
    .await;
    if std::fs::metadata(&app.rec).unwrap().dev() == std::fs::metadata(other.path()).unwrap().dev()
    {
        eprintln!("/dev/shm is on the same filesystem as the temp dir here: skipped");
        app.stop().await;
        return;
    }
    let a = wav(1.0);
    let pa = app.drop_file("2026/a.wav", &a);
    let job = app.wait_state(&pa, "uploaded").await;
    app.assert_uploaded_once(&job, &a);
    let dest = other.path().join("2026/a.wav");
    eventually("the file moved to the other filesystem", || async {
        dest.exists() && !pa.exists()
    })
    .await;
    assert_eq!(std::fs::read(&dest).unwrap(), a);
    let leftovers: Vec<_> = std::fs::read_dir(other.path().join("2026"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary copy left: {leftovers:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_killed_after_marking_the_database_is_completed_by_the_next() {
    // What a kill -9 between stamping the application id and creating the tables leaves behind.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .unwrap();
    }
    let db = state.join("queue.db");
    {
        use sqlx::{ConnectOptions, Connection};
        let mut c = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .connect()
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA application_id = {}",
            callferry::queue::APPLICATION_ID
        )))
        .execute(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
    }
    let q = callferry::queue::Queue::open(&db, callferry::queue::OpenMode::Create)
        .await
        .expect("accepted and completed");
    assert_eq!(q.counts().await.unwrap().total(), 0);
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_whose_content_is_not_audio_is_not_declared() {
    let mut app = TestApp::start("").await;
    // The right extension, the wrong content: a text file, a truncated copy's zeros.
    let text = app.drop_file("notes.wav", b"this is not a recording, just some notes\n");
    let zeros = app.drop_file("zeros.mp3", &[0u8; 4096]);
    // A real one next to them goes through; by then the others have been looked at too.
    let a = wav(0.5);
    let pa = app.drop_file("real.wav", &a);
    let job = app.wait_state(&pa, "uploaded").await;
    app.assert_uploaded_once(&job, &a);
    for p in [&text, &zeros] {
        assert!(app.job_for(p).await.is_none(), "{} queued", p.display());
    }
    assert_eq!(app.fake.counters().declares, 1, "no declare wasted on them");
    // The reason, as `enqueue` tells it.
    let cfg = write_config(app.dir.path(), &app.fake.base_url(), "");
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("enqueue")
        .arg(&text)
        .arg(&zeros)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a WAV file"), "{err}");
    assert!(err.contains("not a MP3 file"), "{err}");
    assert_eq!(app.jobs().await.len(), 1, "still only the real one");
    app.stop().await;
}
