//! Flow control: our own bandwidth cap is not a stall, a 5xx storm closes the gate like an outage
//! (circuit breaker with one probe at a time), and repeated conditions are logged once.

use std::time::Duration;

use callferry::gate::{BREAKER_THRESHOLD, Pause};
use callferry::queue::State;
use callferry_fake::{Endpoint, Fault, RandomFaults};

use crate::helpers::*;

/// A throttled upload is not a stalled one: files of three chunks each, two uploading at once on a
/// cap where every chunk waits about 2 s for its turn, with `stall_timeout` at 1 s. Before, each
/// attempt was aborted at its second chunk and restarted from byte 0 until the attempts ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_slower_than_the_stall_timeout_because_of_our_own_cap_complete() {
    let mut app = TestApp::start(
        r#"
[api]
stall_timeout = "1s"
[upload]
workers = 2
max_bytes_per_sec = 262144
max_attempts = 2
"#,
    )
    .await;
    // 768 KiB: three 256 KiB chunks, so two of them wait on the cap.
    let a = wav(48.0);
    let b = wav(47.5);
    let pa = app.drop_file("a.wav", &a);
    let pb = app.drop_file("b.wav", &b);
    for (p, bytes) in [(&pa, &a), (&pb, &b)] {
        let job = app.wait_state(p, "uploaded").await;
        assert_eq!(job.attempts, 0, "no attempt was aborted: {job:?}");
        app.assert_uploaded_once(&job, bytes);
        let rec = app.interaction(job.interaction_id.as_deref().unwrap());
        assert_eq!(
            rec.uploads.len(),
            1,
            "one upload request, not restarts from byte 0: {:?}",
            rec.uploads
        );
    }
    app.stop().await;
}

fn storm() -> RandomFaults {
    RandomFaults {
        seed: 17,
        p_5xx: 1.0,
        ..Default::default()
    }
}

/// How long a storm is watched for the request and log counts.
const WINDOW: Duration = Duration::from_secs(3);

/// 503 (and 500/502/504) on every declare and upload, with hundreds of jobs queued. Before, every
/// worker kept sending (thousands of requests a minute, one WARN line each) and every job burned
/// its attempts and failed. Now the breaker opens after BREAKER_THRESHOLD 5xx in a row: one probe
/// at a time, no attempts counted, one line when it opens and one when it closes.
#[tokio::test]
async fn a_5xx_storm_holds_everyone_back_costs_no_attempts_and_is_said_once() {
    let logs = Logs::default();
    let _guard = logs.install();
    let mut app = TestApp::start(
        r#"
[upload]
workers = 4
max_attempts = 3
backoff_initial = "100ms"
backoff_max = "500ms"
"#,
    )
    .await;
    app.fake.set_random_faults(storm());
    const N: usize = 300;
    let audio = wav(0.05);
    for i in 0..N {
        app.drop_file(&format!("c{i:03}.wav"), &audio);
    }
    eventually("the breaker to open", || async {
        matches!(app.handle.gate.state().pause, Some(Pause::Failing(_)))
    })
    .await;
    let before = app.fake.counters();
    let warned = logs.warnings();
    tokio::time::sleep(WINDOW).await;
    let during = app.fake.counters();
    let sent = during.requests - before.requests;
    eprintln!(
        "storm: {sent} requests and {} WARN lines in {WINDOW:?}",
        logs.warnings() - warned
    );
    // One probe at a time, at a backoff of 50-500 ms: about a dozen in the window.
    assert!(
        sent <= 30,
        "{sent} requests in {WINDOW:?} of a storm (the fake's count)"
    );
    assert!(sent >= 1, "the storm is still being probed");
    assert_eq!(
        logs.warnings(),
        warned,
        "no WARN lines while the breaker is open: {:#?}",
        logs.lines()
    );
    let all_warnings = logs.warnings();
    assert!(
        all_warnings <= BREAKER_THRESHOLD as usize + 4,
        "{all_warnings} WARN lines for the whole storm: {:#?}",
        logs.lines()
    );
    assert_eq!(logs.count("WARN", "treated as an outage"), 1);
    let jobs = app.jobs().await;
    assert!(
        jobs.iter()
            .all(|j| j.attempts <= 1 && j.state != State::Failed),
        "attempts burned: {:?}",
        jobs.iter()
            .filter(|j| j.attempts > 1 || j.state == State::Failed)
            .collect::<Vec<_>>()
    );

    // The storm ends: everything uploads, each file once.
    app.fake.set_random_faults(RandomFaults::default());
    eventually("every job to upload", || async {
        app.jobs().await.iter().all(|j| j.state == State::Uploaded)
    })
    .await;
    assert_eq!(app.fake.counters().uploads_stored, N as u64);
    assert_eq!(
        logs.count("INFO", "uploads resume"),
        1,
        "one line when the breaker closes"
    );
    app.stop().await;
}

