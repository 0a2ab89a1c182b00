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

/// Runs `cmd` to completion, failing (and killing it) if it takes longer than the deadline: the
/// bugs these tests catch include commands that never return.
fn output_within(cmd: &mut Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > DEADLINE {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {DEADLINE:?}: {cmd:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_mistyped_log_level_or_rust_log_exits_78_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    for (typo, meant) in [("warning", "warn"), ("inof", "info"), ("debugg", "debug")] {
        let text = config_text(
            "http://127.0.0.1:9/v1",
            dir.path(),
            &format!("[log]\nlevel = \"{typo}\"\n"),
        );
        let cfg = write_config(dir.path(), &text);
        for command in ["check-config", "run"] {
            let out = output_within(callferry().arg("--config").arg(&cfg).arg(command));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} {typo}: {err}");
            assert!(err.contains("log.level"), "{err}");
            assert!(err.contains(&format!("did you mean `{meant}`")), "{err}");
        }
    }
    // RUST_LOG replaces the level: the same typo there is the same error.
    let cfg = write_config(
        dir.path(),
        &config_text("http://127.0.0.1:9/v1", dir.path(), ""),
    );
    for command in ["check-config", "run"] {
        let out = output_within(
            callferry()
                .env("RUST_LOG", "callferry=debug,inof")
                .arg("--config")
                .arg(&cfg)
                .arg(command),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {err}");
        assert!(err.contains("RUST_LOG"), "{err}");
        assert!(err.contains("did you mean `info`"), "{err}");
    }
    // A valid filter passes.
    let out = output_within(
        callferry()
            .env("RUST_LOG", "callferry=debug,warn")
            .arg("--config")
            .arg(&cfg)
            .arg("check-config"),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_interval_below_its_floor_exits_78_naming_key_and_floor() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key, floor) in [
        (
            "[api]\npause_recheck = \"0s\"\n",
            "api.pause_recheck",
            "100ms",
        ),
        (
            "[upload]\nbackoff_initial = \"1ms\"\n",
            "upload.backoff_initial",
            "10ms",
        ),
        (
            "[results]\npoll_interval = \"10ms\"\n",
            "results.poll_interval",
            "100ms",
        ),
    ] {
        let cfg = write_config(
            dir.path(),
            &config_text("http://127.0.0.1:9/v1", dir.path(), extra),
        );
        let out = output_within(callferry().arg("--config").arg(&cfg).arg("check-config"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains(key), "{err}");
        assert!(err.contains(&format!("floor of {floor}")), "{err}");
    }
}

#[test]
fn a_config_that_is_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("callferry.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for command in ["check-config", "run"] {
        let out = output_within(callferry().arg("--config").arg(&fifo).arg(command));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {err}");
        assert!(err.contains("FIFO"), "{err}");
    }
    // A token file that is a FIFO is refused too (it is re-read on a 401 and on SIGHUP).
    let text = config_text("http://127.0.0.1:9/v1", dir.path(), "").replace(
        &format!("token = \"{TOKEN}\""),
        &format!("token_file = \"{}\"", fifo.display()),
    );
    let cfg = dir.path().join("real.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = output_within(callferry().arg("--config").arg(&cfg).arg("check-config"));
    let out_text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{out_text}");
    assert!(out_text.contains("FIFO"), "{out_text}");
}

#[test]
fn a_metrics_port_in_use_is_a_configuration_error_for_check_config_and_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = write_config(
        dir.path(),
        &config_text(
            "http://127.0.0.1:9/v1",
            dir.path(),
            &format!("[metrics]\nlisten = \"{addr}\"\n"),
        ),
    );
    let out = output_within(callferry().arg("--config").arg(&cfg).arg("check-config"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains(&format!("metrics.listen {addr}: cannot bind")),
        "{text}"
    );
    let out = output_within(callferry().arg("--config").arg(&cfg).arg("run"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
    drop(taken);
    let out = output_within(callferry().arg("--config").arg(&cfg).arg("check-config"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The write end of a pipe whose reader is already gone: every write to it fails with EPIPE, as
/// `callferry list | head -1` does once `head` has its line.
pub fn closed_pipe() -> std::process::Stdio {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors; each is owned exactly once below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the read end is ours, closed at once; the write end is handed to the child.
    unsafe {
        drop(std::os::fd::OwnedFd::from_raw_fd(fds[0]));
        std::process::Stdio::from(std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_ends_the_command_quietly_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let cfg = write_config(
        dir.path(),
        &config_text("http://127.0.0.1:9/v1", dir.path(), ""),
    );
    create_queue(&dir.path().join("state/queue.db")).await;
    let backfill = dir.path().join("old.wav");
    std::fs::write(&backfill, wav(0.5)).unwrap();
    filetime_past(&backfill);
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["status"],
        &["status", "--json"],
        &["retry", "--failed"],
        &["check-config"],
    ] {
        let out = callferry()
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
    // enqueue still queues every file when nobody reads what it says.
    let out = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("enqueue")
        .arg(&backfill)
        .stdout(closed_pipe())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    let q = open_queue(&dir.path().join("state/queue.db")).await;
    assert_eq!(q.counts().await.unwrap().pending, 1);
    q.close().await;
    // A closed stderr too: the configuration error has nobody to go to, and the code still says it.
    let out = callferry()
        .args(["--config", "/nonexistent.toml", "status"])
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

/// `list --limit 1000000 --json` on a million jobs took 3.7 GB: every row, then all of their JSON,
/// were held before the first byte went out. Rows are now written as they are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_a_large_queue_in_bounded_memory() {
    const JOBS: u32 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let cfg = write_config(
        dir.path(),
        &config_text("http://127.0.0.1:9/v1", dir.path(), ""),
    );
    let db = dir.path().join("state/queue.db");
    create_queue(&db).await;
    {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO jobs (path, root, size, mtime_ns, state, last_error, next_attempt_at, created_at, updated_at) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) \
             SELECT '/var/spool/asterisk/monitor/2026/12/05/call-' || i || '.wav', '/var/spool/asterisk/monitor', \
                    123456, i, 'failed', 'HTTP 400: the service refused this recording', 0, 0, 0 FROM n",
        )
        .bind(JOBS)
        .execute(&mut conn)
        .await
        .unwrap();
        // Closed and checkpointed before `list` starts: a connection merely dropped checkpoints
        // its 100,000-row WAL in the background, while `list` reads.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    for json in [true, false] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callferry"));
        cmd.env_remove("CALLFERRY_CONFIG")
            .env_remove("RUST_LOG")
            .arg("--config")
            .arg(&cfg)
            .args(["list", "--limit", "1000000"])
            .args(json.then_some("--json"))
            .stdout(std::process::Stdio::piped());
        let (rows, bytes, max_rss_kib, status) = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut child = cmd.spawn().unwrap();
            let pid = child.id() as i32;
            let reader = std::io::BufReader::new(child.stdout.take().unwrap());
            let (mut rows, mut bytes) = (0u64, 0u64);
            for line in reader.lines() {
                let line = line.unwrap();
                bytes += line.len() as u64 + 1;
                if line.starts_with("    \"id\": ") || line.contains("  failed  ") {
                    rows += 1;
                }
            }
            // wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would give the
            // largest of every child this test binary ever waited for).
            let mut st = 0;
            // SAFETY: zeroed rusage filled by wait4 for our own child.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::wait4(pid, &mut st, 0, &mut ru) }, pid);
            std::mem::forget(child); // reaped above
            (rows, bytes, ru.ru_maxrss, st)
        })
        .await
        .unwrap();
        assert_eq!(status, 0, "exit status");
        assert_eq!(rows, JOBS as u64, "json = {json}");
        println!(
            "list{} of {JOBS} jobs: {:.1} MB written, peak RSS {:.1} MB",
            if json { " --json" } else { "" },
            bytes as f64 / 1e6,
            max_rss_kib as f64 / 1024.0
        );
        // Streaming peaks at 24-30 MB alone and up to ~50 MB on a loaded 2-core machine (the
        // debug binary's own pages count), and 117-119 MB was seen with the load average near 10
        // (three failures at 112 MB: rows read ahead of a slow reader, to be looked into);
        // reading every row first took 382 MB. The bound sits halfway to that.
        assert!(
            max_rss_kib < 190 * 1024,
            "peak RSS {max_rss_kib} KiB for {JOBS} jobs"
        );
    }
}

async fn create_queue(db: &std::path::Path) {
    callferry::queue::Queue::open(db, callferry::queue::OpenMode::Create)
        .await
        .unwrap()
        .close()
        .await;
}

/// Waits for a spawned command, killing it (and failing) after a generous deadline.
fn wait_within(mut child: std::process::Child, what: &str) -> std::process::Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(120) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after 120 s\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `callferry demo`, the README's first command, end to end; and `callferry demo | head -1`: once
/// its reader is gone the demo stops quietly with status 0 (its `println!` panicked: exit 101).
#[test]
fn the_demo_runs_through_and_stops_quietly_when_its_reader_goes() {
    use std::process::Stdio;
    let whole = callferry()
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_within(whole, "demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}\n{err}");
    assert!(
        text.contains("5/5 recordings uploaded exactly once and transcribed"),
        "{text}"
    );
    assert!(text.contains("uploaded via 409"), "{text}");

    let cut = callferry()
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_within(cut, "demo into a closed pipe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
