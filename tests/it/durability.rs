//! The queue's durability under database errors other than a full disk, checked from the fake's
//! own records: an interaction id the service gave is never dropped (no second declare without a
//! crash), an upload's outcome is never left in flight, and a long reader does not hold up the
//! workers or the after-upload action.

use callferry::gate::Pause;
use callferry::queue::Fault as QueueFault;
use callferry_fake::{Endpoint, Fault};

use callferry::queue::{OpenMode, Queue};

use crate::helpers::*;

/// Interactions the fake created for the recording named `name` (by its declare's filename).
fn declared_for(app: &TestApp, name: &str) -> usize {
    app.fake
        .interactions()
        .iter()
        .filter(|i| i.declare_body["originalFilename"] == name)
        .count()
}

/// Polls the gate until it shows a storage pause, returning its reason.
async fn storage_pause(app: &TestApp) -> String {
    poll_for("uploads to pause on the database error", || async {
        match app.handle.gate.state().pause {
            Some(p @ Pause::Storage(_)) => Some(p.reason()),
            _ => None,
        }
    })
    .await
}

async fn one_file_through(fault: QueueFault, n: u32, expect_in_reason: &str) {
    let mut app = TestApp::start("").await;
    app.handle.queue.inject_fault(fault, n);
    let bytes = wav(0.2);
    let path = app.drop_file("call.wav", &bytes);
    let reason = storage_pause(&app).await;
    assert!(reason.contains(expect_in_reason), "{reason}");
    // Without a restart: the outcome kept in memory is written once the database takes it.
    let job = app.wait_state(&path, "uploaded").await;
    app.assert_uploaded_once(&job, &bytes);
    assert_eq!(declared_for(&app, "call.wav"), 1, "declared exactly once");
    eventually("the pause to be lifted", || async {
        app.handle.gate.state().pause.is_none()
    })
    .await;
    // And a restart finds nothing to declare again.
    app.stop().await;
    app.restart().await;
    let again = app.drop_file("second.wav", &wav(0.1));
    app.wait_state(&again, "uploaded").await;
    assert_eq!(declared_for(&app, "call.wav"), 1, "not declared again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_after_a_declare_keeps_the_interaction_id() {
    one_file_through(QueueFault::Declared, 3, "database is locked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_of_the_interaction_id_is_made_good_before_the_upload() {
    // EIO from fdatasync, twice: the id was committed but not proven durable.
    one_file_through(QueueFault::Sync, 2, "flush").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_outcome_that_cannot_be_written_does_not_stick_in_uploading() {
    one_file_through(QueueFault::Uploaded, 3, "database is locked").await;
}

/// A reader holding a read transaction (a `callferry list` of a big queue) while recordings are
/// uploaded and deleted: neither waits for the reader. Before, the delete's FULL checkpoint waited
/// the 10 s busy timeout for every file, on the daemon's only connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reader_holds_up_neither_uploads_nor_deletes() {
    use sqlx::Connection;
    const N: usize = 8;
    let mut app = TestApp::start("[after_upload]\naction = \"delete\"\n").await;
    let mut reader = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(app.db_path())
            .read_only(true),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let started = std::time::Instant::now();
    let files: Vec<_> = (0..N)
        .map(|i| {
            let b = callferry_fake::wav_bytes(0.05, 300.0 + i as f64);
            (app.drop_file(&format!("r{i}.wav"), &b), b)
        })
        .collect();
    // All within one deadline of the harness (30 s): the old code needed 10 s per file, as the
    // checkpoints of both workers took turns on the one connection (about 80 s here).
    eventually("every recording uploaded and deleted", || async {
        let jobs = app.jobs().await;
        files.iter().all(|(p, _)| {
            !p.exists()
                && jobs.iter().any(|j| {
                    std::path::Path::new(&j.path) == p
                        && j.state == callferry::queue::State::Uploaded
                })
        })
    })
    .await;
    for (p, b) in &files {
        let job = app.job_for(p).await.unwrap();
        app.assert_uploaded_once(&job, b);
    }
    eprintln!(
        "{N} uploads and deletes with a reader holding the database: {:?}",
        started.elapsed()
    );
    // The reader still holds its snapshot: it never saw the jobs, and it was never in the way.
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(n, 0, "the reader's transaction stayed open throughout");
    sqlx::query("ROLLBACK").execute(&mut reader).await.unwrap();
    app.stop().await;
}

/// `callferry enqueue` of a backlog while the daemon uploads: every file is queued (before, a
/// deferred transaction's upgrade to a writer failed at once with "database is locked" as soon as
/// the daemon wrote in between, and the command stopped there without waking the daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_of_a_backlog_beside_a_busy_daemon_queues_every_file() {
    const BACKLOG: usize = 2_000;
    const LIVE: usize = 150;
    let mut app = TestApp::start("").await;
    let backlog = app.dir.path().join("backlog");
    std::fs::create_dir_all(&backlog).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let bytes = callferry_fake::wav_bytes(0.01, 440.0);
    let mut args = Vec::new();
    for i in 0..BACKLOG {
        let p = backlog.join(format!("old-{i:05}.wav"));
        std::fs::write(&p, &bytes).unwrap();
        // Long finished: complete at once, with no settle period to wait out.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        args.push(p);
    }
    // The daemon busy with recordings of its own while the command runs.
    for i in 0..LIVE {
        app.drop_file(&format!("live-{i:03}.wav"), &bytes);
    }
    eventually("the daemon to be uploading", || async {
        app.handle.queue.counts().await.unwrap().uploaded > 0
    })
    .await;
    let cfg = app.dir.path().join("callferry.toml");
    std::fs::write(
        &cfg,
        config_text(&app.fake.base_url(), app.dir.path(), &app.extra_toml),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_callferry"))
            .env_remove("CALLFERRY_CONFIG")
            .env_remove("RUST_LOG")
            .arg("--config")
            .arg(&cfg)
            .arg("enqueue")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let queued = stdout.lines().filter(|l| l.starts_with("queued")).count();
    let busy_meanwhile = app.handle.queue.counts().await.unwrap();
    eprintln!("enqueue: {queued} of {BACKLOG} queued; daemon meanwhile: {busy_meanwhile:?}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        stderr.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(queued, BACKLOG, "every file queued");
    let jobs = app.jobs().await;
    let in_db = jobs
        .iter()
        .filter(|j| j.path.contains("/backlog/old-"))
        .count();
    assert_eq!(in_db, BACKLOG);
    // The daemon was woken and takes the backlog (no idle recheck to wait for).
    eventually("the daemon to take the backlog", || async {
        app.jobs().await.iter().any(|j| {
            j.path.contains("/backlog/old-") && j.state == callferry::queue::State::Uploaded
        })
    })
    .await;
    app.stop().await;
}

/// Interactions the fake created for `name`: their ids and `externalIdentifier`s.
fn declares_of(app: &TestApp, name: &str) -> Vec<(String, String, bool)> {
    app.fake
        .interactions()
        .into_iter()
        .filter(|i| i.declare_body["originalFilename"] == name)
        .map(|i| {
            (
                i.id.clone(),
                i.declare_body["externalIdentifier"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                i.uploads.iter().any(|u| u.stored),
            )
        })
        .collect()
}

async fn orphans_in_status_and_metrics(app: &TestApp) -> (u64, f64, String) {
    let q = open_queue(&app.db_path()).await;
    let report = callferry::status::gather(&q, &app.db_path()).await.unwrap();
    q.close().await;
    let json = serde_json::to_value(&report).unwrap();
    let text = callferry::status::render_text(&report, callferry::status::Style { colour: false });
    let addr = app.handle.metrics_addr.expect("metrics are served");
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = body
        .lines()
        .find_map(|l| l.strip_prefix("callferry_orphan_declares_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no orphan series in:\n{body}"));
    (json["orphan_declares"].as_u64().unwrap(), metric, text)
}

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// Every declare answer lost (reset after the service created the interaction, a 201 without an
/// id): the recording is declared `max_declares` times, then fails with the reason. Each orphan is
/// counted, and all carry the same `externalIdentifier`, so they can be found at the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declares_whose_answer_is_lost_are_capped_counted_and_findable() {
    let mut app = TestApp::start(&format!("{METRICS}[upload]\nmax_declares = 3\n")).await;
    for f in [
        Fault::ResetAfterStore,
        Fault::MissingId,
        Fault::ResetAfterStore,
    ] {
        app.fake.push_fault(Endpoint::Declare, f);
    }
    let path = app.drop_file("lost.wav", &wav(0.2));
    let job = app.wait_state(&path, "failed").await;
    let err = job.last_error.clone().unwrap();
    assert!(
        err.contains("declared 3 time(s)") && err.contains("upload.max_declares = 3"),
        "{err}"
    );
    // No recorder's naming convention: the path below the watched folder.
    let ext = "lost.wav".to_string();
    assert!(err.contains(&ext), "{err}");
    // From the fake's records: three interactions, no fourth declare, none with audio, one
    // identifier.
    let made = declares_of(&app, "lost.wav");
    assert_eq!(made.len(), 3, "{made:?}");
    assert_eq!(app.fake.counters().declares, 3);
    assert!(
        made.iter().all(|(_, e, stored)| e == &ext && !stored),
        "{made:?}"
    );
    let (json, metric, text) = orphans_in_status_and_metrics(&app).await;
    assert_eq!((json, metric), (3, 3.0));
    assert!(text.contains("orphans     3 declare(s)"), "{text}");
    // `retry` gives the version a fresh budget: declared again, and uploaded this time.
    let q = open_queue(&app.db_path()).await;
    assert_eq!(
        q.retry(Some(&[job.id]), callferry::clock::now_ms())
            .await
            .unwrap(),
        1
    );
    q.close().await;
    let job = app.wait_state(&path, "uploaded").await;
    let made = declares_of(&app, "lost.wav");
    assert_eq!(made.len(), 4);
    assert!(
        made.iter().all(|(_, e, _)| e == &ext),
        "same identifier after retry"
    );
    let stored: Vec<_> = made.iter().filter(|m| m.2).collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(Some(stored[0].0.as_str()), job.interaction_id.as_deref());
    app.stop().await;
}

/// Two lost answers, then a good one: uploaded once, two orphans counted (exactly the
/// interactions the fake holds without audio), no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_under_the_cap_cost_one_orphan_each_and_the_upload_goes_on() {
    let mut app = TestApp::start(METRICS).await;
    app.fake
        .push_fault(Endpoint::Declare, Fault::ResetAfterStore);
    app.fake.push_fault(Endpoint::Declare, Fault::MissingId);
    let bytes = wav(0.2);
    let path = app.drop_file("twice.wav", &bytes);
    let job = app.wait_state(&path, "uploaded").await;
    app.assert_uploaded_once(&job, &bytes);
    assert_eq!(job.orphans, 2);
    let made = declares_of(&app, "twice.wav");
    assert_eq!(made.len(), 3);
    let orphans = made.iter().filter(|m| !m.2).count();
    let (json, metric, _) = orphans_in_status_and_metrics(&app).await;
    assert_eq!((json, metric), (orphans as u64, orphans as f64));
    assert!(made.windows(2).all(|w| w[0].1 == w[1].1), "{made:?}");
    app.stop().await;
}

/// Out of file descriptors (a low `RLIMIT_NOFILE`, many workers): the workers hold back under
/// their own reason instead of logging "API unreachable" and trying again at once, no attempt is
/// counted, no declare is wasted, and everything is uploaded. The daemon runs as a child process
/// with soft and hard limits lowered, so the test process keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_holds_the_workers_back_and_loses_nothing() {
    use std::os::unix::process::CommandExt;
    const N: usize = 40;
    const LIMIT: u64 = 48;
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = callferry_fake::FakeApi::start(callferry_fake::FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Slow answers keep every worker's connection and file open at once.
    fake.set_latency(std::time::Duration::from_millis(150));
    let cfg = dir.path().join("callferry.toml");
    std::fs::write(
        &cfg,
        config_text(
            &fake.base_url(),
            dir.path(),
            "[upload]\nworkers = 40\nmax_attempts = 2\n[log]\nlevel = \"info\"\n",
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callferry"));
    cmd.env_remove("CALLFERRY_CONFIG")
        .env_remove("RUST_LOG")
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let bytes = callferry_fake::wav_bytes(0.05, 440.0);
    for i in 0..N {
        let p = rec.join(format!("fd-{i:02}.wav"));
        std::fs::write(&p, &bytes).unwrap();
    }
    let db = dir.path().join("state/queue.db");
    let mut last = None;
    let start = std::time::Instant::now();
    let mut done = false;
    while start.elapsed() < DEADLINE * 2 {
        if db.exists() {
            if let Ok(q) = Queue::open(&db, OpenMode::Existing).await {
                let c = q.counts().await.unwrap();
                q.close().await;
                last = Some(c.clone());
                if c.uploaded == N as u64 {
                    done = true;
                    break;
                }
                assert_eq!(
                    c.failed,
                    0,
                    "{c:?}\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(done, "not all uploaded: {last:?}\n{text}");
    assert!(
        text.contains("out of file descriptors"),
        "the limit was never reached; lower it:\n{text}"
    );
    assert!(!text.contains("API unreachable"), "{text}");
    assert_eq!(fake.counters().declares, N as u64, "no declare wasted");
    eprintln!(
        "RLIMIT_NOFILE {LIMIT}, 40 workers: {N} uploaded, {} declares, {} hold-back lines",
        fake.counters().declares,
        text.matches("out of file descriptors").count()
    );
}

/// Results for an `output_dir` that cannot be written: a clear error that `/healthz` reports (and
/// holds) until results can be written again; then they are, and it is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_results_folder_is_a_held_error_on_healthz() {
    // A regular file where a folder should be: unwritable even for root.
    let base = tempfile::tempdir().unwrap();
    let blocker = base.path().join("blocker");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let out = blocker.join("results");
    let mut app = TestApp::start_with(
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n",
            out.display()
        ),
        callferry_fake::FakeOptions {
            token: TOKEN.into(),
            processing_time: std::time::Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    let addr = app.handle.metrics_addr.unwrap();
    let healthz = || async move {
        let r = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let path = app.drop_file("call.wav", &wav(0.2));
    let why = poll_for("/healthz to report the results folder", || async {
        let (code, body) = healthz().await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(
        why.contains("results cannot be written") && why.contains("blocker"),
        "{why}"
    );
    // Held: still reported a moment later, while the job waits (not failed, nothing lost).
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(healthz().await.0, 503);
    assert_eq!(app.job_for(&path).await.unwrap().state.as_str(), "uploaded");
    // Fixed: the results are written and /healthz is 200 again.
    std::fs::remove_file(&blocker).unwrap();
    app.wait_state(&path, "processed").await;
    assert!(
        out.join("call.wav.transcript.json").is_file()
            || std::fs::read_dir(&out).unwrap().count() > 0
    );
    eventually("/healthz 200 again", || async { healthz().await.0 == 200 }).await;
    app.stop().await;
}

/// A second daemon (a newer build, say) on a database whose lock is held refuses before it touches
/// the schema: migrations ran before the lock was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_refuses_before_migrating() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load_config(&config_text("http://127.0.0.1:9/v1", dir.path(), ""));
    let db = cfg.queue.database.clone();
    Queue::open(&db, OpenMode::Create)
        .await
        .unwrap()
        .close()
        .await;
    // As if the running daemon were an older build: the newest migration not applied.
    let mut c = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new().filename(&db),
    )
    .await
    .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?")
        .bind(newest)
        .execute(&mut c)
        .await
        .unwrap();
    let _running = callferry::queue::DaemonLock::acquire(&db).unwrap();
    let r = callferry::app::run(cfg, tokio_util::sync::CancellationToken::new(), None).await;
    assert!(
        matches!(
            r,
            Err(callferry::app::AppError::Queue(
                callferry::queue::QueueError::Locked(_)
            ))
        ),
        "{r:?}"
    );
    let applied: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE version = ?")
            .bind(newest)
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(applied, 0, "the schema was left alone");
}