/// The results follower obeys the breaker too: a status endpoint that answers 503 to every poll
/// costs a bounded number of requests and log lines (before: one WARN line per failed poll).
#[tokio::test]
async fn the_results_follower_obeys_the_breaker_and_does_not_log_each_failed_poll() {
    let logs = Logs::default();
    let _guard = logs.install();
    let mut app = TestApp::start(
        r#"
[upload]
backoff_initial = "100ms"
backoff_max = "500ms"
[results]
enabled = true
poll_interval = "100ms"
max_requests_per_sec = 1000
"#,
    )
    .await;
    app.fake.set_processing_time(Duration::from_secs(3600));
    const N: usize = 40;
    let audio = wav(0.05);
    for i in 0..N {
        app.drop_file(&format!("f{i:02}.wav"), &audio);
    }
    eventually("every job to upload", || async {
        let jobs = app.jobs().await;
        jobs.len() == N && jobs.iter().all(|j| j.state == State::Uploaded)
    })
    .await;
    for _ in 0..100_000 {
        app.fake.push_fault(Endpoint::Status, Fault::Status(503));
    }
    eventually("the breaker to open", || async {
        matches!(app.handle.gate.state().pause, Some(Pause::Failing(_)))
    })
    .await;
    let before = app.fake.counters();
    let warned = logs.warnings();
    tokio::time::sleep(WINDOW).await;
    let polls = app.fake.counters().status_polls - before.status_polls;
    eprintln!(
        "follower storm: {polls} polls and {} WARN lines in {WINDOW:?}",
        logs.warnings() - warned
    );
    assert!(polls <= 20, "{polls} status polls in {WINDOW:?} of a storm");
    assert_eq!(
        logs.warnings(),
        warned,
        "no WARN lines while the breaker is open: {:#?}",
        logs.lines()
    );
    assert!(logs.warnings() <= BREAKER_THRESHOLD as usize + 10);

    app.fake.clear_faults();
    app.fake.set_processing_time(Duration::ZERO);
    eventually("every job to be processed", || async {
        app.jobs().await.iter().all(|j| j.state == State::Processed)
    })
    .await;
    app.stop().await;
}

/// Repeated conditions are said once: in a polled folder, a file that is not a recording is
/// reported once, not at every poll; and an upload is one line at info, not three.
#[tokio::test]
async fn a_polled_folder_reports_each_stray_file_once_and_an_upload_is_one_line() {
    let logs = Logs::default();
    let _guard = logs.install();
    let mut app = TestApp::start(
        r#"
[watch]
poll_interval = "100ms"
"#,
    )
    .await;
    const STRAY: usize = 10;
    for i in 0..STRAY {
        std::fs::write(
            app.rec.join(format!("junk{i}.wav")),
            b"this is not audio at all",
        )
        .unwrap();
    }
    // Each recording is found by a later poll than the one before: the stray files have been
    // polled at least that many times by the end.
    const GOOD: usize = 4;
    for i in 0..GOOD {
        let audio = wav(0.1 + i as f64 / 10.0);
        let p = app.drop_file(&format!("good{i}.wav"), &audio);
        app.wait_state(&p, "uploaded").await;
    }
    assert_eq!(
        logs.count("WARN", "not a recording"),
        STRAY,
        "each stray file said once: {:#?}",
        logs.lines()
    );
    assert_eq!(
        logs.count("INFO", "good"),
        GOOD,
        "one info line per upload: {:#?}",
        logs.lines()
    );
    assert_eq!(logs.count("INFO", "uploaded"), GOOD);
    let line = logs
        .lines()
        .into_iter()
        .find(|l| l.contains(" INFO ") && l.contains("uploaded"))
        .unwrap();
    for field in ["interaction_id=", "bytes=", "seconds="] {
        assert!(line.contains(field), "the upload line has {field}: {line}");
    }
    // A stray file that changes is a new candidate and is judged (and said) again.
    std::fs::write(app.rec.join("junk0.wav"), b"still not audio, but longer").unwrap();
    eventually("the changed stray file to be reported", || async {
        logs.count("WARN", "not a recording") == STRAY + 1
    })
    .await;
    app.stop().await;
}
