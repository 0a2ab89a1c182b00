//! Following interactions to `processed` and delivering their results.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callferry::api::ApiClient;
use callferry::clock::now_ms;
use callferry::queue::{NewJob, OpenMode, Queue};
use callferry_fake::FakeOptions;

use crate::helpers::*;

fn results_toml(out: &Path, extra: &str) -> String {
    format!(
        "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n{extra}",
        out.display()
    )
}

fn fake_processing(ms: u64) -> FakeOptions {
    FakeOptions {
        token: TOKEN.into(),
        processing_time: Duration::from_millis(ms),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_result_kind_is_written_next_to_the_recordings_path() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start_with(
        &format!(
            "{}format = \"text\"\n[declare]\ninclude_ai_results = true\n",
            results_toml(out.path(), "")
        ),
        fake_processing(400),
    )
    .await;
    let a = wav(1.0);
    let pa = app.drop_file("2026/11/25/call.wav", &a);
    let job = app.wait_state(&pa, "processed").await;
    app.assert_uploaded_once(&job, &a);
    let base = out.path().join("2026/11/25/call.wav");
    for (suffix, key) in [
        (".transcript.json", "allParticipants"),
        (".punctuated.json", "sentenceSegments"),
        (".ai.json", "allParticipants"),
    ] {
        let p = PathBuf::from(format!("{}{suffix}", base.display()));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert!(v.get(key).is_some(), "{} has {key}", p.display());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}", p.display());
    }
    let txt = std::fs::read_to_string(format!("{}.txt", base.display())).unwrap();
    assert!(txt.starts_with("[00:00:0"), "{txt}");
    assert!(txt.contains("Speaker 1: Thank you for calling"), "{txt}");
    let c = app.fake.counters();
    assert_eq!(
        c.result_fetches, 3,
        "the text is made from the punctuated transcript, not fetched again"
    );
    assert!(c.status_polls >= 1);
    let names: Vec<String> = std::fs::read_dir(base.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".callferry-")),
        "no temp files left: {names:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_failed_fails_the_job_and_retry_resumes_following_without_reupload() {
    let out = tempfile::tempdir().unwrap();
    let mut app =
        TestApp::start_with(&results_toml(out.path(), ""), fake_processing(3_600_000)).await;
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    let job = app.wait_state(&pa, "uploaded").await;
    let iid = job.interaction_id.clone().unwrap();
    app.fake
        .force_status(&iid, "processingFailed", Some("audio could not be decoded"));
    let failed = app.wait_state(&pa, "failed").await;
    let err = failed.last_error.unwrap();
    assert!(
        err.contains("processingFailed") && err.contains("audio could not be decoded"),
        "{err}"
    );

    // The service still has the file: retry follows it again, it is not uploaded again.
    app.fake.force_status(&iid, "processed", None);
    let cli = open_queue(&app.db_path()).await;
    assert_eq!(cli.retry(Some(&[failed.id]), now_ms()).await.unwrap(), 1);
    app.wait_state(&pa, "processed").await;
    let c = app.fake.counters();
    assert_eq!(
        (c.uploads_stored, c.uploads_conflict, c.declares),
        (1, 0, 1)
    );
    assert!(out.path().join("a.wav.transcript.json").exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_service_lost_is_uploaded_again_on_retry() {
    let out = tempfile::tempdir().unwrap();
    let mut app =
        TestApp::start_with(&results_toml(out.path(), ""), fake_processing(3_600_000)).await;
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    let job = app.wait_state(&pa, "uploaded").await;
    let iid = job.interaction_id.clone().unwrap();
    app.fake
        .force_status(&iid, "fileUploadFailed", Some("storage error"));
    let failed = app.wait_state(&pa, "failed").await;
    assert!(failed.last_error.unwrap().contains("fileUploadFailed"));
    app.fake.force_status(&iid, "processed", None);
    let cli = open_queue(&app.db_path()).await;
    cli.retry(None, now_ms()).await.unwrap();
    app.wait_state(&pa, "processed").await;
    let c = app.fake.counters();
    assert_eq!(c.declares, 1, "same interaction");
    assert_eq!(
        c.uploads_stored + c.uploads_conflict,
        2,
        "uploaded again: {c:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_processing_after_max_wait_fails_with_a_clear_reason() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start_with(
        &results_toml(out.path(), "max_wait = \"1s\"\n"),
        fake_processing(3_600_000),
    )
    .await;
    let a = wav(1.0);
    let pa = app.drop_file("slow.wav", &a);
    let failed = app.wait_state(&pa, "failed").await;
    let err = failed.last_error.unwrap();
    assert!(
        err.contains("results.max_wait") && err.contains("still"),
        "{err}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_resumes_after_a_restart_and_nothing_is_fetched_twice() {
    let out = tempfile::tempdir().unwrap();
    let mut app =
        TestApp::start_with(&results_toml(out.path(), ""), fake_processing(3_600_000)).await;
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    let job = app.wait_state(&pa, "uploaded").await;
    app.crash().await;
    // Processing finishes while the daemon is down.
    app.fake
        .force_status(job.interaction_id.as_deref().unwrap(), "processed", None);
    app.restart().await;
    app.wait_state(&pa, "processed").await;
    // ai is off (include_ai_results = false): transcript and punctuated, once each.
    assert_eq!(app.fake.counters().result_fetches, 2);
    app.stop().await;
    app.restart().await;
    let b = wav(0.5);
    let pb = app.drop_file("b.wav", &b);
    app.fake.set_processing_time(Duration::ZERO);
    app.wait_state(&pb, "processed").await;
    assert_eq!(
        app.fake.counters().result_fetches,
        4,
        "a.wav's results were not fetched again"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_waits_for_the_results_when_results_are_enabled() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start_with(
        &format!(
            "{}[after_upload]\naction = \"delete\"\n",
            results_toml(out.path(), "")
        ),
        fake_processing(3_600_000),
    )
    .await;
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    let job = app.wait_state(&pa, "uploaded").await;
    // Uploaded but not processed: the audio is kept.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(pa.exists(), "deleted before its transcript exists");
    app.fake
        .force_status(job.interaction_id.as_deref().unwrap(), "processed", None);
    app.wait_state(&pa, "processed").await;
    eventually("the recording to be deleted", || async { !pa.exists() }).await;
    assert!(out.path().join("a.wav.transcript.json").exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_followed_jobs_respect_the_global_request_rate() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = callferry_fake::FakeApi::start(fake_processing(3_600_000))
        .await
        .unwrap();
    let cap = 100.0;
    let text = config_text(
        &fake.base_url(),
        dir.path(),
        &format!(
            "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"1h\"\nmax_requests_per_sec = {cap}\n",
            dir.path().join("out").display()
        ),
    );
    let cfg = load_config(&text);
    let api = ApiClient::new(&cfg, callferry::secret::Secret::new(TOKEN)).unwrap();

    // 1,000 interactions uploaded at the service, and the queue that knows them.
    let n = 1000;
    let body = wav(0.01);
    let sample = rec.join("sample.wav");
    std::fs::write(&sample, &body).unwrap();
    let ids: Vec<String> = futures_util::stream::iter(0..n)
        .map(|_| {
            let api = api.clone();
            let sample = sample.clone();
            let len = body.len() as u64;
            async move {
                let id = api.declare(&declare_request(None)).await.unwrap();
                api.upload(&id, &sample, len).await.unwrap();
                id
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    {
        let q = Queue::open(&cfg.queue.database, OpenMode::Create)
            .await
            .unwrap();
        let jobs: Vec<NewJob> = (0..n)
            .map(|i| NewJob {
                path: rec.join(format!("f{i}.wav")),
                root: rec.clone(),
                size: 1,
                mtime_ns: 1,
                dev: 0,
                ino: 0,
            })
            .collect();
        q.enqueue(&jobs, now_ms()).await.unwrap();
        for id in &ids {
            let j = q.claim(now_ms()).await.unwrap().unwrap();
            q.mark_declared(j.id, id, now_ms()).await.unwrap();
            q.mark_uploaded(j.id, 201, Some(now_ms()), now_ms())
                .await
                .unwrap();
        }
        q.close().await;
    }
    let polls_before = fake.counters().status_polls;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(callferry::app::run(cfg, shutdown.clone(), Some(tx)));
    let _handle = rx.await.unwrap();
    let t0 = Instant::now();
    let p0 = fake.counters().status_polls;
    // Sample the rate over a window while the backlog of 1,000 due jobs is being worked off.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (p1, dt) = (fake.counters().status_polls, t0.elapsed().as_secs_f64());
    let window = (p1 - p0) as f64;
    assert!(window > 0.0, "the follower made progress");
    assert!(
        window <= cap * dt + 10.0,
        "{window} polls in {dt:.2}s exceeds the cap of {cap}/s"
    );
    // All of them are eventually polled once, at the cap.
    eventually("every job polled once", || async {
        fake.counters().status_polls - polls_before >= n
    })
    .await;
    assert!(
        fake.counters().status_polls - polls_before <= n + 5,
        "each polled once (poll_interval = 1h)"
    );
    shutdown.cancel();
    daemon.await.unwrap().unwrap();
}

use futures_util::StreamExt;

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Kills the child process when dropped, so a failing benchmark leaves nothing behind.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct FollowRun {
    fake: callferry_fake::FakeApi,
    ids: Vec<String>,
    out: PathBuf,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

/// A `callferry run` process following `n` seeded interactions (each polled every `poll` s, at most
/// `cap` requests/s), all due within the first poll interval.
async fn follow_run(n: usize, poll: u64, cap: f64) -> FollowRun {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = callferry_fake::FakeApi::start(fake_processing(3_600_000))
        .await
        .unwrap();
    let ids = fake.seed_uploaded(n);
    let text = config_text(
        &fake.base_url(),
        dir.path(),
        &format!(
            "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"{poll}s\"\nmax_requests_per_sec = {cap}\n[log]\nlevel = \"warn\"\n",
            out.display()
        ),
    );
    let cfg_path = dir.path().join("callferry.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    let cfg = load_config(&text);
    Queue::open(&cfg.queue.database, OpenMode::Create)
        .await
        .unwrap()
        .close()
        .await;
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", cfg.queue.database.display()))
            .await
            .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let now = now_ms();
    for (i, id) in ids.iter().enumerate() {
        sqlx::query(
            "INSERT INTO jobs (path, root, size, mtime_ns, state, next_attempt_at, interaction_id, \
             upload_status, uploaded_at, follow_at, created_at, updated_at) \
             VALUES (?, ?, 1, ?, 'uploaded', 0, ?, 201, ?, ?, ?, ?)",
        )
        .bind(rec.join(format!("f{i}.wav")).to_string_lossy().into_owned())
        .bind(rec.to_string_lossy().into_owned())
        .bind(i as i64)
        .bind(id)
        .bind(now)
        .bind(now + (i as i64 % (poll as i64 * 1000)))
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    conn.close().await.unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_callferry"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    FollowRun {
        fake,
        ids,
        out,
        child: ChildGuard(child),
        _dir: dir,
    }
}

/// Benchmark (compressed time): memory and request rate of the `callferry run` process while it
/// follows 100,000 interactions, and the delay from `processed` to the result files on disk.
/// `cargo test --release --test it bench_following -- --ignored --nocapture`
/// (CALLFERRY_BENCH_FOLLOW_N=… to change the number of jobs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_following_many_jobs() {
    let n: usize = std::env::var("CALLFERRY_BENCH_FOLLOW_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // 1. Many jobs, more polling wanted than the cap allows: the cap holds, memory stays flat.
    let (poll, cap) = (10u64, 1000.0);
    let run = follow_run(n, poll, cap).await;
    let pid = run.child.0.id();
    eventually("the first status polls", || async {
        run.fake.counters().status_polls > 0
    })
    .await;
    let start_polls = run.fake.counters().status_polls;
    let t0 = Instant::now();
    let mut rss_max = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_max = rss_max.max(proc_status_kib(pid, "VmRSS:"));
    }
    let rate = (run.fake.counters().status_polls - start_polls) as f64 / t0.elapsed().as_secs_f64();
    let hwm = proc_status_kib(pid, "VmHWM:");
    println!(
        "following {n} jobs: {rate:.0} status polls/s (cap {cap}/s; every {poll}s each would want {:.0}/s), VmRSS max {:.1} MiB, VmHWM {:.1} MiB",
        n as f64 / poll as f64,
        rss_max as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    assert!(rate <= cap * 1.05, "cap held");
    assert!(hwm < 64 * 1024, "memory stays small");
    drop(run);

    // 2. Delay from `processed` to the results on disk, with demand under the cap.
    let (m, poll) = (300usize, 2u64);
    let run = follow_run(m, poll, 1000.0).await;
    eventually("the first status polls", || async {
        run.fake.counters().status_polls > 0
    })
    .await;
    let processed_at = std::time::SystemTime::now();
    for id in &run.ids {
        run.fake.force_status(id, "processed", None);
    }
    let mut delays = Vec::new();
    for i in 0..m {
        // `punctuated` is the last kind written (ai is off).
        let p = run.out.join(format!("f{i}.wav.punctuated.json"));
        let m = poll_for("results on disk", || async {
            std::fs::metadata(&p).ok().and_then(|m| m.modified().ok())
        })
        .await;
        delays.push(
            m.duration_since(processed_at)
                .unwrap_or_default()
                .as_secs_f64(),
        );
    }
    delays.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    println!(
        "processed -> results on disk ({m} jobs, poll_interval {poll}s): p50 {:.2}s  p99 {:.2}s  max {:.2}s",
        pct(0.5),
        pct(0.99),
        delays[delays.len() - 1]
    );
    assert!(pct(0.99) <= poll as f64 + 1.0);
}
