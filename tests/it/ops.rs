//! Running it as a service: `/metrics` agrees with what the fake ElevateAI saw, `/healthz` follows
//! the pipeline's health, `status` reads well.

use std::time::Duration;

use callferry_fake::{Endpoint, Fault};

use crate::helpers::*;

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    let addr = app.handle.metrics_addr.expect("metrics are served");
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The value of one series in a Prometheus text exposition, e.g. `callferry_jobs{state="failed"}`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_during_a_run_match_the_fakes_own_counts() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&format!(
        "{METRICS}[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n",
        out.path().display()
    ))
    .await;
    // One declare answered 503 (retried), one upload stored but its answer lost (retried, then 409).
    app.fake.push_fault(Endpoint::Declare, Fault::Status(503));
    app.fake
        .push_fault(Endpoint::Upload, Fault::ResetAfterStore);
    let files = [wav(1.0), wav(1.5), wav(2.0)];
    let paths: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, b)| app.drop_file(&format!("day/call-{i}.wav"), b))
        .collect();
    for p in &paths {
        app.wait_state(p, "processed").await;
    }

    let (status, text) = get(&app, "/metrics").await;
    assert_eq!(status, 200);
    let fake = app.fake.counters();
    let uploads: Vec<_> = app
        .fake
        .interactions()
        .into_iter()
        .flat_map(|i| i.uploads)
        .collect();
    let answered = |code: u16| uploads.iter().filter(|u| u.answered == code).count() as f64;

    assert_eq!(value(&text, "callferry_files_discovered_total"), 3.0);
    assert_eq!(
        value(
            &text,
            "callferry_uploads_total{outcome=\"created\",source=\"default\"}"
        ),
        answered(201)
    );
    assert_eq!(answered(201), 2.0);
    assert_eq!(
        value(
            &text,
            "callferry_uploads_total{outcome=\"conflict\",source=\"default\"}"
        ),
        fake.uploads_conflict as f64
    );
    assert_eq!(fake.uploads_conflict, 1);
    assert_eq!(
        value(
            &text,
            "callferry_uploads_total{outcome=\"retry\",source=\"default\"}"
        ),
        fake.faults_injected as f64,
        "each injected fault cost one retried attempt"
    );
    assert_eq!(
        value(
            &text,
            "callferry_uploads_total{outcome=\"rejected\",source=\"default\"}"
        ),
        fake.uploads_rejected as f64
    );
    assert_eq!(
        value(
            &text,
            "callferry_uploads_total{outcome=\"unauthorized\",source=\"default\"}"
        ),
        fake.unauthorized as f64
    );
    let bytes_201: u64 = uploads
        .iter()
        .filter(|u| u.answered == 201)
        .map(|u| u.size)
        .sum();
    assert_eq!(
        value(&text, "callferry_uploaded_bytes_total{source=\"default\"}"),
        bytes_201 as f64
    );
    assert_eq!(
        value(&text, "callferry_upload_duration_seconds_count"),
        answered(201)
    );
    assert_eq!(value(&text, "callferry_jobs{state=\"processed\"}"), 3.0);
    assert_eq!(value(&text, "callferry_jobs{state=\"uploaded\"}"), 0.0);
    let fetched: f64 = ["transcript", "punctuated", "ai"]
        .iter()
        .map(|k| {
            value(
                &text,
                &format!("callferry_results_fetched_total{{kind=\"{k}\"}}"),
            )
        })
        .sum();
    assert_eq!(fetched, fake.result_fetches as f64);
    assert!(fetched >= 3.0, "at least one kind per recording");
    assert_eq!(value(&text, "callferry_jobs{state=\"pending\"}"), 0.0);
    assert_eq!(value(&text, "callferry_jobs{state=\"failed\"}"), 0.0);
    assert_eq!(
        value(&text, "callferry_oldest_pending_job_age_seconds"),
        0.0
    );
    assert_eq!(value(&text, "callferry_api_paused"), 0.0);
    assert!(value(&text, "callferry_watcher_rescans_total") >= 1.0);
    assert_eq!(value(&text, "callferry_watcher_overflows_total"), 0.0);
    assert!(
        !text.contains(TOKEN),
        "the token never appears in the metrics"
    );

    let (status, body) = get(&app, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_on_a_rejected_token_and_back_when_it_is_accepted() {
    let mut app = TestApp::start(METRICS).await;
    assert_eq!(get(&app, "/healthz").await.0, 200);

    app.fake.set_token("a-rotated-token");
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    let body = poll_for("/healthz to answer 503", || async {
        let (status, body) = get(&app, "/healthz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("token rejected"), "{body}");
    assert!(!body.contains(TOKEN) && !body.contains("a-rotated-token"));
    let (_, text) = get(&app, "/metrics").await;
    assert_eq!(value(&text, "callferry_api_paused"), 1.0);
    assert!(
        value(
            &text,
            "callferry_uploads_total{outcome=\"unauthorized\",source=\"default\"}"
        ) >= 1.0
    );

    // The operator fixes it (here: the service accepts our token again); no restart.
    app.fake.set_token(TOKEN);
    let job = app.wait_state(&pa, "uploaded").await;
    app.assert_uploaded_once(&job, &a);
    eventually("/healthz to answer 200 again", || async {
        get(&app, "/healthz").await.0 == 200
    })
    .await;
    let (_, text) = get(&app, "/metrics").await;
    assert_eq!(value(&text, "callferry_api_paused"), 0.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_waiting_work_that_makes_no_progress() {
    let mut app = TestApp::start(&format!("{METRICS}unhealthy_after = \"1s\"\n")).await;
    app.fake.go_down().await;
    let a = wav(1.0);
    let pa = app.drop_file("a.wav", &a);
    let body = poll_for("/healthz to report the stall", || async {
        let (status, body) = get(&app, "/healthz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("no progress"), "{body}");
    assert!(body.contains("1 job(s) waiting"), "{body}");

    app.fake.come_up().await.unwrap();
    app.wait_state(&pa, "uploaded").await;
    eventually("/healthz to answer 200 again", || async {
        get(&app, "/healthz").await.0 == 200
    })
    .await;
    app.stop().await;
}

/// The daemon as systemd runs it: a separate process with `NOTIFY_SOCKET` and `WATCHDOG_USEC`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_says_ready_status_feeds_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let fake = callferry_fake::FakeApi::start(callferry_fake::FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = dir.path().join("callferry.toml");
    std::fs::write(&cfg, config_text(&fake.base_url(), dir.path(), "")).unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callferry"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env_remove("CALLFERRY_CONFIG")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Collects notifications until `done` says enough, or the deadline passes.
    let recv_until = |sock: UnixDatagram, done: fn(&[String]) -> bool| {
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while start.elapsed() < DEADLINE && !done(&got) {
                if let Ok(n) = sock.recv(&mut buf) {
                    got.extend(
                        String::from_utf8_lossy(&buf[..n])
                            .lines()
                            .map(str::to_string),
                    );
                }
            }
            (sock, got)
        })
    };
    let (sock, got) = recv_until(sock, |got| {
        got.iter().any(|l| l == "READY=1")
            && got.iter().any(|l| l.starts_with("STATUS="))
            && got.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3
    })
    .await
    .unwrap();
    assert!(got.iter().any(|l| l == "READY=1"), "{got:?}");
    let status = got.iter().find(|l| l.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("0 pending") && status.contains("0 failed"),
        "{status}"
    );
    assert!(
        got.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3,
        "an idle, healthy daemon keeps feeding the watchdog: {got:?}"
    );

    // SAFETY: signalling the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (_sock, got) = recv_until(sock, |got| got.iter().any(|l| l == "STOPPING=1"))
        .await
        .unwrap();
    assert!(got.iter().any(|l| l == "STOPPING=1"), "{got:?}");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
