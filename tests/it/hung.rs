//! Issue 17 item 1 and 12.13: no file-system call on a watched path runs on the runtime thread, so a
//! watched folder on a mount that stops answering freezes nothing but itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// The longest gap between the turns of a task that wants to run every 10 ms on the daemon's
/// runtime: how long something else held the runtime's thread.
fn stall_probe() -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let worst = Arc::new(AtomicU64::new(0));
    let w = worst.clone();
    let h = tokio::spawn(async move {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let gap = last.elapsed().as_millis() as u64;
            w.fetch_max(gap, Ordering::Relaxed);
            last = Instant::now();
        }
    });
    (worst, h)
}

/// 12.13: the first scan of a 200,000-file tree (its watches included) must not hold the runtime.
/// Long: `cargo test --release --test it hung::big_tree -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "200,000 files; run by hand: cargo test --release --test it hung::big_tree -- --ignored --nocapture"]
async fn big_tree_does_not_stall_the_runtime() {
    let mut app = TestApp::start("").await;
    app.stop().await;
    let files = std::env::var("CF_BIG_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000usize);
    let per_dir = 1000;
    let t = Instant::now();
    for d in 0..files.div_ceil(per_dir) {
        let dir = app.rec.join(format!("d{d:04}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir.min(files - d * per_dir) {
            // Not recordings: the walk and the watches are what is measured, not uploads.
            std::fs::write(dir.join(format!("f{f}.txt")), b"x").unwrap();
        }
    }
    eprintln!("made {files} files in {:?}", t.elapsed());
    // What `add_root` did on the runtime's thread before: notify's recursive watch, which walks
    // and stats the whole tree inside `watch()`.
    {
        use notify::Watcher as _;
        let mut w = notify::recommended_watcher(|_| {}).unwrap();
        let t = Instant::now();
        w.watch(&app.rec, notify::RecursiveMode::Recursive).unwrap();
        eprintln!(
            "FIGURES big tree: notify's recursive watch() (the runtime stall before): {:?}",
            t.elapsed()
        );
    }
    let (worst, probe) = stall_probe();
    let t = Instant::now();
    app.restart().await;
    let ready = t.elapsed();
    eventually("the startup scan", || async {
        app.handle.metrics.watch.scans_done() >= 1
    })
    .await;
    let scanned = t.elapsed();
    // What a gap during the scan would have been, not one from the start-up before READY.
    let w = worst.load(Ordering::Relaxed);
    probe.abort();
    eprintln!(
        "FIGURES big tree: {files} files: READY after {ready:?}, first scan done after {scanned:?}, \
         longest runtime stall {w} ms"
    );
    app.stop().await;
}

/// `/healthz`'s status and body, and how long it took to answer.
#[cfg(debug_assertions)]
async fn healthz(addr: std::net::SocketAddr) -> Option<(u16, String, Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Instant::now();
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, text, t.elapsed()))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

#[cfg(debug_assertions)]
fn stored_names(app: &TestApp) -> Vec<String> {
    app.fake
        .interactions()
        .into_iter()
        .flat_map(|i| i.uploads)
        .filter(|u| u.stored)
        .map(|u| u.field_name)
        .collect()
}

/// Issue 17.1: two watched folders, one on a "mount" that stops answering (the debug-only fault
/// hook: every call on it blocks while its hold file exists). Before, the one runtime thread
/// blocked in its `stat`: nothing else was served, `/healthz` timed out, the watchdog stopped.
#[cfg(debug_assertions)]
#[tokio::test]
async fn a_hung_folder_freezes_only_itself() {
    let mut app = TestApp::start("[metrics]\nlisten = \"127.0.0.1:0\"").await;
    let nas = app.dir.path().join("nas");
    std::fs::create_dir_all(&nas).unwrap();
    app.stop().await;
    app.extra_toml = format!(
        "[watch]\npaths = [\"{}\", \"{}\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        app.rec.display(),
        nas.display()
    );
    // A recording queued before the mount hangs: its worker's pre-upload open will hang.
    let early = nas.join("early.wav");
    std::fs::write(&early, wav(0.3)).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&early).unwrap();
        let q = open_queue(&app.db_path()).await;
        q.enqueue(
            &[callferry::queue::NewJob {
                path: early.clone(),
                root: nas.clone(),
                size: m.len(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                dev: m.dev(),
                ino: m.ino(),
            }],
            callferry::clock::now_ms(),
        )
        .await
        .unwrap();
        q.close().await;
    }
    let hold = callferry::watch::fault::hang(&nas);
    let started = Instant::now();
    app.restart().await;
    eprintln!("READY after {:?} with a hung folder", started.elapsed());
    let addr = app.handle.metrics_addr.expect("metrics listen");
    let (worst, probe) = stall_probe();

    // A recording in the hung folder while it hangs, and recordings in the healthy one.
    std::fs::write(nas.join("during.wav"), wav(0.3)).unwrap();
    let t = Instant::now();
    let healthy: Vec<_> = (0..3)
        .map(|i| app.drop_file(&format!("ok{i}.wav"), &wav(0.2 + f64::from(i) / 10.0)))
        .collect();
    for p in &healthy {
        app.wait_state(p, "uploaded").await;
    }
    let healthy_upload = t.elapsed();

    // /healthz names the folder (and answers promptly); status (another process) shows it.
    let (code, body, took) = poll_for("/healthz to report the hung folder", || async {
        healthz(addr)
            .await
            .filter(|(code, body, _)| *code == 503 && body.contains("nas"))
    })
    .await;
    assert_eq!(code, 503);
    assert!(body.contains(&nas.display().to_string()), "{body}");
    let q = open_queue(&app.db_path()).await;
    let report = poll_for("status to show the hung folder", || async {
        let r = callferry::status::gather(&q, &app.db_path()).await.unwrap();
        (!r.folders_not_answering.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(
        report.folders_not_answering,
        vec![nas.display().to_string()]
    );
    let text = callferry::status::render_text(&report, callferry::status::Style { colour: false });
    assert!(
        text.contains("NOT ANSWERING") && text.contains("nas"),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["folders_not_answering"][0].as_str(),
        Some(nas.display().to_string().as_str())
    );
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("callferry_watch_root_unhealthy{")
                && l.contains("nas")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // More healthy-folder work while the hang holds.
    let late = app.drop_file("late.wav", &wav(0.25));
    app.wait_state(&late, "uploaded").await;
    let stall = worst.load(Ordering::Relaxed);
    assert!(
        !stored_names(&app)
            .iter()
            .any(|n| n == "early.wav" || n == "during.wav"),
        "nothing from the hung folder can have been read"
    );
    eprintln!(
        "FIGURES hung folder: healthy recordings uploaded {healthy_upload:?} after they landed; \
         /healthz answered 503 in {took:?}; longest runtime stall {stall} ms"
    );

    // The mount answers again: its recordings are uploaded, once, without attempts burned.
    std::fs::remove_file(&hold).unwrap();
    for name in ["early.wav", "during.wav"] {
        let job = app.wait_state(&nas.join(name), "uploaded").await;
        assert_eq!(
            job.attempts, 0,
            "{name}: waiting on a hung folder costs no attempt"
        );
    }
    poll_for("/healthz to recover", || async {
        healthz(addr).await.filter(|(code, _, _)| *code == 200)
    })
    .await;
    poll_for("status to recover", || async {
        let r = callferry::status::gather(&q, &app.db_path()).await.unwrap();
        r.folders_not_answering.is_empty().then_some(())
    })
    .await;
    let names = stored_names(&app);
    for name in ["early.wav", "during.wav", "ok0.wav", "late.wav"] {
        assert_eq!(
            names.iter().filter(|n| *n == name).count(),
            1,
            "{name} stored once: {names:?}"
        );
    }

    // Hung again, then stopped (SIGTERM): the stop does not wait for the stuck calls.
    let hold = callferry::watch::fault::hang(&nas);
    std::fs::write(nas.join("again.wav"), wav(0.3)).unwrap();
    poll_for("/healthz to report the folder again", || async {
        healthz(addr).await.filter(|(code, _, _)| *code == 503)
    })
    .await;
    let t = Instant::now();
    tokio::time::timeout(DEADLINE, app.stop())
        .await
        .expect("the daemon stops while a folder hangs");
    eprintln!("FIGURES hung folder: stopped in {:?}", t.elapsed());
    probe.abort();
    std::fs::remove_file(&hold).unwrap();
}

/// Issue 17.7: the kernel's inotify watches run out after start (the debug-only hook fails every
/// watch after the root's with ENOSPC). Before, each folder without a watch triggered a full
/// rescan (43 rescans for 50 folders) and half the recordings were still unqueued after 70 s.
/// Now: one warning, each folder without a watch polled on its own every 10 s, no rescans.
#[cfg(debug_assertions)]
#[tokio::test]
async fn out_of_watches_each_unwatched_folder_is_polled_with_one_warning() {
    let logs = Logs::default();
    let _guard = logs.install();
    let mut app = TestApp::start("").await;
    app.stop().await;
    // The root's own watch, then nothing.
    callferry::watch::fault::limit_watches(&app.rec, 1);
    app.restart().await;
    eventually("the startup scan", || async {
        app.handle.metrics.watch.scans_done() >= 1
    })
    .await;
    let rescans_before = app.handle.metrics.watcher_rescans();
    let t = Instant::now();
    let mut files = Vec::new();
    for d in 0..50 {
        // A recording in the new folder at once, and one later, when only a poll can find it.
        files.push(app.drop_file(
            &format!("day{d:02}/a.wav"),
            &wav(0.1 + f64::from(d) / 1000.0),
        ));
    }
    // Wait until every folder has been seen (and refused a watch) before the second wave.
    eventually("every new folder to be polled", || async {
        app.handle.metrics.watch.polled_folders() >= 50
    })
    .await;
    for d in 0..50 {
        files.push(app.drop_file(
            &format!("day{d:02}/b.wav"),
            &wav(0.2 + f64::from(d) / 1000.0),
        ));
    }
    for f in &files {
        app.wait_state(f, "uploaded").await;
    }
    let took = t.elapsed();
    let names: Vec<String> = app
        .fake
        .interactions()
        .into_iter()
        .flat_map(|i| i.uploads)
        .filter(|u| u.stored)
        .map(|u| u.sha256)
        .collect();
    assert_eq!(names.len(), 100, "every recording stored once");
    let rescans = app.handle.metrics.watcher_rescans() - rescans_before;
    assert_eq!(rescans, 0, "no full rescan for a folder without a watch");
    assert_eq!(
        logs.count("WARN", "out of inotify watches"),
        1,
        "one warning for the whole condition"
    );
    eprintln!(
        "FIGURES out of watches: 50 folders without a watch, 100 recordings uploaded in {took:?}, \
         {rescans} full rescans"
    );
    app.stop().await;
}
